//! Connecting where no Corosync answers (the root namespace of a build machine: Corosync's IPC sockets
//! are per network namespace, and the lab runs it only inside its hosts) fails at once with a
//! connection error, for every service, instead of hanging. Where a Corosync does run, the same calls
//! must simply work.

use std::time::{Duration, Instant};

use vmha_corosync::{Cfg, Cmap, Cpg, Error, Quorum, Votequorum};

const LIMIT: Duration = Duration::from_secs(5);

fn check<T>(service: &str, result: Result<T, Error>, started: Instant) {
    let took = started.elapsed();
    assert!(took < LIMIT, "{service}: connect took {took:?}");
    if let Err(e) = result {
        assert!(e.is_disconnected(), "{service}: {e} is a connection error");
        assert!(e.hint().is_some(), "{service}: {e} has a hint");
    }
}

#[tokio::test]
async fn connecting_without_a_corosync_fails_fast_with_a_connection_error() {
    let t = Instant::now();
    check("cpg", Cpg::connect(LIMIT).await, t);
    let t = Instant::now();
    check("quorum", Quorum::connect(LIMIT).await, t);
    let t = Instant::now();
    check("votequorum", Votequorum::connect(LIMIT).await, t);
    let t = Instant::now();
    check("cmap", Cmap::connect(LIMIT).await, t);
    let t = Instant::now();
    check("cfg", Cfg::connect(LIMIT).await, t);
}
