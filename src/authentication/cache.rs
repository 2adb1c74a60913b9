//! The answers one message's verification may use: mail-auth asks its caches first, and every
//! answer here came from Gannet's resolver (and so from the shared DNS cache, with its TTLs,
//! negative caching and metrics). A name mail-auth asks for that is not here is a *miss*: it is
//! noted, mail-auth's own resolver (which has no name servers) fails at once, and the caller
//! looks the name up with Gannet's resolver, fills it in and runs the verification again.
//!
//! Negative answers: a TXT lookup's is kept as mail-auth's "record not found" error, so that SPF
//! and DMARC see none or a void lookup; an address, MX or PTR lookup's as an empty set (mail-auth's
//! caches for those hold only record sets), which matches nothing. A server failure of a TXT
//! lookup is kept as a resolver error (temperror); one of the other kinds is left out, so that
//! mail-auth's failing resolver gives the same temperror.
//!
//! A miss first asks the shared DNS cache itself (lock-free, so from the blocking thread too):
//! a name another message already looked up is answered in the same round, so that a message
//! whose names are all cached takes one round, not one per level of lookups.
//!
//! Void lookups (RFC 7208 4.6.4): mail-auth does not count them, so the maps do. An empty
//! answer served for an A, AAAA, MX or PTR lookup is a void lookup of the term that asked,
//! except the address lookups of an `mx` mechanism's hosts (the term is the MX lookup). Empty
//! TXT answers are not counted: the domain's own record gives none, an `include:` or
//! `redirect=` target without one is already a permerror, and an `exp=` one must not count.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use hickory_proto::rr::RecordType;
use mail_auth::common::parse::TxtRecordParser;

use crate::dns::cache::DnsCache;
use crate::dns::message::Answer;
use mail_auth::{DnssecStatus, Parameters, RecordSet, ResolverCache, Txt, MX};

/// Names one message's verification may look up (SPF's 10 DNS terms with their MX and address
/// lookups, DKIM keys, DMARC and ARC records fit well within it).
pub const LOOKUPS_MAX: usize = 96;

/// The kind of record a miss needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Txt,
    Mx,
    A,
    Aaaa,
    Ptr,
}

impl Kind {
    pub fn record_type(self) -> RecordType {
        match self {
            Kind::Txt => RecordType::TXT,
            Kind::Mx => RecordType::MX,
            Kind::A => RecordType::A,
            Kind::Aaaa => RecordType::AAAA,
            Kind::Ptr => RecordType::PTR,
        }
    }
}

/// A name mail-auth asked for that was not here.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Miss {
    pub kind: Kind,
    /// The name as mail-auth asked (a fully qualified name with the trailing dot); empty for
    /// PTR, which is always of the client's address.
    pub name: String,
}

/// One map of answers that notes what it was asked for and did not have.
pub struct Answers<K, V> {
    kind: Kind,
    map: Mutex<HashMap<K, V>>,
    links: Links,
}

/// What every map of one verification shares: the misses noted, the void-lookup count, and
/// the shared DNS cache.
#[derive(Clone)]
struct Links {
    misses: Arc<Mutex<Vec<Miss>>>,
    voids: Arc<Mutex<Voids>>,
    shared: Option<Arc<Shared>>,
}

/// The shared DNS cache, asked on a miss before the miss is noted.
pub struct Shared {
    cache: Arc<DnsCache>,
    /// The client's address (the name of a PTR lookup).
    client: IpAddr,
    /// Answers taken from the shared cache (at most [`LOOKUPS_MAX`]), and how many of them
    /// were negative; the shard counts them in the DNS metrics as the resolver would.
    hits: AtomicUsize,
    negatives: AtomicUsize,
}

/// Void lookups served since the last [`Prefetched::take_voids`], and the hosts of the MX
/// answers served (whose address lookups are part of their `mx` term).
#[derive(Default)]
struct Voids {
    count: usize,
    mx_hosts: Vec<Box<str>>,
}

