//! Cmap, Corosync's configuration and runtime key/value map: `totem.cluster_name`, `totem.token`,
//! `runtime.config.totem.token`, `nodelist.node.N.name`, `runtime.members.N.status`, ... — read, and
//! tracked for changes.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::Arc;
use std::time::Duration;

use corosync_sys as sys;

use crate::conn::{Conn, EventSource, Sink};
use crate::error::{check, CsError, Error};
use crate::NodeId;

/// One cmap value, typed as Corosync stores it.
#[derive(Debug, Clone, PartialEq)]
pub enum CmapValue {
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
    Float(f32),
    Double(f64),
    String(String),
    Binary(Vec<u8>),
}

impl CmapValue {
    /// The cmap type name (`u32`, `string`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            CmapValue::I8(_) => "i8",
            CmapValue::U8(_) => "u8",
            CmapValue::I16(_) => "i16",
            CmapValue::U16(_) => "u16",
            CmapValue::I32(_) => "i32",
            CmapValue::U32(_) => "u32",
            CmapValue::I64(_) => "i64",
            CmapValue::U64(_) => "u64",
            CmapValue::Float(_) => "float",
            CmapValue::Double(_) => "double",
            CmapValue::String(_) => "string",
            CmapValue::Binary(_) => "binary",
        }
    }

    /// The value as an integer, when it is one (of any width and sign).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            CmapValue::I8(v) => v.into(),
            CmapValue::U8(v) => v.into(),
            CmapValue::I16(v) => v.into(),
            CmapValue::U16(v) => v.into(),
            CmapValue::I32(v) => v.into(),
            CmapValue::U32(v) => v.into(),
            CmapValue::I64(v) => v.into(),
            CmapValue::U64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as text, when it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            CmapValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Decodes the bytes cmap returned for a key of type `kind` (a `cmap_value_types_t`).
    fn decode(kind: sys::cmap_value_types_t, bytes: &[u8]) -> Option<CmapValue> {
        fn arr<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
            b.get(..N)?.try_into().ok()
        }
        Some(match kind {
            sys::CMAP_VALUETYPE_INT8 => CmapValue::I8(i8::from_ne_bytes(arr(bytes)?)),
            sys::CMAP_VALUETYPE_UINT8 => CmapValue::U8(u8::from_ne_bytes(arr(bytes)?)),
            sys::CMAP_VALUETYPE_INT16 => CmapValue::I16(i16::from_ne_bytes(arr(bytes)?)),
            sys::CMAP_VALUETYPE_UINT16 => CmapValue::U16(u16::from_ne_bytes(arr(bytes)?)),
            sys::CMAP_VALUETYPE_INT32 => CmapValue::I32(i32::from_ne_bytes(arr(bytes)?)),
            sys::CMAP_VALUETYPE_UINT32 => CmapValue::U32(u32::from_ne_bytes(arr(bytes)?)),
            sys::CMAP_VALUETYPE_INT64 => CmapValue::I64(i64::from_ne_bytes(arr(bytes)?)),
            sys::CMAP_VALUETYPE_UINT64 => CmapValue::U64(u64::from_ne_bytes(arr(bytes)?)),
            sys::CMAP_VALUETYPE_FLOAT => CmapValue::Float(f32::from_ne_bytes(arr(bytes)?)),
            sys::CMAP_VALUETYPE_DOUBLE => CmapValue::Double(f64::from_ne_bytes(arr(bytes)?)),
            sys::CMAP_VALUETYPE_STRING => {
                // Stored with its terminating NUL.
                let text = bytes.split(|&b| b == 0).next().unwrap_or_default();
                CmapValue::String(String::from_utf8_lossy(text).into_owned())
            }
            sys::CMAP_VALUETYPE_BINARY => CmapValue::Binary(bytes.to_vec()),
            _ => return None,
        })
    }
}

/// A node of Corosync's runtime membership list (`runtime.members.<nodeid>.*`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuntimeMember {
    /// `joined` or `left`.
    pub status: String,
    /// The node's addresses as Corosync reports them (`r(0) ip(10.0.0.1) ...`).
    pub ip: String,
    pub join_count: u32,
}

/// How a tracked key changed (`CMAP_TRACK_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmapChange {
    Added,
    Deleted,
    Modified,
    Other(i32),
}

impl CmapChange {
    fn from_raw(event: i32) -> CmapChange {
        match u32::try_from(event) {
            Ok(sys::CMAP_TRACK_ADD) => CmapChange::Added,
            Ok(sys::CMAP_TRACK_DELETE) => CmapChange::Deleted,
            Ok(sys::CMAP_TRACK_MODIFY) => CmapChange::Modified,
            _ => CmapChange::Other(event),
        }
    }

