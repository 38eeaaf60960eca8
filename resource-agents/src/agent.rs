//! The OCF actions: what start, stop, monitor, migrate_to, migrate_from and validate-all do on
//! this host, over one libvirt connection, within the operation's deadline.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::deadline::{self, poll_until, Deadline, Progress};
use crate::domain_config::{ConfigError, DomainConfig};
use crate::domain_state::{Condition, PauseKind};
use crate::error::AgentError;
use crate::guest_notice;
use crate::hypervisor::{Access, Hypervisor, ShutdownRequest};
use crate::migration;
use crate::name_cache::{self, NameCache};
use crate::ocf::{Action, CheckLevel, OcfEnv, OcfStatus};
use crate::params::{Params, Strictness};
use crate::qemu_process;

/// What an action reports: the exit code and, for failures, the reason Pacemaker shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: OcfStatus,
    pub reason: Option<String>,
}

impl Outcome {
    pub fn success() -> Outcome {
        Outcome {
            status: OcfStatus::Success,
            reason: None,
        }
    }

    pub fn not_running() -> Outcome {
        Outcome {
            status: OcfStatus::NotRunning,
            reason: None,
        }
    }

    /// The outcome of a failed `action`.
    pub fn failure(action: Action, err: &AgentError) -> Outcome {
        Outcome {
            status: err.status(),
            reason: Some(format!("{}: {err}", action.name())),
        }
    }
}

/// A domain XML file read for start or validate-all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedConfig {
    pub path: PathBuf,
    pub xml: String,
    pub facts: DomainConfig,
}

/// Everything an action needs besides the libvirt connection.
#[derive(Debug, Clone)]
pub struct Context {
    pub params: Params,
    pub env: OcfEnv,
    /// When the action must have finished (the operation timeout minus the answer margin).
    pub deadline: Deadline,
    /// Where this resource's domain name is remembered on this host, if the instance is known.
    pub cache: Option<NameCache>,
}

impl Context {
    fn remember(&self, name: &str) {
        if let Some(cache) = &self.cache {
            if let Err(e) = cache.write(name) {
                tracing::warn!(vm = name, path = %cache.path().display(), error = %e,
                    "cannot record the domain name");
            }
        }
    }

    fn forget(&self) {
        if let Some(cache) = &self.cache {
            if let Err(e) = cache.remove() {
                tracing::warn!(path = %cache.path().display(), error = %e,
                    "cannot remove the domain name record");
            }
        }
    }
}

/// Reads and checks the `config` file, if one is set.
pub fn load_config(params: &Params) -> Result<Option<LoadedConfig>, AgentError> {
    let Some(path) = &params.config else {
        return Ok(None);
    };
    let xml = fs::read_to_string(path).map_err(|source| AgentError::ConfigUnreadable {
        path: path.clone(),
        source,
    })?;
    let facts = DomainConfig::parse(&xml).map_err(|source| AgentError::ConfigInvalid {
        path: path.clone(),
        source,
    })?;
    if let Some(domain) = &params.domain {
        if *domain != facts.name {
            return Err(AgentError::NameMismatch {
                domain: domain.clone(),
                in_config: facts.name,
                path: path.clone(),
            });
        }
    }
    if params.migration.shared_storage && !facts.host_cached_disks.is_empty() {
        tracing::warn!(
            vm = facts.name,
            disks = facts.host_cached_disks.join(" "),
            "shared_storage=true, but these disks use the host page cache (their cache mode is not none or \
             directsync): a live migration may leave the target reading stale blocks; set cache='none'"
        );
    }
    Ok(Some(LoadedConfig {
        path: path.clone(),
        xml,
        facts,
    }))
}

/// The domain name for actions that only look at or stop the VM: `domain` if set (no file is
/// read), else the name in `config`, else the name recorded at start on this host. `Ok(None)`:
/// the config file is unreadable and nothing was started here since boot.
pub fn vm_name(params: &Params, cache: Option<&NameCache>) -> Result<Option<String>, AgentError> {
    if let Some(domain) = &params.domain {
        return Ok(Some(domain.clone()));
    }
    match load_config(params) {
        Ok(Some(config)) => Ok(Some(config.facts.name)),
        Ok(None) => Err(AgentError::NoIdentity("neither config nor domain is set".into())),
        Err(err) => match cache.and_then(NameCache::read) {
            Some(name) => {
                tracing::info!(vm = name, error = %err, "config unusable; using the recorded name");
                Ok(Some(name))
            }
            None if matches!(err, AgentError::ConfigUnreadable { .. }) => Ok(None),
            None => Err(err),
        },
    }
}

/// monitor (and status): 0 running here, 7 cleanly stopped here, 1 failed here.
pub fn monitor(hv: &Hypervisor, ctx: &Context, name: &str) -> Result<Outcome, AgentError> {
    // "No state" is transient (a migration being set up): look again for up to 2 s.
    let settle = ctx.deadline.min(Deadline::after(Duration::from_secs(2)));
    let mut last = None;
    poll_until(settle, || {
        last = hv.condition(name)?;
        Ok::<_, AgentError>((last != Some(Condition::Indeterminate)).then_some(()))
    })?;
    let Some(condition) = last else {
        return Ok(Outcome::not_running());
    };
    match condition.monitor_status() {
        OcfStatus::Success => {
            if ctx.env.check_level == CheckLevel::GuestAgent && condition == Condition::Running {
                let vm = hv
                    .find(name)?
                    .ok_or_else(|| AgentError::failed(name, "vanished during the monitor"))?;
                let budget = ctx.params.guest_agent_timeout.min(ctx.deadline.remaining());
                vm.guest_ping(budget).map_err(|e| {
                    AgentError::failed(name, format!("guest agent did not answer guest-ping: {}", detail(&e)))
                })?;
            }
            Ok(Outcome::success())
        }
        OcfStatus::NotRunning => Ok(Outcome::not_running()),
        _ => Err(AgentError::failed(name, format!("is {}", condition.describe()))),
    }
}

