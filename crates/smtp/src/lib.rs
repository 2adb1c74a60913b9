//! Gannet's SMTP protocol core: the inbound session, the outbound client, and what both share.
//! Nothing in here does I/O or depends on a runtime: bytes and time go in, replies and actions
//! come out, so every part can be unit-tested, fuzzed and simulated without sockets.
//!
//! - [`parser`], [`address`], [`data`]: command lines, address syntax (RFC 5321, RFC 6531) and
//!   the DATA decoder (dot-unstuffing, end detection, bare line endings).
//! - [`session`]: the inbound state machine, with [`deadline`] (per-command and content
//!   deadlines), [`sasl`] (AUTH PLAIN/LOGIN decoders), [`policy`] (the relay decision),
//!   [`received`] (the trace header) and [`reply`] (every reply the server sends).
//! - [`envelope`]: the envelope while a transaction runs and as stored; [`identity`]: who an
//!   authenticated client is and which senders it may use.
//! - [`client`]: the outbound reply parser, capabilities and transaction state machine.
//! - [`dsn`]: RFC 3464 delivery status notifications.

pub mod address;
pub mod client;
pub mod data;
pub mod deadline;
pub mod dsn;
pub mod envelope;
pub mod identity;
pub mod limits;
pub mod parser;
pub mod policy;
pub mod received;
pub mod reply;
pub mod sasl;
pub mod session;
