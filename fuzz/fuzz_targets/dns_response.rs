//! What a DNS server sends, as the resolver reads it: arbitrary bytes parsed as the response to
//! a query for an MX, A or AAAA record. Invariants checked:
//! - it never panics, whatever the bytes;
//! - an accepted answer is for the question asked (a response with our id, our name in our
//!   letter case and our type), and its MX hosts feed the MX ordering without panicking;
//! - a real response built by hickory-proto for the same question, with the fuzzer's records,
//!   is always accepted (the parser is not merely refusing everything).
#![no_main]

use gannet_dns::message::{parse_response, Answer};
use gannet_dns::mx::exchanges;
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::{A, MX, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use libfuzzer_sys::fuzz_target;

const NAME: &str = "Mx.ExAmple.TEST";

fuzz_target!(|data: &[u8]| {
    let (control, bytes) = data.split_at(data.len().min(3));
    let id = u16::from_le_bytes([
        control.first().copied().unwrap_or(0),
        control.get(1).copied().unwrap_or(0),
    ]);
    let rtype = match control.get(2).copied().unwrap_or(0) % 3 {
        0 => RecordType::MX,
        1 => RecordType::A,
        _ => RecordType::AAAA,
    };
    if let Ok(parsed) = parse_response(bytes, id, NAME, rtype) {
        if let Answer::Mx(records) = &parsed.answer {
            assert!(rtype == RecordType::MX, "MX records for a {rtype} question");
            let _ = exchanges("example.test", &parsed.answer, u64::from(id));
            assert!(records.len() <= 1024);
        }
    }
    // The same question answered properly, with a record made of the fuzzer's bytes.
    let mut reply = Message::new(id, MessageType::Response, OpCode::Query);
    let name = Name::from_ascii(format!("{NAME}.")).unwrap();
    reply.add_query(Query::query(name.clone(), rtype));
    let rdata = match rtype {
        RecordType::MX => {
            let host = bytes
                .iter()
                .take(20)
                .map(|b| char::from(b'a' + b % 26))
                .collect::<String>();
            let host = if host.is_empty() { "mx".to_string() } else { host };
            let preference = u16::from(control.first().copied().unwrap_or(0));
            Some(RData::MX(MX::new(
                preference,
                Name::from_ascii(format!("{host}.test.")).unwrap(),
            )))
        }
        RecordType::A => Some(RData::A(A::new(10, 0, 0, control.get(1).copied().unwrap_or(1)))),
        _ => None,
    };
    if let Some(rdata) = rdata {
        reply.answers.push(Record::from_rdata(name, 300, rdata));
    }
    reply.authorities.push(Record::from_rdata(
        Name::from_ascii("example.test.").unwrap(),
        600,
        RData::SOA(SOA::new(Name::root(), Name::root(), 1, 1, 1, 1, 300)),
    ));
    let good = reply.to_vec().unwrap();
    let parsed = parse_response(&good, id, NAME, rtype).expect("a proper response is accepted");
    match (rtype, &parsed.answer) {
        (RecordType::MX, Answer::Mx(records)) => assert_eq!(records.len(), 1),
        (RecordType::A, Answer::Addresses(list)) => assert_eq!(list.len(), 1),
        (RecordType::AAAA, Answer::NoData) => {}
        (t, a) => panic!("{t}: unexpected {a:?}"),
    }
});
