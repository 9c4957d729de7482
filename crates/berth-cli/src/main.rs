//! `berth`: the server, the CLI client and the model stand-in in one binary.

mod client;
mod cmd;
mod render;
mod serve;
mod shell;
mod store_cmd;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "Run AI agents in isolated sandboxes on your own machines",
    after_help = "The client commands find the server and its admin key the way `berth serve` was configured: $BERTH_DATA_DIR, else data_dir in $BERTH_CONFIG, else the default data dir. From another machine set BERTH_URL and BERTH_TOKEN."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// How a client command reaches the server.
#[derive(Args, Clone, Default)]
struct Conn {
    /// Server URL, e.g. http://127.0.0.1:7700 [default: $BERTH_URL, else the local server's
    /// address from its data dir]
    #[arg(long)]
    url: Option<String>,
    /// API key [default: $BERTH_TOKEN, else the local server's admin key]
    #[arg(long, hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve(serve::ServeArgs),
    /// List live boxes and sessions (with live cpu/memory/pids/disk); --all for ended ones too.
    Ls(cmd::boxes::LsArgs),
    /// Create a box; prints its id.
    Create(cmd::boxes::CreateArgs),
    /// Run a command in a box: `berth exec BOX -- CMD ARGS...`; exits with its exit code.
    Exec(cmd::boxes::ExecArgs),
    /// An interactive shell in a box on a real terminal: `berth shell BOX`.
    Shell(shell::ShellArgs),
    /// Copy a file: `berth cp BOX:path local` or `berth cp local BOX:path`.
    Cp {
        /// `BOX:path` (path relative to /workspace) or a local file.
        src: String,
        /// `BOX:path` (path relative to /workspace) or a local file.
        dst: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete boxes (`box-…`) or stop sessions (`ses-…`).
    Rm {
        /// Box ids (`box-…`) and session ids (`ses-…`).
        #[arg(required = true)]
        ids: Vec<String>,
        /// Print the ended objects as a JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Start a command agent in a box and print its events until its first result (`-f`:
    /// until the session ends).
    Start(cmd::sessions::StartArgs),
    /// Print a session's events; `-f` follows until it ends.
    Logs {
        /// Session id (`ses-…`).
        session: String,
        /// Keep printing new events until the session ends.
        #[arg(short, long)]
        follow: bool,
        /// One JSON event per line.
        #[arg(long)]
        json: bool,
        /// Only events with a sequence number greater than this.
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Talk to a session: each line you type is a message; events are printed as they come.
    Chat {
        /// Session id (`ses-…`).
        session: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Run a prompt with the Claude agent in a new ephemeral box; the box ends with the task.
    Run(cmd::run::RunArgs),
    /// API keys (admin).
    Keys {
        #[command(subcommand)]
        cmd: cmd::keys::KeysCmd,
    },
    /// Cluster nodes (admin): `ls`, `drain <name>`, `undrain <name>`.
    Node {
        #[command(subcommand)]
        cmd: cmd::node::NodeCmd,
    },
    /// Token and container cost, summed by session, box, tenant or model.
    Usage {
        /// What each row sums.
        #[arg(long, default_value = "session", value_parser = ["session", "box", "tenant", "model"])]
        by: String,
        /// Window start, inclusive (RFC 3339, e.g. 2026-11-01T00:00:00Z).
        #[arg(long)]
        from: Option<String>,
        /// Window end, exclusive (RFC 3339).
        #[arg(long)]
        to: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Run the Messages API stand-in (offline model for demos and tests).
    MockModel {
        /// Address to listen on (host:port).
        #[arg(long, default_value = "127.0.0.1:7701")]
        listen: String,
        /// Scenario file (JSON) [default: the built-in demo].
        #[arg(long)]
        scenario: Option<String>,
        /// Pause between streamed chunks, in milliseconds.
        #[arg(long, default_value_t = 0)]
        chunk_delay_ms: u64,
    },
    /// berth's own state: `store copy --from sqlite://… --to postgres://…`.
    Store {
        #[command(subcommand)]
        cmd: store_cmd::StoreCmd,
    },
    /// Print the OpenAPI document.
    Openapi,
    /// Box bring-up helper (internal).
    #[command(name = "__box-init", hide = true)]
    BoxInit,
}

fn main() {
    // The box helper must run before any runtime or thread exists.
    if std::env::args().nth(1).as_deref() == Some("__box-init") {
        berth_sandbox::native::init::run();
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(real_main(cli)) {
        eprintln!("berth: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main(cli: Cli) -> Result<()> {
    let client = |c: &Conn| client::from_env(c.url.clone(), c.token.clone());
    match cli.cmd {
        Cmd::Serve(a) => serve::serve(a).await,
        Cmd::BoxInit => unreachable_box_init(),
        Cmd::MockModel {
            listen,
            scenario,
            chunk_delay_ms,
        } => cmd::mock_model::run(listen, scenario, chunk_delay_ms).await,
        Cmd::Openapi => {
            println!("{}", berth_server::api::openapi_json());
            Ok(())
        }
        Cmd::Ls(a) => cmd::boxes::ls(&client(&a.conn)?, &a).await,
        Cmd::Create(a) => cmd::boxes::create(&client(&a.conn)?, &a).await,
        Cmd::Exec(a) => cmd::boxes::exec(&client(&a.conn)?, a).await,
        Cmd::Shell(a) => shell::run(client(&a.conn)?, a).await,
        Cmd::Cp { src, dst, conn } => cmd::boxes::cp(&client(&conn)?, &src, &dst).await,
        Cmd::Rm { ids, json, conn } => cmd::boxes::rm(&client(&conn)?, ids, json).await,
        Cmd::Start(a) => cmd::sessions::start(&client(&a.conn)?, a).await,
        Cmd::Logs {
            session,
            follow,
            json,
            after,
            conn,
        } => cmd::sessions::logs(&client(&conn)?, &session, follow, json, after).await,
        Cmd::Chat { session, conn } => cmd::sessions::chat(&client(&conn)?, &session).await,
        Cmd::Run(a) => cmd::run::run(&client(&a.conn)?, a).await,
        Cmd::Keys { cmd } => cmd::keys::keys(cmd, client).await,
        Cmd::Node { cmd } => cmd::node::node(cmd, client).await,
        Cmd::Store { cmd } => store_cmd::run(cmd).await,
        Cmd::Usage {
            by,
            from,
            to,
            json,
            conn,
        } => cmd::usage::usage(&client(&conn)?, &by, from, to, json).await,
    }
}

fn unreachable_box_init() -> Result<()> {
    bail!("__box-init must be the first argument")
}
