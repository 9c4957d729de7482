//! The artifact sanitiser: a tar stream a box wrote, rewritten so that a client unpacking it
//! on its own machine gets nothing outside the archive's `workspace/` (see [`sanitize_tar`]).
//! Pure (a reader in, a writer out): `park::capture_paths` runs it on a blocking thread.

/// Entries left out of a sanitised archive: how many, and the first few names.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub count: u64,
    pub names: Vec<String>,
}

/// Names of dropped entries kept for the box's event.
const DROPPED_NAMES: usize = 20;

/// The top directory of an artifact: every name in one is `workspace` or under it.
const ARTIFACT_TOP: &str = "workspace";

/// What a sanitised archive already holds at a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// A directory only implied by a deeper name (it may still be declared, once).
    Implied,
    Dir,
    File,
    HardLink,
    Symlink,
}

/// Reads exactly `left` bytes of `inner`, failing if it ends first: the header written
/// before the data promised that many.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: std::io::Read> std::io::Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Copy a tar stream the box wrote, leaving out every entry that could reach outside the
/// archive's top directory (`workspace/`) when a client unpacks it: names that are not
/// `workspace` or under it, hold `..` or a backslash, pass through a symbolic link of the
/// archive, or declare a name again; symbolic links whose target is absolute, holds a
/// backslash or climbs above the top directory (`..` only as leading components, no deeper
/// than the link sits); hard links to anything but a regular file already written; devices
/// and FIFOs. Every kept entry gets a fresh header made here (type, size, permission bits
/// without setuid/setgid/sticky, mtime; owner 0, no names, no PAX records), so nothing of the
/// box's headers reaches the client but the name and link target, re-encoded by the builder
/// (GNU long names past 100 bytes). Fails once the files' contents pass `max_bytes`.
///
/// Why `..` only leads: after a normal component it may climb out of a directory that is
/// itself a link, which a lexical check cannot see. With names never passing through a
/// link, a leading `..` climbs real directories, so counting them is exact.
pub fn sanitize_tar(
    input: impl std::io::Read,
    output: impl std::io::Write,
    max_bytes: u64,
) -> std::io::Result<Dropped> {
    use std::collections::HashMap;
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Component, Path, PathBuf};
    let mut archive = tar::Archive::new(input);
    let mut out = tar::Builder::new(output);
    out.follow_symlinks(false);
    // Keyed by components, so `a/./b`, `a//b` and `a/b/` are one name.
    let mut seen: HashMap<PathBuf, Seen> = HashMap::new();
    let mut dropped = Dropped::default();
    let mut total: u64 = 0;
    // Under the top directory, normal components only, no backslash, no link of the archive
    // among its ancestors.
    let plain = |p: &Path, seen: &HashMap<PathBuf, Seen>| {
        let b = p.as_os_str().as_bytes();
        !b.contains(&b'\\')
            && (b == ARTIFACT_TOP.as_bytes()
                || b.strip_prefix(ARTIFACT_TOP.as_bytes())
                    .is_some_and(|rest| rest.starts_with(b"/")))
            && p.components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
            && !p
                .ancestors()
                .skip(1)
                .any(|a| matches!(seen.get(a), Some(Seen::Symlink)))
    };
    for entry in archive.entries()? {
        let mut e = entry?;
        let path = e.path()?.into_owned();
        let kind = e.header().entry_type();
        let target = e.link_name()?.map(|t| t.into_owned());
        let key = normal(&path);
        let fresh = match seen.get(&key) {
            None => true,
            Some(Seen::Implied) => kind == tar::EntryType::Directory,
            Some(_) => false,
        };
        let as_seen = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                Some(Seen::File)
            }
            tar::EntryType::Directory => Some(Seen::Dir),
            tar::EntryType::Link => target
                .as_deref()
                .filter(|t| plain(t, &seen) && seen.get(&normal(t)) == Some(&Seen::File))
                .map(|_| Seen::HardLink),
            tar::EntryType::Symlink => target
                .as_deref()
                .filter(|t| {
                    !t.as_os_str().as_bytes().contains(&b'\\') && link_stays_inside(&path, t)
                })
                .map(|_| Seen::Symlink),
            _ => None,
        };
        let as_seen = as_seen.filter(|_| fresh && plain(&path, &seen));
        let Some(as_seen) = as_seen else {
            dropped.count += 1;
            if dropped.names.len() < DROPPED_NAMES {
                dropped.names.push(path.to_string_lossy().into_owned());
            }
            continue;
        };
        let mut header = tar::Header::new_gnu();
        header.set_mtime(e.header().mtime().unwrap_or(0));
        header.set_uid(0);
        header.set_gid(0);
        let mode = e.header().mode().unwrap_or(0o644) & 0o777;
        match (as_seen, target) {
            (Seen::File, _) => {
                let size = e.size();
                total = total.saturating_add(size);
                if total > max_bytes {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::FileTooLarge,
                        format!("the archive's files pass {max_bytes} bytes (the box's disk and then some)"),
                    ));
                }
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(mode);
                header.set_size(size);
                out.append_data(
                    &mut header,
                    &path,
                    Exact {
                        inner: &mut e,
                        left: size,
                    },
                )?;
            }
            (Seen::Dir, _) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(mode);
                header.set_size(0);
                out.append_data(&mut header, &path, std::io::empty())?;
            }
            (Seen::HardLink | Seen::Symlink, Some(t)) => {
                header.set_entry_type(if as_seen == Seen::Symlink {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                header.set_mode(0o777);
                header.set_size(0);
                out.append_link(&mut header, &path, &t)?;
            }
            _ => continue,
        }
        for a in key.ancestors().skip(1) {
            if a.as_os_str().is_empty() {
                break;
            }
            seen.entry(a.to_path_buf()).or_insert(Seen::Implied);
        }
        seen.insert(key, as_seen);
    }
    out.into_inner()?;
    Ok(dropped)
}

