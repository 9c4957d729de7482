//! The supervisor wire protocol on bytes either side may send: reading frames never panics,
//! never allocates past the frame limit, and what it reads writes back to the same bytes.
#![no_main]

use berth_sandbox::native::protocol::{read_frame, write_frame, ExecRequest, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let mut consumed = Vec::new();
    while let Ok((kind, payload)) = read_frame(&mut r) {
        assert!(payload.len() <= MAX_FRAME);
        let mut again = Vec::new();
        write_frame(&mut again, kind, &payload).expect("write to a Vec");
        consumed.extend_from_slice(&again);
        // A request's JSON is parsed by the supervisor: it must fail cleanly, never panic.
        let _ = serde_json::from_slice::<ExecRequest>(&payload);
    }
    assert!(data.starts_with(&consumed), "frames did not round-trip");
});
