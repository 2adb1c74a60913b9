//! Configuration: a TOML file, or the embedded default (`src/default.toml`).
//!
//! Every key has a default, so a file names only what it changes. Unknown keys, bad values and
//! impossible combinations are refused before anything starts, with the file, the line, the key,
//! and what to write instead. `docs/config.md` is the reference.

mod admin;
mod auth;
pub mod bounces;
mod delivery;
pub mod dkim;
mod dns;
mod error;
mod events;
mod limits;
mod listener;
pub mod mail_authentication;
pub mod providers;
mod relay;
mod server;
mod smtp;
mod spool;
pub mod suppression;
mod tls;
pub mod verp;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::RelayPolicy;
use crate::smtp::data::BareLineEndings;
use crate::smtp::deadline::Timeouts;
use crate::smtp::session::SessionConfig;
use crate::spool::record::message_record_bytes_max;
use error::line_of;
use gannet_sched::backoff::RetrySchedule;
use gannet_sched::{Route as SchedRoute, RouteTarget as SchedTarget, SchedConfig, SiteRule};

pub use admin::{Admin, Log, LogFormat};
pub use auth::Auth;
pub use bounces::{Bounces, Classifier};
pub use delivery::{Delivery, DestinationLimits, Route, RouteTarget};
pub use dns::{system_dns_servers, Dns};
pub use error::ConfigError;
pub use events::Events;
pub use limits::Limits;
pub use listener::{Listener, ListenerKind};
pub use relay::{NetworkText, Relay};
pub use server::{Server, Shards};
pub use smtp::{BareLineEndingPolicy, Smtp};
pub use spool::Spool;
pub use suppression::{AtRcpt, Suppression};
pub use tls::{Tls, TlsCertificate};

/// How errors and start-up name the embedded default.
pub const EMBEDDED_DEFAULT_NAME: &str = "<embedded default>";

/// The configuration Gannet serves with when no `--config` is given.
pub const DEFAULT_TOML: &str = include_str!("../default.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: Server,
    #[serde(default = "listener::default_listeners", rename = "listener")]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub spool: Spool,
    #[serde(default)]
    pub relay: Relay,
    #[serde(default)]
    pub smtp: Smtp,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub tls: Tls,
    #[serde(default)]
    pub auth: Auth,
    #[serde(default)]
    pub delivery: Delivery,
    /// Where mail for each domain goes; the first exact match wins, then "*".
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
    /// Receiver-specific limits: the first matching rule applies to a destination.
    #[serde(default, rename = "destination")]
    pub destinations: Vec<DestinationLimits>,
    /// Mailbox providers whose sites share limits (`gannet_sched::provider`).
    #[serde(default, rename = "provider")]
    pub providers: Vec<providers::Provider>,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub events: Events,
    /// Keys that sign outgoing mail (`crate::dkim`).
    #[serde(default, rename = "dkim")]
    pub dkim: Vec<dkim::Dkim>,
    /// How SPF/DKIM/DMARC verdicts on incoming mail are acted on (`crate::authentication`).
    #[serde(default)]
    pub mail_authentication: mail_authentication::MailAuthenticationSettings,
    /// How delivery failures are classified and acted on (`gannet_bounce`).
    #[serde(default)]
    pub bounces: Bounces,
    /// Recipients not to mail (`crate::suppression`).
    #[serde(default)]
    pub suppression: Suppression,
    /// Signed return paths and the bounce domain (`crate::verp`).
    #[serde(default)]
    pub verp: verp::Verp,
}

