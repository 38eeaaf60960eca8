//! Waiting for a condition with a deadline (polling), instead of sleeping and hoping.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Polls `check` every `every` until it returns `Some`, or fails after `limit` naming `what`.
pub fn wait_for<T>(what: &str, limit: Duration, every: Duration, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if start.elapsed() >= limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_the_condition_holds() {
        let mut calls = 0;
        let v = wait_for("third call", Duration::from_secs(5), Duration::from_millis(1), || {
            calls += 1;
            (calls == 3).then_some(calls)
        })
        .unwrap();
        assert_eq!(v, 3);
    }

    #[test]
    fn fails_with_the_condition_name_after_the_deadline() {
        let err = wait_for::<()>("never", Duration::from_millis(30), Duration::from_millis(5), || None).unwrap_err();
        assert!(err.to_string().contains("waiting for never"));
    }
}
