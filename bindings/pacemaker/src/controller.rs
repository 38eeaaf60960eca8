//! The controller (pacemaker-controld) over its IPC API: who the DC is, and reports of resource failures.
//!
//! Each [`Controller`] has a thread of its own that owns the connection (`pcmk_new_ipc_api` with
//! `pcmk_ipc_dispatch_poll`). The controller speaks only when asked, so the thread sleeps on its request
//! channel while nothing is outstanding and on the IPC socket (`pcmk_poll_ipc`, bounded by the request's
//! deadline, then `pcmk_dispatch_ipc`) while a request is. Requests are sent one at a time: the controller's
//! replies carry no request id.

use std::ffi::{c_void, CString};
use std::ptr;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use pacemaker_sys as sys;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::xml::{self, cstring};

const DAEMON: &str = "the controller";

/// What the DC's controller answered to a ping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerState {
    /// The designated controller: the host whose controller answered.
    pub dc: String,
    /// The DC's controller state machine state (`S_IDLE`, `S_TRANSITION_ENGINE`, `S_POLICY_ENGINE`, ...).
    pub fsa_state: String,
    /// The DC's health verdict (`ok`).
    pub result: String,
}

/// A resource as Pacemaker's executor knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// The resource id in the CIB (`d1`, `vm1`).
    pub id: String,
    /// The agent standard (`ocf`, `systemd`, `stonith`).
    pub standard: String,
    /// The agent provider for OCF agents (`pacemaker`, `vmha`).
    pub provider: Option<String>,
    /// The agent type (`Dummy`, `VirtualMachine`).
    pub agent: String,
}

/// A connection to this host's controller. Dropping it closes the connection (on its thread, without
/// waiting).
#[derive(Debug)]
pub struct Controller {
    requests: std_mpsc::Sender<Request>,
}

impl Controller {
    /// Connects to this host's controller. If the controller accepts the connection but never answers the
    /// IPC hand-shake, this returns [`Error::Timeout`] and the connection's thread stays blocked until the
    /// daemon answers or dies; nothing else waits on it.
    pub async fn connect(limit: Duration) -> Result<Controller> {
        const CALL: &str = "pcmk_connect_ipc";
        let (requests, rx) = std_mpsc::channel();
        let (connected_tx, connected) = oneshot::channel();
        std::thread::Builder::new()
            .name("pcmk-controld".into())
            .spawn(move || serve(rx, connected_tx))
            .map_err(|e| Error::Invalid {
                call: CALL,
                reason: format!("starting the controller thread: {e}"),
            })?;
        match tokio::time::timeout(limit, connected).await {
            Ok(Ok(Ok(()))) => Ok(Controller { requests }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) | Err(_) => Err(Error::Timeout { call: CALL, limit }),
        }
    }

    /// Pings the DC's controller (`pcmk_controld_api_ping` without a node: the request goes to the DC).
    /// Without a DC nobody answers: [`Error::Timeout`].
    pub async fn ping(&self, limit: Duration) -> Result<ControllerState> {
        match self.request(Op::Ping, limit).await? {
            Answer::Ping(state) => Ok(state),
            Answer::Done => Err(Error::Invalid {
                call: Op::Ping.call(),
                reason: "unexpected answer".into(),
            }),
        }
    }