    /// A short lower-case name (`added`, `deleted`, `modified`, `other`).
    pub fn as_str(&self) -> &'static str {
        match self {
            CmapChange::Added => "added",
            CmapChange::Deleted => "deleted",
            CmapChange::Modified => "modified",
            CmapChange::Other(_) => "other",
        }
    }
}

/// A change of a tracked key: the key, how it changed, its new and its old value (when there is one).
#[derive(Debug, Clone, PartialEq)]
pub struct CmapEvent {
    pub key: String,
    pub change: CmapChange,
    pub value: Option<CmapValue>,
    pub old: Option<CmapValue>,
}

/// The events half of a tracking cmap connection ([`Cmap::track`]).
#[derive(Debug)]
pub struct CmapEvents {
    source: EventSource<CmapEvent>,
}

impl CmapEvents {
    /// The next change of a tracked key. An `Err` ends the stream (see the crate's reconnect contract).
    /// Cancellation-safe.
    pub async fn next(&mut self) -> Result<CmapEvent, Error> {
        self.source.next().await
    }
}

/// A cmap connection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cmap {
    conn: Arc<Conn>,
    limit: Duration,
}

impl Cmap {
    /// Connects to the local Corosync's cmap service (`cmap_initialize`, the default map). Every call on
    /// the connection gets `limit`.
    pub async fn connect(limit: Duration) -> Result<Cmap, Error> {
        let conn = Conn::open("cmap", "cmap_initialize", limit, finalize, None, || {
            let mut handle: sys::cmap_handle_t = 0;
            // SAFETY: `handle` is a valid out pointer for the call.
            check("cmap_initialize", unsafe { sys::cmap_initialize(&mut handle) })?;
            Ok(handle)
        })
        .await?;
        Ok(Cmap { conn, limit })
    }

    /// Opens a cmap connection that also tracks every key under each of `prefixes` (additions, deletions
    /// and modifications; `cmap_track_add` with `CMAP_TRACK_PREFIX`), e.g. `runtime.members.` or
    /// `totem.`. Every call on the connection gets `limit`.
    pub async fn track(limit: Duration, prefixes: &[&str]) -> Result<(Cmap, CmapEvents), Error> {
        let keys = prefixes
            .iter()
            .map(|p| key_name_or_empty("cmap_track_add", p))
            .collect::<Result<Vec<_>, _>>()?;
        let sink: Arc<Sink<CmapEvent>> = Sink::new();
        let conn = Conn::open("cmap", "cmap_initialize", limit, finalize, Some(sink.clone()), || {
            let mut handle: sys::cmap_handle_t = 0;
            // SAFETY: `handle` is a valid out pointer for the call.
            check("cmap_initialize", unsafe { sys::cmap_initialize(&mut handle) })?;
            Ok(handle)
        })
        .await?;
        let source = EventSource::new(
            Arc::clone(&conn),
            Arc::clone(&sink),
            ("cmap_fd_get", fd_get),
            ("cmap_dispatch", dispatch),
            limit,
        )
        .await?;
        for key in keys {
            let context = Arc::clone(&sink);
            conn.call("cmap_track_add", limit, move |raw| {
                let mut track: sys::cmap_track_handle_t = 0;
                let kinds =
                    sys::CMAP_TRACK_ADD | sys::CMAP_TRACK_DELETE | sys::CMAP_TRACK_MODIFY | sys::CMAP_TRACK_PREFIX;
                // SAFETY: `key` is NUL-terminated and `track` a valid out pointer. The user data is the
                // `Sink` that `Conn` keeps alive until after `cmap_finalize` (which also ends the track);
                // the callback only reads it as `&Sink<CmapEvent>`.
                check("cmap_track_add", unsafe {
                    sys::cmap_track_add(
                        raw,
                        key.as_ptr(),
                        kinds as i32,
                        Some(on_change),
                        Arc::as_ptr(&context).cast::<c_void>().cast_mut(),
                        &mut track,
                    )
                })
            })
            .await?;
        }
        Ok((Cmap { conn, limit }, CmapEvents { source }))
    }

    /// The value of `key` (`CS_ERR_NOT_EXIST` when there is none).
    pub async fn get(&self, key: &str) -> Result<CmapValue, Error> {
        let key = key_name("cmap_get", key)?;
        self.conn
            .call("cmap_get", self.limit, move |raw| get_value(raw, &key))
            .await
    }

