//! A throw-away PostgreSQL cluster for tests (feature `testing`): `initdb` in a temporary
//! directory, the server run as the `postgres` user on a free loopback port, stopped (and the
//! directory removed) on drop. Tests that restart PostgreSQL use one of these rather than the
//! cluster `scripts/test` shares between tests.

use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
#[error("test PostgreSQL: {0}")]
pub struct ClusterError(String);

fn err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError(e.to_string())
}

pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    uid: u32,
    gid: u32,
    pub port: u16,
    password: String,
    child: Option<Child>,
}

/// The newest installed PostgreSQL's programs (Debian: /usr/lib/postgresql/<major>/bin).
fn bin_dir() -> Result<PathBuf, ClusterError> {
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            err(format!(
                "no PostgreSQL installed (apt-get install postgresql): {e}"
            ))
        })?
        .filter_map(|d| d.ok())
        .filter_map(|d| {
            let n = d.file_name().to_str()?.parse().ok()?;
            Some((n, d.path().join("bin")))
        })
        .filter(|(_, p)| p.join("postgres").exists())
        .collect();
    majors.sort();
    majors
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| err("no PostgreSQL server binaries"))
}

/// uid and gid of the `postgres` user (PostgreSQL refuses to run as root).
fn postgres_user() -> Result<(u32, u32), ClusterError> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(err)?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"postgres") && f.len() > 3)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .ok_or_else(|| err("no postgres user"))
}

/// 32 hex digits from the kernel's random source.
fn random_password() -> Result<String, ClusterError> {
    let mut b = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(err)?,
        &mut b,
    )
    .map_err(err)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl PgCluster {
    pub fn start() -> Result<PgCluster, ClusterError> {
        let bin = bin_dir()?;
        let (uid, gid) = postgres_user()?;
        let dir = tempfile::tempdir().map_err(err)?;
        chown(dir.path(), Some(uid), Some(gid)).map_err(err)?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(err)?;
        // A password, not `trust`: any local user could otherwise connect as the superuser
        // (and run programs as `postgres`) while the tests run.
        let password = random_password()?;
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{password}\n")).map_err(err)?;
        chown(&pwfile, Some(uid), Some(gid)).map_err(err)?;
        let out = Command::new(bin.join("initdb"))
            .arg(format!("--pwfile={}", pwfile.display()))
            .args([
                "-A",
                "scram-sha-256",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(dir.path().join("data"))
            .current_dir(dir.path())
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .output()
            .map_err(err)?;
        if !out.status.success() {
            return Err(err(String::from_utf8_lossy(&out.stderr)));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(err)?
            .port();
        std::fs::remove_file(&pwfile).map_err(err)?;
        let mut c = PgCluster {
            password,
            dir,
            bin,
            uid,
            gid,
            port,
            child: None,
        };
        c.run()?;
        Ok(c)
    }

    /// `postgres://postgres:<password>@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/postgres",
            self.password, self.port
        )
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&mut self) -> Result<(), ClusterError> {
        let log = std::fs::File::create(self.dir.path().join("log")).map_err(err)?;
        chown(self.dir.path().join("log"), Some(self.uid), Some(self.gid)).map_err(err)?;
        let child = Command::new(self.bin.join("postgres"))
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            // Durable against the process dying (what the restart tests do), not power loss:
            // no fsync keeps a test cluster fast.
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=400"])
            .current_dir(self.dir.path())
            .uid(self.uid)
            .gid(self.gid)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(err)?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(err(format!("postgres exited ({st}): {}", self.log())));
            }
            if Instant::now() > deadline {
                return Err(err(format!("postgres not ready in 30 s: {}", self.log())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Stop the server as a crash would (SIGQUIT: immediate shutdown, no checkpoint; what was
    /// committed is in the WAL) and wait for it to exit.
    pub fn crash(&mut self) -> Result<(), ClusterError> {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling the server this cluster started.
            unsafe { libc::kill(c.id() as i32, libc::SIGQUIT) };
            c.wait().map_err(err)?;
        }
        Ok(())
    }

    /// Start it again on the same port (after [`PgCluster::crash`]).
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        self.crash()?;
        // A server stopped this way leaves its pid file; postgres checks the pid is gone.
        self.run()
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Restart it taking only TLS connections (a self-signed certificate made with `openssl`;
    /// plain TCP refused by `pg_hba.conf`), as managed PostgreSQL services commonly require.
    pub fn restart_tls_only(&mut self) -> Result<(), ClusterError> {
        self.crash()?;
        let data = self.data();
        let (crt, key) = (data.join("server.crt"), data.join("server.key"));
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=127.0.0.1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .output()
            .map_err(err)?;
        if !out.status.success() {
            return Err(err(String::from_utf8_lossy(&out.stderr)));
        }
        for f in [&crt, &key] {
            chown(f, Some(self.uid), Some(self.gid)).map_err(err)?;
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all scram-sha-256\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostnossl all all 0.0.0.0/0 reject\n",
        )
        .map_err(err)?;
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .map_err(err)?;
        std::io::Write::write_all(&mut conf, b"\nssl = on\n").map_err(err)?;
        self.run()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling the server this cluster started (fast shutdown).
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }
}
