//! SMTP replies. Every reply carries an RFC 3463 enhanced status code and one human sentence.
//!
//! Replies are written straight into the session's output buffer; nothing here allocates once the
//! buffer has grown to its working size.

/// A single-line reply: basic code, enhanced code, text. The text must be one line of printable ASCII.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: &'static str,
    pub text: &'static str,
}

impl Reply {
    pub const fn new(code: u16, enhanced: &'static str, text: &'static str) -> Reply {
        Reply { code, enhanced, text }
    }

    /// Appends `code enhanced text\r\n` to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        write_line(out, self.code, ' ', self.enhanced, self.text.as_bytes());
    }

    /// 4xx and 5xx replies count as client errors for the per-session error limit.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }
}

/// Appends one reply line. `sep` is ' ' for the last line of a reply and '-' for the others.
pub fn write_line(out: &mut Vec<u8>, code: u16, sep: char, enhanced: &str, text: &[u8]) {
    debug_assert!((200..600).contains(&code));
    let mut digits = [b'0'; 3];
    digits[0] += (code / 100) as u8;
    digits[1] += (code / 10 % 10) as u8;
    digits[2] += (code % 10) as u8;
    out.extend_from_slice(&digits);
    out.push(sep as u8);
    if !enhanced.is_empty() {
        out.extend_from_slice(enhanced.as_bytes());
        out.push(b' ');
    }
    out.extend_from_slice(text);
    out.extend_from_slice(b"\r\n");
}

// Replies used by the session, named by what they say. Codes follow RFC 5321 section 4.2 and RFC 3463.
pub const OK: Reply = Reply::new(250, "2.0.0", "Ok");
pub const SENDER_OK: Reply = Reply::new(250, "2.1.0", "Sender ok");
pub const RECIPIENT_OK: Reply = Reply::new(250, "2.1.5", "Recipient ok");
pub const RESET_OK: Reply = Reply::new(250, "2.0.0", "Reset ok");
pub const NOOP_OK: Reply = Reply::new(250, "2.0.0", "Ok");
pub const BYE: Reply = Reply::new(221, "2.0.0", "Bye");
pub const START_DATA: Reply = Reply::new(354, "", "End data with <CR><LF>.<CR><LF>");
pub const VRFY_CANNOT: Reply = Reply::new(
    252,
    "2.5.2",
    "Cannot VRFY user, but will accept message and attempt delivery",
);
pub const HELP: Reply = Reply::new(
    214,
    "2.0.0",
    "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP",
);

