//! Inbound mail authentication on mx listeners: SPF (RFC 7208) for the HELO and MAIL FROM
//! identities, every DKIM signature (RFC 6376), ARC chains (RFC 8617) and DMARC (RFC 7489:
//! policy discovery, relaxed or strict alignment of the SPF and DKIM identifiers with the From:
//! domain), with the verdicts in one Authentication-Results header (RFC 8601) whose authserv-id
//! is `server.hostname`.
//!
//! The grammars and the cryptography are mail-auth's. Its DNS is not: mail-auth reads answers
//! from caches it is given before asking its own resolver, and the one it is given here has no
//! name servers, so it can only fail. A verification runs over a [`cache::Prefetched`] that
//! notes every name it lacked; the shard looks those up with Gannet's resolver (so through the
//! shared DNS cache, with its TTLs, negative caching, limits and metrics), fills them in and runs
//! the verification again, until nothing new is missing (SPF's nested includes take a round per
//! level). The CPU part of each round (parsing, body hashes, signature checks) runs on the
//! shard's blocking thread when it is large (more than two signatures, a large message, or an
//! ARC seal to make), and on the shard's own thread otherwise, where it costs less than the
//! handover would. docs/authentication.md says why this design and what it costs.

pub mod cache;
pub mod results;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::Policy;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{AuthenticatedMessage, DmarcResult, MessageAuthenticator, SpfOutput, SpfResult};

use crate::dns::resolver::Resolver;
use cache::{Found, Kind, Miss, Prefetched};

/// Rounds of "verify, look up what was missing" at most (SPF allows 10 DNS terms, each of which
/// can add a level).
const ROUNDS_MAX: usize = 16;

/// DKIM signatures verified per message at most, whatever the configuration says (RFC 6376
/// 6.1: a verifier may limit how many it checks, against messages made to cost it CPU).
pub const DKIM_SIGNATURES_MAX: usize = 64;

/// Void lookups one SPF evaluation may make (RFC 7208 4.6.4: "SHOULD limit void lookups to
/// two"); past it the result is permerror.
pub const SPF_VOID_LOOKUPS_MAX: usize = 2;

/// Public-key operations (DKIM signatures and ARC seals) a round may run on the shard's own
/// thread: about 40-70 us each (benches/verify.rs), less than handing the round to the
/// blocking thread and back costs (two context switches; benches/verify-rate). Above it, and
/// always for sealing (a signature), the round goes to the blocking thread.
const INLINE_SIGNATURES_MAX: usize = 2;
/// And only for a message this small: each signature's body hash reads the whole body.
const INLINE_MESSAGE_BYTES_MAX: usize = 256 * 1024;

/// SPF's results for one transaction, found at MAIL FROM ([`Verifier::sender`]) and reused
/// for DMARC and the header once the message has arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderSpf {
    /// The HELO identity's result.
    pub helo: SpfOutput,
    /// The MAIL FROM identity's (the HELO identity's again for the null sender).
    pub mail_from: SpfOutput,
}

/// What the verification needs from the SMTP session.
#[derive(Clone)]
pub struct Input {
    pub client: IpAddr,
    /// The EHLO/HELO name.
    pub helo: String,
    /// The MAIL FROM address, empty for the null sender.
    pub mail_from: String,
    /// `server.hostname`: the authserv-id.
    pub hostname: String,
    /// Seal the message with an ARC set once verified (`[mail_authentication.arc_seal]`).
    pub sealer: Option<Arc<crate::dkim::seal::Sealer>>,
    /// SPF's results when they were found at MAIL FROM; else they are found with the rest.
    pub spf: Option<SenderSpf>,
    /// DKIM signatures verified at most (the rest are reported as not verified); at most
    /// [`DKIM_SIGNATURES_MAX`].
    pub dkim_signatures_max: usize,
}

