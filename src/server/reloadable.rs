//! What SIGHUP reloads: the TLS certificates, the password file and the DKIM keys. Each is read
//! by every shard and replaced atomically, so a reload never drops a session: sessions in progress keep what
//! they started with, new handshakes and AUTH commands see the new files. A reload that fails
//! keeps the old contents and logs which file is wrong.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::ServerConfig;
use tracing::{error, info};

use super::tls::{self, CertificateFiles, CertificateResolver};
use crate::auth::passwords::PasswordFile;
use crate::config::dkim::Dkim;
use crate::config::Config;
use crate::dkim::Signers;

pub struct Reloadable {
    pub tls_resolver: Arc<CertificateResolver>,
    /// Built once: it reads the certificates through the resolver, so it never changes.
    pub tls_config: Arc<ServerConfig>,
    password_path: Option<PathBuf>,
    passwords: ArcSwapOption<PasswordFile>,
    dkim_entries: Vec<Dkim>,
    signers: ArcSwap<Signers>,
}

impl Reloadable {
    /// Loads certificates (making the self-signed one if none is configured) and the password
    /// file. Errors say which file and why.
    pub fn load(config: &Config, spool_dir: &Path) -> Result<Reloadable, String> {
        let files: Vec<CertificateFiles> = if config.tls.certificates.is_empty() {
            let dir = spool_dir.join("tls");
            let (files, made) = tls::self_signed(&dir, &config.server.hostname)?;
            if made {
                info!(
                    "no [[tls.certificate]] configured: generated a self-signed certificate for {} at {} (clients that verify certificates will refuse it; configure a real one)",
                    config.server.hostname,
                    files.chain.display()
                );
            } else {
                info!(
                    "no [[tls.certificate]] configured: using the self-signed certificate at {}",
                    files.chain.display()
                );
            }
            vec![files]
        } else {
            config
                .tls
                .certificates
                .iter()
                .map(|c| CertificateFiles {
                    chain: c.chain.clone(),
                    key: c.key.clone(),
                })
                .collect()
        };
        let resolver = Arc::new(CertificateResolver::new(files)?);
        for line in resolver.summary() {
            info!("TLS certificate: {line}");
        }
        let tls_config = tls::server_config(resolver.clone())?;
        let password_path = config.auth.password_file.clone();
        let passwords = match &password_path {
            Some(path) => {
                let file = PasswordFile::load(path)?;
                info!("password file {}: {} user(s)", path.display(), file.user_count());
                Some(Arc::new(file))
            }
            None => None,
        };
        let signers = load_signers(&config.dkim)?;
        Ok(Reloadable {
            tls_resolver: resolver,
            tls_config,
            password_path,
            passwords: ArcSwapOption::new(passwords),
            dkim_entries: config.dkim.clone(),
            signers: ArcSwap::from_pointee(signers),
        })
    }

    /// Whether a password file is configured (it loaded at start, so it always has contents).
    pub fn auth_configured(&self) -> bool {
        self.password_path.is_some()
    }

    /// The users, if a password file is configured.
    pub fn passwords(&self) -> Option<Arc<PasswordFile>> {
        self.passwords.load_full()
    }

    /// The DKIM signers (empty when no `[[dkim]]` is configured).
    pub fn signers(&self) -> Arc<Signers> {
        self.signers.load_full()
    }

    /// SIGHUP: reads the certificate, password and DKIM key files again. Each keeps its old contents if
    /// its new ones are broken.
    pub fn reload(&self) {
        match self.tls_resolver.reload() {
            Ok(summary) => {
                for line in summary {
                    info!("reload: TLS certificate: {line}");
                }
            }
            Err(e) => error!("reload: TLS certificates unchanged: {e}"),
        }
        if let Some(path) = &self.password_path {
            match PasswordFile::load(path) {
                Ok(file) => {
                    info!(
                        "reload: password file {}: {} user(s)",
                        path.display(),
                        file.user_count()
                    );
                    self.passwords.store(Some(Arc::new(file)));
                }
                Err(e) => error!("reload: password file unchanged: {e}"),
            }
        }
        if !self.dkim_entries.is_empty() {
            match load_signers(&self.dkim_entries) {
                Ok(signers) => self.signers.store(Arc::new(signers)),
                Err(e) => error!("reload: DKIM keys unchanged: {e}"),
            }
        }
    }
}

/// Reads every `[[dkim]]` key and logs what will sign.
fn load_signers(entries: &[Dkim]) -> Result<Signers, String> {
    let signers = Signers::load(entries).map_err(|e| e.to_string())?;
    for s in signers.iter() {
        info!(
            "DKIM: signing mail from {}{} with {}._domainkey.{} ({:?})",
            s.domain,
            if s.fallback {
                " and every domain without its own key"
            } else {
                ""
            },
            s.selector,
            s.domain,
            s.algorithm
        );
    }
    Ok(signers)
}
