//! `[auth]`: SMTP AUTH on the server side (the password file and the failure throttle).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Fail};
use crate::units::Span;

/// SMTP AUTH (server side).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// `user:argon2-hash[:addresses]` lines (`gannet passwd USER` makes one). None: nobody can
    /// authenticate, so AUTH is not offered and submission accepts no mail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// An authenticated user's MAIL FROM must be its own address (its user name, or one listed
    /// for it in the password file): 553 5.7.1 otherwise.
    pub sender_must_match: bool,
    /// Failed attempts from one IP address (per shard) before it is blocked with 421.
    pub failures_max: u32,
    /// Delay before the first 535 reply; it doubles with each further failure.
    pub failure_delay: Span,
    /// How long a blocked address stays blocked (and how long failures are remembered).
    pub block_duration: Span,
}

impl Default for Auth {
    fn default() -> Auth {
        Auth {
            password_file: None,
            sender_must_match: true,
            failures_max: 5,
            failure_delay: Span(Duration::from_secs(1)),
            block_duration: Span(Duration::from_secs(600)),
        }
    }
}

/// Checks `[auth]`, and that the password file loads.
pub(super) fn validate(a: &Auth, fail: &Fail<'_>) -> Result<(), ConfigError> {
    if a.failures_max == 0 {
        return Err(fail("auth", 0, "failures_max", "must be at least 1".into()));
    }
    if a.block_duration.0.is_zero() {
        return Err(fail(
            "auth",
            0,
            "block_duration",
            "must be more than zero, such as \"10m\"".into(),
        ));
    }
    if a.failure_delay.0 > Duration::from_secs(60) {
        return Err(fail(
            "auth",
            0,
            "failure_delay",
            "must be at most \"60s\" (it doubles with each failure)".into(),
        ));
    }
    if let Some(path) = &a.password_file {
        if let Err(e) = crate::auth::passwords::PasswordFile::load(path) {
            return Err(fail("auth", 0, "password_file", e));
        }
    }
    Ok(())
}
