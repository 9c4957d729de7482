//! Readiness of what holds berth's state off the box: the record store and the snapshot store.

use super::Engine;

impl Engine {
    /// The snapshot store answers (a local directory, or the S3 bucket).
    pub async fn snapshots_ping(&self) -> Result<(), String> {
        self.config
            .snapshots
            .ping()
            .await
            .map_err(|e| e.to_string())
    }
}
