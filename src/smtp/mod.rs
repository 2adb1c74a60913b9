//! The SMTP protocol core. Nothing in here does I/O or knows about glommio: bytes and time go in,
//! replies and actions come out, so every part can be unit-tested and fuzzed without sockets.

pub mod address;
pub mod data;
pub mod deadline;
pub mod envelope;
pub mod parser;
pub mod received;
pub mod reply;
pub mod sasl;
pub mod session;
