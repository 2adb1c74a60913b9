//! Inbound TLS: the certificates the listeners present (chosen by SNI), the self-signed fallback,
//! reloading, and the rustls server configuration (TLS 1.2 and 1.3 only).
//!
//! The certificate set is the one piece of mutable state the shards share: a reload (SIGHUP)
//! swaps it atomically ([`arc_swap`]), and each handshake reads whichever set is current, so
//! sessions in progress keep theirs and new handshakes see the new one. A reload that fails keeps
//! the old set and logs why.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;

use crate::smtp::received::TlsSummary;

/// Where one certificate comes from: a PEM chain (leaf first) and its PEM private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub chain: PathBuf,
    pub key: PathBuf,
}

/// One loaded set of certificates.
#[derive(Debug)]
pub struct Certificates {
    /// For clients without SNI, or naming a host no certificate has: the first one configured.
    default: Arc<CertifiedKey>,
    /// Lower-case DNS names from each certificate's subjectAltName (wildcards as `*.example`).
    by_name: HashMap<String, Arc<CertifiedKey>>,
    /// One line per certificate, for the log.
    pub summary: Vec<String>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Certificates {
    /// Loads every certificate. Errors name the file and what is wrong with it.
    pub fn load(files: &[CertificateFiles]) -> Result<Certificates, String> {
        assert!(
            !files.is_empty(),
            "at least one certificate (the self-signed one by default)"
        );
        let provider = provider();
        let mut by_name = HashMap::new();
        let mut summary = Vec::new();
        let mut default = None;
        for f in files {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&f.chain)
                .map_err(|e| format!("{}: cannot read the certificate chain: {e}", f.chain.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: not a PEM certificate chain: {e}", f.chain.display()))?;
            if chain.is_empty() {
                return Err(format!(
                    "{}: holds no CERTIFICATE block; give the PEM chain, leaf certificate first",
                    f.chain.display()
                ));
            }
            let key = PrivateKeyDer::from_pem_file(&f.key)
                .map_err(|e| format!("{}: cannot read a PEM private key: {e}", f.key.display()))?;
            let names: Vec<String> = {
                let leaf = webpki::EndEntityCert::try_from(&chain[0])
                    .map_err(|e| format!("{}: the first certificate cannot be parsed: {e}", f.chain.display()))?;
                leaf.valid_dns_names().map(|n| n.to_ascii_lowercase()).collect()
            };
            let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
                format!(
                    "{} and {}: the key does not fit the certificate: {e}",
                    f.chain.display(),
                    f.key.display()
                )
            })?;
            let certified = Arc::new(certified);
            summary.push(format!("{} for {}", f.chain.display(), names.join(", ")));
            for name in names {
                by_name.entry(name).or_insert_with(|| certified.clone());
            }
            default.get_or_insert(certified);
        }
        Ok(Certificates {
            default: default.expect("at least one certificate was loaded"),
            by_name,
            summary,
        })
    }

    /// The certificate for an SNI name: exact name, then a wildcard one label up, then the default.
    fn for_name(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name.map(str::to_ascii_lowercase) else {
            return self.default.clone();
        };
        if let Some(c) = self.by_name.get(&name) {
            return c.clone();
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(c) = self.by_name.get(&format!("*.{parent}")) {
                return c.clone();
            }
        }
        self.default.clone()
    }
}

