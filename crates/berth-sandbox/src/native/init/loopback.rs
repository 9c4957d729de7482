//! Bringing up `lo` in a box's network namespace (the only interface a box has), by C or by
//! the zygote for a namespace it makes ahead.

use std::io;

pub(in crate::native) fn loopback_up() -> Result<(), String> {
    // SAFETY: ioctl on a socket we own with a properly initialised ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("socket: {}", io::Error::last_os_error()));
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let r = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        if r < 0 {
            let e = io::Error::last_os_error();
            libc::close(fd);
            return Err(format!("SIOCGIFFLAGS: {e}"));
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        let r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        let e = io::Error::last_os_error();
        libc::close(fd);
        if r < 0 {
            return Err(format!("SIOCSIFFLAGS: {e}"));
        }
    }
    Ok(())
}
