//! Box lifecycle: berth's native backend against the tools people would otherwise use.

use crate::{ms, summarize, Summary};
use berth_sandbox::native::{NativeBackend, NativeConfig};
use berth_sandbox::{BoxConfig, ExecSpec, Image, Limits, Sandbox};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn time_cmd(argv: &[&str], runs: usize) -> anyhow::Result<Vec<Duration>> {
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let st = Command::new(argv[0])
            .args(&argv[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        v.push(t.elapsed());
        anyhow::ensure!(st.success(), "{argv:?} failed");
    }
    Ok(v)
}

/// The `bwrap` peer: all namespaces, `/usr` read-only, fresh `/proc` and `/dev`, `/bin/true`.
const BWRAP_TRUE: &[&str] = &[
    "bwrap",
    "--unshare-all",
    "--ro-bind",
    "/usr",
    "/usr",
    "--symlink",
    "usr/lib",
    "/lib",
    "--symlink",
    "usr/lib64",
    "/lib64",
    "--symlink",
    "usr/bin",
    "/bin",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "/bin/true",
];

/// Limits of every box the lifecycle benchmark makes (the same for each backend).
const BOX_LIMITS: Limits = Limits {
    cpus: 1.0,
    memory_mib: 256,
    disk_mib: 256,
    pids: 64,
};

/// A one-binary image (`/usr/bin/true` and its libraries) imported into Docker.
fn docker_image() -> anyhow::Result<&'static str> {
    let img = "berth-bench-true:latest";
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    for (src, dst) in [
        ("/usr/bin/true", "usr/bin/true"),
        (
            "/lib/x86_64-linux-gnu/libc.so.6",
            "lib/x86_64-linux-gnu/libc.so.6",
        ),
        ("/lib64/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2"),
    ] {
        let d = root.join(dst);
        std::fs::create_dir_all(d.parent().ok_or_else(|| anyhow::anyhow!("path"))?)?;
        std::fs::copy(src, &d)?;
    }
    let tar = Command::new("tar")
        .arg("-C")
        .arg(root)
        .args(["-cf", "-", "."])
        .stdout(Stdio::piped())
        .spawn()?;
    let st = Command::new("docker")
        .args(["import", "-", img])
        .stdin(tar.stdout.ok_or_else(|| anyhow::anyhow!("tar stdout"))?)
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "docker import failed (is dockerd running?)");
    Ok(img)
}

/// One box's life as the lifecycle rows measure it: create → exec `/bin/true` → destroy.
/// Returns how long after the start the create and the exec had ended.
async fn true_cycle<B: Sandbox>(b: &B, id: &str) -> anyhow::Result<(Duration, Duration)> {
    let t = Instant::now();
    b.create(BoxConfig {
        id: id.to_string(),
        image: Image::Host,
        limits: BOX_LIMITS,
        env: vec![],
        bridges: vec![],
    })
    .await?;
    let created = t.elapsed();
    let spec = ExecSpec {
        argv: vec!["/bin/true".into()],
        ..Default::default()
    };
    let out = b.exec(id, spec).await?.collect(None, 1024).await?;
    let execed = t.elapsed();
    b.destroy(id).await?;
    anyhow::ensure!(out.exit.success(), "exec failed");
    Ok((created, execed))
}

