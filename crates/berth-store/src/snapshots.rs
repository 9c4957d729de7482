//! Box snapshots in an object store: what a parked hybrid box leaves behind (its workspace and
//! agents' state, as one compressed archive). A local directory by default, or an S3 bucket
//! ([`SnapshotStore::from_url`]); any `object_store` backend fits the same seam.
//!
//! Contract: a write ([`SnapshotStore::writer`], or [`SnapshotStore::put`] for bytes in hand)
//! streams: the server holds a few parts, never the archive. It is atomic (an object is whole
//! or absent) and returns only once the store holds exactly what was written — a caller may
//! then destroy the original. An S3 server proves that with the multipart upload's ETag (the
//! MD5 of its parts' MD5s, computed here on the way and compared); any other answer (another
//! ETag scheme, as with SSE-KMS, or a local directory) is checked by reading the object back
//! as a stream against the SHA-256 of what was written. Reads stream too
//! ([`SnapshotStore::get_stream`]) and check the digest they are given, ending in an error on
//! a mismatch.
//! Keys are berth's own (`boxes/<box id>/<n>.tar.zst`), never client input.

use bytes::Bytes;
use md5::Md5;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, ObjectStore, WriteMultipart};
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
    #[error("snapshot_url {0}")]
    Url(String),
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

    /// The store a `snapshot_url` names: `file:///dir` (see [`SnapshotStore::local`]) or
    /// `s3://bucket/prefix` through `object_store`'s S3 client, configured by the standard AWS
    /// variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`, `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint, …).
    pub fn from_url(url: &str) -> Result<SnapshotStore> {
        if let Some(dir) = url.strip_prefix("file://") {
            if dir.is_empty() {
                return Err(SnapshotError::Url(format!("{url:?}: no directory")));
            }
            return Self::local(std::path::Path::new(dir));
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(SnapshotError::Url(format!(
                "{url:?}: expected file:///<dir> or s3://<bucket>/<prefix>"
            )));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(SnapshotError::Url(format!("{url:?}: no bucket")));
        }
        // object_store's HTTP client uses rustls without a crypto provider of its own; ring
        // is the one this workspace builds. Already installed (by us or the embedder): fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let s3 = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            // Fail within seconds, not the client's default minutes: a park or restore that
            // cannot reach the store is abandoned (the box stays as it was) and retried later.
            .with_retry(object_store::RetryConfig {
                max_retries: 3,
                retry_timeout: std::time::Duration::from_secs(15),
                ..Default::default()
            })
            .build()?;
        let prefix = prefix.trim_matches('/');
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
        };
        Ok(SnapshotStore { store })
    }

    /// Readiness: the object store answers (a listing of at most one key under `boxes/`).
    pub async fn ping(&self) -> Result<()> {
        use futures::StreamExt;
        let t = std::time::Instant::now();
        let mut l = self.store.list(Some(&ObjectPath::from("boxes")));
        let r = match l.next().await {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(e.into()),
        };
        metrics::histogram!("berth_snapshot_op_seconds", "op" => "ping")
            .record(t.elapsed().as_secs_f64());
        r
    }

    /// A writer for a snapshot at `key`, for archives made as a stream (see [`SnapshotWriter`]).
    pub async fn writer(&self, key: &str) -> Result<SnapshotWriter> {
        let path = ObjectPath::from(key);
        let upload = self
            .store
            .put_multipart_opts(&path, Default::default())
            .await?;
        Ok(SnapshotWriter {
            store: self.clone(),
            key: key.to_string(),
            upload: WriteMultipart::new_with_chunk_size(upload, PART_BYTES),
            hasher: Sha256::new(),
            bytes: 0,
            parts: PartDigests::default(),
        })
    }

    /// Store `data` at `key` atomically, then read it back and compare digests.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<Stored> {
        let mut w = self.writer(key).await?;
        w.write(data).await?;
        w.finish().await
    }

    /// The snapshot at `key` as a stream of chunks, read as it is consumed; the digest is
    /// checked at the end, where a mismatch is the stream's last item (an error). A consumer
    /// must treat what it took as void unless the stream ends cleanly.
    pub async fn get_stream(
        &self,
        key: &str,
        sha256: &str,
    ) -> Result<impl futures::Stream<Item = Result<Bytes>> + Send + Unpin + 'static> {
        use futures::StreamExt;
        let mut inner = self
            .store
            .get_opts(&ObjectPath::from(key), GetOptions::default())
            .await?
            .into_stream();
        let (key, expected) = (key.to_string(), sha256.to_string());
        let mut hasher = Some(Sha256::new());
        Ok(futures::stream::poll_fn(move |cx| {
            let Some(h) = hasher.as_mut() else {
                return std::task::Poll::Ready(None);
            };
            match inner.poll_next_unpin(cx) {
                std::task::Poll::Ready(Some(Ok(b))) => {
                    h.update(&b);
                    std::task::Poll::Ready(Some(Ok(b)))
                }
                std::task::Poll::Ready(Some(Err(e))) => {
                    hasher = None;
                    std::task::Poll::Ready(Some(Err(e.into())))
                }
                std::task::Poll::Ready(None) => {
                    let found = hasher.take().map(|h| hex::encode(h.finalize()));
                    match found {
                        Some(f) if f != expected => {
                            std::task::Poll::Ready(Some(Err(SnapshotError::Corrupt {
                                key: key.clone(),
                                expected: expected.clone(),
                                found: f,
                            })))
                        }
                        _ => std::task::Poll::Ready(None),
                    }
                }
                std::task::Poll::Pending => std::task::Poll::Pending,
            }
        }))
    }

    /// Read the snapshot at `key` through without keeping it: its size, if its digest is
    /// `sha256`.
    pub async fn verify(&self, key: &str, sha256: &str) -> Result<u64> {
        use futures::StreamExt;
        let mut s = self.get_stream(key, sha256).await?;
        let mut n = 0u64;
        while let Some(chunk) = s.next().await {
            n += chunk?.len() as u64;
        }
        Ok(n)
    }

    /// The snapshot at `key`, whole in memory, if its digest is `sha256` (small archives and
    /// tests; archives of any size use [`SnapshotStore::get_stream`]).
    pub async fn get(&self, key: &str, sha256: &str) -> Result<Bytes> {
        use futures::StreamExt;
        let mut s = self.get_stream(key, sha256).await?;
        let mut buf = Vec::new();
        while let Some(chunk) = s.next().await {
            buf.extend_from_slice(&chunk?);
        }
        Ok(Bytes::from(buf))
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

/// Bytes per part of a streamed write: what the writer holds in memory (times the parts in
/// flight, [`PARTS_IN_FLIGHT`]).
pub const PART_BYTES: usize = 8 << 20;
/// Parts uploading at once before a write waits. S3 servers take parts in parallel: against
/// moto (`berth-bench store`), 4 in flight upload 100 MiB in ~25 % less time than 2; the server
/// holds at most this many parts (32 MiB) of an archive.
pub const PARTS_IN_FLIGHT: usize = 4;

/// A snapshot being written as it is made: parts go to the object store as they fill and the
/// SHA-256 (and each part's MD5) is computed on the way, so an archive of any size costs the
/// server a few parts of memory. Nothing is visible at the key until
/// [`SnapshotWriter::finish`], which completes the upload atomically and then checks the
/// store's copy (see the module's docs); a writer dropped unfinished leaves nothing at the key.
pub struct SnapshotWriter {
    store: SnapshotStore,
    key: String,
    upload: WriteMultipart,
    hasher: Sha256,
    bytes: u64,
    parts: PartDigests,
}

/// The MD5 of each part as [`WriteMultipart`] cuts them (every [`PART_BYTES`], the last one
/// shorter): what an S3 server's multipart ETag is made of.
#[derive(Default)]
struct PartDigests {
    done: Vec<[u8; 16]>,
    current: Md5,
    filled: usize,
}

impl PartDigests {
    fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = (PART_BYTES - self.filled).min(data.len());
            self.current.update(&data[..take]);
            self.filled += take;
            data = &data[take..];
            if self.filled == PART_BYTES {
                self.done
                    .push(std::mem::take(&mut self.current).finalize().into());
                self.filled = 0;
            }
        }
    }

    /// The ETag an S3 server gives the completed upload, without quotes: hex MD5 of the parts'
    /// MD5s, `-`, the number of parts. No data at all is one empty part (the client uploads
    /// one, as S3 refuses to complete an upload without parts).
    fn multipart_etag(mut self) -> String {
        if self.filled > 0 || self.done.is_empty() {
            self.done.push(self.current.finalize().into());
        }
        let mut all = Md5::new();
        for d in &self.done {
            all.update(d);
        }
        format!("{}-{}", hex::encode(all.finalize()), self.done.len())
    }
}