    /// The designated controller's host, or `None` when no DC answers within `limit` (an election is
    /// running, or this host is not part of the cluster's quorate partition).
    pub async fn designated_controller(&self, limit: Duration) -> Result<Option<String>> {
        match self.ping(limit).await {
            Ok(state) => Ok(Some(state.dc)),
            Err(Error::Timeout { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reports that `resource` failed on `host` (`pcmk_controld_api_fail`): the host's controller records a
    /// failed monitor, the fail count goes up and the DC schedules recovery at once instead of waiting for
    /// the next monitor. Returns once that controller acknowledged it.
    pub async fn fail_resource(&self, host: &str, resource: &Resource, limit: Duration) -> Result<()> {
        let op = Op::Fail(ResourceRequest::new("pcmk_controld_api_fail", host, resource)?);
        self.request(op, limit).await.map(|_| ())
    }

    /// Clears `resource`'s operation history on `host` (`pcmk_controld_api_refresh`, the per-host part of
    /// `crm_resource --refresh`): Pacemaker probes it again. Fail counts are attributes and stay.
    pub async fn refresh_resource(&self, host: &str, resource: &Resource, limit: Duration) -> Result<()> {
        let op = Op::Refresh(ResourceRequest::new("pcmk_controld_api_refresh", host, resource)?);
        self.request(op, limit).await.map(|_| ())
    }

    async fn request(&self, op: Op, limit: Duration) -> Result<Answer> {
        let call = op.call();
        let deadline = Instant::now() + limit;
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request {
                op,
                limit,
                deadline,
                reply,
            })
            .map_err(|_| Error::Disconnected { call, daemon: DAEMON })?;
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) | Err(_) => Err(Error::Timeout { call, limit }),
        }
    }
}

#[derive(Debug)]
struct ResourceRequest {
    host: CString,
    id: String,
    c_id: CString,
    standard: CString,
    provider: Option<CString>,
    agent: CString,
}

impl ResourceRequest {
    fn new(call: &'static str, host: &str, r: &Resource) -> Result<Self> {
        Ok(ResourceRequest {
            host: cstring(call, host)?,
            id: r.id.clone(),
            c_id: cstring(call, &r.id)?,
            standard: cstring(call, &r.standard)?,
            provider: r.provider.as_deref().map(|p| cstring(call, p)).transpose()?,
            agent: cstring(call, &r.agent)?,
        })
    }
}

#[derive(Debug)]
enum Op {
    Ping,
    Fail(ResourceRequest),
    Refresh(ResourceRequest),
}

impl Op {
    fn call(&self) -> &'static str {
        match self {
            Op::Ping => "pcmk_controld_api_ping",
            Op::Fail(_) => "pcmk_controld_api_fail",
            Op::Refresh(_) => "pcmk_controld_api_refresh",
        }
    }
}

#[derive(Debug)]
enum Answer {
    Ping(ControllerState),
    Done,
}

#[derive(Debug)]
struct Request {
    op: Op,
    limit: Duration,
    deadline: Instant,
    reply: oneshot::Sender<Result<Answer>>,
}

/// A reply as the IPC callback copied it out of Pacemaker's structures.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Ping {
        status: i32,
        host_from: Option<String>,
        fsa_state: Option<String>,
        result: Option<String>,
    },
    Resource {
        status: i32,
        node_state: String,
    },
    Other {
        status: i32,
    },
}

/// Replies collected by [`on_event`] during one `pcmk_dispatch_ipc`.
#[derive(Debug, Default)]
struct Inbox {
    replies: Vec<Reply>,
    disconnected: bool,
}

/// The connection's thread: connect, then serve requests one at a time until the handle is dropped.
fn serve(requests: std_mpsc::Receiver<Request>, connected: oneshot::Sender<Result<()>>) {
    xml::init_thread();
    let mut inbox = Box::new(Inbox::default());
    let api = match open(&mut inbox) {
        Ok(api) => api,
        Err(e) => {
            let _ = connected.send(Err(e));
            return;
        }
    };
    if connected.send(Ok(())).is_err() {
        // SAFETY: api is live and owned here; freed once.
        unsafe { sys::pcmk_free_ipc_api(api) };
        return;
    }
    while let Ok(request) = requests.recv() {
        if request.reply.is_closed() || Instant::now() >= request.deadline {
            continue; // the caller gave up before the request was sent
        }
        let result = if inbox.disconnected {
            Err(Error::Disconnected {
                call: request.op.call(),
                daemon: DAEMON,
            })
        } else {
            exchange(api, &mut inbox, &request)
        };
        let _ = request.reply.send(result);
    }
    // SAFETY: api is live and owned here; pcmk_free_ipc_api disconnects (calling on_event with the inbox,
    // which is still alive) and frees it once.
    unsafe { sys::pcmk_free_ipc_api(api) };
}

