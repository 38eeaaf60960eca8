//! The resource agent's environment (set by Pacemaker from the resource's configuration, which anyone
//! who may edit the CIB controls; the agent runs as root): `Params::parse` (instance parameters, strict
//! and lenient), `OcfEnv::from_lookup` (operation timeout, interval, check level, migration peers), and
//! what the agent derives from them before touching libvirt: deadlines and the migration plan.
//!
//! The input is `KEY=VALUE` lines; a key without the `OCF_` prefix is an instance parameter
//! (`OCF_RESKEY_<key>`). No process environment is read.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use vmha_resource_agents::deadline::{graceful_shutdown_budget, migration_budget, working_budget, Deadline};
use vmha_resource_agents::migration;
use vmha_resource_agents::ocf::{Action, OcfEnv};
use vmha_resource_agents::params::{Params, Strictness};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let env: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let key = if k.starts_with("OCF_") {
                k.to_string()
            } else {
                format!("OCF_RESKEY_{k}")
            };
            (key, v.to_string())
        })
        .collect();
    let get = |k: &str| env.get(k).cloned();

    let ocf = OcfEnv::from_lookup(get);
    let _ = ocf.is_probe();
    for strictness in [Strictness::Strict, Strictness::Lenient] {
        let Ok(parsed) = Params::parse(get, strictness) else {
            continue;
        };
        let params = parsed.params;
        if strictness == Strictness::Strict {
            assert!(parsed.ignored.is_empty(), "strict parsing ignored {:?}", parsed.ignored);
        }
        let domain = params.domain.clone().unwrap_or_else(|| "vm".into());
        let _ = params.state_file(&domain);
        for action in Action::ALL {
            // As main.rs does for every action, then stop and migrate_to.
            let budget = working_budget(ocf.timeout_for(action));
            let deadline = Deadline::after(budget);
            let _ = deadline.minus(budget / 3);
            let _ = graceful_shutdown_budget(budget, params.shutdown_timeout);
            let _ = migration_budget(budget);
        }
        if let Some(target) = &ocf.migrate_target {
            for persistent in [false, true] {
                let _ = migration::plan(&params.hypervisor, &params.migration, target, persistent);
            }
        }
    }
});
