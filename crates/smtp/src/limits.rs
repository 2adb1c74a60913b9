//! Limits that more than one module relies on, in one place: the session enforces them, the
//! spool sizes its records by them, and the configuration validates against them. The
//! compile-time assertions below are the invariants the spool's record codec depends on.

use std::time::Duration;

use crate::address::{DOMAIN_BYTES_MAX, LOCAL_PART_BYTES_MAX};

/// Command lines, CRLF included: RFC 5321 4.5.3.1.4 asks for at least 512; the configuration
/// allows up to this many.
pub const LINE_LENGTH_MIN: usize = 512;
pub const LINE_LENGTH_MAX_CEILING: usize = 65536;
/// The longest HELO/EHLO argument a command line can carry ("HELO " and CRLF take the rest).
pub const HELO_BYTES_MAX: usize = LINE_LENGTH_MAX_CEILING - "HELO \r\n".len();
/// The longest address the session accepts: local part, `@`, domain.
pub const ADDRESS_BYTES_MAX: usize = LOCAL_PART_BYTES_MAX + 1 + DOMAIN_BYTES_MAX;
/// ENVID (RFC 3461 4.4: 100 characters).
pub const ENVID_BYTES_MAX: usize = 100;
/// ORCPT (RFC 3461 4.2: 500 characters).
pub const ORCPT_BYTES_MAX: usize = 500;
/// MAIL's AUTH parameter (RFC 4954 section 5).
pub const MAIL_AUTH_BYTES_MAX: usize = 500;
/// Recipients per message the configuration allows at most.
pub const RECIPIENTS_MAX_CEILING: usize = 100_000;
/// The Received header Gannet adds is shorter than this.
pub const RECEIVED_HEADER_BYTES_MAX: usize = 2048;
/// The longest tarpit delay before one flush of replies (`limits.tarpit_delay` is at most this).
pub const TARPIT_DELAY_MAX: Duration = Duration::from_secs(30);

// The spool stores each envelope field with a 16-bit length: the longest HELO a line can carry,
// the longest address and the DSN parameters all fit.
const _: () = assert!(HELO_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(ADDRESS_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(ENVID_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(ORCPT_BYTES_MAX <= u16::MAX as usize);
// The recipient count is a 32-bit field.
const _: () = assert!(RECIPIENTS_MAX_CEILING <= u32::MAX as usize);
