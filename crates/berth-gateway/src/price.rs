//! Model prices, USD per million tokens, for budgets and the ledger. Families match by
//! substring of the model id (`claude-opus-…`, `claude-sonnet-…`, `claude-haiku-…`), a more
//! specific entry first where a model is priced apart from its family; cache writes cost
//! 1.25× (5 minutes) or 2× (1 hour) the input price, cache reads 0.1×.
//!
//! The entries agree with what the pinned Claude Code CLI (2.1.328) reports for the same
//! usage, so a run against the mock model (which answers with the model it was asked for)
//! shows no gap between the agent's figure and the metered one.

use crate::Usage;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Price {
    pub input: f64,
    pub output: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceTable {
    /// (substring of the model id, price), first match wins.
    pub models: Vec<(String, Price)>,
    /// For models no entry matches.
    pub fallback: Price,
}

impl Default for PriceTable {
    fn default() -> Self {
        PriceTable {
            models: vec![
                // Claude Code 2.1.328's default model; it prices it at $4/$20.
                (
                    "opus-5-5".into(),
                    Price {
                        input: 4.0,
                        output: 20.0,
                    },
                ),
                (
                    "opus".into(),
                    Price {
                        input: 5.0,
                        output: 25.0,
                    },
                ),
                (
                    "sonnet".into(),
                    Price {
                        input: 3.0,
                        output: 15.0,
                    },
                ),
                (
                    "haiku".into(),
                    Price {
                        input: 1.0,
                        output: 5.0,
                    },
                ),
            ],
            fallback: Price {
                input: 5.0,
                output: 25.0,
            },
        }
    }
}

impl PriceTable {
    /// The default table with `overrides` (substring, price) taking precedence, in order.
    pub fn with_overrides(overrides: Vec<(String, Price)>) -> PriceTable {
        let mut t = PriceTable::default();
        let mut models: Vec<(String, Price)> = overrides
            .into_iter()
            .map(|(k, p)| (k.to_ascii_lowercase(), p))
            .collect();
        models.append(&mut t.models);
        t.models = models;
        t
    }

    fn entry(&self, model: &str) -> Option<&(String, Price)> {
        let m = model.to_ascii_lowercase();
        self.models.iter().find(|(k, _)| m.contains(k.as_str()))
    }

    pub fn price(&self, model: &str) -> Price {
        self.entry(model).map(|(_, p)| *p).unwrap_or(self.fallback)
    }

    /// A bounded label for metrics: the table entry the model matched, or `other`. (The model
    /// id comes from inside a box; used as a label as is, it would be unbounded.)
    pub fn family(&self, model: &str) -> &str {
        self.entry(model)
            .map(|(k, _)| k.as_str())
            .unwrap_or("other")
    }

    pub fn cost_usd(&self, model: &str, u: &Usage) -> f64 {
        let p = self.price(model);
        let mtok = |n: u64| n as f64 / 1_000_000.0;
        mtok(u.input_tokens) * p.input
            + mtok(u.output_tokens) * p.output
            + mtok(u.cache_creation_5m_tokens) * p.input * 1.25
            + mtok(u.cache_creation_1h_tokens) * p.input * 2.0
            + mtok(u.cache_read_tokens) * p.input * 0.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_follow_the_table() {
        let t = PriceTable::default();
        let u = Usage {
            input_tokens: 1_000_000,
            output_tokens: 1_000_000,
            cache_creation_5m_tokens: 1_000_000,
            cache_creation_1h_tokens: 0,
            cache_read_tokens: 1_000_000,
        };
        assert!((t.cost_usd("claude-sonnet-4-5", &u) - (3.0 + 15.0 + 3.75 + 0.3)).abs() < 1e-9);
        assert_eq!(t.price("claude-haiku-4-5").input, 1.0);
        assert_eq!(t.price("claude-opus-5-5").output, 20.0);
        assert_eq!(t.price("claude-opus-4-5").output, 25.0);
        assert_eq!(t.family("claude-opus-5-5"), "opus-5-5");
        assert_eq!(t.price("unknown").input, 5.0);
        assert_eq!(t.family("claude-sonnet-4-5"), "sonnet");
        assert_eq!(t.family("../../etc"), "other");
        let o = PriceTable::with_overrides(vec![(
            "Sonnet-4-5".into(),
            Price {
                input: 1.0,
                output: 2.0,
            },
        )]);
        assert_eq!(o.price("claude-sonnet-4-5").output, 2.0);
        assert_eq!(o.price("claude-sonnet-4").output, 15.0);
    }
}