/// MX hosts remembered per evaluation at most (RFC 7208 4.6.4 allows 10 per MX lookup).
const MX_HOSTS_MAX: usize = 64;

/// What serving an answer means for the void-lookup count, and how an answer of Gannet's
/// resolver becomes one of mail-auth's (None: leave it out, so mail-auth's failing resolver
/// gives a temperror).
pub trait Served: Sized {
    fn from_found(name: &str, found: Found) -> Option<Self>;
    /// The answer is empty: a void lookup if its term counts.
    fn is_void(&self) -> bool;
    /// For an MX answer, its hosts.
    fn exchanges(&self) -> Vec<Box<str>> {
        Vec::new()
    }
}

impl Served for Txt {
    fn from_found(name: &str, found: Found) -> Option<Txt> {
        Some(match found {
            Found::Txt(records) => parse_txt(name, &records),
            Found::Failed(why) => Txt::Error(mail_auth::Error::Dns(mail_auth::DnsError::Resolver(why))),
            _ => Txt::Error(not_found()),
        })
    }

    fn is_void(&self) -> bool {
        false
    }
}

impl Served for RecordSet<MX> {
    fn from_found(_: &str, found: Found) -> Option<Self> {
        match found {
            Found::Failed(_) => None,
            Found::Mx(records) => Some(mx_set(records)),
            _ => Some(record_set(Vec::new())),
        }
    }

    fn is_void(&self) -> bool {
        self.rrset.is_empty()
    }

    fn exchanges(&self) -> Vec<Box<str>> {
        self.rrset.iter().flat_map(|mx| mx.exchanges.iter().cloned()).collect()
    }
}

impl Served for RecordSet<Ipv4Addr> {
    fn from_found(_: &str, found: Found) -> Option<Self> {
        (!matches!(found, Found::Failed(_))).then(|| record_set(v4(found)))
    }

    fn is_void(&self) -> bool {
        self.rrset.is_empty()
    }
}

impl Served for RecordSet<Ipv6Addr> {
    fn from_found(_: &str, found: Found) -> Option<Self> {
        (!matches!(found, Found::Failed(_))).then(|| record_set(v6(found)))
    }

    fn is_void(&self) -> bool {
        self.rrset.is_empty()
    }
}

impl Served for RecordSet<Box<str>> {
    fn from_found(_: &str, found: Found) -> Option<Self> {
        match found {
            Found::Failed(_) => None,
            // Without the trailing dot: mail-auth's ptr mechanism compares the names with the
            // target domain as written (RFC 7208 5.5), and its address lookups of them add the
            // dot themselves.
            Found::Names(names) => Some(record_set(names.into_iter().map(Box::from).collect())),
            _ => Some(record_set(Vec::new())),
        }
    }

    fn is_void(&self) -> bool {
        self.rrset.is_empty()
    }
}

/// The maps are only ever used by one thread at a time (the verification moves between the
/// shard and its blocking thread with them); a poisoned lock still holds good answers.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records what a key's `Hash` writes: for a `str`, its bytes followed by 0xff (the standard
/// library's `Hasher::write_str`). It is how a miss learns the name mail-auth asked for, which
/// `ResolverCache::get` gives only as a borrowed `Q`.
#[derive(Default)]
struct Recorder(Vec<u8>);

impl std::hash::Hasher for Recorder {
    fn write(&mut self, bytes: &[u8]) {
        if self.0.len() < 1024 {
            self.0.extend_from_slice(bytes);
        }
    }

    fn finish(&self) -> u64 {
        0
    }
}

/// The text of a `str` key, from what it hashes.
fn key_text<Q: Hash + ?Sized>(key: &Q) -> Option<String> {
    let mut recorder = Recorder::default();
    key.hash(&mut recorder);
    let mut bytes = recorder.0;
    if bytes.pop() != Some(0xff) {
        return None;
    }
    String::from_utf8(bytes).ok()
}

