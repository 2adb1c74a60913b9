//! What SIGHUP reloads: the TLS certificates and the password file. Both are read by every shard
//! and replaced atomically, so a reload never drops a session: sessions in progress keep what
//! they started with, new handshakes and AUTH commands see the new files. A reload that fails
//! keeps the old contents and logs which file is wrong.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::ServerConfig;
use tracing::{error, info};

use super::tls::{self, CertificateFiles, CertificateResolver};
use crate::auth::passwords::PasswordFile;
use crate::config::Config;

pub struct Reloadable {
    pub tls_resolver: Arc<CertificateResolver>,
    /// Built once: it reads the certificates through the resolver, so it never changes.
    pub tls_config: Arc<ServerConfig>,
    password_path: Option<PathBuf>,
    passwords: ArcSwapOption<PasswordFile>,
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
        Ok(Reloadable {
            tls_resolver: resolver,
            tls_config,
            password_path,
            passwords: ArcSwapOption::new(passwords),
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

    /// SIGHUP: reads the certificate and password files again. Each keeps its old contents if
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
    }
}