/// The verdicts, owned (mail-auth's outputs borrow the message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdicts {
    /// The `Authentication-Results: ...\r\n` header to put on top of the message.
    pub header: String,
    /// The ARC set (ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results) when sealing
    /// is configured and the chain may be sealed; empty otherwise.
    pub arc_set: String,
    pub spf: SpfResult,
    /// Each verified signature's result name (`pass`, `fail`, `neutral`, `temperror`, ...).
    pub dkim: Vec<&'static str>,
    /// Signatures past `dkim_signatures_max`, not verified.
    pub dkim_skipped: usize,
    pub dmarc: DmarcVerdict,
    /// The From: domain DMARC judged ("" when it had none, or several).
    pub from_domain: String,
}

/// DMARC's verdict and what the From: domain's policy asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcVerdict {
    Pass,
    /// Neither identifier passed and aligned; `policy` is the domain's (`p=` or `sp=`).
    Fail {
        policy: DmarcPolicy,
    },
    /// A DNS failure kept DMARC from deciding.
    TempError,
    PermError,
    /// No DMARC record, or no From: domain to judge.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcPolicy {
    None,
    Quarantine,
    Reject,
}

/// The authenticator and the verification loop. One per process; shards share it.
pub struct Verifier {
    authenticator: MessageAuthenticator,
}

impl Verifier {
    /// A verifier whose own resolver has no name servers (see the module's comment).
    pub fn new() -> Result<Verifier, String> {
        let config = mail_auth::hickory_resolver::config::ResolverConfig::from_parts(None, vec![], vec![]);
        let mut options = mail_auth::hickory_resolver::config::ResolverOpts::default();
        options.attempts = 0;
        options.cache_size = 0;
        let authenticator = MessageAuthenticator::new(config, options)
            .map_err(|e| format!("cannot set up mail authentication: {e}"))?;
        Ok(Verifier { authenticator })
    }

    /// Verifies `message` (headers and body as received), looking up what it needs with
    /// `resolver`, within `timeout` in all: a lookup past it counts as a DNS failure
    /// (temperror), never a hang.
    pub async fn verify(
        self: &Arc<Self>,
        resolver: &Resolver,
        message: Arc<Vec<u8>>,
        input: Arc<Input>,
        timeout: Duration,
    ) -> Verdicts {
        let deadline = Instant::now() + timeout;
        let mut prefetched = Prefetched::sharing(resolver.shared_cache(), input.client);
        let mut asked: Vec<Miss> = Vec::new();
        let mut round = 0;
        let inline =
            message.len() <= INLINE_MESSAGE_BYTES_MAX && results::signature_fields(&message) <= INLINE_SIGNATURES_MAX;
        loop {
            let verdicts = if inline {
                self.evaluate(&message, &input, &prefetched)
            } else {
                let (verdicts, back) = self
                    .evaluate_blocking(message.clone(), input.clone(), prefetched, false)
                    .await;
                prefetched = back;
                verdicts
            };
            round += 1;
            if round >= ROUNDS_MAX || !fill_misses(&mut prefetched, &mut asked, resolver, input.client, deadline).await
            {
                if input.sealer.is_none() {
                    return verdicts;
                }
                // Sealing signs: once, over the final round's results.
                return self.evaluate_blocking(message, input, prefetched, true).await.0;
            }
        }
    }

    /// SPF alone (RFC 7208 `check_host` of the MAIL FROM identity, or of the HELO identity for
    /// the null sender), with the same rounds of lookups as [`Verifier::verify`]; evaluated on
    /// the calling thread (SPF costs no cryptography). The RFC 7208 test suite runs through it.
    pub async fn spf(&self, resolver: &Resolver, input: &Input, timeout: Duration) -> SpfResult {
        let round = |prefetched: &Prefetched| {
            let params = if input.mail_from.is_empty() {
                SpfParameters::verify_ehlo(input.client, &input.helo, &input.hostname)
            } else {
                SpfParameters::verify_mail_from(input.client, &input.helo, &input.hostname, &input.mail_from)
            };
            self.check_spf(prefetched, params).result()
        };
        spf_rounds(resolver, input.client, timeout, round)
            .await
            .unwrap_or(SpfResult::TempError)
    }

