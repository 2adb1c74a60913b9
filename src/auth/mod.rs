//! SMTP AUTH's server side beyond the protocol: who the users are (a password file with argon2id
//! hashes) and how failures are slowed down and blocked.

pub mod passwords;
pub mod throttle;
