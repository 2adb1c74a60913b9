//! `[[provider]]`: mailbox providers whose receiving sites share limits
//! (`gannet_sched::provider`), as data: the operator's tables first, then Gannet's defaults
//! (`src/config/default-providers.toml`, embedded; each table cites the provider's own page on
//! throttling) unless `delivery.default_providers = false`.

use gannet_sched::provider::PROVIDERS_MAX;
use gannet_sched::ProviderRule;
use serde::{Deserialize, Serialize};

use super::error::{line_of, ConfigError, Fail};

pub const DEFAULT_PROVIDERS: &str = include_str!("default-providers.toml");
pub const DEFAULT_PROVIDERS_NAME: &str = "src/config/default-providers.toml (embedded)";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub name: String,
    /// MX host name suffixes: `google.com` covers `aspmx.l.google.com`.
    pub mx: Vec<String>,
    /// Connections to all of its sites, for the whole process (split over the shards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_max: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_connection_max: Option<usize>,
    /// Messages per second to all of its sites, for the whole process (split over the shards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_second: Option<f64>,
    /// Where the limits come from (documentation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    provider: Vec<Provider>,
}

fn check(p: &Provider) -> Result<(), (&'static str, String)> {
    let label_ok =
        |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if p.name.is_empty()
        || p.name.len() > 64
        || !p
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(("name", "must be 1 to 64 letters, digits, '-' or '_'".into()));
    }
    if p.mx.is_empty() || p.mx.len() > 32 || !p.mx.iter().all(|s| s.len() <= 253 && s.split('.').all(label_ok)) {
        return Err((
            "mx",
            "must list 1 to 32 host name suffixes, such as \"google.com\"".into(),
        ));
    }
    if p.connections_max.is_some_and(|c| c == 0 || c > 10_000) {
        return Err(("connections_max", "must be between 1 and 10000".into()));
    }
    if p.messages_per_connection_max.is_some_and(|c| c == 0 || c > 100_000) {
        return Err(("messages_per_connection_max", "must be between 1 and 100000".into()));
    }
    if p.messages_per_second.is_some_and(|r| !(0.001..=100_000.0).contains(&r)) {
        return Err(("messages_per_second", "must be between 0.001 and 100000".into()));
    }
    Ok(())
}

/// Checks the operator's tables (errors name their line in `text`).
pub(super) fn validate(providers: &[Provider], fail: &Fail<'_>) -> Result<(), ConfigError> {
    // The defaults come after the operator's tables and count against the same bound.
    let room = PROVIDERS_MAX - defaults().map_or(0, |d| d.len());
    if providers.len() > room {
        return Err(fail(
            "provider",
            0,
            "name",
            format!("at most {room} [[provider]] tables"),
        ));
    }
    for (i, p) in providers.iter().enumerate() {
        check(p).map_err(|(key, message)| fail("provider", i, key, message))?;
    }
    Ok(())
}

/// The embedded defaults, checked (a test proves they parse).
pub fn defaults() -> Result<Vec<Provider>, ConfigError> {
    let file: File = toml::from_str(DEFAULT_PROVIDERS).map_err(|e| ConfigError {
        source_name: DEFAULT_PROVIDERS_NAME.into(),
        line: None,
        key: None,
        message: e.message().to_string(),
    })?;
    for (i, p) in file.provider.iter().enumerate() {
        check(p).map_err(|(key, message)| ConfigError {
            source_name: DEFAULT_PROVIDERS_NAME.into(),
            line: line_of(DEFAULT_PROVIDERS, "provider", i, key),
            key: Some(format!("provider.{key}")),
            message,
        })?;
    }
    Ok(file.provider)
}

/// The rules the scheduler gets: the operator's, then (if wanted) the defaults.
pub fn rules(own: &[Provider], with_defaults: bool) -> Vec<ProviderRule> {
    let defaults = if with_defaults {
        defaults().expect("the embedded providers are valid (tested)")
    } else {
        Vec::new()
    };
    own.iter()
        .chain(defaults.iter().filter(|d| !own.iter().any(|o| o.name == d.name)))
        .map(|p| ProviderRule {
            name: p.name.clone(),
            mx_suffixes: p
                .mx
                .iter()
                .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            connections_max: p.connections_max,
            messages_per_connection_max: p.messages_per_connection_max,
            messages_per_second: p.messages_per_second,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_providers_parse_and_cite_their_sources() {
        let all = defaults().unwrap();
        assert!(all.len() >= 3);
        for p in &all {
            assert!(
                p.source.as_deref().is_some_and(|s| s.contains("https://")),
                "{} cites a source",
                p.name
            );
            assert!(p.connections_max.is_some(), "{} is conservative", p.name);
        }
        let google = rules(&[], true).into_iter().find(|r| r.name == "google").unwrap();
        assert!(google.covers("gmail-smtp-in.l.google.com"));
    }

    #[test]
    fn the_operators_table_replaces_a_default_of_the_same_name() {
        let mine = Provider {
            name: "google".into(),
            mx: vec!["google.com".into()],
            connections_max: Some(3),
            messages_per_connection_max: None,
            messages_per_second: Some(2.0),
            source: None,
        };
        let r = rules(std::slice::from_ref(&mine), true);
        assert_eq!(r.iter().filter(|p| p.name == "google").count(), 1);
        assert_eq!(r[0].connections_max, Some(3));
        assert!(rules(&[], false).is_empty());
    }
}