    /// SPF for both identities (HELO, and MAIL FROM unless it is the null sender), with the
    /// rounds of [`Verifier::verify`]: what the shard asks at MAIL FROM. On the calling thread.
    pub async fn sender(&self, resolver: &Resolver, input: &Input, timeout: Duration) -> SenderSpf {
        let round = |prefetched: &Prefetched| self.sender_round(input, prefetched);
        match spf_rounds(resolver, input.client, timeout, round).await {
            Some(spf) => spf,
            None => {
                let temperror = |domain: &str| SpfOutput::new(domain.to_string()).with_result(SpfResult::TempError);
                let domain = input.mail_from.rsplit_once('@').map_or(input.helo.as_str(), |(_, d)| d);
                SenderSpf {
                    helo: temperror(&input.helo),
                    mail_from: temperror(domain),
                }
            }
        }
    }

    /// One SPF check (`check_host` of one identity: mail-auth's `verify_spf` of a HELO or a
    /// MAIL FROM identity is exactly that) over what `prefetched` holds, with the void-lookup
    /// limit Gannet counts.
    fn check_spf(&self, prefetched: &Prefetched, params: SpfParameters<'_>) -> SpfOutput {
        prefetched.take_voids();
        let output = futures_lite::future::block_on(self.authenticator.verify_spf(prefetched.params(params)));
        void_limit(output, prefetched.take_voids())
    }

    /// One round of both SPF checks over what `prefetched` holds.
    fn sender_round(&self, input: &Input, prefetched: &Prefetched) -> SenderSpf {
        let check = |params: SpfParameters<'_>| self.check_spf(prefetched, params);
        let helo = input.helo.as_str();
        let spf_helo = check(SpfParameters::verify_ehlo(input.client, helo, &input.hostname));
        let spf_from = if input.mail_from.is_empty() {
            spf_helo.clone()
        } else {
            check(SpfParameters::verify_mail_from(
                input.client,
                helo,
                &input.hostname,
                &input.mail_from,
            ))
        };
        SenderSpf {
            helo: spf_helo,
            mail_from: spf_from,
        }
    }

    /// One round on the shard's blocking thread.
    async fn evaluate_blocking(
        self: &Arc<Self>,
        message: Arc<Vec<u8>>,
        input: Arc<Input>,
        prefetched: Prefetched,
        seal: bool,
    ) -> (Verdicts, Prefetched) {
        let verifier = self.clone();
        glommio::executor()
            .spawn_blocking(move || {
                let verdicts = verifier.evaluate_sealing(&message, &input, &prefetched, seal);
                (verdicts, prefetched)
            })
            .await
    }

    /// One round: every check over what `prefetched` holds. Never waits: every lookup is
    /// answered from `prefetched` or fails at once.
    pub fn evaluate(&self, message: &[u8], input: &Input, prefetched: &Prefetched) -> Verdicts {
        self.evaluate_sealing(message, input, prefetched, false)
    }

