//! `[[listener]]`: the addresses Gannet accepts mail on, their kinds, and the default three.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Fail};
use super::mail_authentication::MailAuthentication;
use super::relay::NetworkText;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    /// Port 25: mail from other MTAs.
    Mx,
    /// Port 587: mail from users' clients; STARTTLS, then AUTH before MAIL (RFC 6409).
    Submission,
    /// Port 465: submission over implicit TLS (RFC 8314); AUTH before MAIL.
    Smtps,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub address: SocketAddr,
    pub kind: ListenerKind,
    /// Offer STARTTLS (mx and submission). Default: true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starttls: Option<bool>,
    /// Offer AUTH (over TLS only). Default: true on submission and smtps, false on mx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<bool>,
    /// Every connection begins with a PROXY protocol header (v1 or v2) from a load balancer,
    /// whose client address then counts as the connection's (`crate::server::proxy`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
    /// The load balancers' addresses: with `proxy_protocol`, connections from anywhere else are
    /// closed unanswered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxy_from: Vec<NetworkText>,
    /// SPF/DKIM/DMARC/ARC verification of mail from unauthenticated, untrusted clients:
    /// "off", "record" (the default on mx) or "enforce". Default "off" on submission and smtps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mail_authentication: Option<MailAuthentication>,
}

impl Listener {
    /// Whether this listener offers STARTTLS (never on smtps, where TLS starts at connect).
    pub fn offers_starttls(&self) -> bool {
        self.kind != ListenerKind::Smtps && self.starttls.unwrap_or(true)
    }

    /// Whether this listener offers AUTH once TLS is on.
    pub fn offers_auth(&self) -> bool {
        self.auth.unwrap_or(self.kind != ListenerKind::Mx)
    }

    /// What this listener does about SPF, DKIM and DMARC.
    pub fn mail_authentication(&self) -> MailAuthentication {
        self.mail_authentication.unwrap_or(if self.kind == ListenerKind::Mx {
            MailAuthentication::Record
        } else {
            MailAuthentication::Off
        })
    }

    /// Whether MAIL needs AUTH first: mail submission (587 and 465) is for users only.
    pub fn requires_auth(&self) -> bool {
        self.kind != ListenerKind::Mx
    }
}

pub(super) fn default_listeners() -> Vec<Listener> {
    vec![
        Listener {
            address: "127.0.0.1:2525".parse().unwrap(),
            kind: ListenerKind::Mx,
            starttls: None,
            auth: None,
            proxy_protocol: false,
            proxy_from: Vec::new(),
            mail_authentication: None,
        },
        Listener {
            address: "127.0.0.1:2587".parse().unwrap(),
            kind: ListenerKind::Submission,
            starttls: None,
            auth: None,
            proxy_protocol: false,
            proxy_from: Vec::new(),
            mail_authentication: None,
        },
        Listener {
            address: "127.0.0.1:2465".parse().unwrap(),
            kind: ListenerKind::Smtps,
            starttls: None,
            auth: None,
            proxy_protocol: false,
            proxy_from: Vec::new(),
            mail_authentication: None,
        },
    ]
}

/// Checks the `[[listener]]` tables: at least one, each on its own address.
pub(super) fn validate(listeners: &[Listener], fail: &Fail<'_>) -> Result<(), ConfigError> {
    if listeners.is_empty() {
        return Err(fail(
            "",
            0,
            "listener",
            "at least one [[listener]] is needed, such as address = \"127.0.0.1:2525\" with kind = \"mx\"".into(),
        ));
    }
    for (i, listener) in listeners.iter().enumerate() {
        if listeners[..i].iter().any(|l| l.address == listener.address) {
            return Err(fail(
                "listener",
                i,
                "address",
                format!(
                    "{} is listed twice; give each listener its own address",
                    listener.address
                ),
            ));
        }
        if listener.proxy_protocol && listener.proxy_from.is_empty() {
            return Err(fail(
                "listener",
                i,
                "proxy_protocol",
                "needs proxy_from, the load balancers' addresses, such as proxy_from = [\"10.0.0.5/32\"]".into(),
            ));
        }
        if !listener.proxy_protocol && !listener.proxy_from.is_empty() {
            return Err(fail(
                "listener",
                i,
                "proxy_from",
                "is set without proxy_protocol = true; add it, or remove proxy_from".into(),
            ));
        }
        if listener.kind == ListenerKind::Smtps && listener.starttls.is_some() {
            return Err(fail(
                "listener",
                i,
                "starttls",
                "an smtps listener speaks TLS from the first byte; remove starttls".into(),
            ));
        }
    }
    Ok(())
}
