//! `[relay]`: the domains Gannet accepts mail for, and the networks that may relay anywhere.

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Fail};
use super::server::valid_hostname;
use crate::policy::Network;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relay {
    /// Domains we accept mail for from anyone.
    #[serde(default)]
    pub local_domains: Vec<String>,
    /// Clients in these networks may relay to any domain.
    #[serde(default = "default_trusted_networks")]
    pub trusted_networks: Vec<NetworkText>,
}

/// A network as written in the file, checked on load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkText(pub Network);

impl Serialize for NetworkText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for NetworkText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<NetworkText, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(NetworkText).map_err(serde::de::Error::custom)
    }
}

fn default_trusted_networks() -> Vec<NetworkText> {
    vec![
        NetworkText("127.0.0.0/8".parse().unwrap()),
        NetworkText("::1/128".parse().unwrap()),
    ]
}

impl Default for Relay {
    fn default() -> Relay {
        Relay {
            local_domains: Vec::new(),
            trusted_networks: default_trusted_networks(),
        }
    }
}

/// Checks `[relay]` (the networks were checked as they were read).
pub(super) fn validate(relay: &Relay, fail: &Fail<'_>) -> Result<(), ConfigError> {
    for domain in &relay.local_domains {
        if !valid_hostname(domain) {
            return Err(fail(
                "relay",
                0,
                "local_domains",
                format!("`{domain}` is not a domain name; write names such as \"example.com\""),
            ));
        }
    }
    Ok(())
}
