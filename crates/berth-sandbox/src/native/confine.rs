//! Confinement applied to every process the supervisor starts inside a box: a fresh session,
//! no capabilities (bounding set emptied, uid switched away from 0), `no_new_privs`, Landlock
//! write restrictions and a seccomp filter.
//!
//! Everything that allocates is prepared in [`Confinement::prepare`]; the
//! [`Confinement::apply`] step runs in the child between its start and `exec` and makes only
//! raw system calls (no allocation, no lock, no libc wrapper that signals other threads): it
//! is safe in a child that shares the supervisor's memory (`CLONE_VM`, see [`super::spawn`]).

use landlock::{
    path_beneath_rules, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreated,
    RulesetCreatedAttr, ABI,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::io;

/// The Landlock ABI berth asks for; older kernels get the best they support.
const LANDLOCK_ABI: ABI = ABI::V5;

pub struct Confinement {
    /// The Landlock ruleset, if the kernel has Landlock.
    ruleset: Option<std::os::fd::OwnedFd>,
    filters: std::sync::Arc<Vec<BpfProgram>>,
    uid: u32,
    /// The supervisor runs as root in its namespace (native) and switches every process to
    /// `uid`; unprivileged (a container started as the agent user, no capabilities), there is
    /// nothing to drop and processes keep the supervisor's uid.
    privileged: bool,
}

/// The seccomp programs are the same for every process: compiled once per supervisor.
fn filters() -> io::Result<std::sync::Arc<Vec<BpfProgram>>> {
    static FILTERS: std::sync::OnceLock<Result<std::sync::Arc<Vec<BpfProgram>>, String>> =
        std::sync::OnceLock::new();
    FILTERS
        .get_or_init(|| {
            let a = enosys_filter().map_err(|e| e.to_string())?;
            let b = eperm_filter().map_err(|e| e.to_string())?;
            Ok(std::sync::Arc::new(vec![
                with_x32_prologue(a),
                with_x32_prologue(b),
            ]))
        })
        .clone()
        .map_err(io::Error::other)
}

/// Compile the seccomp programs now (the zygote does, so that every box inherits them).
pub(crate) fn prewarm() {
    let _ = filters();
}

/// Landlock rulesets by writable-path list; each exec restricts itself with a clone of one.
fn ruleset_for(writable: &[String]) -> io::Result<RulesetCreated> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static CACHE: std::sync::OnceLock<Mutex<HashMap<Vec<String>, RulesetCreated>>> =
        std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = cache
        .lock()
        .map_err(|_| io::Error::other("ruleset cache poisoned"))?;
    if let Some(r) = map.get(writable) {
        return r.try_clone();
    }
    let write = AccessFs::from_write(LANDLOCK_ABI);
    let mut paths: Vec<String> = writable.to_vec();
    // Character devices every program expects to write to.
    for dev in ["/dev/null", "/dev/zero", "/dev/full", "/dev/tty"] {
        paths.push(dev.to_string());
    }
    let ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(write)
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(&paths, write)))
        .map_err(io::Error::other)?;
    let copy = ruleset.try_clone()?;
    if map.len() < 64 {
        map.insert(writable.to_vec(), ruleset);
    }
    Ok(copy)
}

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// System calls no agent process may make. This covers everything Docker's default seccomp
/// profile refuses to a container without extra capabilities, plus `ptrace`, `io_uring` and the
/// new mount API, which Docker allows or did not know.
fn denied_syscalls() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_acct,
        libc::SYS_add_key,
        libc::SYS_bpf,
        libc::SYS_clock_adjtime,
        libc::SYS_clock_settime,
        libc::SYS_delete_module,
        libc::SYS_finit_module,
        libc::SYS_init_module,
        libc::SYS_get_mempolicy,
        libc::SYS_set_mempolicy,
        libc::SYS_mbind,
        libc::SYS_move_pages,
        libc::SYS_kcmp,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_keyctl,
        libc::SYS_request_key,
        libc::SYS_lookup_dcookie,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_name_to_handle_at,
        libc::SYS_open_by_handle_at,
        libc::SYS_perf_event_open,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_ptrace,
        libc::SYS_quotactl,
        libc::SYS_reboot,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_settimeofday,
        libc::SYS_adjtimex,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_syslog,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_fanotify_init,
        libc::SYS_personality,
        libc::SYS_vhangup,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_nfsservctl,
        libc::SYS_uselib,
        libc::SYS_ustat,
        libc::SYS_sysfs,
        libc::SYS__sysctl,
        libc::SYS_vserver,
        libc::SYS_tuxcall,
        libc::SYS_afs_syscall,
        libc::SYS_security,
    ]);
    v
}

