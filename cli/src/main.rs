//! `vmha`: the command-line tool on vmhad's D-Bus API (through the `vmha-api` proxies). Human output by
//! default, `--output json` for scripts; every error is one line on stderr and a non-zero exit, whose
//! value tells the class of a refusal by vmhad (see [`EXIT_CODES`]).

mod progress;

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use clap_complete::Shell;
use futures_util::StreamExt;
use serde_json::{json, Value};
use vmha_agent::options::VmhadArgs;
use vmha_agent::vcluster::VclusterCmd;
use vmha_api::json::{document, Cluster as JsonCluster, Host as JsonHost, Vm as JsonVm};
use vmha_api::proxy::{ClusterProxy, Event, Finished, HostProxy, JobProxy, VirtualMachineProxy};
use vmha_api::{host_path, vm_path, BUS_NAME, CLUSTER_INTERFACE, HOST_INTERFACE, ROOT_PATH, VM_INTERFACE};
use vmha_model::group;
use vmha_vcluster::printable;
use zbus::message::Type as MessageType;
use zbus::proxy::CacheProperties;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};
use zbus::{Connection, DBusError, MatchRule, MessageStream};

/// The exit status of `vmha` by what went wrong, as `--help` and the manual page list them.
const EXIT_CODES: &str = "\
Exit status:
  0   success
  1   failure: a job failed, vmha check found something red, a guest did not answer done, or
      anything not listed below (vmhad's org.vmha.Vmha1.Error.Failed)
  2   usage: the command line is wrong
  3   InvalidArgument: vmhad refused the request as wrong (a bad name, value, file); nothing changed
  4   AccessDenied: neither root nor allowed org.vmha.Vmha1.manage by polkit
  5   UnknownVm: no such VM
  6   UnknownHost: no such host
  7   UnknownGroup: no such group or virtual cluster
  8   Conflict: the name is taken, or the VM is busy with another job
  9   NotReady: vmhad is not running, still connecting, or cannot read the CIB; try again later
  10  NotQuorate: this host's partition has no quorum
  11  GuestRefused: the guest declined
  12  GuestUnreachable: the guest (or the host it runs on) cannot be reached
  13  Libvirt: a libvirt call failed
  14  Cib: reading or changing the CIB failed";

/// The exit status for an error of vmhad (see [`EXIT_CODES`]).
fn exit_code(e: &vmha_api::Error) -> u8 {
    use vmha_api::Error as E;
    match e {
        E::InvalidArgument(_) => 3,
        E::AccessDenied(_) => 4,
        E::UnknownVm(_) => 5,
        E::UnknownHost(_) => 6,
        E::UnknownGroup(_) => 7,
        E::Conflict(_) => 8,
        E::NotReady(_) => 9,
        E::NotQuorate(_) => 10,
        E::GuestRefused(_) => 11,
        E::GuestUnreachable(_) => 12,
        E::Libvirt(_) => 13,
        E::Cib(_) => 14,
        E::Failed(_) => 1,
        E::ZBus(_) => match e.short_name().as_str() {
            "org.freedesktop.DBus.Error.AccessDenied" => 4,
            "org.freedesktop.DBus.Error.ServiceUnknown" | "org.freedesktop.DBus.Error.NameHasNoOwner" => 9,
            _ => 1,
        },
    }
}

/// The exit status for an error that ended a command: a class of vmhad's refusal, else 1.
fn failure(e: &anyhow::Error) -> ExitCode {
    let code = e
        .chain()
        .find_map(|c| c.downcast_ref::<vmha_api::Error>())
        .map_or(1, exit_code);
    ExitCode::from(code)
}

/// Calls a method that changes something (`$method` of `$proxy`, or its `_interactive` twin that lets
/// polkit ask the user to authenticate when the client is interactive), bounded; `$what` names it in a
/// timeout.
macro_rules! change {
    ($client:expr, $what:expr, $proxy:expr, $method:ident / $interactive:ident ( $($arg:expr),* $(,)? )) => {
        $client.changing($what, $proxy.inner().path().as_str(), async {
            if $client.interactive {
                $proxy.$interactive($($arg),*).await
            } else {
                $proxy.$method($($arg),*).await
            }
        })
    };
}

#[derive(Parser, Debug)]
#[command(
    name = "vmha",
    version,
    about = "Manage a vmha cluster of KVM hosts (through vmhad on this host)",
    after_long_help = EXIT_CODES
)]
struct Cli {
    /// Output format.
    #[arg(long, value_enum, global = true, default_value_t = Output::Human)]
    output: Output,
    /// Give up on vmhad after this many seconds (jobs: on the whole job).
    #[arg(long, global = true, default_value_t = 300)]
    timeout: u64,
    /// Let polkit ask for authentication (through your polkit authentication agent) when a change needs
    /// it. The default when standard input is a terminal.
    #[arg(long, global = true, conflicts_with = "no_interactive")]
    interactive: bool,
    /// Never let polkit ask for authentication (the default when standard input is not a terminal).
    #[arg(long, global = true)]
    no_interactive: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Cluster status: name, quorum, DC, members, hosts and VMs with where they run.
    Status,
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        command: VmCmd,
    },
    /// Hosts.
    Host {
        #[command(subcommand)]
        command: HostCmd,
    },
    /// Live-clone a running VM: its guest prepares (unless --force), its memory and disks are captured
    /// while it runs, the clones start on the target host with their own name, UUID, MAC addresses and
    /// disk overlays, become cluster resources with the template's settings and are told they are clones.
    /// Any failure rolls everything back and resumes the template.
    Clone {
        template: String,
        /// Name of the clone (with --count N: NAME-1 ... NAME-N). Default: TEMPLATE-clone.
        #[arg(long)]
        name: Option<String>,
        /// Host to start the clones on. Default: the host with the most free memory.
        #[arg(long)]
        host: Option<String>,
        /// How many clones to make from one capture.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Clone without asking the template's guest to prepare.
        #[arg(long)]
        force: bool,
    },
    /// Elastic VM groups: grow by live clones, shrink by drain and destroy.
    ///
    /// A group of the placement policy with a template, min and max
    /// ("groups": {"web": {"members": ["web1"], "template": "web1", "min": 1, "max": 4, ...}}).
    Group {
        #[command(subcommand)]
        command: GroupCmd,
    },
    /// Print cluster events and state changes as they happen.
    Watch {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Placement policy: zones, priorities, capacity, affinity (stored in the CIB, compiled into
    /// Pacemaker constraints).
    Policy {
        #[command(subcommand)]
        command: vmha_agent::placement::PolicyCmd,
    },
    /// Ask Pacemaker's scheduler, on a copy of the live CIB, what would happen if hosts failed or a VM
    /// were added; or whether every single host failure leaves every VM a place (--n-plus-one).
    WhatIf(vmha_agent::placement::WhatIfArgs),
    /// Run Pacemaker's scheduler on a CIB file (what-if's child process).
    #[command(hide = true)]
    ScheduleCopy(vmha_agent::placement::ScheduleArgs),
    /// Virtual clusters: named sets of resources, captured into an archive and instantiated elsewhere.
    /// Works on this host's CIB and libvirt directly (run it on a cluster host, as root).
    Vcluster {
        #[command(subcommand)]
        command: vmha_agent::vcluster::VclusterCmd,
    },
    /// Sites (disaster recovery with booth): tickets granted where, which virtual cluster each holds;
    /// protect a virtual cluster at the other site, switch it over, fail it over. Run it on a site host,
    /// as root.
    Site {
        #[command(subcommand)]
        command: vmha_agent::site::SiteCmd,
    },
    /// Host readiness report: fencing, quorum policy, votequorum, Corosync token, libvirt, shared
    /// storage and clocks of every host, vmhad on every host. Each item is green, yellow or red with a
    /// fix for each problem; exit status 1 when anything is red. Run it as root on a cluster host.
    Check {
        /// libvirt URI of this host's hypervisor.
        #[arg(long, default_value = "qemu:///system")]
        hypervisor: String,
    },
    /// Generate the cluster's relay key (vmhad's authentication of each other's messages), like
    /// corosync-keygen: run once on one host, then copy the file (root, mode 0600) to the same path on
    /// every host and restart vmhad there. Refuses to replace an existing key without --force.
    Keygen {
        /// Replace an existing key (every host then needs the new one).
        #[arg(long)]
        force: bool,
        /// Where to write it.
        #[arg(default_value = vmha_agent::authkey::AUTHKEY_PATH)]
        file: std::path::PathBuf,
    },
    /// Write vmha's and vmhad's manual pages or a shell completion script (for packaging).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: GenerateCmd,
    },
}

