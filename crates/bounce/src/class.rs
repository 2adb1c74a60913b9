//! The classes of delivery failure and what Gannet does with each by default.

use std::fmt;
use std::str::FromStr;

/// Why a delivery failed or was deferred, as an operator acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// The mailbox does not exist (x.1.1, x.1.6 and their texts).
    InvalidRecipient,
    /// The recipient's domain does not exist or takes no mail (x.1.2, x.1.10 null MX, no MX).
    InvalidDomain,
    /// Over quota (x.2.2).
    MailboxFull,
    /// Bigger than the receiver takes (x.2.3, x.3.4).
    MessageTooLarge,
    /// Spam or virus filtering refused the content.
    ContentRejected,
    /// Refused for the sender's reputation or a blocklist listing (x.7.1 and texts).
    PolicyBlock,
    /// The receiver asks to slow down (Gmail 4.7.28, Yahoo TSS04, 4.5.3 too many recipients...).
    RateLimited,
    /// SPF, DKIM or DMARC did not pass, or reverse DNS is missing (x.7.20-x.7.26).
    AuthRequired,
    /// TLS was required and failed or was refused (x.7.10, x.7.11, handshake failures).
    Tls,
    /// A DNS lookup failed temporarily (x.4.3).
    Dns,
    /// No route or no host answered the connection (x.4.0, x.4.1, x.4.4, x.4.6).
    Routing,
    /// A connection or a reply timed out (x.4.2 with a timeout, x.4.7).
    Timeout,
    /// A temporary failure with no more specific class.
    Transient,
    /// A permanent failure with no more specific class.
    Other,
}

/// Every class, in the order the docs and metrics list them.
pub const CLASSES: [Class; 14] = [
    Class::InvalidRecipient,
    Class::InvalidDomain,
    Class::MailboxFull,
    Class::MessageTooLarge,
    Class::ContentRejected,
    Class::PolicyBlock,
    Class::RateLimited,
    Class::AuthRequired,
    Class::Tls,
    Class::Dns,
    Class::Routing,
    Class::Timeout,
    Class::Transient,
    Class::Other,
];

impl Class {
    /// Its name in configuration, logs, events, DSNs, metrics and the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Class::InvalidRecipient => "invalid-recipient",
            Class::InvalidDomain => "invalid-domain",
            Class::MailboxFull => "mailbox-full",
            Class::MessageTooLarge => "message-too-large",
            Class::ContentRejected => "content-rejected",
            Class::PolicyBlock => "policy-block",
            Class::RateLimited => "rate-limited",
            Class::AuthRequired => "auth-required",
            Class::Tls => "tls",
            Class::Dns => "dns",
            Class::Routing => "routing",
            Class::Timeout => "timeout",
            Class::Transient => "transient",
            Class::Other => "other",
        }
    }

    /// Its position in [`CLASSES`] (the enum's order is the list's).
    pub const fn index(self) -> usize {
        self as usize
    }

    /// What Gannet does with it unless the configuration says otherwise: hard bounces
    /// (the address or its domain does not exist) suppress the recipient; everything else
    /// follows the reply's code (4xx retried, 5xx returned).
    pub const fn default_action(self) -> Action {
        match self {
            Class::InvalidRecipient | Class::InvalidDomain => Action::Suppress,
            _ => Action::Retry,
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Class {
    type Err = String;

    fn from_str(s: &str) -> Result<Class, String> {
        CLASSES.into_iter().find(|c| c.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = CLASSES.iter().map(|c| c.as_str()).collect();
            format!("unknown bounce class {s:?}; the classes are {}", names.join(", "))
        })
    }
}

/// What a failure of a class does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// As its code says: a 4xx reply is retried with the message's backoff, a 5xx returned.
    Retry,
    /// Returned to the sender now, even on a 4xx reply.
    Bounce,
    /// Returned now when the reply is permanent (5xx), and the recipient put on the
    /// suppression list; a 4xx is retried as usual (a temporary reply is no proof).
    Suppress,
    /// As `Retry`, and the recipient's domain is suspended for a while: its mail waits for the
    /// suspension to end instead of each message backing off on its own.
    Suspend,
    /// As `Retry`, and the destination's provider (or the site, if it has none) gets a lower
    /// message rate for a while, then its own again.
    Slow,
}

impl Action {
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Retry => "retry",
            Action::Bounce => "bounce",
            Action::Suppress => "suppress",
            Action::Suspend => "suspend",
            Action::Slow => "slow",
        }
    }
}

impl FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Action, String> {
        [
            Action::Retry,
            Action::Bounce,
            Action::Suppress,
            Action::Suspend,
            Action::Slow,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
        .ok_or_else(|| format!("unknown action {s:?}; write retry, bounce, suppress, suspend or slow"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (i, class) in CLASSES.into_iter().enumerate() {
            assert_eq!(class.index(), i);
            assert_eq!(class.as_str().parse::<Class>(), Ok(class));
        }
        assert!("hard".parse::<Class>().unwrap_err().contains("invalid-recipient"));
        assert_eq!("suppress".parse::<Action>(), Ok(Action::Suppress));
        assert!("drop".parse::<Action>().is_err());
    }

    #[test]
    fn hard_bounces_suppress_by_default() {
        let suppressing: Vec<Class> = CLASSES
            .into_iter()
            .filter(|c| c.default_action() == Action::Suppress)
            .collect();
        assert_eq!(suppressing, [Class::InvalidRecipient, Class::InvalidDomain]);
    }
}
