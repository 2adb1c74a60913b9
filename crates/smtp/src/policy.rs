//! Inbound policy decisions as pure functions: who may relay, and network lists.
//!
//! Gannet is never an open relay: a recipient is accepted only when its domain is one we accept
//! mail for (a local domain), or when the client is in a trusted network.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IP network in CIDR notation, such as `127.0.0.0/8` or `::1/128`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix_bits: u8,
}

impl Network {
    /// Whether `ip` is inside this network. IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_bits)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Network, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!(
                "`{text}` is not a network; write an address with a prefix, such as \"192.0.2.0/24\" or \"::1/128\""
            )
        })?;
        let bits_max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_bits = match prefix {
            None => bits_max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= bits_max)
                .ok_or_else(|| format!("`{text}`: the prefix length must be a number from 0 to {bits_max}"))?,
        };
        Ok(Network { addr, prefix_bits })
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_bits)
    }
}

/// Why a recipient was accepted, or that it was not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayDecision {
    /// The recipient's domain is one of ours: anyone may send to it.
    LocalDomain,
    /// The client is in a trusted network: it may send anywhere.
    TrustedNetwork,
    /// The client authenticated (SMTP AUTH): it may send anywhere.
    Authenticated,
    /// The domain-less `<Postmaster>` (RFC 5321 4.5.1): always accepted.
    Postmaster,
    Denied,
}

impl RelayDecision {
    pub fn accepted(self) -> bool {
        self != RelayDecision::Denied
    }
}

/// The relay rules, read from configuration.
#[derive(Debug, Clone, Default)]
pub struct RelayPolicy {
    /// Lower-case domain names.
    pub local_domains: Vec<String>,
    pub trusted_networks: Vec<Network>,
}

impl RelayPolicy {
    /// Decides whether a client at `client_ip`, `authenticated` or not, may send to a recipient
    /// in `domain` (as written in the address: a name, an address literal, or empty for
    /// `<Postmaster>`).
    pub fn decide(&self, client_ip: IpAddr, authenticated: bool, domain: &[u8]) -> RelayDecision {
        if domain.is_empty() {
            return RelayDecision::Postmaster;
        }
        if self
            .local_domains
            .iter()
            .any(|d| d.as_bytes().eq_ignore_ascii_case(domain))
        {
            return RelayDecision::LocalDomain;
        }
        if authenticated {
            return RelayDecision::Authenticated;
        }
        if self.trusted_networks.iter().any(|n| n.contains(client_ip)) {
            return RelayDecision::TrustedNetwork;
        }
        RelayDecision::Denied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Network {
        s.parse().unwrap()
    }

    #[test]
    fn networks_match_by_prefix() {
        assert!(net("127.0.0.0/8").contains("127.1.2.3".parse().unwrap()));
        assert!(!net("127.0.0.0/8").contains("128.0.0.1".parse().unwrap()));
        assert!(net("127.0.0.0/8").contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(net("::1/128").contains("::1".parse().unwrap()));
        assert!(!net("::1/128").contains("127.0.0.1".parse().unwrap()));
        assert!(net("0.0.0.0/0").contains("203.0.113.9".parse().unwrap()));
        assert!(net("192.0.2.1").contains("192.0.2.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("nonsense".parse::<Network>().is_err());
    }

    /// Every combination of (recipient domain: local / other / postmaster) x (client: trusted
    /// network or not) x (authenticated or not).
    #[test]
    fn relay_decision_table() {
        use RelayDecision::*;
        let policy = RelayPolicy {
            local_domains: vec!["local.example".into()],
            trusted_networks: vec![net("127.0.0.1/32")],
        };
        let trusted: IpAddr = "127.0.0.1".parse().unwrap();
        let stranger: IpAddr = "127.0.0.2".parse().unwrap();
        let table: &[(IpAddr, bool, &[u8], RelayDecision)] = &[
            (trusted, false, b"local.example", LocalDomain),
            (trusted, false, b"LOCAL.Example", LocalDomain),
            (trusted, false, b"elsewhere.example", TrustedNetwork),
            (trusted, false, b"", Postmaster),
            (trusted, true, b"local.example", LocalDomain),
            (trusted, true, b"elsewhere.example", Authenticated),
            (trusted, true, b"", Postmaster),
            (stranger, false, b"local.example", LocalDomain),
            (stranger, false, b"elsewhere.example", Denied),
            (stranger, false, b"[127.0.0.1]", Denied),
            (stranger, false, b"", Postmaster),
            (stranger, true, b"local.example", LocalDomain),
            (stranger, true, b"elsewhere.example", Authenticated),
            (stranger, true, b"[127.0.0.1]", Authenticated),
            (stranger, true, b"", Postmaster),
        ];
        for (ip, authenticated, domain, want) in table {
            assert_eq!(
                policy.decide(*ip, *authenticated, domain),
                *want,
                "{ip} authenticated={authenticated} {:?}",
                String::from_utf8_lossy(domain)
            );
        }
    }
}
