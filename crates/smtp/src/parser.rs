//! The SMTP command parser: one command line (without its CRLF) in, a [`Command`] borrowing that
//! line out. No allocation, no copies; verbs and keywords are matched case-insensitively.

use crate::address::{parse_path, AddressError, Mailbox, Path};

/// One parsed command. Every slice borrows the input line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    Helo(&'a [u8]),
    Ehlo(&'a [u8]),
    Mail {
        from: Path<'a>,
        params: &'a [u8],
    },
    Rcpt {
        to: Mailbox<'a>,
        params: &'a [u8],
    },
    Data,
    Bdat {
        size_bytes: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy(&'a [u8]),
    Help,
    /// RFC 3207. Takes no arguments.
    StartTls,
    /// RFC 4954: `AUTH mechanism [initial-response]`. The mechanism is as sent (any case).
    Auth {
        mechanism: &'a [u8],
        initial_response: Option<&'a [u8]>,
    },
    /// Recognised but not offered by this build (EXPN, ETRN, TURN).
    NotImplemented,
}

/// Why a line is not a command we can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    Unrecognized,
    NoArgumentsAllowed,
    HeloNeedsDomain,
    VrfyNeedsArgument,
    MailSyntax,
    RcptSyntax,
    BdatSyntax,
    AuthSyntax,
    Sender(AddressError),
    Recipient(AddressError),
}

/// Parses one command line. `line` excludes the terminating CRLF.
pub fn parse_command(line: &[u8]) -> Result<Command<'_>, ParseError> {
    let verb_end = memchr::memchr(b' ', line).unwrap_or(line.len());
    let verb = &line[..verb_end];
    let args = line.get(verb_end + 1..).unwrap_or(&[]);
    if verb.len() != 4 && verb.len() != 8 {
        return Err(ParseError::Unrecognized);
    }
    let mut upper = [0u8; 8];
    for (dst, src) in upper.iter_mut().zip(verb) {
        *dst = src.to_ascii_uppercase();
    }
    match &upper[..verb.len()] {
        b"HELO" => domain_argument(args).map(Command::Helo),
        b"EHLO" => domain_argument(args).map(Command::Ehlo),
        b"MAIL" => parse_mail(args),
        b"RCPT" => parse_rcpt(args),
        b"DATA" => no_arguments(args, Command::Data),
        b"BDAT" => parse_bdat(args),
        b"RSET" => no_arguments(args, Command::Rset),
        // RFC 5321 4.1.1.9: NOOP may carry a string, which is ignored.
        b"NOOP" => Ok(Command::Noop),
        b"QUIT" => no_arguments(args, Command::Quit),
        b"VRFY" => match trim(args) {
            [] => Err(ParseError::VrfyNeedsArgument),
            who => Ok(Command::Vrfy(who)),
        },
        b"HELP" => Ok(Command::Help),
        b"STARTTLS" => no_arguments(args, Command::StartTls),
        b"AUTH" => parse_auth(args),
        b"EXPN" | b"ETRN" | b"TURN" => Ok(Command::NotImplemented),
        _ => Err(ParseError::Unrecognized),
    }
}

/// `AUTH mechanism [initial-response]`: a SASL mechanism name (RFC 4422: up to 20 characters of
/// upper-case letters, digits, `-` and `_`; matched case-insensitively) and an optional response.
fn parse_auth(args: &[u8]) -> Result<Command<'_>, ParseError> {
    let mut words = args.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let mechanism = words.next().ok_or(ParseError::AuthSyntax)?;
    let initial_response = words.next();
    let valid_name = (1..=20).contains(&mechanism.len())
        && mechanism
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid_name || words.next().is_some() {
        return Err(ParseError::AuthSyntax);
    }
    Ok(Command::Auth {
        mechanism,
        initial_response,
    })
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != b' ').unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|&b| b != b' ').map_or(start, |p| p + 1);
    &bytes[start..end]
}

fn no_arguments<'a>(args: &[u8], command: Command<'a>) -> Result<Command<'a>, ParseError> {
    if trim(args).is_empty() {
        Ok(command)
    } else {
        Err(ParseError::NoArgumentsAllowed)
    }
}

fn domain_argument(args: &[u8]) -> Result<&[u8], ParseError> {
    match trim(args) {
        [] => Err(ParseError::HeloNeedsDomain),
        domain => Ok(domain),
    }
}

