//! The CIB: connect, read and change it in single operations, and follow its changes.
//!
//! Every call runs on the process's CIB thread (see [`crate`]); the caller awaits the answer with a deadline.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::cib_thread;
use crate::error::{Error, Result};

/// What a connection may do with the CIB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read and change (`cib_command`, the CIB manager's read-write channel).
    ReadWrite,
    /// Read only (`cib_query`, the read-only channel).
    ReadOnly,
}

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// This host's CIB manager (`cib_new()`, which honours `CIB_file`/`CIB_shadow` like Pacemaker's tools).
    Local,
    /// A CIB in a file (`cib_file_new()`); written back when a read-write handle is dropped.
    File(PathBuf),
}

/// Which part of the CIB a call addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The whole CIB.
    All,
    /// A section by name: `configuration`, `nodes`, `resources`, `constraints`, `crm_config`,
    /// `rsc_defaults`, `op_defaults`, `status`.
    Section(String),
    /// The elements an XPath expression selects (`cib_xpath`).
    XPath(String),
}

impl Scope {
    pub fn section(name: &str) -> Scope {
        Scope::Section(name.to_string())
    }

    pub fn xpath(expression: &str) -> Scope {
        Scope::XPath(expression.to_string())
    }
}

/// Call options (`enum cib_call_options`) besides the ones this crate always sets (`cib_sync_call`, and
/// `cib_xpath` for [`Scope::XPath`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallOptions(u32);

impl CallOptions {
    pub const NONE: CallOptions = CallOptions(0);
    /// Create what a modify addresses when it is missing (`cib_can_create`).
    pub const CAN_CREATE: CallOptions = CallOptions(pacemaker_sys::cib_can_create);
    /// An XPath may select several elements (`cib_multiple`).
    pub const MULTIPLE: CallOptions = CallOptions(pacemaker_sys::cib_multiple);
    /// Return the selected elements without their children (`cib_no_children`).
    pub const NO_CHILDREN: CallOptions = CallOptions(pacemaker_sys::cib_no_children);
    /// Answer from this host's copy without asking the DC (`cib_scope_local`).
    pub const SCOPE_LOCAL: CallOptions = CallOptions(pacemaker_sys::cib_scope_local);

    pub fn bits(self) -> u32 {
        self.0
    }
}

impl std::ops::BitOr for CallOptions {
    type Output = CallOptions;

    fn bitor(self, other: CallOptions) -> CallOptions {
        CallOptions(self.0 | other.0)
    }
}

/// The CIB's version: `admin_epoch.epoch.num_updates`, ordered the way Pacemaker orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CibVersion {
    pub admin_epoch: u64,
    pub epoch: u64,
    pub num_updates: u64,
}

impl std::fmt::Display for CibVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.admin_epoch, self.epoch, self.num_updates)
    }
}

/// One "the CIB changed" notification (`cib_diff_notify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CibChange {
    /// The CIB's version after the change (`None` when the notification carried none).
    pub version: Option<CibVersion>,
    /// The CIB operation that made it (`cib_modify`, `cib_replace`, `cib_apply_diff`, ...).
    pub operation: Option<String>,
    /// The operation's legacy result code (0 = applied).
    pub rc: i32,
    /// XPaths of the changed elements (one per change of a version-2 diff).
    pub paths: Vec<String>,
    /// Notifications dropped just before this one because the consumer fell behind (re-read the CIB).
    pub missed: u64,
}

/// The local copy of the CIB as [`Cib::query_followed_parts`] gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Followed {
    /// The whole CIB.
    Whole(String),
    /// Only what changed.
    Parts(FollowedParts),
}

/// The parts of the CIB that changed, as XML text: the `<cib>` element alone (attributes, no children),
/// whole sections, and single top-level elements of the resources section and `<node_state>` elements by
/// id (`None`: gone). A section or element that is in `sections` is not also listed by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FollowedParts {
    pub root: String,
    /// (`crm_config`, `nodes`, `constraints`, `resources`, `tags` or `status`, the element's text or "").
    pub sections: Vec<(String, String)>,
    pub resources: Vec<(String, Option<String>)>,
    pub node_states: Vec<(String, Option<String>)>,
}

/// A connection to the CIB. Dropping it signs off and frees the connection on the CIB thread.
#[derive(Debug)]
pub struct Cib {
    id: u64,
}

impl Cib {
    /// Connects to this host's CIB manager as `client_name` (shown in Pacemaker's logs).
    ///
    /// Pacemaker's sign-on waits for the CIB manager's answer without a timeout of its own: if the CIB manager
    /// accepts the connection but never answers, this returns [`Error::Timeout`] and the CIB thread stays
    /// blocked until the daemon answers or dies (every later CIB call of the process times out too).
    pub async fn connect(client_name: &str, access: Access, limit: Duration) -> Result<Cib> {
        let id = cib_thread::connect(Target::Local, client_name, access, limit).await?;
        Ok(Cib { id })
    }

