//! Gannet's DNS logic, sans-IO: queries built and answers parsed with hickory-proto
//! ([`message`]), the lock-free cache every shard shares ([`cache`]), and where mail for a domain
//! goes by its MX answer ([`mx`]). The resolver that sends the queries is in the binary.

pub mod cache;
pub mod message;
pub mod mx;
