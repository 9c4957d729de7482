//! `berth store …`: operations on berth's own state, run beside (not through) a server.

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum StoreCmd {
    /// Copy every record, event and usage row from a SQLite store into a PostgreSQL store.
    /// Idempotent and resumable: rows already in the target are kept, so a copy that stopped
    /// is finished by running it again. Copy before servers use the target.
    Copy {
        /// The source, `sqlite://<path>` (the data dir's `berth.db`).
        #[arg(long)]
        from: String,
        /// The target, `postgres://user@host/db`; by default `BERTH_DATABASE_URL`, which keeps a
        /// password in the URL off the command line (where `ps` shows it).
        #[arg(long, env = "BERTH_DATABASE_URL", hide_env_values = true)]
        to: String,
    },
}

pub async fn run(cmd: StoreCmd) -> Result<()> {
    match cmd {
        StoreCmd::Copy { from, to } => {
            let copied = berth_store::copy::copy(&from, &to, |p| {
                eprintln!("{}: {}/{}", p.table, p.done, p.total);
            })
            .await?;
            for (table, read, added) in copied.tables {
                println!("{table}: {read} rows, {added} new");
            }
            Ok(())
        }
    }
}
