//! What SIGHUP reloads: the configuration file (routes, destination rules, limits and rates,
//! relay policy and networks, SMTP and delivery settings, the `[[dkim]]` keys, the log level
//! and format), the TLS
//! certificates and the password file. Each is read by every shard and replaced atomically, so a
//! reload never drops a session: sessions in progress keep what they started with; new
//! connections, handshakes, AUTH commands and delivery attempts see the new ones. A file that
//! fails to load keeps the old contents, and the log names the file, the line and the fix.
//!
//! Sections that need a restart (`[server]`, listeners, `[spool]`, `[dns]`, `[admin]`,
//! `[events]`, the list of certificate and password files) keep their running values;
//! the log says which changed and waits for a restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::ServerConfig;
use tracing::{error, info, warn};

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
    signers: ArcSwap<Signers>,
    /// The ARC sealer, when `[mail_authentication.arc_seal]` is configured.
    sealer: ArcSwapOption<crate::dkim::seal::Sealer>,
    /// The configuration file, `None` for the embedded default (nothing to re-read).
    config_path: Option<PathBuf>,
    config: ArcSwap<Config>,
    /// Counts configuration reloads: a shard that sees it change takes [`Reloadable::config`].
    config_generation: AtomicU64,
}

impl Reloadable {
    /// Loads certificates (making the self-signed one if none is configured) and the password
    /// file. Errors say which file and why.
    pub fn load(config: &Config, spool_dir: &Path, config_path: Option<PathBuf>) -> Result<Reloadable, String> {
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
        let sealer = load_sealer(config)?;
        Ok(Reloadable {
            tls_resolver: resolver,
            tls_config,
            password_path,
            passwords: ArcSwapOption::new(passwords),
            signers: ArcSwap::from_pointee(signers),
            sealer: ArcSwapOption::new(sealer),
            config_path,
            config: ArcSwap::from_pointee(config.clone()),
            config_generation: AtomicU64::new(0),
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

    /// The ARC sealer, if one is configured.
    pub fn sealer(&self) -> Option<Arc<crate::dkim::seal::Sealer>> {
        self.sealer.load_full()
    }

    /// The configuration in force (the start's, or the last good reload's).
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// How many times the configuration was replaced.
    pub fn config_generation(&self) -> u64 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// SIGHUP: reads the configuration file, then the certificate, password and DKIM key files
    /// again. Each keeps its old contents if its new ones are broken.
    pub fn reload(&self) {
        let dkim = match self.reload_config() {
            Ok(Some(config)) => Some(config.dkim.clone()),
            Ok(None) => None,
            Err(e) => {
                error!("reload: configuration unchanged: {e}");
                None
            }
        };
        self.reload_files(dkim);
    }

    /// Re-reads and checks the configuration file; on success it is in force when this returns
    /// (shards take it within their next poll). `Ok(None)`: nothing to re-read.
    fn reload_config(&self) -> Result<Option<Arc<Config>>, String> {
        let Some(path) = &self.config_path else {
            info!("reload: serving the embedded default; no configuration file to re-read");
            return Ok(None);
        };
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: cannot read: {e}"))?;
        let new = Config::parse(&text, &name).map_err(|e| e.to_string())?;
        let old = self.config.load_full();
        let shards = old.shard_count(super::allowed_cpus().len());
        new.validate_for_shards(shards, shards, &name)
            .map_err(|e| e.to_string())?;
        let (merged, kept) = keep_restart_only(&old, new);
        for section in kept {
            warn!("reload: {section} changed in {name}; it takes effect at the next restart (the running value stays)");
        }
        let merged = Arc::new(merged);
        info!("reload: {}", crate::logging::reconfigure(&merged.log));
        self.config.store(merged.clone());
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        info!(
            "reload: configuration {name} in force: {} route(s), {} destination rule(s)",
            merged.routes.len(),
            merged.destinations.len()
        );
        Ok(Some(merged))
    }

    /// Certificates, passwords and DKIM keys (`dkim`: the new entries, if the configuration
    /// was reloaded).
    fn reload_files(&self, dkim: Option<Vec<Dkim>>) {
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
        match load_sealer(&self.config.load()) {
            Ok(sealer) => self.sealer.store(sealer),
            Err(e) => error!("reload: ARC sealing key unchanged: {e}"),
        }
        let entries = dkim.unwrap_or_else(|| self.config.load().dkim.clone());
        if !entries.is_empty() || !self.signers.load().is_empty() {
            match load_signers(&entries) {
                Ok(signers) => self.signers.store(Arc::new(signers)),
                Err(e) => error!("reload: DKIM keys unchanged: {e}"),
            }
        }
    }
}

/// Reads the ARC sealing key, if one is configured.
fn load_sealer(config: &Config) -> Result<Option<Arc<crate::dkim::seal::Sealer>>, String> {
    let Some(seal) = &config.mail_authentication.arc_seal else {
        return Ok(None);
    };
    let sealer = crate::dkim::seal::Sealer::load(seal)?;
    info!(
        "ARC: sealing verified mail as {} with selector {}",
        sealer.domain, seal.selector
    );
    Ok(Some(Arc::new(sealer)))
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

/// The sections a reload cannot change while the server runs: `new` with `old`'s values for
/// them, and the names of those that differed.
fn keep_restart_only(old: &Config, mut new: Config) -> (Config, Vec<&'static str>) {
    fn differs<T: serde::Serialize>(a: &T, b: &T) -> bool {
        let (a, b) = (toml::to_string(a), toml::to_string(b));
        debug_assert!(a.is_ok() && b.is_ok(), "a section serialises as a TOML table");
        a.ok() != b.ok()
    }
    let mut kept = Vec::new();
    macro_rules! keep {
        ($field:ident, $name:expr) => {
            if differs(&old.$field, &new.$field) {
                kept.push($name);
                new.$field = old.$field.clone();
            }
        };
    }
    keep!(server, "[server]");
    keep!(spool, "[spool]");
    keep!(dns, "[dns]");
    keep!(admin, "[admin]");
    keep!(events, "[events]");
    keep!(tls, "[tls] (the list of certificate files; their contents reload)");
    // A listener's mail_authentication may change; the rest of it is the socket.
    let listeners = |c: &Config| {
        let sockets: Vec<_> = c
            .listeners
            .iter()
            .cloned()
            .map(|mut l| {
                l.mail_authentication = None;
                l
            })
            .collect();
        toml::to_string(&ListenersText { listener: &sockets }).ok()
    };
    if listeners(old) != listeners(&new) {
        kept.push("[[listener]]");
        new.listeners = old.listeners.clone();
    }
    if old.auth.password_file != new.auth.password_file {
        kept.push("auth.password_file (the file's contents reload)");
        new.auth.password_file = old.auth.password_file.clone();
    }
    (new, kept)
}

/// Listeners compared as one TOML document (a bare array is not one).
#[derive(serde::Serialize)]
struct ListenersText<'a> {
    listener: &'a [crate::config::Listener],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_keeps_what_needs_a_restart_and_takes_the_rest() {
        let old = Config::parse("[server]\nshards = 1\n[limits]\nrecipients_max = 10\n", "old").unwrap();
        let new = Config::parse(
            "[server]\nshards = 2\n[limits]\nrecipients_max = 20\n[[listener]]\naddress = \"127.0.0.1:2600\"\nkind = \"mx\"\n[[route]]\ndomain = \"*\"\nmx = true\n",
            "new",
        )
        .unwrap();
        let (merged, kept) = keep_restart_only(&old, new);
        assert_eq!(kept, vec!["[server]", "[[listener]]"]);
        // Only a listener's mail_authentication changed: that applies.
        let text = "[[listener]]\naddress = \"127.0.0.1:2600\"\nkind = \"mx\"\n";
        let before = Config::parse(text, "before").unwrap();
        let after = Config::parse(&format!("{text}mail_authentication = \"enforce\"\n"), "after").unwrap();
        let (merged_listeners, kept) = keep_restart_only(&before, after);
        assert!(kept.is_empty(), "{kept:?}");
        assert!(merged_listeners.listeners[0].mail_authentication.is_some());
        assert_eq!(merged.server.shards, old.server.shards);
        assert_eq!(merged.listeners.len(), 3);
        assert_eq!(merged.limits.recipients_max, 20);
        assert_eq!(merged.routes.len(), 1);
    }
}
