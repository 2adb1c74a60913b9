//! `gannet dkim keygen`: makes a DKIM key (RSA-2048 or Ed25519, PKCS#8 PEM, mode 0600) and
//! prints the TXT record to publish (RFC 6376 3.6.1; `k=ed25519` by RFC 8463).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use base64::Engine;

use super::key::PrivateKey;
use crate::config::dkim::DkimAlgorithm;

/// A new key, as PKCS#8 PEM.
pub fn generate_pem(algorithm: DkimAlgorithm) -> Result<String, String> {
    let der = match algorithm {
        DkimAlgorithm::RsaSha256 => {
            let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .map_err(|_| "cannot generate an RSA key".to_string())?;
            let der: Pkcs8V1Der = key.as_der().map_err(|_| "cannot encode the RSA key".to_string())?;
            der.as_ref().to_vec()
        }
        DkimAlgorithm::Ed25519Sha256 => {
            let rng = aws_lc_rs::rand::SystemRandom::new();
            aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8v1(&rng)
                .map_err(|_| "cannot generate an Ed25519 key".to_string())?
                .as_ref()
                .to_vec()
        }
    };
    Ok(pem::encode(&pem::Pem::new("PRIVATE KEY", der)))
}

/// The DNS record that publishes `key`: its name and TXT value.
pub fn dns_record(key: &PrivateKey, domain: &str, selector: &str) -> (String, String) {
    let k = match key.algorithm() {
        DkimAlgorithm::RsaSha256 => "rsa",
        DkimAlgorithm::Ed25519Sha256 => "ed25519",
    };
    let p = base64::engine::general_purpose::STANDARD.encode(key.public_key_record_bytes());
    (
        format!("{selector}._domainkey.{domain}."),
        format!("v=DKIM1; k={k}; p={p}"),
    )
}

/// Writes a new key to `out` (default `<selector>.<domain>.key`), refusing to replace a file,
/// and returns the text to print: where the key is and the record to publish.
pub fn run(domain: &str, selector: &str, algorithm: DkimAlgorithm, out: Option<&Path>) -> Result<String, String> {
    let path: PathBuf = out.map_or_else(|| PathBuf::from(format!("{selector}.{domain}.key")), Path::to_path_buf);
    let pem = generate_pem(algorithm)?;
    let key = PrivateKey::from_pem(pem.as_bytes()).map_err(|e| format!("the new key does not read back: {e}"))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| {
            format!(
                "cannot create {}: {e} (an existing key is never replaced; remove it or give --out)",
                path.display()
            )
        })?;
    file.write_all(pem.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let (name, value) = dns_record(&key, domain, selector);
    Ok(format!(
        "wrote {} (mode 0600)\npublish this TXT record:\n{name} IN TXT \"{}\"\nthen add to the configuration:\n[[dkim]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nkey = \"{}\"\n",
        path.display(),
        txt_strings(&value),
        path.display()
    ))
}

/// A TXT value split into quoted strings of at most 255 bytes (RFC 1035 3.3.14).
fn txt_strings(value: &str) -> String {
    let parts: Vec<&str> = value
        .as_bytes()
        .chunks(255)
        .map(|c| std::str::from_utf8(c).expect("the record is ASCII"))
        .collect();
    parts.join("\" \"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_read_back_and_publish_their_public_half() {
        for algorithm in [DkimAlgorithm::RsaSha256, DkimAlgorithm::Ed25519Sha256] {
            let pem = generate_pem(algorithm).unwrap();
            let key = PrivateKey::from_pem(pem.as_bytes()).unwrap();
            assert_eq!(key.algorithm(), algorithm);
            let (name, value) = dns_record(&key, "example.com", "s1");
            assert_eq!(name, "s1._domainkey.example.com.");
            assert!(value.starts_with("v=DKIM1; k="), "{value}");
            // RSA-2048 SPKI is 294 bytes (392 base64); Ed25519 is 32 (44).
            let p = value.split("p=").nth(1).unwrap();
            assert_eq!(p.len(), if algorithm == DkimAlgorithm::RsaSha256 { 392 } else { 44 });
        }
        assert!(txt_strings(&"a".repeat(300)).contains("\" \""));
    }
}
