//! The Claude driver on the CLI's stdout (stream-json lines; the agent in the box controls
//! them): never a panic, and the same events whatever the chunking of the stream.
#![no_main]

use berth_agent::{ClaudeDriver, ClaudeEnv};
use libfuzzer_sys::fuzz_target;

fn driver() -> ClaudeDriver {
    let spec: berth_api::ClaudeAgent =
        serde_json::from_value(serde_json::json!({})).expect("default claude agent");
    ClaudeDriver::new(
        &spec,
        ClaudeEnv {
            cli: "/usr/bin/claude".into(),
            base_url: "http://127.0.0.1:47100".into(),
            token: "t".into(),
            config_dir: "/workspace/.claude".into(),
            resume: None,
            proxy: None,
        },
        "/workspace",
    )
    .expect("driver")
}

fn events(chunks: &[&[u8]]) -> Vec<String> {
    let mut d = driver();
    let mut out = Vec::new();
    for c in chunks {
        let o = d.on_stdout(c);
        out.extend(o.events.iter().map(|e| format!("{} {}", e.kind, e.data)));
    }
    let _ = d.on_stderr(b"x\n");
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, body)) = data.split_first() else {
        return;
    };
    let whole = events(&[body]);
    let split: Vec<&[u8]> = body.chunks(usize::from(ctl).max(1)).collect();
    assert_eq!(whole, events(&split));
});