/// The only address families `socket`/`socketpair` accept inside a box; every other one
/// (netlink, vsock, packet, key, alg, tipc, rds, xdp, can, bluetooth...) is kernel attack
/// surface a box has no use for. glibc's resolver falls back without netlink.
pub(crate) const ALLOWED_SOCKET_FAMILIES: [libc::c_int; 3] =
    [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6];

/// Bit 30 of the syscall number selects the x32 ABI on x86_64. seccompiler checks only the
/// audit arch (x32 calls report `AUDIT_ARCH_X86_64`) and compares raw numbers, so on a kernel
/// with x32 enabled `syscall(0x4000_0000 | nr)` would pass every rule of a default-allow
/// filter. Hand-written because seccompiler has no way to express a range of numbers.
pub(crate) const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const SECCOMP_DATA_NR_OFFSET: u32 = 0;

/// Prefixes `program` with: load `seccomp_data.nr`; if `nr >= X32_SYSCALL_BIT` return EPERM;
/// else fall through to `program` (whose jumps are relative, so it is unchanged). Numbers this
/// large are x32 (x86_64) or invalid (aarch64 tops out near 500), so refusing them costs nothing.
fn with_x32_prologue(program: BpfProgram) -> BpfProgram {
    use seccompiler::sock_filter;
    // BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JGE|BPF_K, BPF_RET|BPF_K (linux/filter.h).
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JGE_K: u16 = 0x35;
    const BPF_RET_K: u16 = 0x06;
    let mut out = vec![
        sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: SECCOMP_DATA_NR_OFFSET,
        },
        // True: the next instruction (the refusal); false: skip it.
        sock_filter {
            code: BPF_JMP_JGE_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
    ];
    out.extend(program);
    out
}

/// A condition on an `unsigned int` argument (ioctl's `cmd`): only the low 32 bits are
/// compared, as the kernel reads only those — a 64-bit compare lets `cmd | 1 << 32` through
/// (CVE-2019-10063).
fn cond_u32(
    arg: u8,
    op: SeccompCmpOp,
    val: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, val)
}

fn cond(
    arg: u8,
    op: SeccompCmpOp,
    val: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, val)
}

/// The EPERM filter: unconditional denials, `clone` with any namespace flag, the
/// terminal-injection ioctls and btrfs's.
fn eperm_filter() -> Result<BpfProgram, seccompiler::Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in denied_syscalls() {
        rules.insert(nr, vec![]);
    }
    let ns_flags: [u64; 7] = [
        libc::CLONE_NEWNS as u64,
        libc::CLONE_NEWUTS as u64,
        libc::CLONE_NEWIPC as u64,
        libc::CLONE_NEWUSER as u64,
        libc::CLONE_NEWPID as u64,
        libc::CLONE_NEWNET as u64,
        libc::CLONE_NEWCGROUP as u64,
    ];
    let mut clone_rules = Vec::new();
    for f in ns_flags {
        clone_rules.push(SeccompRule::new(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(f),
            f,
        )?])?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    rules.insert(
        libc::SYS_ioctl,
        vec![
            SeccompRule::new(vec![cond_u32(1, SeccompCmpOp::Eq, libc::TIOCSTI)?])?,
            SeccompRule::new(vec![cond_u32(1, SeccompCmpOp::Eq, libc::TIOCLINUX)?])?,
            // Every btrfs ioctl: a box on a shared btrfs (`shared_disk.rs`) that made a
            // subvolume or snapshot would write outside its qgroup's limit. (Reflinks share
            // the type and go too: `cp` falls back to copying.)
            SeccompRule::new(vec![cond_u32(
                1,
                SeccompCmpOp::MaskedEq(0xff00),
                super::shared_disk::BTRFS_IOCTL_MAGIC << 8,
            )?])?,
        ],
    );
    // Device nodes: the kernel refuses them without CAP_MKNOD, but a user-space kernel
    // (gVisor's tmpfs) may not; FIFOs and sockets (`mkfifo`) stay allowed.
    let ifmt = libc::S_IFMT as u64;
    for (nr, mode_arg) in [(libc::SYS_mknod, 1), (libc::SYS_mknodat, 2)] {
        rules.insert(
            nr,
            vec![
                SeccompRule::new(vec![cond(
                    mode_arg,
                    SeccompCmpOp::MaskedEq(ifmt),
                    libc::S_IFCHR as u64,
                )?])?,
                SeccompRule::new(vec![cond(
                    mode_arg,
                    SeccompCmpOp::MaskedEq(ifmt),
                    libc::S_IFBLK as u64,
                )?])?,
            ],
        );
    }
    // A negative nice value (raising priority): the kernel wants CAP_SYS_NICE, gVisor does not.
    rules.insert(
        libc::SYS_setpriority,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0x8000_0000),
            0x8000_0000,
        )?])?],
    );
    // Socket families: an allowlist. One rule whose conditions all hold (they are ANDed) when
    // the family is none of the allowed ones.
    let mut not_allowed = Vec::new();
    for family in ALLOWED_SOCKET_FAMILIES {
        not_allowed.push(SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Ne,
            family as u64,
        )?);
    }
    let socket_rules = vec![SeccompRule::new(not_allowed)?];
    rules.insert(libc::SYS_socket, socket_rules.clone());
    rules.insert(libc::SYS_socketpair, socket_rules);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        ARCH,
    )?;
    filter.try_into().map_err(seccompiler::Error::Backend)
}

