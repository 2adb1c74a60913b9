//! Byte-level protocol behaviour of the real server: pipelining, CHUNKING, SMTP smuggling, error
//! replies. These send exact byte sequences, which off-the-shelf clients cannot be made to send.

mod common;

use common::{queued_id, without_received, Gannet, Raw, Setup};

#[test]
fn pipelined_commands_in_one_write_are_answered_in_order_in_one_write() {
    let g = Gannet::start(&Setup::new());
    let mut c = Raw::connect(g.mx());
    assert!(c.reply().unwrap().starts_with("220 mx.test ESMTP"));
    c.send(b"EHLO p.test\r\nMAIL FROM:<a@p.test>\r\nRCPT TO:<b@remote.test>\r\nRCPT TO:<c@remote.test>\r\nDATA\r\n");
    let ehlo = c.reply().unwrap();
    for ext in [
        "PIPELINING",
        "SIZE 1048576",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "DSN",
    ] {
        assert!(ehlo.contains(ext), "{ext} missing from {ehlo}");
    }
    assert_eq!(c.reply().unwrap(), "250 2.1.0 Sender ok\r\n");
    assert_eq!(c.reply().unwrap(), "250 2.1.5 Recipient ok\r\n");
    assert_eq!(c.reply().unwrap(), "250 2.1.5 Recipient ok\r\n");
    assert_eq!(c.reply().unwrap(), "354 End data with <CR><LF>.<CR><LF>\r\n");
    // The message, its end, and the next transaction, all in one write.
    c.send(b"Subject: one\r\n\r\nbody\r\n.\r\nMAIL FROM:<a@p.test>\r\nRCPT TO:<d@remote.test>\r\nDATA\r\n");
    let first = c.reply().unwrap();
    let id1 = queued_id(&first).expect(&first);
    assert_eq!(c.reply().unwrap(), "250 2.1.0 Sender ok\r\n");
    assert_eq!(c.reply().unwrap(), "250 2.1.5 Recipient ok\r\n");
    assert!(c.reply().unwrap().starts_with("354 "));
    c.send(b"Subject: two\r\n\r\n.\r\nQUIT\r\n");
    let id2 = queued_id(&c.reply().unwrap()).unwrap();
    assert_eq!(c.reply().unwrap(), "221 2.0.0 Bye\r\n");
    assert!(c.closed());
    assert_ne!(id1, id2);
    assert_eq!(without_received(&g.stored(&id1)), b"Subject: one\r\n\r\nbody\r\n");
    assert_eq!(without_received(&g.stored(&id2)), b"Subject: two\r\n\r\n");
}

#[test]
fn bdat_chunks_build_one_message_byte_exactly() {
    let g = Gannet::start(&Setup::new());
    let mut c = Raw::connect(g.mx());
    c.hello();
    c.cmd("MAIL FROM:<a@p.test> BODY=8BITMIME");
    c.cmd("RCPT TO:<b@remote.test>");
    // Chunk content is raw: a line of only a dot is content, not an end marker.
    let part1 = b"Subject: chunks\r\n\r\n.\r\n";
    let part2 = b"..not stuffed\r\n\xc3\xa9\r\n";
    c.send(format!("BDAT {}\r\n", part1.len()).as_bytes());
    c.send(part1);
    assert_eq!(
        c.reply().unwrap(),
        format!("250 2.0.0 {} octets received\r\n", part1.len())
    );
    // Pipelined: the last chunk and a NOOP in one write.
    let mut wire = format!("BDAT {} LAST\r\n", part2.len()).into_bytes();
    wire.extend_from_slice(part2);
    wire.extend_from_slice(b"NOOP\r\n");
    c.send(&wire);
    let id = queued_id(&c.reply().unwrap()).unwrap();
    assert_eq!(c.reply().unwrap(), "250 2.0.0 Ok\r\n");
    let mut expected = part1.to_vec();
    expected.extend_from_slice(part2);
    assert_eq!(without_received(&g.stored(&id)), &expected[..]);
    // BDAT 0 LAST ends a message whose content came in earlier chunks.
    c.cmd("MAIL FROM:<a@p.test>");
    c.cmd("RCPT TO:<b@remote.test>");
    c.send(b"BDAT 5\r\nhello");
    assert!(c.reply().unwrap().starts_with("250 2.0.0 5 octets"));
    let id = queued_id(&c.cmd("BDAT 0 LAST")).unwrap();
    assert_eq!(without_received(&g.stored(&id)), b"hello");
}

