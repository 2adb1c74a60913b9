//! The SASL mechanisms Gannet accepts in `AUTH` (RFC 4954): PLAIN (RFC 4616) and LOGIN (the
//! widely deployed draft-murchison-sasl-login). Pure decoders: base64 text in, credentials out.
//!
//! Invariants: a decoded user name is valid UTF-8 without NUL bytes and at most
//! [`USER_BYTES_MAX`] long; a password is at most [`PASSWORD_BYTES_MAX`] long. Anything else is
//! an error, never a truncation.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// Longest user name accepted.
pub const USER_BYTES_MAX: usize = 256;
/// Longest password accepted.
pub const PASSWORD_BYTES_MAX: usize = 1024;
/// Longest base64 client response: a PLAIN response with an authzid and the two maxima above.
pub const RESPONSE_BYTES_MAX: usize = (2 * USER_BYTES_MAX + PASSWORD_BYTES_MAX + 2).div_ceil(3) * 4;

/// LOGIN's two challenges, base64 of "Username:" and "Password:".
pub const LOGIN_USER_CHALLENGE: &str = "VXNlcm5hbWU6";
pub const LOGIN_PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    /// The mechanism named in `AUTH`, matched case-insensitively.
    pub fn from_name(name: &[u8]) -> Option<Mechanism> {
        if name.eq_ignore_ascii_case(b"PLAIN") {
            Some(Mechanism::Plain)
        } else if name.eq_ignore_ascii_case(b"LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }
}

/// A user name and password as the client sent them.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// "PLAIN" or "LOGIN": the SASL mechanism they came by.
    pub mechanism: &'static str,
    pub user: String,
    pub password: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password, not even in a debug log.
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Why a client response cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslError {
    /// The client sent `*` (RFC 4954 section 4).
    Cancelled,
    /// Not base64.
    BadBase64,
    /// Too long, or not `[authzid] NUL authcid NUL passwd`.
    Malformed,
    /// An authorization identity other than the user itself (acting as another user is not
    /// supported).
    ForeignAuthzid,
}

impl SaslError {
    /// The reply sentence for this error.
    pub fn sentence(self) -> &'static str {
        match self {
            SaslError::Cancelled => "Authentication cancelled",
            SaslError::BadBase64 => "Cannot decode the response: it is not base64",
            SaslError::Malformed => "Malformed authentication response",
            SaslError::ForeignAuthzid => "Authorizing as another user is not supported",
        }
    }
}

/// Decodes one client response line: base64, `=` for an empty initial response, `*` to cancel.
pub fn decode_response(line: &[u8]) -> Result<Vec<u8>, SaslError> {
    match line {
        b"*" => Err(SaslError::Cancelled),
        b"=" => Ok(Vec::new()),
        _ if line.len() > RESPONSE_BYTES_MAX => Err(SaslError::Malformed),
        _ => STANDARD.decode(line).map_err(|_| SaslError::BadBase64),
    }
}

/// Decodes a PLAIN response (base64 of `authzid NUL authcid NUL passwd`).
pub fn plain(line: &[u8]) -> Result<Credentials, SaslError> {
    let decoded = decode_response(line)?;
    let mut parts = decoded.splitn(3, |&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SaslError::Malformed);
    };
    let user = user_name(authcid)?;
    if !authzid.is_empty() && authzid != user.as_bytes() {
        return Err(SaslError::ForeignAuthzid);
    }
    Ok(Credentials {
        mechanism: "PLAIN",
        user,
        password: password_bytes(password)?,
    })
}

/// Decodes LOGIN's first response, the user name.
pub fn login_user(line: &[u8]) -> Result<String, SaslError> {
    user_name(&decode_response(line)?)
}

/// Decodes LOGIN's second response, the password.
pub fn login_password(line: &[u8]) -> Result<Vec<u8>, SaslError> {
    password_bytes(&decode_response(line)?)
}

fn user_name(bytes: &[u8]) -> Result<String, SaslError> {
    if bytes.is_empty() || bytes.len() > USER_BYTES_MAX || bytes.contains(&0) {
        return Err(SaslError::Malformed);
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| SaslError::Malformed)
}

fn password_bytes(bytes: &[u8]) -> Result<Vec<u8>, SaslError> {
    if bytes.len() > PASSWORD_BYTES_MAX || bytes.contains(&0) {
        return Err(SaslError::Malformed);
    }
    Ok(bytes.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> Vec<u8> {
        STANDARD.encode(bytes).into_bytes()
    }

    #[test]
    fn plain_with_and_without_authzid() {
        let c = plain(&b64(b"\0alice\0secret")).unwrap();
        assert_eq!((c.user.as_str(), c.password.as_slice()), ("alice", &b"secret"[..]));
        let c = plain(&b64(b"alice\0alice\0pw")).unwrap();
        assert_eq!(c.user, "alice");
        assert_eq!(plain(&b64(b"bob\0alice\0pw")), Err(SaslError::ForeignAuthzid));
        assert_eq!(plain(&b64(b"alice\0secret")), Err(SaslError::Malformed));
        assert_eq!(plain(&b64(b"\0\0secret")), Err(SaslError::Malformed));
        assert_eq!(plain(b"not base64!"), Err(SaslError::BadBase64));
        assert_eq!(plain(b"*"), Err(SaslError::Cancelled));
        assert_eq!(plain(b"="), Err(SaslError::Malformed));
        // A NUL inside the password would make the third field ambiguous to other SASL stacks.
        assert_eq!(plain(&b64(b"\0alice\0sec\0ret")), Err(SaslError::Malformed));
    }

    #[test]
    fn login_steps_and_limits() {
        assert_eq!(login_user(&b64(b"alice@example.com")).unwrap(), "alice@example.com");
        assert_eq!(login_password(&b64(b"pw")).unwrap(), b"pw");
        assert_eq!(login_password(b"=").unwrap(), b"");
        assert_eq!(login_user(&b64(&[0xff, 0xfe])), Err(SaslError::Malformed));
        assert_eq!(login_user(&b64(&[b'a'; USER_BYTES_MAX + 1])), Err(SaslError::Malformed));
        let longest = [b'p'; PASSWORD_BYTES_MAX];
        assert_eq!(login_password(&b64(&longest)).unwrap().len(), PASSWORD_BYTES_MAX);
        let mut too_long = b"\0".to_vec();
        too_long.extend_from_slice(&[b'u'; USER_BYTES_MAX]);
        too_long.push(0);
        too_long.extend_from_slice(&[b'p'; PASSWORD_BYTES_MAX + 1]);
        assert_eq!(plain(&b64(&too_long)), Err(SaslError::Malformed));
        assert_eq!(Mechanism::from_name(b"login"), Some(Mechanism::Login));
        assert_eq!(Mechanism::from_name(b"CRAM-MD5"), None);
    }

    #[test]
    fn debug_output_hides_the_password() {
        let c = Credentials {
            mechanism: "PLAIN",
            user: "alice".into(),
            password: b"hunter2".to_vec(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
