//! The spool's writing shell (glommio): the appender with group commit and the session's message
//! buffers. The on-disk format and its recovery scan are the `gannet-spool` crate, re-exported
//! here.

pub mod appender;
pub mod buffer;
pub mod mapped;

pub use gannet_spool::*;
