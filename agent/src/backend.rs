//! How vmhad reads and changes the CIB. The daemon uses Pacemaker's CIB API (through the bindings in
//! `bindings/`); unit tests use [`RecordingCib`], which serves a fixed document and records changes.

use std::sync::Mutex;

use tokio::sync::mpsc;

/// The CIB types are the operations crate's, so that vmhad's backend serves its `Cluster` port as is.
pub use vmha_ops::ports::{BoxFuture, CibChange, CibError};

/// Reading and changing the CIB. Every call has a deadline inside the implementation.
pub trait CibBackend: Send + Sync + 'static {
    /// The whole CIB (configuration and status) as XML.
    fn query(&self) -> BoxFuture<'_, Result<String, CibError>>;
    /// Applies one change.
    fn apply(&self, change: CibChange) -> BoxFuture<'_, Result<(), CibError>>;
    /// A channel that yields once per CIB change; it closes when the connection to the CIB is lost
    /// (the caller then reconnects with a new backend).
    fn changes(&self) -> BoxFuture<'_, Result<mpsc::Receiver<()>, CibError>>;
    /// The whole CIB as the change notifications left it (for following changes; a backend that keeps
    /// no copy of its own reads it whole). Not for reading one's own writes: use [`CibBackend::query`].
    fn query_followed(&self) -> BoxFuture<'_, Result<String, CibError>> {
        self.query()
    }
    /// What changed in the CIB since the last call, as the change notifications say (the caller's parts
    /// of it then need reading again), or the whole CIB when they cannot say. One caller only: each call
    /// starts a new "since". A backend that keeps no copy gives the whole CIB.
    fn query_followed_parts(&self) -> BoxFuture<'_, Result<FollowedCib, CibError>> {
        Box::pin(async move { self.query_followed().await.map(FollowedCib::Whole) })
    }
}

/// The CIB as [`CibBackend::query_followed_parts`] gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowedCib {
    Whole(String),
    Parts(vmha_model::cib::CibUpdate),
}

/// A CIB for unit tests: `query` returns the document it holds, `apply` records the change.
#[derive(Debug, Default)]
pub struct RecordingCib {
    pub document: Mutex<String>,
    pub applied: Mutex<Vec<CibChange>>,
}

impl RecordingCib {
    pub fn new(document: &str) -> Self {
        RecordingCib {
            document: Mutex::new(document.to_string()),
            applied: Mutex::default(),
        }
    }

    pub fn changes(&self) -> Vec<CibChange> {
        self.applied.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

impl CibBackend for RecordingCib {
    fn query(&self) -> BoxFuture<'_, Result<String, CibError>> {
        let doc = self.document.lock().map(|d| d.clone()).map_err(|_| CibError {
            call: "query",
            message: "poisoned".into(),
        });
        Box::pin(async move { doc })
    }

    fn apply(&self, change: CibChange) -> BoxFuture<'_, Result<(), CibError>> {
        let result = self.applied.lock().map(|mut a| a.push(change)).map_err(|_| CibError {
            call: "apply",
            message: "poisoned".into(),
        });
        Box::pin(async move { result })
    }

    fn changes(&self) -> BoxFuture<'_, Result<mpsc::Receiver<()>, CibError>> {
        let (_tx, rx) = mpsc::channel(1);
        Box::pin(async move { Ok(rx) })
    }
}
