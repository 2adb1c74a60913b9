//! The streaming DATA decoder (RFC 5321 4.5.2) and the BDAT line-ending checker (RFC 3030).
//!
//! The decoder removes dot-stuffing byte-exactly and ends only on `<CR><LF>.<CR><LF>`. A bare LF
//! or bare CR anywhere in the message is the raw material of SMTP smuggling (CVE-2023-51764 and
//! kin): a receiver that ends DATA on `<LF>.<LF>` would see a second message where we see one. The
//! decoder never ends on such a sequence and reports it, so the session can refuse the message
//! (the default) or store it normalised to CRLF.
//!
//! Decoded bytes leave through a callback in the largest contiguous spans possible: a run of
//! ordinary lines is handed over as one slice, so the copy into the spool buffer is one memcpy.

use memchr::memchr2;

const CR: u8 = b'\r';
const LF: u8 = b'\n';

/// What to do with a bare CR or bare LF in message content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareLineEndings {
    /// Refuse the message (550 5.5.2) once its end has been read. The default.
    Reject,
    /// Store the message with every bare CR or LF turned into CRLF. A dot after a normalised line
    /// end is kept as content (it cannot end the message).
    Normalize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// After CRLF (or at the very start): a '.' here is special.
    LineStart,
    /// Inside a line.
    Middle,
    /// Inside a line, right after a CR whose successor we have not seen yet.
    Cr,
    /// A line began with '.', which has been removed.
    Dot,
    /// A line began with ".\r": one LF away from the end.
    DotCr,
}

/// Outcome of feeding bytes to the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Bytes of the input consumed.
    pub consumed: usize,
    /// True when `<CR><LF>.<CR><LF>` was found; `consumed` includes it.
    pub end: bool,
}

/// Streaming DATA decoder. Feed it the bytes that follow the 354 reply, in any split.
#[derive(Debug, Clone)]
pub struct DataDecoder {
    state: State,
    policy: BareLineEndings,
    bare_line_ending_seen: bool,
}

impl DataDecoder {
    pub fn new(policy: BareLineEndings) -> DataDecoder {
        DataDecoder {
            state: State::LineStart,
            policy,
            bare_line_ending_seen: false,
        }
    }

    /// Whether a bare CR or LF has been seen so far in this message.
    pub fn bare_line_ending_seen(&self) -> bool {
        self.bare_line_ending_seen
    }

    fn bare(&mut self, emit: &mut impl FnMut(&[u8]), original: &'static [u8]) {
        self.bare_line_ending_seen = true;
        match self.policy {
            BareLineEndings::Reject => emit(original),
            BareLineEndings::Normalize => emit(b"\r\n"),
        }
    }

    /// Decodes as much of `input` as possible, handing content to `emit`. Stops right after the
    /// end-of-data sequence, leaving any pipelined commands after it unconsumed.
    pub fn decode(&mut self, input: &[u8], mut emit: impl FnMut(&[u8])) -> Decoded {
        let len = input.len();
        let mut i = 0;
        while i < len {
            match self.state {
                State::LineStart => {
                    if input[i] == b'.' {
                        i += 1;
                        self.state = State::Dot;
                    } else {
                        self.state = State::Middle;
                    }
                }
                State::Dot => {
                    if input[i] == CR {
                        i += 1;
                        self.state = State::DotCr;
                    } else {
                        // The leading dot is deleted (RFC 5321 4.5.2); the byte is ordinary content.
                        self.state = State::Middle;
                    }
                }
                State::DotCr => {
                    if input[i] == LF {
                        self.state = State::LineStart;
                        return Decoded {
                            consumed: i + 1,
                            end: true,
                        };
                    }
                    self.bare(&mut emit, b"\r");
                    self.state = State::Middle;
                }
                State::Cr => {
                    if input[i] == LF {
                        emit(b"\r\n");
                        i += 1;
                        self.state = State::LineStart;
                    } else {
                        self.bare(&mut emit, b"\r");
                        self.state = State::Middle;
                    }
                }
                State::Middle => i = self.scan_middle(input, i, &mut emit),
            }
        }
        Decoded {
            consumed: len,
            end: false,
        }
    }

    /// Copies ordinary lines in one span until something needs a state change; returns the new
    /// position. Lines that end in CRLF and are not followed by '.' stay inside the span.
    fn scan_middle(&mut self, input: &[u8], start: usize, emit: &mut impl FnMut(&[u8])) -> usize {
        let len = input.len();
        let mut i = start;
        loop {
            let Some(k) = memchr2(CR, LF, &input[i..]) else {
                emit(&input[start..]);
                return len;
            };
            let p = i + k;
            if input[p] == LF {
                emit(&input[start..p]);
                self.bare(emit, b"\n");
                return p + 1;
            }
            // input[p] == CR
            match input.get(p + 1) {
                None => {
                    emit(&input[start..p]);
                    self.state = State::Cr;
                    return p + 1;
                }
                Some(&LF) => match input.get(p + 2) {
                    Some(&b'.') => {
                        emit(&input[start..p + 2]);
                        self.state = State::Dot;
                        return p + 3;
                    }
                    Some(_) => i = p + 2,
                    None => {
                        emit(&input[start..p + 2]);
                        self.state = State::LineStart;
                        return p + 2;
                    }
                },
                Some(_) => {
                    emit(&input[start..p]);
                    self.bare(emit, b"\r");
                    return p + 1;
                }
            }
        }
    }
}