impl<K: Hash + Eq, V: Clone + Served> ResolverCache<K, V> for Answers<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut found = lock(&self.map).get(name).cloned();
        if found.is_none() {
            found = self.shared_answer(name);
        }
        if let Some(answer) = &found {
            self.served(name, answer);
        }
        if found.is_none() {
            // A PTR lookup is always of the client's address (SPF's ptr mechanism and %{p}).
            let text = if self.kind == Kind::Ptr {
                Some(String::new())
            } else {
                key_text(name)
            };
            if let Some(name) = text {
                let miss = Miss { kind: self.kind, name };
                let mut misses = lock(&self.links.misses);
                if !misses.contains(&miss) && misses.len() < LOOKUPS_MAX {
                    misses.push(miss);
                }
            }
        }
        found
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        lock(&self.map).remove(name)
    }

    /// mail-auth stores what its own resolver found; it has no name servers, so it finds
    /// nothing and this is never called with an answer. A miss is noted in `get`'s caller.
    fn insert(&self, _key: K, _value: V, _valid_until: std::time::Instant) {}
}

impl<K: Hash + Eq, V: Clone + Served> Answers<K, V> {
    fn new(kind: Kind, links: &Links) -> Answers<K, V> {
        Answers {
            kind,
            map: Mutex::new(HashMap::new()),
            links: links.clone(),
        }
    }

    /// The shared DNS cache's answer for a miss, if it has a live one (a remembered failure
    /// is left to the round's lookups, which give the same failure).
    fn shared_answer<Q: Hash + ?Sized>(&self, name: &Q) -> Option<V> {
        let shared = self.links.shared.as_ref()?;
        if shared.hits.load(Ordering::Relaxed) >= LOOKUPS_MAX {
            return None;
        }
        let text = match self.kind {
            Kind::Ptr => super::reverse_name(shared.client),
            _ => key_text(name)?,
        };
        let lower = text.trim_end_matches('.').to_ascii_lowercase();
        let answer = shared.cache.get(&lower, self.kind.record_type(), Instant::now())?;
        let found = Found::of(&answer);
        let negative = match found {
            Found::Failed(_) => return None,
            Found::Nothing => true,
            _ => false,
        };
        let value = V::from_found(&text, found)?;
        shared.hits.fetch_add(1, Ordering::Relaxed);
        if negative {
            shared.negatives.fetch_add(1, Ordering::Relaxed);
        }
        Some(value)
    }

    /// Counts a void lookup, or remembers an MX answer's hosts.
    fn served<Q: Hash + ?Sized>(&self, name: &Q, answer: &V) {
        let mut voids = lock(&self.links.voids);
        if !answer.is_void() {
            for host in answer.exchanges() {
                if voids.mx_hosts.len() < MX_HOSTS_MAX {
                    voids.mx_hosts.push(host);
                }
            }
            return;
        }
        if matches!(self.kind, Kind::A | Kind::Aaaa) {
            let text = key_text(name).unwrap_or_default();
            if voids.mx_hosts.iter().any(|h| h.eq_ignore_ascii_case(&text)) {
                return;
            }
        }
        voids.count += 1;
    }

    fn put_found(&self, key: K, name: &str, found: Found) {
        if let Some(value) = V::from_found(name, found) {
            lock(&self.map).insert(key, value);
        }
    }
}

/// Every kind of answer one verification uses.
pub struct Prefetched {
    pub txt: Answers<Box<str>, Txt>,
    pub mx: Answers<Box<str>, RecordSet<MX>>,
    pub ipv4: Answers<Box<str>, RecordSet<Ipv4Addr>>,
    pub ipv6: Answers<Box<str>, RecordSet<Ipv6Addr>>,
    pub ptr: Answers<IpAddr, RecordSet<Box<str>>>,
    links: Links,
    /// Names filled in so far (bounded by [`LOOKUPS_MAX`]).
    filled: usize,
}