/// start: idempotent; returns only once the domain runs.
pub fn start(hv: &Hypervisor, ctx: &Context, name: &str, config: Option<&LoadedConfig>) -> Result<Outcome, AgentError> {
    if let Some(vm) = hv.find(name)? {
        match vm.condition()? {
            Some(Condition::Running) => {
                tracing::info!(vm = name, "already running");
                ctx.remember(name);
                return Ok(Outcome::success());
            }
            Some(Condition::Paused(PauseKind::Resumable(why))) => {
                tracing::info!(vm = name, why, "resuming");
                vm.resume()?;
                return wait_until_running(hv, ctx, name);
            }
            Some(Condition::GuestSuspended) => {
                vm.wake_up()?;
                return wait_until_running(hv, ctx, name);
            }
            Some(Condition::Paused(PauseKind::Job(_)) | Condition::Indeterminate) => {
                return wait_until_running(hv, ctx, name);
            }
            Some(c @ (Condition::Failed(_) | Condition::ShuttingDown)) => {
                return Err(AgentError::failed(
                    name,
                    format!("is {}; it must be stopped before it can start", c.describe()),
                ));
            }
            Some(Condition::ShutOff(_)) | None => {}
        }
    }

    activate_dependencies(hv, ctx, name, config)?;

    let saved = ctx.params.state_file(name).filter(|f| f.exists());
    if let Some(file) = saved {
        tracing::info!(vm = name, file = %file.display(), "restoring saved state");
        hv.restore(name, &file)?;
        if let Err(e) = fs::remove_file(&file) {
            tracing::warn!(vm = name, file = %file.display(), error = %e,
                "cannot remove the restored state file");
        }
    } else if let Some(config) = config {
        refuse_conflicting_definition(hv, name, config)?;
        complete_replica_rounds(name, &config.xml)?;
        tracing::info!(vm = name, config = %config.path.display(), "creating transient domain");
        let with_channel = if ctx.params.guest_channel {
            vmha_model::domain::with_guest_channel(&config.xml).map_err(|e| AgentError::ConfigInvalid {
                path: config.path.clone(),
                source: ConfigError::Malformed(e.to_string()),
            })?
        } else {
            None
        };
        hv.create_transient(name, with_channel.as_deref().unwrap_or(&config.xml))?;
    } else {
        let vm = hv.find(name)?.ok_or_else(|| AgentError::UnknownDomain {
            vm: name.to_owned(),
            uri: hv.uri().to_owned(),
        })?;
        tracing::info!(vm = name, "booting defined domain");
        vm.boot()?;
    }
    wait_until_running(hv, ctx, name)
}

/// Before a VM starts on its disks: a replication round (`vmha site replicate`, from the site that held
/// the ticket) that committed but died between its renames is completed in the directories of the VM's
/// disks, so the VM never starts on images of two points in time (see `vmha_model::round_record`). A
/// record that is not valid is logged and left alone; a rename that fails fails the start.
fn complete_replica_rounds(name: &str, xml: &str) -> Result<(), AgentError> {
    // A definition whose disks do not read is libvirt's to refuse, with its own message.
    let Ok(disks) = vmha_model::clone::writable_disks(xml) else {
        return Ok(());
    };
    let sweep = vmha_model::round_record::complete_for(disks.iter().map(|(_, file)| file.as_str()))
        .map_err(|e| AgentError::failed(name, e.to_string()))?;
    for c in &sweep.completed {
        tracing::warn!(
            vm = name,
            record = %c.record.display(),
            renamed = c.renamed,
            point = %vmha_model::printable(&c.point),
            "completed an interrupted replication round before starting"
        );
    }
    for e in &sweep.invalid {
        tracing::warn!(vm = name, "{e} (left alone)");
    }
    Ok(())
}

/// A persistent domain with the config's name but another UUID would make libvirt refuse the
/// transient one; say so plainly instead of relaying libvirt's error.
fn refuse_conflicting_definition(hv: &Hypervisor, name: &str, config: &LoadedConfig) -> Result<(), AgentError> {
    let Some(vm) = hv.find(name)? else {
        return Ok(());
    };
    if !vm.is_persistent()? {
        return Ok(());
    }
    let existing = vm.uuid()?;
    let same = config
        .facts
        .uuid
        .as_deref()
        .is_some_and(|u| u.eq_ignore_ascii_case(&existing));
    if same {
        Ok(())
    } else {
        Err(AgentError::ConflictingDefinition {
            vm: name.to_owned(),
            existing,
        })
    }
}

fn activate_dependencies(
    hv: &Hypervisor,
    ctx: &Context,
    name: &str,
    config: Option<&LoadedConfig>,
) -> Result<(), AgentError> {
    let mut networks = ctx.params.start_networks.clone();
    let mut pools = ctx.params.start_pools.clone();
    if ctx.params.start_resources {
        if let Some(config) = config {
            networks.extend(config.facts.networks.iter().cloned());
            pools.extend(config.facts.pools.iter().cloned());
        }
    }
    dedup_in_order(&mut networks);
    dedup_in_order(&mut pools);
    for pool in &pools {
        hv.ensure_pool_active(name, pool)?;
    }
    for network in &networks {
        hv.ensure_network_active(name, network)?;
    }
    Ok(())
}

fn dedup_in_order(names: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
}

fn wait_until_running(hv: &Hypervisor, ctx: &Context, name: &str) -> Result<Outcome, AgentError> {
    let mut resumed = false;
    let reached = poll_until(ctx.deadline, || match hv.condition(name)? {
        Some(Condition::Running) => Ok(Some(())),
        // A state restored as it was saved (paused) is resumed once.
        Some(Condition::Paused(PauseKind::Resumable(_))) if !resumed => {
            resumed = true;
            if let Some(vm) = hv.find(name)? {
                vm.resume()?;
            }
            Ok(None)
        }
        Some(c @ (Condition::Failed(_) | Condition::ShutOff(_) | Condition::ShuttingDown)) => Err(AgentError::failed(
            name,
            format!("is {} right after start", c.describe()),
        )),
        None => Err(AgentError::failed(name, "vanished right after start")),
        Some(_) => Ok(None),
    })?;
    match reached {
        Some(()) => {
            ctx.remember(name);
            Ok(Outcome::success())
        }
        None => Err(AgentError::failed(
            name,
            "did not reach the running state before the start deadline",
        )),
    }
}

/// stop: ends with the domain not active on this host: save or graceful shutdown within budget,
/// then destroy. Succeeds when already stopped; never returns 7.
pub fn stop(hv: &Hypervisor, ctx: &Context, name: &str) -> Result<Outcome, AgentError> {
    let Some(vm) = hv.find(name)? else {
        ctx.forget();
        return Ok(Outcome::success());
    };
    let condition = match vm.condition()? {
        Some(c) if c.is_active() => c,
        _ => {
            ctx.forget();
            return Ok(Outcome::success());
        }
    };

    if ctx.params.force_stop {
        tracing::info!(vm = name, "force_stop: destroying");
    } else if matches!(
        condition,
        Condition::Running | Condition::Paused(PauseKind::Resumable(_))
    ) {
        let graceful = Deadline::after(deadline::graceful_shutdown_budget(
            ctx.deadline.remaining(),
            ctx.params.shutdown_timeout,
        ));
        if let Some(file) = ctx.params.state_file(name) {
            if save_state(hv, &vm, &file, graceful)? {
                ctx.forget();
                return Ok(Outcome::success());
            }
        }
        if condition == Condition::Running && shut_down_gracefully(hv, &vm, ctx, graceful)? {
            ctx.forget();
            return Ok(Outcome::success());
        }
    } else {
        tracing::info!(
            vm = name,
            state = condition.describe(),
            "not running normally: destroying"
        );
    }

    vm.destroy()?;
    if wait_until_gone(hv, name, ctx.deadline)? {
        tracing::info!(vm = name, "destroyed");
        ctx.forget();
        Ok(Outcome::success())
    } else {
        Err(AgentError::failed(name, "is still active after virDomainDestroy"))
    }
}

