//! `vmhad`: vmha's per-host D-Bus system service. Publishes the cluster (members, quorum, DC, hosts,
//! VMs) as objects under `/org/vmha/Vmha1` on the system bus, follows every change of the CIB, runs VM
//! and host operations as jobs, and owns utilization.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use vmha_agent::api::{BUS_NAME, ROOT_PATH};
use vmha_agent::daemon::{follow_cib, probe_capacity};
use vmha_agent::failures::report_vm_failures;
use vmha_agent::guest::follow_guests;
use vmha_agent::logging;
use vmha_agent::membership::follow_corosync;
use vmha_agent::objects::ClusterObject;
use vmha_agent::options::VmhadArgs;
use vmha_agent::pacemaker::PacemakerCib;
use vmha_agent::ports::Uris;
use vmha_agent::readiness::{follow_readiness, ReadinessObject, Reports, READINESS_PATH};
use vmha_agent::state::Shared;

/// `vmhad schedule-copy --cib FILE --graph FILE`: the what-if's child (Pacemaker's scheduler on a copy of
/// the CIB, in a process of its own: libpacemaker keeps process-wide state). Not for people.
#[derive(Parser, Debug)]
#[command(name = "vmhad schedule-copy", hide = true)]
struct ScheduleCopy {
    #[command(flatten)]
    args: vmha_agent::placement::ScheduleArgs,
}

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == "schedule-copy") {
        let parsed = ScheduleCopy::parse_from(std::env::args_os().skip(1));
        return match vmha_agent::placement::schedule(&parsed.args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmhad schedule-copy: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let args = VmhadArgs::parse();
    // Large buffers (whole CIB texts, archive blocks) get mappings of their own, returned when freed,
    // instead of glibc raising its threshold after each one and keeping the next ones in its arenas.
    let malloc_tuned = glibc_malloc::set_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD);
    let host = args
        .host
        .clone()
        .or_else(|| vmha_agent::options::system_hostname().ok())
        .unwrap_or_default();
    let target = logging::resolve(args.log, logging::stderr_kind());
    let (subscriber, chosen) = logging::subscriber(target, &host, logging::env_filter());
    if tracing::subscriber::set_global_default(subscriber).is_err() {
        eprintln!("vmhad: a log subscriber is already set");
    }
    if let Some(why) = &chosen.fallback {
        tracing::warn!("logging to {:?} instead of {target:?}: {why}", chosen.target);
    }
    if !malloc_tuned {
        tracing::warn!("glibc did not take vmhad's malloc thresholds; memory freed stays with vmhad longer");
    }
    // One thread for vmhad's async work; library calls (libvirt, Corosync, Pacemaker, disks) run on
    // tokio's blocking pool. An idle blocking thread leaves after 2 s rather than tokio's default 10 s: each
    // holds a stack (returned to the system when the thread ends), and vmhad's calls are seconds apart when
    // it is idle (bench/results/memory.md).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_keep_alive(Duration::from_secs(2))
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args));
    // A call stuck in a hung daemon's library must not hold up vmhad's exit.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// From this size an allocation gets its own mapping, returned to the system when it is freed (whole CIB
/// texts and documents; fixed: glibc would raise it up to 32 MiB after such a buffer is freed).
const MMAP_THRESHOLD: u32 = 1024 * 1024;
/// The free top of a heap glibc keeps rather than giving it back at once.
const TRIM_THRESHOLD: u32 = 4 * 1024 * 1024;
/// After a change of the cluster view, vmhad gives back the memory freed meanwhile once the view has
/// been quiet this long: while changes stream in, the freed memory is reused at once, and giving it back
/// would only have the next change fault it in again (CPU on every change).
const TRIM_QUIET: Duration = Duration::from_secs(10);
/// And at least this often, quiet or not.
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// Gives freed memory back to the system when the cluster view has been quiet for [`TRIM_QUIET`] after
/// a change, and every [`TRIM_EVERY`] otherwise: handling a change frees whole CIB texts and documents
/// on several threads, and glibc keeps free pages inside its arenas (44 of 104 MiB at 2000 VMs,
/// bench/results/scale.md) until trimmed.
async fn give_back_memory(shared: Arc<Shared>) {
    let mut changes = shared.subscribe();
    loop {
        let since = tokio::time::Instant::now();
        if let Ok(changed) = tokio::time::timeout(TRIM_EVERY, changes.changed()).await {
            if changed.is_err() {
                return;
            }
            // Wait for TRIM_QUIET without a change, or until TRIM_EVERY has passed since the last trim.
            let limit = since + TRIM_EVERY;
            while let Ok(changed) =
                tokio::time::timeout_at(limit.min(tokio::time::Instant::now() + TRIM_QUIET), changes.changed()).await
            {
                if changed.is_err() {
                    return;
                }
            }
        }
        changes.mark_unchanged();
        // malloc_trim walks every arena under its lock: off the async thread.
        let _ = tokio::task::spawn_blocking(glibc_malloc::trim).await;
    }
}