impl Default for Prefetched {
    fn default() -> Prefetched {
        Prefetched::with_shared(None)
    }
}

impl Prefetched {
    /// Answers that also read the shared DNS cache (for a verification of `client`'s mail).
    pub fn sharing(cache: Arc<DnsCache>, client: IpAddr) -> Prefetched {
        Prefetched::with_shared(Some(Arc::new(Shared {
            cache,
            client,
            hits: AtomicUsize::new(0),
            negatives: AtomicUsize::new(0),
        })))
    }

    fn with_shared(shared: Option<Arc<Shared>>) -> Prefetched {
        let links = Links {
            misses: Arc::new(Mutex::new(Vec::new())),
            voids: Arc::new(Mutex::new(Voids::default())),
            shared,
        };
        Prefetched {
            txt: Answers::new(Kind::Txt, &links),
            mx: Answers::new(Kind::Mx, &links),
            ipv4: Answers::new(Kind::A, &links),
            ipv6: Answers::new(Kind::Aaaa, &links),
            ptr: Answers::new(Kind::Ptr, &links),
            links,
            filled: 0,
        }
    }

    /// Answers taken from the shared DNS cache since the last call: (with records, negative).
    pub fn take_shared_hits(&self) -> (usize, usize) {
        self.links.shared.as_ref().map_or((0, 0), |s| {
            let negatives = s.negatives.swap(0, Ordering::Relaxed);
            (s.hits.swap(0, Ordering::Relaxed).saturating_sub(negatives), negatives)
        })
    }
}

/// mail-auth's parameters `params` with every cache of `prefetched`.
pub type Cached<'x, P> = Parameters<
    'x,
    P,
    Answers<Box<str>, Txt>,
    Answers<Box<str>, RecordSet<MX>>,
    Answers<Box<str>, RecordSet<Ipv4Addr>>,
    Answers<Box<str>, RecordSet<Ipv6Addr>>,
    Answers<IpAddr, RecordSet<Box<str>>>,
>;

impl Prefetched {
    /// `params` answered from these caches.
    pub fn params<'x, P>(&'x self, params: P) -> Cached<'x, P> {
        Parameters::new(params)
            .with_txt_cache(&self.txt)
            .with_mx_cache(&self.mx)
            .with_ipv4_cache(&self.ipv4)
            .with_ipv6_cache(&self.ipv6)
            .with_ptr_cache(&self.ptr)
    }
}

/// What Gannet's resolver found for a miss.
pub enum Found {
    Txt(Vec<Vec<u8>>),
    Mx(Vec<(u16, String)>),
    Addresses(Vec<IpAddr>),
    Names(Vec<String>),
    /// NXDOMAIN or NODATA.
    Nothing,
    /// The lookup failed for now (timeout, SERVFAIL).
    Failed(String),
}

impl Found {
    /// What an answer of Gannet's resolver says.
    pub fn of(answer: &Answer) -> Found {
        match answer {
            Answer::Txt(records) => Found::Txt(records.clone()),
            Answer::Mx(records) => Found::Mx(records.clone()),
            Answer::Addresses(list) => Found::Addresses(list.clone()),
            Answer::Names(names) => Found::Names(names.clone()),
            Answer::NoData | Answer::NxDomain => Found::Nothing,
            Answer::ServerFailure(why) => Found::Failed(why.clone()),
        }
    }
}

fn record_set<T>(items: Vec<T>) -> RecordSet<T> {
    RecordSet {
        rrset: Arc::from(items),
        dnssec_status: DnssecStatus::Indeterminate,
    }
}

fn not_found() -> mail_auth::Error {
    mail_auth::Error::Dns(mail_auth::DnsError::RecordNotFound(
        hickory_proto::op::ResponseCode::NXDomain,
    ))
}