    /// Opens a CIB kept in a file (Pacemaker's file-backed CIB; no daemon involved). A read-write handle
    /// writes the file back when it is dropped. libcib keeps the file's contents in one process-wide
    /// buffer: open one file-backed CIB at a time. Notifications are not offered.
    pub async fn open_file(path: &Path, access: Access, limit: Duration) -> Result<Cib> {
        let id = cib_thread::connect(Target::File(path.to_path_buf()), "vmha", access, limit).await?;
        Ok(Cib { id })
    }

    /// The XML of what `scope` selects.
    pub async fn query(&self, scope: &Scope, options: CallOptions, limit: Duration) -> Result<String> {
        cib_thread::query(self.id, scope.clone(), options, limit).await
    }

    /// The whole CIB as XML.
    pub async fn query_all(&self, limit: Duration) -> Result<String> {
        self.query(&Scope::All, CallOptions::NONE, limit).await
    }

    /// The whole CIB as XML from a local copy kept up to date with the diffs of this handle's notifications
    /// (as crm_mon keeps its copy): read whole on the first call and again whenever a diff does not apply,
    /// else no call to the CIB manager at all. Without a subscription, the same as [`Cib::query_all`]. A
    /// change this process made itself shows once its notification arrived: use `query_all` to read one's
    /// own writes.
    pub async fn query_all_followed(&self, limit: Duration) -> Result<String> {
        cib_thread::copy_text(self.id, limit).await
    }

    /// What changed in the local copy (see [`Cib::query_all_followed`]) since this was last called: the
    /// parts the notifications' diffs touched, or the whole CIB when they cannot say (the first call, a
    /// diff not understood or not applied). One caller per connection: each call starts a new "since".
    pub async fn query_followed_parts(&self, limit: Duration) -> Result<Followed> {
        cib_thread::copy_parts(self.id, limit).await
    }

    /// The local copy's counters: (diffs applied since it was last read whole, whole reads so far).
    pub async fn local_copy_stats(&self, limit: Duration) -> Result<(u64, u64)> {
        cib_thread::copy_stats(self.id, limit).await
    }

    /// Merges `xml` into what `scope` selects (`cib_modify`).
    pub async fn modify(&self, scope: &Scope, xml: &str, options: CallOptions, limit: Duration) -> Result<()> {
        cib_thread::change(self.id, cib_thread::Change::Modify, scope.clone(), xml, options, limit).await
    }

    /// Replaces what `scope` selects with `xml` (`cib_replace`).
    pub async fn replace(&self, scope: &Scope, xml: &str, options: CallOptions, limit: Duration) -> Result<()> {
        cib_thread::change(self.id, cib_thread::Change::Replace, scope.clone(), xml, options, limit).await
    }

    /// Adds `xml` under what `scope` selects (`cib_create`); fails if it exists.
    pub async fn create(&self, scope: &Scope, xml: &str, options: CallOptions, limit: Duration) -> Result<()> {
        cib_thread::change(self.id, cib_thread::Change::Create, scope.clone(), xml, options, limit).await
    }

    /// Deletes the element `xml` describes from what `scope` selects (`cib_delete`).
    pub async fn delete(&self, scope: &Scope, xml: &str, options: CallOptions, limit: Duration) -> Result<()> {
        cib_thread::change(self.id, cib_thread::Change::Delete, scope.clone(), xml, options, limit).await
    }

    /// Subscribes to CIB change notifications (`cib_diff_notify`); one subscription per handle.
    ///
    /// Reconnect contract: when the connection to the CIB manager is lost, the stream yields one
    /// [`Error::Disconnected`] and ends. The caller then drops this handle, connects again (with back-off)
    /// and re-reads the whole CIB, since changes made meanwhile produced no notification. The stream also
    /// ends (without an error) when this handle is dropped.
    pub async fn subscribe(&self, limit: Duration) -> Result<CibChanges> {
        cib_thread::subscribe(self.id, limit).await
    }
}

impl Drop for Cib {
    fn drop(&mut self) {
        cib_thread::close(self.id);
    }
}

/// Why a change stream ended, set by the CIB thread before it drops the sender.
pub(crate) type EndReason = Arc<Mutex<Option<Error>>>;

/// The stream of [`CibChange`]s of one subscription (a [`futures_core::Stream`]; also [`CibChanges::next`]).
#[derive(Debug)]
pub struct CibChanges {
    rx: mpsc::Receiver<CibChange>,
    end: EndReason,
}

impl CibChanges {
    pub(crate) fn new(rx: mpsc::Receiver<CibChange>, end: EndReason) -> Self {
        CibChanges { rx, end }
    }

    /// The next change; `Some(Err(Error::Disconnected))` once when the connection is lost, then `None`.
    pub async fn next(&mut self) -> Option<Result<CibChange>> {
        std::future::poll_fn(|cx| self.poll_change(cx)).await
    }

