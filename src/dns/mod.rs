//! DNS for MX delivery: messages built and parsed with hickory-proto (`message`), one cache shared
//! by all shards (`cache`), and a stub resolver per shard over its own sockets (`resolver`).

pub mod cache;
pub mod message;
pub mod mx;
pub mod resolver;
