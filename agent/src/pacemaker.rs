//! vmhad's CIB access through Pacemaker's CIB API (the `vmha-pacemaker` bindings). One read-write
//! connection, made on first use and again after it is lost; every call has a deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Mutex};
use vmha_pacemaker::{Access, CallOptions, Cib, Followed, Scope};

use crate::backend::{BoxFuture, CibBackend, CibChange, CibError, FollowedCib};

/// Deadline of one CIB call.
const CALL_DEADLINE: Duration = Duration::from_secs(15);

/// The CIB of this host's cluster.
#[derive(Default)]
pub struct PacemakerCib {
    connection: Mutex<Option<Arc<Cib>>>,
}

impl std::fmt::Debug for PacemakerCib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PacemakerCib")
    }
}

fn error(call: &'static str, e: vmha_pacemaker::Error) -> CibError {
    CibError {
        call,
        message: e.to_string(),
    }
}

impl PacemakerCib {
    async fn cib(&self) -> Result<Arc<Cib>, CibError> {
        let mut slot = self.connection.lock().await;
        if let Some(cib) = slot.as_ref() {
            return Ok(Arc::clone(cib));
        }
        let cib = Arc::new(
            Cib::connect("vmhad", Access::ReadWrite, CALL_DEADLINE)
                .await
                .map_err(|e| error("connect", e))?,
        );
        *slot = Some(Arc::clone(&cib));
        Ok(cib)
    }

    /// The whole CIB: from the local copy the notifications keep (`followed`), or queried.
    async fn read_whole(&self, followed: bool) -> Result<String, CibError> {
        let cib = self.cib().await?;
        let read = if followed {
            cib.query_all_followed(CALL_DEADLINE).await
        } else {
            cib.query_all(CALL_DEADLINE).await
        };
        match read {
            Ok(xml) => Ok(xml),
            Err(e) => {
                self.forget(&e).await;
                Err(error("query", e))
            }
        }
    }

    /// Forgets a connection that failed, so the next call connects again.
    async fn forget(&self, e: &vmha_pacemaker::Error) {
        if e.is_disconnected() {
            *self.connection.lock().await = None;
        }
    }
}

impl CibBackend for PacemakerCib {
    fn query(&self) -> BoxFuture<'_, Result<String, CibError>> {
        Box::pin(self.read_whole(false))
    }

    fn query_followed(&self) -> BoxFuture<'_, Result<String, CibError>> {
        Box::pin(self.read_whole(true))
    }

    fn query_followed_parts(&self) -> BoxFuture<'_, Result<FollowedCib, CibError>> {
        Box::pin(async move {
            let cib = self.cib().await?;
            match cib.query_followed_parts(CALL_DEADLINE).await {
                Ok(Followed::Whole(xml)) => Ok(FollowedCib::Whole(xml)),
                Ok(Followed::Parts(p)) => Ok(FollowedCib::Parts(vmha_model::cib::CibUpdate {
                    root: p.root,
                    sections: p.sections,
                    resources: p.resources,
                    node_states: p.node_states,
                })),
                Err(e) => {
                    self.forget(&e).await;
                    Err(error("query", e))
                }
            }
        })
    }

    fn apply(&self, change: CibChange) -> BoxFuture<'_, Result<(), CibError>> {
        Box::pin(async move {
            let cib = self.cib().await?;
            let result = match &change {
                CibChange::Modify { section, xml } => {
                    cib.modify(&Scope::section(section), xml, CallOptions::CAN_CREATE, CALL_DEADLINE)
                        .await
                }
                CibChange::Create { section, xml } => {
                    cib.create(&Scope::section(section), xml, CallOptions::NONE, CALL_DEADLINE)
                        .await
                }
                CibChange::Delete { section, xml } => {
                    cib.delete(&Scope::section(section), xml, CallOptions::NONE, CALL_DEADLINE)
                        .await
                }
                CibChange::Replace { section, xml } => {
                    cib.replace(&Scope::section(section), xml, CallOptions::NONE, CALL_DEADLINE)
                        .await
                }
            };
            if let Err(e) = &result {
                self.forget(e).await;
                tracing::warn!(?change, "CIB change failed: {e}");
            }
            result.map_err(|e| error("apply", e))
        })
    }

    fn changes(&self) -> BoxFuture<'_, Result<mpsc::Receiver<()>, CibError>> {
        Box::pin(async move {
            let cib = self.cib().await?;
            let mut changes = match cib.subscribe(CALL_DEADLINE).await {
                Ok(c) => c,
                Err(e) => {
                    self.forget(&e).await;
                    return Err(error("subscribe", e));
                }
            };
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(async move {
                while let Some(change) = changes.next().await {
                    if let Err(e) = change {
                        tracing::warn!("CIB notifications: {e}");
                        break;
                    }
                    // A full channel already holds a pending "changed": nothing is lost by dropping this one.
                    if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                        break;
                    }
                }
            });
            Ok(rx)
        })
    }
}
