//! What vmhad knows about the cluster: the CIB's view plus Corosync's membership and quorum, kept as
//! immutable snapshots in a watch channel so D-Bus property reads and waiting jobs always see one
//! consistent state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::backend::CibBackend;
use crate::guest::{GuestContext, Guests};
use vmha_ops::Ports;

/// The cluster's state as this vmhad knows it: defined by the operations crate, which reads it too.
pub use vmha_ops::state::{Membership, Snapshot};

/// State shared by vmhad's D-Bus objects and jobs.
pub struct Shared {
    pub local_host: String,
    pub backend: Arc<dyn CibBackend>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    next_job: AtomicU64,
    /// How long a job waits for the cluster to reach the state it asked for.
    pub job_deadline: Duration,
    /// This host's (CPUs, memory MiB) as libvirt reports them, once known.
    capacity: OnceLock<(u32, u64)>,
    /// The guest channels of the VMs on this host.
    pub guests: Arc<Guests>,
    /// What operations run against (vmhad's implementations of the operations crate's ports), set once
    /// at start ([`Shared::set_ports`]).
    ports: OnceLock<Ports>,
    /// Where vmhad keeps virtual-cluster archives for callers that name them (set once at start; the
    /// default directory otherwise).
    archive_store: OnceLock<crate::archive_store::Store>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("local_host", &self.local_host)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub fn new(local_host: String, backend: Arc<dyn CibBackend>) -> Arc<Self> {
        let (snapshot, _) = watch::channel(Arc::new(Snapshot::default()));
        Arc::new(Shared {
            local_host,
            backend,
            snapshot,
            next_job: AtomicU64::new(1),
            job_deadline: Duration::from_secs(180),
            capacity: OnceLock::new(),
            guests: Arc::new(Guests::default()),
            ports: OnceLock::new(),
            archive_store: OnceLock::new(),
        })
    }

    /// Sets the archive store's directory (once, at start).
    pub fn set_archive_dir(&self, dir: std::path::PathBuf) {
        let _ = self.archive_store.set(crate::archive_store::Store::new(dir));
    }

    /// The archive store.
    pub fn archive_store(&self) -> &crate::archive_store::Store {
        self.archive_store
            .get_or_init(|| crate::archive_store::Store::new(crate::archive_store::DEFAULT_DIR))
    }

    /// What the guest channels need of this state.
    pub fn guest_context(&self) -> GuestContext {
        GuestContext {
            local_host: self.local_host.clone(),
            guests: Arc::clone(&self.guests),
            state: self.subscribe(),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    /// Replaces the state; returns the previous one.
    pub fn update(&self, change: impl FnOnce(&mut Snapshot)) -> Arc<Snapshot> {
        let old = self.snapshot();
        let mut new = (*old).clone();
        change(&mut new);
        self.snapshot.send_replace(Arc::new(new));
        old
    }

    /// Replaces the CIB's view (connected to the CIB); returns the previous state. The rest of the state
    /// is carried over without copying the previous view.
    pub fn replace_view(&self, view: vmha_model::ClusterView) -> Arc<Snapshot> {
        let mut old = None;
        self.snapshot.send_modify(|current| {
            let new = Snapshot {
                view: Some(view),
                membership: current.membership.clone(),
                cib_connected: true,
            };
            old = Some(std::mem::replace(current, Arc::new(new)));
        });
        old.unwrap_or_default()
    }

    pub fn host_capacity(&self) -> Option<(u32, u64)> {
        self.capacity.get().copied()
    }

    pub fn set_host_capacity(&self, cpus: u32, memory_mib: u64) {
        let _ = self.capacity.set((cpus, memory_mib));
    }

    /// Sets the context operations run against (once, at vmhad's start; later calls are ignored).
    pub fn set_ports(&self, ports: Ports) {
        let _ = self.ports.set(ports);
    }

    /// The context operations run against; `Err` until [`Shared::set_ports`] was called.
    pub fn ports(&self) -> Result<&Ports, String> {
        self.ports
            .get()
            .ok_or_else(|| "vmhad is starting: its operations are not set up yet".to_string())
    }

    pub fn next_job_id(&self) -> u64 {
        self.next_job.fetch_add(1, Ordering::Relaxed)
    }

    /// Waits until `check` returns Some on a snapshot (the current one or a later one), or fails after
    /// `limit` with the last reason `check` could give.
    pub async fn wait_until<T>(
        &self,
        limit: Duration,
        mut check: impl FnMut(&Snapshot) -> Option<Result<T, String>>,
    ) -> Result<T, String> {
        let mut rx = self.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let current = rx.borrow_and_update().clone();
            if let Some(result) = check(&current) {
                return result;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err("vmhad is shutting down".into()),
                Err(_) => return Err(format!("not done within {} s", limit.as_secs())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RecordingCib;

    #[test]
    fn corosync_membership_wins_over_the_cib() {
        let mut s = Snapshot::default();
        assert!(s.members().is_empty());
        assert!(!s.quorate());
        s.membership = Some(Membership {
            members: vec!["a".into(), "b".into()],
            quorate: true,
            agents: vec![],
        });
        assert_eq!(s.members(), vec!["a", "b"]);
        assert!(s.quorate());
    }

    #[tokio::test]
    async fn waiting_sees_later_snapshots_and_times_out() {
        let shared = Shared::new("n1".into(), Arc::new(RecordingCib::new("<cib/>")));
        let waiter = {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                shared
                    .wait_until(Duration::from_secs(5), |s| {
                        s.membership.as_ref().map(|m| Ok(m.members.len()))
                    })
                    .await
            })
        };
        tokio::task::yield_now().await;
        shared.update(|s| {
            s.membership = Some(Membership {
                members: vec!["x".into()],
                quorate: true,
                agents: vec![],
            })
        });
        assert_eq!(waiter.await.unwrap(), Ok(1));
        let r: Result<(), String> = shared.wait_until(Duration::from_millis(20), |_| None).await;
        assert!(r.unwrap_err().contains("not done within"));
    }
}