/// Saves the memory state to `file`; `Ok(false)` (logged) if that did not stop the domain.
fn save_state(hv: &Hypervisor, vm: &crate::hypervisor::Vm<'_>, file: &Path, by: Deadline) -> Result<bool, AgentError> {
    tracing::info!(vm = vm.name(), file = %file.display(), "saving memory state");
    match vm.save(file) {
        Ok(()) => wait_until_gone(hv, vm.name(), by),
        Err(e) => {
            tracing::error!(vm = vm.name(), error = %e, "save failed; shutting down instead");
            Ok(false)
        }
    }
}

/// Asks the guest to power off and waits until `by`; `Ok(false)` if it is still active.
fn shut_down_gracefully(
    hv: &Hypervisor,
    vm: &crate::hypervisor::Vm<'_>,
    ctx: &Context,
    by: Deadline,
) -> Result<bool, AgentError> {
    let name = vm.name();
    match vm.request_shutdown(ctx.params.shutdown_mode.flags()) {
        Ok(how) => {
            tracing::info!(
                vm = name,
                budget_s = by.remaining().as_secs(),
                driver_default = how == ShutdownRequest::DriverDefault,
                "graceful shutdown requested"
            );
        }
        Err(e) => {
            tracing::warn!(vm = name, error = %e, "shutdown request failed; destroying");
            return Ok(false);
        }
    }
    // A guest that was still booting (or in its boot loader) drops an ACPI power-button press; the
    // request is repeated while the budget lasts, so such a guest still gets to shut down cleanly.
    loop {
        let slice = Deadline::after(SHUTDOWN_REPEAT).min(by);
        if wait_until_gone(hv, name, slice)? {
            return Ok(true);
        }
        if by.has_passed() {
            tracing::warn!(vm = name, "guest did not power off in time; destroying");
            return Ok(false);
        }
        match vm.request_shutdown(ctx.params.shutdown_mode.flags()) {
            Ok(_) => tracing::info!(
                vm = name,
                budget_s = by.remaining().as_secs(),
                "guest still running; shutdown requested again"
            ),
            Err(e) => tracing::debug!(vm = name, error = %e, "repeated shutdown request failed"),
        }
    }
}

/// How often a graceful stop repeats its shutdown request while the guest keeps running.
const SHUTDOWN_REPEAT: Duration = Duration::from_secs(8);

/// Waits until the domain is shut off or gone; `Ok(false)` if still active at `by`.
fn wait_until_gone(hv: &Hypervisor, name: &str, by: Deadline) -> Result<bool, AgentError> {
    let gone = poll_until(by, || {
        Ok::<_, AgentError>(match hv.condition(name)? {
            None | Some(Condition::ShutOff(_)) => Some(()),
            Some(_) => None,
        })
    })?;
    Ok(gone.is_some())
}

/// migrate_to (on the source): peer-to-peer live migration to `OCF_RESKEY_CRM_meta_migrate_target`,
/// aborted before the deadline so the guest keeps running here rather than being lost in transit.
pub fn migrate_to(hv: &Hypervisor, ctx: &Context, name: &str) -> Result<Outcome, AgentError> {
    let target = ctx.env.migrate_target.clone().ok_or(AgentError::NoMigrateTarget)?;
    let vm = hv
        .find(name)?
        .ok_or_else(|| AgentError::failed(name, "is not defined on this host: nothing to migrate"))?;
    match vm.condition()? {
        Some(Condition::Running | Condition::Paused(_)) => {}
        Some(c) => {
            return Err(AgentError::failed(
                name,
                format!("cannot migrate: it is {} here", c.describe()),
            ))
        }
        None => return Err(AgentError::failed(name, "vanished before the migration")),
    }
    let plan = migration::plan(
        &ctx.params.hypervisor,
        &ctx.params.migration,
        &target,
        vm.is_persistent()?,
    )
    .map_err(|source| AgentError::Plan {
        vm: name.to_owned(),
        source,
    })?;
    if let Some(ms) = plan.max_downtime_ms {
        if let Err(e) = vm.set_max_downtime(ms) {
            tracing::warn!(vm = name, error = %e, "cannot set the maximum downtime");
        }
    }
    let wait = guest_notice::wait_for_guest(ctx.params.guest_migrate_timeout, ctx.deadline.remaining());
    if !wait.is_zero() {
        let resource = guest_notice::resource_name(ctx.env.resource_instance.as_deref(), name);
        let answer = guest_notice::ask_before_migration(&resource, ctx.env.migrate_source.as_deref(), &target, wait);
        guest_notice::log_answer(name, &target, &answer);
    }
    tracing::info!(vm = name, target, uri = plan.target_uri, data_uri = ?plan.data_uri,
        shared_storage = ctx.params.migration.shared_storage, "starting live migration");

    // The migration blocks its connection; it runs on its own thread and connection so that this
    // one stays free to abort it.
    let (tx, rx) = mpsc::channel();
    let (uri, progress, vm_name, thread_plan) = (
        hv.uri().to_owned(),
        hv.progress().clone(),
        name.to_owned(),
        plan.clone(),
    );
    let migration = thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            let result = Hypervisor::open(&uri, Access::ReadWrite, &progress).and_then(|h| match h.find(&vm_name)? {
                Some(vm) => vm.migrate(&thread_plan),
                None => Err(AgentError::failed(&vm_name, "vanished before the migration")),
            });
            let _ = tx.send(result);
        })
        .map_err(|e| AgentError::failed(name, format!("cannot start the migration thread: {e}")))?;

    let budget = deadline::migration_budget(ctx.deadline.remaining());
    let result = match rx.recv_timeout(budget) {
        Ok(result) => result.map_err(|e| detail(&e)),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            tracing::warn!(vm = name, budget_s = budget.as_secs(), "migration too slow; aborting");
            if let Err(e) = vm.abort_job() {
                tracing::warn!(vm = name, error = %e, "abort failed");
            }
            match rx.recv_timeout(ctx.deadline.remaining()) {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("aborted after {} s: {}", budget.as_secs(), detail(&e))),
                Err(_) => Err(format!(
                    "still running {} s after it was aborted",
                    ctx.deadline.remaining().as_secs()
                )),
            }
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => Err("the migration thread ended without a result".into()),
    };
    // A thread that answered is ending: let it end before the process does (see run_bounded).
    if migration.is_finished() || !matches!(&result, Err(w) if w.starts_with("still running")) {
        let _ = migration.join();
    }

    let here = hv.condition(name)?;
    match result {
        Ok(()) => match here {
            None | Some(Condition::ShutOff(_)) => {
                tracing::info!(vm = name, target, "live migration done");
                ctx.forget();
                Ok(Outcome::success())
            }
            Some(c) => Err(AgentError::failed(
                name,
                format!(
                    "libvirt reported the migration to {target} done, but the VM is still {} here",
                    c.describe()
                ),
            )),
        },
        Err(why) => {
            let now = match here {
                Some(c) if c.is_active() => format!("the VM is still {} here", c.describe()),
                _ => "the VM is no longer active here".to_owned(),
            };
            Err(AgentError::failed(
                name,
                format!("live migration to {target} ({}) failed: {why}; {now}", plan.target_uri),
            ))
        }
    }
}

