//! Conformance checks of the file operations: round trips and listings, paths that resolve
//! outside the workspace (lexically or through symlinks the box plants), and special files
//! (FIFOs, sockets) refused at once, without being opened, so no file operation waits on a box.

use super::{config, sh, small, text, Fixture};
use crate::{FileContent, FsError, Sandbox, SandboxError};
use std::time::Duration;

/// Files through the backend: round trip, listing, hostile paths, symlinks planted by the box.
pub async fn files_and_hostile_paths<B: Sandbox>(b: &B, f: &Fixture) {
    let id = f.id("files");
    b.create(config(&id, small())).await.expect("create");
    b.write_file(&id, "dir/a.txt", b"hello".to_vec(), 0o644)
        .await
        .expect("write");
    let out = sh(
        b,
        &id,
        "cat /workspace/dir/a.txt; stat -c %U /workspace/dir/a.txt",
    )
    .await;
    assert_eq!(
        text(&out.stdout),
        "helloagent\n",
        "written file visible inside, owned by the agent"
    );
    match b.read_file(&id, "dir").await.expect("list") {
        FileContent::Dir(l) => assert_eq!(
            l.entries
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>(),
            vec!["a.txt"]
        ),
        FileContent::File(_) => panic!("expected a listing"),
    }
    let out = sh(
        b,
        &id,
        "ln -s /etc/passwd /workspace/pw; ln -s / /workspace/rootlink; ln -s .. /workspace/up; \
         mkdir -p /workspace/d; ln -s ../../.. /workspace/d/deep; echo inside > /tmp/t",
    )
    .await;
    assert!(out.exit.success(), "{}", text(&out.stderr));
    for p in [
        "pw",
        "rootlink/etc/shadow",
        "up/x",
        "../x",
        "/etc/passwd",
        "d/deep/etc/hostname",
        "dir/../../x",
    ] {
        let r = b.read_file(&id, p).await;
        assert!(
            matches!(r, Err(SandboxError::Fs(FsError::Outside(_)))),
            "read {p}: {r:?}"
        );
    }
    for p in ["up/evil", "rootlink/tmp/evil", "../evil", "d/deep/evil"] {
        let r = b.write_file(&id, p, b"x".to_vec(), 0o644).await;
        assert!(
            matches!(r, Err(SandboxError::Fs(FsError::Outside(_)))),
            "write {p}: {r:?}"
        );
    }
    assert!(matches!(
        b.delete_file(&id, "up/x").await,
        Err(SandboxError::Fs(FsError::Outside(_)))
    ));
    // Writing over the planted symlink replaces the link; the host's file is untouched.
    let before = std::fs::read("/etc/passwd").expect("host passwd");
    b.write_file(&id, "pw", b"replaced".to_vec(), 0o644)
        .await
        .expect("replace link");
    assert_eq!(std::fs::read("/etc/passwd").expect("host passwd"), before);
    assert!(matches!(
        b.read_file(&id, "nope").await,
        Err(SandboxError::Fs(FsError::NotFound(_)))
    ));
    b.delete_file(&id, "dir").await.expect("delete");
    assert!(matches!(
        b.read_file(&id, "dir/a.txt").await,
        Err(SandboxError::Fs(FsError::NotFound(_)))
    ));
    b.destroy(&id).await.expect("destroy");
}

/// A FIFO or socket the box makes in its workspace is refused by the file operations at
/// once (never opened for reading, so never waited on), and fifty such requests at once leave
/// another box's file operations fast.
pub async fn special_files_answer_at_once<B: Sandbox>(b: &B, f: &Fixture) {
    let id = f.id("fifo");
    let other = f.id("fifo-other");
    b.create(config(&id, small())).await.expect("create");
    b.create(config(&other, small()))
        .await
        .expect("create other");
    b.write_file(&other, "plain.txt", b"plain".to_vec(), 0o644)
        .await
        .expect("write other");
    let out = sh(
        b,
        &id,
        "mkfifo /workspace/f && python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('/workspace/s')\" && ls -l /workspace",
    )
    .await;
    assert!(out.exit.success(), "{}", text(&out.stderr));
    let quick = Duration::from_secs(5);
    // gVisor keeps FIFOs and sockets inside its own kernel: the host's directory has no such
    // file (NotFound on read, a plain file made on write), and nothing there to wait on.
    let mut fifo_on_host = true;
    for p in ["f", "s"] {
        let r = tokio::time::timeout(quick, b.read_file(&id, p))
            .await
            .unwrap_or_else(|_| panic!("reading {p} hung"));
        let on_host = fs_outcome(&r) != "not_found";
        if p == "f" {
            fifo_on_host = on_host;
        }
        let expected: &[&str] = if on_host {
            &["invalid"]
        } else {
            &["not_found"]
        };
        assert!(expected.contains(&fs_outcome(&r)), "read {p}: {r:?}");
        let r = tokio::time::timeout(quick, b.write_file(&id, p, b"x".to_vec(), 0o644))
            .await
            .unwrap_or_else(|_| panic!("writing {p} hung"));
        let expected: &[&str] = if on_host {
            &["invalid"]
        } else {
            &["ok", "invalid"]
        };
        assert!(expected.contains(&fs_outcome(&r)), "write {p}: {r:?}");
    }
    let on_host = fifo_on_host;
    if on_host {
        // The FIFO is still a FIFO: writing was refused, not done by replacing it.
        let out = sh(b, &id, "test -p /workspace/f && echo fifo").await;
        assert_eq!(text(&out.stdout), "fifo\n");
    }

    let t = std::time::Instant::now();
    let storm = futures::future::join_all((0..50).map(|_| b.read_file(&id, "f")));
    let probe_other = async {
        let t = std::time::Instant::now();
        let r = b.read_file(&other, "plain.txt").await;
        (t.elapsed(), r)
    };
    let (results, (other_took, other_read)) = tokio::join!(storm, probe_other);
    assert!(
        results.iter().all(|r| match fs_outcome(r) {
            "invalid" => true,
            "other" => false,
            _ => !on_host,
        }),
        "{results:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    match other_read.expect("other box's read") {
        FileContent::File(c) => assert_eq!(c, b"plain"),
        FileContent::Dir(_) => panic!("expected a file"),
    }
    assert!(other_took < Duration::from_secs(3), "{other_took:?}");
    b.destroy(&id).await.expect("destroy");
    b.destroy(&other).await.expect("destroy other");
}

fn fs_outcome<T>(r: &crate::Result<T>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(SandboxError::Fs(FsError::Invalid(_))) => "invalid",
        Err(SandboxError::Fs(FsError::NotFound(_))) => "not_found",
        Err(_) => "other",
    }
}