/// Checks BDAT content for bare CR and LF across chunk boundaries. BDAT has no dot-stuffing and no
/// end marker, but a bare line ending stored now would be relayed later inside DATA, so the same
/// policy applies.
#[derive(Debug, Clone, Default)]
pub struct BareLineEndingScanner {
    /// The previous chunk ended in a CR whose successor is not known yet.
    pending_cr: bool,
    seen: bool,
}

impl BareLineEndingScanner {
    pub fn seen(&self) -> bool {
        self.seen
    }

    /// Passes `input` through to `emit`, normalising when asked, and records bare line endings.
    pub fn scan(&mut self, input: &[u8], policy: BareLineEndings, mut emit: impl FnMut(&[u8])) {
        let mut start = 0;
        let mut i = 0;
        if self.pending_cr && !input.is_empty() {
            self.pending_cr = false;
            if input[0] == LF {
                emit(b"\r\n");
                start = 1;
                i = 1;
            } else {
                self.seen = true;
                emit(if policy == BareLineEndings::Normalize {
                    b"\r\n"
                } else {
                    b"\r"
                });
            }
        }
        while let Some(k) = memchr2(CR, LF, &input[i..]) {
            let p = i + k;
            if input[p] == CR && p + 1 == input.len() {
                emit(&input[start..p]);
                self.pending_cr = true;
                return;
            }
            if input[p] == CR && input[p + 1] == LF {
                i = p + 2;
                continue;
            }
            self.seen = true;
            if policy == BareLineEndings::Normalize {
                emit(&input[start..p]);
                emit(b"\r\n");
                start = p + 1;
            }
            i = p + 1;
        }
        emit(&input[start..]);
    }

    /// Call after the last chunk: a final lone CR is bare.
    pub fn finish(&mut self, policy: BareLineEndings, mut emit: impl FnMut(&[u8])) {
        if self.pending_cr {
            self.pending_cr = false;
            self.seen = true;
            emit(if policy == BareLineEndings::Normalize {
                b"\r\n"
            } else {
                b"\r"
            });
        }
    }
}