/// `clone3` answers ENOSYS (as under Docker) so libc falls back to `clone`, whose flags the
/// EPERM filter can inspect.
fn enosys_filter() -> Result<BpfProgram, seccompiler::Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_clone3, vec![]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        ARCH,
    )?;
    filter.try_into().map_err(seccompiler::Error::Backend)
}

/// Whether the running kernel enforces Landlock.
pub fn landlock_supported() -> bool {
    Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_write(ABI::V1))
        .and_then(|r| r.create())
        .is_ok()
}

/// Whether a Landlock error means the kernel has no Landlock at all (`ENOSYS`/`EOPNOTSUPP`).
fn landlock_missing(e: &dyn std::fmt::Display) -> bool {
    let text = e.to_string();
    [
        "os error 38",
        "os error 95",
        "not implemented",
        "not supported",
    ]
    .iter()
    .any(|m| text.contains(m))
}

impl Confinement {
    /// Builds the filters and the Landlock ruleset for a process running as `uid` that may
    /// write only beneath `writable` (paths inside the box).
    pub fn prepare(uid: u32, writable: &[String]) -> io::Result<Confinement> {
        if uid == 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "processes in a box never run as uid 0",
            ));
        }
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let privileged = euid == 0;
        if !privileged && uid != euid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("this box runs processes as uid {euid} only"),
            ));
        }
        let filters = filters()?;
        let ruleset = match ruleset_for(writable) {
            Ok(r) => Some(r),
            // No Landlock in this kernel (gVisor): reported in the backend's capabilities.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
                ) || landlock_missing(&e) =>
            {
                None
            }
            Err(e) => return Err(e),
        };
        Ok(Confinement {
            ruleset: ruleset.and_then(Option::<std::os::fd::OwnedFd>::from),
            filters,
            uid,
            privileged,
        })
    }

    /// Runs in the child between its start and `exec`. Returns the errno of the step that
    /// failed.
    ///
    /// # Safety
    /// Must only be called in a freshly started child that is about to `exec`; it may share
    /// the supervisor's memory.
    pub unsafe fn apply(&self) -> Result<(), i32> {
        // SAFETY: raw system calls on the calling child only, on memory it does not change.
        unsafe {
            check(libc::setsid() as libc::c_long)?;
            // The box's OOM killer may pick this process (the supervisor shields itself).
            let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
            if fd >= 0 {
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
            if self.privileged {
                drop_privileges(self.uid)?;
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;
            if let Some(r) = &self.ruleset {
                use std::os::fd::AsRawFd;
                check(libc::syscall(
                    libc::SYS_landlock_restrict_self,
                    r.as_raw_fd(),
                    0,
                ))?;
            }
            for f in self.filters.iter() {
                let prog = libc::sock_fprog {
                    len: f.len() as u16,
                    filter: f.as_ptr() as *mut libc::sock_filter,
                };
                check(libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &prog as *const libc::sock_fprog,
                ))?;
            }
        }
        Ok(())
    }
}

/// A raw system call's result: its errno when it failed.
fn check(r: libc::c_long) -> Result<(), i32> {
    if r < 0 {
        // SAFETY: reading this thread's errno.
        Err(unsafe { *libc::__errno_location() })
    } else {
        Ok(())
    }
}

