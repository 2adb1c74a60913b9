//! An authoritative DNS server for the tests, on loopback UDP and TCP (one port), built with
//! hickory-proto. It answers from a small zone, and can be told to fail, stay silent, or truncate
//! its UDP answer for chosen names. It records every question it gets.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, PTR, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

#[derive(Default)]
pub struct Zone {
    records: HashMap<(String, RecordType), Vec<RData>>,
    /// Every name with a record, for NODATA against NXDOMAIN without a scan.
    names: HashSet<String>,
    pub ttl_s: u32,
    pub servfail: HashSet<String>,
    pub silent: HashSet<String>,
    pub truncate_udp: HashSet<String>,
    /// Names whose questions of a type they have no record of get no answer (the RFC 7208
    /// suite's TIMEOUT beside other records).
    pub silent_unless_present: HashSet<String>,
}

impl Zone {
    pub fn mx(&mut self, name: &str, records: &[(u16, &str)]) -> &mut Zone {
        let rdata = records
            .iter()
            .map(|(pref, host)| {
                let exchange = if *host == "." {
                    Name::root()
                } else {
                    Name::from_ascii(format!("{host}.")).unwrap()
                };
                RData::MX(MX::new(*pref, exchange))
            })
            .collect();
        self.records.insert((name.to_string(), RecordType::MX), rdata);
        self.names.insert(name.to_string());
        self
    }

    /// A TXT record, its value cut into strings of at most 255 bytes (RFC 1035 3.3.14).
    pub fn txt(&mut self, name: &str, value: &str) -> &mut Zone {
        let strings = value
            .as_bytes()
            .chunks(255)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        self.records
            .entry((name.to_string(), RecordType::TXT))
            .or_default()
            .push(RData::TXT(TXT::new(strings)));
        self.names.insert(name.to_string());
        self
    }

    /// Any record, under a name written as the zone keys it (lower case, no trailing dot).
    pub fn record(&mut self, name: &str, rtype: RecordType, rdata: RData) -> &mut Zone {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.records.entry((name.clone(), rtype)).or_default().push(rdata);
        self.names.insert(name);
        self
    }

    /// A TXT record made of these character-strings.
    pub fn txt_strings(&mut self, name: &str, strings: Vec<String>) -> &mut Zone {
        self.record(name, RecordType::TXT, RData::TXT(TXT::new(strings)))
    }

    pub fn aaaa(&mut self, name: &str, ip: std::net::Ipv6Addr) -> &mut Zone {
        self.record(name, RecordType::AAAA, RData::AAAA(AAAA(ip)))
    }

    /// A PTR record; `None` if `target` is not a domain name.
    pub fn ptr(&mut self, name: &str, target: &str) -> Option<&mut Zone> {
        let target = Name::from_ascii(format!("{}.", target.trim_end_matches('.'))).ok()?;
        Some(self.record(name, RecordType::PTR, RData::PTR(PTR(target))))
    }

    /// A CNAME: questions of any other type about `name` get it, then `target`'s records.
    pub fn cname(&mut self, name: &str, target: &str) -> Option<&mut Zone> {
        let target = Name::from_ascii(format!("{}.", target.trim_end_matches('.'))).ok()?;
        Some(self.record(name, RecordType::CNAME, RData::CNAME(CNAME(target))))
    }

    /// Forgets every record and every failure set.
    pub fn clear(&mut self) {
        self.records.clear();
        self.names.clear();
        self.servfail.clear();
        self.silent.clear();
        self.truncate_udp.clear();
        self.silent_unless_present.clear();
    }

    pub fn a(&mut self, name: &str, ip: [u8; 4]) -> &mut Zone {
        self.records
            .entry((name.to_string(), RecordType::A))
            .or_default()
            .push(RData::A(A::new(ip[0], ip[1], ip[2], ip[3])));
        self.names.insert(name.to_string());
        self
    }
}

/// One question the server got: name as asked (case kept), type, and whether over TCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub name: String,
    pub rtype: RecordType,
    pub tcp: bool,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    pub zone: Arc<Mutex<Zone>>,
    pub questions: Arc<Mutex<Vec<Question>>>,
}