/// Strips a case-insensitive keyword such as `FROM:` and any spaces after it (many clients send
/// `MAIL FROM: <a@b>`; accepting the space costs nothing and refuses no valid command).
fn keyword<'a>(args: &'a [u8], word: &[u8]) -> Option<&'a [u8]> {
    let head = args.get(..word.len())?;
    if !head.eq_ignore_ascii_case(word) {
        return None;
    }
    let rest = &args[word.len()..];
    let spaces = rest.iter().take_while(|&&b| b == b' ').count();
    Some(&rest[spaces..])
}

fn parse_mail(args: &[u8]) -> Result<Command<'_>, ParseError> {
    let rest = keyword(args, b"FROM:").ok_or(ParseError::MailSyntax)?;
    let (from, params) = parse_path(rest, false).map_err(ParseError::Sender)?;
    Ok(Command::Mail {
        from,
        params: parameters_after_path(params).ok_or(ParseError::MailSyntax)?,
    })
}

fn parse_rcpt(args: &[u8]) -> Result<Command<'_>, ParseError> {
    let rest = keyword(args, b"TO:").ok_or(ParseError::RcptSyntax)?;
    let (to, params) = parse_path(rest, true).map_err(ParseError::Recipient)?;
    let Path::Mailbox(to) = to else {
        return Err(ParseError::RcptSyntax);
    };
    Ok(Command::Rcpt {
        to,
        params: parameters_after_path(params).ok_or(ParseError::RcptSyntax)?,
    })
}

/// After `>` comes nothing, or a space and the parameters.
fn parameters_after_path(rest: &[u8]) -> Option<&[u8]> {
    match rest.first() {
        None => Some(rest),
        Some(b' ') => Some(trim(rest)),
        Some(_) => None,
    }
}

fn parse_bdat(args: &[u8]) -> Result<Command<'_>, ParseError> {
    let args = trim(args);
    let (size, marker) = match memchr::memchr(b' ', args) {
        Some(space) => (&args[..space], trim(&args[space + 1..])),
        None => (args, &[][..]),
    };
    let last = match marker {
        [] => false,
        m if m.eq_ignore_ascii_case(b"LAST") => true,
        _ => return Err(ParseError::BdatSyntax),
    };
    if size.is_empty() || size.len() > 19 || !size.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::BdatSyntax);
    }
    let size_bytes = size.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Ok(Command::Bdat { size_bytes, last })
}

/// Iterates over `KEY[=VALUE]` ESMTP parameters separated by spaces (RFC 5321 4.1.2).
pub struct Params<'a> {
    rest: &'a [u8],
}

impl<'a> Params<'a> {
    pub fn new(params: &'a [u8]) -> Params<'a> {
        Params { rest: params }
    }
}

/// One parameter: keyword and optional value. A malformed keyword yields `Err`.
pub type Param<'a> = Result<(&'a [u8], Option<&'a [u8]>), ()>;

impl<'a> Iterator for Params<'a> {
    type Item = Param<'a>;

