//! Following a container's life through the engine: waiting, after start or adoption, until
//! the box's supervisor accepts connections (then recording the container's host PID: the box
//! as started), and reporting, once, how the container ended (exit code, or OOM kill) on the
//! box's exit watch.

use super::{DockerBackend, DockerBox};
use crate::{BoxExit, BoxInfo, Result, SandboxError};
use bollard::query_parameters::WaitContainerOptions;
use futures::StreamExt;
use std::time::Duration;
use tokio::sync::watch;

const START_TIMEOUT: Duration = Duration::from_secs(60);

impl DockerBackend {
    /// Report the container's end, with the reason, on `exit_tx` (for exit_watch).
    pub(super) fn watch_exit(&self, name: String, exit_tx: watch::Sender<Option<BoxExit>>) {
        let docker = self.docker.clone();
        tokio::spawn(async move {
            let mut w = docker.wait_container(&name, None::<WaitContainerOptions>);
            let code = match w.next().await {
                Some(Ok(r)) => r.status_code,
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
                _ => -1,
            };
            let oom = docker
                .inspect_container(
                    &name,
                    None::<bollard::query_parameters::InspectContainerOptions>,
                )
                .await
                .ok()
                .and_then(|i| i.state)
                .and_then(|s| s.oom_killed)
                .unwrap_or(false);
            let _ = exit_tx.send(Some(if oom {
                BoxExit::OomKilled
            } else {
                BoxExit::Exited { code: code as i32 }
            }));
        });
    }

    /// Wait for the box's supervisor, then record the container's PID: the box as started.
    pub(super) async fn until_ready(&self, b: &DockerBox, id: String) -> Result<BoxInfo> {
        self.wait_ready(b).await?;
        let pid = self.container_pid(&b.container).await;
        b.pid
            .store(pid.unwrap_or(0), std::sync::atomic::Ordering::SeqCst);
        Ok(BoxInfo {
            id,
            pid,
            run_dir: b.dir.join("run"),
        })
    }

    /// The container's host PID (its init), as the engine reports it.
    async fn container_pid(&self, container: &str) -> Option<i32> {
        self.docker
            .inspect_container(
                container,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .ok()
            .and_then(|i| i.state)
            .and_then(|s| s.pid)
            .map(|p| p as i32)
    }

    /// Wait until the supervisor accepts connections, or the container has stopped.
    async fn wait_ready(&self, b: &DockerBox) -> Result<()> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let mut pause = Duration::from_millis(1);
        loop {
            if tokio::net::UnixStream::connect(b.ctl()).await.is_ok() {
                return Ok(());
            }
            if !b.running() || tokio::time::Instant::now() > deadline {
                let logs = self.logs_tail(&b.container).await;
                return Err(SandboxError::Start(format!(
                    "the box's supervisor did not come up: {logs}"
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    async fn logs_tail(&self, container: &str) -> String {
        let opts = bollard::query_parameters::LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail("20")
            .build();
        let mut s = self.docker.logs(container, Some(opts));
        let mut out = String::new();
        while let Some(Ok(l)) = s.next().await {
            out.push_str(&l.to_string());
        }
        out
    }
}
