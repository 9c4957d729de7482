//! 200 boxes alive at once, then destroyed with nothing left behind (its own test binary, so
//! that fd and process counts are not disturbed by other tests).

use berth_sandbox::conformance::{config, sh};
use berth_sandbox::native::{disk, NativeBackend, NativeConfig};
use berth_sandbox::{Limits, Sandbox};
use std::sync::Arc;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_boxes_then_nothing_leaked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_path_buf();
    let b = Arc::new(
        NativeBackend::new(NativeConfig {
            data_dir: data.clone(),
            helper: env!("CARGO_BIN_EXE_berth-box-init").into(),
            pool_size: 4,
            disks: Default::default(),
        })
        .expect("backend"),
    );
    // Descriptors besides the backend's own (its zygote socket, its pool's ready disks).
    let fds_before = open_fds() - b.own_descriptors();
    let limits = Limits {
        cpus: 0.5,
        memory_mib: 64,
        disk_mib: 32,
        pids: 32,
    };
    let ids: Vec<String> = (0..200)
        .map(|i| format!("s{}-{i}", std::process::id()))
        .collect();
    for chunk in ids.chunks(8) {
        let mut set = tokio::task::JoinSet::new();
        for id in chunk {
            let b = b.clone();
            let id = id.clone();
            set.spawn(async move { b.create(config(&id, limits)).await.map(|_| id) });
        }
        while let Some(r) = set.join_next().await {
            r.expect("join").expect("create");
        }
    }
    // The backend holds one descriptor per live box (its report socket, which is its log too);
    // a few more may be the pool's disks being formatted (not yet counted as its own).
    let held = open_fds() as isize - b.own_descriptors() as isize - fds_before as isize;
    let n = ids.len() as isize;
    assert!(
        (n - 3..=n + 10).contains(&held),
        "{held} descriptors held for {} boxes",
        ids.len()
    );
    // All 200 are alive and answer.
    for id in ids.iter().step_by(20) {
        let out = sh(&*b, id, "echo alive").await;
        assert_eq!(out.stdout, b"alive\n");
    }
    // Their disks are subvolumes of the shared btrfs (the default where the host has it).
    assert_eq!(b.shared_subvolumes(), Some(ids.len()));
    let pids: Vec<i32> = ids.iter().map(|id| b.pid1(id).expect("pid")).collect();
    for p in &pids {
        assert!(std::path::Path::new(&format!("/proc/{p}")).exists());
    }
    let mut set = tokio::task::JoinSet::new();
    for id in ids.clone() {
        let b = b.clone();
        set.spawn(async move { b.destroy(&id).await });
    }
    while let Some(r) = set.join_next().await {
        r.expect("join").expect("destroy");
    }

    // Nothing left: processes, cgroups, loop devices, mounts, files, fds (loop devices and files
    // are released just after `destroy` returns; `settle` waits for that).
    b.settle().await;
    for p in &pids {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        assert!(
            status.is_empty() || status.contains("State:\tZ"),
            "box init {p} still alive"
        );
    }
    for id in &ids {
        assert!(
            !berth_sandbox::native::cgroup::BoxCgroup::load(id).exists(),
            "cgroup of {id} left"
        );
        let img = data.join("native/boxes").join(id).join("disk.img");
        assert!(
            disk::loop_devices_for(&img).is_empty(),
            "loop device of {id} left"
        );
    }
    assert_eq!(b.shared_subvolumes(), Some(0), "subvolumes left");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&*data.to_string_lossy()),
        "a mount under the data dir is left"
    );
    let left: Vec<_> = std::fs::read_dir(data.join("native/boxes"))
        .expect("boxes dir")
        .collect();
    assert!(left.is_empty(), "box directories left: {left:?}");
    let fds_after = open_fds() - b.own_descriptors();
    assert!(
        fds_after <= fds_before + 2,
        "fds before {fds_before}, after {fds_after} (besides the backend's own)"
    );
}