    fn poll_change(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<CibChange>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(change)) => Poll::Ready(Some(Ok(change))),
            Poll::Ready(None) => {
                let reason = self.end.lock().map(|mut r| r.take()).unwrap_or(None);
                Poll::Ready(reason.map(Err))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl futures_core::Stream for CibChanges {
    type Item = Result<CibChange>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_change(cx)
    }
}

/// Reads a `cib_diff_notify` message: `<notify subt="cib_diff_notify" cib_op=".." cib_rc="..">` with the
/// CIB's generation (`<cib_generation><generation_tuple ../>`) and the diff (`<cib_update_result><diff>`).
/// The version is the diff's target version, else the generation.
pub(crate) fn parse_notification(xml: &str) -> Result<CibChange> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| Error::Invalid {
        call: "cib_diff_notify",
        reason: format!("unreadable notification: {e}"),
    })?;
    let root = doc.root_element();
    let version_of = |node: roxmltree::Node| -> Option<CibVersion> {
        Some(CibVersion {
            admin_epoch: node.attribute("admin_epoch")?.parse().ok()?,
            epoch: node.attribute("epoch")?.parse().ok()?,
            num_updates: node.attribute("num_updates")?.parse().ok()?,
        })
    };
    let diff = root.descendants().find(|n| n.has_tag_name("diff"));
    let target = diff
        .and_then(|d| d.children().find(|n| n.has_tag_name("version")))
        .and_then(|v| v.children().find(|n| n.has_tag_name("target")))
        .and_then(version_of);
    let generation = root
        .descendants()
        .find(|n| n.has_tag_name("generation_tuple"))
        .and_then(version_of);
    let paths = diff
        .map(|d| {
            d.children()
                .filter(|n| n.has_tag_name("change"))
                .filter_map(|c| c.attribute("path"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Ok(CibChange {
        version: target.or(generation),
        operation: root.attribute("cib_op").map(str::to_string),
        rc: root.attribute("cib_rc").and_then(|r| r.parse().ok()).unwrap_or(0),
        paths,
        missed: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOTIFY: &str = r#"<notify t="cib_notify" subt="cib_diff_notify" cib_op="cib_modify" cib_rc="0" cib_object_type="diff"><cib_generation><generation_tuple crm_feature_set="3.16.2" validate-with="pacemaker-3.9" epoch="7" num_updates="0" admin_epoch="0" cib-last-written="x" have-quorum="1" dc-uuid="1"/></cib_generation><cib_update_result><diff format="2"><version><source admin_epoch="0" epoch="6" num_updates="3"/><target admin_epoch="0" epoch="7" num_updates="0"/></version><change operation="modify" path="/cib"><change-list><change-attr name="epoch" operation="set" value="7"/></change-list></change><change operation="create" path="/cib/configuration/crm_config/cluster_property_set[@id='cib-bootstrap-options']" position="5"><nvpair id="x" name="y" value="z"/></change></diff></cib_update_result></notify>"#;

    #[test]
    fn reads_the_target_version_and_changed_paths() {
        let c = parse_notification(NOTIFY).unwrap();
        assert_eq!(
            c.version,
            Some(CibVersion {
                admin_epoch: 0,
                epoch: 7,
                num_updates: 0
            })
        );
        assert_eq!(c.operation.as_deref(), Some("cib_modify"));
        assert_eq!(c.rc, 0);
        assert_eq!(
            c.paths,
            vec![
                "/cib".to_string(),
                "/cib/configuration/crm_config/cluster_property_set[@id='cib-bootstrap-options']".to_string()
            ]
        );
    }

    #[test]
    fn falls_back_to_the_generation_without_a_v2_diff() {
        let xml = r#"<notify subt="cib_diff_notify" cib_op="cib_apply_diff" cib_rc="-205"><cib_generation><generation_tuple epoch="3" num_updates="9" admin_epoch="1"/></cib_generation></notify>"#;
        let c = parse_notification(xml).unwrap();
        assert_eq!(c.version.unwrap().to_string(), "1.3.9");
        assert_eq!(c.rc, -205);
        assert!(c.paths.is_empty());
        assert!(parse_notification("<notify").is_err());
    }

    #[test]
    fn versions_order_like_pacemaker() {
        let v = |a, e, n| CibVersion {
            admin_epoch: a,
            epoch: e,
            num_updates: n,
        };
        assert!(v(0, 7, 0) > v(0, 6, 99));
        assert!(v(1, 0, 0) > v(0, 99, 99));
        assert!(v(0, 7, 1) > v(0, 7, 0));
    }

    #[test]
    fn options_combine() {
        let o = CallOptions::CAN_CREATE | CallOptions::MULTIPLE;
        assert_eq!(o.bits(), pacemaker_sys::cib_can_create | pacemaker_sys::cib_multiple);
        assert_eq!(CallOptions::default(), CallOptions::NONE);
    }
}