/// Creates the IPC API object, registers [`on_event`] with `inbox` and connects in poll mode.
fn open(inbox: &mut Inbox) -> Result<*mut sys::pcmk_ipc_api_t> {
    let mut api: *mut sys::pcmk_ipc_api_t = ptr::null_mut();
    // SAFETY: pcmk_new_ipc_api stores a new object we own in api (or leaves it NULL).
    let rc = unsafe { sys::pcmk_new_ipc_api(&mut api, sys::pcmk_ipc_controld) };
    if rc != sys::pcmk_rc_ok || api.is_null() {
        return Err(rc_error("pcmk_new_ipc_api", rc));
    }
    // SAFETY: api is live; inbox is heap-allocated by the caller and outlives api (freed after it in serve).
    let rc = unsafe {
        sys::pcmk_register_ipc_callback(api, Some(on_event), ptr::from_mut(inbox).cast::<c_void>());
        sys::pcmk_connect_ipc(api, sys::pcmk_ipc_dispatch_poll)
    };
    if rc != sys::pcmk_rc_ok {
        // SAFETY: api is live and owned here; freed once.
        unsafe { sys::pcmk_free_ipc_api(api) };
        return Err(rc_error("pcmk_connect_ipc", rc));
    }
    Ok(api)
}

fn rc_error(call: &'static str, rc: i32) -> Error {
    if rc == libc::ENOTCONN || rc == libc::ECONNREFUSED || rc == libc::ENOENT {
        return Error::Rc {
            call,
            code: rc,
            text: format!("{} (is Pacemaker running?)", xml::rc_text(rc)),
        };
    }
    Error::Rc {
        call,
        code: rc,
        text: xml::rc_text(rc),
    }
}

/// Sends one request and waits (until its deadline) for the reply that answers it.
fn exchange(api: *mut sys::pcmk_ipc_api_t, inbox: &mut Inbox, request: &Request) -> Result<Answer> {
    let call = request.op.call();
    // SAFETY: api is live on this thread; every string argument is a valid C string or NULL.
    let rc = unsafe {
        match &request.op {
            Op::Ping => sys::pcmk_controld_api_ping(api, ptr::null()),
            Op::Fail(r) => sys::pcmk_controld_api_fail(
                api,
                r.host.as_ptr(),
                ptr::null(),
                r.c_id.as_ptr(),
                ptr::null(),
                r.standard.as_ptr(),
                r.provider.as_ref().map_or(ptr::null(), |p| p.as_ptr()),
                r.agent.as_ptr(),
            ),
            Op::Refresh(r) => sys::pcmk_controld_api_refresh(
                api,
                r.host.as_ptr(),
                ptr::null(),
                r.c_id.as_ptr(),
                ptr::null(),
                r.standard.as_ptr(),
                r.provider.as_ref().map_or(ptr::null(), |p| p.as_ptr()),
                r.agent.as_ptr(),
                false,
            ),
        }
    };
    if rc != sys::pcmk_rc_ok {
        if rc == libc::ENOTCONN {
            inbox.disconnected = true;
            return Err(Error::Disconnected { call, daemon: DAEMON });
        }
        return Err(rc_error(call, rc));
    }
    loop {
        let left = request.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout {
                call,
                limit: request.limit,
            });
        }
        let wait_ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
        // SAFETY: api is live on this thread and was connected in poll mode.
        let rc = unsafe { sys::pcmk_poll_ipc(api, wait_ms) };
        if rc == libc::EAGAIN {
            continue;
        }
        if rc != sys::pcmk_rc_ok {
            return Err(rc_error("pcmk_poll_ipc", rc));
        }
        // SAFETY: api is live on this thread; on_event runs inside and only touches inbox.
        let connected = unsafe {
            sys::pcmk_dispatch_ipc(api);
            sys::pcmk_ipc_is_connected(api)
        };
        if !connected {
            inbox.disconnected = true;
        }
        for reply in std::mem::take(&mut inbox.replies) {
            if let Some(answer) = answers(&request.op, reply) {
                return answer;
            }
        }
        if inbox.disconnected {
            return Err(Error::Disconnected { call, daemon: DAEMON });
        }
    }
}