impl Prefetched {
    /// The misses since the last call (each name once).
    pub fn take_misses(&self) -> Vec<Miss> {
        std::mem::take(&mut *lock(&self.links.misses))
    }

    /// The void lookups served since the last call (see the module's comment); starts the
    /// count of the next SPF evaluation afresh.
    pub fn take_voids(&self) -> usize {
        let mut voids = lock(&self.links.voids);
        voids.mx_hosts.clear();
        std::mem::take(&mut voids.count)
    }

    /// Whether another name may be filled in.
    pub fn may_fill(&self) -> bool {
        self.filled < LOOKUPS_MAX
    }

    /// Fills in what Gannet's resolver found for `miss` (for PTR, of `client`).
    pub fn fill(&mut self, miss: &Miss, client: IpAddr, found: Found) {
        self.filled += 1;
        let key: Box<str> = Box::from(miss.name.as_str());
        let name = miss.name.as_str();
        match miss.kind {
            Kind::Txt => self.txt.put_found(key, name, found),
            Kind::Mx => self.mx.put_found(key, name, found),
            Kind::A => self.ipv4.put_found(key, name, found),
            Kind::Aaaa => self.ipv6.put_found(key, name, found),
            Kind::Ptr => self.ptr.put_found(client, name, found),
        }
    }
}

fn v4(found: Found) -> Vec<Ipv4Addr> {
    match found {
        Found::Addresses(list) => list
            .into_iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn v6(found: Found) -> Vec<Ipv6Addr> {
    match found {
        Found::Addresses(list) => list
            .into_iter()
            .filter_map(|ip| match ip {
                IpAddr::V6(v6) => Some(v6),
                IpAddr::V4(_) => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// MX records grouped by preference, as mail-auth keeps them (names with the trailing dot).
fn mx_set(mut records: Vec<(u16, String)>) -> RecordSet<MX> {
    records.sort_by_key(|(preference, _)| *preference);
    let mut grouped: Vec<MX> = Vec::new();
    for (preference, name) in records {
        let name: Box<str> = Box::from(format!("{name}."));
        match grouped.last_mut() {
            Some(last) if last.preference == preference => {
                let mut exchanges = std::mem::take(&mut last.exchanges).into_vec();
                exchanges.push(name);
                last.exchanges = exchanges.into_boxed_slice();
            }
            _ => grouped.push(MX {
                exchanges: vec![name].into_boxed_slice(),
                preference,
            }),
        }
    }
    record_set(grouped)
}

/// A TXT answer parsed as the record its name says it holds, the way mail-auth parses its own
/// answers: the first record that parses wins, none that parses is "invalid record type".
fn parse_txt(name: &str, records: &[Vec<u8>]) -> Txt {
    fn first<T: TxtRecordParser + Into<Txt>>(records: &[Vec<u8>]) -> Txt {
        let mut result = Err(mail_auth::Error::Dns(mail_auth::DnsError::InvalidRecordType));
        for record in records {
            result = T::parse(record);
            if result.is_ok() {
                break;
            }
        }
        result.into()
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("_dmarc.") {
        first::<mail_auth::dmarc::Dmarc>(records)
    } else if lower.contains("._domainkey.") {
        first::<mail_auth::common::verify::DomainKey>(records)
    } else if lower.contains("._atps.") {
        first::<mail_auth::dkim::Atps>(records)
    } else if spf_records(records) > 1 {
        // RFC 7208 4.5: more than one SPF record is a permerror (mail-auth would take the first).
        Txt::Error(mail_auth::Error::ParseError)
    } else {
        first::<mail_auth::spf::Spf>(records)
    }
}

/// How many records are SPF records: "v=spf1" alone or followed by a space (RFC 7208 4.5).
fn spf_records(records: &[Vec<u8>]) -> usize {
    records
        .iter()
        .filter(|r| r.len() >= 6 && r[..6].eq_ignore_ascii_case(b"v=spf1") && (r.len() == 6 || r[6] == b' '))
        .count()
}
