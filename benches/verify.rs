//! Inbound mail authentication per message: one round of SPF, DKIM, ARC and DMARC evaluation
//! (`Verifier::evaluate`, what the shard's blocking thread runs) over answers already at hand,
//! for a message signed with RSA-2048 and one signed with Ed25519, at 1 KiB and 64 KiB. A
//! message takes 2-4 rounds while its names are being looked up (docs/authentication.md); the
//! last round is this one. Run with `cargo bench --bench verify`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gannet::authentication::cache::{Found, Prefetched};
use gannet::authentication::{DmarcVerdict, Input, Verifier};
use gannet::config::dkim::DkimAlgorithm;

fn message_of(size_bytes: usize) -> Vec<u8> {
    let mut m = b"From: Alice <alice@example.com>\r\nTo: bob@dest.test\r\nSubject: a bulk message\r\nDate: Wed, 02 Dec 2026 07:00:00 +0000\r\nMessage-ID: <1@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n".to_vec();
    while m.len() < size_bytes {
        m.extend_from_slice(b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n");
    }
    m
}

/// Fills `prefetched` from `zone` until the verification asks for nothing new.
fn fill(verifier: &Verifier, message: &[u8], input: &Input, zone: &[(String, String)]) -> Prefetched {
    let mut prefetched = Prefetched::default();
    for _ in 0..16 {
        verifier.evaluate(message, input, &prefetched);
        let misses = prefetched.take_misses();
        if misses.is_empty() {
            break;
        }
        for miss in misses {
            let name = miss.name.trim_end_matches('.');
            let found = zone
                .iter()
                .find(|(n, _)| n.trim_end_matches('.') == name)
                .map_or(Found::Nothing, |(_, v)| Found::Txt(vec![v.as_bytes().to_vec()]));
            prefetched.fill(&miss, input.client, found);
        }
    }
    prefetched
}

fn verification(c: &mut Criterion) {
    let verifier = Verifier::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = Input {
        client: "192.0.2.7".parse().unwrap(),
        helo: "mail.example.com".into(),
        mail_from: "bounces@example.com".into(),
        hostname: "mx.test".into(),
        sealer: None,
        spf: None,
        dkim_signatures_max: 10,
    };
    let mut group = c.benchmark_group("verify-message");
    group.throughput(Throughput::Elements(1));
    for (name, algorithm) in [
        ("rsa-2048", DkimAlgorithm::RsaSha256),
        ("ed25519", DkimAlgorithm::Ed25519Sha256),
    ] {
        let pem = gannet::dkim::keygen::generate_pem(algorithm).unwrap();
        let key = gannet::dkim::PrivateKey::from_pem(pem.as_bytes()).unwrap();
        let (record_name, record) = gannet::dkim::keygen::dns_record(&key, "example.com", "s1");
        let path = dir.path().join(name);
        std::fs::write(&path, &pem).unwrap();
        let toml = format!(
            "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey = {:?}\n",
            path.display().to_string()
        );
        let config = gannet::config::Config::parse(&toml, "bench").unwrap();
        let signers = gannet::dkim::Signers::load(&config.dkim).unwrap();
        let zone = vec![
            (record_name, record),
            ("example.com".to_string(), "v=spf1 ip4:192.0.2.0/24 -all".to_string()),
            ("_dmarc.example.com".to_string(), "v=DMARC1; p=reject".to_string()),
        ];
        for size_bytes in [1024usize, 64 * 1024] {
            let content = message_of(size_bytes);
            let mut message = signers.sign(&content).headers;
            message.extend_from_slice(&content);
            let prefetched = fill(&verifier, &message, &input, &zone);
            let verdicts = verifier.evaluate(&message, &input, &prefetched);
            assert_eq!(verdicts.dmarc, DmarcVerdict::Pass, "{}", verdicts.header);
            assert_eq!(verdicts.dkim, vec!["pass"], "{}", verdicts.header);
            group.bench_function(format!("{name}/{}KiB", size_bytes / 1024), |b| {
                b.iter(|| verifier.evaluate(&message, &input, &prefetched))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, verification);
criterion_main!(benches);