#[derive(Subcommand, Debug)]
enum GroupCmd {
    /// Every elastic group: size, bounds, template and where its members run.
    List,
    /// Bring a group to SIZE members, within its min and max.
    ///
    /// It grows by live clones of its template,
    /// one at a time, each on a host that keeps the group's anti-affinity; it shrinks by asking the
    /// newest members' guests to drain (a refusal stops the shrink there) and destroying them. The
    /// policy follows every step (new members join with the template's settings). The DC's vmhad runs it
    /// as one journaled job (D-Bus ScaleGroup): if that vmhad or its host stops midway, its restart or
    /// the next DC completes the member it was adding or removing.
    Scale {
        name: String,
        size: u32,
        /// Clone without asking the template's guest to prepare.
        #[arg(long)]
        force: bool,
        /// How long a leaving member's guest has to drain, in ms.
        #[arg(long, default_value_t = 30_000)]
        drain_timeout_ms: u32,
        /// Show the plan (members added or removed, and those taken from lower-priority groups when
        /// groups set priorities), change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Apply the groups' autoscale rules once.
    ///
    /// Measures each member's CPU load through libvirt on its
    /// host, average it per group, and scale one member up or down when the load is above cpu_above or
    /// below cpu_below (within min and max). vmha-group-autoscale.timer runs it every minute on every
    /// host with --only-on-dc, so that only the DC's host acts.
    Autoscale {
        /// Groups to evaluate (default: every group with an autoscale rule).
        names: Vec<String>,
        /// How long each measurement samples the members' CPU time, in seconds.
        #[arg(long, default_value_t = 5)]
        sample_secs: u64,
        /// Do nothing unless this host is the cluster's DC.
        #[arg(long)]
        only_on_dc: bool,
        /// Measure and decide, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// libvirt URI of this host.
        #[arg(long, default_value = "qemu:///system")]
        hypervisor: String,
        /// libvirt URI of the other hosts ({host} is the host name).
        #[arg(long, default_value = "qemu+tcp://{host}/system")]
        peer_uri: String,
        /// How long a leaving member's guest has to drain, in ms.
        #[arg(long, default_value_t = 30_000)]
        drain_timeout_ms: u32,
    },
}

#[derive(Subcommand, Debug)]
enum GenerateCmd {
    /// Write vmha.1, one vmha-<subcommand>.1 per subcommand and vmhad.8 into DIR.
    Man { dir: PathBuf },
    /// Print the completion script for SHELL on stdout.
    Completions { shell: Shell },
}

#[derive(Subcommand, Debug)]
enum VmCmd {
    /// List VMs with their state and host.
    List,
    /// Everything about one VM.
    Show { name: String },
    /// Make a VM a cluster resource from its domain XML (on storage every host sees) and start it.
    Add {
        name: String,
        /// Domain XML file (absolute path).
        #[arg(long)]
        config: String,
        /// Add it stopped.
        #[arg(long)]
        stopped: bool,
    },
    /// Stop a VM and remove its resource and constraints.
    Remove {
        name: String,
        /// Also delete the domain XML file and disk overlays (clones made by `vmha clone` only).
        #[arg(long)]
        destroy: bool,
    },
    /// Start a VM (target-role Started) and wait until it runs.
    Start { name: String },
    /// Stop a VM (target-role Stopped) and wait until it is stopped everywhere.
    Stop { name: String },
    /// Live-migrate a VM to another host.
    Move { name: String, host: String },
    /// Clear a VM's fail counts and failed operations (as `pcs resource cleanup`): Pacemaker forgets
    /// them and probes the VM again where it had failed.
    Cleanup {
        name: String,
        /// Only on this host (default: every host).
        #[arg(long)]
        host: Option<String>,
    },
    /// Send a request to a VM's guest (vmha-guest runs its hooks) and print the result: done, refused
    /// (with the guest's reason) or failed. Run it on the host where the VM runs. Exit status 0 only
    /// for done.
    Request {
        name: String,
        /// Request name, e.g. prepare-clone, drain ([a-z0-9-]{1,32}).
        request: String,
        /// Request data: a JSON object.
        #[arg(long, default_value = "{}")]
        data: String,
        /// The guest's deadline in milliseconds.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u32,
    },
}

#[derive(Subcommand, Debug)]
enum HostCmd {
    /// List hosts.
    List,
    /// Put a host in standby (its VMs move away).
    Standby { host: String },
    /// Take a host out of standby.
    Unstandby { host: String },
    /// Put a host in maintenance (Pacemaker leaves it alone) or take it out: `on` or `off`.
    Maintenance { host: String, state: OnOff },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum OnOff {
    On,
    Off,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Generate { what } = &cli.command {
        return match generate(what) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmha: {}", one_line(&e));
                failure(&e)
            }
        };
    }
    if let Cmd::ScheduleCopy(args) = &cli.command {
        return report(vmha_agent::placement::schedule(args));
    }
    if let Cmd::Keygen { force, file } = &cli.command {
        return match vmha_agent::authkey::generate(file, *force) {
            Ok(fingerprint) => {
                if cli.output == Output::Json {
                    println!(
                        "{}",
                        document("authkey", json!({ "file": file, "fingerprint": fingerprint }))
                    );
                } else {
                    println!(
                        "wrote {} (fingerprint {fingerprint}); copy it to every host (same path, root, mode \
                         0600) and restart vmhad there",
                        file.display()
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vmha: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmha: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json_out = cli.output == Output::Json;
    let limit = Duration::from_secs(cli.timeout);
    match cli.command {
        Cmd::Policy { command } => {
            return report(runtime.block_on(vmha_agent::placement::policy(command, json_out, limit)))
        }
        // `--fail-site` is a site question: answered in run(), with the other site commands.
        Cmd::WhatIf(args) if args.fail_site.is_none() => {
            return report(runtime.block_on(vmha_agent::placement::what_if(args, json_out, limit)))
        }
        _ => {}
    }
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmha: {}", one_line(&e));
            failure(&e)
        }
    }
}

/// Exit status of a command that does not go through vmhad.
fn report(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmha: {}", one_line(&e));
            failure(&e)
        }
    }
}

/// An error as one line, with a hint for the common ones.
fn one_line(e: &anyhow::Error) -> String {
    if let Some(api) = e.downcast_ref::<vmha_api::Error>() {
        // What this CLI was doing (the contexts around vmhad's error), then vmhad's error.
        let doing: Vec<String> = e
            .chain()
            .take_while(|c| c.downcast_ref::<vmha_api::Error>().is_none())
            .map(|c| printable(&c.to_string().replace('\n', " ")))
            .collect();
        let line = match api {
            vmha_api::Error::ZBus(zbus::Error::MethodError(..) | zbus::Error::FDO(_)) => {
                hint(&api.short_name(), api.message())
            }
            vmha_api::Error::ZBus(_) => printable(&api.message().replace('\n', " ")),
            vmhad => hint(vmhad.name().as_str(), printable(&vmhad.message().replace('\n', " "))),
        };
        return if doing.is_empty() {
            line
        } else {
            format!("{}: {line}", doing.join(": "))
        };
    }
    if let Some(zbus::Error::MethodError(name, message, _)) = e.downcast_ref::<zbus::Error>() {
        let msg = message.clone().unwrap_or_default();
        return hint(name.as_str(), msg);
    }
    if let Some(e) = e.downcast_ref::<zbus::fdo::Error>() {
        let name = e.name();
        return hint(name.as_str(), e.description().unwrap_or_default().to_string());
    }
    printable(&format!("{e:#}").replace('\n', " "))
}

/// A D-Bus error as a line a person can act on.
fn hint(name: &str, msg: String) -> String {
    match name {
        "org.freedesktop.DBus.Error.AccessDenied" | "org.vmha.Vmha1.Error.AccessDenied" => {
            format!(
                "{msg} (hint: run as root, or as a member of group haclient, whom the shipped polkit rule grants \
                 org.vmha.Vmha1.manage)"
            )
        }
        "org.freedesktop.DBus.Error.ServiceUnknown" | "org.freedesktop.DBus.Error.NameHasNoOwner" => {
            "vmhad is not running on this host (hint: systemctl start vmhad)".to_string()
        }
        "org.freedesktop.DBus.Error.UnknownObject" | "org.freedesktop.DBus.Error.UnknownMethod" => {
            format!("no such VM or host ({msg})")
        }
        _ => msg,
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    // Virtual clusters are CIB tags the CLI edits itself; capture and instantiate run in vmhad.
    let cli = match cli.command {
        Cmd::Vcluster { command } if command.runs_locally() => {
            return vmha_agent::vcluster::run(command, cli.output == Output::Json).await
        }
        Cmd::Site { command } if command.runs_locally() => {
            return vmha_agent::site::run(command, cli.output == Output::Json).await
        }
        Cmd::WhatIf(vmha_agent::placement::WhatIfArgs {
            fail_site: Some(site), ..
        }) => return vmha_agent::site::what_if(&site, &[], cli.output == Output::Json).await,
        _ => cli,
    };
    let limit = Duration::from_secs(cli.timeout);
    let conn = tokio::time::timeout(limit, Connection::system())
        .await
        .map_err(|_| anyhow!("the system bus did not answer within {} s", cli.timeout))?
        .context("connecting to the system bus")?;
    let client = Client {
        conn,
        limit,
        output: cli.output,
        interactive: cli.interactive || (!cli.no_interactive && std::io::stdin().is_terminal()),
    };
    match cli.command {
        Cmd::Status => client.status().await,
        Cmd::Vm { command } => match command {
            VmCmd::List => client.vm_list().await,
            VmCmd::Show { name } => client.vm_show(&name).await,
            VmCmd::Add { name, config, stopped } => {
                let cluster = client.cluster().await?;
                client
                    .job(change!(
                        client,
                        "AddVm",
                        cluster,
                        add_vm / add_vm_interactive(&name, &config, !stopped)
                    ))
                    .await
            }
            VmCmd::Remove { name, destroy } => {
                let vm = client.vm(&name).await?;
                if destroy {
                    client
                        .job(change!(client, "Destroy", vm, destroy / destroy_interactive()))
                        .await
                } else {
                    client
                        .job(change!(client, "Remove", vm, remove / remove_interactive()))
                        .await
                }
            }
            VmCmd::Start { name } => {
                let vm = client.vm(&name).await?;
                client
                    .job(change!(client, "Start", vm, start / start_interactive()))
                    .await
            }
            VmCmd::Stop { name } => {
                let vm = client.vm(&name).await?;
                client.job(change!(client, "Stop", vm, stop / stop_interactive())).await
            }
            VmCmd::Move { name, host } => {
                let vm = client.vm(&name).await?;
                client
                    .job(change!(client, "Move", vm, move_to / move_to_interactive(&host)))
                    .await
            }
            VmCmd::Cleanup { name, host } => client.vm_cleanup(&name, host.unwrap_or_default()).await,
            VmCmd::Request {
                name,
                request,
                data,
                timeout_ms,
            } => client.guest_request(&name, &request, &data, timeout_ms).await,
        },
        Cmd::Host { command } => match command {
            HostCmd::List => client.host_list().await,
            HostCmd::Standby { host } => {
                let h = client.host(&host).await?;
                change!(client, "SetStandby", h, set_standby / set_standby_interactive(true)).await?;
                client.done()
            }
            HostCmd::Unstandby { host } => {
                let h = client.host(&host).await?;
                change!(client, "SetStandby", h, set_standby / set_standby_interactive(false)).await?;
                client.done()
            }
            HostCmd::Maintenance { host, state } => {
                let h = client.host(&host).await?;
                let on = matches!(state, OnOff::On);
                change!(
                    client,
                    "SetMaintenance",
                    h,
                    set_maintenance / set_maintenance_interactive(on)
                )
                .await?;
                client.done()
            }
        },
        Cmd::Clone {
            template,
            name,
            host,
            count,
            force,
        } => {
            let cluster = client.cluster().await?;
            let (name, host) = (name.unwrap_or_default(), host.unwrap_or_default());
            client
                .job(change!(
                    client,
                    "CloneVm",
                    cluster,
                    clone_vm / clone_vm_interactive(&template, &name, &host, count, force)
                ))
                .await
        }
        Cmd::Group { command } => match command {
            GroupCmd::List => group_list(&client).await,
            GroupCmd::Scale {
                name,
                size,
                force,
                drain_timeout_ms,
                dry_run: true,
            } => group_scale_dry_run(&client, &name, size, force, drain_timeout_ms).await,
            GroupCmd::Scale {
                name,
                size,
                force,
                drain_timeout_ms,
                dry_run: false,
            } => group_scale(&client, &name, size, force, drain_timeout_ms).await,
            GroupCmd::Autoscale {
                names,
                sample_secs,
                only_on_dc,
                dry_run,
                hypervisor,
                peer_uri,
                drain_timeout_ms,
            } => {
                let how = AutoscaleHow {
                    sample: Duration::from_secs(sample_secs.clamp(1, 300)),
                    only_on_dc,
                    dry_run,
                    hypervisor,
                    peer_uri,
                    drain_ms: drain_timeout_ms,
                };
                group_autoscale(&client, &names, &how).await
            }
        },
        Cmd::Watch { count } => client.watch(count).await,
        Cmd::Check { hypervisor } => check(&client, &hypervisor).await,
        Cmd::Generate { .. } | Cmd::Keygen { .. } => {
            unreachable!("vmha generate and keygen run before the bus is reached")
        }
        Cmd::Policy { .. } | Cmd::WhatIf(_) | Cmd::ScheduleCopy(_) => {
            unreachable!("policy and what-if run before the bus is reached")
        }
        Cmd::Vcluster { command } => match command {
            VclusterCmd::Capture {
                name,
                out,
                with_disks,
                halt,
                level,
                sign,
            } => {
                client
                    .vcluster_capture(&name, &out, with_disks, halt, level, sign.as_deref())
                    .await
            }
            VclusterCmd::Instantiate {
                file,
                maps,
                name,
                allow,
                allow_agents,
                dry_run,
                wait,
                require_signature,
                trusted_keys,
            } => {
                // Categories as given, agents as agent=...: the D-Bus call's allow list.
                let mut allow = allow;
                allow.extend(allow_agents.into_iter().map(|a| format!("agent={a}")));
                vmha_vcluster::domain_check::Allow::parse(&allow).map_err(|e| anyhow!(e))?;
                // Public keys read here (the caller's files), checked, and sent as text.
                let trusted_keys = trusted_keys
                    .iter()
                    .map(|path| {
                        let what = path.display().to_string();
                        let f = std::fs::File::open(path).with_context(|| format!("opening {what}"))?;
                        let key = vmha_vcluster::signature::PublicKey::read(f, &what)?;
                        Ok((what, key.to_text()))
                    })
                    .collect::<Result<Vec<_>>>()?;
                client
                    .vcluster_instantiate(&file, maps, name, dry_run, wait, allow, require_signature, trusted_keys)
                    .await
            }
            other => vmha_agent::vcluster::run(other, client.output == Output::Json).await,
        },
        Cmd::Site { command } => client.site_protect(command).await,
    }
}

/// The elastic groups of the stored policy, with where their members run.
async fn group_list(client: &Client) -> Result<ExitCode> {
    let (_, xml, policy) = vmha_agent::placement::load(vmha_pacemaker::Access::ReadOnly).await?;
    let view = vmha_model::ClusterView::from_cib(&xml)?;
    let running = group::running(&view);
    let mut rows = Vec::new();
    for g in group::elastic_groups(&policy)? {
        let members: Vec<Value> = g
            .members
            .iter()
            .map(|m| json!({"vm": m, "host": running.get(m)}))
            .collect();
        rows.push(
            json!({"group": g.name, "size": g.members.len(), "min": g.min, "max": g.max,
            "template": g.template, "members": members}),
        );
    }
    if client.output == Output::Json {
        return client.print_json("group_list", json!({ "groups": rows }));
    }
    println!(
        "{:<16} {:>4} {:>4} {:>4}  {:<16} MEMBERS",
        "GROUP", "SIZE", "MIN", "MAX", "TEMPLATE"
    );
    for r in &rows {
        let members: Vec<String> = r["members"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| format!("{}@{}", s(m, "vm"), m["host"].as_str().unwrap_or("-")))
            .collect();
        println!(
            "{:<16} {:>4} {:>4} {:>4}  {:<16} {}",
            s(r, "group"),
            s(r, "size"),
            s(r, "min"),
            s(r, "max"),
            s(r, "template"),
            members.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The plan of scaling group `name` to `size`, checked against the CIB `xml` as the DC's vmhad checks it
/// (`Ok`: JSON and text; `Err`: the refusal, with its reason).
fn scale_plan_of(xml: &str, name: &str, size: u32, force: bool, drain_ms: u32) -> Result<(Value, String), String> {
    let spec = vmha_ops::group::ScaleSpec {
        group: name.to_string(),
        size,
        force,
        drain_ms,
    };
    let plan = vmha_ops::group::plan_of(xml, &spec).map_err(|e| e.to_string())?;
    let preempt: Vec<Value> = plan
        .preempt
        .iter()
        .map(|(g, vm)| json!({"group": g, "vm": vm}))
        .collect();
    Ok((
        json!({"group": name, "from": plan.from, "asked": size, "add": plan.add, "remove": plan.remove,
               "from_free": plan.from_free, "preempt": preempt}),
        plan.describe(),
    ))
}

/// `vmha group scale --dry-run`: the plan, read from the local CIB; nothing changes.
async fn group_scale_dry_run(client: &Client, name: &str, size: u32, force: bool, drain_ms: u32) -> Result<ExitCode> {
    let (_, xml, _) = vmha_agent::placement::load(vmha_pacemaker::Access::ReadOnly).await?;
    match scale_plan_of(&xml, name, size, force, drain_ms) {
        Ok((plan, text)) => {
            if client.output == Output::Json {
                return client.print_json("scale_plan", json!({"ok": true, "plan": plan}));
            }
            println!("{text} (dry run: nothing changed)");
            Ok(ExitCode::SUCCESS)
        }
        Err(why) => {
            if client.output == Output::Json {
                client.print_json("scale_plan", json!({"ok": false, "refused": why}))?;
                return Ok(ExitCode::FAILURE);
            }
            Err(anyhow!("{why}"))
        }
    }
}

/// `vmha group scale`: see [`GroupCmd::Scale`]. The DC's vmhad runs it as one journaled job
/// (Cluster.ScaleGroup); this follows the job and prints its summary.
async fn group_scale(client: &Client, name: &str, size: u32, force: bool, drain_ms: u32) -> Result<ExitCode> {
    let scaled = scale_group(client, name, size, force, drain_ms).await?;
    if client.output == Output::Json {
        println!("{}", document("scale", &scaled.summary));
    }
    match scaled.failure() {
        None => {
            if client.output == Output::Human {
                println!("{}", scaled.text());
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(class) if client.output == Output::Human => Err(anyhow::Error::new(class)),
        Some(class) => Ok(ExitCode::from(exit_code(&class))),
    }
}

/// A finished scale job: its summary (`group`, `from`, `asked`, `size`, `steps`, `error`), whether it
/// succeeded, its message and the class of its error.
struct Scaled {
    summary: Value,
    ok: bool,
    message: String,
    class: Option<String>,
}

impl Scaled {
    /// What happened, for people: the summary's own words (the job's message when it left no summary).
    fn text(&self) -> String {
        match serde_json::from_value::<vmha_ops::group::ScaleSummary>(self.summary.clone()) {
            Ok(summary) => summary.message(),
            Err(_) => self.message.clone(),
        }
    }

    /// The job's failure as vmhad's error of its class (message: [`Scaled::text`]), `None` when it
    /// succeeded.
    fn failure(&self) -> Option<vmha_api::Error> {
        if self.ok {
            return None;
        }
        let m = printable(&self.text());
        Some(vmha_api::Error::from_class(
            self.class.as_deref().unwrap_or("Failed"),
            m,
        ))
    }
}

/// Scales group `name` to `size` through vmhad (Cluster.ScaleGroup) and follows the job (its progress on
/// stderr). A refusal before anything changed is the error, with its class.
async fn scale_group(client: &Client, name: &str, size: u32, force: bool, drain_ms: u32) -> Result<Scaled> {
    // Each new member is a live clone, each leaving one a drain: room beyond the usual limit.
    let client = client.with_room(3600);
    let cluster = client.cluster().await?;
    let (job, ok, message) = client
        .job_result(change!(
            client,
            "ScaleGroup",
            cluster,
            scale_group / scale_group_interactive(name, size, force, drain_ms)
        ))
        .await?;
    let mut summary = client.job_details(&job).await.unwrap_or(Value::Null);
    let class = summary
        .as_object_mut()
        .and_then(|m| m.remove("error_class"))
        .and_then(|c| c.as_str().map(str::to_string));
    if summary.is_null() {
        summary = json!({"group": name, "asked": size, "error": (!ok).then_some(&message)});
    }
    Ok(Scaled {
        summary,
        ok,
        message,
        class,
    })
}

struct AutoscaleHow {
    sample: Duration,
    only_on_dc: bool,
    dry_run: bool,
    hypervisor: String,
    peer_uri: String,
    drain_ms: u32,
}

/// `vmha group autoscale`: see [`GroupCmd::Autoscale`].
async fn group_autoscale(client: &Client, names: &[String], how: &AutoscaleHow) -> Result<ExitCode> {
    let (_, xml, policy) = vmha_agent::placement::load(vmha_pacemaker::Access::ReadOnly).await?;
    let view = vmha_model::ClusterView::from_cib(&xml)?;
    let local = vmha_agent::options::system_hostname()?;
    if how.only_on_dc && view.dc.as_deref() != Some(local.as_str()) {
        if client.output == Output::Json {
            return client.print_json("autoscale", json!({ "acted": false, "why": "not the DC" }));
        }
        println!(
            "{local} is not the DC ({}): nothing to do",
            view.dc.as_deref().unwrap_or("none")
        );
        return Ok(ExitCode::SUCCESS);
    }
    let chosen: Vec<String> = if names.is_empty() {
        policy
            .groups
            .iter()
            .filter(|(_, g)| g.autoscale.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    } else {
        names.to_vec()
    };
    let running = group::running(&view);
    let mut report = Vec::new();
    let mut failed = false;
    for name in &chosen {
        let g = group::elastic(&policy, name)?;
        let rule = g
            .autoscale
            .clone()
            .ok_or_else(|| anyhow!("group {name} has no autoscale rule in the policy"))?;
        let members: BTreeMap<String, String> = g
            .members
            .iter()
            .filter_map(|m| {
                let host = running.get(m)?;
                Some((
                    m.clone(),
                    vmha_agent::autoscale::uri_for(host, &local, &how.hypervisor, &how.peer_uri),
                ))
            })
            .collect();
        if members.is_empty() {
            report.push(json!({"group": name, "decision": "none", "why": "no member runs"}));
            continue;
        }
        let loads = vmha_agent::autoscale::measure(members, how.sample).await?;
        let average = loads.values().sum::<f64>() / loads.len() as f64;
        let target = group::autoscale_size(&g, &rule, average);
        let size = g.members.len() as u32;
        if client.output == Output::Human {
            println!(
                "group {name}: {size} member(s), CPU load {average:.1}% (add above {}%, remove below {}%): {}",
                rule.cpu_above,
                rule.cpu_below,
                match target {
                    Some(t) if t > size => format!("scale up to {t}"),
                    Some(t) => format!("scale down to {t}"),
                    None => "stay".to_string(),
                }
            );
        }
        let mut entry = json!({"group": name, "size": size, "load": average, "loads": loads, "target": target});
        if let (Some(t), true) = (target, how.dry_run) {
            // What the scale would do, preemptions of lower-priority groups included.
            let plan = scale_plan_of(&xml, name, t, false, how.drain_ms);
            if client.output == Output::Human {
                match &plan {
                    Ok((_, text)) => println!("  would: {text}"),
                    Err(why) => println!("  would be refused: {why}"),
                }
            }
            entry["plan"] = match plan {
                Ok((p, _)) => p,
                Err(why) => json!({"refused": why}),
            };
        }
        if let (Some(t), false) = (target, how.dry_run) {
            let scaled = scale_group(client, name, t, false, how.drain_ms).await?;
            if client.output == Output::Human {
                match scaled.failure() {
                    None => println!("{}", scaled.text()),
                    Some(e) => eprintln!("vmha: {}", e.message()),
                }
            }
            failed |= !scaled.ok;
            entry["scale"] = scaled.summary;
        }
        report.push(entry);
    }
    if client.output == Output::Json {
        client.print_json("autoscale", json!({ "acted": true, "groups": report }))?;
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// `vmha check`: gathers (each call bounded by `--timeout`, at most 10 s), evaluates and prints.
async fn check(client: &Client, hypervisor: &str) -> Result<ExitCode> {
    use vmha_agent::check;
    let limit = client.limit.min(check::CALL_DEADLINE);
    let findings = check::evaluate(&check::gather(&client.conn, hypervisor, limit).await);
    let worst = check::worst(&findings);
    if client.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&document(
                "check",
                json!({ "ok": worst != check::Level::Red, "worst": worst, "findings": findings })
            ))?
        );
    } else {
        print!("{}", check::render(&findings));
    }
    Ok(if worst == check::Level::Red {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Manual pages and completion scripts, generated from the same clap definitions vmha and vmhad parse.
fn generate(what: &GenerateCmd) -> Result<()> {
    match what {
        GenerateCmd::Man { dir } => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), dir)
                .with_context(|| format!("writing vmha's manual pages into {}", dir.display()))?;
            let vmhad = VmhadArgs::command();
            let path = dir.join("vmhad.8");
            let mut page = Vec::new();
            clap_mangen::Man::new(vmhad).section("8").render(&mut page)?;
            std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
            let path = dir.join(vmha_resource_agents::manpage::FILE_NAME);
            std::fs::write(&path, vmha_resource_agents::manpage::render(env!("CARGO_PKG_VERSION")))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        GenerateCmd::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "vmha", &mut std::io::stdout());
        }
    }
    Ok(())
}

/// Converts a D-Bus value into JSON.
fn to_json(v: &zbus::zvariant::Value) -> Value {
    vmha_api::json::value_json(v)
}

/// The first lines of `vmha status`: the cluster's quorum, DC and members and, once vmhad has read the
/// cluster, the fencing alarm. While vmhad is still connecting it says so and raises no alarm.
fn status_header(c: &JsonCluster) -> Vec<String> {
    if c.connecting() {
        return vec![format!(
            "cluster {}: vmhad is still connecting (it has not read the CIB yet): quorum, DC and fencing unknown",
            if c.name.is_empty() { "?" } else { &c.name }
        )];
    }
    let dc = c.designated_controller.as_deref().unwrap_or_default();
    let mut lines = vec![format!(
        "cluster {}: {}, DC {}, members {}{}",
        c.name,
        if c.quorate == Some(true) {
            "quorate"
        } else {
            "NOT QUORATE"
        },
        if dc.is_empty() { "(none)" } else { dc },
        c.members.join(","),
        if c.connected {
            ""
        } else {
            " (vmhad cannot read the CIB: state may be stale)"
        }
    )];
    if c.stonith_enabled != Some(true) {
        lines.push("WARNING: fencing is disabled: a failed host's VMs may run twice".into());
    }
    lines
}

/// `vmha status --output json` (kind `status`): the snapshot plus `connecting`; while vmhad is still
/// connecting the cluster's quorum, DC and fencing are null (unknown), not false/empty.
fn status_json(snap: &Snapshot) -> vmha_api::json::Status {
    vmha_api::json::Status {
        schema_version: vmha_api::json::SCHEMA_VERSION,
        kind: "status".into(),
        connecting: snap.cluster.connecting(),
        cluster: snap.cluster.clone(),
        hosts: snap.hosts.clone(),
        vms: snap.vms.clone(),
    }
}

/// Cluster, hosts and VMs as vmhad publishes them, in the schema of `--output json`.
struct Snapshot {
    cluster: JsonCluster,
    hosts: Vec<JsonHost>,
    vms: Vec<JsonVm>,
}

fn s(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string()))
            .collect::<Vec<_>>()
            .join(","),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

struct Client {
    conn: Connection,
    limit: Duration,
    output: Output,
    /// Calls that change something carry ALLOW_INTERACTIVE_AUTHORIZATION: vmhad lets polkit ask the user
    /// to authenticate.
    interactive: bool,
}

impl Client {
    async fn bounded<T, E>(&self, what: &str, f: impl std::future::Future<Output = Result<T, E>>) -> Result<T>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        match tokio::time::timeout(self.limit, f).await {
            Ok(r) => Ok(r?),
            Err(_) => bail!("vmhad did not answer {what} within {} s", self.limit.as_secs()),
        }
    }

    /// Awaits `call`, a method that changes something (vmhad checks the caller is root or allowed by
    /// polkit; see [`change!`]): with room for polkit's interactive deadline when this client is
    /// interactive. `what` names the method in a timeout; `path` is the object called (a VM or host that
    /// has none is an unknown VM or host).
    async fn changing<T>(
        &self,
        what: &str,
        path: &str,
        call: impl std::future::Future<Output = std::result::Result<T, vmha_api::Error>>,
    ) -> Result<T> {
        let limit = if self.interactive {
            self.limit
                .max(vmha_agent::auth::POLKIT_INTERACTIVE_DEADLINE + Duration::from_secs(30))
        } else {
            self.limit
        };
        match tokio::time::timeout(limit, call).await {
            Ok(Err(e)) if e.short_name() == "org.freedesktop.DBus.Error.UnknownObject" => {
                let message = hint(&e.short_name(), e.message());
                let under = |kind: &str| path.starts_with(&format!("{ROOT_PATH}/{kind}/"));
                Err(if under("vm") {
                    vmha_api::Error::UnknownVm(message).into()
                } else if under("host") {
                    vmha_api::Error::UnknownHost(message).into()
                } else {
                    e.into()
                })
            }
            Ok(r) => Ok(r?),
            Err(_) => bail!("vmhad did not answer {what} within {} s", limit.as_secs()),
        }
    }

    /// vmhad's Cluster object.
    async fn cluster(&self) -> Result<ClusterProxy<'static>> {
        Ok(ClusterProxy::builder(&self.conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await?)
    }

    /// vmhad's object of VM `name`.
    async fn vm(&self, name: &str) -> Result<VirtualMachineProxy<'static>> {
        Ok(VirtualMachineProxy::builder(&self.conn)
            .path(vm_path(name))?
            .cache_properties(CacheProperties::No)
            .build()
            .await?)
    }

    /// vmhad's object of host `name`.
    async fn host(&self, name: &str) -> Result<HostProxy<'static>> {
        Ok(HostProxy::builder(&self.conn)
            .path(host_path(name))?
            .cache_properties(CacheProperties::No)
            .build()
            .await?)
    }

    /// The end of a method that answers at once.
    fn done(&self) -> Result<ExitCode> {
        if self.output == Output::Json {
            return self.print_json("ok", ());
        }
        Ok(ExitCode::SUCCESS)
    }

    /// Cluster properties plus every host and VM object.
    async fn snapshot(&self) -> Result<Snapshot> {
        let props = zbus::fdo::PropertiesProxy::builder(&self.conn)
            .destination(BUS_NAME)?
            .path(ROOT_PATH)?
            .build()
            .await?;
        let iface = zbus::names::InterfaceName::try_from(CLUSTER_INTERFACE)?;
        let cluster = self.bounded("GetAll", props.get_all(iface)).await?;
        let om = zbus::fdo::ObjectManagerProxy::builder(&self.conn)
            .destination(BUS_NAME)?
            .path(ROOT_PATH)?
            .build()
            .await?;
        let objects = self.bounded("GetManagedObjects", om.get_managed_objects()).await?;
        let mut hosts = Vec::new();
        let mut vms = Vec::new();
        for (_, ifaces) in objects {
            for (name, props) in ifaces {
                match name.as_str() {
                    HOST_INTERFACE => hosts.push(JsonHost::from_properties(&props)),
                    VM_INTERFACE => vms.push(JsonVm::from_properties(&props)),
                    _ => {}
                }
            }
        }
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Snapshot {
            cluster: JsonCluster::from_properties(&cluster),
            hosts,
            vms,
        })
    }

    /// Prints a document of `kind` (see [`vmha_api::json`]) made of `body`.
    fn print_json(&self, kind: &str, body: impl serde::Serialize) -> Result<ExitCode> {
        println!("{}", serde_json::to_string_pretty(&document(kind, body))?);
        Ok(ExitCode::SUCCESS)
    }

    async fn status(&self) -> Result<ExitCode> {
        let snap = self.snapshot().await?;
        if self.output == Output::Json {
            println!("{}", serde_json::to_string_pretty(&status_json(&snap))?);
            return Ok(ExitCode::SUCCESS);
        }
        for line in status_header(&snap.cluster) {
            println!("{line}");
        }
        println!();
        self.print_hosts(&snap);
        println!();
        self.print_vms(&snap);
        Ok(ExitCode::SUCCESS)
    }

    fn print_hosts(&self, snap: &Snapshot) {
        println!("{:<16} {:<9} FLAGS", "HOST", "STATE");
        for h in &snap.hosts {
            let mut flags = Vec::new();
            for (on, word) in [
                (h.is_designated_controller, "DC"),
                (h.standby, "standby"),
                (h.maintenance, "maintenance"),
            ] {
                if on {
                    flags.push(word);
                }
            }
            println!("{:<16} {:<9} {}", h.name, h.state, flags.join(","));
        }
    }

    fn print_vms(&self, snap: &Snapshot) {
        println!("{:<16} {:<10} {:<16} AGENT", "VM", "STATE", "HOST");
        for v in &snap.vms {
            println!("{:<16} {:<10} {:<16} {}", v.name, v.state, v.hosts.join(","), v.agent);
        }
    }

    async fn vm_list(&self) -> Result<ExitCode> {
        let snap = self.snapshot().await?;
        if self.output == Output::Json {
            return self.print_json("vm_list", json!({ "vms": snap.vms }));
        }
        self.print_vms(&snap);
        Ok(ExitCode::SUCCESS)
    }

    async fn host_list(&self) -> Result<ExitCode> {
        let snap = self.snapshot().await?;
        if self.output == Output::Json {
            return self.print_json("host_list", json!({ "hosts": snap.hosts }));
        }
        self.print_hosts(&snap);
        Ok(ExitCode::SUCCESS)
    }

    async fn vm_show(&self, name: &str) -> Result<ExitCode> {
        let snap = self.snapshot().await?;
        let vm = snap
            .vms
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| anyhow!("unknown VM {name}"))?;
        if self.output == Output::Json {
            return self.print_json("vm", json!({ "vm": vm }));
        }
        for (k, v) in serde_json::to_value(vm)?.as_object().into_iter().flatten() {
            let text = match v {
                Value::String(t) => t.clone(),
                Value::Array(a) if a.is_empty() => "-".into(),
                Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string()))
                    .collect::<Vec<_>>()
                    .join("; "),
                Value::Object(o) if o.is_empty() => "-".into(),
                // Health settings and status: key=value pairs.
                Value::Object(o) if k == "health" => o
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().map(printable).unwrap_or_else(|| v.to_string())))
                    .collect::<Vec<_>>()
                    .join(" "),
                other => other.to_string(),
            };
            println!("{k:<12} {text}");
        }
        Ok(ExitCode::SUCCESS)
    }

    /// A request to a VM's guest: waits for the guest's result (the guest's deadline plus a little).
    async fn guest_request(&self, vm: &str, request: &str, data: &str, timeout_ms: u32) -> Result<ExitCode> {
        let (result, reason) = self.guest_result(vm, request, data, timeout_ms).await?;
        if self.output == Output::Json {
            println!(
                "{}",
                document(
                    "guest_request",
                    json!({ "vm": vm, "request": request, "result": result, "reason": reason })
                )
            );
        } else if reason.is_empty() {
            println!("{result}");
        } else {
            println!("{result}: {}", printable(&reason));
        }
        Ok(if result == "done" {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }

    /// A request to a VM's guest: (result, reason).
    async fn guest_result(&self, vm: &str, request: &str, data: &str, timeout_ms: u32) -> Result<(String, String)> {
        let proxy = self.vm(vm).await?;
        change!(
            self,
            "GuestRequest",
            proxy,
            guest_request / guest_request_interactive(request, data, timeout_ms)
        )
        .await
    }

    /// `vmha vm cleanup`: clears the VM's failures and says where Pacemaker probes it again.
    async fn vm_cleanup(&self, name: &str, host: String) -> Result<ExitCode> {
        let vm = self.vm(name).await?;
        let probed = change!(self, "Cleanup", vm, cleanup / cleanup_interactive(&host)).await?;
        if self.output == Output::Json {
            return self.print_json("cleanup", json!({ "vm": name, "probed": probed }));
        }
        let on = if host.is_empty() {
            "every host".to_string()
        } else {
            host
        };
        if probed.is_empty() {
            println!("VM {name}: fail counts cleared on {on}");
        } else {
            println!(
                "VM {name}: fail counts cleared on {on}; probed again on {}",
                probed.join(",")
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    /// A method that returns a job (`call`, see [`change!`]): follows its progress until it finishes and
    /// prints its result.
    async fn job(&self, call: impl std::future::Future<Output = Result<OwnedObjectPath>>) -> Result<ExitCode> {
        let (job, ok, message) = self.job_result(call).await?;
        // A failed job names its error's class in its details (vmhad of this version): the exit status
        // follows it, as for a refusal.
        let class = if ok {
            None
        } else {
            self.job_details(&job)
                .await
                .ok()
                .and_then(|d| d["error_class"].as_str().map(str::to_string))
        };
        if self.output == Output::Json {
            let result = vmha_api::json::JobResult {
                schema_version: vmha_api::json::SCHEMA_VERSION,
                kind: "job".into(),
                job,
                success: ok,
                message: message.clone(),
                error_class: class.clone(),
            };
            println!("{}", serde_json::to_string(&result)?);
        } else if ok {
            println!("{}", printable(&message));
        } else {
            eprintln!("vmha: {}", printable(&message));
        }
        Ok(match (ok, class) {
            (true, _) => ExitCode::SUCCESS,
            (false, Some(class)) => ExitCode::from(exit_code(&vmha_api::Error::from_class(&class, message))),
            (false, None) => ExitCode::FAILURE,
        })
    }

    /// A method that returns a job (`call`, see [`change!`]): follows its progress (shown on stderr) until
    /// it finishes; returns the job's path, whether it succeeded and its final message.
    async fn job_result(
        &self,
        call: impl std::future::Future<Output = Result<OwnedObjectPath>>,
    ) -> Result<(String, bool, String)> {
        // Subscribe before the call so no signal of the job can be missed.
        let rule = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .sender(BUS_NAME)?
            .path_namespace(ROOT_PATH)?
            .build();
        let mut signals = MessageStream::for_match_rule(rule, &self.conn, Some(64)).await?;
        let job = call.await?;
        let deadline = tokio::time::Instant::now() + self.limit;
        let mut display = (self.output == Output::Human).then(progress::JobProgress::stderr);
        // The vmhad that answered (and runs the job).
        let owner = zbus::fdo::DBusProxy::new(&self.conn)
            .await?
            .get_name_owner(BUS_NAME.try_into()?)
            .await
            .ok()
            .map(|o| o.to_string());
        let mut liveness = tokio::time::interval(Duration::from_secs(1));
        loop {
            let next = tokio::select! {
                m = tokio::time::timeout_at(deadline, signals.next()) => m,
                _ = liveness.tick() => {
                    // A job lives in the vmhad that runs it: if that process is gone, so is the job.
                    let now = zbus::fdo::DBusProxy::new(&self.conn)
                        .await?
                        .get_name_owner(BUS_NAME.try_into()?)
                        .await
                        .ok()
                        .map(|o| o.to_string());
                    if now.is_none() || (owner.is_some() && now != owner) {
                        bail!(
                            "vmhad stopped while running {}; the job did not finish (vmhad rolls back what a \
                             clone left half done when it starts again)",
                            job.as_str()
                        );
                    }
                    continue;
                }
            };
            let msg = match next {
                Err(_) => bail!(
                    "the job {} did not finish within {} s",
                    job.as_str(),
                    self.limit.as_secs()
                ),
                Ok(None) => bail!("lost the connection to vmhad while waiting for {}", job.as_str()),
                Ok(Some(m)) => m?,
            };
            let header = msg.header();
            if header.path().map(|p| p.as_str()) != Some(job.as_str()) {
                continue;
            }
            if let Some(finished) = Finished::from_message(msg.clone()) {
                let args = finished.args()?;
                let (ok, message) = (args.success, args.message.to_string());
                if let Some(d) = display.as_mut() {
                    d.finish(ok, &message);
                }
                return Ok((job.as_str().to_string(), ok, message));
            }
            if let (Some(d), Some(changed)) = (
                display.as_mut(),
                zbus::fdo::PropertiesChanged::from_message(msg.clone()),
            ) {
                let args = changed.args()?;
                let changed = args.changed_properties();
                let fraction = changed.get("Progress").map(to_json).and_then(|p| p.as_f64());
                let message = match changed.get("Message").map(to_json) {
                    Some(Value::String(text)) => Some(text),
                    _ => None,
                };
                d.update(fraction, message.as_deref());
            }
        }
    }

    /// A finished job's details (JSON; `Null` when it left none).
    async fn job_details(&self, job: &str) -> Result<Value> {
        let proxy = JobProxy::builder(&self.conn)
            .path(job)?
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        let text = self.bounded("reading the job's details", proxy.details()).await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// This client with room for a job of `secs` seconds beyond the usual limit.
    fn with_room(&self, secs: u64) -> Client {
        Client {
            conn: self.conn.clone(),
            limit: self.limit + Duration::from_secs(secs),
            output: self.output,
            interactive: self.interactive,
        }
    }

    /// `vmha vcluster capture`: the archive is written by vmhad into a file opened here (under a
    /// temporary name renamed at the end: no half archive under FILE).
    async fn vcluster_capture(
        &self,
        name: &str,
        out: &std::path::Path,
        with_disks: bool,
        halt: bool,
        level: i32,
        sign: Option<&std::path::Path>,
    ) -> Result<ExitCode> {
        use std::os::fd::AsFd;
        if out.exists() {
            bail!("{} exists; not overwriting it", out.display());
        }
        // The key file is checked here and passed to vmhad as an open file (its bytes never go on the bus).
        let key_file = match sign {
            None => None,
            Some(path) => {
                let what = path.display().to_string();
                let mut f = std::fs::File::open(path).with_context(|| format!("opening {what}"))?;
                vmha_vcluster::signature::SecretKey::read(&f, &what)?;
                std::io::Seek::rewind(&mut f).with_context(|| format!("reading {what}"))?;
                Some(f)
            }
        };
        let partial = PathBuf::from(format!("{}.partial", out.display()));
        let file = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        let sign_fds: Vec<zbus::zvariant::Fd> = key_file.iter().map(|f| zbus::zvariant::Fd::from(f.as_fd())).collect();
        let archive = zbus::zvariant::Fd::from(file.as_fd());
        let client = self.with_room(if with_disks { 3600 } else { 0 });
        let cluster = client.cluster().await?;
        let result = client
            .job_result(change!(
                client,
                "CaptureVcluster",
                cluster,
                capture_vcluster / capture_vcluster_interactive(name, archive, with_disks, halt, level, &sign_fds)
            ))
            .await;
        drop(file);
        let (job, ok, message) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        if !ok {
            let _ = std::fs::remove_file(&partial);
            return self.job_failed(&job, &message);
        }
        std::fs::rename(&partial, out)
            .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
        let mut summary = self.job_details(&job).await?;
        summary["archive"] = json!(out);
        if self.output == Output::Json {
            println!("{}", serde_json::to_string_pretty(&document("capture", &summary))?);
        } else {
            println!("{}", vmha_agent::vcluster::capture_text(&summary, out));
        }
        Ok(ExitCode::SUCCESS)
    }

    /// `vmha site protect` with a capture (at the running site) or an instantiate (at the peer): the
    /// rsc_ticket here first, then vmhad's capture or instantiate. At the peer the instantiate does not
    /// wait for the VMs (the ticket holds them stopped); a failed one takes the rsc_ticket away again.
    async fn site_protect(&self, command: vmha_agent::site::SiteCmd) -> Result<ExitCode> {
        use vmha_agent::site::{maintenance_off, protect_here, protect_peer_begin, protect_peer_end, SiteCmd};
        let SiteCmd::Protect {
            vcluster,
            ticket,
            peer,
            loss_policy,
            archive,
            from_archive,
            maps,
            allow_unauthenticated_booth,
        } = command
        else {
            unreachable!("the other site commands run without vmhad")
        };
        if let Some(out) = archive {
            if out.exists() {
                bail!("{} exists; not overwriting it", out.display());
            }
            protect_here(
                &vcluster,
                &ticket,
                &peer,
                loss_policy,
                false,
                allow_unauthenticated_booth,
            )
            .await?;
            return self.vcluster_capture(&vcluster, &out, true, false, 1, None).await;
        }
        let Some(file) = from_archive else {
            unreachable!("a protect without archive runs without vmhad")
        };
        vmha_vcluster::Maps::parse(&maps, None).map_err(|e| anyhow!(e))?;
        std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
        // Maintenance mode while the resources exist without their rsc_ticket (Pacemaker refuses a
        // constraint on a resource that does not exist yet): nothing starts here in between.
        protect_peer_begin(&vcluster, &ticket, &peer, allow_unauthenticated_booth).await?;
        let done = self
            .vcluster_instantiate(
                &file,
                maps,
                Some(vcluster.clone()),
                false,
                0,
                Vec::new(),
                false,
                Vec::new(),
            )
            .await;
        if !matches!(done, Ok(ExitCode::SUCCESS)) {
            if let Err(e) = maintenance_off().await {
                eprintln!("vmha: {e:#}");
            }
            return done;
        }
        protect_peer_end(&vcluster, &ticket, loss_policy).await?;
        done
    }

    /// `vmha vcluster instantiate`: vmhad reads the archive from a file opened here.
    #[allow(clippy::too_many_arguments)] // the D-Bus call's arguments
    async fn vcluster_instantiate(
        &self,
        file: &std::path::Path,
        maps: Vec<String>,
        name: Option<String>,
        dry_run: bool,
        wait: u64,
        allow: Vec<String>,
        require_signature: bool,
        trusted_keys: Vec<(String, String)>,
    ) -> Result<ExitCode> {
        use std::os::fd::AsFd;
        let archive = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let wait = u32::try_from(wait).map_err(|_| anyhow!("--wait {wait} is too long"))?;
        let fd = zbus::zvariant::Fd::from(archive.as_fd());
        let name = name.unwrap_or_default();
        let maps: Vec<&str> = maps.iter().map(String::as_str).collect();
        let allow: Vec<&str> = allow.iter().map(String::as_str).collect();
        let trusted_keys: Vec<(&str, &str)> = trusted_keys.iter().map(|(w, k)| (w.as_str(), k.as_str())).collect();
        let client = self.with_room(u64::from(wait) + 3600);
        let cluster = client.cluster().await?;
        let (job, ok, message) = client
            .job_result(change!(
                client,
                "InstantiateVcluster",
                cluster,
                instantiate_vcluster
                    / instantiate_vcluster_interactive(
                        fd,
                        &maps,
                        &name,
                        dry_run,
                        wait,
                        &allow,
                        require_signature,
                        &trusted_keys
                    )
            ))
            .await?;
        let details = self.job_details(&job).await?;
        if self.output == Output::Json {
            let mut out = details.clone();
            out["success"] = json!(ok);
            out["message"] = json!(message);
            out["job"] = json!(job);
            println!("{}", serde_json::to_string_pretty(&document("instantiate", &out))?);
        } else if let Some(plan) = details["plan_text"].as_str() {
            print!("{plan}");
        }
        if !ok {
            eprintln!("vmha: {}", one_line(&anyhow!("{}", message)));
            return Ok(ExitCode::FAILURE);
        }
        if self.output == Output::Human {
            println!("{message}");
        }
        Ok(ExitCode::SUCCESS)
    }

    fn job_failed(&self, job: &str, message: &str) -> Result<ExitCode> {
        if self.output == Output::Json {
            println!(
                "{}",
                document("job", json!({ "job": job, "success": false, "message": message }))
            );
        }
        eprintln!("vmha: {}", printable(message));
        Ok(ExitCode::FAILURE)
    }

    async fn watch(&self, count: Option<usize>) -> Result<ExitCode> {
        let rule = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .sender(BUS_NAME)?
            .path_namespace(ROOT_PATH)?
            .build();
        let mut signals = MessageStream::for_match_rule(rule, &self.conn, Some(256)).await?;
        match self.output {
            Output::Human => eprintln!("watching vmha events (Ctrl-C to stop)"),
            Output::Json => println!("{}", document("event", json!({ "time": now(), "event": "watching" }))),
        }
        let mut seen = 0;
        while count.is_none_or(|c| seen < c) {
            let Some(msg) = signals.next().await else {
                bail!("lost the connection to vmhad")
            };
            let msg = msg?;
            let header = msg.header();
            let path = header.path().map(|p| p.to_string()).unwrap_or_default();
            let member = header.member().map(|m| m.to_string()).unwrap_or_default();
            let event = if let Some(e) = Event::from_message(msg.clone()) {
                let a = e.args()?;
                json!({ "time": now(), "event": a.kind, "subject": a.subject, "message": a.message })
            } else if member == "PropertiesChanged" {
                let (iface, changed, _): (String, HashMap<String, OwnedValue>, Vec<String>) =
                    msg.body().deserialize()?;
                json!({ "time": now(), "event": "changed", "object": path, "interface": iface,
                        "properties": vmha_api::json::properties_json(&changed) })
            } else {
                json!({ "time": now(), "event": member, "object": path })
            };
            if self.output == Output::Json {
                println!("{}", document("event", &event));
            } else if member == "Event" {
                println!(
                    "{:.3} {} {} {}",
                    event["time"].as_f64().unwrap_or(0.0),
                    s(&event, "event"),
                    printable(&s(&event, "subject")),
                    printable(&s(&event, "message"))
                );
            } else {
                println!(
                    "{:.3} {member} {path} {}",
                    event["time"].as_f64().unwrap_or(0.0),
                    event["properties"]
                );
            }
            seen += 1;
        }
        Ok(ExitCode::SUCCESS)
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Cluster interface's properties as vmhad publishes them.
    fn cluster_props(pairs: Vec<(&str, zbus::zvariant::Value<'static>)>) -> HashMap<String, OwnedValue> {
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), OwnedValue::try_from(v).unwrap()))
            .collect()
    }

    fn fresh_vmhad() -> HashMap<String, OwnedValue> {
        // What a just-started vmhad publishes before it read the CIB: defaults.
        use zbus::zvariant::Value as V;
        cluster_props(vec![
            ("Name", V::from("")),
            ("Quorate", V::from(false)),
            ("DesignatedController", V::from("")),
            ("Members", V::from(Vec::<String>::new())),
            ("StonithEnabled", V::from(false)),
            ("Connected", V::from(false)),
            ("CibVersion", V::from("")),
        ])
    }

    fn lab(quorate: bool, dc: &str, members: Vec<&str>, stonith: bool, connected: bool) -> JsonCluster {
        use zbus::zvariant::Value as V;
        JsonCluster::from_properties(&cluster_props(vec![
            ("Name", V::from("lab")),
            ("Quorate", V::from(quorate)),
            ("DesignatedController", V::from(dc.to_string())),
            (
                "Members",
                V::from(members.into_iter().map(str::to_string).collect::<Vec<_>>()),
            ),
            ("StonithEnabled", V::from(stonith)),
            ("Connected", V::from(connected)),
            ("CibVersion", V::from("0.12.3")),
        ]))
    }

    #[test]
    fn a_connecting_vmhad_is_reported_as_connecting_without_alarms() {
        let lines = status_header(&JsonCluster::from_properties(&fresh_vmhad()));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("still connecting"), "{lines:?}");
        let text = lines.join("\n");
        assert!(!text.contains("NOT QUORATE"), "{text}");
        assert!(!text.contains("fencing is disabled"), "{text}");
        assert!(!text.contains("DC (none)"), "{text}");
    }

    #[test]
    fn a_connected_cluster_without_quorum_or_fencing_raises_both_alarms() {
        let lines = status_header(&lab(false, "", vec!["node1"], false, true));
        assert_eq!(lines[0], "cluster lab: NOT QUORATE, DC (none), members node1");
        assert_eq!(
            lines[1],
            "WARNING: fencing is disabled: a failed host's VMs may run twice"
        );
    }

    #[test]
    fn a_lost_cib_after_a_read_is_stale_not_connecting() {
        let lines = status_header(&lab(true, "node1", vec!["node1", "node2"], true, false));
        assert_eq!(
            lines,
            vec!["cluster lab: quorate, DC node1, members node1,node2 (vmhad cannot read the CIB: state may be stale)"]
        );
    }

    #[test]
    fn status_json_marks_connecting_and_unknown_quorum_in_snake_case() {
        let snap = Snapshot {
            cluster: JsonCluster::from_properties(&fresh_vmhad()),
            hosts: vec![],
            vms: vec![],
        };
        let out = serde_json::to_value(status_json(&snap)).unwrap();
        assert_eq!(out["schema_version"], json!(vmha_api::json::SCHEMA_VERSION));
        assert_eq!(out["kind"], json!("status"));
        assert_eq!(out["connecting"], json!(true));
        assert_eq!(out["cluster"]["quorate"], Value::Null);
        assert_eq!(out["cluster"]["stonith_enabled"], Value::Null);
        assert_eq!(out["cluster"]["designated_controller"], Value::Null);
        let snap = Snapshot {
            cluster: lab(false, "", vec![], false, true),
            hosts: vec![],
            vms: vec![],
        };
        let out = serde_json::to_value(status_json(&snap)).unwrap();
        assert_eq!(out["connecting"], json!(false));
        assert_eq!(out["cluster"]["quorate"], json!(false));
        let back: vmha_api::json::Status = serde_json::from_value(out).unwrap();
        assert_eq!(back.cluster.name, "lab");
    }

    /// Every property of the shipped Cluster, Host and VirtualMachine interfaces has its member in the
    /// JSON schema (a property added to D-Bus without a member in `vmha_api::json` fails here), and every
    /// member is made from a property that exists.
    #[test]
    fn the_json_schema_covers_every_dbus_property() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/dbus/interfaces");
        for (file, listed, member_names) in [
            (
                "org.vmha.Vmha1.Cluster.xml",
                vmha_api::json::CLUSTER_PROPERTIES,
                serde_json::to_value(JsonCluster::default()).unwrap(),
            ),
            (
                "org.vmha.Vmha1.Host.xml",
                vmha_api::json::HOST_PROPERTIES,
                serde_json::to_value(JsonHost::default()).unwrap(),
            ),
            (
                "org.vmha.Vmha1.VirtualMachine.xml",
                vmha_api::json::VM_PROPERTIES,
                serde_json::to_value(JsonVm::default()).unwrap(),
            ),
        ] {
            let xml = std::fs::read_to_string(dir.join(file)).unwrap();
            let mut served: Vec<String> = xml
                .split("<property name=\"")
                .skip(1)
                .map(|rest| rest.split('"').next().unwrap().to_string())
                .collect();
            served.sort();
            let mut ours: Vec<String> = listed.iter().map(|p| p.to_string()).collect();
            ours.sort();
            assert_eq!(served, ours, "{file}: properties and the JSON schema's list differ");
            let mut members: Vec<String> = member_names.as_object().unwrap().keys().cloned().collect();
            members.sort();
            let mut snake: Vec<String> = listed.iter().map(|p| vmha_api::json::snake_case(p)).collect();
            snake.sort();
            assert_eq!(
                members, snake,
                "{file}: the JSON members are not the snake_case properties"
            );
        }
    }

    #[test]
    fn every_class_of_refusal_has_its_own_exit_status() {
        use vmha_api::Error as E;
        let all = [
            E::UnknownVm(String::new()),
            E::UnknownHost(String::new()),
            E::UnknownGroup(String::new()),
            E::NotQuorate(String::new()),
            E::NotReady(String::new()),
            E::AccessDenied(String::new()),
            E::InvalidArgument(String::new()),
            E::Conflict(String::new()),
            E::GuestRefused(String::new()),
            E::GuestUnreachable(String::new()),
            E::Libvirt(String::new()),
            E::Cib(String::new()),
            E::Failed(String::new()),
        ];
        assert_eq!(all.len(), vmha_api::Error::NAMES.len());
        let codes: std::collections::BTreeSet<u8> = all.iter().map(exit_code).collect();
        assert_eq!(codes.len(), all.len(), "{codes:?}");
        assert!(
            !codes.contains(&0) && !codes.contains(&2),
            "0 is success, 2 is clap's usage error"
        );
        for e in &all {
            let code = exit_code(e);
            let short = e.short_name();
            assert!(
                EXIT_CODES
                    .lines()
                    .any(|l| l.trim_start().starts_with(&format!("{code} ")) && (code == 1 || l.contains(&short))),
                "exit status {code} ({short}) is not documented in EXIT_CODES"
            );
        }
        assert_eq!(exit_code(&E::Failed("x".into())), 1);
    }

    #[test]
    fn a_scale_job_reads_as_its_summary_and_fails_with_its_error_class() {
        let summary = json!({"group": "web", "from": 3, "asked": 2, "size": 3, "steps": [],
            "error": "web-2's guest refused to drain: sessions still open; it stays in the group"});
        let refused = Scaled {
            summary: summary.clone(),
            ok: false,
            message: "run by vmhad on node2, the DC: ...".into(),
            class: Some("GuestRefused".into()),
        };
        let e = refused.failure().unwrap();
        assert_eq!(exit_code(&e), 11);
        assert_eq!(
            one_line(&anyhow::Error::new(e)),
            "group web: web-2's guest refused to drain: sessions still open; it stays in the group \
             (the group has 3 members; asked for 2)"
        );
        // From a vmhad that gives no class: a plain failure.
        let unclassed = Scaled { class: None, ..refused };
        assert_eq!(exit_code(&unclassed.failure().unwrap()), 1);
        let grown = Scaled {
            summary: json!({"group": "web", "from": 1, "asked": 3, "size": 3, "error": null,
                "steps": [{"added": "web-1", "host": "h2"}, {"added": "web-2", "host": "h3"}]}),
            ok: true,
            message: String::new(),
            class: None,
        };
        assert!(grown.failure().is_none());
        assert_eq!(grown.text(), "group web: 1 -> 3 members");
        // No summary (the job's object went away): the job's message.
        let bare = Scaled {
            summary: json!({"group": "web", "asked": 3, "error": "lost"}),
            ok: false,
            message: "vmhad is stopping".into(),
            class: None,
        };
        assert_eq!(bare.text(), "vmhad is stopping");
    }

    #[test]
    fn vmhads_refusals_are_one_line_with_their_message_and_a_hint() {
        let denied = anyhow::Error::new(vmha_api::Error::AccessDenied(
            "stop VM vm1: uid 1001 is not root and polkit does not allow org.vmha.Vmha1.manage".into(),
        ));
        let line = one_line(&denied);
        assert!(line.starts_with("stop VM vm1: uid 1001 is not root"), "{line}");
        assert!(line.contains("hint: run as root"), "{line}");
        let unknown = anyhow::Error::new(vmha_api::Error::UnknownVm("unknown VM vm9".into())).context("while scaling");
        assert_eq!(one_line(&unknown), "while scaling: unknown VM vm9");
        assert_eq!(failure(&unknown), ExitCode::from(5));
        assert_eq!(failure(&anyhow!("no vmhad error")), ExitCode::from(1));
    }
}
