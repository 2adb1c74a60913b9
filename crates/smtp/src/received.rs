//! The `Received:` trace header (RFC 5321 4.4) that Gannet prepends to every message it accepts.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc2822;
use time::OffsetDateTime;

/// Longest HELO name copied into the header; the rest is cut so a hostile client cannot make the
/// header longer than a line may be.
const HELO_BYTES_MAX: usize = 200;

/// The TLS a session runs over, as the header and the log record it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSummary {
    /// Such as "TLSv1.3".
    pub version: String,
    /// The IANA name, such as "TLS13_AES_256_GCM_SHA384".
    pub cipher: String,
}

/// The facts the header records.
pub struct Trace<'a> {
    pub helo: &'a [u8],
    pub client_ip: IpAddr,
    pub hostname: &'a str,
    /// "SMTP", "ESMTP", "ESMTPSA", "UTF8SMTPS" and so on (RFC 3848, RFC 6531).
    pub protocol: &'a str,
    pub tls: Option<&'a TlsSummary>,
    /// Named only when there is exactly one recipient, as Postfix does (privacy of Bcc).
    pub single_recipient: Option<&'a [u8]>,
    pub unix_time_s: u64,
}

/// Now, as seconds since the epoch.
pub fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Appends the folded header, ending in CRLF.
pub fn write_received(trace: &Trace<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"Received: from ");
    let helo = &trace.helo[..trace.helo.len().min(HELO_BYTES_MAX)];
    // The parser admits only printable bytes into HELO; anything else is replaced anyway so the
    // header can never carry a line break.
    out.extend(
        helo.iter()
            .map(|&b| if b.is_ascii_graphic() || b >= 0x80 { b } else { b'?' }),
    );
    out.extend_from_slice(b" ([");
    out.extend_from_slice(trace.client_ip.to_string().as_bytes());
    out.extend_from_slice(b"])\r\n\tby ");
    out.extend_from_slice(trace.hostname.as_bytes());
    out.extend_from_slice(b" (Gannet) with ");
    out.extend_from_slice(trace.protocol.as_bytes());
    if let Some(tls) = trace.tls {
        // Postfix's wording, which log and spam tools already parse.
        out.extend_from_slice(b"\r\n\t(using ");
        out.extend_from_slice(tls.version.as_bytes());
        out.extend_from_slice(b" with cipher ");
        out.extend_from_slice(tls.cipher.as_bytes());
        out.push(b')');
    }
    if let Some(rcpt) = trace.single_recipient {
        out.extend_from_slice(b"\r\n\tfor <");
        out.extend_from_slice(rcpt);
        out.push(b'>');
    }
    out.extend_from_slice(b";\r\n\t");
    let when = OffsetDateTime::from_unix_timestamp(trace.unix_time_s as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let date = when
        .format(&Rfc2822)
        .unwrap_or_else(|_| String::from("Thu, 01 Jan 1970 00:00:00 +0000"));
    out.extend_from_slice(date.as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_a_folded_header() {
        let mut out = Vec::new();
        write_received(
            &Trace {
                helo: b"client.example",
                client_ip: "192.0.2.7".parse().unwrap(),
                hostname: "mx.example",
                protocol: "ESMTP",
                tls: None,
                single_recipient: Some(b"a@b.example"),
                unix_time_s: 0,
            },
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Received: from client.example ([192.0.2.7])\r\n\tby mx.example (Gannet) with ESMTP\r\n\tfor <a@b.example>;\r\n\tThu, 01 Jan 1970 00:00:00 +0000\r\n"
        );
    }

    #[test]
    fn records_tls_version_and_cipher() {
        let tls = TlsSummary {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_256_GCM_SHA384".into(),
        };
        let mut out = Vec::new();
        write_received(
            &Trace {
                helo: b"c",
                client_ip: "192.0.2.7".parse().unwrap(),
                hostname: "mx.example",
                protocol: "ESMTPSA",
                tls: Some(&tls),
                single_recipient: None,
                unix_time_s: 0,
            },
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("with ESMTPSA\r\n\t(using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384);\r\n"),
            "{text}"
        );
    }
}