    /// [`Verifier::evaluate`], and with `seal` the ARC set too.
    fn evaluate_sealing(&self, message: &[u8], input: &Input, prefetched: &Prefetched, seal: bool) -> Verdicts {
        let Some(mut parsed) = AuthenticatedMessage::parse(message) else {
            return unparseable(input);
        };
        let dkim_skipped = cap_signatures(&mut parsed, input.dkim_signatures_max.min(DKIM_SIGNATURES_MAX));
        let auth = &self.authenticator;
        use futures_lite::future::block_on as run;
        let dkim = run(auth.verify_dkim(prefetched.params(&parsed)));
        let arc = run(auth.verify_arc(prefetched.params(&parsed)));
        let helo = input.helo.as_str();
        let found;
        let spf = match &input.spf {
            Some(spf) => spf,
            None => {
                found = self.sender_round(input, prefetched);
                &found
            }
        };
        let (spf_helo, spf_from) = (&spf.helo, &spf.mail_from);
        let mail_from_domain = input.mail_from.rsplit_once('@').map_or(helo, |(_, d)| d);
        let dmarc =
            run(auth.verify_dmarc(prefetched.params(DmarcParameters::new(&parsed, &dkim, mail_from_domain, spf_from))));
        let from_domain = parsed
            .from
            .first()
            .and_then(|f| f.rsplit_once('@'))
            .map_or("", |(_, d)| d);
        let verdict = dmarc_verdict(&dmarc);
        let parts = results::Parts {
            dkim: &dkim,
            from_domain,
            spf_helo,
            spf_from,
            dkim_skipped,
            arc: &arc,
            dmarc: &dmarc,
            verdict,
            input,
        };
        let header = results::header(&input.hostname, &parts);
        let arc_set = match (&input.sealer, seal) {
            (Some(sealer), true) => {
                let for_seal = results::for_seal(&input.hostname, &parts);
                sealer.seal(&parsed, &for_seal, &arc).unwrap_or_else(|e| {
                    tracing::info!("not ARC-sealed: {e}");
                    String::new()
                })
            }
            _ => String::new(),
        };
        Verdicts {
            header,
            arc_set,
            spf: spf_from.result(),
            dkim: dkim.iter().map(|d| results::dkim_name(d.result())).collect(),
            dkim_skipped,
            dmarc: verdict,
            from_domain: dmarc.domain().to_string(),
        }
    }
}

/// A message mail-auth cannot parse (no header section): nothing verifies.
fn unparseable(input: &Input) -> Verdicts {
    Verdicts {
        header: format!("Authentication-Results: {}; none\r\n", input.hostname),
        arc_set: String::new(),
        spf: SpfResult::None,
        dkim: Vec::new(),
        dkim_skipped: 0,
        dmarc: DmarcVerdict::None,
        from_domain: String::new(),
    }
}

/// Keeps the first `max` DKIM signatures of `parsed` (malformed ones count, and come first, as
/// mail-auth reports them first); returns how many were dropped unverified.
fn cap_signatures(parsed: &mut AuthenticatedMessage<'_>, max: usize) -> usize {
    let total = parsed.dkim_headers.len() + parsed.errors.iter().filter(|e| is_dkim_error(e)).count();
    if total <= max {
        return 0;
    }
    let mut kept_errors = 0;
    parsed.errors.retain(|e| {
        if !is_dkim_error(e) {
            return true;
        }
        kept_errors += 1;
        kept_errors <= max
    });
    let kept_errors = kept_errors.min(max);
    parsed.dkim_headers.truncate(max - kept_errors);
    let kept = kept_errors + parsed.dkim_headers.len();
    debug_assert_eq!(kept, max);
    total - kept
}

fn is_dkim_error(header: &mail_auth::common::headers::Header<'_, mail_auth::Error>) -> bool {
    matches!(header.header, mail_auth::Error::Dkim(_))
}

/// DMARC's verdict from mail-auth's output. mail-auth (RFC 9989's tree walk) leaves both
/// identifiers' results `None` when neither passed SPF or DKIM at all; with a record found
/// that is a DMARC failure all the same (RFC 7489 4.2:
/// pass needs an aligned identifier that passed).
pub fn dmarc_verdict(dmarc: &mail_auth::DmarcOutput) -> DmarcVerdict {
    let (spf, dkim) = (dmarc.spf_result(), dmarc.dkim_result());
    if *spf == DmarcResult::Pass || *dkim == DmarcResult::Pass {
        return DmarcVerdict::Pass;
    }
    let any = |f: fn(&DmarcResult) -> bool| f(spf) || f(dkim);
    if any(|r| matches!(r, DmarcResult::TempError(_))) {
        return DmarcVerdict::TempError;
    }
    if any(|r| matches!(r, DmarcResult::PermError(_))) {
        return DmarcVerdict::PermError;
    }
    if dmarc.dmarc_record().is_none() {
        return DmarcVerdict::None;
    }
    let policy = match dmarc.policy() {
        Policy::Reject => DmarcPolicy::Reject,
        Policy::Quarantine => DmarcPolicy::Quarantine,
        Policy::None | Policy::Unspecified => DmarcPolicy::None,
    };
    DmarcVerdict::Fail { policy }
}