#[test]
fn bdat_out_of_sequence_is_refused_and_its_bytes_skipped() {
    let g = Gannet::start(&Setup::new());
    let mut c = Raw::connect(g.mx());
    c.hello();
    // The chunk's bytes look like commands; they must be skipped, not run.
    c.send(b"BDAT 17\r\nRCPT TO:<x@y.z>\r\nNOOP\r\n");
    assert_eq!(
        c.reply().unwrap(),
        "503 5.5.1 Need MAIL and RCPT before DATA or BDAT\r\n"
    );
    assert_eq!(c.reply().unwrap(), "250 2.0.0 Ok\r\n");
    // A chunk size we cannot parse leaves no way to find the next command: 501, then 421.
    c.send(b"BDAT lots\r\n");
    assert_eq!(c.reply().unwrap(), "501 5.5.4 Syntax: BDAT <size> [LAST]\r\n");
    assert!(c.reply().unwrap().starts_with("421 4.5.0 "));
    assert!(c.closed());
    assert!(g.queued_ids().is_empty());
}

/// The SMTP smuggling sequences (CVE-2023-51764 and kin): each must neither end the message early
/// nor be accepted; the server refuses the message with 550 5.5.2 and stays usable.
#[test]
fn smuggling_sequences_are_refused_and_nothing_is_spooled() {
    let g = Gannet::start(&Setup::new());
    for (name, evil) in [
        ("LF.LF", &b"\n.\n"[..]),
        ("LF.CRLF", b"\n.\r\n"),
        ("CRLF.LF", b"\r\n.\n"),
        ("CR.CR", b"\r.\r"),
    ] {
        let mut c = Raw::connect(g.mx());
        c.hello();
        c.cmd("MAIL FROM:<a@p.test>");
        c.cmd("RCPT TO:<b@remote.test>");
        assert!(c.cmd("DATA").starts_with("354 "));
        let mut wire = b"Subject: first\r\n\r\nhello".to_vec();
        wire.extend_from_slice(evil);
        wire.extend_from_slice(
            b"MAIL FROM:<evil@p.test>\r\nRCPT TO:<victim@remote.test>\r\nDATA\r\nSubject: smuggled\r\n\r\n.\r\n",
        );
        c.send(&wire);
        let reply = c.reply().unwrap();
        assert_eq!(
            reply, "550 5.5.2 Message contains a bare CR or LF; end every line with CRLF\r\n",
            "{name}: one reply for the one message"
        );
        assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok\r\n", "{name}: the session stays usable");
    }
    assert!(g.queued_ids().is_empty());
}

#[test]
fn normalize_policy_stores_bare_line_endings_as_crlf() {
    let mut setup = Setup::new();
    setup.set("smtp", "bare_line_endings", "\"normalize\"");
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    c.hello();
    c.cmd("MAIL FROM:<a@p.test>");
    c.cmd("RCPT TO:<b@remote.test>");
    c.cmd("DATA");
    c.send(b"Subject: legacy\n\nbare lf\n.\nstill content\r\n.\r\n");
    let id = queued_id(&c.reply().unwrap()).unwrap();
    assert_eq!(
        without_received(&g.stored(&id)),
        b"Subject: legacy\r\n\r\nbare lf\r\n.\r\nstill content\r\n"
    );
}

