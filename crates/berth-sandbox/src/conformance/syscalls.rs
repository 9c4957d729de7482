//! Conformance checks of the network and the system calls: only loopback inside, a host
//! loopback service unreachable, escapes and privileged system calls failing, socket families
//! an allowlist and x32 system calls refused by the seccomp filter.

use super::{config, field, probe, run, sh, small, text, with_probe, Fixture};
use crate::Sandbox;

/// Only loopback inside; a host loopback service is unreachable; escapes and privileged
/// syscalls fail.
pub async fn network_and_syscalls<B: Sandbox>(b: &B, f: &Fixture) {
    let id = f.id("net");
    b.create(config(&id, small())).await.expect("create");
    let out = sh(b, &id, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; echo routes; tail -n +2 /proc/net/route | wc -l").await;
    assert_eq!(text(&out.stdout), "lo\nroutes\n0\n");
    // A service on the host's loopback must be out of reach.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let out = sh(
        b,
        &id,
        &format!(
            "(echo hi > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo REACHED || echo refused"
        ),
    )
    .await;
    // `sh` may be dash without /dev/tcp; fall back to bash explicitly.
    let script = format!(
        "(echo hi > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo REACHED || echo refused"
    );
    let out2 = run(b, &id, vec!["bash".into(), "-c".into(), script]).await;
    assert!(!text(&out.stdout).contains("REACHED"));
    assert_eq!(text(&out2.stdout), "refused\n");

    with_probe(b, f, &id).await;
    let out = probe(b, &id, &["escape"]).await;
    let s = text(&out.stdout);
    for k in [
        "mount",
        "umount",
        "ptrace_traceme",
        "ptrace_attach_pid1",
        "init_module",
        "finit_module",
        "clock_settime",
        "setuid0",
        "unshare_user",
        "unshare_net",
        "chroot",
        "sethostname",
        "reboot",
        "bpf",
        "io_uring_setup",
        "keyctl",
        "socket_packet",
        "mknod",
        "perf_event_open",
        "write_etc",
        "write_root",
        "write_run",
        "read_shadow",
        "setpriority_neg",
        "btrfs_subvol_create",
    ] {
        assert!(
            field(&s, k).starts_with("errno"),
            "{k} succeeded inside the box:\n{s}"
        );
    }
    // The box's init cannot be killed from inside: refused (native: another uid), or, where
    // it runs as the agent's uid (docker), dropped by the kernel (SIGKILL from inside a PID
    // namespace never reaches its init). Either way the box still runs.
    let alive = sh(b, &id, "echo alive").await;
    assert_eq!(
        text(&alive.stdout),
        "alive\n",
        "the box died after kill(1, SIGKILL) from inside ({})",
        field(&s, "kill_pid1")
    );
    assert!(b.exit_watch(&id).expect("watch").borrow().is_none());
    assert_eq!(field(&s, "write_workspace"), "ok");
    // seccomp specifically: these would succeed for an unprivileged process without it.
    assert_eq!(field(&s, "ptrace_traceme"), format!("errno{}", libc::EPERM));
    assert_eq!(field(&s, "unshare_user"), format!("errno{}", libc::EPERM));
    assert_eq!(field(&s, "io_uring_setup"), format!("errno{}", libc::EPERM));
    b.destroy(&id).await.expect("destroy");
}

/// Socket families are an allowlist inside a box: `socket` and `socketpair` with anything but
/// `AF_UNIX`, `AF_INET` and `AF_INET6` get EPERM from the seccomp filter (netlink, vsock,
/// packet, key, alg, tipc, rds, xdp, can, bluetooth: without the filter an unprivileged
/// process gets several of these, and the others fail with a different errno).
pub async fn socket_families_refused<B: Sandbox>(b: &B, f: &Fixture) {
    let id = f.id("sockfam");
    b.create(config(&id, small())).await.expect("create");
    let script = "import socket\n\
        fams = [(16, 3), (40, 1), (17, 3), (15, 3), (38, 5), (30, 5), (21, 5), (44, 3), (29, 3), (31, 1), (1, 1), (2, 1), (10, 1)]\n\
        for fam, typ in fams:\n\
        \x20   for call in (socket.socket, socket.socketpair):\n\
        \x20       try:\n\
        \x20           r = call(fam, typ, 0)\n\
        \x20           for s in (r if isinstance(r, tuple) else (r,)): s.close()\n\
        \x20           print(fam, 'ok')\n\
        \x20       except OSError as e:\n\
        \x20           print(fam, 'errno%d' % e.errno)\n";
    let out = run(b, &id, vec!["python3".into(), "-c".into(), script.into()]).await;
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 26, "{stdout} {}", text(&out.stderr));
    let eperm = format!("errno{}", libc::EPERM);
    for line in &lines {
        let (fam, result) = line.split_once(' ').expect("fam result");
        if ["1", "2", "10"].contains(&fam) {
            // Allowed (socketpair of AF_INET is EOPNOTSUPP from the kernel, not the filter).
            assert_ne!(result, eperm, "family {fam} refused: {stdout}");
        } else {
            assert_eq!(result, eperm, "family {fam} not refused: {stdout}");
        }
    }
    assert!(stdout.contains("1 ok"), "AF_UNIX works: {stdout}");
    b.destroy(&id).await.expect("destroy");
}

/// x32 system calls (number | 0x4000_0000) are refused inside a box with EPERM, before any
/// rule: the seccomp rules compare raw x86_64 numbers, so on a kernel with x32 enabled they
/// would be a way around every denial (`unshare`, `bpf`, `io_uring_setup`...). Outside a box
/// the same program gets the pid (x32 enabled) or ENOSYS (disabled); either way, never EPERM.
#[cfg(target_arch = "x86_64")]
pub async fn x32_syscalls_refused<B: Sandbox>(b: &B, f: &Fixture) {
    let script = "import ctypes\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        for nr, arg in [(39, 0), (272, 0x10000000), (425, 0)]:\n\
        \x20   ctypes.set_errno(0)\n\
        \x20   r = libc.syscall(ctypes.c_long(0x40000000 + nr), ctypes.c_long(arg), ctypes.c_long(0))\n\
        \x20   print(nr, r, ctypes.get_errno())\n";
    // getpid only outside: unshare/io_uring_setup on the host would do real things.
    let host_script = script.replace("(272, 0x10000000), (425, 0)", "");
    let host = std::process::Command::new("python3")
        .args(["-c", &host_script])
        .output()
        .expect("python3 on the host");
    let host_out = text(&host.stdout);
    let host_errno: i32 = host_out
        .split_whitespace()
        .nth(2)
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("host probe: {host_out} {}", text(&host.stderr)));
    assert_ne!(host_errno, libc::EPERM, "the host has no seccomp filter");
    let x32_on_host = host_errno == 0;
    let id = f.id("x32");
    b.create(config(&id, small())).await.expect("create");
    let out = run(b, &id, vec!["python3".into(), "-c".into(), script.into()]).await;
    let stdout = text(&out.stdout);
    let eperm = libc::EPERM.to_string();
    let lines: Vec<Vec<&str>> = stdout.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 3, "{stdout} {}", text(&out.stderr));
    for l in &lines {
        assert_eq!(
            (l[1], l[2]),
            ("-1", eperm.as_str()),
            "x32 call {} not refused with EPERM (host kernel x32: {x32_on_host}): {stdout}",
            l[0]
        );
    }
    // The ordinary ABI still works in the box.
    assert_eq!(sh(b, &id, "echo $$").await.exit.code, Some(0));
    b.destroy(&id).await.expect("destroy");
}