impl DmarcVerdict {
    /// RFC 8601's name for the result.
    pub fn name(self) -> &'static str {
        match self {
            DmarcVerdict::Pass => "pass",
            DmarcVerdict::Fail { .. } => "fail",
            DmarcVerdict::TempError => "temperror",
            DmarcVerdict::PermError => "permerror",
            DmarcVerdict::None => "none",
        }
    }
}

/// The DNS name for a miss: as mail-auth asked, or the client's reverse name for PTR.
fn query_name(miss: &Miss, client: IpAddr) -> String {
    match miss.kind {
        Kind::Ptr => reverse_name(client),
        _ => miss.name.clone(),
    }
}

/// `d.c.b.a.in-addr.arpa.` or the nibbles under `ip6.arpa.` (RFC 1035 3.5, RFC 3596 2.5).
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(73);
            for byte in v6.octets().iter().rev() {
                name.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            name.push_str("ip6.arpa.");
            name
        }
    }
}

/// An SPF result after `voids` void lookups: permerror past [`SPF_VOID_LOOKUPS_MAX`].
fn void_limit(output: SpfOutput, voids: usize) -> SpfOutput {
    if voids <= SPF_VOID_LOOKUPS_MAX {
        return output;
    }
    SpfOutput::new(output.domain().to_string()).with_result(SpfResult::PermError)
}

/// Runs `round` over what has been looked up, looking up what it lacked, until it lacks
/// nothing new (its last result) or runs out of rounds (`None`).
async fn spf_rounds<T>(
    resolver: &Resolver,
    client: IpAddr,
    timeout: Duration,
    round: impl Fn(&Prefetched) -> T,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut prefetched = Prefetched::sharing(resolver.shared_cache(), client);
    let mut asked: Vec<Miss> = Vec::new();
    for _ in 0..ROUNDS_MAX {
        let output = round(&prefetched);
        if !fill_misses(&mut prefetched, &mut asked, resolver, client, deadline).await {
            return Some(output);
        }
    }
    None
}

/// After a round: looks up with Gannet's resolver what the round lacked and was not asked for
/// before, and fills it in (at most [`cache::LOOKUPS_MAX`] names in all). False when there was
/// nothing new to look up, or no room: the round's verdict stands.
async fn fill_misses(
    prefetched: &mut Prefetched,
    asked: &mut Vec<Miss>,
    resolver: &Resolver,
    client: IpAddr,
    deadline: Instant,
) -> bool {
    let (hits, negatives) = prefetched.take_shared_hits();
    crate::metrics::with(|m| {
        m.dns_lookups.add("hit", hits as u64);
        m.dns_lookups.add("negative", negatives as u64);
    });
    let misses: Vec<Miss> = prefetched
        .take_misses()
        .into_iter()
        .filter(|m| !asked.contains(m))
        .collect();
    if misses.is_empty() || !prefetched.may_fill() {
        return false;
    }
    for miss in misses {
        if !prefetched.may_fill() {
            break;
        }
        let found = lookup(resolver, &miss, client, deadline).await;
        prefetched.fill(&miss, client, found);
        asked.push(miss);
    }
    true
}

