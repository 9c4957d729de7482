//! `berth-bench check`: the performance promises of SPECIFICATION.md that short runs can
//! check, as ratios against a peer measured in the same run. A ratio over its ceiling plus the
//! noise margin fails the check (non-zero exit).

use crate::{ms, summarize};

/// One promise: `ours / peer` (medians) stays at or under `ceiling`; the check fails only
/// past `ceiling + margin`, the run-to-run noise of a short run on a busy machine.
struct Promise {
    name: &'static str,
    ceiling: f64,
    margin: f64,
}

const POOL_VS_PRESTARTED: Promise = Promise {
    name: "pool take / CLI pre-started by hand (first message → first model request)",
    ceiling: 2.0,
    margin: 0.5,
};

const POOL_VS_COLD: Promise = Promise {
    name: "pool take / cold session start (POST → first model request)",
    ceiling: 0.6,
    margin: 0.2,
};

/// Quiet, berth's own part (30–50 ms, debug) on a ~0.5 s CLI start is about 1.1×; under load
/// the start boost puts the session below by hand (0.34–0.65× in session 9's runs). The wide
/// margin is a 3-round median's spread at load 11 (SPECIFICATION.md).
const SESSION_START: Promise = Promise {
    name: "session start / CLI by hand (start → first model request)",
    ceiling: 1.2,
    margin: 0.3,
};

pub async fn run(runs: usize) -> anyhow::Result<()> {
    let s = crate::pools::measure(runs).await?;
    let hand = summarize("by hand", s.by_hand).median.as_secs_f64();
    let pool = summarize("pool", s.pool).median.as_secs_f64();
    let cold = summarize("cold", s.cold).median.as_secs_f64();
    println!(
        "host load (1-min loadavg) {:.2} → {:.2}; medians: pre-started CLI {} ms, pool take {} ms, cold {} ms",
        s.load.0,
        s.load.1,
        ms(std::time::Duration::from_secs_f64(hand)),
        ms(std::time::Duration::from_secs_f64(pool)),
        ms(std::time::Duration::from_secs_f64(cold)),
    );
    let st = crate::start::measure(
        runs,
        0,
        &[crate::start::Row::ByHand, crate::start::Row::BoxBoost],
    )
    .await?;
    let by_hand = summarize("by hand", st.walls(crate::start::Row::ByHand))
        .median
        .as_secs_f64();
    let session = summarize("session", st.walls(crate::start::Row::BoxBoost))
        .median
        .as_secs_f64();
    println!(
        "host load {:.2} → {:.2}; medians: CLI by hand {} ms, session start {} ms",
        st.load.0,
        st.load.1,
        ms(std::time::Duration::from_secs_f64(by_hand)),
        ms(std::time::Duration::from_secs_f64(session)),
    );
    let mut broken = Vec::new();
    for (p, ratio) in [
        (POOL_VS_PRESTARTED, pool / hand.max(1e-6)),
        (POOL_VS_COLD, pool / cold.max(1e-6)),
        (SESSION_START, session / by_hand.max(1e-6)),
    ] {
        let ok = ratio <= p.ceiling + p.margin;
        println!(
            "{} {}: {ratio:.2} (ceiling {:.2}, margin {:.2})",
            if ok { "ok  " } else { "FAIL" },
            p.name,
            p.ceiling,
            p.margin
        );
        if !ok {
            broken.push(p.name);
        }
    }
    anyhow::ensure!(broken.is_empty(), "promises broken: {}", broken.join("; "));
    Ok(())
}