async fn run(args: VmhadArgs) -> Result<()> {
    let host = match args.host {
        Some(h) => h,
        None => vmha_agent::options::system_hostname()?,
    };
    let shared = Shared::new(host.clone(), Arc::new(PacemakerCib::default()));
    shared.set_archive_dir(args.archive_dir.clone());
    // What the operations (live clone) run against: the real libraries, reached through this host's
    // libvirt URI for this host and the peer URI pattern for the others.
    let ports = vmha_agent::ports::ports(
        &shared,
        Uris {
            local: args.hypervisor.clone(),
            peer: args.peer_uri.clone(),
        },
    );
    shared.set_ports(ports.clone());
    let reports = Reports::new();
    let conn = zbus::connection::Builder::system()?
        .name(BUS_NAME)?
        .serve_at(
            ROOT_PATH,
            ClusterObject {
                shared: Arc::clone(&shared),
            },
        )?
        .serve_at(ROOT_PATH, zbus::fdo::ObjectManager)?
        .serve_at(
            READINESS_PATH,
            ReadinessObject {
                reports: Arc::clone(&reports),
            },
        )?
        .method_timeout(Duration::from_secs(30))
        .build()
        .await
        .with_context(|| format!("taking {BUS_NAME} on the system bus (is another vmhad running?)"))?;
    tracing::info!(%host, "vmhad on the system bus as {BUS_NAME}");

    if let Some((cpus, memory_mib)) = probe_capacity(&args.hypervisor, Duration::from_secs(10)).await {
        shared.set_host_capacity(cpus, memory_mib);
    }
    let cib = tokio::spawn(follow_cib(conn.clone(), Arc::clone(&shared)));
    let corosync = tokio::spawn(follow_corosync(conn.clone(), Arc::clone(&shared)));
    let failures = tokio::spawn(report_vm_failures(Arc::clone(&shared), args.hypervisor.clone()));
    let guests = tokio::spawn(follow_guests(conn.clone(), shared.guest_context()));
    // Ends only with vmhad (a panic in one check is contained in its own task).
    tokio::spawn(vmha_agent::health::follow_health(
        Arc::clone(&shared),
        conn.clone(),
        args.hypervisor.clone(),
        args.postmortem_dir.clone(),
    ));
    let readiness = tokio::spawn(follow_readiness(conn.clone(), Arc::clone(&shared), reports));
    let relay = tokio::spawn(vmha_agent::relay::follow_relay(conn.clone(), Arc::clone(&shared)));
    // On the DC only: the members a time bound will stop are asked to drain before its window.
    let bounds = tokio::spawn(vmha_ops::bounds::follow(
        ports.clone(),
        Arc::new(vmha_agent::ports::LocalSystemClock),
        vmha_ops::bounds::DrainRule {
            lead: Duration::from_secs(args.time_bound_drain_lead.into()),
            drain: Duration::from_millis(args.time_bound_drain_timeout_ms.into()),
        },
    ));
    let journals = tokio::spawn(vmha_ops::clone::follow_journals(ports));
    tokio::spawn(give_back_memory(Arc::clone(&shared)));
    // On the DC of a booth site only: the replication settings of `vmha site replication`.
    tokio::spawn(vmha_agent::site::replicate::follow(Arc::clone(&shared), conn.clone()));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let why = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        r = cib => match r { Ok(()) => "the CIB follower ended", Err(_) => "the CIB follower panicked" },
        r = corosync => match r { Ok(()) => "the corosync follower ended", Err(_) => "the corosync follower panicked" },
        r = failures => match r { Ok(()) => "the libvirt watcher ended", Err(_) => "the libvirt watcher panicked" },
        r = guests => match r { Ok(()) => "the guest channels ended", Err(_) => "the guest channels panicked" },
        r = readiness => match r { Ok(()) => "the readiness reports ended", Err(_) => "the readiness reports panicked" },
        r = relay => match r { Ok(()) => "the guest relay ended", Err(_) => "the guest relay panicked" },
        r = journals => match r { Ok(()) => "the clone journal follower ended", Err(_) => "the clone journal follower panicked" },
        r = bounds => match r { Ok(()) => "the time bound drain follower ended", Err(_) => "the time bound drain follower panicked" },
    };
    tracing::info!("vmhad stopping: {why}");
    Ok(())
}