/// `p` without `.` components (as links are looked up).
fn normal(p: &std::path::Path) -> std::path::PathBuf {
    p.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

/// Whether the symbolic link at `link` (an archive name) pointing to `target` resolves
/// inside the archive's top directory (the first component of `link`).
fn link_stays_inside(link: &std::path::Path, target: &std::path::Path) -> bool {
    use std::path::Component;
    // Directories between the top directory and the link: how far a target may climb.
    let depth = normal(link).components().count().saturating_sub(2);
    let mut climbs = 0;
    let mut descended = false;
    for c in target.components() {
        match c {
            Component::ParentDir if !descended => climbs += 1,
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return false,
            Component::CurDir => {}
            Component::Normal(_) => descended = true,
        }
    }
    climbs <= depth && !target.as_os_str().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: tar::EntryType, name: &str, link: Option<&str>, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(size);
        // Raw names: the builder would refuse the hostile ones a box can write.
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        h
    }

    /// An archive of `entries` (raw headers; regular files hold "hi"), sanitised without a size
    /// limit: the output and what was dropped.
    fn sanitised(entries: &[(tar::EntryType, &str, Option<&str>)]) -> (Vec<u8>, Dropped) {
        let mut b = tar::Builder::new(Vec::new());
        for (kind, name, link) in entries {
            let data: &[u8] = if *kind == tar::EntryType::Regular {
                b"hi"
            } else {
                b""
            };
            b.append(&header(*kind, name, *link, data.len() as u64), data)
                .expect("append");
        }
        let input = b.into_inner().expect("tar");
        let mut out = Vec::new();
        let dropped = sanitize_tar(&input[..], &mut out, u64::MAX).expect("sanitise");
        (out, dropped)
    }

    #[test]
    fn sanitising_drops_everything_that_leads_out_of_the_archive() {
        use tar::EntryType::*;
        let entries: &[(tar::EntryType, &str, Option<&str>)] = &[
            (Directory, "workspace/", None),
            (Regular, "workspace/a.txt", None),
            (Symlink, "workspace/ok", Some("a.txt")),
            (Directory, "workspace/d/", None),
            (Symlink, "workspace/d/up", Some("../a.txt")),
            (Symlink, "workspace/x", Some("/etc/passwd")),
            (Symlink, "workspace/y", Some("../../..")),
            (Symlink, "workspace/z", Some("..")),
            (Symlink, "workspace/d/sneak", Some("up/../../..")),
            (Symlink, "workspace/here", Some(".")),
            (Regular, "workspace/here/through", None),
            (Regular, "../evil", None),
            (Regular, "/abs", None),
            (Link, "workspace/hard", Some("workspace/a.txt")),
            (Link, "workspace/hard2", Some("/etc/shadow")),
            (Fifo, "workspace/fifo", None),
        ];
        let (out, dropped) = sanitised(entries);
        let mut kept = Vec::new();
        let mut ar = tar::Archive::new(&out[..]);
        for e in ar.entries().expect("entries") {
            let e = e.expect("entry");
            kept.push(e.path().expect("path").to_string_lossy().into_owned());
        }
        assert_eq!(
            kept,
            [
                "workspace/",
                "workspace/a.txt",
                "workspace/ok",
                "workspace/d/",
                "workspace/d/up",
                "workspace/here",
                "workspace/hard"
            ]
        );
        assert_eq!(dropped.count, 9, "{dropped:?}");
        assert!(dropped.names.contains(&"workspace/x".to_string()));
    }

    /// A PAX record `key=value` with its length prefix (which counts itself).
    fn pax_record(key: &str, value: &str) -> Vec<u8> {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}").len() + body.len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    }

    /// An entry as read back: name, type, size, contents, link target, mode, owner name.
    #[derive(Debug)]
    struct Read {
        name: String,
        kind: tar::EntryType,
        data: Vec<u8>,
        link: Option<String>,
        mode: u32,
        user: Option<String>,
    }

    /// `out` read back by the `tar` crate, checking that every header's own size field is the
    /// size the entry has (so a reader that ignores PAX records sees the same entries).
    fn read_back(out: &[u8]) -> Vec<Read> {
        use std::io::Read as _;
        let mut ar = tar::Archive::new(out);
        let mut got = Vec::new();
        for e in ar.entries().expect("entries") {
            let mut e = e.expect("entry");
            assert_eq!(e.header().entry_size().expect("raw size"), e.size());
            assert!(
                e.pax_extensions().expect("pax").is_none(),
                "no PAX records in a sanitised archive"
            );
            let mut data = Vec::new();
            e.read_to_end(&mut data).expect("data");
            got.push(Read {
                name: e.path().expect("path").to_string_lossy().into_owned(),
                kind: e.header().entry_type(),
                data,
                link: e
                    .link_name()
                    .expect("link")
                    .map(|l| l.to_string_lossy().into_owned()),
                mode: e.header().mode().expect("mode"),
                user: e.header().username().ok().flatten().map(str::to_owned),
            });
        }
        got
    }

    /// The names a reader that knows only the raw ustar/GNU header fields sees, walking
    /// 512-byte blocks by each header's size field.
    fn raw_names(out: &[u8]) -> Vec<String> {
        let mut names = Vec::new();
        let mut at = 0;
        while at + 512 <= out.len() {
            let block = &out[at..at + 512];
            if block.iter().all(|b| *b == 0) {
                break;
            }
            let mut h = tar::Header::new_old();
            h.as_mut_bytes().copy_from_slice(block);
            names.push(String::from_utf8_lossy(&h.path_bytes()).into_owned());
            let size = h.entry_size().expect("raw size");
            at += 512 + (size as usize).div_ceil(512) * 512;
        }
        names
    }

    #[test]
    fn a_pax_size_over_a_zero_raw_size_cannot_inject_an_entry() {
        // The file's data is itself a tar header: a reader trusting the raw size (0) of the
        // box's header would take it for the next entry.
        let mut inner = tar::Header::new_gnu();
        inner.set_entry_type(tar::EntryType::Symlink);
        inner.set_path("workspace/injected").expect("path");
        inner.set_link_name("/etc").expect("link");
        inner.set_size(0);
        inner.set_mode(0o777);
        inner.set_cksum();
        let payload = inner.as_bytes().to_vec();
        let mut b = tar::Builder::new(Vec::new());
        let dir = header(tar::EntryType::Directory, "workspace/", None, 0);
        b.append(&dir, &[][..]).expect("dir");
        let pax = pax_record("size", &payload.len().to_string());
        let ph = header(tar::EntryType::XHeader, "PaxHeader", None, pax.len() as u64);
        b.append(&ph, &pax[..]).expect("pax");
        let file = header(tar::EntryType::Regular, "workspace/f", None, 0);
        b.append(&file, &payload[..]).expect("file");
        let input = b.into_inner().expect("tar");
        // The hostile input does what it says: a raw reader sees the injected entry.
        assert!(raw_names(&input).contains(&"workspace/injected".to_string()));

        let mut out = Vec::new();
        sanitize_tar(&input[..], &mut out, u64::MAX).expect("sanitise");
        let got = read_back(&out);
        let names: Vec<_> = got.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["workspace/", "workspace/f"]);
        assert_eq!(
            got[1].data, payload,
            "the file keeps its PAX-sized contents"
        );
        assert_eq!(raw_names(&out), ["workspace/", "workspace/f"]);
    }

    #[test]
    fn names_outside_workspace_backslashes_and_redeclarations_are_dropped() {
        use tar::EntryType::*;
        let entries: &[(tar::EntryType, &str, Option<&str>)] = &[
            (Directory, "workspace/", None),
            (Directory, "workspace/d/", None),
            (Regular, "workspace/d/f", None),
            (Regular, "etc/passwd", None),
            (Regular, "workspacex/a", None),
            (Regular, "./workspace/a", None),
            (Regular, "home/agent/.bashrc", None),
            (Regular, "workspace/..\\..\\evil", None),
            (Symlink, "workspace/bs", Some("..\\..\\etc")),
            // A symbolic link over a directory already written: what is under it would then
            // land wherever the link points.
            (Symlink, "workspace/d", Some(".")),
            (Symlink, "workspace/d/", Some(".")),
            // A directory only implied by a deeper name counts too.
            (Regular, "workspace/q/f", None),
            (Symlink, "workspace/q", Some(".")),
            // Any name twice.
            (Regular, "workspace/d/f", None),
            (Directory, "workspace/d", None),
            // A directory declared after a deeper name implied it is fine.
            (Directory, "workspace/q/", None),
            (Regular, "workspace", None),
        ];
        let (out, dropped) = sanitised(entries);
        let names: Vec<_> = read_back(&out).into_iter().map(|r| r.name).collect();
        assert_eq!(
            names,
            [
                "workspace/",
                "workspace/d/",
                "workspace/d/f",
                "workspace/q/f",
                "workspace/q/"
            ]
        );
        assert_eq!(dropped.count, 12, "{dropped:?}");
    }

    #[test]
    fn hard_links_must_point_at_a_regular_file_already_written() {
        use tar::EntryType::*;
        let entries: &[(tar::EntryType, &str, Option<&str>)] = &[
            (Directory, "workspace/", None),
            (Link, "workspace/early", Some("workspace/later")),
            (Regular, "workspace/later", None),
            (Link, "workspace/ok", Some("workspace/later")),
            (Link, "workspace/to-dir", Some("workspace")),
            (Symlink, "workspace/sl", Some("later")),
            (Link, "workspace/to-symlink", Some("workspace/sl")),
            (Link, "workspace/to-hardlink", Some("workspace/ok")),
            (Link, "workspace/outside", Some("home/agent/.bashrc")),
        ];
        let (out, dropped) = sanitised(entries);
        let got = read_back(&out);
        let names: Vec<_> = got.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "workspace/",
                "workspace/later",
                "workspace/ok",
                "workspace/sl"
            ]
        );
        assert_eq!(got[2].kind, tar::EntryType::Link);
        assert_eq!(got[2].link.as_deref(), Some("workspace/later"));
        assert_eq!(dropped.count, 5, "{dropped:?}");
    }

    #[test]
    fn headers_are_made_fresh_special_bits_stripped_long_names_kept() {
        let long = format!("workspace/{}", "n".repeat(150));
        let mut b = tar::Builder::new(Vec::new());
        b.append(
            &header(tar::EntryType::Directory, "workspace/", None, 0),
            &[][..],
        )
        .expect("dir");
        let mut h = header(tar::EntryType::Regular, "workspace/suid", None, 2);
        h.set_mode(0o7755);
        h.set_username("root").expect("uname");
        h.set_uid(0);
        h.set_cksum();
        b.append(&h, &b"hi"[..]).expect("suid");
        // A long name as a PAX `path` record, the way GNU tar's posix format writes it.
        let pax = pax_record("path", &long);
        let ph = header(tar::EntryType::XHeader, "PaxHeader", None, pax.len() as u64);
        b.append(&ph, &pax[..]).expect("pax");
        b.append(
            &header(tar::EntryType::Regular, "workspace/short", None, 3),
            &b"abc"[..],
        )
        .expect("long");
        let input = b.into_inner().expect("tar");
        let mut out = Vec::new();
        sanitize_tar(&input[..], &mut out, u64::MAX).expect("sanitise");
        let got = read_back(&out);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[1].name, "workspace/suid");
        assert_eq!(got[1].mode, 0o755);
        assert_eq!(got[1].user.as_deref().unwrap_or(""), "");
        assert_eq!(got[2].name, long);
        assert_eq!(got[2].data, b"abc");
    }

    #[test]
    fn contents_past_the_limit_fail_the_archive() {
        let mut b = tar::Builder::new(Vec::new());
        for name in ["workspace/a", "workspace/b"] {
            b.append(
                &header(tar::EntryType::Regular, name, None, 600),
                &[7u8; 600][..],
            )
            .expect("append");
        }
        let input = b.into_inner().expect("tar");
        assert!(sanitize_tar(&input[..], Vec::new(), 1200).is_ok());
        assert!(sanitize_tar(&input[..], Vec::new(), 1199).is_err());
    }
}
