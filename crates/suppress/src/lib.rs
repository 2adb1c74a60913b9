//! The suppression list, sans-IO: recipients Gannet must not mail (hard bounces, complaints,
//! an operator's word, imports), each with its reason, source, time and optional expiry, for
//! all senders (global scope) or for one sender domain.
//!
//! [`SuppressionList`] is shared by every shard and read without a lock (papaya's concurrent
//! map, like the DNS cache) on every RCPT and before every delivery; it is bounded
//! ([`SuppressionList::entries_max`]). [`journal`] is the durable form: the shell appends a
//! line and syncs it before it inserts the entry, so an entry is relied upon only once it
//! would survive a crash, and replays the journal at start. [`csv_io`] is the import and
//! export format of the API and CLI.

pub mod csv_io;
mod entry;
pub mod journal;
mod list;

pub use entry::{normalize_address, Entry, EntryError, Scope, Source, ADDRESS_BYTES_MAX, REASON_BYTES_MAX};
pub use list::{Full, Hit, Listed, SuppressionList, ENTRIES_MAX_LIMIT};
