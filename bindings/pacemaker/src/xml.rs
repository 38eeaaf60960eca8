//! Pacemaker's XML on the C side: per-thread set-up, parsing text into trees the C calls take, and dumping
//! the trees they return as text.

use std::ffi::{CStr, CString};
use std::ptr::NonNull;
use std::sync::OnceLock;

use pacemaker_sys as sys;

use crate::error::{Error, Result};

/// libxml2 node hooks `crm_xml_init()` installs (they give every node Pacemaker's private data).
#[derive(Clone, Copy)]
struct NodeHooks {
    register: sys::xmlRegisterNodeFunc,
    deregister: sys::xmlDeregisterNodeFunc,
}

static HOOKS: OnceLock<NodeHooks> = OnceLock::new();

/// Prepares the calling thread for Pacemaker's XML code. Call it first on every thread that calls into
/// Pacemaker.
///
/// `crm_xml_init()` runs once per process and installs libxml2 node hooks that give every node Pacemaker's
/// private data (change tracking, ACLs and `free_xml` rely on it). A thread-enabled libxml2 (2.9) keeps
/// those hooks and the buffer scheme per thread for every thread but the first one that used libxml2:
/// `xmlRegisterNodeDefault()` sets only that thread's copy, other threads start from the `xmlThrDef*`
/// values. So the hooks `crm_xml_init()` installed are captured once, made the default of threads yet to
/// use libxml2, and set on the calling thread.
pub(crate) fn init_thread() {
    let hooks = *HOOKS.get_or_init(|| {
        // SAFETY: crm_xml_init() is idempotent; the swaps read the hooks it installed (libxml2's process-wide
        // values, which xmlRegisterNodeDefault() always addresses) and put them straight back; the xmlThrDef*
        // calls set, under libxml2's lock, the values threads get when they first use libxml2.
        unsafe {
            sys::crm_xml_init();
            let register = sys::xmlRegisterNodeDefault(None);
            sys::xmlRegisterNodeDefault(register);
            let deregister = sys::xmlDeregisterNodeDefault(None);
            sys::xmlDeregisterNodeDefault(deregister);
            sys::xmlThrDefRegisterNodeDefault(register);
            sys::xmlThrDefDeregisterNodeDefault(deregister);
            sys::xmlThrDefBufferAllocScheme(sys::XML_BUFFER_ALLOC_DOUBLEIT);
            NodeHooks { register, deregister }
        }
    });
    // SAFETY: the __xml* accessors return pointers to the calling thread's own settings (libxml2's process-wide
    // ones on its main thread), valid for the thread's life; only this thread writes them.
    unsafe {
        *sys::__xmlRegisterNodeDefaultValue() = hooks.register;
        *sys::__xmlDeregisterNodeDefaultValue() = hooks.deregister;
        *sys::__xmlBufferAllocScheme() = sys::XML_BUFFER_ALLOC_DOUBLEIT;
    }
}

/// An XML tree owned by this side, parsed by Pacemaker (`string2xml`) and freed with `free_xml`.
#[derive(Debug)]
pub(crate) struct Tree(NonNull<sys::xmlNode>);

