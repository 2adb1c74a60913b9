//! The RFC 7208 SPF test suite (`rfc7208-tests.yml` from the pyspf 2.0.14 source distribution
//! on PyPI) through Gannet's SPF evaluation (`Verifier::spf`: mail-auth over answers from
//! Gannet's resolver), each scenario's zone data served by the tests' own DNS server. It prints
//! how many cases pass and asserts that exactly the cases listed in `KNOWN_FAILURES`, each with
//! its explanation, fail: a regression fails the test, and so does a case that starts passing.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::dns::DnsServer;
use gannet::authentication::{Input, Verifier};
use gannet::dns::cache::{CacheLimits, DnsCache};
use gannet::dns::resolver::Resolver;
use hickory_proto::rr::rdata::{A, MX};
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::Value;

/// Cases that fail, and why. Each explanation says what Gannet (or mail-auth) does and why the
/// suite expects otherwise.
const KNOWN_FAILURES: &[(&str, &str)] = &[
    ("badip4", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("control-char-policy", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("non-ascii-mech", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("non-ascii-policy", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("invalid-domain", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("a-bad-cidr4", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("a-bad-cidr6", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("a-bad-domain", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("a-bad-toplabel", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("a-dual-cidr-ip4-err", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("a-null", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("a-numeric", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("a-numeric-toplabel", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("a-only-toplabel", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("a-only-toplabel-trailing-dot", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("mx-bad-cidr4", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("mx-bad-cidr6", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("mx-bad-domain", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("mx-bad-toplab", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("mx-null", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("mx-numeric-top-label", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("cidr4-032", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("cidr4-33", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("cidr6-129", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("empty-modifier-name", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("exp-syntax-error", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("invalid-modifier", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("redirect-syntax-error", "mail-auth 0.13 accepts this malformed record or term instead of a permerror (its parser is lenient)"),
    ("modifier-charset-good", "mail-auth refuses an unknown modifier whose name has '-', '_' or '.' (RFC 7208 allows them) with a permerror"),
    ("redirect-after-mechanisms2", "mail-auth gives a permerror where the redirect= after a non-matching mechanism should be followed"),
    ("a-cidr6-0-ip4mapped", "mail-auth matches ip6 and a//0 / mx//0 terms against an IPv4 (or IPv4-mapped) client, which RFC 7208 5 says they never match"),
    ("mx-cidr6-0-ip4mapped", "mail-auth matches ip6 and a//0 / mx//0 terms against an IPv4 (or IPv4-mapped) client, which RFC 7208 5 says they never match"),
    ("cidr6-0-ip4", "mail-auth matches ip6 and a//0 / mx//0 terms against an IPv4 (or IPv4-mapped) client, which RFC 7208 5 says they never match"),
    ("cidr6-ip4", "mail-auth matches ip6 and a//0 / mx//0 terms against an IPv4 (or IPv4-mapped) client, which RFC 7208 5 says they never match"),
    ("exists-ip6only", "mail-auth asks AAAA for exists: with an IPv6 client; RFC 7208 5.7 says the lookup is always A"),
    ("a-colon-domain", "the name holds ':' '/' or spaces, which hickory-proto's name parser (Gannet's query builder) refuses, so it is never asked"),
    ("a-colon-domain-ip4mapped", "the name holds ':' '/' or spaces, which hickory-proto's name parser (Gannet's query builder) refuses, so it is never asked"),
    ("mx-colon-domain", "the name holds ':' '/' or spaces, which hickory-proto's name parser (Gannet's query builder) refuses, so it is never asked"),
    ("mx-colon-domain-ip4mapped", "the name holds ':' '/' or spaces, which hickory-proto's name parser (Gannet's query builder) refuses, so it is never asked"),
    ("macro-mania-in-domain", "the name holds ':' '/' or spaces, which hickory-proto's name parser (Gannet's query builder) refuses, so it is never asked"),
    ("null-text", "the tests' DNS server (hickory-proto) cannot encode a TXT record with no strings, so it answers nothing and the lookup times out (temperror)"),
];

/// Downloads the pyspf sdist and converts the suite's YAML documents to one JSON array.
fn suite() -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "pyspf==2.0.14",
            "--no-binary",
            ":all:",
            "--no-deps",
            "-q",
            "-d",
        ])
        .arg(dir.path())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "pip download pyspf: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = r#"
import sys, tarfile, json, yaml
with tarfile.open(sys.argv[1] + '/pyspf-2.0.14.tar.gz') as t:
    data = t.extractfile('pyspf-2.0.14/test/rfc7208-tests.yml').read()
print(json.dumps(list(yaml.safe_load_all(data))))
"#;
    let json = common::python(script, &[&dir.path().display().to_string()]);
    serde_json::from_str::<Vec<Value>>(&json).unwrap()
}

/// Loads one scenario's zone data the way pyspf's driver (test/testspf.py) reads it: SPF-type
/// (99) records are served as TXT too when the name has no TXT entry (a `TXT: NONE` counts), a
/// `NONE` value is no record, and `TIMEOUT` times out the questions of the types the name has no
/// record of.
fn load(zone: &mut common::dns::Zone, data: &serde_json::Map<String, Value>) {
    zone.clear();
    zone.ttl_s = 0;
    for (name, records) in data {
        let records = records.as_array().cloned().unwrap_or_default();
        let has_txt = records.iter().any(|r| r.get("TXT").is_some());
        let alone = records.len() == 1;
        for record in records {
            if record.as_str() == Some("TIMEOUT") {
                // Alone, every question times out; beside records, those of other types.
                let key = name.trim_end_matches('.').to_ascii_lowercase();
                if alone {
                    zone.silent.insert(key);
                } else {
                    zone.silent_unless_present.insert(key);
                }
                continue;
            }
            let Some((kind, value)) = record.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            let strings = || match value {
                Value::Array(parts) => parts.iter().filter_map(|p| p.as_str().map(String::from)).collect(),
                Value::String(s) => vec![s.clone()],
                _ => Vec::new(),
            };
            // The suite's "NONE": no record of this type (it still keeps SPF out of TXT).
            if value.as_str() == Some("NONE") {
                continue;
            }
            match kind.as_str() {
                "TXT" => {
                    zone.txt_strings(name, strings());
                }
                "SPF" if !has_txt => {
                    zone.txt_strings(name, strings());
                }
                "A" => {
                    if let Some(ip) = value.as_str().and_then(|s| s.parse().ok()) {
                        zone.record(name, RecordType::A, RData::A(A(ip)));
                    }
                }
                "AAAA" => {
                    if let Some(ip) = value.as_str().and_then(|s| s.parse().ok()) {
                        zone.aaaa(name, ip);
                    }
                }
                "MX" => {
                    let (Some(pref), Some(host)) = (value[0].as_u64(), value[1].as_str()) else {
                        continue;
                    };
                    if let Ok(exchange) = Name::from_ascii(format!("{}.", host.trim_end_matches('.'))) {
                        zone.record(name, RecordType::MX, RData::MX(MX::new(pref as u16, exchange)));
                    }
                }
                "PTR" => {
                    zone.ptr(name, value.as_str().unwrap_or(""));
                }
                "CNAME" => {
                    zone.cname(name, value.as_str().unwrap_or(""));
                }
                _ => {}
            }
        }
    }
}

fn result_name(result: mail_auth::SpfResult) -> &'static str {
    use mail_auth::SpfResult::*;
    match result {
        Pass => "pass",
        Fail => "fail",
        SoftFail => "softfail",
        Neutral => "neutral",
        TempError => "temperror",
        PermError => "permerror",
        None => "none",
    }
}

/// One case: (scenario, name, expected results, the result Gannet gave).
type Outcome = (String, String, Vec<String>, String);

fn run_suite(scenarios: Vec<Value>, dns: Arc<DnsServer>) -> Vec<Outcome> {
    let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(256 * 1024)
        .spawn(move || async move {
            let verifier = Verifier::new().unwrap();
            let mut outcomes = Vec::new();
            for scenario in scenarios {
                let description = scenario["description"].as_str().unwrap_or("").to_string();
                let empty = serde_json::Map::new();
                load(
                    &mut dns.zone.lock().unwrap(),
                    scenario["zonedata"].as_object().unwrap_or(&empty),
                );
                let cache = DnsCache::new(CacheLimits {
                    entries_max: 10_000,
                    ttl_min: Duration::ZERO,
                    ttl_max: Duration::ZERO,
                    negative_ttl_max: Duration::ZERO,
                    failure_ttl: Duration::ZERO,
                });
                let resolver = Resolver::new(vec![dns.addr], Duration::from_millis(300), 1, cache, 0);
                let tests: BTreeMap<String, Value> = serde_json::from_value(scenario["tests"].clone()).unwrap();
                for (name, case) in tests {
                    let expected: Vec<String> = match &case["result"] {
                        Value::Array(list) => list.iter().filter_map(|r| r.as_str().map(String::from)).collect(),
                        Value::String(r) => vec![r.clone()],
                        _ => Vec::new(),
                    };
                    let Ok(client) = case["host"].as_str().unwrap_or("").parse::<IpAddr>() else {
                        outcomes.push((description.clone(), name, expected, "bad host".into()));
                        continue;
                    };
                    let input = Input {
                        client,
                        helo: case["helo"].as_str().unwrap_or("").to_string(),
                        mail_from: case["mailfrom"].as_str().unwrap_or("").to_string(),
                        hostname: "mx.test".into(),
                        sealer: None,
                        spf: None,
                        dkim_signatures_max: 10,
                    };
                    let got = verifier.spf(&resolver, &input, Duration::from_secs(5)).await;
                    outcomes.push((description.clone(), name, expected, result_name(got).to_string()));
                }
            }
            outcomes
        })
        .unwrap();
    executor.join().unwrap()
}

#[test]
fn the_rfc7208_test_suite() {
    let scenarios = suite();
    let dns = Arc::new(DnsServer::start());
    let outcomes = run_suite(scenarios, dns);
    let failures: Vec<&Outcome> = outcomes
        .iter()
        .filter(|(_, _, want, got)| !want.contains(got))
        .collect();
    println!(
        "RFC 7208 suite: {} of {} cases pass",
        outcomes.len() - failures.len(),
        outcomes.len()
    );
    let mut unexplained = Vec::new();
    for (scenario, name, want, got) in &failures {
        let known = KNOWN_FAILURES.iter().find(|(n, _)| n == name);
        println!(
            "  {name} ({scenario}): expected {}, got {got}{}",
            want.join(" or "),
            known.map_or(String::new(), |(_, why)| format!(": {why}"))
        );
        if known.is_none() {
            unexplained.push(format!("(\"{name}\", \"expected {} got {got}: ...\"),", want.join("|")));
        }
    }
    let fixed: Vec<&str> = KNOWN_FAILURES
        .iter()
        .filter(|(n, _)| !failures.iter().any(|(_, name, _, _)| name == n))
        .map(|(n, _)| *n)
        .collect();
    assert!(
        unexplained.is_empty(),
        "{} unexplained failures (add to KNOWN_FAILURES with the reason):\n{}",
        unexplained.len(),
        unexplained.join("\n")
    );
    assert!(
        fixed.is_empty(),
        "these now pass: remove them from KNOWN_FAILURES: {fixed:?}"
    );
    assert!(outcomes.len() > 150, "the suite has over 150 cases: {}", outcomes.len());
}
