//! Box snapshots in an object store: what a parked hybrid box leaves behind (its workspace and
//! agents' state, as one compressed archive). A local directory by default; any `object_store`
//! backend (S3, GCS, Azure) fits the same seam.
//!
//! Contract: [`SnapshotStore::put`] is atomic (an object is whole or absent) and returns only
//! once the object, read back, has the digest of what was written — a caller may then destroy
//! the original. [`SnapshotStore::get`] checks the digest it is given and refuses a mismatch.
//! Keys are berth's own (`boxes/<box id>/<n>.tar.zst`), never client input.

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, ObjectStore, PutOptions, PutPayload};
use sha2::{Digest, Sha256};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("snapshot {key} is corrupt: digest {found}, expected {expected}")]
    Corrupt {
        key: String,
        expected: String,
        found: String,
    },
    #[error("snapshot directory: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, SnapshotError>;

/// A stored snapshot: where, how big, and its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub key: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone)]
pub struct SnapshotStore {
    store: Arc<dyn ObjectStore>,
}

fn digest(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

impl SnapshotStore {
    /// Snapshots as files under `dir` (created, mode 0700: they hold the boxes' files).
    pub fn local(dir: &std::path::Path) -> Result<SnapshotStore> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(SnapshotStore {
            store: Arc::new(LocalFileSystem::new_with_prefix(dir)?),
        })
    }

    pub fn new(store: Arc<dyn ObjectStore>) -> SnapshotStore {
        SnapshotStore { store }
    }

    /// Store `data` at `key` atomically, then read it back and compare digests.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<Stored> {
        let path = ObjectPath::from(key);
        let expected = digest(&data);
        let bytes = data.len() as u64;
        self.store
            .put_opts(&path, PutPayload::from(data), PutOptions::default())
            .await?;
        // Read back through `get`, which checks the digest.
        self.get(key, &expected).await?;
        Ok(Stored {
            key: key.to_string(),
            bytes,
            sha256: expected,
        })
    }

    /// The snapshot at `key`, if its digest is `sha256`.
    pub async fn get(&self, key: &str, sha256: &str) -> Result<Bytes> {
        let data = self
            .store
            .get_opts(&ObjectPath::from(key), GetOptions::default())
            .await?
            .bytes()
            .await?;
        let found = digest(&data);
        if found != sha256 {
            return Err(SnapshotError::Corrupt {
                key: key.to_string(),
                expected: sha256.to_string(),
                found,
            });
        }
        Ok(data)
    }

    /// Remove the snapshot at `key`; one already gone is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        use futures::StreamExt;
        let path = ObjectPath::from(key);
        let mut s = self
            .store
            .delete_stream(futures::stream::once(async move { Ok(path) }).boxed());
        while let Some(r) = s.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_verifies_get_checks_the_digest_delete_is_idempotent() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = SnapshotStore::local(&dir.path().join("snaps")).expect("store");
        let stored = s
            .put("boxes/b1/1.tar.zst", Bytes::from_static(b"archive"))
            .await
            .expect("put");
        assert_eq!(stored.bytes, 7);
        assert_eq!(
            s.get(&stored.key, &stored.sha256).await.expect("get"),
            Bytes::from_static(b"archive")
        );
        // A changed file on disk is caught.
        std::fs::write(dir.path().join("snaps/boxes/b1/1.tar.zst"), b"tampered").expect("write");
        assert!(matches!(
            s.get(&stored.key, &stored.sha256).await,
            Err(SnapshotError::Corrupt { .. })
        ));
        s.delete(&stored.key).await.expect("delete");
        s.delete(&stored.key).await.expect("delete again");
        assert!(matches!(
            s.get(&stored.key, &stored.sha256).await,
            Err(SnapshotError::Store(object_store::Error::NotFound { .. }))
        ));
    }
}