/// How a finished write was checked (the `by` label of `berth_snapshot_verified_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// The server's multipart ETag matched the parts' digests computed while writing.
    ETag,
    /// The object was read back and its SHA-256 matched.
    ReadBack,
}

impl SnapshotWriter {
    /// Append `data` (waits while too many parts are uploading).
    pub async fn write(&mut self, data: Bytes) -> Result<()> {
        self.hasher.update(&data);
        self.parts.update(&data);
        self.bytes += data.len() as u64;
        self.upload.wait_for_capacity(PARTS_IN_FLIGHT).await?;
        self.upload.put(data);
        Ok(())
    }

    /// Complete the object and verify it (see the type's docs).
    pub async fn finish(self) -> Result<Stored> {
        self.finish_verified().await.map(|(s, _)| s)
    }

    /// [`SnapshotWriter::finish`], saying how the stored copy was checked.
    pub async fn finish_verified(self) -> Result<(Stored, Verified)> {
        let sha256 = hex::encode(self.hasher.finalize());
        let t = std::time::Instant::now();
        let put = self.upload.finish().await?;
        metrics::histogram!("berth_snapshot_op_seconds", "op" => "complete")
            .record(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        let etag = self.parts.multipart_etag();
        let by = if put.e_tag.as_deref().map(|e| e.trim_matches('"')) == Some(etag.as_str()) {
            Verified::ETag
        } else {
            let read = self.store.verify(&self.key, &sha256).await?;
            if read != self.bytes {
                return Err(SnapshotError::Corrupt {
                    key: self.key,
                    expected: format!("{} bytes", self.bytes),
                    found: format!("{read} bytes"),
                });
            }
            Verified::ReadBack
        };
        let label = match by {
            Verified::ETag => "etag",
            Verified::ReadBack => "read_back",
        };
        metrics::histogram!("berth_snapshot_op_seconds", "op" => "verify")
            .record(t.elapsed().as_secs_f64());
        metrics::counter!("berth_snapshot_verified_total", "by" => label).increment(1);
        Ok((
            Stored {
                key: self.key,
                bytes: self.bytes,
                sha256,
            },
            by,
        ))
    }

    /// Give up: the parts written so far are discarded.
    pub async fn abort(self) -> Result<()> {
        self.upload.abort().await?;
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

    #[tokio::test]
    async fn a_streamed_write_spans_parts_and_reads_back_as_a_stream() {
        use futures::StreamExt;
        let dir = tempfile::tempdir().expect("tmp");
        let s = SnapshotStore::local(&dir.path().join("snaps")).expect("store");
        let mut w = s.writer("boxes/b2/1.tar.zst").await.expect("writer");
        let mut all = Vec::new();
        // Three and a half parts, in odd-sized pieces.
        for i in 0..(PART_BYTES * 7 / 2 / 100_003 + 1) {
            let piece: Vec<u8> = (0..100_003).map(|j| ((i * 31 + j) % 251) as u8).collect();
            all.extend_from_slice(&piece);
            w.write(Bytes::from(piece)).await.expect("write");
        }
        // Nothing at the key before the end.
        assert!(s.verify("boxes/b2/1.tar.zst", "x").await.is_err());
        let stored = w.finish().await.expect("finish");
        assert_eq!(stored.bytes, all.len() as u64);
        assert_eq!(stored.sha256, hex::encode(Sha256::digest(&all)));
        let mut read = Vec::new();
        let mut st = s
            .get_stream(&stored.key, &stored.sha256)
            .await
            .expect("get");
        while let Some(c) = st.next().await {
            read.extend_from_slice(&c.expect("chunk"));
        }
        assert!(read == all);
        // A wrong digest: the stream ends in an error.
        let mut st = s
            .get_stream(&stored.key, &"0".repeat(64))
            .await
            .expect("get");
        let mut last = None;
        while let Some(c) = st.next().await {
            last = Some(c);
        }
        assert!(matches!(last, Some(Err(SnapshotError::Corrupt { .. }))));
        // An aborted writer leaves nothing.
        let mut w = s.writer("boxes/b2/2.tar.zst").await.expect("writer");
        w.write(Bytes::from_static(b"half")).await.expect("write");
        w.abort().await.expect("abort");
        assert!(s.verify("boxes/b2/2.tar.zst", "x").await.is_err());
    }

    /// An S3-like store for the tests: multipart uploads complete with S3's ETag (the MD5 of
    /// the parts' MD5s of what the server holds), counting reads; `corrupt` flips a byte of
    /// the second part as it is stored, as a faulty server would.
    #[derive(Debug, Default)]
    struct S3ish {
        inner: object_store::memory::InMemory,
        reads: std::sync::atomic::AtomicUsize,
        corrupt: bool,
    }

    impl std::fmt::Display for S3ish {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("S3ish")
        }
    }

    #[derive(Debug)]
    struct S3ishUpload {
        store: Arc<S3ish>,
        path: ObjectPath,
        parts: Arc<std::sync::Mutex<Vec<Bytes>>>,
    }

    #[async_trait::async_trait]
    impl object_store::MultipartUpload for S3ishUpload {
        fn put_part(&mut self, data: object_store::PutPayload) -> object_store::UploadPart {
            let mut part: Vec<u8> = data.iter().flat_map(|b| b.iter().copied()).collect();
            let mut parts = self.parts.lock().expect("lock");
            if self.store.corrupt && parts.len() == 1 {
                part[7] ^= 1;
            }
            parts.push(Bytes::from(part));
            Box::pin(async { Ok(()) })
        }

        async fn complete(&mut self) -> object_store::Result<object_store::PutResult> {
            let parts = self.parts.lock().expect("lock").clone();
            let mut all = Md5::new();
            for p in &parts {
                all.update(Md5::digest(p));
            }
            let body: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
            self.store
                .inner
                .put_opts(&self.path, body.into(), Default::default())
                .await?;
            Ok(object_store::PutResult {
                e_tag: Some(format!(
                    "\"{}-{}\"",
                    hex::encode(all.finalize()),
                    parts.len()
                )),
                version: None,
                extensions: Default::default(),
            })
        }

        async fn abort(&mut self) -> object_store::Result<()> {
            Ok(())
        }
    }

    /// The store as the writer sees it, sharing the counters with the test.
    #[derive(Debug)]
    struct Shared(Arc<S3ish>);

    impl std::fmt::Display for Shared {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            self.0.fmt(f)
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Shared {
        async fn put_opts(
            &self,
            location: &ObjectPath,
            payload: object_store::PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            self.0.inner.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &ObjectPath,
            _opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            Ok(Box::new(S3ishUpload {
                store: self.0.clone(),
                path: location.clone(),
                parts: Default::default(),
            }))
        }

        async fn get_opts(
            &self,
            location: &ObjectPath,
            options: GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.0
                .reads
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.inner.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<ObjectPath>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<ObjectPath>> {
            self.0.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.0.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> object_store::Result<object_store::ListResult> {
            self.0.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &ObjectPath,
            to: &ObjectPath,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.0.inner.copy_opts(from, to, options).await
        }
    }

    /// Two and a half parts of patterned bytes, written in odd-sized pieces.
    async fn write_some(s: &SnapshotStore, key: &str) -> (Result<(Stored, Verified)>, Vec<u8>) {
        let mut w = s.writer(key).await.expect("writer");
        let all: Vec<u8> = (0..PART_BYTES * 5 / 2).map(|j| (j % 253) as u8).collect();
        for piece in all.chunks(1_000_003) {
            w.write(Bytes::copy_from_slice(piece)).await.expect("write");
        }
        (w.finish_verified().await, all)
    }

    #[tokio::test]
    async fn an_s3_etag_that_matches_the_parts_spares_the_read_back() {
        let server = Arc::new(S3ish::default());
        let s = SnapshotStore::new(Arc::new(Shared(server.clone())));
        let (r, all) = write_some(&s, "boxes/b3/1.tar.zst").await;
        let (stored, by) = r.expect("finish");
        assert_eq!(by, Verified::ETag);
        assert_eq!(server.reads.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(stored.sha256, hex::encode(Sha256::digest(&all)));
        assert!(s.get(&stored.key, &stored.sha256).await.expect("get") == all);
    }

    #[tokio::test]
    async fn a_part_stored_wrong_fails_the_etag_and_the_read_back_names_it() {
        let server = Arc::new(S3ish {
            corrupt: true,
            ..Default::default()
        });
        let s = SnapshotStore::new(Arc::new(Shared(server.clone())));
        let (r, _) = write_some(&s, "boxes/b4/1.tar.zst").await;
        assert!(matches!(r, Err(SnapshotError::Corrupt { .. })), "{r:?}");
        assert_eq!(server.reads.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn another_etag_scheme_is_checked_by_reading_back() {
        // A local directory's ETags are not S3's.
        let dir = tempfile::tempdir().expect("tmp");
        let s = SnapshotStore::local(&dir.path().join("snaps")).expect("store");
        let (r, _) = write_some(&s, "boxes/b5/1.tar.zst").await;
        assert_eq!(r.expect("finish").1, Verified::ReadBack);
    }

    #[test]
    fn the_multipart_etag_is_s3s() {
        // Known answers (S3's scheme, computed apart with Python's hashlib): no data is one
        // empty part; 8 MiB + 1 of bytes `i % 251` is two parts.
        assert_eq!(
            PartDigests::default().multipart_etag(),
            "59adb24ef3cdbe0297f05b395827453f-1"
        );
        let mut p = PartDigests::default();
        let data: Vec<u8> = (0..PART_BYTES + 1).map(|i| (i % 251) as u8).collect();
        for piece in data.chunks(77_777) {
            p.update(piece);
        }
        assert_eq!(p.multipart_etag(), "207d5ad937887dd79678eed060f706be-2");
    }
}