/// migrate_from (on the target): succeeds once the migrated domain runs here.
pub fn migrate_from(hv: &Hypervisor, ctx: &Context, name: &str) -> Result<Outcome, AgentError> {
    let source = ctx.env.migrate_source.as_deref().unwrap_or("the source node");
    let running = poll_until(ctx.deadline, || match hv.condition(name)? {
        Some(Condition::Running) => Ok(Some(())),
        Some(Condition::Paused(_) | Condition::Indeterminate) => Ok(None),
        Some(c) => Err(AgentError::failed(
            name,
            format!("is {} here after the migration from {source}", c.describe()),
        )),
        None => Err(AgentError::failed(
            name,
            format!("is not on this host after the migration from {source}"),
        )),
    })?;
    match running {
        Some(()) => {
            ctx.remember(name);
            Ok(Outcome::success())
        }
        None => Err(AgentError::failed(
            name,
            format!("did not start running here after the migration from {source}"),
        )),
    }
}

/// validate-all, the part that needs libvirt: without `config`, the domain must be defined here;
/// with it, no conflicting persistent definition may exist.
pub fn validate_on_host(
    hv: &Hypervisor,
    params: &Params,
    config: Option<&LoadedConfig>,
) -> Result<Outcome, AgentError> {
    match (config, &params.domain) {
        (Some(config), _) => {
            if let Some(vm) = hv.find(&config.facts.name)? {
                if vm.is_persistent()? && !vm.condition()?.is_some_and(Condition::is_active) {
                    refuse_conflicting_definition(hv, &config.facts.name, config)?;
                }
            }
        }
        (None, Some(domain)) => {
            if hv.find(domain)?.is_none() {
                return Err(AgentError::UnknownDomain {
                    vm: domain.clone(),
                    uri: hv.uri().to_owned(),
                });
            }
        }
        (None, None) => {
            return Err(AgentError::NoIdentity("neither config nor domain is set".into()));
        }
    }
    Ok(Outcome::success())
}

/// When the local libvirtd cannot be reached at all (not running, restarting), whether a QEMU
/// process runs the VM decides: none means monitor 7 and stop 0 (nothing runs here); one means
/// monitor 0 (the VM runs, libvirt is the problem) and stop 1 (it cannot be stopped cleanly).
/// Hung daemons are not covered: they end in the deadline report instead.
fn without_libvirt(action: Action, ctx: &Context, name: &str, err: AgentError) -> Result<Outcome, AgentError> {
    if !matches!(err, AgentError::Connect { .. })
        || err.status() != OcfStatus::ErrGeneric
        || !is_local_qemu(&ctx.params.hypervisor)
    {
        return Err(err);
    }
    match qemu_process::find(Path::new("/proc"), name) {
        Ok(None) => {
            tracing::info!(vm = name, error = %err, "libvirt unreachable; no QEMU process runs the VM");
            Ok(match action {
                Action::Monitor => Outcome::not_running(),
                _ => Outcome::success(),
            })
        }
        Ok(Some(pid)) if action == Action::Monitor => {
            tracing::warn!(vm = name, pid, error = %err, "libvirt unreachable; QEMU process runs the VM");
            Ok(Outcome::success())
        }
        Ok(Some(pid)) => Err(AgentError::failed(
            name,
            format!("libvirt is unreachable ({err}) and QEMU process {pid} still runs the VM"),
        )),
        Err(_) => Err(err),
    }
}

/// A QEMU URI for this host (no remote host part).
fn is_local_qemu(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return false;
    };
    matches!(scheme, "qemu" | "qemu+unix") && rest.starts_with('/')
}

/// The text of an error without the "VM name:" prefix, for nesting in another message.
fn detail(err: &AgentError) -> String {
    match err {
        AgentError::Libvirt { call, source, .. } => format!("{call}: {}", source.message()),
        AgentError::Failed { what, .. } => what.clone(),
        other => other.to_string(),
    }
}

/// Runs `action` from start to finish: parameters from `lookup` (the process environment in
/// production), the VM's identity, the libvirt connection, the action. Every failure becomes an
/// [`Outcome`] with a reason. Call it on a worker thread bounded by `deadline`.
pub fn run(
    action: Action,
    env: &OcfEnv,
    lookup: &dyn Fn(&str) -> Option<String>,
    deadline: Deadline,
    progress: &Progress,
) -> Outcome {
    match run_action(action, env, lookup, deadline, progress) {
        Ok(outcome) => outcome,
        Err(err) => Outcome::failure(action, &err),
    }
}

fn run_action(
    action: Action,
    env: &OcfEnv,
    lookup: &dyn Fn(&str) -> Option<String>,
    deadline: Deadline,
    progress: &Progress,
) -> Result<Outcome, AgentError> {
    let strictness = if action == Action::Stop {
        Strictness::Lenient
    } else {
        Strictness::Strict
    };
    let parsed = Params::parse(lookup, strictness)?;
    for ignored in &parsed.ignored {
        tracing::warn!(error = %ignored, "invalid parameter ignored for stop; using its default");
    }
    let cache_dir = lookup("HA_RSCTMP")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from(name_cache::DEFAULT_DIR), PathBuf::from);
    let ctx = Context {
        params: parsed.params,
        env: env.clone(),
        deadline,
        cache: env
            .resource_instance
            .as_deref()
            .map(|instance| NameCache::new(&cache_dir, instance)),
    };
    let open = |access| Hypervisor::open(&ctx.params.hypervisor, access, progress);

    match action {
        Action::Start => {
            let config = load_config(&ctx.params)?;
            let name = match (&config, &ctx.params.domain) {
                (Some(c), _) => c.facts.name.clone(),
                (None, Some(d)) => d.clone(),
                (None, None) => return Err(AgentError::NoIdentity("no config or domain".into())),
            };
            progress.set_vm(&name);
            start(&open(Access::ReadWrite)?, &ctx, &name, config.as_ref())
        }
        Action::Stop => match vm_name(&ctx.params, ctx.cache.as_ref()) {
            Ok(Some(name)) => {
                progress.set_vm(&name);
                match open(Access::ReadWrite) {
                    Ok(hv) => stop(&hv, &ctx, &name),
                    Err(e) => without_libvirt(action, &ctx, &name, e),
                }
            }
            Ok(None) => {
                tracing::info!("config unreadable and no domain started here since boot: stopped");
                Ok(Outcome::success())
            }
            Err(e) => {
                tracing::info!(error = %e, "no domain started here since boot: stopped");
                Ok(Outcome::success())
            }
        },
        Action::Monitor => {
            let Some(name) = vm_name(&ctx.params, ctx.cache.as_ref())? else {
                // A probe finds nothing to report; a recurring monitor explains the 7.
                return Ok(Outcome {
                    status: OcfStatus::NotRunning,
                    reason: (!ctx.env.is_probe()).then(|| {
                        "monitor: the config file is unreadable on this node and no domain was \
                         started here since boot"
                            .to_owned()
                    }),
                });
            };
            progress.set_vm(&name);
            let access = match ctx.env.check_level {
                CheckLevel::State => Access::ReadOnly,
                CheckLevel::GuestAgent => Access::ReadWrite,
            };
            match open(access) {
                Ok(hv) => monitor(&hv, &ctx, &name),
                Err(e) => without_libvirt(action, &ctx, &name, e),
            }
        }
        Action::MigrateTo | Action::MigrateFrom => {
            let name = vm_name(&ctx.params, ctx.cache.as_ref())?
                .ok_or_else(|| AgentError::NoIdentity("the config file is unreadable on this node".into()))?;
            progress.set_vm(&name);
            if action == Action::MigrateTo {
                migrate_to(&open(Access::ReadWrite)?, &ctx, &name)
            } else {
                migrate_from(&open(Access::ReadOnly)?, &ctx, &name)
            }
        }
        Action::ValidateAll => {
            let config = load_config(&ctx.params)?;
            match open(Access::ReadOnly) {
                Ok(hv) => validate_on_host(&hv, &ctx.params, config.as_ref()),
                Err(e) if ctx.env.check_level == CheckLevel::State => {
                    tracing::info!(error = %e, "libvirt not reachable; host checks skipped");
                    Ok(Outcome::success())
                }
                Err(e) => Err(e),
            }
        }
        Action::ReloadAgent => {
            tracing::info!("parameters reloaded; they apply from the next operation");
            Ok(Outcome::success())
        }
        Action::MetaData | Action::Usage => Ok(Outcome::success()),
    }
}

