//! Asynchronous bounces and complaints, sans-IO: what a report that came back says.
//!
//! - RFC 3464 delivery status notifications (`multipart/report; report-type=delivery-status`):
//!   the `message/delivery-status` part's per-recipient fields (`Final-Recipient`,
//!   `Original-Recipient`, `Action`, `Status`, `Diagnostic-Code`);
//! - RFC 5965 feedback reports (ARF, `report-type=feedback-report`): `Feedback-Type`,
//!   `Original-Rcpt-To`, `Original-Mail-From`, and the original message or its headers (third
//!   part), whose `From:` domain and `To:` are kept;
//! - the common non-standard bounces: Exim's `X-Failed-Recipients:` header with the first SMTP
//!   reply line (`550 5.1.1 ...`) of the text, as Exim, qmail and many appliances write them.
//!
//! mail-parser reads the MIME structure and decodes the parts; the report fields themselves
//! (header-like blocks separated by blank lines) are read here. Every list is bounded: a report
//! is input from anyone.

use mail_parser::{MessageParser, MimeHeaders};

/// Recipients read from one report.
pub const RECIPIENTS_MAX: usize = 100;
/// Addresses gathered from one report as candidates for the original recipient.
pub const CANDIDATES_MAX: usize = 50;
/// The longest field value kept.
const FIELD_BYTES_MAX: usize = 1000;
/// Fields kept per group (a DSN's per-recipient group has about six).
const FIELDS_PER_GROUP_MAX: usize = 32;
/// How much of a report is read: its report parts come first, the returned original last.
pub const REPORT_BYTES_MAX: usize = 4 << 20;

/// What kind of report a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// A delivery status notification, standard or not.
    Bounce,
    /// An ARF feedback report (a complaint).
    Complaint,
    /// Nothing this module can read.
    Unrecognised,
}

impl ReportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReportKind::Bounce => "dsn",
            ReportKind::Complaint => "arf",
            ReportKind::Unrecognised => "unknown",
        }
    }
}

/// One recipient a bounce reports on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reported {
    /// Final-Recipient (or X-Failed-Recipients), without its `rfc822;` type.
    pub address: String,
    /// Original-Recipient, when given.
    pub original: Option<String>,
    /// `failed`, `delayed`, `delivered`, `relayed`, `expanded` (lowercase); `failed` for a
    /// non-standard bounce.
    pub action: String,
    /// The RFC 3463 status (`5.1.1`), when given.
    pub status: Option<String>,
    /// The remote server's reply (`550 5.1.1 ...`), from Diagnostic-Code or the text.
    pub diagnostic: Option<String>,
}

/// What a report says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub kind: ReportKind,
    /// Bounces: the recipients reported on.
    pub recipients: Vec<Reported>,
    /// Complaints: the feedback type (`abuse`, `fraud`, ...), lowercase.
    pub feedback_type: Option<String>,
    /// Complaints: who complained, as far as the report tells (Original-Rcpt-To, else the
    /// original's `To:`); a token check picks the right one.
    pub complainants: Vec<String>,
    /// Complaints: the domain of the original message's `From:`.
    pub original_from_domain: Option<String>,
}

/// Reads a report. Never fails: what cannot be read is [`ReportKind::Unrecognised`].
pub fn parse_report(bytes: &[u8]) -> Report {
    let mut report = Report {
        kind: ReportKind::Unrecognised,
        recipients: Vec::new(),
        feedback_type: None,
        complainants: Vec::new(),
        original_from_domain: None,
    };
    let bytes = &bytes[..bytes.len().min(REPORT_BYTES_MAX)];
    let Some(message) = MessageParser::default().parse(bytes) else {
        return report;
    };
    let report_type = message
        .content_type()
        .filter(|ct| {
            ct.ctype().eq_ignore_ascii_case("multipart")
                && ct.subtype().is_some_and(|s| s.eq_ignore_ascii_case("report"))
        })
        .and_then(|ct| ct.attribute("report-type"))
        .map(str::to_ascii_lowercase);
    for part in &message.parts {
        let Some(ct) = part.content_type() else { continue };
        let kind = format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or("")).to_ascii_lowercase();
        match kind.as_str() {
            "message/delivery-status" | "message/global-delivery-status" => {
                report.recipients.extend(delivery_status(part.contents()));
                report.recipients.truncate(RECIPIENTS_MAX);
            }
            "message/feedback-report" => {
                let groups = field_groups(part.contents());
                let fields = groups.first().map(Vec::as_slice).unwrap_or(&[]);
                report.feedback_type = field(fields, "feedback-type").map(|v| v.to_ascii_lowercase());
                report.complainants.extend(
                    fields
                        .iter()
                        .filter(|(n, _)| n == "original-rcpt-to")
                        .map(|(_, v)| bare(v)),
                );
            }
            "text/rfc822-headers" => original_headers(&mut report, part.contents()),
            "message/rfc822" | "message/global" => {
                if let Some(inner) = part.message() {
                    original_headers(&mut report, inner.raw_message());
                }
            }
            _ => {}
        }
    }
    report.complainants.truncate(CANDIDATES_MAX);
    report.kind = match report_type.as_deref() {
        Some("feedback-report") if report.feedback_type.is_some() => ReportKind::Complaint,
        Some("delivery-status") if !report.recipients.is_empty() => ReportKind::Bounce,
        _ => non_standard(&mut report, &message),
    };
    report
}

