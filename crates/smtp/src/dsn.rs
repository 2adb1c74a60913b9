//! Delivery status notifications (RFC 3464, RFC 3461): the bounce a sender gets when recipients
//! fail for good or the message expires.
//!
//! Rules: never bounce the null sender `<>` (a bounce of a bounce could loop); a recipient that
//! asked for NOTIFY without FAILURE (or NOTIFY=NEVER) gets no failure notice; RET=FULL returns
//! the whole message, otherwise only its headers.

use crate::envelope::{notify, Ret, StoredEnvelope};

/// One recipient to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRecipient {
    /// Index in the stored envelope.
    pub index: u32,
    /// The remote reply or our own reason, e.g. `550 5.1.1 no such user`.
    pub diagnostic: String,
    /// Who said it: the relay's address, when a remote server answered.
    pub remote_mta: Option<String>,
    /// The failure's bounce class (`invalid-recipient`, ...), reported in an RFC 3464
    /// extension field, `X-Gannet-Bounce-Class`.
    pub class: Option<&'static str>,
}

/// Whether a failure notice for this recipient should be sent at all.
pub fn wants_failure_notice(envelope: &StoredEnvelope, index: u32) -> bool {
    let notify = envelope.recipients.get(index as usize).map(|r| r.notify);
    wants_notice(&envelope.sender, notify, notify::FAILURE)
}

/// Whether a delay notice for this recipient should be sent (NOTIFY=DELAY, or no NOTIFY at all).
pub fn wants_delay_notice(envelope: &StoredEnvelope, index: u32) -> bool {
    let notify = envelope.recipients.get(index as usize).map(|r| r.notify);
    wants_notice(&envelope.sender, notify, notify::DELAY)
}

/// Never to the null sender; without NOTIFY (`Some(0)`), yes; with NOTIFY, only if it names
/// `flag` (and not NEVER). `notify`: the recipient's NOTIFY flags, None if there is no such
/// recipient.
pub fn wants_notice(sender: &[u8], notify: Option<u8>, flag: u8) -> bool {
    if sender.is_empty() {
        return false;
    }
    match notify {
        None => false,
        Some(0) => true,
        Some(n) => n & flag != 0 && n & notify::NEVER == 0,
    }
}

/// The RFC 3463 status in a reply text (`550 5.1.1 ...` gives `5.1.1`), or a default by class.
fn status_of(diagnostic: &str) -> String {
    let mut words = diagnostic.split_whitespace();
    let code = words.next().unwrap_or("");
    if let Some(candidate) = words.next() {
        let parts: Vec<&str> = candidate.split('.').collect();
        if parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            && (parts[0] == "4" || parts[0] == "5")
        {
            return candidate.to_string();
        }
    }
    if code.starts_with('4') {
        "4.0.0".into()
    } else {
        "5.0.0".into()
    }
}

/// The header block of a message (up to the first empty line).
fn headers_of(content: &[u8]) -> &[u8] {
    match memchr::memmem::find(content, b"\r\n\r\n") {
        Some(end) => &content[..end + 2],
        None => content,
    }
}

/// Everything a bounce needs besides the original message.
pub struct BounceContext<'a> {
    pub hostname: &'a str,
    /// Our id of the failed message, quoted in the text and used for the Message-ID.
    pub original_id: &'a str,
    pub now_unix_s: u64,
    /// "failed" (final) or "delayed" (a delay warning).
    pub action: &'a str,
}

fn rfc5322_date(unix_s: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_s as i64)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc2822).ok())
        .unwrap_or_else(|| "Thu, 01 Jan 1970 00:00:00 +0000".into())
}

