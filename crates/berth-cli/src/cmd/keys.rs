//! `berth keys`: API keys (admin).

use crate::client::Client;
use crate::Conn;
use anyhow::Result;
use berth_api::*;
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum KeysCmd {
    /// Create a key for a tenant; prints its id and its secret (shown only this once).
    Create {
        /// Tenant the key belongs to (created on first use).
        #[arg(long)]
        tenant: String,
        /// An admin key: sees every tenant and manages keys.
        #[arg(long)]
        admin: bool,
        /// Print the key object (id, tenant, key, …) as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List keys (never their secrets).
    Ls {
        /// Print the keys as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Revoke a key.
    Rm {
        /// Key id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

pub(crate) async fn keys(cmd: KeysCmd, client: impl Fn(&Conn) -> Result<Client>) -> Result<()> {
    match cmd {
        KeysCmd::Create {
            tenant,
            admin,
            json,
            conn,
        } => {
            let k = client(&conn)?
                .create_key(&KeyCreate { tenant, admin })
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&k)?);
            } else {
                println!("id:     {}", k.id);
                println!(
                    "tenant: {}{}",
                    k.tenant,
                    if k.admin { " (admin)" } else { "" }
                );
                println!("key:    {}", k.key.as_deref().unwrap_or(""));
                eprintln!(
                    "The key is shown only this once: store it now (use it as BERTH_TOKEN). `berth keys rm {}` revokes it.",
                    k.id
                );
            }
        }
        KeysCmd::Ls { json, conn } => {
            let l = client(&conn)?.list_keys().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l.items)?);
                return Ok(());
            }
            println!("{:<22} {:<16} {:<6} CREATED", "ID", "TENANT", "ADMIN");
            for k in l.items {
                println!(
                    "{:<22} {:<16} {:<6} {}",
                    k.id,
                    k.tenant,
                    if k.admin { "yes" } else { "no" },
                    k.created_at
                );
            }
        }
        KeysCmd::Rm { id, conn } => {
            client(&conn)?.delete_key(&id).await?;
            println!("{id} revoked");
        }
    }
    Ok(())
}
