//! `berth-escape-probe`: tries, from inside a box, what an escaping agent would try, and prints
//! one `name=ok|errno` line per attempt. The sandbox tests copy it into boxes; it is also handy
//! for checking a host's own configuration by hand.
use std::ffi::CString;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn report(name: &str, rc: i64) {
    if rc < 0 {
        println!("{name}=errno{}", errno());
    } else {
        println!("{name}=ok");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("escape");
    match mode {
        "escape" => escape(),
        "forks" => forks(args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000)),
        "alloc" => alloc(args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2048)),
        _ => eprintln!("usage: berth-escape-probe [escape|forks N|alloc MIB]"),
    }
}

fn escape() {
    let c = |s: &str| CString::new(s).unwrap_or_default();
    // SAFETY: each call is a plain system call with valid (or null) pointers; failure is the
    // expected outcome and is only reported.
    unsafe {
        report(
            "mount",
            libc::mount(
                c("none").as_ptr(),
                c("/tmp").as_ptr(),
                c("tmpfs").as_ptr(),
                0,
                std::ptr::null(),
            ) as i64,
        );
        report(
            "umount",
            libc::umount2(c("/proc").as_ptr(), libc::MNT_DETACH) as i64,
        );
        report(
            "ptrace_traceme",
            libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0),
        );
        report(
            "ptrace_attach_pid1",
            libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0),
        );
        report(
            "init_module",
            libc::syscall(
                libc::SYS_init_module,
                std::ptr::null::<u8>(),
                0,
                c("").as_ptr(),
            ),
        );
        report(
            "finit_module",
            libc::syscall(libc::SYS_finit_module, -1, c("").as_ptr(), 0),
        );
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        report(
            "clock_settime",
            libc::clock_settime(libc::CLOCK_REALTIME, &ts) as i64,
        );
        report("setuid0", libc::setuid(0) as i64);
        report("unshare_user", libc::unshare(libc::CLONE_NEWUSER) as i64);
        report("unshare_net", libc::unshare(libc::CLONE_NEWNET) as i64);
        report("chroot", libc::chroot(c("/tmp").as_ptr()) as i64);
        report("sethostname", libc::sethostname(c("x").as_ptr(), 1) as i64);
        report("reboot", libc::reboot(libc::RB_POWER_OFF) as i64);
        report(
            "bpf",
            libc::syscall(libc::SYS_bpf, 0, std::ptr::null::<u8>(), 0),
        );
        report(
            "io_uring_setup",
            libc::syscall(libc::SYS_io_uring_setup, 1, std::ptr::null::<u8>()),
        );
        report("keyctl", libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0));
        report(
            "socket_packet",
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) as i64,
        );
        report(
            "mknod",
            libc::mknod(
                c("/tmp/probe-null").as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(1, 3),
            ) as i64,
        );
        report(
            "perf_event_open",
            libc::syscall(
                libc::SYS_perf_event_open,
                std::ptr::null::<u8>(),
                0,
                -1,
                -1,
                0,
            ),
        );
        let fd = libc::open(c("/dev/tty").as_ptr(), libc::O_RDWR);
        let ch: u8 = b'x';
        report("tiocsti", libc::ioctl(fd.max(0), libc::TIOCSTI, &ch) as i64);
        report(
            "write_etc",
            libc::open(
                c("/etc/probe").as_ptr(),
                libc::O_CREAT | libc::O_WRONLY,
                0o644,
            ) as i64,
        );
        report(
            "write_root",
            libc::open(c("/probe").as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644) as i64,
        );
        report(
            "write_run",
            libc::open(
                c("/run/berth/probe").as_ptr(),
                libc::O_CREAT | libc::O_WRONLY,
                0o644,
            ) as i64,
        );
        report(
            "write_workspace",
            libc::open(
                c("/workspace/probe-file").as_ptr(),
                libc::O_CREAT | libc::O_WRONLY,
                0o644,
            ) as i64,
        );
        let fd = libc::open(c("/etc/shadow").as_ptr(), libc::O_RDONLY);
        if fd < 0 {
            report("read_shadow", -1);
        } else {
            let mut buf = [0u8; 64];
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            println!("read_shadow={}", if n > 0 { "ok" } else { "errno-empty" });
        }
        // A btrfs subvolume of its own (it would have a qgroup outside the box's limit where
        // boxes' disks are subvolumes of a shared btrfs): BTRFS_IOC_SUBVOL_CREATE.
        let ws = libc::open(c("/workspace").as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
        let mut args = [0u8; 4096];
        args[8..17].copy_from_slice(b"probe-sub");
        report(
            "btrfs_subvol_create",
            libc::ioctl(ws.max(0), 0x5000_940e, args.as_mut_ptr()) as i64,
        );
        report("kill_pid1", libc::kill(1, libc::SIGKILL) as i64);
        report(
            "setpriority_neg",
            libc::setpriority(libc::PRIO_PROCESS, 0, -10) as i64,
        );
    }
}

fn forks(n: usize) {
    let mut ok = 0;
    let mut first_err = 0;
    let mut kids = Vec::new();
    for _ in 0..n {
        // SAFETY: the child only pauses until it is killed.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            loop {
                // SAFETY: pause in the child.
                unsafe { libc::pause() };
            }
        } else if pid < 0 {
            first_err = errno();
            break;
        } else {
            ok += 1;
            kids.push(pid);
        }
    }
    for k in kids {
        // SAFETY: killing and reaping our own children.
        unsafe {
            libc::kill(k, libc::SIGKILL);
            libc::waitpid(k, std::ptr::null_mut(), 0);
        }
    }
    println!("forks={ok} errno={first_err}");
}

fn alloc(mib: usize) {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    for i in 0..mib {
        chunks.push(vec![1u8; 1024 * 1024]);
        if i % 64 == 0 {
            println!("allocated={i}");
        }
    }
    println!("allocated_all={}", chunks.len());
}