#[cfg(test)]
mod tests {
    //! Scenarios against libvirt's in-process `test:///` driver. Each test opens its own
    //! connection to a node file, whose state is private to that connection, and drives several
    //! actions over it.
    use super::*;
    use std::collections::HashMap;
    use std::sync::OnceLock;
    use virt_sys as sys;

    const NODE_XML: &str = r#"<node>
  <domain type='test'><name>alive</name><memory>1024</memory><os><type>hvm</type></os></domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>off</name><memory>1024</memory><os><type>hvm</type></os><test:runstate>5</test:runstate>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>crashed</name><memory>1024</memory><os><type>hvm</type></os><test:runstate>6</test:runstate>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>paused</name><memory>1024</memory><os><type>hvm</type></os><test:runstate>3</test:runstate>
  </domain>
  <network><name>net1</name><bridge name='virbr9'/></network>
  <pool type='dir'><name>pool1</name><target><path>/tmp</path></target></pool>
</node>"#;

    const WEB1: &str = "<domain type='test'><name>web1</name><memory>1024</memory>\
        <os><type>hvm</type></os></domain>";

    /// A scratch directory per test, and the URI of the shared node file.
    struct Scene {
        dir: PathBuf,
        uri: String,
    }

    fn scene(test: &str) -> Scene {
        static NODE: OnceLock<PathBuf> = OnceLock::new();
        let base = std::env::temp_dir().join(format!("vmha-agent-{}", std::process::id()));
        let node = NODE.get_or_init(|| {
            fs::create_dir_all(&base).expect("mkdir");
            let path = base.join("node.xml");
            fs::write(&path, NODE_XML).expect("node file");
            path
        });
        let dir = base.join(test);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        Scene {
            dir,
            uri: format!("test://{}", node.display()),
        }
    }

    impl Scene {
        fn open(&self) -> Hypervisor {
            Hypervisor::open(&self.uri, Access::ReadWrite, &Progress::new()).expect("open")
        }

        fn write(&self, file: &str, text: &str) -> String {
            let path = self.dir.join(file);
            fs::write(&path, text).expect("write");
            path.display().to_string()
        }

        fn ctx(&self, pairs: &[(&str, &str)]) -> Context {
            self.ctx_env(pairs, &[])
        }

        fn ctx_env(&self, pairs: &[(&str, &str)], env: &[(&str, &str)]) -> Context {
            let mut map: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (format!("OCF_RESKEY_{k}"), v.to_string()))
                .collect();
            map.insert("OCF_RESKEY_hypervisor".into(), self.uri.clone());
            let env_map: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            Context {
                params: Params::parse(|k| map.get(k).cloned(), Strictness::Strict)
                    .expect("params")
                    .params,
                env: OcfEnv::from_lookup(|k| env_map.get(k).cloned()),
                deadline: Deadline::after(Duration::from_secs(30)),
                cache: Some(NameCache::new(&self.dir, "vm")),
            }
        }

