//! The egress proxy's request head parser and chunked-body framing on bytes a box sends: never
//! a panic; a parsed head is consistent (its length within the input, rebuilt heads carry no
//! line break the box put in a value); the end of a chunked body does not depend on how the
//! bytes arrive.
#![no_main]

use berth_gateway::egress::{parse_head, ChunkedEnd, Secret};
use libfuzzer_sys::fuzz_target;

fn chunked(data: &[u8], step: usize) -> Result<Option<usize>, &'static str> {
    let mut c = ChunkedEnd::default();
    let mut used = 0;
    for part in data.chunks(step.max(1)) {
        used += c.advance(part)?;
        if c.done() {
            return Ok(Some(used));
        }
    }
    Ok(None)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(head)) = parse_head(data) {
        assert!(head.len <= data.len());
        // Incremental arrival finds the same head.
        for cut in [head.len / 2, head.len.saturating_sub(1)] {
            if let Ok(Some(h)) = parse_head(&data[..cut]) {
                assert!(h.len <= cut);
            }
        }
        let _ = head.framing();
        let _ = head.check_host("example.test");
        let secret = Secret {
            host: "example.test".into(),
            header: "x-api-token".into(),
            value: "v".into(),
            tls: false,
        };
        let out = head.rebuild("/", "example.test", Some(&secret));
        let lines: Vec<&str> = out.split("\r\n").collect();
        // One line per header the box sent at most, plus request line, Host, secret,
        // Connection, and the empty line(s) ending the head.
        assert!(lines.len() <= head.headers.len() + 6, "{out:?}");
        assert!(!out.contains('\n') || out.matches('\n').count() == out.matches("\r\n").count());
        // The secret's header is there once: the box's own copies are dropped.
        let named = lines
            .iter()
            .filter(|l| {
                l.split(':')
                    .next()
                    .is_some_and(|n| n.trim().eq_ignore_ascii_case("x-api-token"))
            })
            .count();
        assert_eq!(named, 1, "{out:?}");
    }
    let Some((&ctl, body)) = data.split_first() else {
        return;
    };
    let whole = chunked(body, body.len());
    let split = chunked(body, usize::from(ctl).max(1));
    match (whole, split) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        // An error may come later when the bytes come later, but never a different end.
        (Ok(None), Err(_)) | (Err(_), Ok(None)) => {}
        (a, b) => panic!("{a:?} vs {b:?}"),
    }
});
