//! DNS queries and answers, sans-IO. Distrust every byte: a reply must come from the server we
//! asked, carry our id, be a response, and echo our question exactly, including the random
//! letter case of the name (DNS 0x20), which makes spoofed replies much harder to land.

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// MX records: (preference, exchange without the trailing dot; "" for the root, null MX).
    Mx(Vec<(u16, String)>),
    /// Addresses (A or AAAA).
    Addresses(Vec<IpAddr>),
    /// TXT records, each one's character-strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2).
    Txt(Vec<Vec<u8>>),
    /// PTR records: names without the trailing dot, lower case.
    Names(Vec<String>),
    /// The name exists but has no records of that type (RFC 2308 NODATA).
    NoData,
    /// The name does not exist.
    NxDomain,
    /// The server failed, refused, or did not answer: try again later.
    ServerFailure(String),
}

/// An answer with the time it may be kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub answer: Answer,
    /// Seconds: the smallest record TTL, or for negative answers the SOA's minimum (RFC 2308).
    pub ttl_s: u32,
    /// The reply was truncated (TC): ask again over TCP.
    pub truncated: bool,
}

/// The most TXT bytes one answer may carry, all records together: SPF, DKIM and DMARC records
/// are a few hundred bytes (a 4096-bit RSA key is about 740); the cache holds what it is given.
pub const TXT_ANSWER_BYTES_MAX: usize = 16 * 1024;

/// Why a reply was thrown away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    Malformed,
    WrongId,
    NotAResponse,
    QuestionMismatch,
}

/// Gives `name` a random letter case (DNS 0x20) from `random` bits.
pub fn randomize_case(name: &str, mut random: u64) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphabetic() {
                let upper = random & 1 == 1;
                random = random.rotate_right(1);
                if upper {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            } else {
                c
            }
        })
        .collect()
}

/// Builds a recursive query for `name` (as it should be echoed) of `rtype`.
pub fn build_query(id: u16, name: &str, rtype: RecordType) -> Result<Vec<u8>, String> {
    let fqdn = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    let name = Name::from_ascii(&fqdn).map_err(|e| format!("`{name}` is not a domain name: {e}"))?;
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name, rtype));
    message.to_vec().map_err(|e| format!("cannot encode a DNS query: {e}"))
}

