//! The DATA decoder. Two properties on every input:
//! - round trip: dot-stuffing the input and decoding it (in an arbitrary split) gives the input
//!   back (plus a final CRLF when it lacked one), ending exactly at the end marker;
//! - on raw input, decoding never panics and ends only at a line-start `.` CRLF.
#![no_main]

use gannet_smtp::data::{dot_stuff, BareLineEndings, DataDecoder};
use libfuzzer_sys::fuzz_target;

fn decode_all(input: &[u8], split: usize) -> (Vec<u8>, Option<usize>) {
    let mut decoder = DataDecoder::new(BareLineEndings::Reject);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < input.len() {
        let end = (pos + split).min(input.len());
        let d = decoder.decode(&input[pos..end], |s| out.extend_from_slice(s));
        if d.end {
            return (out, Some(pos + d.consumed));
        }
        assert_eq!(d.consumed, end - pos, "without the end marker everything is consumed");
        pos = end;
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, content)) = data.split_first() else {
        return;
    };
    let split = usize::from(first) % 61 + 1;

    let mut wire = Vec::new();
    dot_stuff(content, &mut wire);
    let (decoded, end) = decode_all(&wire, split);
    let mut expected = content.to_vec();
    if !content.is_empty() && !content.ends_with(b"\r\n") {
        expected.extend_from_slice(b"\r\n");
    }
    assert_eq!(decoded, expected);
    assert_eq!(end, Some(wire.len()));

    let (_, end) = decode_all(content, split);
    if let Some(end) = end {
        assert!(content[..end].ends_with(b".\r\n"));
        assert!(end == 3 || content[..end].ends_with(b"\r\n.\r\n"));
    }
});
