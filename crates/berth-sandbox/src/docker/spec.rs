//! The container spec of a box: what the engine is asked to create. The box's supervisor
//! (behind tini) as its command, run as the container's root with only the capabilities it
//! needs to start agent processes; a read-only root, `--network none`, `no-new-privileges`;
//! cpu, memory (no swap) and pids limits; and the binds (the host image's directories, the
//! box's disk, its user database, the gateway seam, the control socket) and `/tmp` tmpfs.

use super::image::HOST_DIRS;
use super::{DockerBackend, BACKEND_LABEL, BOX_LABEL, COMPAT_IN_BOX, UID_BASE_LABEL};
use crate::native::init::{SUPERVISOR_BRIDGES_ENV, SUPERVISOR_CTL_ENV, SUPERVISOR_NPROC_ENV};
use crate::{BoxConfig, Image};
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountTypeEnum};
use std::collections::HashMap;
use std::path::Path;

const CTL_DIR: &str = "/run/berth-ctl";
const HELPER_IN_BOX: &str = "/run/berth-ctl/init";
const TINI_IN_BOX: &str = "/run/berth-ctl/tini";
/// Host threads a gVisor sandbox needs beyond its guest's processes.
const GVISOR_THREADS: u64 = 512;

impl DockerBackend {
    /// The engine's description of the container for box `cfg.id` (image `image`, host
    /// directory `dir`, host uids from `uid_base`), labelled so that the box can be found and
    /// adopted after a restart.
    pub(super) fn container_spec(
        &self,
        cfg: &BoxConfig,
        dir: &Path,
        image: String,
        uid_base: u32,
    ) -> ContainerCreateBody {
        let bridges = cfg
            .bridges
            .iter()
            .map(|b| format!("{}={}", b.port, b.socket))
            .collect::<Vec<_>>()
            .join(",");
        let mut labels = HashMap::new();
        labels.insert(BOX_LABEL.to_string(), cfg.id.clone());
        labels.insert(BACKEND_LABEL.to_string(), self.cfg.name.clone());
        labels.insert(UID_BASE_LABEL.to_string(), uid_base.to_string());
        let memory = (cfg.limits.memory_mib as i64) << 20;
        ContainerCreateBody {
            image: Some(image),
            cmd: Some(match self.tini {
                Some(_) => vec![
                    TINI_IN_BOX.into(),
                    "--".into(),
                    HELPER_IN_BOX.into(),
                    "__box-init".into(),
                ],
                None => vec![HELPER_IN_BOX.into(), "__box-init".into()],
            }),
            entrypoint: Some(vec![]),
            env: Some(vec![
                format!("{SUPERVISOR_CTL_ENV}={CTL_DIR}/ctl.sock"),
                format!("{SUPERVISOR_BRIDGES_ENV}={bridges}"),
                format!(
                    "{SUPERVISOR_NPROC_ENV}={}",
                    self.guest_nproc(cfg.limits.pids)
                ),
            ]),
            // The box's init and supervisor run as the container's root with only the
            // capabilities needed to start (and signal) agent processes as AGENT_UID with none at all
            // (bounding set emptied, ids switched, no_new_privs): an agent can then neither
            // signal nor trace them, so it cannot end its own box by killing pid 1 (gVisor
            // does not shield a namespace's init from SIGKILL) or stall the supervisor.
            user: Some("0:0".into()),
            working_dir: Some("/workspace".into()),
            hostname: Some(cfg.id.clone()),
            labels: Some(labels),
            host_config: Some(HostConfig {
                runtime: Some(self.cfg.runtime.clone()),
                network_mode: Some("none".into()),
                init: Some(false),
                readonly_rootfs: Some(true),
                cap_drop: Some(vec!["ALL".into()]),
                cap_add: Some(vec![
                    "SETUID".into(),
                    "SETGID".into(),
                    "SETPCAP".into(),
                    "KILL".into(),
                ]),
                security_opt: Some(vec!["no-new-privileges".into()]),
                nano_cpus: Some((cfg.limits.cpus * 1e9) as i64),
                memory: Some(memory),
                memory_swap: Some(memory),
                pids_limit: Some(self.host_pids(cfg.limits.pids)),
                mounts: Some(self.mounts(cfg, dir)),
                ipc_mode: Some("private".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The engine's pids limit for a box allowed `pids` processes. Under gVisor the guest's
    /// processes are not host processes: the host cgroup counts the sandbox's own threads
    /// (sentry and gofer), so the box gets headroom for them.
    fn host_pids(&self, pids: u64) -> i64 {
        if self.gvisor() {
            (pids + GVISOR_THREADS) as i64
        } else {
            pids as i64
        }
    }

    /// The in-box process limit the supervisor sets (empty: none, the host cgroup counts).
    fn guest_nproc(&self, pids: u64) -> String {
        if self.gvisor() {
            // The box's init and supervisor count towards `pids` as in a cgroup; they run as
            // root, so the agent uid's share is what is left.
            pids.saturating_sub(2).max(1).to_string()
        } else {
            String::new()
        }
    }

    fn mounts(&self, cfg: &BoxConfig, dir: &Path) -> Vec<Mount> {
        let bind = |src: &Path, dst: &str, ro: bool| Mount {
            target: Some(dst.to_string()),
            source: Some(src.to_string_lossy().into_owned()),
            typ: Some(MountTypeEnum::BIND),
            read_only: Some(ro),
            ..Default::default()
        };
        let mut m = Vec::new();
        if matches!(cfg.image, Image::Host) {
            // /etc is in the image (secrets left out); the rest is bound read-only.
            for d in HOST_DIRS {
                let p = Path::new("/").join(d);
                if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                    m.push(bind(&p, &format!("/{d}"), true));
                }
            }
        }
        if self.gvisor() {
            let compat = self.cfg.compat_dir();
            m.push(bind(&compat, COMPAT_IN_BOX, true));
            m.push(bind(
                &compat.join("ld.so.preload"),
                "/etc/ld.so.preload",
                true,
            ));
        }
        let data = if dir.join("disk").is_dir() {
            dir.join("disk")
        } else {
            dir.to_path_buf()
        };
        m.push(bind(&data.join("workspace"), "/workspace", false));
        m.push(bind(&data.join("home"), "/home/agent", false));
        if dir.join("etc").is_dir() {
            m.push(bind(&dir.join("etc").join("passwd"), "/etc/passwd", true));
            m.push(bind(&dir.join("etc").join("group"), "/etc/group", true));
        }
        m.push(bind(&dir.join("run"), "/run/berth", false));
        m.push(bind(&dir.join("ctl"), CTL_DIR, false));
        m.push(Mount {
            target: Some("/tmp".into()),
            typ: Some(MountTypeEnum::TMPFS),
            tmpfs_options: Some(bollard::models::MountTmpfsOptions {
                size_bytes: Some((cfg.limits.disk_mib.min(1024) as i64) << 20),
                mode: Some(0o1777),
                ..Default::default()
            }),
            ..Default::default()
        });
        m
    }
}