    fn next(&mut self) -> Option<Param<'a>> {
        let spaces = self.rest.iter().take_while(|&&b| b == b' ').count();
        self.rest = &self.rest[spaces..];
        if self.rest.is_empty() {
            return None;
        }
        let end = memchr::memchr(b' ', self.rest).unwrap_or(self.rest.len());
        let item = &self.rest[..end];
        self.rest = &self.rest[end..];
        let (key, value) = match memchr::memchr(b'=', item) {
            Some(eq) => (&item[..eq], Some(&item[eq + 1..])),
            None => (item, None),
        };
        let key_ok = !key.is_empty()
            && key[0].is_ascii_alphanumeric()
            && key.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-');
        // esmtp-value: %d33-60 / %d62-126, and UTF-8 under SMTPUTF8 (RFC 6531).
        let value_ok = value.is_none_or(|v| {
            !v.is_empty()
                && v.iter()
                    .all(|&b| (33..=60).contains(&b) || (62..=126).contains(&b) || b >= 0x80)
        });
        Some(if key_ok && value_ok { Ok((key, value)) } else { Err(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_verb_case_insensitively() {
        assert_eq!(
            parse_command(b"ehlo client.example"),
            Ok(Command::Ehlo(b"client.example"))
        );
        assert_eq!(parse_command(b"HELO x"), Ok(Command::Helo(b"x")));
        assert_eq!(parse_command(b"DATA"), Ok(Command::Data));
        assert_eq!(parse_command(b"rset"), Ok(Command::Rset));
        assert_eq!(parse_command(b"NOOP whatever"), Ok(Command::Noop));
        assert_eq!(parse_command(b"QUIT"), Ok(Command::Quit));
        assert_eq!(parse_command(b"VRFY bob"), Ok(Command::Vrfy(b"bob")));
        assert_eq!(parse_command(b"HELP"), Ok(Command::Help));
        assert_eq!(parse_command(b"STARTTLS"), Ok(Command::StartTls));
        assert_eq!(parse_command(b"starttls now"), Err(ParseError::NoArgumentsAllowed));
        assert_eq!(
            parse_command(b"AUTH plain AGEAYg=="),
            Ok(Command::Auth {
                mechanism: b"plain",
                initial_response: Some(b"AGEAYg=="),
            })
        );
        assert_eq!(
            parse_command(b"AUTH LOGIN"),
            Ok(Command::Auth {
                mechanism: b"LOGIN",
                initial_response: None,
            })
        );
        assert_eq!(parse_command(b"AUTH"), Err(ParseError::AuthSyntax));
        assert_eq!(parse_command(b"AUTH PLAIN a b"), Err(ParseError::AuthSyntax));
        assert_eq!(parse_command(b"AUTH PL/AIN"), Err(ParseError::AuthSyntax));
        assert_eq!(parse_command(b"EXPN list"), Ok(Command::NotImplemented));
        assert_eq!(
            parse_command(b"BDAT 1000 LAST"),
            Ok(Command::Bdat {
                size_bytes: 1000,
                last: true
            })
        );
        assert_eq!(
            parse_command(b"bdat 0"),
            Ok(Command::Bdat {
                size_bytes: 0,
                last: false
            })
        );
    }

    #[test]
    fn parses_mail_and_rcpt_with_parameters() {
        match parse_command(b"MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME") {
            Ok(Command::Mail {
                from: Path::Mailbox(m),
                params,
            }) => {
                assert_eq!(m.local, b"a");
                let got: Vec<_> = Params::new(params).collect();
                assert_eq!(
                    got,
                    vec![
                        Ok((&b"SIZE"[..], Some(&b"100"[..]))),
                        Ok((&b"BODY"[..], Some(&b"8BITMIME"[..])))
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_command(b"mail from: <>"),
            Ok(Command::Mail {
                from: Path::Null,
                params: b""
            })
        ));
        match parse_command(b"RCPT TO:<x@y.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y.example") {
            Ok(Command::Rcpt { to, params }) => {
                assert_eq!(to.domain, b"y.example");
                assert_eq!(Params::new(params).count(), 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_malformed_commands() {
        assert_eq!(parse_command(b"EHLO"), Err(ParseError::HeloNeedsDomain));
        assert_eq!(parse_command(b"EHLO   "), Err(ParseError::HeloNeedsDomain));
        assert_eq!(parse_command(b"DATA now"), Err(ParseError::NoArgumentsAllowed));
        assert_eq!(parse_command(b"MAIL <a@b>"), Err(ParseError::MailSyntax));
        assert_eq!(parse_command(b"MAIL FROM:<a@b>x"), Err(ParseError::MailSyntax));
        assert_eq!(parse_command(b"RCPT TO:<>"), Err(ParseError::RcptSyntax));
        assert_eq!(
            parse_command(b"RCPT TO:<a@b..c>"),
            Err(ParseError::Recipient(AddressError::BadDomain))
        );
        assert_eq!(parse_command(b"BDAT x"), Err(ParseError::BdatSyntax));
        assert_eq!(parse_command(b"BDAT 99999999999999999999"), Err(ParseError::BdatSyntax));
        assert_eq!(parse_command(b"BDAT 10 FIRST"), Err(ParseError::BdatSyntax));
        assert_eq!(parse_command(b"FOO"), Err(ParseError::Unrecognized));
        assert_eq!(parse_command(b""), Err(ParseError::Unrecognized));
        assert_eq!(Params::new(b"=x").next(), Some(Err(())));
        assert_eq!(Params::new(b"SIZE=").next(), Some(Err(())));
    }
}