impl Tree {
    /// Parses `text` (one element) on the calling thread. The text is checked first: Pacemaker's parser
    /// recovers from errors and would turn malformed input into a partial tree.
    pub(crate) fn parse(call: &'static str, text: &str) -> Result<Tree> {
        roxmltree::Document::parse(text).map_err(|e| Error::Invalid {
            call,
            reason: format!("malformed XML: {e}"),
        })?;
        let c = cstring(call, text)?;
        // SAFETY: c is a valid NUL-terminated string; string2xml returns a new tree we own, or NULL.
        let node = unsafe { sys::string2xml(c.as_ptr()) };
        NonNull::new(node).map(Tree).ok_or_else(|| Error::Invalid {
            call,
            reason: "Pacemaker cannot parse the XML".to_string(),
        })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::xmlNode {
        self.0.as_ptr()
    }

    /// Takes ownership of a tree a Pacemaker call returned (NULL gives `None`).
    ///
    /// # Safety
    /// `node` must be NULL or the root of a tree the caller owns and nothing else frees.
    pub(crate) unsafe fn from_owned(node: *mut sys::xmlNode) -> Option<Tree> {
        NonNull::new(node).map(Tree)
    }

    pub(crate) fn to_text(&self) -> String {
        // SAFETY: the tree is valid while self lives.
        unsafe { dump(self.as_ptr()) }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        // SAFETY: we own the tree (see the constructors) and free it once.
        unsafe { sys::free_xml(self.0.as_ptr()) }
    }
}

/// Dumps a tree (or subtree) as unformatted XML text; NULL gives "".
///
/// # Safety
/// `node` must be NULL or a valid node for the duration of the call.
pub(crate) unsafe fn dump(node: *mut sys::xmlNode) -> String {
    if node.is_null() {
        return String::new();
    }
    // SAFETY: node is valid (caller); dump_xml_unformatted returns a malloc'd string or NULL.
    let text = unsafe { sys::dump_xml_unformatted(node) };
    if text.is_null() {
        return String::new();
    }
    // SAFETY: text is a NUL-terminated string we own; it is copied and freed once.
    unsafe {
        let s = CStr::from_ptr(text).to_string_lossy().into_owned();
        libc::free(text.cast());
        s
    }
}

/// Copies a C string that Pacemaker owns (NULL gives `None`).
///
/// # Safety
/// `s` must be NULL or a valid NUL-terminated string for the duration of the call.
pub(crate) unsafe fn copy_str(s: *const std::ffi::c_char) -> Option<String> {
    // SAFETY: see the function's contract.
    (!s.is_null()).then(|| unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned())
}

pub(crate) fn cstring(call: &'static str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Invalid {
        call,
        reason: format!("{s:?} contains a NUL byte"),
    })
}

/// `pcmk_strerror` of a legacy code.
pub(crate) fn legacy_text(code: i32) -> String {
    // SAFETY: pcmk_strerror returns a static string for any code.
    unsafe { copy_str(sys::pcmk_strerror(code)) }.unwrap_or_default()
}

/// `pcmk_rc_str` of a standard return code.
pub(crate) fn rc_text(code: i32) -> String {
    // SAFETY: pcmk_rc_str returns a static string for any code.
    unsafe { copy_str(sys::pcmk_rc_str(code)) }.unwrap_or_default()
}

/// `crm_exit_str` of an exit status.
pub(crate) fn exit_text(code: i32) -> String {
    // SAFETY: crm_exit_str returns a static string for any status.
    unsafe { copy_str(sys::crm_exit_str(code as sys::crm_exit_t)) }.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a node parsed on the calling thread carries Pacemaker's private data.
    fn parsed_node_has_private_data() -> bool {
        let tree = Tree::parse("test", "<a x=\"1\"/>").unwrap();
        // SAFETY: the tree is valid while `tree` lives.
        !unsafe { (*tree.as_ptr())._private }.is_null()
    }

    #[test]
    fn every_thread_gets_pacemakers_node_hooks() {
        let on_prepared_threads = (0..3)
            .map(|_| {
                std::thread::spawn(|| {
                    init_thread();
                    parsed_node_has_private_data()
                })
            })
            .collect::<Vec<_>>();
        for t in on_prepared_threads {
            assert!(t.join().unwrap(), "a thread prepared with init_thread");
        }
        let later = std::thread::spawn(parsed_node_has_private_data).join().unwrap();
        assert!(
            later,
            "a thread that first uses libxml2 after init_thread gets the hooks by default"
        );
    }

    #[test]
    fn round_trips_xml_and_rejects_bad_input() {
        let t = std::thread::spawn(|| {
            init_thread();
            let tree = Tree::parse("test", "<nvpair id=\"a\" name=\"n\" value=\"v\"/>").unwrap();
            (
                tree.to_text(),
                Tree::parse("test", "<unclosed").is_err(),
                cstring("t", "a\0b").is_err(),
            )
        })
        .join()
        .unwrap();
        assert_eq!(t.0.trim(), "<nvpair id=\"a\" name=\"n\" value=\"v\"/>");
        assert!(t.1 && t.2);
    }

    #[test]
    fn texts_of_codes() {
        assert_eq!(legacy_text(-107), "Transport endpoint is not connected");
        assert_eq!(rc_text(0), "OK");
        assert_eq!(exit_text(0), "OK");
    }
}
