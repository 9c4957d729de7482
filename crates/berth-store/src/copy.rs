//! Moving an install: every row of a SQLite store into a PostgreSQL store.
//!
//! Each table is read in key order, in pages, and each page is written in one transaction with
//! `ON CONFLICT DO NOTHING`: a copy is idempotent (rows already there are kept, not doubled)
//! and resumable (a copy stopped half-way is finished by running it again). Rows keep their
//! ids (usage, container time), and the target's id sequences are moved past them. Copy into
//! a database no server is writing to yet.

use crate::{PostgresStore, Result, SqliteStore, StoreError};
use sqlx::{Postgres, QueryBuilder, Row};

/// Rows read and written per transaction.
const PAGE: i64 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Int,
    OptInt,
    Real,
    OptReal,
    Bool,
}

struct Table {
    name: &'static str,
    /// The primary key, in order (pages are keyset-paginated on it).
    key: &'static [&'static str],
    columns: &'static [(&'static str, Kind)],
    /// The key (one column) is a BIGSERIAL whose sequence must follow the copied ids.
    serial: bool,
}

use Kind::*;

/// Parents before children (api_keys refers to tenants).
const TABLES: &[Table] = &[
    Table {
        name: "tenants",
        key: &["name"],
        columns: &[
            ("name", Text),
            ("created_at", Text),
            ("budget_usd_month", OptReal),
        ],
        serial: false,
    },
    Table {
        name: "api_keys",
        key: &["id"],
        columns: &[
            ("id", Text),
            ("hash", Text),
            ("tenant", Text),
            ("admin", Bool),
            ("created_at", Text),
        ],
        serial: false,
    },
    Table {
        name: "boxes",
        key: &["id"],
        columns: &[
            ("id", Text),
            ("tenant", Text),
            ("state", Text),
            ("doc", Text),
            ("created_at", Text),
        ],
        serial: false,
    },
    Table {
        name: "sessions",
        key: &["id"],
        columns: &[
            ("id", Text),
            ("tenant", Text),
            ("box_id", Text),
            ("state", Text),
            ("doc", Text),
            ("created_at", Text),
        ],
        serial: false,
    },
    Table {
        name: "triggers",
        key: &["id"],
        columns: &[
            ("id", Text),
            ("tenant", Text),
            ("doc", Text),
            ("secret", Text),
            ("created_at", Text),
        ],
        serial: false,
    },
    Table {
        name: "events",
        key: &["session_id", "seq"],
        columns: &[
            ("session_id", Text),
            ("seq", Int),
            ("ts", Text),
            ("kind", Text),
            ("data", Text),
        ],
        serial: false,
    },
    Table {
        name: "box_events",
        key: &["box_id", "seq"],
        columns: &[
            ("box_id", Text),
            ("seq", Int),
            ("ts", Text),
            ("kind", Text),
            ("data", Text),
        ],
        serial: false,
    },
    Table {
        name: "documents",
        key: &["seq"],
        columns: &[
            ("seq", Int),
            ("kind", Text),
            ("tenant", Text),
            ("id", Text),
            ("version", Int),
            ("body", Text),
        ],
        serial: true,
    },
    Table {
        name: "usage",
        key: &["id"],
        columns: &[
            ("id", Int),
            ("ts", Text),
            ("ts_ms", Int),
            ("tenant", Text),
            ("box_id", Text),
            ("session_id", Text),
            ("model", Text),
            ("status", Int),
            ("input_tokens", Int),
            ("output_tokens", Int),
            ("cache_creation_5m_tokens", Int),
            ("cache_creation_1h_tokens", Int),
            ("cache_read_tokens", Int),
            ("cost_usd", Real),
        ],
        serial: true,
    },
    Table {
        name: "box_time",
        key: &["id"],
        columns: &[
            ("id", Int),
            ("box_id", Text),
            ("tenant", Text),
            ("start_ms", Int),
            ("end_ms", OptInt),
            ("seen_ms", Int),
            ("cpus", Real),
            ("memory_mib", Int),
        ],
        serial: true,
    },
];

/// Where a copy is: `done` of `total` rows of `table` read and written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub table: &'static str,
    pub done: u64,
    pub total: u64,
}

/// What a copy did, per table: rows read from the source, rows new in the target.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Copied {
    pub tables: Vec<(&'static str, u64, u64)>,
}

/// One value of a row, as read from SQLite.
enum Value {
    Text(Option<String>),
    Int(Option<i64>),
    Real(Option<f64>),
    Bool(bool),
}

