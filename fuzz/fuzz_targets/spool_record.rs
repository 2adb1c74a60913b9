//! Recovery on arbitrary segment bytes (a damaged disk, a torn write): the scan never panics,
//! and its offsets stay inside the segment. The record decoders (message, copy, state and
//! deferral batches) are also fed the bytes directly.
#![no_main]

use gannet_spool::record::{
    decode_deferrals, decode_message, decode_state_batch, split_message, split_message_payload, Kind,
};
use gannet_spool::recovery::scan_segment;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_message(data);
    if let Ok(parts) = split_message(data) {
        assert!(parts.relayed_bytes() + parts.envelope.len() <= data.len());
    }
    let _ = decode_state_batch(data);
    let _ = decode_deferrals(data);
    if let Ok((_, message)) = split_message_payload(Kind::Copy as u8, data) {
        assert!(message.len() <= data.len());
        let _ = decode_message(message);
    }
    let scan = scan_segment(data, 0, 1);
    assert!(scan.end_offset <= data.len() as u64);
    let _ = scan.messages.len() + scan.outcomes.len() + scan.tombstones.len() + scan.damage.len();
});