/// Dot-stuffs `content` for transmission and appends the end-of-data marker. `content` must use
/// CRLF line endings; a final line without CRLF gets one. Used by the outbound client and tests.
///
/// Runs of lines are copied in bulk: memchr finds each `\n.`, and only a dot that starts a line
/// (after CRLF, or at the very start) gets its extra dot.
pub fn dot_stuff(content: &[u8], out: &mut Vec<u8>) {
    out.reserve(content.len() + content.len() / 64 + 5);
    let mut start = 0;
    if content.first() == Some(&b'.') {
        out.push(b'.');
    }
    for at in memchr::memmem::find_iter(content, b"\n.") {
        if at > 0 && content[at - 1] == CR {
            out.extend_from_slice(&content[start..=at]);
            out.push(b'.');
            start = at + 1;
        }
    }
    out.extend_from_slice(&content[start..]);
    if !content.is_empty() && !content.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(input: &[u8], policy: BareLineEndings, split: usize) -> (Vec<u8>, Option<usize>, bool) {
        let mut decoder = DataDecoder::new(policy);
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < input.len() {
            let end = (pos + split.max(1)).min(input.len());
            let d = decoder.decode(&input[pos..end], |s| out.extend_from_slice(s));
            if d.end {
                return (out, Some(pos + d.consumed), decoder.bare_line_ending_seen());
            }
            assert_eq!(d.consumed, end - pos);
            pos = end;
        }
        (out, None, decoder.bare_line_ending_seen())
    }

    #[test]
    fn removes_dot_stuffing_and_stops_at_the_end_marker() {
        let input = b"Subject: x\r\n\r\n..leading dot\r\n.single\r\nline\r\n.\r\nRSET\r\n";
        for split in [1, 2, 3, 7, 1000] {
            let (out, end, bare) = decode_all(input, BareLineEndings::Reject, split);
            assert_eq!(out, b"Subject: x\r\n\r\n.leading dot\r\nsingle\r\nline\r\n");
            assert_eq!(end, Some(input.len() - b"RSET\r\n".len()));
            assert!(!bare);
        }
    }

    #[test]
    fn empty_message_ends_at_once() {
        assert_eq!(
            decode_all(b".\r\n", BareLineEndings::Reject, 10),
            (vec![], Some(3), false)
        );
    }

    #[test]
    fn smuggling_sequences_never_end_the_message() {
        for evil in [&b"a\n.\nb"[..], b"a\n.\r\nb", b"a\r\n.\nb", b"a\r.\rb", b"a\r.\r\nb"] {
            let mut input = evil.to_vec();
            input.extend_from_slice(b"\r\n.\r\n");
            for split in [1, 2, 5, 100] {
                let (_, end, bare) = decode_all(&input, BareLineEndings::Reject, split);
                assert_eq!(end, Some(input.len()), "{evil:?} split {split}");
                assert!(bare, "{evil:?} not flagged");
            }
        }
    }

    #[test]
    fn normalize_turns_bare_endings_into_crlf() {
        let (out, end, bare) = decode_all(b"a\nb\rc\r\n.\r\n", BareLineEndings::Normalize, 1);
        assert_eq!(out, b"a\r\nb\r\nc\r\n");
        assert_eq!(end, Some(10));
        assert!(bare);
        let (out, _, _) = decode_all(b"x\n.\r\n.\r\n", BareLineEndings::Normalize, 3);
        assert_eq!(out, b"x\r\n.\r\n", "a dot after a bare LF is content, not the end");
    }

    #[test]
    fn bdat_scanner_finds_bare_endings_across_chunks() {
        let mut s = BareLineEndingScanner::default();
        let mut out = Vec::new();
        s.scan(b"ab\r", BareLineEndings::Reject, |b| out.extend_from_slice(b));
        s.scan(b"\ncd\r\n", BareLineEndings::Reject, |b| out.extend_from_slice(b));
        s.finish(BareLineEndings::Reject, |b| out.extend_from_slice(b));
        assert!(!s.seen());
        assert_eq!(out, b"ab\r\ncd\r\n");
        for bad in [&b"a\nb"[..], b"a\rb", b"a\r"] {
            let mut s = BareLineEndingScanner::default();
            let mut out = Vec::new();
            s.scan(bad, BareLineEndings::Normalize, |b| out.extend_from_slice(b));
            s.finish(BareLineEndings::Normalize, |b| out.extend_from_slice(b));
            assert!(s.seen(), "{bad:?}");
            assert!(!out
                .iter()
                .enumerate()
                .any(|(i, &b)| b == b'\n' && (i == 0 || out[i - 1] != b'\r')));
        }
    }

    /// Content that a client could send: CRLF line endings only.
    fn crlf_content() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            proptest::collection::vec(
                prop_oneof![
                    Just(b'.'),
                    Just(b'a'),
                    Just(b' '),
                    Just(0u8),
                    Just(0xffu8),
                    any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n')
                ],
                0..40,
            ),
            0..30,
        )
        .prop_map(|lines| {
            let mut out = Vec::new();
            for line in lines {
                out.extend_from_slice(&line);
                out.extend_from_slice(b"\r\n");
            }
            out
        })
    }

    proptest! {
        #[test]
        fn stuff_then_unstuff_round_trips(content in crlf_content(), split in 1usize..64) {
            let mut wire = Vec::new();
            dot_stuff(&content, &mut wire);
            wire.extend_from_slice(b"NEXT");
            let (out, end, bare) = decode_all(&wire, BareLineEndings::Reject, split);
            prop_assert_eq!(out, content);
            prop_assert_eq!(end, Some(wire.len() - 4));
            prop_assert!(!bare);
        }

        /// Any byte stream, bare CRs and LFs included, comes back byte for byte through
        /// stuff -> unstuff (plus the CRLF the stuffer adds to an unterminated last line), and the
        /// decoder flags a bare line ending exactly when the content has one.
        #[test]
        fn any_byte_stream_round_trips(content in proptest::collection::vec(
            prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), any::<u8>()], 0..400), split in 1usize..64) {
            let mut wire = Vec::new();
            dot_stuff(&content, &mut wire);
            let (out, end, bare) = decode_all(&wire, BareLineEndings::Reject, split);
            let mut expected = content.clone();
            if !content.is_empty() && !content.ends_with(b"\r\n") {
                expected.extend_from_slice(b"\r\n");
            }
            prop_assert_eq!(&out, &expected);
            prop_assert_eq!(end, Some(wire.len()));
            let has_bare = expected.iter().enumerate().any(|(i, &b)| {
                (b == b'\n' && (i == 0 || expected[i - 1] != b'\r'))
                    || (b == b'\r' && expected.get(i + 1) != Some(&b'\n'))
            });
            prop_assert_eq!(bare, has_bare);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_never_end_early(bytes in proptest::collection::vec(any::<u8>(), 0..300), split in 1usize..16) {
            // Whatever comes in, the decoder ends exactly at the first CRLF.CRLF that follows a
            // line start, or consumes everything.
            let (_, end, _) = decode_all(&bytes, BareLineEndings::Reject, split);
            if let Some(end) = end {
                prop_assert!(bytes[..end].ends_with(b".\r\n"));
                prop_assert!(end == 3 || bytes[..end].ends_with(b"\r\n.\r\n"));
            }
        }
    }
}