/// Copy every row of the SQLite store at `from` (`sqlite://<path>`) into the PostgreSQL store
/// at `to` (`postgres://…`), both migrated first; `progress` is called after each page.
pub async fn copy(from: &str, to: &str, mut progress: impl FnMut(&Progress)) -> Result<Copied> {
    let Some(path) = from.strip_prefix("sqlite://").filter(|p| !p.is_empty()) else {
        return Err(StoreError::Url(format!(
            "--from {from:?}: expected sqlite://<path>"
        )));
    };
    if !(to.starts_with("postgres://") || to.starts_with("postgresql://")) {
        return Err(StoreError::Url(format!(
            "--to {to:?}: expected postgres://…"
        )));
    }
    if !std::path::Path::new(path).exists() {
        return Err(StoreError::Url(format!("--from {from:?}: no such file")));
    }
    let src = SqliteStore::open(std::path::Path::new(path)).await?;
    let dst = PostgresStore::open(to).await?;
    let mut copied = Copied::default();
    for t in TABLES {
        let total: i64 = sqlx::query(&format!("SELECT COUNT(*) AS n FROM {}", t.name))
            .fetch_one(src.pool())
            .await?
            .get("n");
        let total = total.max(0) as u64;
        let (mut done, mut added) = (0u64, 0u64);
        progress(&Progress {
            table: t.name,
            done,
            total,
        });
        let cols = t
            .columns
            .iter()
            .map(|(c, _)| *c)
            .collect::<Vec<_>>()
            .join(", ");
        let keys = t.key.join(", ");
        let mut after: Option<Vec<Value>> = None;
        loop {
            // Keyset pagination: rows after the last key read, in key order.
            let mut q =
                sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!("SELECT {cols} FROM {} ", t.name));
            if let Some(k) = &after {
                q.push(format!("WHERE ({keys}) > ("));
                let mut sep = q.separated(", ");
                for v in k {
                    match v {
                        Value::Text(s) => sep.push_bind(s.clone()),
                        Value::Int(i) => sep.push_bind(*i),
                        Value::Real(r) => sep.push_bind(*r),
                        Value::Bool(b) => sep.push_bind(*b),
                    };
                }
                q.push(") ");
            }
            q.push(format!("ORDER BY {keys} LIMIT {PAGE}"));
            let rows = q.build().fetch_all(src.pool()).await?;
            if rows.is_empty() {
                break;
            }
            let mut values: Vec<Vec<Value>> = Vec::with_capacity(rows.len());
            for r in &rows {
                let mut row = Vec::with_capacity(t.columns.len());
                for (c, kind) in t.columns {
                    row.push(match kind {
                        Text => Value::Text(Some(r.try_get(*c)?)),
                        Int => Value::Int(Some(r.try_get(*c)?)),
                        OptInt => Value::Int(r.try_get(*c)?),
                        Real => Value::Real(Some(r.try_get(*c)?)),
                        OptReal => Value::Real(r.try_get(*c)?),
                        // SQLite keeps booleans as integers.
                        Bool => Value::Bool(r.try_get::<i64, _>(*c)? != 0),
                    });
                }
                values.push(row);
            }
            let mut ins =
                QueryBuilder::<Postgres>::new(format!("INSERT INTO {} ({cols}) ", t.name));
            ins.push_values(&values, |mut b, row| {
                for v in row {
                    match v {
                        Value::Text(s) => b.push_bind(s.clone()),
                        Value::Int(i) => b.push_bind(*i),
                        Value::Real(r) => b.push_bind(*r),
                        Value::Bool(x) => b.push_bind(*x),
                    };
                }
            });
            ins.push(format!(" ON CONFLICT ({keys}) DO NOTHING"));
            let mut tx = dst.pool().begin().await?;
            added += ins.build().execute(&mut *tx).await?.rows_affected();
            tx.commit().await?;
            done += rows.len() as u64;
            let last = values.pop().unwrap_or_default();
            after = Some(
                t.key
                    .iter()
                    .map(|k| {
                        let i = t.columns.iter().position(|(c, _)| c == k).unwrap_or(0);
                        match last.get(i) {
                            Some(Value::Text(s)) => Value::Text(s.clone()),
                            Some(Value::Int(n)) => Value::Int(*n),
                            Some(Value::Real(r)) => Value::Real(*r),
                            Some(Value::Bool(b)) => Value::Bool(*b),
                            None => Value::Int(None),
                        }
                    })
                    .collect(),
            );
            progress(&Progress {
                table: t.name,
                done,
                total: total.max(done),
            });
            if (rows.len() as i64) < PAGE {
                break;
            }
        }
        if t.serial {
            // The next id a server assigns must come after every copied one.
            sqlx::query(&format!(
                "SELECT setval(pg_get_serial_sequence('{0}', '{1}'), GREATEST((SELECT MAX({1}) FROM {0}), 1))",
                t.name, t.key[0]
            ))
            .execute(dst.pool())
            .await?;
        }
        copied.tables.push((t.name, done, added));
    }
    src.close().await;
    dst.close().await;
    Ok(copied)
}