/// Builds the complete bounce message (headers and multipart/report body, CRLF line endings).
pub fn build_bounce(
    ctx: &BounceContext<'_>,
    envelope: &StoredEnvelope,
    content: &[u8],
    failed: &[FailedRecipient],
) -> Vec<u8> {
    let boundary = format!("{}/{}", ctx.original_id, ctx.hostname);
    let sender = String::from_utf8_lossy(&envelope.sender);
    let date = rfc5322_date(ctx.now_unix_s);
    let delayed = ctx.action == "delayed";
    let mut out = String::with_capacity(2048);
    out.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{}>\r\n",
        ctx.hostname
    ));
    out.push_str(&format!("To: <{sender}>\r\n"));
    out.push_str(if delayed {
        "Subject: Delayed Mail (still being retried)\r\n"
    } else {
        "Subject: Undelivered Mail Returned to Sender\r\n"
    });
    out.push_str(&format!("Date: {date}\r\n"));
    out.push_str(&format!(
        "Message-ID: <{}.{}@{}>\r\n",
        ctx.original_id, ctx.action, ctx.hostname
    ));
    out.push_str("Auto-Submitted: auto-replied\r\n");
    out.push_str("MIME-Version: 1.0\r\n");
    out.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"
    ));
    out.push_str("This is a MIME-encapsulated message.\r\n\r\n");
    // Human part.
    out.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    ));
    out.push_str(&format!("This is the mail system at host {}.\r\n\r\n", ctx.hostname));
    if delayed {
        out.push_str("Your message could not be delivered yet. The mail system will keep trying;\r\nyou do not need to send it again.\r\n\r\n");
    } else {
        out.push_str("Your message could not be delivered to one or more recipients.\r\nIt is attached below.\r\n\r\n");
    }
    for f in failed {
        let rcpt = &envelope.recipients[f.index as usize];
        out.push_str(&format!(
            "<{}>: {}\r\n",
            String::from_utf8_lossy(&rcpt.address),
            f.diagnostic
        ));
    }
    // Machine part (RFC 3464 section 2).
    out.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
    ));
    out.push_str(&format!("Reporting-MTA: dns; {}\r\n", ctx.hostname));
    if !envelope.envid.is_empty() {
        out.push_str(&format!(
            "Original-Envelope-Id: {}\r\n",
            String::from_utf8_lossy(&envelope.envid)
        ));
    }
    out.push_str(&format!("Arrival-Date: {}\r\n", rfc5322_date(envelope.received_unix_s)));
    for f in failed {
        let rcpt = &envelope.recipients[f.index as usize];
        out.push_str("\r\n");
        out.push_str(&format!(
            "Final-Recipient: rfc822; {}\r\n",
            String::from_utf8_lossy(&rcpt.address)
        ));
        if !rcpt.orcpt.is_empty() {
            out.push_str(&format!(
                "Original-Recipient: {}\r\n",
                String::from_utf8_lossy(&rcpt.orcpt)
            ));
        }
        out.push_str(&format!("Action: {}\r\n", ctx.action));
        out.push_str(&format!("Status: {}\r\n", status_of(&f.diagnostic)));
        if let Some(mta) = &f.remote_mta {
            out.push_str(&format!("Remote-MTA: dns; {mta}\r\n"));
        }
        out.push_str(&format!("Diagnostic-Code: smtp; {}\r\n", f.diagnostic));
        if let Some(class) = f.class {
            out.push_str(&format!("X-Gannet-Bounce-Class: {class}\r\n"));
        }
    }
    // The original: whole (RET=FULL) or headers.
    let full = envelope.ret == Ret::Full;
    let mut bytes = out.into_bytes();
    if full {
        bytes.extend_from_slice(format!("\r\n--{boundary}\r\nContent-Type: message/rfc822\r\n\r\n").as_bytes());
        bytes.extend_from_slice(content);
    } else {
        bytes.extend_from_slice(format!("\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n").as_bytes());
        bytes.extend_from_slice(headers_of(content));
    }
    if !bytes.ends_with(b"\r\n") {
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::BodyType;
    use crate::envelope::StoredRecipient;

    fn envelope(sender: &str, notify_flags: u8, ret: Ret) -> StoredEnvelope {
        StoredEnvelope {
            received_unix_s: 0,
            client_ip: "127.0.0.1".parse().unwrap(),
            smtputf8: false,
            body: BodyType::Unspecified,
            ret,
            size_declared_bytes: None,
            helo: vec![],
            sender: sender.as_bytes().to_vec(),
            envid: b"ENV42".to_vec(),
            recipients: vec![StoredRecipient {
                address: b"gone@remote.test".to_vec(),
                notify: notify_flags,
                orcpt: b"rfc822;gone@remote.test".to_vec(),
            }],
        }
    }

    #[test]
    fn never_bounces_the_null_sender_and_honours_notify() {
        assert!(!wants_failure_notice(&envelope("", 0, Ret::Unspecified), 0));
        assert!(wants_failure_notice(&envelope("a@x.test", 0, Ret::Unspecified), 0));
        assert!(wants_failure_notice(
            &envelope("a@x.test", notify::FAILURE | notify::DELAY, Ret::Unspecified),
            0
        ));
        assert!(!wants_failure_notice(
            &envelope("a@x.test", notify::SUCCESS, Ret::Unspecified),
            0
        ));
        assert!(!wants_failure_notice(
            &envelope("a@x.test", notify::NEVER, Ret::Unspecified),
            0
        ));
    }

    #[test]
    fn builds_a_multipart_report_with_headers_or_the_full_message() {
        let content = b"Subject: hello\r\nFrom: a@x.test\r\n\r\nsecret body\r\n";
        let ctx = BounceContext {
            hostname: "mx.test",
            original_id: "ID1",
            now_unix_s: 0,
            action: "failed",
        };
        let failed = [FailedRecipient {
            index: 0,
            diagnostic: "550 5.1.1 no such user".into(),
            class: Some("invalid-recipient"),
            remote_mta: Some("[192.0.2.1]:25".into()),
        }];
        let bounce = String::from_utf8(build_bounce(
            &ctx,
            &envelope("a@x.test", 0, Ret::Headers),
            content,
            &failed,
        ))
        .unwrap();
        assert!(bounce.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(bounce.contains("To: <a@x.test>\r\n"));
        assert!(bounce.contains("Original-Envelope-Id: ENV42\r\n"));
        assert!(bounce.contains("Final-Recipient: rfc822; gone@remote.test\r\nOriginal-Recipient: rfc822;gone@remote.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"));
        assert!(bounce
            .contains("Diagnostic-Code: smtp; 550 5.1.1 no such user\r\nX-Gannet-Bounce-Class: invalid-recipient\r\n"));
        assert!(bounce.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: hello\r\n"));
        assert!(!bounce.contains("secret body"), "RET=HDRS returns headers only");
        assert!(bounce.ends_with("--ID1/mx.test--\r\n"));
        assert!(!bounce.replace("\r\n", "").contains('\n'), "CRLF line endings only");
        let full = String::from_utf8(build_bounce(
            &ctx,
            &envelope("a@x.test", 0, Ret::Full),
            content,
            &failed,
        ))
        .unwrap();
        assert!(full
            .contains("Content-Type: message/rfc822\r\n\r\nSubject: hello\r\nFrom: a@x.test\r\n\r\nsecret body\r\n"));
    }

    #[test]
    fn delay_notices_follow_notify() {
        assert!(wants_delay_notice(&envelope("a@x.test", 0, Ret::Unspecified), 0));
        assert!(wants_delay_notice(
            &envelope("a@x.test", notify::DELAY, Ret::Unspecified),
            0
        ));
        assert!(!wants_delay_notice(
            &envelope("a@x.test", notify::FAILURE, Ret::Unspecified),
            0
        ));
        assert!(!wants_delay_notice(&envelope("", 0, Ret::Unspecified), 0));
        let ctx = BounceContext {
            hostname: "mx.test",
            original_id: "ID1",
            now_unix_s: 0,
            action: "delayed",
        };
        let failed = [FailedRecipient {
            index: 0,
            diagnostic: "451 4.3.0 try later".into(),
            remote_mta: None,
            class: None,
        }];
        let notice = String::from_utf8(build_bounce(
            &ctx,
            &envelope("a@x.test", 0, Ret::Full),
            b"Subject: s\r\n\r\nbody\r\n",
            &failed,
        ))
        .unwrap();
        assert!(notice.contains("Subject: Delayed Mail (still being retried)"));
        assert!(notice.contains("Action: delayed\r\nStatus: 4.3.0\r\n"));
    }

    #[test]
    fn status_comes_from_the_reply_or_its_class() {
        assert_eq!(status_of("550 5.7.1 relay denied"), "5.7.1");
        assert_eq!(status_of("554 transaction failed"), "5.0.0");
        assert_eq!(status_of("421 connect to x: refused"), "4.0.0");
    }
}
