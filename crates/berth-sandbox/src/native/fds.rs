//! The server's open files, which cap the boxes it holds: it keeps two descriptors per native
//! box for the box's life (its report socket and its bridges' socket, the door), and more for
//! a moment while one is made or an exec runs. Its soft limit goes up to the hard one at
//! start; a create that would leave fewer than [`RESERVE`] free is refused ([`room_for_box`])
//! with an error naming `LimitNOFILE`, instead of a box failing half-made, or the server's
//! accepts and model requests failing, once the table is full.

use crate::SandboxError;

/// The open-file limit the server was started with, which boxes keep (the zygote puts it
/// back): programs that close every descriptor up to the limit would crawl at the raised one.
pub(crate) static BOX_NOFILE: std::sync::OnceLock<libc::rlimit> = std::sync::OnceLock::new();

/// Descriptors a box holds in the server for its life.
pub const PER_BOX: usize = 2;

/// Descriptors kept free besides, for what the server does with its boxes (client
/// connections, execs' control connections, model and egress connections, the store, the
/// disks and sockets of boxes being made).
pub const RESERVE: usize = 64;

/// Raise this process's limit on open files to the kernel's ceiling (`fs.nr_open`; root with
/// CAP_SYS_RESOURCE may raise the hard limit too, else the soft one goes up to the hard one).
pub fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        .unwrap_or(0);
    // SAFETY: getrlimit/setrlimit on this process with structs we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let _ = BOX_NOFILE.set(lim);
        let up = libc::rlimit {
            rlim_cur: ceiling.max(lim.rlim_max),
            rlim_max: ceiling.max(lim.rlim_max),
        };
        // Without CAP_SYS_RESOURCE the hard limit stays: then up to it.
        let hard = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &up) != 0
            && libc::setrlimit(libc::RLIMIT_NOFILE, &hard) != 0
        {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "raising the open-file limit"
            );
        }
    }
}

/// This process's open descriptors and its (soft) limit on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub open: usize,
    pub limit: usize,
}

impl Room {
    /// Boxes that still fit, [`RESERVE`] kept free.
    pub fn boxes(&self) -> usize {
        self.limit.saturating_sub(self.open + RESERVE) / PER_BOX
    }
}

/// This process's (soft) limit on open descriptors.
fn limit() -> std::io::Result<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX))
}

/// Count this process's open descriptors (`/proc/self/fd`, the one read's own included).
pub fn room() -> std::io::Result<Room> {
    let limit = limit()?;
    let open = std::fs::read_dir("/proc/self/fd")?.count();
    Ok(Room { open, limit })
}

/// The server has no descriptors for one more box.
#[derive(Debug, thiserror::Error)]
#[error(
    "no room for another box: the server has {} of its {} open files in use (each box holds \
     {PER_BOX}, and {RESERVE} are kept free); raise LimitNOFILE (the server's open-file \
     limit, `ulimit -n`)",
    .0.open, .0.limit
)]
pub struct NoRoom(pub Room);

impl From<NoRoom> for SandboxError {
    fn from(e: NoRoom) -> SandboxError {
        SandboxError::Start(e.to_string())
    }
}

/// The size of this process's descriptor table (`FDSize` in `/proc/self/status`): no open
/// descriptor is numbered at or above it, so at most that many are open.
fn table_size() -> Option<usize> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:")?.trim().parse().ok())
}

/// Whether the server has the descriptors for one more box. A host without `/proc` is not
/// checked.
pub fn room_for_box() -> Result<(), NoRoom> {
    // Counting the open descriptors lists /proc/self/fd, ~3 µs a descriptor (30 ms at
    // 10,000): done only once the descriptor table (which grows in powers of two) has grown
    // to within the reserve of the limit. Until then its size bounds what is open.
    if let (Some(size), Ok(r)) = (table_size(), limit()) {
        if size + RESERVE + PER_BOX <= r {
            return Ok(());
        }
    }
    match room() {
        Ok(r) if r.boxes() == 0 => Err(NoRoom(r)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_that_fit_keep_the_reserve() {
        let r = |open, limit| Room { open, limit }.boxes();
        assert_eq!(r(100, 100 + RESERVE + 2 * PER_BOX), 2);
        assert_eq!(r(100, 100 + RESERVE + PER_BOX - 1), 0);
        assert_eq!(r(500, 100), 0);
        let now = room().expect("room");
        assert!(now.open > 0 && now.limit >= now.open, "{now:?}");
        let size = table_size().expect("FDSize");
        assert!(size >= now.open, "table {size}, {now:?}");
    }
}