impl Config {
    /// Parses and validates a configuration. `source_name` names the file in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            source_name: source_name.to_string(),
            line: e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1),
            key: None,
            message: e.message().to_string(),
        })?;
        config.validate(text, source_name)?;
        let mut config = config;
        bounces::compile(&mut config.bounces, &error::fail(text, source_name))?;
        verp::validate(&mut config.verp, &error::fail(text, source_name))?;
        if config.verp.enabled
            && !config
                .relay
                .local_domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(&config.verp.domain))
        {
            // Reports come back from anyone: the bounce domain is one of ours.
            config.relay.local_domains.push(config.verp.domain.clone());
        }
        for (i, route) in config.routes.iter_mut().enumerate() {
            if let Some(path) = &route.auth_password_file {
                let password = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    source_name: source_name.to_string(),
                    line: line_of(text, "route", i, "auth_password_file"),
                    key: Some("route.auth_password_file".into()),
                    message: format!(
                        "cannot read {}: {e}; write the path of a file holding the password",
                        path.display()
                    ),
                })?;
                route.auth_password = Some(password.lines().next().unwrap_or("").to_string());
            }
        }
        Ok(config)
    }

    /// The embedded default.
    pub fn embedded_default() -> Config {
        Config::parse(DEFAULT_TOML, EMBEDDED_DEFAULT_NAME).expect("the embedded default configuration is valid")
    }

    /// The effective configuration as TOML (every key, defaults filled in).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("configuration serialises")
    }

    /// The number of shards to run, given the CPUs this process may use.
    pub fn shard_count(&self, cpus: usize) -> usize {
        match self.server.shards {
            Shards::Auto => cpus.max(1),
            Shards::Count(n) => n,
        }
    }

    /// Segments each shard may keep (its share of `spool.size_max`).
    pub fn segments_per_shard_max(&self, shards: usize) -> usize {
        (self.spool.size_max.0 / self.spool.segment_size.0.max(1) / shards.max(1) as u64) as usize
    }

    /// The largest spool record these limits allow.
    pub fn record_bytes_max(&self) -> u64 {
        message_record_bytes_max(
            self.limits.line_length_max,
            self.limits.recipients_max,
            self.limits.message_size_max.0,
        )
    }

    /// Checks values and combinations that the types alone cannot.
    fn validate(&self, text: &str, source_name: &str) -> Result<(), ConfigError> {
        let fail = error::fail(text, source_name);
        server::validate(&self.server, &fail)?;
        listener::validate(&self.listeners, &fail)?;
        limits::validate(&self.limits, &fail)?;
        tls::validate(&self.tls, &fail)?;
        auth::validate(&self.auth, &fail)?;
        spool::validate(&self.spool, &self.limits, self.record_bytes_max(), &fail)?;
        delivery::validate(&self.delivery, &fail)?;
        delivery::validate_routes(&self.routes, &fail)?;
        dns::validate(&self.dns, &fail)?;
        delivery::validate_destinations(&self.destinations, &fail)?;
        providers::validate(&self.providers, &fail)?;
        relay::validate(&self.relay, &fail)?;
        admin::validate(&self.admin, &fail)?;
        admin::validate_log(&self.log, &fail)?;
        events::validate(&self.events, &fail)?;
        mail_authentication::validate(&self.mail_authentication, &fail)?;
        suppression::validate(&self.suppression, &fail)?;
        dkim::validate(&self.dkim, &fail)
    }

    /// Checks that need the shard count (known only on the machine that runs the server).
    pub fn validate_for_shards(&self, shards: usize, cpus: usize, source_name: &str) -> Result<(), ConfigError> {
        if shards > cpus {
            return Err(ConfigError {
                source_name: source_name.to_string(),
                line: None,
                key: Some("server.shards".into()),
                message: format!("{shards} shards asked for, but this process may use only {cpus} CPUs; write \"auto\" or a number up to {cpus}"),
            });
        }
        if self.segments_per_shard_max(shards) < 2 {
            return Err(ConfigError {
                source_name: source_name.to_string(),
                line: None,
                key: Some("spool.size_max".into()),
                message: format!(
                    "{} leaves fewer than two segments of {} for each of {shards} shards; raise spool.size_max",
                    self.spool.size_max, self.spool.segment_size
                ),
            });
        }
        Ok(())
    }

    /// Where mail for a recipient domain goes: its own route, else the "*" route.
    pub fn route(&self, domain: &[u8]) -> Option<RouteTarget> {
        let exact = self
            .routes
            .iter()
            .find(|r| r.domain.as_bytes().eq_ignore_ascii_case(domain));
        exact
            .or_else(|| self.routes.iter().find(|r| r.domain == "*"))
            .map(|r| match r.smarthost {
                Some(addr) => RouteTarget::Smarthost(addr),
                None => RouteTarget::Mx,
            })
    }

    /// The limits rule for a destination named `name` (an `IP:port` or a domain), if any.
    pub fn destination_limits(&self, name: &str) -> Option<&DestinationLimits> {
        self.destinations.iter().find(|d| d.matches(name))
    }

    /// The scheduler's settings for shard `shard` of `shard_count`.
    pub fn sched_config(&self, shard: u16, shard_count: usize, seed: u64) -> SchedConfig {
        let d = &self.delivery;
        SchedConfig {
            shard,
            shard_count,
            routes: self
                .routes
                .iter()
                .map(|r| SchedRoute {
                    domain: r.domain.clone(),
                    target: match r.smarthost {
                        Some(addr) => SchedTarget::Smarthost(addr),
                        None => SchedTarget::Mx,
                    },
                })
                .collect(),
            site_rules: self
                .destinations
                .iter()
                .map(|r| SiteRule {
                    pattern: r.pattern.clone(),
                    connections_max: r.connections_max,
                    messages_per_connection_max: r.messages_per_connection_max,
                    messages_per_second: r.messages_per_second,
                })
                .collect(),
            connections_per_site_max: d.connections_per_destination_max,
            messages_per_connection_max: d.messages_per_connection_max,
            connections_per_shard_max: d.connections_per_shard_max,
            sites_max: d.destinations_max,
            retry: RetrySchedule {
                first: d.retry_first.0,
                max: d.retry_max.0,
            },
            queue_lifetime: d.queue_lifetime.0,
            delay_warning_after: d.delay_warning_after.0,
            // Forget a site no sooner than its pooled connections would have closed.
            site_idle: d.idle_timeout.0.max(Duration::from_secs(10)),
            seed,
            health: gannet_sched::HealthRules {
                down_after_failures: d.down_after_failures,
                probe_interval: d.probe_interval.0,
                probe_interval_max: d.probe_interval_max.0,
            },
            one_recipient_per_job: self.verp.enabled,
            providers: providers::rules(&self.providers, d.default_providers),
        }
    }

    /// The name Gannet gives in EHLO when delivering.
    pub fn helo_name(&self) -> &str {
        self.delivery.helo_name.as_deref().unwrap_or(&self.server.hostname)
    }

    /// The session settings every session of a shard shares.
    pub fn session_config(&self) -> SessionConfig {
        SessionConfig {
            hostname: self.server.hostname.clone(),
            line_length_max: self.limits.line_length_max,
            message_size_max: self.limits.message_size_max.0,
            recipients_max: self.limits.recipients_max,
            errors_max: self.limits.errors_max,
            bare_line_endings: match self.smtp.bare_line_endings {
                BareLineEndingPolicy::Reject => BareLineEndings::Reject,
                BareLineEndingPolicy::Normalize => BareLineEndings::Normalize,
            },
            relay: RelayPolicy {
                local_domains: self
                    .relay
                    .local_domains
                    .iter()
                    .map(|d| d.to_ascii_lowercase())
                    .collect(),
                trusted_networks: self.relay.trusted_networks.iter().map(|n| n.0).collect(),
            },
            recipients_per_session_max: self.limits.recipients_per_session_max,
            tarpit_after_errors: self.limits.tarpit_after_errors,
            tarpit_delay: self.limits.tarpit_delay.0,
            sender_must_match: self.auth.sender_must_match,
            timeouts: Timeouts {
                command: self.limits.command_timeout.0,
                stress_command: self.limits.stress_command_timeout.0,
                data: self.limits.data_timeout.0,
                data_rate_min_bytes_per_s: self.limits.data_rate_min_bytes_per_second,
                data_rate_window: self.limits.data_rate_window.0,
            },
            junk_commands_max: self.limits.junk_commands_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::spool::Durability;

    #[test]
    fn embedded_default_is_valid_and_matches_the_documented_defaults() {
        let c = Config::embedded_default();
        assert_eq!(c.listeners.len(), 3);
        assert_eq!(c.listeners[0].address, "127.0.0.1:2525".parse().unwrap());
        assert_eq!(c.listeners[1].kind, ListenerKind::Submission);
        assert_eq!(c.listeners[2].kind, ListenerKind::Smtps);
        assert!(c.listeners[0].offers_starttls() && !c.listeners[0].offers_auth());
        assert!(c.listeners[1].offers_starttls() && c.listeners[1].offers_auth() && c.listeners[1].requires_auth());
        assert!(!c.listeners[2].offers_starttls() && c.listeners[2].requires_auth());
        assert_eq!(c.spool.directory, PathBuf::from("./gannet-spool"));
        assert_eq!(c.spool.durability, Durability::Fsync);
        assert_eq!(c.server.shards, Shards::Auto);
        // The embedded default delivers every domain by MX...
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.route(b"anything.example"), Some(RouteTarget::Mx));
        // ...and is otherwise what an empty file means: every default. (A file without any
        // [[route]] has no route: its mail waits with "no route" until one is added.)
        let empty = Config::parse("", "empty.toml").unwrap();
        assert!(empty.routes.is_empty());
        let mut without_routes = c.clone();
        without_routes.routes.clear();
        assert_eq!(empty.to_toml(), without_routes.to_toml());
    }

    #[test]
    fn unknown_keys_name_the_line_and_the_valid_keys() {
        let e = Config::parse("[limits]\nmessage_size_max = \"1MiB\"\nrecipient_max = 5\n", "g.toml").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.to_string().starts_with("g.toml:3: "), "{e}");
        assert!(e.message.contains("recipients_max"), "{e}");
    }

    #[test]
    fn bad_values_say_what_to_write() {
        let e = Config::parse("[limits]\ncommand_timeout = 30\n", "g.toml").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("\"30s\""), "{e}");
        let e = Config::parse("[spool]\nsegment_size = \"64 Mb\"\n", "g.toml").unwrap_err();
        assert!(e.message.contains("\"10MiB\""), "{e}");
        let e = Config::parse("[relay]\ntrusted_networks = [\"10.0.0.0/40\"]\n", "g.toml").unwrap_err();
        assert!(e.message.contains("prefix length"), "{e}");
        let e = Config::parse("[spool]\ndurability = \"sometimes\"\n", "g.toml").unwrap_err();
        assert!(e.message.contains("fsync"), "{e}");
    }

    #[test]
    fn impossible_combinations_are_refused_with_their_line() {
        let text = "[limits]\nmessage_size_max = \"100MiB\"\n\n[spool]\nsegment_size = \"64MiB\"\n";
        let e = Config::parse(text, "g.toml").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("spool.segment_size"));
        assert_eq!(e.line, Some(5));
        let e = Config::parse("[[listener]]\naddress = \"127.0.0.1:25\"\nkind = \"mx\"\n[[listener]]\naddress = \"127.0.0.1:25\"\nkind = \"submission\"\n", "g.toml").unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        let e = Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:465\"\nkind = \"smtps\"\nstarttls = true\n",
            "g.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("speaks TLS from the first byte"), "{e}");
        let e = Config::parse(
            "[[tls.certificate]]\nchain = \"/nonexistent.pem\"\nkey = \"/k.pem\"\n",
            "g.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(
            e.to_string()
                .contains("tls.certificate.chain: /nonexistent.pem is not a readable file"),
            "{e}"
        );
        let e = Config::parse("[auth]\npassword_file = \"/nonexistent-users\"\n", "g.toml").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("g.toml:2: auth.password_file: /nonexistent-users: cannot read"),
            "{e}"
        );
        let e = Config::parse("[limits]\nrecipients_per_session_max = 10\n", "g.toml").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        let e = Config::parse("[spool]\nsegment_size = \"3500KiB\"\n", "g.toml").unwrap_err();
        assert!(e.message.contains("whole number of MiB"), "{e}");
        let e = Config::parse(
            "[[route]]\ndomain = \"*\"\nsmarthost = \"relay.example:25\"\n",
            "g.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        let e = Config::parse("[dns]\nttl_min = \"2h\"\nttl_max = \"1h\"\n", "g.toml").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        let e = Config::parse("[delivery]\nretry_first = \"1h\"\nretry_max = \"5m\"\n", "g.toml").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        let c = Config::parse("[server]\nshards = 4\n", "g.toml").unwrap();
        assert!(c
            .validate_for_shards(4, 2, "g.toml")
            .unwrap_err()
            .message
            .contains("only 2 CPUs"));
        assert!(Config::parse("[server]\nshards = 0\n", "g.toml").is_err());
    }
}