/// Makes (once) and returns the self-signed certificate used when none is configured: kept in
/// `dir` so that it survives restarts. Returns whether it was made now.
pub fn self_signed(dir: &Path, hostname: &str) -> Result<(CertificateFiles, bool), String> {
    let files = CertificateFiles {
        chain: dir.join("self-signed.crt"),
        key: dir.join("self-signed.key"),
    };
    if files.chain.exists() && files.key.exists() {
        return Ok((files, false));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
    let fail = |e: rcgen::Error| format!("cannot generate a self-signed certificate for {hostname}: {e}");
    let mut params = rcgen::CertificateParams::new(vec![hostname.to_string()]).map_err(fail)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, hostname);
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let cert = params.self_signed(&key).map_err(fail)?;
    write_private(&files.key, key.serialize_pem().as_bytes())?;
    let tmp = files.chain.with_extension("crt.tmp");
    std::fs::write(&tmp, cert.pem()).map_err(|e| format!("{}: cannot write: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &files.chain).map_err(|e| format!("{}: cannot write: {e}", files.chain.display()))?;
    Ok((files, true))
}

/// Writes a key file readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("key.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: cannot write: {e}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| format!("{}: cannot write: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: cannot write: {e}", path.display()))
}

/// Picks the certificate for each handshake from the current set; [`CertificateResolver::reload`]
/// replaces the set.
#[derive(Debug)]
pub struct CertificateResolver {
    files: Vec<CertificateFiles>,
    current: ArcSwap<Certificates>,
}

impl CertificateResolver {
    pub fn new(files: Vec<CertificateFiles>) -> Result<CertificateResolver, String> {
        let loaded = Certificates::load(&files)?;
        Ok(CertificateResolver {
            files,
            current: ArcSwap::from_pointee(loaded),
        })
    }

    /// Reads the files again; on error the current set stays.
    pub fn reload(&self) -> Result<Vec<String>, String> {
        let loaded = Certificates::load(&self.files)?;
        let summary = loaded.summary.clone();
        self.current.store(Arc::new(loaded));
        Ok(summary)
    }

    pub fn summary(&self) -> Vec<String> {
        self.current.load().summary.clone()
    }
}

impl ResolvesServerCert for CertificateResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().for_name(hello.server_name()))
    }
}

/// The server side of every TLS listener and STARTTLS: TLS 1.2 and 1.3 with ring's default
/// (AEAD, forward-secret) cipher suites, no client certificates, no ALPN.
pub fn server_config(resolver: Arc<CertificateResolver>) -> Result<Arc<ServerConfig>, String> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    Ok(Arc::new(config))
}

/// What the log and the Received header say about a session's TLS.
pub fn summarize(conn: &rustls::CommonState) -> TlsSummary {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_string(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("unknown")
        .to_string();
    TlsSummary { version, cipher }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_made_once_and_chosen_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (files, made) = self_signed(dir.path(), "mx.example.test").unwrap();
        assert!(made);
        let (again, made_again) = self_signed(dir.path(), "mx.example.test").unwrap();
        assert_eq!((again, made_again), (files.clone(), false));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key is private");

        let other_dir = tempfile::tempdir().unwrap();
        let (other, _) = self_signed(other_dir.path(), "smtp.other.test").unwrap();
        let resolver = CertificateResolver::new(vec![files, other]).unwrap();
        let current = resolver.current.load();
        assert!(Arc::ptr_eq(&current.for_name(None), &current.default));
        let other_cert = current.for_name(Some("SMTP.other.test"));
        assert!(!Arc::ptr_eq(&other_cert, &current.default));
        assert!(Arc::ptr_eq(&current.for_name(Some("unknown.test")), &current.default));
        assert_eq!(resolver.summary().len(), 2);
        assert!(resolver.summary()[1].ends_with("for smtp.other.test"));
    }

    #[test]
    fn bad_files_are_named_and_a_failed_reload_keeps_the_old_set() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = self_signed(dir.path(), "mx.example.test").unwrap();
        let resolver = CertificateResolver::new(vec![files.clone()]).unwrap();
        std::fs::write(&files.chain, "not pem").unwrap();
        let e = resolver.reload().unwrap_err();
        assert!(e.contains("self-signed.crt: holds no CERTIFICATE block"), "{e}");
        assert_eq!(resolver.summary().len(), 1);

        let other_dir = tempfile::tempdir().unwrap();
        let (other, _) = self_signed(other_dir.path(), "x.test").unwrap();
        let mismatched = CertificateFiles {
            chain: other.chain,
            key: dir.path().join("self-signed.key"),
        };
        let e = Certificates::load(&[mismatched]).unwrap_err();
        assert!(e.contains("the key does not fit the certificate"), "{e}");
    }
}