/// Set once the supervisor has emptied its own bounding set (children inherit it).
static BOUNDING_SET_EMPTY: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Empty the calling process's capability bounding set: no process it starts can gain a
/// capability through `exec`. The supervisor does this once at start (it never execs and
/// keeps its effective capabilities), sparing every exec ~40 system calls.
pub fn empty_bounding_set() -> io::Result<()> {
    // SAFETY: prctl on the calling thread.
    unsafe { drop_bounding_set() }.map_err(io::Error::from_raw_os_error)?;
    BOUNDING_SET_EMPTY.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

/// # Safety
/// Raw prctl calls on the calling thread.
unsafe fn drop_bounding_set() -> Result<(), i32> {
    for cap in 0..=63 {
        // SAFETY: as the function's contract.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            // SAFETY: reading this thread's errno.
            let e = unsafe { *libc::__errno_location() };
            if e == libc::EINVAL {
                break; // past the last capability this kernel knows
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Empty the capability sets and switch every id to `uid`, with raw system calls: glibc's
/// `setresuid` and `setgroups` signal every thread of the process, which a child sharing the
/// supervisor's memory must not do.
///
/// # Safety
/// As [`Confinement::apply`].
unsafe fn drop_privileges(uid: u32) -> Result<(), i32> {
    // SAFETY: raw system calls on the calling child.
    unsafe {
        if !BOUNDING_SET_EMPTY.load(std::sync::atomic::Ordering::SeqCst) {
            drop_bounding_set()?;
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) < 0
        {
            // A kernel without ambient capabilities (gVisor's) has none to clear.
            let e = *libc::__errno_location();
            if e != libc::EINVAL {
                return Err(e);
            }
        }
        check(libc::syscall(
            libc::SYS_setgroups,
            0,
            std::ptr::null::<libc::gid_t>(),
        ))?;
        check(libc::syscall(libc::SYS_setresgid, uid, uid, uid))?;
        // Switching every uid away from 0 clears the permitted and effective sets.
        check(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_and_root_is_refused() {
        assert!(eperm_filter().is_ok());
        assert!(enosys_filter().is_ok());
        assert!(Confinement::prepare(0, &[]).is_err());
        assert!(denied_syscalls().contains(&libc::SYS_mount));
    }

    /// A classic-BPF interpreter for the instructions seccompiler and the prologue emit, run
    /// over a `seccomp_data` of (nr, native arch, args).
    fn eval(prog: &[seccompiler::sock_filter], nr: u32, args: [u64; 6]) -> u32 {
        let arch: u32 = match ARCH {
            TargetArch::x86_64 => 0xC000_003E,
            _ => 0xC000_00B7,
        };
        let word = |off: u32| -> u32 {
            match off {
                0 => nr,
                4 => arch,
                o if (16..64).contains(&o) => {
                    let a = args[((o - 16) / 8) as usize];
                    if (o - 16) % 8 == 0 {
                        a as u32
                    } else {
                        (a >> 32) as u32
                    }
                }
                o => panic!("load from offset {o}"),
            }
        };
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = &prog[pc];
            pc += 1;
            let jump = |taken: bool| if taken { i.jt } else { i.jf } as usize;
            match i.code {
                0x20 => acc = word(i.k),
                0x54 => acc &= i.k,
                0x05 => pc += i.k as usize,
                0x15 => pc += jump(acc == i.k),
                0x25 => pc += jump(acc > i.k),
                0x35 => pc += jump(acc >= i.k),
                0x45 => pc += jump(acc & i.k != 0),
                0x06 => return i.k,
                c => panic!("instruction {c:#x}"),
            }
        }
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;

    /// Every x32 number is refused by both programs, before any rule; the x86_64 numbers still
    /// reach the compiled rules.
    #[test]
    fn x32_numbers_are_refused_before_the_rules() {
        let progs = filters().expect("filters");
        for prog in progs.iter() {
            assert_eq!(prog[0].code, 0x20, "the prologue loads nr first");
            assert_eq!(prog[0].k, 0);
            for nr in [
                libc::SYS_getpid,
                libc::SYS_unshare,
                libc::SYS_bpf,
                libc::SYS_io_uring_setup,
                libc::SYS_socket,
            ] {
                let x32 = X32_SYSCALL_BIT | nr as u32;
                assert_eq!(eval(prog, x32, [0; 6]), EPERM, "x32 {nr}");
            }
            assert_eq!(eval(prog, u32::MAX, [0; 6]), EPERM);
            assert_eq!(eval(prog, libc::SYS_getpid as u32, [0; 6]), ALLOW);
        }
        let eperm = &progs[1];
        assert_eq!(eval(eperm, libc::SYS_unshare as u32, [0; 6]), EPERM);
        assert_eq!(
            eval(
                eperm,
                libc::SYS_clone as u32,
                [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0]
            ),
            EPERM
        );
    }

    /// `socket` and `socketpair` accept only the allowlisted families.
    #[test]
    fn socket_families_are_an_allowlist() {
        let progs = filters().expect("filters");
        let eperm = &progs[1];
        for nr in [libc::SYS_socket, libc::SYS_socketpair] {
            for fam in ALLOWED_SOCKET_FAMILIES {
                let args = [fam as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0];
                assert_eq!(eval(eperm, nr as u32, args), ALLOW, "family {fam}");
            }
            for fam in [
                libc::AF_UNSPEC,
                libc::AF_NETLINK,
                libc::AF_PACKET,
                libc::AF_KEY,
                libc::AF_ALG,
                libc::AF_TIPC,
                libc::AF_RDS,
                libc::AF_BLUETOOTH,
                libc::AF_XDP,
                libc::AF_CAN,
                libc::AF_VSOCK,
                libc::AF_INET | 0x100,
                45,
                255,
            ] {
                let args = [fam as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0];
                assert_eq!(eval(eperm, nr as u32, args), EPERM, "family {fam}");
            }
        }
    }
}
