//! DNS for MX delivery: the stub resolver per shard over its own sockets (`resolver`) and the MX
//! lookups it serves (`mx`); messages, the shared cache and MX ordering are the `gannet-dns`
//! crate, re-exported here.

pub mod mx;
pub mod resolver;

pub use gannet_dns::{cache, message};