/// Exim's `X-Failed-Recipients:` with the first SMTP reply line of the text.
fn non_standard(report: &mut Report, message: &mail_parser::Message<'_>) -> ReportKind {
    let Some(failed) = message.header_raw("X-Failed-Recipients") else {
        return ReportKind::Unrecognised;
    };
    let text = message.body_text(0).map(|t| t.into_owned()).unwrap_or_default();
    let diagnostic = text
        .lines()
        .map(str::trim)
        .find(|l| is_reply_line(l))
        .map(str::to_string);
    report.recipients = failed
        .split(',')
        .map(bare)
        .filter(|a| a.contains('@'))
        .take(RECIPIENTS_MAX)
        .map(|address| Reported {
            address,
            action: "failed".into(),
            status: diagnostic
                .as_deref()
                .and_then(crate::status::enhanced_code)
                .map(|(c, s, d)| format!("{c}.{s}.{d}")),
            diagnostic: diagnostic.clone(),
            ..Reported::default()
        })
        .collect();
    if report.recipients.is_empty() {
        ReportKind::Unrecognised
    } else {
        ReportKind::Bounce
    }
}

/// `550 5.1.1 ...`, `550-5.1.1 ...`: a basic code of 4xx or 5xx and text.
fn is_reply_line(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 4
        && matches!(b[0], b'4' | b'5')
        && b[1].is_ascii_digit()
        && b[2].is_ascii_digit()
        && matches!(b[3], b' ' | b'-')
}

/// The per-recipient groups of a `message/delivery-status` body (the first group is the
/// per-message one).
fn delivery_status(body: &[u8]) -> Vec<Reported> {
    field_groups(body)
        .iter()
        .skip(1)
        .filter_map(|fields| {
            let address = field(fields, "final-recipient").map(bare)?;
            Some(Reported {
                address,
                original: field(fields, "original-recipient").map(bare),
                action: field(fields, "action").unwrap_or("failed").trim().to_ascii_lowercase(),
                status: field(fields, "status").map(|s| s.trim().to_string()),
                diagnostic: field(fields, "diagnostic-code").map(|d| {
                    // `smtp; 550 5.1.1 ...`: the reply after the type.
                    d.split_once(';').map_or(d, |(_, reply)| reply).trim().to_string()
                }),
            })
        })
        .take(RECIPIENTS_MAX)
        .collect()
}

/// The included original's `From:` domain and `To:` addresses (complaint candidates).
fn original_headers(report: &mut Report, headers: &[u8]) {
    let Some(original) = MessageParser::default().parse_headers(headers) else {
        return;
    };
    if report.original_from_domain.is_none() {
        report.original_from_domain = original
            .from()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .and_then(|a| a.rsplit_once('@'))
            .map(|(_, d)| d.to_ascii_lowercase());
    }
    if let Some(to) = original.to() {
        report
            .complainants
            .extend(to.iter().filter_map(|a| a.address()).map(str::to_string));
    }
}

/// `rfc822; <Bob@X>` → `Bob@X`.
fn bare(value: &str) -> String {
    let v = value.split_once(';').map_or(value, |(_, a)| a);
    v.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim()
        .to_string()
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// Header-like field blocks separated by blank lines: (lowercase name, unfolded value).
fn field_groups(body: &[u8]) -> Vec<Vec<(String, String)>> {
    let text = String::from_utf8_lossy(body);
    let mut groups: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for line in text.lines() {
        if line.trim().is_empty() {
            if groups.last().is_some_and(|g| !g.is_empty()) && groups.len() <= RECIPIENTS_MAX {
                groups.push(Vec::new());
            }
            continue;
        }
        let group = groups.last_mut().expect("never empty");
        if group.len() >= FIELDS_PER_GROUP_MAX {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = group.last_mut() {
                if value.len() < FIELD_BYTES_MAX {
                    value.push(' ');
                    value.push_str(line.trim());
                }
            }
        } else if let Some((name, value)) = line.split_once(':').filter(|(n, _)| n.len() <= 64) {
            let mut value = value.trim().to_string();
            value.truncate(value.floor_char_boundary_compat(FIELD_BYTES_MAX));
            group.push((name.trim().to_ascii_lowercase(), value));
        }
    }
    groups.retain(|g| !g.is_empty());
    groups
}

/// `str::floor_char_boundary` for the crate's minimum Rust.
trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, index: usize) -> usize;
}

