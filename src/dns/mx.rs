//! The lookups behind MX delivery (RFC 5321 section 5.1): its MX hosts by preference (random among
//! equal preferences), or the domain itself when it has no MX (implicit MX); a null MX
//! (RFC 7505) or a domain that does not exist fails for good.

use std::net::{IpAddr, SocketAddr};

use gannet_dns::message::Answer;
pub use gannet_dns::mx::{exchanges, order_exchanges, MxError, ADDRESSES_PER_HOST_MAX};
use hickory_proto::rr::RecordType;

use super::resolver::Resolver;

/// The addresses to try for `domain`, in order, with `port`: its MX hosts' (or the domain's
/// own, implicit MX) A and AAAA addresses.
pub async fn resolve(resolver: &Resolver, domain: &str, port: u16, random: u64) -> Result<Vec<SocketAddr>, MxError> {
    let hosts = exchanges(domain, &*resolver.lookup(domain, RecordType::MX).await, random)?;
    addresses(resolver, domain, &hosts, port).await
}

/// The addresses of mail exchangers `hosts` (of `domain`, named in errors), in order, with
/// `port`: at most `ADDRESSES_PER_HOST_MAX` per host.
pub async fn addresses(
    resolver: &Resolver,
    domain: &str,
    hosts: &[String],
    port: u16,
) -> Result<Vec<SocketAddr>, MxError> {
    let mut addresses = Vec::new();
    let mut temporary = None;
    for host in hosts {
        for rtype in [RecordType::A, RecordType::AAAA] {
            match &*resolver.lookup(host, rtype).await {
                Answer::Addresses(list) => addresses.extend(
                    list.iter()
                        .take(ADDRESSES_PER_HOST_MAX)
                        .map(|ip: &IpAddr| SocketAddr::new(*ip, port)),
                ),
                Answer::ServerFailure(why) => temporary = Some(format!("451 4.4.3 cannot look up {host}: {why}")),
                _ => {}
            }
        }
    }
    if addresses.is_empty() {
        return Err(match temporary {
            Some(why) => MxError::Temporary(why),
            None => MxError::Permanent(format!("550 5.1.2 no address for the mail exchangers of {domain}")),
        });
    }
    Ok(addresses)
}
