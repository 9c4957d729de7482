//! `berth node`: the cluster's nodes (admin).

use crate::client::Client;
use crate::Conn;
use anyhow::Result;
use berth_api::*;
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum NodeCmd {
    /// List the nodes: state, lease, backends, load.
    Ls {
        /// Print the nodes as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop placing boxes on a node and park its hybrid boxes; the rest run until they end.
    Drain {
        /// Node name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Place boxes on a drained node again.
    Undrain {
        /// Node name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

pub(crate) async fn node(cmd: NodeCmd, client: impl Fn(&Conn) -> Result<Client>) -> Result<()> {
    match cmd {
        NodeCmd::Ls { json, conn } => {
            let l: List<NodeObject> = client(&conn)?.get("/v1/nodes").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l.items)?);
                return Ok(());
            }
            println!(
                "{:<20} {:<9} {:>5} {:>6} {:>8} {:<16} {:<24} URL",
                "NAME", "STATE", "BOXES", "CPUS", "MEM_MIB", "BACKENDS", "LABELS"
            );
            for n in l.items {
                let labels: Vec<String> =
                    n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!(
                    "{:<20} {:<9} {:>5} {:>6} {:>8} {:<16} {:<24} {}",
                    n.name,
                    n.state.as_str(),
                    n.load.boxes,
                    format!("{}/{}", n.load.cpus, n.capacity.cpus),
                    n.load.memory_mib,
                    n.backends.join(","),
                    if labels.is_empty() {
                        "-".to_string()
                    } else {
                        labels.join(",")
                    },
                    n.advertise_url
                );
            }
        }
        NodeCmd::Drain { name, conn } => {
            let n: NodeObject = client(&conn)?
                .post(&format!("/v1/nodes/{name}/drain"), &serde_json::json!({}))
                .await?;
            println!("{} {}", n.name, n.state.as_str());
        }
        NodeCmd::Undrain { name, conn } => {
            let n: NodeObject = client(&conn)?
                .post(&format!("/v1/nodes/{name}/undrain"), &serde_json::json!({}))
                .await?;
            println!("{} {}", n.name, n.state.as_str());
        }
    }
    Ok(())
}