impl FloorCharBoundary for String {
    fn floor_char_boundary_compat(&self, index: usize) -> usize {
        let mut i = index.min(self.len());
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DSN: &str = "From: MAILER-DAEMON@mx.example.org\r\n\
To: bounces+1-00-2.0.0011223344556677@bounce.example.com\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\
\r\n\
--B\r\n\
Content-Type: text/plain\r\n\
\r\n\
I'm sorry to have to inform you that your message could not be delivered.\r\n\
--B\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mx.example.org\r\n\
\r\n\
Final-Recipient: rfc822; Bob@Example.org\r\n\
Original-Recipient: rfc822;bob@example.org\r\n\
Action: failed\r\n\
Status: 5.1.1\r\n\
Diagnostic-Code: smtp; 550 5.1.1 <bob@example.org>: Recipient address\r\n\
\x20rejected: User unknown in virtual mailbox table\r\n\
\r\n\
Final-Recipient: rfc822; carol@example.org\r\n\
Action: delayed\r\n\
Status: 4.2.2\r\n\
--B--\r\n";

    #[test]
    fn a_dsn_names_each_recipient_with_action_status_and_reply() {
        let r = parse_report(DSN.as_bytes());
        assert_eq!(r.kind, ReportKind::Bounce);
        assert_eq!(r.recipients.len(), 2);
        let bob = &r.recipients[0];
        assert_eq!(bob.address, "Bob@Example.org");
        assert_eq!(bob.original.as_deref(), Some("bob@example.org"));
        assert_eq!((bob.action.as_str(), bob.status.as_deref()), ("failed", Some("5.1.1")));
        assert_eq!(
            bob.diagnostic.as_deref(),
            Some("550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown in virtual mailbox table")
        );
        assert_eq!(r.recipients[1].action, "delayed");
    }

    #[test]
    fn an_arf_report_names_the_complainant_and_the_original_sender_domain() {
        let arf = "From: feedback@fbl.example.net\r\n\
To: fbl@bounce.example.com\r\n\
Subject: complaint\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=feedback-report; boundary=\"F\"\r\n\
\r\n\
--F\r\n\
Content-Type: text/plain\r\n\
\r\n\
This is an email abuse report.\r\n\
--F\r\n\
Content-Type: message/feedback-report\r\n\
\r\n\
Feedback-Type: abuse\r\n\
User-Agent: SomeGenerator/1.0\r\n\
Version: 1\r\n\
Original-Mail-From: <bounces+1-00-2.0.0011223344556677@bounce.example.com>\r\n\
Original-Rcpt-To: <dave@example.net>\r\n\
--F\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
Return-Path: <bounces+1-00-2.0.0011223344556677@bounce.example.com>\r\n\
From: News <news@shop.example.com>\r\n\
To: dave@example.net\r\n\
Subject: Our offers\r\n\
--F--\r\n";
        let r = parse_report(arf.as_bytes());
        assert_eq!(r.kind, ReportKind::Complaint);
        assert_eq!(r.feedback_type.as_deref(), Some("abuse"));
        assert_eq!(
            r.complainants,
            vec!["dave@example.net".to_string(), "dave@example.net".to_string()]
        );
        assert_eq!(r.original_from_domain.as_deref(), Some("shop.example.com"));
    }

    #[test]
    fn an_exim_style_bounce_is_read_from_its_header_and_text() {
        let exim = "From: Mail Delivery System <Mailer-Daemon@mx.example.org>\r\n\
To: bounces+1-00-2.0.0011223344556677@bounce.example.com\r\n\
Subject: Mail delivery failed: returning message to sender\r\n\
X-Failed-Recipients: erin@example.org\r\n\
\r\n\
This message was created automatically by mail delivery software.\r\n\
\r\n\
  erin@example.org\r\n\
    host mx.example.org [192.0.2.1]\r\n\
    SMTP error from remote mail server after RCPT TO:<erin@example.org>:\r\n\
    550 5.1.1 No such user here\r\n";
        let r = parse_report(exim.as_bytes());
        assert_eq!(r.kind, ReportKind::Bounce);
        assert_eq!(r.recipients[0].address, "erin@example.org");
        assert_eq!(
            r.recipients[0].diagnostic.as_deref(),
            Some("550 5.1.1 No such user here")
        );
        assert_eq!(r.recipients[0].status.as_deref(), Some("5.1.1"));
    }

    #[test]
    fn anything_else_is_unrecognised_and_bounded_input_stays_bounded() {
        assert_eq!(
            parse_report(b"Subject: hello\r\n\r\nJust a note.\r\n").kind,
            ReportKind::Unrecognised
        );
        assert_eq!(parse_report(b"").kind, ReportKind::Unrecognised);
        let mut many = String::from(
            "Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n",
        );
        for i in 0..500 {
            many.push_str(&format!(
                "\r\nFinal-Recipient: rfc822; u{i}@x.test\r\nAction: failed\r\n"
            ));
        }
        many.push_str("--B--\r\n");
        assert_eq!(parse_report(many.as_bytes()).recipients.len(), RECIPIENTS_MAX);
    }
}