/// Whether `reply` answers `op`, and how. Replies of the wrong kind (late answers to requests whose caller
/// gave up) are skipped; a resource acknowledgement must name the resource.
fn answers(op: &Op, reply: Reply) -> Option<Result<Answer>> {
    let call = op.call();
    let refused = |status: i32| Error::Refused {
        call,
        code: status,
        text: xml::exit_text(status),
    };
    match (op, reply) {
        (
            Op::Ping,
            Reply::Ping {
                status,
                host_from,
                fsa_state,
                result,
            },
        ) => Some(if status != 0 {
            Err(refused(status))
        } else {
            host_from
                .map(|dc| {
                    Answer::Ping(ControllerState {
                        dc,
                        fsa_state: fsa_state.unwrap_or_default(),
                        result: result.unwrap_or_default(),
                    })
                })
                .ok_or_else(|| Error::Invalid {
                    call,
                    reason: "the ping reply names no host".into(),
                })
        }),
        (Op::Fail(r) | Op::Refresh(r), Reply::Resource { status, node_state }) => {
            let ack = parse_acknowledgement(&node_state);
            if ack.as_ref().is_some_and(|a| a.resource != r.id) {
                return None;
            }
            Some(match (status, ack) {
                (0, Some(a)) if a.rc != 0 || a.op_status != 0 => Err(Error::Refused {
                    call,
                    code: a.rc,
                    text: a.reason.unwrap_or_else(|| format!("operation status {}", a.op_status)),
                }),
                (0, _) => Ok(Answer::Done),
                (status, _) => Err(refused(status)),
            })
        }
        (_, Reply::Other { status }) if status != 0 => Some(Err(refused(status))),
        _ => None,
    }
}

/// The controller's acknowledgement of a resource request: the `<node_state>` update it would record,
/// with `<lrm_resource id=..><lrm_rsc_op rc-code=.. op-status=.. exit-reason=..>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Acknowledgement {
    resource: String,
    rc: i32,
    op_status: i32,
    reason: Option<String>,
}

