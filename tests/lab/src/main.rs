//! `vmha-lab`: bring up, use and tear down the vmha lab from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Result};
use clap::{Parser, Subcommand};
use vmha_lab::guest::GuestSpec;
use vmha_lab::lab::{target_binary, VmAgent};
use vmha_lab::{power, wait_for, Lab, LabConfig};

#[derive(Parser, Debug)]
#[command(
    name = "vmha-lab",
    about = "A multi-host KVM cluster (Corosync, Pacemaker, libvirtd, QEMU) in namespaces on this machine"
)]
struct Cli {
    /// Lab name (several labs can run side by side).
    #[arg(long, global = true, default_value = "demo")]
    lab: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Bring a lab up (reusing it when it already runs healthy) and print the cluster status.
    Up {
        #[arg(long, default_value_t = 3)]
        hosts: u8,
        /// First three octets of the lab-only subnet.
        #[arg(long, default_value = "10.213.0")]
        subnet: String,
        /// Corosync token timeout in ms (token_coefficient 0).
        #[arg(long, default_value_t = 1000)]
        token: u32,
    },
    /// The main job: a 3-host lab with vmha's Debian package installed in every host (dpkg -i) and two VMs
    /// running as cluster resources; prints the cluster status. Running it again is harmless.
    Demo {
        /// vmha's .deb (default: the newest target/packages/vmha_*.deb, made by ci/build-packages).
        #[arg(long)]
        package: Option<PathBuf>,
        /// The lab's subnet (first three octets).
        #[arg(long, default_value = "10.213.0")]
        subnet: String,
        /// Resource agent for the VMs.
        #[arg(long, value_enum, default_value_t = AgentArg::Vmha)]
        agent: AgentArg,
    },
    /// Print the cluster status (hosts, DC, VMs and where they run).
    Status,
    /// Tear the lab down (every process by PID, then its namespaces).
    Down,
    /// Run a command on host N.
    Exec {
        host: u8,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Hard power-off of host N (no fencing involved).
    PowerOff { host: u8 },
    /// Power host N on.
    PowerOn { host: u8 },
    /// Unplug host N's network cable.
    Cut { host: u8 },
    /// Plug host N's network cable back in.
    Heal { host: u8 },
    /// Copy every daemon log of the lab into a directory.
    Logs { dest: PathBuf },
    /// (internal) The lab's power controller daemon.
    #[command(hide = true)]
    PowerController,
    /// (internal) The fence agent, as run by Pacemaker's fencer inside a host.
    #[command(hide = true)]
    FenceAgent {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum AgentArg {
    /// ocf:vmha:VirtualMachine
    Vmha,
    /// ocf:heartbeat:VirtualDomain
    VirtualDomain,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::FenceAgent { args } = &cli.command {
        // The fencer reads stdout: no log output here.
        return match LabConfig::load(&cli.lab) {
            Ok(cfg) => ExitCode::from(power::fence_agent(&cfg, args) as u8),
            Err(e) => {
                eprintln!("fence_vmha_lab: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    vmha_lab::init_logging();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vmha-lab: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn host_arg(lab: &Lab, n: u8) -> Result<u8> {
    if (1..=lab.cfg.hosts).contains(&n) {
        Ok(n)
    } else {
        Err(anyhow!(
            "lab {} has hosts 1 to {}, not {n}",
            lab.cfg.name,
            lab.cfg.hosts
        ))
    }
}

fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Cmd::Up { hosts, subnet, token } => {
            let mut cfg = LabConfig::new(&cli.lab, hosts, &subnet);
            cfg.token_ms = Some(token);
            let lab = Lab::ensure_up(cfg)?;
            print!("{}", lab.status_from_any()?.render(&lab.cfg.name));
        }
        Cmd::Demo { package, subnet, agent } => demo(&cli.lab, &subnet, package, agent)?,
        Cmd::Status => {
            let lab = Lab::attach_named(&cli.lab)?;
            print!("{}", lab.status_from_any()?.render(&lab.cfg.name));
        }
        Cmd::Down => {
            match LabConfig::load(&cli.lab) {
                Ok(cfg) => Lab::attach(cfg)?.down()?,
                Err(_) => println!("no lab named {} on this machine", cli.lab),
            }
            println!("lab {} is down", cli.lab);
        }
        Cmd::Exec { host, command } => {
            let lab = Lab::attach_named(&cli.lab)?;
            let code = lab.exec_interactive(host_arg(&lab, host)?, &command)?;
            return Ok(u8::try_from(code).unwrap_or(1));
        }
        Cmd::PowerOff { host } => {
            let lab = Lab::attach_named(&cli.lab)?;
            lab.power_off(host_arg(&lab, host)?)?;
        }
        Cmd::PowerOn { host } => {
            let lab = Lab::attach_named(&cli.lab)?;
            lab.power_on(host_arg(&lab, host)?)?;
        }
        Cmd::Cut { host } => {
            let lab = Lab::attach_named(&cli.lab)?;
            lab.cut_network(host_arg(&lab, host)?)?;
        }
        Cmd::Heal { host } => {
            let lab = Lab::attach_named(&cli.lab)?;
            lab.heal_network(host_arg(&lab, host)?)?;
        }
        Cmd::Logs { dest } => {
            let lab = Lab::attach_named(&cli.lab)?;
            println!("{}", lab.collect_logs(&dest)?.display());
        }
        Cmd::PowerController => power::serve(LabConfig::load(&cli.lab)?)?,
        Cmd::FenceAgent { .. } => unreachable!("handled before logging starts"),
    }
    Ok(0)
}

fn demo(name: &str, subnet: &str, package: Option<PathBuf>, agent: AgentArg) -> Result<()> {
    let lab = Lab::ensure_up(LabConfig::new(name, 3, subnet))?;
    let agent = match agent {
        AgentArg::Vmha => {
            let deb = match package {
                Some(p) => p,
                None => {
                    let release = target_binary("vmha-ocf-virtualmachine")?;
                    let target = release
                        .parent()
                        .and_then(|r| r.parent())
                        .ok_or_else(|| anyhow!("no target directory"))?;
                    vmha_lab::package::newest_package(&target.join("packages"), "vmha")?
                }
            };
            let hosts = lab.install_package(&[&deb])?;
            println!("installed {} into {} (dpkg -i)", deb.display(), hosts.join(", "));
            for n in lab.cfg.host_numbers() {
                lab.start_vmhad(n)?;
            }
            println!("vmhad runs on every host");
            VmAgent::Vmha
        }
        AgentArg::VirtualDomain => VmAgent::VirtualDomain,
    };
    let vms = ["vm1", "vm2"];
    for vm in vms {
        lab.add_vm(&GuestSpec::new(vm), agent)?;
    }
    let status = wait_for(
        "both VMs running",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let s = lab.status_from_any().ok()?;
            vms.iter().all(|vm| s.running_on(vm).is_some()).then_some(s)
        },
    )?;
    println!();
    print!("{}", status.render(&lab.cfg.name));
    if lab
        .exec(1, &["test", "-x", "/usr/bin/vmha"])
        .is_ok_and(|o| o.status.success())
    {
        println!("\n$ vmha status   (on node1, through vmhad's D-Bus API)");
        let out = lab.exec(1, &["vmha", "status"])?;
        print!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("\nrun a command on a host:  vmha-lab --lab {name} exec 1 -- crm_mon -1");
    println!("tear down:                vmha-lab --lab {name} down");
    Ok(())
}
