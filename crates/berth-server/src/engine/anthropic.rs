//! What the Managed Agents API (`crate::anthropic`) needs of the engine beyond its session and
//! box calls: its documents and a session's stored events. Each call checks the
//! tenant the way the engine's own calls do.

use super::error::EngineError;
use super::Engine;
use berth_api::Event;
use berth_store::Document;

impl Engine {
    /// Write one version of a document (see `Store::put_document`).
    pub async fn put_document(&self, doc: &Document, replace: bool) -> Result<(), EngineError> {
        Ok(self.store.put_document(doc, replace).await?)
    }

    /// Compare-and-swap of a single-version document (see `Store::advance_document`).
    pub async fn advance_document(&self, doc: &Document, from: i64) -> Result<bool, EngineError> {
        Ok(self.store.advance_document(doc, from).await?)
    }

    /// Every version of a tenant's documents of `kind` (of one `id` when given).
    pub async fn documents(
        &self,
        kind: &str,
        tenant: &str,
        id: Option<&str>,
    ) -> Result<Vec<Document>, EngineError> {
        Ok(self.store.documents(kind, tenant, id).await?)
    }

    /// How many versions of documents of `kind` a tenant holds (see `Store::count_documents`).
    pub async fn count_documents(&self, kind: &str, tenant: &str) -> Result<i64, EngineError> {
        Ok(self.store.count_documents(kind, tenant).await?)
    }

    pub async fn delete_document(
        &self,
        kind: &str,
        tenant: &str,
        id: &str,
    ) -> Result<bool, EngineError> {
        Ok(self.store.delete_document(kind, tenant, id).await?)
    }

    /// A keyset page of the latest version of each of a tenant's documents of `kind` (see
    /// `Store::latest_documents`).
    pub async fn latest_documents(
        &self,
        kind: &str,
        tenant: &str,
        after: Option<&str>,
        desc: bool,
        limit: i64,
    ) -> Result<Vec<Document>, EngineError> {
        Ok(self
            .store
            .latest_documents(kind, tenant, after, desc, limit)
            .await?)
    }

    /// A session's stored events with `seq > after`, oldest first, at most `limit`.
    pub async fn session_events_after(
        &self,
        tenant: &str,
        id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Event>, EngineError> {
        self.get_session(tenant, id).await?;
        Ok(self.store.events_after(id, after, limit).await?)
    }
}
