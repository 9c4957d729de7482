//! `berth usage`: the usage report as a table or JSON.

use crate::client::Client;
use anyhow::Result;
use berth_api::*;

/// The usage report as a table: tokens and model cost metered by the gateway, container time.
pub(crate) async fn usage(
    c: &Client,
    by: &str,
    from: Option<String>,
    to: Option<String>,
    json: bool,
) -> Result<()> {
    let mut q = vec![("group_by", by)];
    for (k, v) in [("from", &from), ("to", &to)] {
        if let Some(v) = v {
            q.push((k, v.as_str()));
        }
    }
    let r = c.usage(&q).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{:<24} {:>6} {:>10} {:>9} {:>11} {:>10} {:>10} {:>9} {:>9} {:>9}",
        by.to_uppercase(),
        "REQS",
        "INPUT",
        "OUTPUT",
        "CACHE_WRITE",
        "CACHE_READ",
        "MODEL_USD",
        "BOX_HOURS",
        "BOX_USD",
        "TOTAL_USD"
    );
    let row = |key: &str, u: &UsageTotals| {
        println!(
            "{:<24} {:>6} {:>10} {:>9} {:>11} {:>10} {:>10.4} {:>9.3} {:>9.4} {:>9.4}",
            key,
            u.requests,
            u.input_tokens,
            u.output_tokens,
            u.cache_creation_5m_tokens + u.cache_creation_1h_tokens,
            u.cache_read_tokens,
            u.model_usd,
            u.container_hours,
            u.container_usd,
            u.total_usd
        )
    };
    for g in &r.groups {
        row(&g.key, &g.usage);
    }
    // By session or model, box time belongs to no row (a box serves several sessions and
    // models): show it as a row of its own, so that the rows add up to the total.
    let hours: f64 = r.groups.iter().map(|g| g.usage.container_hours).sum();
    let usd: f64 = r.groups.iter().map(|g| g.usage.container_usd).sum();
    if r.total.container_hours - hours > 1e-9 || r.total.container_usd - usd > 1e-9 {
        let box_time = UsageTotals {
            container_hours: r.total.container_hours - hours,
            container_usd: r.total.container_usd - usd,
            total_usd: r.total.container_usd - usd,
            ..Default::default()
        };
        row("(box time)", &box_time);
    }
    row("TOTAL", &r.total);
    Ok(())
}