async fn native(runs: usize, pool_size: usize) -> anyhow::Result<Vec<Duration>> {
    let dir = tempfile::tempdir()?;
    let backend = NativeBackend::new(NativeConfig {
        data_dir: dir.path().to_path_buf(),
        helper: berth_sandbox::native::helper_beside(&std::env::current_exe()?),
        pool_size,
        disks: Default::default(),
    })?;
    let mut native = Vec::with_capacity(runs);
    let mut phases = [Vec::new(), Vec::new(), Vec::new()];
    for i in 0..runs + 10 {
        let t = Instant::now();
        let (t1, t2) = true_cycle(&backend, &format!("bench-{i}")).await?;
        let total = t.elapsed();
        if i >= 10 {
            native.push(total);
            phases[0].push(t1);
            phases[1].push(t2 - t1);
            phases[2].push(total - t2);
        }
        if pool_size > 0 {
            // Not timed: lets the pool's background formatting keep up, as it does when boxes
            // are not created back to back faster than one per ~15 ms.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for (name, mut v) in ["create", "exec", "destroy"].into_iter().zip(phases) {
        v.sort();
        eprintln!(
            "native (pool {pool_size}) {name}: median {} ms",
            ms(crate::percentile(&v, 0.5))
        );
    }
    Ok(native)
}

/// `n` boxes started together, each create → exec `/bin/true` → destroy, against `n` `bwrap`
/// runs started together: the wall time until the last one ends, for each.
async fn burst(n: usize) -> anyhow::Result<(Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let backend = std::sync::Arc::new(NativeBackend::new(NativeConfig {
        data_dir: dir.path().to_path_buf(),
        helper: berth_sandbox::native::helper_beside(&std::env::current_exe()?),
        pool_size: 8,
        disks: Default::default(),
    })?);
    // Untimed: the zygote, the template and the pool's first disks.
    true_cycle(&*backend, "burst-warm").await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend.own_descriptors() < 1 + 8 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    backend.settle().await;

    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let b = backend.clone();
        set.spawn(async move { true_cycle(&*b, &format!("burst-{i}")).await });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let berth = t.elapsed();
    backend.settle().await;

    let t = Instant::now();
    let children = (0..n)
        .map(|_| {
            Command::new(BWRAP_TRUE[0])
                .args(&BWRAP_TRUE[1..])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    for mut c in children {
        anyhow::ensure!(c.wait()?.success(), "bwrap failed");
    }
    Ok((berth, t.elapsed()))
}

/// berth's Docker backend (runc): create → exec `/bin/true` → destroy. Returns the timings and
/// the `host` image it made, for the by-hand comparison.
async fn docker_backend(runs: usize, name: &str, runtime: &str) -> anyhow::Result<Vec<Duration>> {
    use berth_sandbox::docker::{DockerBackend, DockerConfig};
    let dir = tempfile::tempdir()?;
    let backend = DockerBackend::new(DockerConfig {
        name: name.into(),
        runtime: runtime.into(),
        data_dir: dir.path().to_path_buf(),
        helper: berth_sandbox::native::helper_beside(&std::env::current_exe()?),
        socket: None,
    })
    .await?;
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs + 3 {
        let t = Instant::now();
        true_cycle(&backend, &format!("bench-{i}")).await?;
        if i >= 3 {
            out.push(t.elapsed());
        }
    }
    Ok(out)
}

/// The newest `berth-host` image (made by the docker backend).
fn berth_host_image() -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args([
            "images",
            "berth-host",
            "--format",
            "{{.Repository}}:{{.Tag}}",
        ])
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("no berth-host image"))
}

pub async fn run(runs: usize, docker_runs: usize) -> anyhow::Result<()> {
    let mut rows: Vec<Summary> = vec![
        summarize(
            "berth native, disk from the ready pool (create → exec → destroy)",
            native(runs, 8).await?,
        ),
        summarize(
            "berth native, disk formatted during create",
            native(runs, 0).await?,
        ),
    ];
    rows.push(summarize(
        "unshare -Upmnuic -f --mount-proc -r /bin/true",
        time_cmd(
            &[
                "unshare",
                "-U",
                "-p",
                "-m",
                "-n",
                "-u",
                "-i",
                "-C",
                "-f",
                "--mount-proc",
                "-r",
                "/bin/true",
            ],
            runs,
        )?,
    ));
    rows.push(summarize(
        "bwrap --unshare-all (ro /usr, proc, dev) /bin/true",
        time_cmd(BWRAP_TRUE, runs)?,
    ));
    if docker_runs > 0 {
        let img = docker_image()?;
        rows.push(summarize(
            "docker run --rm --network none (1-file image) /usr/bin/true",
            time_cmd(
                &[
                    "docker",
                    "run",
                    "--rm",
                    "--network",
                    "none",
                    img,
                    "/usr/bin/true",
                ],
                docker_runs,
            )?,
        ));
    }
    if docker_runs > 0 {
        let img = berth_host_image()?;
        for (name, runtime) in [("docker", "runc"), ("gvisor", "runsc")] {
            let berth = summarize(
                &format!("berth {name} backend ({runtime}), host image (create → exec → destroy)"),
                docker_backend(docker_runs, name, runtime).await?,
            );
            let by_hand = summarize(
                &format!("docker run --rm --runtime {runtime} by hand, same image, binds and limits, /bin/true"),
                time_cmd(
                    &[
                        "docker",
                        "run",
                        "--rm",
                        "--runtime",
                        runtime,
                        "--network",
                        "none",
                        "--read-only",
                        "--cap-drop",
                        "ALL",
                        "--security-opt",
                        "no-new-privileges",
                        "--user",
                        "1000:1000",
                        "--memory",
                        "256m",
                        "--memory-swap",
                        "256m",
                        "--pids-limit",
                        "64",
                        "--cpus",
                        "1",
                        "-v",
                        "/usr:/usr:ro",
                        "-v",
                        "/opt:/opt:ro",
                        &img,
                        "/bin/true",
                    ],
                    docker_runs,
                )?,
            );
            eprintln!(
                "berth {name} backend ÷ docker run --runtime {runtime} by hand (medians): {:.3}",
                berth.median.as_secs_f64() / by_hand.median.as_secs_f64()
            );
            rows.push(berth);
            rows.push(by_hand);
        }
    }
    let base = rows[0].median;
    println!("| what | runs | median ms | p99 ms | berth median ÷ this median |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.2} |",
            r.name,
            r.n,
            ms(r.median),
            ms(r.p99),
            base.as_secs_f64() / r.median.as_secs_f64()
        );
    }
    let n = BURST;
    let (berth, bwrap) = burst(n).await?;
    println!();
    println!("| {n} started together, each to its end | wall ms | per box ms | ÷ bwrap |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, wall) in [
        ("berth native: create → exec `/bin/true` → destroy", berth),
        ("bwrap (as above) /bin/true", bwrap),
    ] {
        println!(
            "| {name} | {} | {} | {:.2} |",
            ms(wall),
            ms(wall / n as u32),
            wall.as_secs_f64() / bwrap.as_secs_f64()
        );
    }
    Ok(())
}

