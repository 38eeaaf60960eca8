//! Rust functions that Pacemaker's libraries call back (libcib's notification and connection-lost
//! callbacks, the controller IPC's event callback) must never let a panic unwind into C: Rust would
//! abort the whole process at the boundary without a word of why. Each runs its body through [`guarded`],
//! which catches a panic, logs it naming the callback, and returns a fallback: the one event is lost, the
//! process (vmhad) goes on.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs the body of C callback `callback`; on a panic logs it and returns `fallback`.
pub(crate) fn guarded<T>(callback: &'static str, fallback: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(payload) => {
            tracing::error!(
                callback,
                "panic in a Pacemaker callback, caught: {}",
                message(&*payload)
            );
            fallback
        }
    }
}

/// The text a panic was raised with.
fn message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_the_fallback() {
        assert_eq!(guarded("test", 7, || 1), 1);
        assert_eq!(guarded("test", 7, || -> i32 { panic!("bad notification") }), 7);
        let n = 3;
        assert_eq!(guarded("test", 0, || -> i32 { panic!("{n} slots") }), 0);
        assert_eq!(message(&"x"), "x");
        assert_eq!(message(&String::from("y")), "y");
        assert_eq!(message(&5u8), "(no message)");
    }
}