/// Parses a reply to the query (`id`, `name` as sent, `rtype`).
pub fn parse_response(bytes: &[u8], id: u16, name: &str, rtype: RecordType) -> Result<Parsed, Rejected> {
    let message = Message::from_vec(bytes).map_err(|_| Rejected::Malformed)?;
    if message.metadata.id != id {
        return Err(Rejected::WrongId);
    }
    if message.metadata.message_type != MessageType::Response {
        return Err(Rejected::NotAResponse);
    }
    let fqdn = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    match message.queries.as_slice() {
        [q] if q.query_type == rtype && q.name.to_ascii() == fqdn => {}
        _ => return Err(Rejected::QuestionMismatch),
    }
    let truncated = message.metadata.truncation;
    let negative_ttl_s = message
        .authorities
        .iter()
        .find_map(|r| match &r.data {
            RData::SOA(soa) => Some(soa.minimum.min(r.ttl)),
            _ => None,
        })
        .unwrap_or(0);
    match message.metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => {
            return Ok(Parsed {
                answer: Answer::NxDomain,
                ttl_s: negative_ttl_s,
                truncated,
            });
        }
        other => {
            return Ok(Parsed {
                answer: Answer::ServerFailure(format!("DNS server answered {other}")),
                ttl_s: 0,
                truncated,
            });
        }
    }
    let mut ttl_s = u32::MAX;
    let mut mx = Vec::new();
    let mut addresses = Vec::new();
    let mut txt: Vec<Vec<u8>> = Vec::new();
    let mut txt_bytes = 0usize;
    let mut names = Vec::new();
    for record in &message.answers {
        match (&record.data, rtype) {
            (RData::MX(m), RecordType::MX) => {
                let exchange = m.exchange.to_ascii();
                mx.push((m.preference, exchange.trim_end_matches('.').to_ascii_lowercase()));
            }
            (RData::A(a), RecordType::A) => addresses.push(IpAddr::V4(a.0)),
            (RData::AAAA(a), RecordType::AAAA) => addresses.push(IpAddr::V6(a.0)),
            (RData::TXT(t), RecordType::TXT) => {
                let joined: Vec<u8> = t.txt_data.iter().flat_map(|s| s.iter().copied()).collect();
                txt_bytes += joined.len();
                if txt_bytes > TXT_ANSWER_BYTES_MAX {
                    return Ok(Parsed {
                        answer: Answer::ServerFailure(format!(
                            "TXT answer for {name} is over {TXT_ANSWER_BYTES_MAX} bytes"
                        )),
                        ttl_s: 0,
                        truncated,
                    });
                }
                txt.push(joined);
            }
            (RData::PTR(p), RecordType::PTR) => {
                names.push(p.0.to_ascii().trim_end_matches('.').to_ascii_lowercase());
            }
            // CNAMEs and the like on the way to the answer: followed by the recursive server.
            _ => continue,
        }
        ttl_s = ttl_s.min(record.ttl);
    }
    let answer = if !mx.is_empty() {
        Answer::Mx(mx)
    } else if !addresses.is_empty() {
        Answer::Addresses(addresses)
    } else if !txt.is_empty() {
        Answer::Txt(txt)
    } else if !names.is_empty() {
        Answer::Names(names)
    } else {
        ttl_s = negative_ttl_s;
        Answer::NoData
    };
    Ok(Parsed {
        answer,
        ttl_s,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, MX, SOA};
    use hickory_proto::rr::Record;

    fn reply(id: u16, name: &str, rtype: RecordType, code: ResponseCode, answers: Vec<Record>) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Response, OpCode::Query);
        m.metadata.response_code = code;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        for a in answers {
            m.answers.push(a);
        }
        m.authorities.push(Record::from_rdata(
            Name::from_ascii("example.").unwrap(),
            600,
            RData::SOA(SOA::new(Name::root(), Name::root(), 1, 1, 1, 1, 300)),
        ));
        m.to_vec().unwrap()
    }

    #[test]
    fn parses_mx_and_addresses_with_the_smallest_ttl() {
        let name = randomize_case("mail.example", 0b1010_1010_1010);
        let mx = vec![
            Record::from_rdata(
                Name::from_ascii(format!("{name}.")).unwrap(),
                300,
                RData::MX(MX::new(10, Name::from_ascii("mx1.example.").unwrap())),
            ),
            Record::from_rdata(
                Name::from_ascii(format!("{name}.")).unwrap(),
                100,
                RData::MX(MX::new(20, Name::from_ascii("MX2.example.").unwrap())),
            ),
        ];
        let bytes = reply(7, &format!("{name}."), RecordType::MX, ResponseCode::NoError, mx);
        let parsed = parse_response(&bytes, 7, &name, RecordType::MX).unwrap();
        assert_eq!(
            parsed.answer,
            Answer::Mx(vec![(10, "mx1.example".into()), (20, "mx2.example".into())])
        );
        assert_eq!(parsed.ttl_s, 100);
        let a = vec![Record::from_rdata(
            Name::from_ascii("mx1.example.").unwrap(),
            60,
            RData::A(A::new(192, 0, 2, 1)),
        )];
        let bytes = reply(8, "mx1.example.", RecordType::A, ResponseCode::NoError, a);
        let parsed = parse_response(&bytes, 8, "mx1.example", RecordType::A).unwrap();
        assert_eq!(parsed.answer, Answer::Addresses(vec!["192.0.2.1".parse().unwrap()]));
    }

    #[test]
    fn negative_answers_use_the_soa_minimum() {
        let bytes = reply(9, "nope.example.", RecordType::MX, ResponseCode::NXDomain, vec![]);
        let parsed = parse_response(&bytes, 9, "nope.example", RecordType::MX).unwrap();
        assert_eq!((parsed.answer, parsed.ttl_s), (Answer::NxDomain, 300));
        let bytes = reply(9, "empty.example.", RecordType::MX, ResponseCode::NoError, vec![]);
        let parsed = parse_response(&bytes, 9, "empty.example", RecordType::MX).unwrap();
        assert_eq!(parsed.answer, Answer::NoData);
        let bytes = reply(9, "x.example.", RecordType::MX, ResponseCode::ServFail, vec![]);
        assert!(matches!(
            parse_response(&bytes, 9, "x.example", RecordType::MX).unwrap().answer,
            Answer::ServerFailure(_)
        ));
    }

    #[test]
    fn spoofed_or_mismatched_replies_are_rejected() {
        let bytes = reply(1, "a.example.", RecordType::MX, ResponseCode::NoError, vec![]);
        assert_eq!(
            parse_response(&bytes, 2, "a.example", RecordType::MX),
            Err(Rejected::WrongId)
        );
        assert_eq!(
            parse_response(&bytes, 1, "A.example", RecordType::MX),
            Err(Rejected::QuestionMismatch),
            "0x20 case must be echoed"
        );
        assert_eq!(
            parse_response(&bytes, 1, "a.example", RecordType::A),
            Err(Rejected::QuestionMismatch)
        );
        assert_eq!(
            parse_response(b"garbage", 1, "a.example", RecordType::MX),
            Err(Rejected::Malformed)
        );
        let query = build_query(1, "a.example", RecordType::MX).unwrap();
        assert_eq!(
            parse_response(&query, 1, "a.example", RecordType::MX),
            Err(Rejected::NotAResponse)
        );
    }

    #[test]
    fn txt_records_join_their_strings_and_are_bounded() {
        use hickory_proto::rr::rdata::TXT;
        let name = "_dmarc.example.";
        let record = |strings: Vec<String>| {
            Record::from_rdata(Name::from_ascii(name).unwrap(), 120, RData::TXT(TXT::new(strings)))
        };
        let bytes = reply(
            3,
            name,
            RecordType::TXT,
            ResponseCode::NoError,
            vec![
                record(vec!["v=DMARC1; ".into(), "p=reject".into()]),
                record(vec!["other".into()]),
            ],
        );
        let parsed = parse_response(&bytes, 3, name, RecordType::TXT).unwrap();
        assert_eq!(
            parsed.answer,
            Answer::Txt(vec![b"v=DMARC1; p=reject".to_vec(), b"other".to_vec()])
        );
        assert_eq!(parsed.ttl_s, 120);
        let huge: Vec<Record> = (0..80).map(|_| record(vec!["x".repeat(250)])).collect();
        let bytes = reply(4, name, RecordType::TXT, ResponseCode::NoError, huge);
        let parsed = parse_response(&bytes, 4, name, RecordType::TXT).unwrap();
        assert!(matches!(parsed.answer, Answer::ServerFailure(why) if why.contains("over")));
    }
}
