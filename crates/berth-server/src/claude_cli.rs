//! Finding the Claude Code CLI and checking its version against the range berth supports.

use std::path::{Path, PathBuf};

/// Versions berth has been tested with (a semver requirement).
pub const SUPPORTED_VERSIONS: &str = ">=2.0.0, <3.0.0";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaudeCli {
    pub path: PathBuf,
    pub version: String,
}

/// The version in the CLI's `--version` line (`2.1.328 (Claude Code)`): its first word as
/// semver. Pre-release and build tags are dropped: a `2.1.0-beta.1` build is checked as
/// 2.1.0 (semver would otherwise keep every pre-release out of a plain range).
pub fn parse_version(s: &str) -> Option<semver::Version> {
    let v = semver::Version::parse(s.split_whitespace().next()?).ok()?;
    Some(semver::Version::new(v.major, v.minor, v.patch))
}

/// Whether berth supports this CLI version.
pub fn supported(v: &semver::Version) -> bool {
    semver::VersionReq::parse(SUPPORTED_VERSIONS).is_ok_and(|r| r.matches(v))
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
    if !supported(&v) {
        return Err(format!(
            "Claude Code CLI {v} is outside the supported range {SUPPORTED_VERSIONS}"
        ));
    }
    Ok(ClaudeCli {
        path: real,
        version: v.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Option<String> {
        parse_version(s).map(|v| v.to_string())
    }

    #[test]
    fn versions_parse_from_the_first_word() {
        assert_eq!(v("2.1.328 (Claude Code)").as_deref(), Some("2.1.328"));
        assert_eq!(v("  2.1.328\n").as_deref(), Some("2.1.328"));
        assert_eq!(v("2.1.0-beta.1 (Claude Code)").as_deref(), Some("2.1.0"));
        assert_eq!(v("2.1.0+build.7").as_deref(), Some("2.1.0"));
    }

    #[test]
    fn odd_version_strings_are_unreadable() {
        for s in [
            "garbage",
            "",
            "2.1",
            "2",
            "2.x.0",
            "Claude Code 2.1.0",
            "-2.1.0",
            "2.1.0.5",
            "18446744073709551616.0.0",
        ] {
            assert_eq!(v(s), None, "{s:?}");
        }
    }

    #[test]
    fn the_range_is_two_point_anything() {
        let ok = |s: &str| parse_version(s).is_some_and(|v| supported(&v));
        assert!(ok("2.0.0"));
        assert!(ok("2.1.328"));
        assert!(ok("2.99.99"));
        assert!(ok("2.1.0-rc.1"));
        assert!(!ok("1.9.0"));
        assert!(!ok("1.99.999"));
        assert!(!ok("3.0.0"));
        assert!(!ok("3.0.0-alpha"));
        assert!(!ok("10.0.0"));
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