        /// Runs a whole action as the binary does (own connection, parameters from "env").
        fn run(&self, action: Action, pairs: &[(&str, &str)], env: &[(&str, &str)]) -> Outcome {
            let mut map: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (format!("OCF_RESKEY_{k}"), v.to_string()))
                .chain(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
                .collect();
            map.entry("OCF_RESKEY_hypervisor".into())
                .or_insert_with(|| self.uri.clone());
            map.insert("HA_RSCTMP".into(), self.dir.display().to_string());
            map.insert("OCF_RESOURCE_INSTANCE".into(), "vm".into());
            let lookup = |k: &str| map.get(k).cloned();
            let env = OcfEnv::from_lookup(lookup);
            run(
                action,
                &env,
                &lookup,
                Deadline::after(Duration::from_secs(30)),
                &Progress::new(),
            )
        }
    }

    fn raw_state(hv: &Hypervisor, name: &str) -> Option<libvirt_ext::RawState> {
        let dom = hv.connection().lookup_domain_by_name(name).ok()?;
        libvirt_ext::domain_state(&dom).ok()
    }

    fn status(result: Result<Outcome, AgentError>) -> OcfStatus {
        match result {
            Ok(outcome) => outcome.status,
            Err(err) => err.status(),
        }
    }

    #[test]
    fn monitor_maps_each_fixture_state() {
        let s = scene("monitor_states");
        let hv = s.open();
        let ctx = s.ctx(&[("domain", "x")]);
        let table = [
            ("alive", OcfStatus::Success),
            ("paused", OcfStatus::Success),
            ("off", OcfStatus::NotRunning),
            ("crashed", OcfStatus::ErrGeneric),
            ("nosuch", OcfStatus::NotRunning),
        ];
        for (name, expected) in table {
            assert_eq!(status(monitor(&hv, &ctx, name)), expected, "{name}");
        }
        let err = monitor(&hv, &ctx, "crashed").expect_err("crashed");
        assert_eq!(err.to_string(), "VM crashed: is crashed");
    }

    #[test]
    fn depth_10_monitor_pings_the_guest_agent() {
        let s = scene("monitor_depth10");
        let hv = s.open();
        let ctx = s.ctx_env(&[("domain", "alive")], &[("OCF_CHECK_LEVEL", "10")]);
        // The test driver has no guest agent: the ping fails and the monitor says so.
        let err = monitor(&hv, &ctx, "alive").expect_err("no agent in the test driver");
        assert_eq!(err.status(), OcfStatus::ErrGeneric);
        let text = err.to_string();
        assert!(
            text.starts_with("VM alive: guest agent did not answer guest-ping: virDomainQemuAgentCommand"),
            "{text}"
        );
        // Depth 0 of the same domain does not touch the agent.
        let shallow = s.ctx(&[("domain", "alive")]);
        assert_eq!(status(monitor(&hv, &shallow, "alive")), OcfStatus::Success);
        // A paused guest cannot answer, so it is not asked.
        assert_eq!(status(monitor(&hv, &ctx, "paused")), OcfStatus::Success);
    }

    /// A failover after the other site died mid-round: the round's record and a partial copy wait beside the
    /// VM's disk image. The start completes the round first (the image is the round's point), and a partial
    /// copy of a round that never committed is not touched.
    #[test]
    fn start_completes_an_interrupted_replication_round_first() {
        use std::os::unix::fs::PermissionsExt as _;
        use vmha_model::replica::partial_name;
        use vmha_model::round_record::{file_name, RoundRecord, VERSION};
        let s = scene("replica_round");
        let image = s.write("rep1.img", "old point");
        let uncommitted = s.write("rep1-data.img", "old point");
        fs::write(partial_name(&image, "a1b2"), "new point").expect("partial");
        fs::write(partial_name(&uncommitted, "c3d4"), "never committed").expect("partial");
        let record = RoundRecord {
            version: VERSION,
            vcluster: "vc1".into(),
            round: "a1b2".into(),
            point: "2026-12-07T23:00:00Z".into(),
            images: vec![image.clone()],
        };
        let record_path = s.write(&file_name("a1b2"), &serde_json::to_string(&record).expect("json"));
        fs::set_permissions(&record_path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let xml = format!(
            "<domain type='test'><name>rep1</name><memory>1024</memory><os><type>hvm</type></os><devices>\
             <disk type='file' device='disk'><source file='{image}'/><target dev='vda'/></disk>\
             <disk type='file' device='disk'><source file='{uncommitted}'/><target dev='vdb'/></disk>\
             </devices></domain>"
        );
        let config = s.write("rep1.xml", &xml);
        let hv = s.open();
        let ctx = s.ctx(&[("config", &config)]);
        let loaded = load_config(&ctx.params).expect("config").expect("set");
        assert_eq!(status(start(&hv, &ctx, "rep1", Some(&loaded))), OcfStatus::Success);
        assert_eq!(fs::read_to_string(&image).expect("image"), "new point");
        assert!(
            !std::path::Path::new(&record_path).exists(),
            "the record is removed once completed"
        );
        assert_eq!(fs::read_to_string(&uncommitted).expect("image"), "old point");
        assert!(std::path::Path::new(&partial_name(&uncommitted, "c3d4")).exists());
        assert_eq!(status(stop(&hv, &ctx, "rep1")), OcfStatus::Success);
    }

    #[test]
    fn lifecycle_from_config_over_one_connection() {
        let s = scene("lifecycle_config");
        let config = s.write("web1.xml", WEB1);
        let hv = s.open();
        let ctx = s.ctx(&[("config", &config)]);
        let loaded = load_config(&ctx.params).expect("config").expect("set");
        let cache = ctx.cache.clone().expect("cache");

        assert_eq!(status(monitor(&hv, &ctx, "web1")), OcfStatus::NotRunning, "probe");
        assert_eq!(status(start(&hv, &ctx, "web1", Some(&loaded))), OcfStatus::Success);
        assert_eq!(cache.read().as_deref(), Some("web1"), "start records the name");
        let dom = hv.connection().lookup_domain_by_name("web1").expect("created");
        assert!(
            !dom.is_persistent().expect("persistent?"),
            "config domains are transient"
        );
        assert_eq!(status(monitor(&hv, &ctx, "web1")), OcfStatus::Success);
        assert_eq!(
            status(start(&hv, &ctx, "web1", Some(&loaded))),
            OcfStatus::Success,
            "idempotent"
        );

        assert_eq!(status(stop(&hv, &ctx, "web1")), OcfStatus::Success);
        assert!(hv.find("web1").expect("lookup").is_none(), "transient domain gone");
        assert_eq!(cache.read(), None, "stop forgets the name");
        assert_eq!(status(stop(&hv, &ctx, "web1")), OcfStatus::Success, "stop twice");
        assert_eq!(status(monitor(&hv, &ctx, "web1")), OcfStatus::NotRunning);
    }

    #[test]
    fn start_boots_a_defined_domain_and_stop_shuts_it_down_gracefully() {
        let s = scene("lifecycle_domain");
        let hv = s.open();
        let ctx = s.ctx(&[("domain", "off")]);
        assert_eq!(status(start(&hv, &ctx, "off", None)), OcfStatus::Success);
        assert_eq!(raw_state(&hv, "off").map(|r| r.state), Some(sys::VIR_DOMAIN_RUNNING));

        assert_eq!(status(stop(&hv, &ctx, "off")), OcfStatus::Success);
        let after = raw_state(&hv, "off").expect("persistent domain stays defined");
        assert_eq!(after.state, sys::VIR_DOMAIN_SHUTOFF);
        // The test driver rejects ACPI mode; the driver default still shut it down (not destroy).
        assert_eq!(u32::try_from(after.reason).ok(), Some(sys::VIR_DOMAIN_SHUTOFF_SHUTDOWN));
    }

    #[test]
    fn force_stop_destroys() {
        let s = scene("force_stop");
        let hv = s.open();
        let ctx = s.ctx(&[("domain", "alive"), ("force_stop", "true")]);
        assert_eq!(status(stop(&hv, &ctx, "alive")), OcfStatus::Success);
        let after = raw_state(&hv, "alive").expect("still defined");
        assert_eq!(after.state, sys::VIR_DOMAIN_SHUTOFF);
        assert_eq!(
            u32::try_from(after.reason).ok(),
            Some(sys::VIR_DOMAIN_SHUTOFF_DESTROYED)
        );
    }

    #[test]
    fn stop_destroys_a_crashed_domain_and_never_says_not_running() {
        let s = scene("stop_crashed");
        let hv = s.open();
        let ctx = s.ctx(&[("domain", "crashed")]);
        let outcome = stop(&hv, &ctx, "crashed").expect("stop");
        assert_eq!(outcome.status, OcfStatus::Success);
        assert_eq!(
            raw_state(&hv, "crashed").map(|r| r.state),
            Some(sys::VIR_DOMAIN_SHUTOFF)
        );
        for name in ["off", "nosuch"] {
            assert_eq!(status(stop(&hv, &ctx, name)), OcfStatus::Success, "{name}");
        }
    }

    #[test]
    fn start_refuses_a_failed_domain_and_resumes_a_paused_one() {
        let s = scene("start_states");
        let hv = s.open();
        let ctx = s.ctx(&[("domain", "x")]);
        let err = start(&hv, &ctx, "crashed", None).expect_err("crashed");
        assert_eq!(err.status(), OcfStatus::ErrGeneric);
        assert!(err.to_string().contains("must be stopped"), "{err}");

        assert_eq!(status(start(&hv, &ctx, "paused", None)), OcfStatus::Success);
        assert_eq!(raw_state(&hv, "paused").map(|r| r.state), Some(sys::VIR_DOMAIN_RUNNING));
    }

    #[test]
    fn start_of_an_unknown_domain_without_config_is_a_node_error() {
        let s = scene("start_unknown");
        let hv = s.open();
        let ctx = s.ctx(&[("domain", "nosuch")]);
        let err = start(&hv, &ctx, "nosuch", None).expect_err("unknown");
        assert_eq!(err.status(), OcfStatus::ErrInstalled);
        assert!(err.to_string().contains("not defined on this host"), "{err}");
    }

    #[test]
    fn start_refuses_to_shadow_another_persistent_definition() {
        let s = scene("start_conflict");
        let config = s.write(
            "off.xml",
            "<domain type='test'><name>off</name><memory>1024</memory>\
             <os><type>hvm</type></os></domain>",
        );
        let hv = s.open();
        let ctx = s.ctx(&[("config", &config)]);
        let loaded = load_config(&ctx.params).expect("config").expect("set");
        let err = start(&hv, &ctx, "off", Some(&loaded)).expect_err("conflict");
        assert_eq!(err.status(), OcfStatus::ErrInstalled);
        assert!(err.to_string().contains("another persistent domain"), "{err}");
        assert_eq!(raw_state(&hv, "off").map(|r| r.state), Some(sys::VIR_DOMAIN_SHUTOFF));
    }

    #[test]
    fn save_on_stop_then_restore_on_start() {
        let s = scene("save_restore");
        let hv = s.open();
        let save_dir = s.dir.display().to_string();
        let ctx = s.ctx(&[("domain", "alive"), ("save_on_stop", &save_dir)]);
        let state_file = s.dir.join("alive.state");

        assert_eq!(status(stop(&hv, &ctx, "alive")), OcfStatus::Success);
        assert!(state_file.exists(), "stop saved the memory state");
        let saved = raw_state(&hv, "alive").expect("defined");
        assert_eq!(u32::try_from(saved.reason).ok(), Some(sys::VIR_DOMAIN_SHUTOFF_SAVED));

        assert_eq!(status(start(&hv, &ctx, "alive", None)), OcfStatus::Success);
        assert!(!state_file.exists(), "start consumed the state file");
        assert_eq!(raw_state(&hv, "alive").map(|r| r.state), Some(sys::VIR_DOMAIN_RUNNING));
    }

    #[test]
    fn start_activates_networks_and_pools_first() {
        let s = scene("start_deps");
        let hv = s.open();
        let conn = hv.connection();
        let net = conn.lookup_network_by_name("net1").expect("net1");
        let pool = conn.lookup_storage_pool_by_name("pool1").expect("pool1");
        net.destroy().expect("deactivate net1");
        pool.destroy().expect("deactivate pool1");
        let ctx = s.ctx(&[("domain", "off"), ("start_networks", "net1"), ("start_pools", "pool1")]);
        assert_eq!(status(start(&hv, &ctx, "off", None)), OcfStatus::Success);
        assert!(net.is_active().expect("net state"));
        assert!(pool.is_active().expect("pool state"));

        let missing = s.ctx(&[("domain", "alive"), ("start_networks", "nonet")]);
        hv.find("alive")
            .expect("lookup")
            .expect("alive")
            .destroy()
            .expect("destroy");
        let err = start(&hv, &missing, "alive", None).expect_err("missing network");
        assert!(err.to_string().contains("virNetworkLookupByName"), "{err}");
        assert_eq!(raw_state(&hv, "alive").map(|r| r.state), Some(sys::VIR_DOMAIN_SHUTOFF));
    }

    #[test]
    fn start_resources_reads_networks_from_the_config() {
        let s = scene("start_resources");
        let config = s.write(
            "web2.xml",
            "<domain type='test'><name>web2</name><memory>1024</memory><os><type>hvm</type></os>\
             <devices><interface type='network'><source network='net1'/></interface></devices>\
             </domain>",
        );
        let hv = s.open();
        let net = hv.connection().lookup_network_by_name("net1").expect("net1");
        net.destroy().expect("deactivate");
        let ctx = s.ctx(&[("config", &config), ("start_resources", "true")]);
        let loaded = load_config(&ctx.params).expect("config").expect("set");
        assert_eq!(status(start(&hv, &ctx, "web2", Some(&loaded))), OcfStatus::Success);
        assert!(net.is_active().expect("state"));
    }

    #[test]
    fn dependencies_are_activated_once_each_in_order() {
        let mut names: Vec<String> = ["b", "a", "b", "c", "a"].map(String::from).to_vec();
        dedup_in_order(&mut names);
        assert_eq!(names, ["b", "a", "c"]);
    }

    #[test]
    fn migrate_from_checks_the_domain_runs_here() {
        let s = scene("migrate_from");
        let hv = s.open();
        let ctx = s.ctx_env(&[("domain", "alive")], &[("OCF_RESKEY_CRM_meta_migrate_source", "n1")]);
        assert_eq!(status(migrate_from(&hv, &ctx, "alive")), OcfStatus::Success);
        assert_eq!(ctx.cache.as_ref().and_then(NameCache::read).as_deref(), Some("alive"));
        let err = migrate_from(&hv, &ctx, "nosuch").expect_err("absent");
        assert_eq!(
            err.to_string(),
            "VM nosuch: is not on this host after the migration from n1"
        );
        let err = migrate_from(&hv, &ctx, "off").expect_err("shut off");
        assert!(err.to_string().contains("shut off"), "{err}");
    }

    #[test]
    fn migrate_to_needs_a_target_and_a_running_domain() {
        let s = scene("migrate_to_checks");
        let hv = s.open();
        let no_target = s.ctx(&[("domain", "alive")]);
        assert_eq!(status(migrate_to(&hv, &no_target, "alive")), OcfStatus::ErrArgs);
        let ctx = s.ctx_env(&[("domain", "x")], &[("OCF_RESKEY_CRM_meta_migrate_target", "n2")]);
        for name in ["off", "crashed", "nosuch"] {
            let err = migrate_to(&hv, &ctx, name).expect_err(name);
            assert_eq!(err.status(), OcfStatus::ErrGeneric, "{name}");
        }
    }

    #[test]
    fn failed_migration_leaves_the_vm_running_here() {
        // test:///default is shared by all connections of the process, which the migration
        // thread's own connection needs; only this test uses it, and only reads its state.
        let s = scene("migrate_to_fails");
        let hv = Hypervisor::open("test:///default", Access::ReadWrite, &Progress::new()).expect("open");
        let mut ctx = s.ctx_env(
            &[
                ("domain", "test"),
                ("migration_transport", "ssh"),
                ("migration_downtime", "100"),
            ],
            &[("OCF_RESKEY_CRM_meta_migrate_target", "node2")],
        );
        ctx.params.hypervisor = "test:///default".into();
        let err = migrate_to(&hv, &ctx, "test").expect_err("test driver cannot migrate");
        assert_eq!(err.status(), OcfStatus::ErrGeneric);
        let text = err.to_string();
        assert!(
            text.starts_with(
                "VM test: live migration to node2 (test+ssh://node2/default) failed: virDomainMigrateToURI3: "
            ),
            "{text}"
        );
        assert!(text.ends_with("; the VM is still running here"), "{text}");
        assert_eq!(hv.condition("test").expect("state"), Some(Condition::Running));
    }

    #[test]
    fn run_probes_without_config_file_as_not_running() {
        let s = scene("run_missing_config");
        let missing = s.dir.join("absent.xml").display().to_string();
        let probe = s.run(Action::Monitor, &[("config", &missing)], &[]);
        assert_eq!(probe, Outcome::not_running());
        let recurring = s.run(
            Action::Monitor,
            &[("config", &missing)],
            &[("OCF_RESKEY_CRM_meta_interval", "10000")],
        );
        assert_eq!(recurring.status, OcfStatus::NotRunning);
        assert!(recurring.reason.expect("reason").contains("config file is unreadable"));
        assert_eq!(s.run(Action::Stop, &[("config", &missing)], &[]), Outcome::success());
        let start = s.run(Action::Start, &[("config", &missing)], &[]);
        assert_eq!(start.status, OcfStatus::ErrInstalled);
        let reason = start.reason.expect("reason");
        assert!(
            reason.starts_with(&format!("start: config file {missing}: ")),
            "{reason}"
        );
        let validate = s.run(Action::ValidateAll, &[("config", &missing)], &[]);
        assert_eq!(validate.status, OcfStatus::ErrInstalled);
    }

    #[test]
    fn run_uses_the_recorded_name_when_the_config_vanished() {
        let s = scene("run_cache");
        let missing = s.dir.join("absent.xml").display().to_string();
        NameCache::new(&s.dir, "vm").write("alive").expect("record");
        // The fixture's "alive" runs: the monitor must not call it stopped.
        let probe = s.run(Action::Monitor, &[("config", &missing)], &[]);
        assert_eq!(probe, Outcome::success());
    }

    #[test]
    fn run_rejects_malformed_config_and_bad_parameters() {
        let s = scene("run_bad_config");
        let broken = s.write("broken.xml", "<domain><name>x</name>");
        for action in [Action::Start, Action::ValidateAll, Action::Monitor] {
            let outcome = s.run(action, &[("config", &broken)], &[]);
            assert_eq!(outcome.status, OcfStatus::ErrConfigured, "{action:?}");
            assert!(outcome.reason.expect("reason").contains("not well-formed XML"));
        }
        let bad_uri = s.run(Action::Monitor, &[("domain", "a"), ("hypervisor", "qemu")], &[]);
        assert_eq!(bad_uri.status, OcfStatus::ErrConfigured);
        assert!(bad_uri.reason.expect("reason").contains("hypervisor=\"qemu\""));
        let web1 = s.write("web1.xml", WEB1);
        let mismatch = s.run(Action::ValidateAll, &[("config", &web1), ("domain", "web2")], &[]);
        assert_eq!(mismatch.status, OcfStatus::ErrConfigured);
    }

    #[test]
    fn run_stop_tolerates_bad_behaviour_parameters() {
        let s = scene("run_lenient_stop");
        let outcome = s.run(Action::Stop, &[("domain", "alive"), ("shutdown_mode", "reset")], &[]);
        assert_eq!(outcome, Outcome::success());
        let monitor = s.run(Action::Monitor, &[("domain", "alive"), ("shutdown_mode", "reset")], &[]);
        assert_eq!(monitor.status, OcfStatus::ErrConfigured);
    }

    #[test]
    fn run_validate_checks_the_host_when_libvirt_answers() {
        let s = scene("run_validate");
        assert_eq!(
            s.run(Action::ValidateAll, &[("domain", "alive")], &[]),
            Outcome::success()
        );
        let unknown = s.run(Action::ValidateAll, &[("domain", "nosuch")], &[]);
        assert_eq!(unknown.status, OcfStatus::ErrInstalled);
        assert!(unknown
            .reason
            .expect("reason")
            .contains("VM nosuch: not defined on this host"));
        let web1 = s.write("web1.xml", WEB1);
        assert_eq!(
            s.run(Action::ValidateAll, &[("config", &web1)], &[]),
            Outcome::success()
        );
        let conflict = s.write(
            "off.xml",
            "<domain type='test'><name>off</name><memory>1024</memory></domain>",
        );
        let outcome = s.run(Action::ValidateAll, &[("config", &conflict)], &[]);
        assert_eq!(outcome.status, OcfStatus::ErrInstalled);
    }

    #[test]
    fn run_without_a_daemon_falls_back_to_the_process_table() {
        let s = scene("run_no_daemon");
        let uri = "qemu+unix:///system?socket=/nonexistent/vmha-test.sock";
        let pairs = [("domain", "vmha-no-such-guest"), ("hypervisor", uri)];
        // No libvirtd and no QEMU process for the guest: cleanly stopped.
        assert_eq!(s.run(Action::Monitor, &pairs, &[]), Outcome::not_running());
        assert_eq!(s.run(Action::Stop, &pairs, &[]), Outcome::success());
        // Validation without libvirt: level 0 passes on parameters alone, level 10 fails.
        assert_eq!(s.run(Action::ValidateAll, &pairs, &[]), Outcome::success());
        let deep = s.run(Action::ValidateAll, &pairs, &[("OCF_CHECK_LEVEL", "10")]);
        assert_eq!(deep.status, OcfStatus::ErrGeneric);
        // Start needs libvirt.
        let start = s.run(Action::Start, &pairs, &[]);
        assert_eq!(start.status, OcfStatus::ErrGeneric);
        assert!(start
            .reason
            .expect("reason")
            .starts_with(&format!("start: cannot connect to {uri}")));
    }

    #[test]
    fn reload_agent_validates_the_new_parameters() {
        let s = scene("reload");
        assert_eq!(
            s.run(
                Action::ReloadAgent,
                &[("domain", "alive"), ("migration_speed", "100")],
                &[]
            ),
            Outcome::success()
        );
        let bad = s.run(
            Action::ReloadAgent,
            &[("domain", "alive"), ("migration_speed", "x")],
            &[],
        );
        assert_eq!(bad.status, OcfStatus::ErrConfigured);
    }
}
