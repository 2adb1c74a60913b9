//! DKIM signing cost per signature: the private-key operation for RSA-2048 (rsa-sha256) and
//! Ed25519 (ed25519-sha256) on the candidate backends, ring (which Gannet's TLS already uses) and
//! aws-lc-rs, over 600 bytes (the size of a typical set of canonicalized signed headers); then
//! Gannet's whole signing of a 1 KiB and a 64 KiB message (canonicalization and body hash on the
//! shard, the key operation as the signing thread runs it). Run with `cargo bench --bench dkim`;
//! criterion's time per iteration is the time per signature on one core.
//!
//! The `rsa` crate is not a candidate: its private-key operations have a timing side channel
//! (RUSTSEC-2023-0071).

use aws_lc_rs::encoding::AsDer;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gannet::config::dkim::DkimAlgorithm;

const SIGNED_BYTES: usize = 600;

fn rsa_pkcs8() -> Vec<u8> {
    let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let der: aws_lc_rs::encoding::Pkcs8V1Der = key.as_der().unwrap();
    der.as_ref().to_vec()
}

fn ed25519_pkcs8() -> Vec<u8> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8v1(&rng)
        .unwrap()
        .as_ref()
        .to_vec()
}

fn backends(c: &mut Criterion) {
    let data = vec![b'h'; SIGNED_BYTES];
    let rsa = rsa_pkcs8();
    let ed = ed25519_pkcs8();
    let mut group = c.benchmark_group("dkim-key-operation");
    group.throughput(Throughput::Elements(1));

    let ring_rng = ring::rand::SystemRandom::new();
    let ring_rsa = ring::signature::RsaKeyPair::from_pkcs8(&rsa).unwrap();
    let mut out = vec![0u8; ring_rsa.public().modulus_len()];
    group.bench_function("rsa-2048/ring", |b| {
        b.iter(|| {
            ring_rsa
                .sign(&ring::signature::RSA_PKCS1_SHA256, &ring_rng, &data, &mut out)
                .unwrap()
        })
    });
    let aws_rng = aws_lc_rs::rand::SystemRandom::new();
    let aws_rsa = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(&rsa).unwrap();
    group.bench_function("rsa-2048/aws-lc-rs", |b| {
        b.iter(|| {
            aws_rsa
                .sign(&aws_lc_rs::signature::RSA_PKCS1_SHA256, &aws_rng, &data, &mut out)
                .unwrap()
        })
    });
    // ed25519-sha256 signs the SHA-256 hash of the data (RFC 8463 section 3).
    let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &data);
    let ring_ed = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&ed).unwrap();
    group.bench_function("ed25519/ring", |b| b.iter(|| ring_ed.sign(hash.as_ref())));
    let aws_ed = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&ed).unwrap();
    group.bench_function("ed25519/aws-lc-rs", |b| b.iter(|| aws_ed.sign(hash.as_ref())));
    group.finish();
}

/// Gannet's whole signing of one message, as the shard's blocking thread runs it (From: lookup,
/// mail-auth's canonicalization and body hash, the key operation), and the one copy of the
/// content the event loop makes for it.
fn whole_message(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("dkim-sign-message");
    group.throughput(Throughput::Elements(1));
    for (name, pem) in [
        (
            "rsa-2048",
            gannet::dkim::keygen::generate_pem(DkimAlgorithm::RsaSha256).unwrap(),
        ),
        (
            "ed25519",
            gannet::dkim::keygen::generate_pem(DkimAlgorithm::Ed25519Sha256).unwrap(),
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        let toml = format!(
            "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey = {:?}\n",
            path.display().to_string()
        );
        let config = gannet::config::Config::parse(&toml, "bench").unwrap();
        let signers = gannet::dkim::Signers::load(&config.dkim).unwrap();
        for size_bytes in [1024usize, 64 * 1024] {
            let message = message_of(size_bytes);
            group.bench_function(format!("{name}/{}KiB", size_bytes / 1024), |b| {
                b.iter(|| {
                    let signed = signers.sign(&message);
                    assert_eq!(signed.outcomes.len(), 1);
                    signed
                })
            });
        }
    }
    for size_bytes in [1024usize, 64 * 1024] {
        let message = message_of(size_bytes);
        group.bench_function(format!("copy-for-the-signer/{}KiB", size_bytes / 1024), |b| {
            b.iter(|| message.to_vec())
        });
    }
    group.finish();
}

fn message_of(size_bytes: usize) -> Vec<u8> {
    let mut m = b"Received: from client.example ([192.0.2.1]) by mx.test with ESMTP id 01A2; Wed, 2 Dec 2026 07:00:00 +0000\r\nFrom: Alice <alice@example.com>\r\nTo: bob@dest.test\r\nSubject: a bulk message\r\nDate: Wed, 02 Dec 2026 07:00:00 +0000\r\nMessage-ID: <1@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n".to_vec();
    while m.len() < size_bytes {
        m.extend_from_slice(b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n");
    }
    m
}

criterion_group!(benches, backends, whole_message);
criterion_main!(benches);