pub const UNRECOGNIZED: Reply = Reply::new(500, "5.5.2", "Command not recognized");
pub const LINE_TOO_LONG: Reply = Reply::new(500, "5.5.2", "Line too long");
pub const BARE_LF_COMMAND: Reply = Reply::new(
    500,
    "5.5.2",
    "Command line ends in a bare LF or contains a bare CR; end lines with CRLF",
);
pub const BAD_CHARACTERS: Reply = Reply::new(500, "5.5.2", "Command contains control characters");
pub const NOT_IMPLEMENTED: Reply = Reply::new(502, "5.5.1", "Command not implemented");
pub const NEED_HELO: Reply = Reply::new(503, "5.5.1", "Send HELO or EHLO first");
pub const NESTED_MAIL: Reply = Reply::new(503, "5.5.1", "Nested MAIL command");
pub const NEED_MAIL: Reply = Reply::new(503, "5.5.1", "Need MAIL before RCPT");
pub const NEED_MAIL_BEFORE_DATA: Reply = Reply::new(503, "5.5.1", "Need MAIL and RCPT before DATA or BDAT");
pub const NEED_RCPT: Reply = Reply::new(503, "5.5.1", "Need RCPT before DATA");
pub const NO_VALID_RECIPIENTS: Reply = Reply::new(554, "5.5.1", "No valid recipients");
pub const MIXED_DATA_BDAT: Reply = Reply::new(503, "5.5.1", "DATA and BDAT cannot be mixed in one transaction");
pub const BDAT_AFTER_FAILURE: Reply = Reply::new(
    503,
    "5.5.1",
    "An earlier BDAT chunk of this transaction failed; send RSET",
);
pub const HELO_NEEDS_DOMAIN: Reply = Reply::new(501, "5.5.4", "HELO and EHLO need a domain or address literal");
pub const VRFY_NEEDS_ARGUMENT: Reply = Reply::new(501, "5.5.4", "VRFY needs an argument");
pub const NO_ARGUMENTS_ALLOWED: Reply = Reply::new(501, "5.5.4", "This command takes no arguments");
pub const UNKNOWN_PARAMETER: Reply = Reply::new(555, "5.5.4", "Parameter not recognized");
pub const DUPLICATE_PARAMETER: Reply = Reply::new(501, "5.5.4", "Parameter given twice");
pub const BAD_PARAMETER_VALUE: Reply = Reply::new(501, "5.5.4", "Bad parameter value");
pub const UTF8_NOT_ALLOWED: Reply = Reply::new(
    553,
    "5.6.7",
    "Non-ASCII address needs the SMTPUTF8 parameter on MAIL FROM",
);
pub const SIZE_DECLARED_TOO_BIG: Reply = Reply::new(552, "5.3.4", "Message size exceeds fixed maximum message size");
pub const MESSAGE_TOO_BIG: Reply = Reply::new(552, "5.3.4", "Message size exceeds fixed maximum message size");
pub const TOO_MANY_RECIPIENTS: Reply = Reply::new(452, "4.5.3", "Too many recipients");
pub const RELAY_DENIED: Reply = Reply::new(554, "5.7.1", "Relay access denied");
pub const BARE_LINE_ENDING: Reply = Reply::new(
    550,
    "5.5.2",
    "Message contains a bare CR or LF; end every line with CRLF",
);
pub const NO_STORAGE: Reply = Reply::new(452, "4.3.1", "Insufficient system storage, try again later");
pub const SPOOL_ERROR: Reply = Reply::new(451, "4.3.0", "Local error writing the message, try again later");
pub const TOO_MANY_ERRORS: Reply = Reply::new(421, "4.7.0", "Too many errors, closing connection");
pub const TIMEOUT: Reply = Reply::new(421, "4.4.2", "Timeout exceeded, closing connection");
pub const SHUTTING_DOWN: Reply = Reply::new(421, "4.3.2", "Service shutting down, try again later");
pub const TOO_MANY_SESSIONS: Reply = Reply::new(421, "4.7.0", "Too many connections, try again later");
pub const TOO_MANY_SESSIONS_FROM_IP: Reply =
    Reply::new(421, "4.7.0", "Too many connections from your address, try again later");
pub const CONNECTION_RATE: Reply = Reply::new(
    421,
    "4.7.0",
    "Too many connections from your address per minute, try again later",
);
pub const TOO_MANY_RECIPIENTS_IN_SESSION: Reply = Reply::new(
    452,
    "4.5.3",
    "Too many recipients for this connection, send the rest in a new one",
);
pub const MESSAGE_RATE: Reply = Reply::new(450, "4.7.1", "Message rate limit exceeded, try again later");

// STARTTLS (RFC 3207) and AUTH (RFC 4954).
pub const READY_FOR_TLS: Reply = Reply::new(220, "2.0.0", "Ready to start TLS");
pub const TLS_ALREADY_ACTIVE: Reply = Reply::new(503, "5.5.1", "TLS is already active");
pub const NOT_IN_TRANSACTION: Reply = Reply::new(503, "5.5.1", "Not allowed during a mail transaction");
pub const AUTH_OK: Reply = Reply::new(235, "2.7.0", "Authentication successful");
pub const AUTH_INVALID: Reply = Reply::new(535, "5.7.8", "Authentication credentials invalid");
pub const AUTH_BLOCKED: Reply = Reply::new(
    421,
    "4.7.0",
    "Too many authentication failures from your address, try again later",
);
pub const AUTH_UNAVAILABLE: Reply = Reply::new(454, "4.7.0", "Temporary authentication failure");
pub const AUTH_REQUIRED: Reply = Reply::new(530, "5.7.0", "Authentication required");
pub const ALREADY_AUTHENTICATED: Reply = Reply::new(503, "5.5.1", "Already authenticated");
pub const ENCRYPTION_REQUIRED: Reply = Reply::new(
    538,
    "5.7.11",
    "Encryption required for requested authentication mechanism; use STARTTLS first",
);
pub const UNKNOWN_MECHANISM: Reply = Reply::new(504, "5.5.4", "Unrecognized authentication type; use PLAIN or LOGIN");
pub const SENDER_NOT_OWNED: Reply = Reply::new(553, "5.7.1", "Sender address not owned by the authenticated user");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_code_enhanced_code_and_text() {
        let mut out = Vec::new();
        RELAY_DENIED.write(&mut out);
        assert_eq!(out, b"554 5.7.1 Relay access denied\r\n");
        let mut out = Vec::new();
        write_line(&mut out, 250, '-', "", b"PIPELINING");
        assert_eq!(out, b"250-PIPELINING\r\n");
    }
}
