//! Finding the Claude Code CLI and checking its version against the range berth supports.

use std::path::{Path, PathBuf};

/// Versions berth has been tested with: `>= MIN, < MAX` (semver major/minor/patch).
pub const MIN_VERSION: (u64, u64, u64) = (2, 0, 0);
pub const MAX_VERSION: (u64, u64, u64) = (3, 0, 0);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaudeCli {
    pub path: PathBuf,
    pub version: String,
}

pub fn parse_version(s: &str) -> Option<(u64, u64, u64)> {
    let word = s.split_whitespace().next()?;
    let mut it = word.split(['.', '-', '+']).map(|p| p.parse::<u64>());
    Some((it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?))
}

/// Locate the CLI (configured path, else `claude` on PATH), run `--version` and check the range.
pub fn discover(configured: Option<&Path>) -> Result<ClaudeCli, String> {
    let path = match configured {
        Some(p) => p.to_path_buf(),
        None => {
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path)
                .map(|d| d.join("claude"))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    "no `claude` on PATH (set BERTH_CLAUDE_BIN or claude_cli)".to_string()
                })?
        }
    };
    // Boxes see the host's /usr, /opt, /bin, /lib*, /etc only; resolve symlinks and check.
    let real = std::fs::canonicalize(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let visible = ["/usr/", "/opt/", "/bin/", "/sbin/", "/lib", "/etc/"]
        .iter()
        .any(|p| real.starts_with(p));
    if !visible {
        return Err(format!(
            "{} resolves to {}, which boxes cannot see; install the CLI under /usr or /opt",
            path.display(),
            real.display()
        ));
    }
    let out = std::process::Command::new(&real)
        .arg("--version")
        .env("DISABLE_AUTOUPDATER", "1")
        .output()
        .map_err(|e| format!("running {} --version: {e}", real.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let v = parse_version(&text).ok_or_else(|| format!("cannot read a version from {text:?}"))?;
    if v < MIN_VERSION || v >= MAX_VERSION {
        return Err(format!(
            "Claude Code CLI {}.{}.{} is outside the supported range >= {}.{}.{}, < {}.{}.{}",
            v.0,
            v.1,
            v.2,
            MIN_VERSION.0,
            MIN_VERSION.1,
            MIN_VERSION.2,
            MAX_VERSION.0,
            MAX_VERSION.1,
            MAX_VERSION.2
        ));
    }
    Ok(ClaudeCli {
        path: real,
        version: format!("{}.{}.{}", v.0, v.1, v.2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_range_holds() {
        assert_eq!(parse_version("2.1.328 (Claude Code)"), Some((2, 1, 328)));
        assert_eq!(parse_version("garbage"), None);
        assert!(parse_version("1.9.0").is_some_and(|v| v < MIN_VERSION));
        assert!(parse_version("3.0.0").is_some_and(|v| v >= MAX_VERSION));
    }

    #[test]
    fn a_cli_outside_the_range_is_refused() {
        let dir = tempfile::tempdir_in("/opt")
            .or_else(|_| tempfile::tempdir())
            .expect("tmp");
        let fake = dir.path().join("claude");
        std::fs::write(&fake, "#!/bin/sh\necho '1.0.0 (Claude Code)'\n").expect("write");
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let err = discover(Some(&fake)).expect_err("old version refused");
        assert!(
            err.contains("outside the supported range") || err.contains("cannot see"),
            "{err}"
        );
    }
}
