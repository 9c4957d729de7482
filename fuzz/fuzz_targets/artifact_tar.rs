//! The artifact sanitiser on a tar stream the box writes (`keep_workspace` archives leave the
//! box for a client's machine): never a panic, and whatever it emits, read back as a client's
//! tar would, stays under `workspace/` — plain relative names, links that do not climb out,
//! hard links only to files written before, headers whose size is the entry's own.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::path::{Component, Path};

fn plain(p: &Path) -> bool {
    p.components().all(|c| matches!(c, Component::Normal(_)))
}

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    if berth_server::engine::park::sanitize_tar(data, &mut out, 1 << 20).is_err() {
        return;
    }
    let mut archive = tar::Archive::new(out.as_slice());
    let Ok(entries) = archive.entries() else {
        panic!("the sanitised archive does not read back");
    };
    let mut files: HashSet<std::path::PathBuf> = HashSet::new();
    for e in entries {
        let e = e.expect("a sanitised entry reads back");
        let path = e.path().expect("a sanitised name").into_owned();
        assert!(plain(&path), "name {path:?}");
        assert!(path.starts_with("workspace"), "name outside workspace/: {path:?}");
        assert_eq!(
            e.header().entry_size().expect("raw size"),
            e.size(),
            "the raw header size differs from the entry's size: {path:?}"
        );
        match e.header().entry_type() {
            tar::EntryType::Regular => {
                files.insert(path.clone());
            }
            tar::EntryType::Directory => {}
            tar::EntryType::Symlink => {
                let target = e.link_name().expect("link").expect("a symlink has a target");
                assert!(!target.is_absolute(), "{path:?} -> {target:?}");
                // Leading `..` only, never more than the link's own depth below workspace/.
                let ups = target
                    .components()
                    .take_while(|c| matches!(c, Component::ParentDir))
                    .count();
                let rest_plain = target
                    .components()
                    .skip(ups)
                    .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
                assert!(rest_plain, "{path:?} -> {target:?}");
                let depth = path.components().count().saturating_sub(2);
                assert!(ups <= depth, "{path:?} -> {target:?} climbs out");
            }
            tar::EntryType::Link => {
                let target = e.link_name().expect("link").expect("a hard link has a target");
                assert!(files.contains(target.as_ref()), "{path:?} => {target:?}");
            }
            other => panic!("entry type {other:?} passed: {path:?}"),
        }
    }
});
