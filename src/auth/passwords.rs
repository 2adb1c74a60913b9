//! The password file: one user per line, `user:hash[:address,address,...]`, where `hash` is a PHC
//! string from argon2 (`gannet passwd` makes one) and the optional addresses are the envelope
//! senders the user may use besides its own name (when that is an address). `@example.com`
//! stands for every address at that domain. Blank lines and lines starting with `#` are ignored.
//!
//! Verification does the same work whatever the outcome: an unknown user is checked against a
//! dummy hash with the same parameters, so the reply time does not tell which user names exist.

use std::collections::HashMap;
use std::path::Path;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;

pub use gannet_smtp::identity::Identity;
use gannet_smtp::sasl::Credentials;

/// Most users one file may hold.
pub const USERS_MAX: usize = 100_000;
/// Most sender addresses one user may list.
pub const SENDERS_PER_USER_MAX: usize = 1000;
/// Largest password file read.
pub const FILE_BYTES_MAX: u64 = 64 << 20;

/// The users, as loaded from one password file.
#[derive(Debug)]
pub struct PasswordFile {
    users: HashMap<String, User>,
    /// Verified against when the user is unknown (same cost as a real check).
    dummy_hash: String,
}

#[derive(Debug)]
struct User {
    hash: String,
    senders: Vec<String>,
}

/// Makes a new hash for `password` with argon2id and a random salt, as a PHC string.
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    Argon2::default()
        .hash_password(password)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

impl PasswordFile {
    /// Reads and parses the file at `path`. Errors name the file and line.
    pub fn load(path: &Path) -> Result<PasswordFile, String> {
        let name = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| format!("{name}: cannot read the password file: {e}"))?;
        if meta.len() > FILE_BYTES_MAX {
            return Err(format!(
                "{name}: the password file is larger than {FILE_BYTES_MAX} bytes"
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: cannot read the password file: {e}"))?;
        PasswordFile::parse(&text, &name)
    }

    pub fn parse(text: &str, source_name: &str) -> Result<PasswordFile, String> {
        let mut users = HashMap::new();
        let mut params = None;
        for (i, line) in text.lines().enumerate() {
            let fail = |message: String| format!("{source_name}:{}: {message}", i + 1);
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.splitn(3, ':');
            let (Some(user), Some(hash)) = (fields.next(), fields.next()) else {
                return Err(fail(
                    "expected `user:hash[:addresses]`; make the line with `gannet passwd USER`".into(),
                ));
            };
            if user.is_empty() || user.len() > crate::smtp::sasl::USER_BYTES_MAX {
                return Err(fail(format!(
                    "the user name must be 1 to {} bytes",
                    crate::smtp::sasl::USER_BYTES_MAX
                )));
            }
            let parsed = PasswordHash::new(hash).map_err(|e| {
                fail(format!(
                    "the hash of `{user}` is not a PHC string ({e}); make one with `gannet passwd {user}`"
                ))
            })?;
            if !parsed.algorithm.as_str().starts_with("argon2") {
                return Err(fail(format!(
                    "the hash of `{user}` uses `{}`; only argon2 hashes are accepted (`gannet passwd {user}`)",
                    parsed.algorithm
                )));
            }
            params.get_or_insert_with(|| argon2::Params::try_from(&parsed).ok());
            let senders: Vec<String> = match fields.next() {
                None | Some("") => Vec::new(),
                Some(list) => list.split(',').map(|s| s.trim().to_string()).collect(),
            };
            if senders.len() > SENDERS_PER_USER_MAX {
                return Err(fail(format!("at most {SENDERS_PER_USER_MAX} addresses per user")));
            }
            if let Some(bad) = senders
                .iter()
                .find(|s| !s.contains('@') || s.contains(char::is_whitespace))
            {
                return Err(fail(format!(
                    "`{bad}` is not an address; write user@example.com or @example.com for a whole domain"
                )));
            }
            if users.len() >= USERS_MAX {
                return Err(fail(format!("more than {USERS_MAX} users")));
            }
            if users
                .insert(
                    user.to_string(),
                    User {
                        hash: hash.to_string(),
                        senders,
                    },
                )
                .is_some()
            {
                return Err(fail(format!("`{user}` is listed twice")));
            }
        }
        // The dummy costs what the file's own hashes cost, so unknown users take as long.
        let argon = match params.flatten() {
            Some(p) => Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p),
            None => Argon2::default(),
        };
        let dummy_hash = argon
            .hash_password(b"gannet dummy password")
            .map(|h| h.to_string())
            .map_err(|e| format!("{source_name}: cannot make the dummy hash: {e}"))?;
        Ok(PasswordFile { users, dummy_hash })
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Checks credentials; the work done does not depend on whether the user exists. Takes tens
    /// of milliseconds of CPU (argon2's point): call it off the shard's event loop.
    pub fn verify(&self, credentials: &Credentials) -> Option<Identity> {
        let (hash, user) = match self.users.get(&credentials.user) {
            Some(user) => (user.hash.as_str(), Some(user)),
            None => (self.dummy_hash.as_str(), None),
        };
        let matches = PasswordHash::new(hash).ok().is_some_and(|parsed| {
            Argon2::default()
                .verify_password(&credentials.password, &parsed)
                .is_ok()
        });
        match (matches, user) {
            (true, Some(user)) => Some(Identity::new(&credentials.user, &user.senders)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(user: &str, password: &str) -> Credentials {
        Credentials {
            mechanism: "PLAIN",
            user: user.into(),
            password: password.as_bytes().to_vec(),
        }
    }

    #[test]
    fn verifies_known_users_and_refuses_the_rest() {
        let hash = hash_password(b"correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let text = format!("# users\n\nalice@example.com:{hash}\nbob:{hash}:bob@example.org, @example.net\n");
        let file = PasswordFile::parse(&text, "users").unwrap();
        assert_eq!(file.user_count(), 2);
        let alice = file.verify(&creds("alice@example.com", "correct horse")).unwrap();
        assert!(alice.may_send_as(b"Alice@Example.COM"));
        assert!(!alice.may_send_as(b"mallory@example.com"));
        assert!(file.verify(&creds("alice@example.com", "wrong")).is_none());
        assert!(file.verify(&creds("carol", "correct horse")).is_none());
        let bob = file.verify(&creds("bob", "correct horse")).unwrap();
        assert!(bob.may_send_as(b"bob@example.org"));
        assert!(bob.may_send_as(b"anyone@EXAMPLE.net"));
        assert!(!bob.may_send_as(b"bob"));
        assert!(!bob.may_send_as(b"x@sub.example.net"));
    }

    #[test]
    fn errors_name_the_line_and_the_fix() {
        let e = PasswordFile::parse("\nalice\n", "/etc/gannet/users").unwrap_err();
        assert!(e.starts_with("/etc/gannet/users:2: expected `user:hash"), "{e}");
        let e = PasswordFile::parse("alice:plaintext\n", "u").unwrap_err();
        assert!(e.contains("u:1: the hash of `alice` is not a PHC string"), "{e}");
        assert!(e.contains("gannet passwd alice"), "{e}");
        let hash = hash_password(b"pw").unwrap();
        let e = PasswordFile::parse(&format!("a:{hash}\na:{hash}\n"), "u").unwrap_err();
        assert!(e.contains("u:2: `a` is listed twice"), "{e}");
        let e = PasswordFile::parse(&format!("a:{hash}:nobody\n"), "u").unwrap_err();
        assert!(e.contains("`nobody` is not an address"), "{e}");
    }
}