fn parse_acknowledgement(node_state: &str) -> Option<Acknowledgement> {
    let doc = roxmltree::Document::parse(node_state).ok()?;
    let rsc = doc.descendants().find(|n| n.has_tag_name("lrm_resource"))?;
    let op = rsc.descendants().find(|n| n.has_tag_name("lrm_rsc_op"));
    let int = |name: &str| {
        op.and_then(|o| o.attribute(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(Acknowledgement {
        resource: rsc.attribute("id")?.to_string(),
        rc: int("rc-code"),
        op_status: int("op-status"),
        reason: op
            .and_then(|o| o.attribute("exit-reason"))
            .filter(|r| !r.is_empty())
            .map(str::to_string),
    })
}

/// The IPC API's event callback: copies replies into the [`Inbox`] behind `user_data`.
unsafe extern "C" fn on_event(
    api: *mut sys::pcmk_ipc_api_t,
    event_type: sys::pcmk_ipc_event,
    status: sys::crm_exit_t,
    event_data: *mut c_void,
    user_data: *mut c_void,
) {
    crate::callback::guarded("controller IPC event", (), || {
        // SAFETY: as this function's: the IPC API's arguments, valid for the duration of the callback.
        unsafe { event_received(api, event_type, status, event_data, user_data) }
    });
}

/// The body of [`on_event`].
///
/// # Safety
/// The arguments are those the IPC API passed to the callback: `user_data` the [`Inbox`] registered in
/// open(), `event_data` valid for the duration of the call.
unsafe fn event_received(
    _api: *mut sys::pcmk_ipc_api_t,
    event_type: sys::pcmk_ipc_event,
    status: sys::crm_exit_t,
    event_data: *mut c_void,
    user_data: *mut c_void,
) {
    // SAFETY: user_data is the Inbox registered in open(), alive and only used by this thread.
    let inbox = unsafe { &mut *user_data.cast::<Inbox>() };
    let status = status as i32;
    if event_type == sys::pcmk_ipc_event_disconnect {
        inbox.disconnected = true;
        return;
    }
    if event_type != sys::pcmk_ipc_event_reply || event_data.is_null() {
        return;
    }
    // SAFETY: for reply events of the controller API, event_data is a pcmk_controld_api_reply_t valid for the
    // duration of the callback; the union member read is the one reply_type selects.
    let reply = unsafe {
        let r = &*event_data.cast::<sys::pcmk_controld_api_reply_t>();
        match r.reply_type {
            sys::pcmk_controld_reply_ping => Reply::Ping {
                status,
                host_from: xml::copy_str(r.host_from),
                fsa_state: xml::copy_str(r.data.ping.fsa_state),
                result: xml::copy_str(r.data.ping.result),
            },
            sys::pcmk_controld_reply_resource => Reply::Resource {
                status,
                node_state: xml::dump(r.data.resource.node_state),
            },
            _ => Reply::Other { status },
        }
    };
    inbox.replies.push(reply);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str) -> Op {
        let r = Resource {
            id: id.into(),
            standard: "ocf".into(),
            provider: Some("pacemaker".into()),
            agent: "Dummy".into(),
        };
        Op::Fail(ResourceRequest::new("t", "node1", &r).unwrap())
    }

    const ACK_OK: &str = r#"<node_state id="1" uname="node1"><lrm id="1"><lrm_resources><lrm_resource id="d1" class="ocf"><lrm_rsc_op id="d1_last_failure_0" operation="asyncmon" rc-code="0" op-status="0" exit-reason="Simulated failure"/></lrm_resource></lrm_resources></lrm></node_state>"#;
    const ACK_UNKNOWN: &str = r#"<node_state id="1" uname="node1"><lrm id="1"><lrm_resources><lrm_resource id="nope"><lrm_rsc_op operation="asyncmon" rc-code="1" op-status="4" exit-reason="Cannot fail unknown resource"/></lrm_resource></lrm_resources></lrm></node_state>"#;

    #[test]
    fn a_fail_acknowledgement_for_the_resource_answers_it() {
        let ack = Reply::Resource {
            status: 0,
            node_state: ACK_OK.into(),
        };
        assert!(matches!(answers(&request("d1"), ack.clone()), Some(Ok(Answer::Done))));
        assert!(
            answers(&request("d2"), ack).is_none(),
            "an acknowledgement for another resource is skipped"
        );
    }

    #[test]
    fn a_refused_fail_carries_the_controllers_reason() {
        let ack = Reply::Resource {
            status: 0,
            node_state: ACK_UNKNOWN.into(),
        };
        match answers(&request("nope"), ack) {
            Some(Err(Error::Refused { code: 1, text, .. })) => assert_eq!(text, "Cannot fail unknown resource"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_ping_reply_names_the_dc() {
        let ping = Reply::Ping {
            status: 0,
            host_from: Some("node2".into()),
            fsa_state: Some("S_IDLE".into()),
            result: Some("ok".into()),
        };
        match answers(&Op::Ping, ping.clone()) {
            Some(Ok(Answer::Ping(s))) => {
                assert_eq!(
                    s,
                    ControllerState {
                        dc: "node2".into(),
                        fsa_state: "S_IDLE".into(),
                        result: "ok".into()
                    }
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(
            answers(&request("d1"), ping).is_none(),
            "a late ping reply does not answer a fail request"
        );
        let bad = Reply::Ping {
            status: 76,
            host_from: None,
            fsa_state: None,
            result: None,
        };
        assert!(matches!(
            answers(&Op::Ping, bad),
            Some(Err(Error::Refused { code: 76, .. }))
        ));
    }
}