/// Looks a miss up with Gannet's resolver, giving up at `deadline`.
async fn lookup(resolver: &Resolver, miss: &Miss, client: IpAddr, deadline: Instant) -> Found {
    let rtype = miss.kind.record_type();
    let name = query_name(miss, client);
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Found::Failed("the verification's time ran out".into());
    }
    let answer = futures_lite::future::or(async { Some(resolver.lookup(&name, rtype).await) }, async {
        glommio::timer::sleep(remaining).await;
        None
    })
    .await;
    let Some(answer) = answer else {
        return Found::Failed(format!("{name}: the verification's time ran out"));
    };
    Found::of(&answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names_follow_the_rfcs() {
        assert_eq!(reverse_name("192.0.2.7".parse().unwrap()), "7.2.0.192.in-addr.arpa.");
        let v6 = reverse_name("2001:db8::1".parse().unwrap());
        assert!(
            v6.starts_with("1.0.0.0.0.0.0.0.") && v6.ends_with("8.b.d.0.1.0.0.2.ip6.arpa."),
            "{v6}"
        );
    }

    fn input() -> Input {
        Input {
            client: "192.0.2.7".parse().unwrap(),
            helo: "mail.sender.example".into(),
            mail_from: "alice@sender.example".into(),
            hostname: "mx.test".into(),
            sealer: None,
            spf: None,
            dkim_signatures_max: 10,
        }
    }

    const MESSAGE: &[u8] = b"From: Alice <alice@sender.example>\r\nTo: bob@mx.test\r\nSubject: hi\r\n\r\nhello\r\n";

    /// Rounds as the shard runs them, with a fixed zone instead of the resolver.
    fn verify_with(zone: &[(&str, Found)]) -> (Verdicts, usize) {
        let verifier = Verifier::new().unwrap();
        let mut prefetched = Prefetched::default();
        let mut rounds = 0;
        loop {
            let verdicts = verifier.evaluate(MESSAGE, &input(), &prefetched);
            rounds += 1;
            let misses = prefetched.take_misses();
            if misses.is_empty() || rounds > ROUNDS_MAX {
                return (verdicts, rounds);
            }
            for miss in misses {
                let found = zone
                    .iter()
                    .find(|(name, _)| miss.name.trim_end_matches('.').eq_ignore_ascii_case(name))
                    .map_or(Found::Nothing, |(_, f)| match f {
                        Found::Txt(t) => Found::Txt(t.clone()),
                        Found::Addresses(a) => Found::Addresses(a.clone()),
                        Found::Mx(m) => Found::Mx(m.clone()),
                        _ => Found::Nothing,
                    });
                prefetched.fill(&miss, input().client, found);
            }
        }
    }

    #[test]
    fn misses_are_filled_and_the_verdicts_follow_the_zone() {
        // SPF through an include, a DMARC record with p=reject: SPF passes and aligns.
        let zone = [
            (
                "sender.example",
                Found::Txt(vec![b"v=spf1 include:_spf.sender.example -all".to_vec()]),
            ),
            (
                "_spf.sender.example",
                Found::Txt(vec![b"v=spf1 ip4:192.0.2.0/24 -all".to_vec()]),
            ),
            (
                "_dmarc.sender.example",
                Found::Txt(vec![b"v=DMARC1; p=reject".to_vec()]),
            ),
        ];
        let (verdicts, rounds) = verify_with(&zone);
        assert_eq!(verdicts.spf, SpfResult::Pass, "{}", verdicts.header);
        assert_eq!(verdicts.dmarc, DmarcVerdict::Pass, "{}", verdicts.header);
        assert!(rounds >= 3, "the include took a round of its own: {rounds}");
        assert!(
            verdicts.header.starts_with("Authentication-Results: mx.test;"),
            "{}",
            verdicts.header
        );
        assert!(
            verdicts.header.contains("spf=pass") && verdicts.header.contains("dmarc=pass"),
            "{}",
            verdicts.header
        );

        // The same with an SPF record that does not list the client: DMARC fails, p=reject.
        let zone = [
            (
                "sender.example",
                Found::Txt(vec![b"v=spf1 ip4:198.51.100.0/24 -all".to_vec()]),
            ),
            (
                "_dmarc.sender.example",
                Found::Txt(vec![b"v=DMARC1; p=reject".to_vec()]),
            ),
        ];
        let (verdicts, _) = verify_with(&zone);
        assert_eq!(verdicts.spf, SpfResult::Fail, "{}", verdicts.header);
        assert_eq!(
            verdicts.dmarc,
            DmarcVerdict::Fail {
                policy: DmarcPolicy::Reject
            },
            "{}",
            verdicts.header
        );
        // Nothing published: none.
        let (verdicts, _) = verify_with(&[]);
        assert_eq!(
            (verdicts.spf, verdicts.dmarc),
            (SpfResult::None, DmarcVerdict::None),
            "{}",
            verdicts.header
        );
    }

    #[test]
    fn more_than_two_void_lookups_are_a_permerror_but_an_mx_terms_host_lookups_are_not_voids() {
        let spf = |record: &str, extra: &[(&str, Found)]| {
            let mut zone = vec![("sender.example", Found::Txt(vec![record.as_bytes().to_vec()]))];
            for (name, found) in extra {
                let copy = match found {
                    Found::Mx(m) => Found::Mx(m.clone()),
                    _ => Found::Nothing,
                };
                zone.push((name, copy));
            }
            verify_with(&zone).0.spf
        };
        assert_eq!(spf("v=spf1 a:n1.example a:n2.example ?all", &[]), SpfResult::Neutral);
        assert_eq!(
            spf("v=spf1 a:n1.example a:n2.example a:n3.example ?all", &[]),
            SpfResult::PermError
        );
        // Three MX hosts without addresses: one term, and its MX answer was not empty.
        let mx = Found::Mx(vec![
            (10, "h1.example".into()),
            (20, "h2.example".into()),
            (30, "h3.example".into()),
        ]);
        assert_eq!(
            spf("v=spf1 mx:m.example ?all", &[("m.example", mx)]),
            SpfResult::Neutral
        );
    }

    #[test]
    fn names_in_the_shared_dns_cache_are_answered_in_the_same_round() {
        use crate::dns::cache::{CacheLimits, DnsCache};
        use crate::dns::message::Answer;
        use hickory_proto::rr::RecordType;
        let cache = DnsCache::new(CacheLimits {
            entries_max: 100,
            ttl_min: Duration::from_secs(1),
            ttl_max: Duration::from_secs(3600),
            negative_ttl_max: Duration::from_secs(3600),
            failure_ttl: Duration::from_secs(30),
        });
        let now = Instant::now();
        let txt = |text: &str| Answer::Txt(vec![text.as_bytes().to_vec()]);
        cache.insert(
            "sender.example",
            RecordType::TXT,
            txt("v=spf1 include:_spf.sender.example -all"),
            300,
            now,
        );
        cache.insert(
            "_spf.sender.example",
            RecordType::TXT,
            txt("v=spf1 ip4:192.0.2.0/24 -all"),
            300,
            now,
        );
        cache.insert(
            "_dmarc.sender.example",
            RecordType::TXT,
            txt("v=DMARC1; p=reject"),
            300,
            now,
        );
        cache.insert("mail.sender.example", RecordType::TXT, Answer::NxDomain, 300, now);
        // DMARC's tree walk (RFC 9989) also asks the parent.
        cache.insert("_dmarc.example", RecordType::TXT, Answer::NxDomain, 300, now);
        let verifier = Verifier::new().unwrap();
        let prefetched = Prefetched::sharing(cache, input().client);
        let verdicts = verifier.evaluate(MESSAGE, &input(), &prefetched);
        let misses = prefetched.take_misses();
        assert!(misses.is_empty(), "{misses:?} {}", verdicts.header);
        assert_eq!((verdicts.spf, verdicts.dmarc), (SpfResult::Pass, DmarcVerdict::Pass));
        let (hits, negatives) = prefetched.take_shared_hits();
        assert!(hits >= 3 && negatives >= 1, "{hits} {negatives}");
    }
}
