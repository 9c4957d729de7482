//! The root file systems Docker boxes start from. The `host` image is made here, once per
//! content (a tar of the host's `/etc` without its secrets, the merged-/usr symlinks and empty
//! mount points, imported into the engine as `berth-host:<digest>`; the host's `/usr`, `/lib*`
//! and `/opt` are bound over it read-only by the container spec). gVisor boxes also get the
//! statx compatibility shim written here, which their `ld.so.preload` names.

use super::{engine_err, DockerBackend, COMPAT_IN_BOX, HOST_IMAGE_REPO};
use crate::Result;
use bollard::query_parameters::CreateImageOptionsBuilder;
use futures::StreamExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The shim, built from `compat/statx_compat.c` by the build script.
const STATX_COMPAT_SO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/statx_compat.so"));

/// Top-level host directories of the `host` image: bound read-only when they are directories,
/// recreated as the same symlink when they are symlinks (merged /usr).
pub(super) const HOST_DIRS: [&str; 8] = [
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "opt",
];

/// The `host` image's root as a tar: a copy of the host's `/etc` without its secrets (in the
/// image rather than bound, so the engine can place `/etc/hosts` and friends on top, which
/// gVisor cannot do over a read-only bind), the merged-/usr symlinks, and empty mount points.
fn host_image_tar() -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    let dir = |b: &mut tar::Builder<Vec<u8>>, d: &str, mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(mode);
        h.set_size(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, format!("{d}/"), std::io::empty())
    };
    for d in HOST_DIRS {
        let p = Path::new("/").join(d);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&p)?;
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mtime(0);
                h.set_mode(0o777);
                b.append_link(&mut h, d, target)?;
            }
            Ok(_) => dir(&mut b, d, 0o755)?,
            Err(_) => {}
        }
    }
    for d in [
        "workspace",
        "home",
        "home/agent",
        "run",
        "run/berth",
        "run/berth-ctl",
        "proc",
        "sys",
        "dev",
        "root",
    ] {
        dir(&mut b, d, 0o755)?;
    }
    dir(&mut b, "tmp", 0o1777)?;
    // /etc, minus what boxes must not read.
    let hidden: Vec<&Path> = crate::native::MASKED_FILES
        .iter()
        .chain(crate::native::MASKED_DIRS.iter())
        .map(Path::new)
        .collect();
    let mut stack = vec![PathBuf::from("/etc")];
    while let Some(d) = stack.pop() {
        let rel = d.strip_prefix("/").unwrap_or(&d).to_path_buf();
        b.append_path_with_name(&d, &rel)?;
        let mut entries: Vec<_> = std::fs::read_dir(&d)?.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if hidden.contains(&p.as_path()) {
                continue;
            }
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p.strip_prefix("/").unwrap_or(&p).to_path_buf();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() || m.file_type().is_symlink() {
                b.append_path_with_name(&p, &rel)?;
            }
        }
    }
    b.into_inner()
}

impl DockerBackend {
    /// Import the `host` base image once, if the engine does not have it; its reference.
    pub(super) async fn ensure_host_image(&self) -> Result<String> {
        self.image
            .get_or_try_init(|| async {
                let tar = tokio::task::spawn_blocking(host_image_tar)
                    .await
                    .map_err(crate::blocking_err)??;
                let digest = {
                    use sha2::Digest;
                    hex::encode(&sha2::Sha256::digest(&tar)[..8])
                };
                let reference = format!("{HOST_IMAGE_REPO}:{digest}");
                if self.docker.inspect_image(&reference).await.is_ok() {
                    return Ok(reference);
                }
                let opts = CreateImageOptionsBuilder::new()
                    .from_src("-")
                    .repo(HOST_IMAGE_REPO)
                    .tag(&digest)
                    .build();
                let mut s = self.docker.create_image(
                    Some(opts),
                    Some(bollard::body_full(tar.into())),
                    None,
                );
                while let Some(r) = s.next().await {
                    r.map_err(engine_err)?;
                }
                Ok(reference)
            })
            .await
            .cloned()
    }
}

/// The shim gVisor boxes preload (see `compat/statx_compat.c`) and the `ld.so.preload` naming
/// it, written into `dir` (world-readable: the agent's programs load it).
pub(super) fn write_gvisor_compat(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let so = dir.join("statx_compat.so");
    std::fs::write(&so, STATX_COMPAT_SO)?;
    std::fs::set_permissions(&so, std::fs::Permissions::from_mode(0o644))?;
    let preload = dir.join("ld.so.preload");
    std::fs::write(&preload, format!("{COMPAT_IN_BOX}/statx_compat.so\n"))?;
    std::fs::set_permissions(&preload, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}
