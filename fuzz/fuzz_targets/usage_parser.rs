//! The gateway's usage parser on a response body the upstream (or anything in between) chose:
//! never a panic, and the same usage, model and end whatever the chunk boundaries.
#![no_main]

use berth_gateway::UsageParser;
use libfuzzer_sys::fuzz_target;

fn parse(sse: bool, chunks: &[&[u8]]) -> (berth_gateway::Usage, Option<String>, bool) {
    let mut p = UsageParser::new(sse);
    for c in chunks {
        p.feed(c);
    }
    (p.usage(), p.model(), p.finished())
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, body)) = data.split_first() else {
        return;
    };
    let sse = ctl & 1 == 1;
    let whole = parse(sse, &[body]);
    // Split where the control byte says, and into single bytes.
    let step = usize::from(ctl >> 1).max(1);
    let split: Vec<&[u8]> = body.chunks(step).collect();
    assert_eq!(whole, parse(sse, &split), "chunks of {step}");
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(whole, parse(sse, &bytes), "single bytes");
});
