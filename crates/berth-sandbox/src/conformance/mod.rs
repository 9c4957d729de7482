//! The conformance suite: behaviour and isolation checks every [`Sandbox`] backend must pass.
//!
//! Each check is an async function taking the backend under test and a [`Fixture`]; backend
//! test files call them one per `#[tokio::test]`. Checks panic (with a clear message) on
//! failure, so they are meant for tests only. Every isolation check asserts on the effect that
//! the protection exists to prevent, so removing the protection makes it fail.
//!
//! The checks are grouped by area, one module each: `exec` (running processes), `files`
//! (the file operations), `isolation` (what a box can see and write, and as whom),
//! `syscalls` (network, socket families and system calls), `limits` (resource limits) and
//! `lifecycle` (death, destroy, adoption). Every check is re-exported here, so backend tests
//! call `conformance::<check>` whatever its module.

mod exec;
mod files;
mod isolation;
mod lifecycle;
mod limits;
mod syscalls;

pub use exec::exec_basics;
pub use files::{files_and_hostile_paths, special_files_answer_at_once};
pub use isolation::{
    another_uid_in_its_own_directory, box_identity, isolation, kernel_counters_per_box,
    landlock_write_paths,
};
pub use lifecycle::{adoption, death_and_destroy};
pub use limits::limits;
#[cfg(target_arch = "x86_64")]
pub use syscalls::x32_syscalls_refused;
pub use syscalls::{network_and_syscalls, socket_families_refused};

use crate::{BoxConfig, ExecOutput, ExecSpec, Image, Limits, Sandbox};
use std::time::Duration;

pub struct Fixture {
    /// Unique prefix for box ids made by this run.
    pub prefix: String,
    /// Bytes of the `berth-escape-probe` binary, copied into boxes.
    pub probe: Vec<u8>,
}

impl Fixture {
    pub fn id(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }
}

pub fn config(id: &str, limits: Limits) -> BoxConfig {
    BoxConfig {
        id: id.to_string(),
        image: Image::Host,
        limits,
        env: vec![],
        bridges: vec![],
    }
}

pub fn small() -> Limits {
    Limits {
        cpus: 1.0,
        memory_mib: 256,
        disk_mib: 64,
        pids: 64,
    }
}

/// Run `argv` in the box (60 s timeout) and collect its output.
pub async fn run<B: Sandbox>(b: &B, id: &str, argv: Vec<String>) -> ExecOutput {
    b.exec(
        id,
        ExecSpec {
            argv,
            timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        },
    )
    .await
    .expect("exec")
    .collect(None, 4 << 20)
    .await
    .expect("collect")
}

pub async fn sh<B: Sandbox>(b: &B, id: &str, script: &str) -> ExecOutput {
    run(b, id, vec!["/bin/sh".into(), "-c".into(), script.into()]).await
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn with_probe<B: Sandbox>(b: &B, f: &Fixture, id: &str) {
    b.write_file(id, "probe", f.probe.clone(), 0o755)
        .await
        .expect("copy probe");
}

async fn probe<B: Sandbox>(b: &B, id: &str, args: &[&str]) -> ExecOutput {
    let mut argv = vec!["/workspace/probe".to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    run(b, id, argv).await
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("probe printed no {key}: {out}"))
}