fn answer(zone: &Zone, request: &Message, tcp: bool) -> Option<Vec<u8>> {
    let query = request.queries.first()?.clone();
    let name = query.name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    if zone.silent.contains(&name)
        || (zone.silent_unless_present.contains(&name) && !zone.records.contains_key(&(name.clone(), query.query_type)))
    {
        return None;
    }
    let mut reply = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    // Echo the question exactly as asked (DNS 0x20).
    reply.add_query(query.clone());
    if zone.servfail.contains(&name) {
        reply.metadata.response_code = ResponseCode::ServFail;
        return reply.to_vec().ok();
    }
    if !tcp && zone.truncate_udp.contains(&name) {
        reply.metadata.truncation = true;
        return reply.to_vec().ok();
    }
    let soa = Record::from_rdata(
        Name::from_ascii("test.").unwrap(),
        zone.ttl_s,
        RData::SOA(SOA::new(Name::root(), Name::root(), 1, 60, 60, 60, zone.ttl_s)),
    );
    let cname = zone
        .records
        .get(&(name.clone(), RecordType::CNAME))
        .and_then(|r| r.first().cloned())
        .filter(|_| query.query_type != RecordType::CNAME);
    if let (None, Some(RData::CNAME(target))) = (zone.records.get(&(name.clone(), query.query_type)), cname) {
        // As a recursive server: the alias, then what its target has of the type asked.
        reply.answers.push(Record::from_rdata(
            query.name.clone(),
            zone.ttl_s,
            RData::CNAME(target.clone()),
        ));
        let target_name = target.0.to_ascii().trim_end_matches('.').to_ascii_lowercase();
        for data in zone.records.get(&(target_name, query.query_type)).into_iter().flatten() {
            reply
                .answers
                .push(Record::from_rdata(target.0.clone(), zone.ttl_s, data.clone()));
        }
        return reply.to_vec().ok();
    }
    match zone.records.get(&(name.clone(), query.query_type)) {
        Some(rdata) => {
            for data in rdata {
                reply
                    .answers
                    .push(Record::from_rdata(query.name.clone(), zone.ttl_s, data.clone()));
            }
        }
        None if zone.names.contains(&name) => reply.authorities.push(soa),
        None => {
            reply.metadata.response_code = ResponseCode::NXDomain;
            reply.authorities.push(soa);
        }
    }
    reply.to_vec().ok()
}

impl DnsServer {
    pub fn start() -> DnsServer {
        // One port for UDP and TCP, from below the ephemeral range (see `free_port`), so that no
        // outbound connection can be holding it.
        let (udp, tcp) = loop {
            let addr = SocketAddr::from(([127, 0, 0, 1], super::free_port()));
            if let (Ok(tcp), Ok(udp)) = (TcpListener::bind(addr), UdpSocket::bind(addr)) {
                break (udp, tcp);
            }
        };
        DnsServer::serve(udp, tcp)
    }

    /// On a chosen address (port 53 of a loopback address, for tools that read
    /// /etc/resolv.conf, which has no port).
    pub fn start_on(addr: SocketAddr) -> DnsServer {
        let tcp = TcpListener::bind(addr).expect("bind the test DNS server (TCP)");
        let udp = UdpSocket::bind(addr).expect("bind the test DNS server (UDP)");
        DnsServer::serve(udp, tcp)
    }

    fn serve(udp: UdpSocket, tcp: TcpListener) -> DnsServer {
        let addr = udp.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone {
            ttl_s: 300,
            ..Zone::default()
        }));
        let questions = Arc::new(Mutex::new(Vec::new()));
        let (z, q) = (zone.clone(), questions.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                let Ok(request) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if let Some(query) = request.queries.first() {
                    q.lock().unwrap().push(Question {
                        name: query.name.to_ascii(),
                        rtype: query.query_type,
                        tcp: false,
                    });
                }
                if let Some(reply) = answer(&z.lock().unwrap(), &request, false) {
                    let _ = udp.send_to(&reply, from);
                }
            }
        });
        let (z, q) = (zone.clone(), questions.clone());
        std::thread::spawn(move || {
            for stream in tcp.incoming() {
                let Ok(mut stream) = stream else { continue };
                let (z, q) = (z.clone(), q.clone());
                std::thread::spawn(move || {
                    let mut len = [0u8; 2];
                    while stream.read_exact(&mut len).is_ok() {
                        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if stream.read_exact(&mut body).is_err() {
                            return;
                        }
                        let Ok(request) = Message::from_vec(&body) else { return };
                        if let Some(query) = request.queries.first() {
                            q.lock().unwrap().push(Question {
                                name: query.name.to_ascii(),
                                rtype: query.query_type,
                                tcp: true,
                            });
                        }
                        let Some(reply) = answer(&z.lock().unwrap(), &request, true) else {
                            return;
                        };
                        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&reply);
                        if stream.write_all(&framed).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        DnsServer { addr, zone, questions }
    }

    /// Questions asked about `name` (case-insensitive) of `rtype`.
    pub fn asked(&self, name: &str, rtype: RecordType) -> Vec<Question> {
        let wanted = format!("{}.", name.to_ascii_lowercase());
        self.questions
            .lock()
            .unwrap()
            .iter()
            .filter(|q| q.rtype == rtype && q.name.to_ascii_lowercase() == wanted)
            .cloned()
            .collect()
    }
}