/// Boxes started together in the burst row.
const BURST: usize = 50;

/// Seconds the file workload takes inside one box of `backend`: `files` files of 1 KiB
/// written into a fresh directory, then all read back (timed inside the box, by the shell).
async fn io_in<B: Sandbox>(backend: &B, id: &str, files: usize) -> anyhow::Result<f64> {
    backend
        .create(BoxConfig {
            id: id.to_string(),
            image: Image::Host,
            limits: Limits {
                cpus: 1.0,
                memory_mib: 1024,
                disk_mib: 1024,
                pids: 256,
            },
            env: vec![],
            bridges: vec![],
        })
        .await?;
    // Shell builtins only in the loop (no process per file): open, write 1 KiB, close.
    let script = format!(
        "s=$(date +%s.%N); mkdir /workspace/f; i=0; \
         while [ $i -lt {files} ]; do printf '%1024s' x > /workspace/f/$i; i=$((i+1)); done; \
         cat /workspace/f/* > /dev/null; e=$(date +%s.%N); awk \"BEGIN {{ print $e - $s }}\""
    );
    let run = async {
        backend
            .exec(
                id,
                ExecSpec {
                    argv: vec!["/bin/sh".into(), "-c".into(), script],
                    timeout: Some(Duration::from_secs(600)),
                    ..Default::default()
                },
            )
            .await?
            .collect(None, 1 << 16)
            .await
    };
    let out = run.await;
    backend.destroy(id).await?;
    let out = out?;
    anyhow::ensure!(
        out.exit.success(),
        "workload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// The file-heavy workload on native, Docker (runc) and gVisor (runsc), same run.
pub async fn io(files: usize) -> anyhow::Result<()> {
    use berth_sandbox::docker::{DockerBackend, DockerConfig};
    let dir = tempfile::tempdir()?;
    let helper = berth_sandbox::native::helper_beside(&std::env::current_exe()?);
    let native = NativeBackend::new(NativeConfig {
        data_dir: dir.path().join("n"),
        helper: helper.clone(),
        pool_size: 0,
        disks: Default::default(),
    })?;
    let tag = std::process::id();
    let mut rows = vec![(
        "native",
        io_in(&native, &format!("io-native-{tag}"), files).await?,
    )];
    for (name, runtime) in [("docker", "runc"), ("gvisor", "runsc")] {
        let b = DockerBackend::new(DockerConfig {
            name: name.into(),
            runtime: runtime.into(),
            data_dir: dir.path().join(name),
            helper: helper.clone(),
            socket: None,
        })
        .await?;
        rows.push((name, io_in(&b, &format!("io-{name}-{tag}"), files).await?));
    }
    println!("| backend | write + read {files} files of 1 KiB, s | ÷ native |");
    println!("| --- | ---: | ---: |");
    for (name, secs) in &rows {
        println!("| {name} | {secs:.2} | {:.2} |", secs / rows[0].1);
    }
    Ok(())
}