    /// The value of `key`, or `None` when the key does not exist.
    pub async fn get_opt(&self, key: &str) -> Result<Option<CmapValue>, Error> {
        match self.get(key).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.code() == Some(CsError::NOT_EXIST) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A string key, e.g. `totem.cluster_name`.
    pub async fn get_string(&self, key: &str) -> Result<String, Error> {
        match self.get(key).await? {
            CmapValue::String(s) => Ok(s),
            other => Err(wrong_type(key, &other, "string")),
        }
    }

    /// An integer key that fits in a `u8` (whatever integer type cmap stores it as).
    pub async fn get_u8(&self, key: &str) -> Result<u8, Error> {
        self.get_int(key, "u8").await
    }

    /// An integer key that fits in a `u16`.
    pub async fn get_u16(&self, key: &str) -> Result<u16, Error> {
        self.get_int(key, "u16").await
    }

    /// An integer key that fits in a `u32`, e.g. `totem.token`, `nodelist.node.0.nodeid`.
    pub async fn get_u32(&self, key: &str) -> Result<u32, Error> {
        self.get_int(key, "u32").await
    }

    /// An integer key that fits in a `u64`.
    pub async fn get_u64(&self, key: &str) -> Result<u64, Error> {
        self.get_int(key, "u64").await
    }

    /// An integer key that fits in an `i32`.
    pub async fn get_i32(&self, key: &str) -> Result<i32, Error> {
        self.get_int(key, "i32").await
    }

    async fn get_int<T: TryFrom<i128>>(&self, key: &str, wanted: &'static str) -> Result<T, Error> {
        let value = self.get(key).await?;
        value
            .as_i128()
            .and_then(|v| T::try_from(v).ok())
            .ok_or_else(|| wrong_type(key, &value, wanted))
    }

    /// Every key under `prefix` with its value, read in one pass (`cmap_iter_*` + `cmap_get`).
    pub async fn values(&self, prefix: &str) -> Result<BTreeMap<String, CmapValue>, Error> {
        let prefix = key_name_or_empty("cmap_iter_init", prefix)?;
        self.conn
            .call("cmap_iter_init", self.limit, move |raw| iterate(raw, &prefix))
            .await
    }

    /// The cluster's name (`totem.cluster_name`).
    pub async fn cluster_name(&self) -> Result<String, Error> {
        self.get_string("totem.cluster_name").await
    }

    /// Node id -> name of every node in corosync.conf's nodelist (`nodelist.node.N.nodeid` and
    /// `.name`, falling back to `.ring0_addr` for nodes without a name).
    pub async fn node_names(&self) -> Result<BTreeMap<NodeId, String>, Error> {
        Ok(node_names(&self.values("nodelist.node.").await?))
    }

    /// Corosync's runtime membership list: every node it has seen, with its status.
    pub async fn runtime_members(&self) -> Result<BTreeMap<NodeId, RuntimeMember>, Error> {
        Ok(runtime_members(&self.values("runtime.members.").await?))
    }
}

fn wrong_type(key: &str, found: &CmapValue, wanted: &'static str) -> Error {
    Error::WrongType {
        call: "cmap_get",
        key: key.to_string(),
        found: found.type_name(),
        wanted,
    }
}

/// A key as cmap takes it: 3 to 255 bytes (`CMAP_KEYNAME_MINLEN`..`CMAP_KEYNAME_MAXLEN`), no NUL.
fn key_name(call: &'static str, key: &str) -> Result<CString, Error> {
    let max = sys::CMAP_KEYNAME_MAXLEN as usize;
    let min = sys::CMAP_KEYNAME_MINLEN as usize;
    if key.len() < min || key.len() > max {
        return Err(Error::InvalidArgument {
            call,
            reason: format!("cmap key {key:?} must be {min} to {max} bytes"),
        });
    }
    key_name_or_empty(call, key)
}

/// A key prefix (may be empty: every key).
fn key_name_or_empty(call: &'static str, key: &str) -> Result<CString, Error> {
    if key.len() > sys::CMAP_KEYNAME_MAXLEN as usize {
        return Err(Error::InvalidArgument {
            call,
            reason: format!("cmap key {key:?} is longer than {} bytes", sys::CMAP_KEYNAME_MAXLEN),
        });
    }
    CString::new(key).map_err(|_| Error::InvalidArgument {
        call,
        reason: format!("cmap key {key:?} contains a NUL byte"),
    })
}

/// `cmap_get` of one key: asks for its length and type, then reads it.
fn get_value(raw: u64, key: &CStr) -> Result<CmapValue, Error> {
    let mut len: usize = 0;
    let mut kind: sys::cmap_value_types_t = 0;
    // SAFETY: `key` is NUL-terminated; a NULL value asks only for length and type, written to valid
    // out pointers.
    check("cmap_get", unsafe {
        sys::cmap_get(raw, key.as_ptr(), std::ptr::null_mut(), &mut len, &mut kind)
    })?;
    read_value(raw, key, len, kind)
}

/// `cmap_get` of a key whose length and type are known.
fn read_value(raw: u64, key: &CStr, len: usize, kind: sys::cmap_value_types_t) -> Result<CmapValue, Error> {
    let mut buf = vec![0u8; len.max(1)];
    let mut got = buf.len();
    let mut kind_now = kind;
    // SAFETY: `buf` has `got` writable bytes and the library writes at most `got` (it refuses with
    // CS_ERR_INVALID_PARAM when the value grew); the other pointers are valid for the call.
    check("cmap_get", unsafe {
        sys::cmap_get(
            raw,
            key.as_ptr(),
            buf.as_mut_ptr().cast::<c_void>(),
            &mut got,
            &mut kind_now,
        )
    })?;
    buf.truncate(got.min(buf.len()));
    CmapValue::decode(kind_now, &buf).ok_or(Error::Corosync {
        call: "cmap_get",
        code: CsError(sys::CS_ERR_MESSAGE_ERROR),
    })
}

/// Every key under `prefix` with its value, in one iteration.
fn iterate(raw: u64, prefix: &CStr) -> Result<BTreeMap<String, CmapValue>, Error> {
    let mut iter: sys::cmap_iter_handle_t = 0;
    // SAFETY: `prefix` is NUL-terminated; `iter` is a valid out pointer.
    check("cmap_iter_init", unsafe {
        sys::cmap_iter_init(raw, prefix.as_ptr(), &mut iter)
    })?;
    let mut values = BTreeMap::new();
    let result = loop {
        let mut name = [0 as c_char; sys::CMAP_KEYNAME_MAXLEN as usize + 1];
        let mut len: usize = 0;
        let mut kind: sys::cmap_value_types_t = 0;
        // SAFETY: `name` has room for the longest key plus its NUL, which is all the library writes;
        // `len` and `kind` are valid out pointers.
        let rc = unsafe { sys::cmap_iter_next(raw, iter, name.as_mut_ptr(), &mut len, &mut kind) };
        if rc == sys::CS_ERR_NO_SECTIONS {
            break Ok(values);
        }
        if let Err(e) = check("cmap_iter_next", rc) {
            break Err(e);
        }
        // SAFETY: the library NUL-terminated the key inside `name`.
        let key = unsafe { CStr::from_ptr(name.as_ptr()) };
        match read_value(raw, key, len, kind) {
            Ok(v) => {
                values.insert(key.to_string_lossy().into_owned(), v);
            }
            // Deleted between listing and reading.
            Err(e) if e.code() == Some(CsError::NOT_EXIST) => {}
            Err(e) => break Err(e),
        }
    };
    // SAFETY: `iter` came from cmap_iter_init on this handle and is finalized once.
    let _ = unsafe { sys::cmap_iter_finalize(raw, iter) };
    result
}

/// Node id -> name from the `nodelist.node.` keys.
fn node_names(values: &BTreeMap<String, CmapValue>) -> BTreeMap<NodeId, String> {
    /// What one `nodelist.node.<index>` entry holds: node id, name, first ring address.
    #[derive(Default)]
    struct Entry(Option<NodeId>, Option<String>, Option<String>);
    let mut by_index: BTreeMap<&str, Entry> = BTreeMap::new();
    for (key, value) in values {
        let Some(rest) = key.strip_prefix("nodelist.node.") else {
            continue;
        };
        let Some((index, field)) = rest.split_once('.') else {
            continue;
        };
        let entry = by_index.entry(index).or_default();
        match field {
            "nodeid" => entry.0 = value.as_i128().and_then(|v| NodeId::try_from(v).ok()),
            "name" => entry.1 = value.as_str().map(str::to_string),
            "ring0_addr" => entry.2 = value.as_str().map(str::to_string),
            _ => {}
        }
    }
    by_index
        .into_values()
        .filter_map(|Entry(id, name, addr)| Some((id?, name.or(addr)?)))
        .collect()
}

/// Node id -> status from the `runtime.members.` keys.
fn runtime_members(values: &BTreeMap<String, CmapValue>) -> BTreeMap<NodeId, RuntimeMember> {
    let mut members: BTreeMap<NodeId, RuntimeMember> = BTreeMap::new();
    for (key, value) in values {
        let Some(rest) = key.strip_prefix("runtime.members.") else {
            continue;
        };
        let Some((id, field)) = rest.split_once('.') else {
            continue;
        };
        let Ok(id) = id.parse::<NodeId>() else {
            continue;
        };
        let member = members.entry(id).or_default();
        match field {
            "status" => member.status = value.as_str().unwrap_or_default().to_string(),
            "ip" => member.ip = value.as_str().unwrap_or_default().to_string(),
            "join_count" => member.join_count = value.as_i128().and_then(|v| u32::try_from(v).ok()).unwrap_or(0),
            _ => {}
        }
    }
    members
}

fn finalize(raw: u64) -> sys::cs_error_t {
    // SAFETY: called exactly once per handle, when nothing else can use it any more.
    unsafe { sys::cmap_finalize(raw) }
}

fn dispatch(raw: u64) -> sys::cs_error_t {
    // SAFETY: `EventSource` calls this while it holds the connection, so the `Sink` the tracks point at
    // is alive; CS_DISPATCH_ALL returns once nothing is pending.
    unsafe { sys::cmap_dispatch(raw, sys::CS_DISPATCH_ALL) }
}

fn fd_get(raw: u64, fd: &mut i32) -> sys::cs_error_t {
    // SAFETY: `fd` is a valid out pointer for the call.
    unsafe { sys::cmap_fd_get(raw, fd) }
}

/// A value passed to a track callback (`None` when there is none, e.g. the new value of a deleted key).
///
/// # Safety
/// `value.data` must point at `value.len` readable bytes (or be NULL) for the duration of the call.
unsafe fn notify_value(value: &sys::cmap_notify_value) -> Option<CmapValue> {
    if value.data.is_null() || value.len == 0 {
        return None;
    }
    // SAFETY: per this function's contract.
    let bytes = unsafe { crate::raw_slice(value.data.cast::<u8>(), value.len) };
    CmapValue::decode(value.type_, bytes)
}

/// `cmap_notify_fn_t`.
unsafe extern "C" fn on_change(
    _handle: sys::cmap_handle_t,
    _track: sys::cmap_track_handle_t,
    event: i32,
    key_name: *const c_char,
    new_value: sys::cmap_notify_value,
    old_value: sys::cmap_notify_value,
    user_data: *mut c_void,
) {
    if user_data.is_null() || key_name.is_null() {
        return;
    }
    // SAFETY: the user data registered by `Cmap::track` is a Sink<CmapEvent> that lives until after
    // cmap_finalize, and this callback only runs inside cmap_dispatch.
    let sink = unsafe { &*user_data.cast::<Sink<CmapEvent>>() };
    sink.deliver("cmap_notify", || {
        // SAFETY: the library passes a NUL-terminated key and values whose `data` holds `len` bytes, all
        // alive until the callback returns; they are copied here.
        unsafe {
            CmapEvent {
                key: CStr::from_ptr(key_name).to_string_lossy().into_owned(),
                change: CmapChange::from_raw(event),
                value: notify_value(&new_value),
                old: notify_value(&old_value),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, CmapValue)]) -> BTreeMap<String, CmapValue> {
        entries.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn values_decode_from_their_bytes() {
        let cases = [
            (
                sys::CMAP_VALUETYPE_UINT32,
                1000u32.to_ne_bytes().to_vec(),
                CmapValue::U32(1000),
            ),
            (sys::CMAP_VALUETYPE_UINT8, vec![1], CmapValue::U8(1)),
            (
                sys::CMAP_VALUETYPE_INT64,
                (-5i64).to_ne_bytes().to_vec(),
                CmapValue::I64(-5),
            ),
            (
                sys::CMAP_VALUETYPE_STRING,
                b"lab\0".to_vec(),
                CmapValue::String("lab".into()),
            ),
            (
                sys::CMAP_VALUETYPE_STRING,
                b"no-nul".to_vec(),
                CmapValue::String("no-nul".into()),
            ),
            (
                sys::CMAP_VALUETYPE_BINARY,
                vec![0, 1, 2],
                CmapValue::Binary(vec![0, 1, 2]),
            ),
            (
                sys::CMAP_VALUETYPE_DOUBLE,
                0.5f64.to_ne_bytes().to_vec(),
                CmapValue::Double(0.5),
            ),
        ];
        for (kind, bytes, want) in cases {
            assert_eq!(CmapValue::decode(kind, &bytes), Some(want));
        }
        assert_eq!(
            CmapValue::decode(sys::CMAP_VALUETYPE_UINT32, &[1, 2]),
            None,
            "short value"
        );
        assert_eq!(CmapValue::decode(99, &[1]), None, "unknown type");
    }

    #[test]
    fn integers_convert_when_they_fit() {
        assert_eq!(CmapValue::U8(7).as_i128(), Some(7));
        assert_eq!(u8::try_from(CmapValue::U32(300).as_i128().unwrap()).ok(), None);
        assert_eq!(CmapValue::String("7".into()).as_i128(), None);
        let e = wrong_type("totem.cluster_name", &CmapValue::String("x".into()), "u32");
        assert_eq!(e.to_string(), "cmap_get: key totem.cluster_name holds string, not u32");
    }

    #[test]
    fn track_events_name_their_change() {
        assert_eq!(CmapChange::from_raw(sys::CMAP_TRACK_ADD as i32), CmapChange::Added);
        assert_eq!(CmapChange::from_raw(sys::CMAP_TRACK_DELETE as i32), CmapChange::Deleted);
        assert_eq!(CmapChange::from_raw(sys::CMAP_TRACK_MODIFY as i32).as_str(), "modified");
        assert_eq!(CmapChange::from_raw(-1), CmapChange::Other(-1));
        let bytes = 7u32.to_ne_bytes();
        let value = sys::cmap_notify_value {
            type_: sys::CMAP_VALUETYPE_UINT32,
            len: bytes.len(),
            data: bytes.as_ptr().cast(),
        };
        // SAFETY: `data` points at `len` bytes alive for the call.
        assert_eq!(unsafe { notify_value(&value) }, Some(CmapValue::U32(7)));
        let none = sys::cmap_notify_value {
            type_: 0,
            len: 0,
            data: std::ptr::null(),
        };
        // SAFETY: NULL data is allowed.
        assert_eq!(unsafe { notify_value(&none) }, None);
    }

    #[test]
    fn keys_are_checked_before_corosync_sees_them() {
        assert!(key_name("cmap_get", "totem.token").is_ok());
        assert!(key_name("cmap_get", "ab").is_err());
        assert!(key_name("cmap_get", &"k".repeat(256)).is_err());
        assert!(key_name("cmap_get", "a\0bc").is_err());
        assert!(key_name_or_empty("cmap_iter_init", "").is_ok());
    }

    #[test]
    fn node_names_pair_ids_with_names() {
        let values = map(&[
            ("nodelist.node.0.name", CmapValue::String("node1".into())),
            ("nodelist.node.0.nodeid", CmapValue::U32(1)),
            ("nodelist.node.0.ring0_addr", CmapValue::String("10.0.0.11".into())),
            ("nodelist.node.1.nodeid", CmapValue::U32(2)),
            ("nodelist.node.1.ring0_addr", CmapValue::String("10.0.0.12".into())),
            ("nodelist.node.2.name", CmapValue::String("no-id".into())),
            ("nodelist.node.10.name", CmapValue::String("node11".into())),
            ("nodelist.node.10.nodeid", CmapValue::U32(11)),
            ("nodelist.local_node_pos", CmapValue::U32(0)),
        ]);
        let names = node_names(&values);
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            vec![
                (1, "node1".to_string()),
                (2, "10.0.0.12".to_string()),
                (11, "node11".to_string())
            ]
        );
    }

    #[test]
    fn runtime_members_are_grouped_by_node() {
        let values = map(&[
            ("runtime.members.1.status", CmapValue::String("joined".into())),
            ("runtime.members.1.ip", CmapValue::String("r(0) ip(10.0.0.11) ".into())),
            ("runtime.members.1.join_count", CmapValue::U32(1)),
            ("runtime.members.3.status", CmapValue::String("left".into())),
            ("runtime.members.3.config_version", CmapValue::U64(0)),
            ("runtime.members.x.status", CmapValue::String("bogus".into())),
        ]);
        let m = runtime_members(&values);
        assert_eq!(m.len(), 2);
        assert_eq!(m[&1].status, "joined");
        assert_eq!(m[&1].join_count, 1);
        assert!(m[&1].ip.contains("10.0.0.11"));
        assert_eq!(m[&3].status, "left");
    }
}