#[test]
fn error_replies_carry_the_right_codes() {
    // Many errors in one session: without the tarpit (tested in limits.rs) the test stays quick.
    let mut setup = Setup::new();
    setup.set("limits", "tarpit_delay", "\"0s\"");
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    c.reply().unwrap();
    assert_eq!(c.cmd("MAIL FROM:<a@p.test>"), "503 5.5.1 Send HELO or EHLO first\r\n");
    assert_eq!(
        c.cmd("HELO"),
        "501 5.5.4 HELO and EHLO need a domain or address literal\r\n"
    );
    assert_eq!(c.cmd("HELO p.test"), "250 mx.test\r\n");
    assert_eq!(c.cmd("XYZZY"), "500 5.5.2 Command not recognized\r\n");
    assert_eq!(c.cmd("EXPN staff"), "502 5.5.1 Command not implemented\r\n");
    assert_eq!(c.cmd("RCPT TO:<b@remote.test>"), "503 5.5.1 Need MAIL before RCPT\r\n");
    assert_eq!(
        c.cmd("MAIL FROM:a@p.test"),
        "501 5.1.7 Address must be enclosed in <>\r\n"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<a@p.test> FOO=BAR"),
        "555 5.5.4 Parameter not recognized\r\n"
    );
    assert_eq!(c.cmd("MAIL FROM:<>"), "250 2.1.0 Sender ok\r\n");
    assert_eq!(c.cmd("RCPT TO:<b@[300.0.0.1]>"), "501 5.1.3 Bad address literal\r\n");
    assert_eq!(
        c.cmd("RCPT TO:<\"quoted local\"@[IPv6:::1]>"),
        "250 2.1.5 Recipient ok\r\n"
    );
    assert_eq!(
        c.cmd("RCPT TO:<@hop.test:routed@remote.test>"),
        "250 2.1.5 Recipient ok\r\n"
    );
    assert_eq!(c.cmd("DATA extra"), "501 5.5.4 This command takes no arguments\r\n");
    assert_eq!(
        c.cmd("VRFY someone"),
        "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n"
    );
    assert!(c.cmd("HELP").starts_with("214 2.0.0 "));
    assert_eq!(c.cmd("RSET"), "250 2.0.0 Reset ok\r\n");
    assert_eq!(c.cmd("DATA"), "503 5.5.1 Need MAIL and RCPT before DATA or BDAT\r\n");
    c.send(b"NOOP\n");
    assert!(c
        .reply()
        .unwrap()
        .starts_with("500 5.5.2 Command line ends in a bare LF"));
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 Bye\r\n");
}

#[test]
fn an_overlong_line_is_answered_once_and_discarded_unbuffered() {
    let mut setup = Setup::new();
    setup.set("limits", "line_length_max", "512");
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    c.hello();
    // 1 MiB without a line end: answered once, then thrown away as it streams in.
    c.send(b"NOOP ");
    c.send(&vec![b'x'; 1 << 20]);
    c.send(b"\r\nNOOP\r\n");
    assert_eq!(c.reply().unwrap(), "500 5.5.2 Line too long\r\n");
    assert_eq!(c.reply().unwrap(), "250 2.0.0 Ok\r\n");
    // Exactly at the limit (CRLF included) is fine; one byte more is not.
    let at_limit = format!("NOOP {}", "y".repeat(512 - 7));
    assert_eq!(c.cmd(&at_limit), "250 2.0.0 Ok\r\n");
    let over = format!("NOOP {}", "y".repeat(512 - 6));
    assert_eq!(c.cmd(&over), "500 5.5.2 Line too long\r\n");
}

#[test]
fn too_many_errors_close_the_session() {
    let mut setup = Setup::new();
    setup.set("limits", "errors_max", "3");
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    c.hello();
    assert!(c.cmd("BOGUS").starts_with("500"));
    assert!(c.cmd("BOGUS").starts_with("500"));
    c.send(b"BOGUS\r\n");
    assert_eq!(c.reply().unwrap(), "500 5.5.2 Command not recognized\r\n");
    assert_eq!(c.reply().unwrap(), "421 4.7.0 Too many errors, closing connection\r\n");
    assert!(c.closed());
}

#[test]
fn received_header_records_the_client_and_protocol() {
    let g = Gannet::start(&Setup::new());
    let mut c = Raw::connect(g.mx());
    c.hello();
    c.cmd("MAIL FROM:<a@p.test>");
    c.cmd("RCPT TO:<only@remote.test>");
    c.cmd("DATA");
    let id = queued_id(&c.cmd("x\r\n.")).unwrap();
    let stored = String::from_utf8(g.stored(&id)).unwrap();
    assert!(
        stored.starts_with("Received: from client.test ([127.0.0.1])\r\n\tby mx.test (Gannet) with ESMTP\r\n\tfor <only@remote.test>;\r\n\t"),
        "{stored}"
    );
}
