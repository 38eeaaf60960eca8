/* cockpit-vmha: vmha's cluster in Cockpit.
 *
 * The whole back end is vmhad (org.vmha.Vmha1 on the system bus, see docs/dbus-api.md), reached through
 * Cockpit's own D-Bus client (../base1/cockpit.js): proxies follow the Cluster, Host, VirtualMachine and Job
 * objects (their PropertiesChanged and the ObjectManager's added/removed objects; the Cluster's
 * VirtualClusters and ElasticGroups properties among them), and the Cluster's Event and GuestMessage
 * signals feed the event list. Nothing is polled. vmhad decides who may act (root, or
 * polkit's org.vmha.Vmha1.manage): this page only asks, and shows vmhad's refusal as it came.
 *
 * Plain JavaScript that runs as it is in the browser: no build step.
 */
"use strict";

(function () {
    const BUS = "org.vmha.Vmha1";
    const ROOT = "/org/vmha/Vmha1";
    const IFACE = {
        cluster: BUS + ".Cluster",
        host: BUS + ".Host",
        vm: BUS + ".VirtualMachine",
        job: BUS + ".Job",
    };
    const MAX_EVENTS = 100;

    let client = null;
    let cluster = null;
    let hosts = {};
    let vms = {};
    let jobs = {};
    /* Jobs seen on the bus, kept after vmhad drops their objects: path -> {Kind, Target, State, ...}. */
    const jobLog = new Map();
    /* The guest channel as this page saw it: VM name -> {kind, at}. */
    const guests = new Map();
    /* The hosts' readiness reports (what `vmha check` reads): host name -> report. Asked for when the page
       loads and again on every cluster event; vmhad sends no signal for them. */
    const readiness = new Map();
    let readinessAsked = false;
    let renderQueued = false;

    function $(id) {
        return document.getElementById(id);
    }

    /* An element with attributes (attrs) and children (strings become text nodes, never HTML). */
    function el(tag, attrs, ...children) {
        const e = document.createElement(tag);
        for (const [k, v] of Object.entries(attrs || {})) {
            if (v === undefined || v === null || v === false)
                continue;
            if (k === "class")
                e.className = v;
            else if (k.startsWith("on"))
                e.addEventListener(k.substring(2), v);
            else if (k in e && typeof v !== "string")
                e[k] = v;
            else
                e.setAttribute(k, v === true ? "" : String(v));
        }
        for (const c of children.flat()) {
            if (c === undefined || c === null || c === false)
                continue;
            e.append(c instanceof Node ? c : document.createTextNode(String(c)));
        }
        return e;
    }

    function sortedValues(proxies) {
        return Object.values(proxies || {}).filter(p => p.valid !== false && p.Name !== undefined)
                .sort((a, b) => String(a.Name).localeCompare(String(b.Name)));
    }

    function hostNames() {
        return sortedValues(hosts).map(h => h.Name);
    }

    /* A D-Bus error as people read it: vmhad's message and its class (org.vmha.Vmha1.Error.<Class>). */
    function describeError(ex) {
        const name = (ex && ex.name) ? String(ex.name) : "";
        const message = (ex && ex.message) ? String(ex.message) : String(ex);
        const cls = name.startsWith(BUS + ".Error.") ? name.substring(BUS.length + 7) : name;
        return cls ? `${message} (${cls})` : message;
    }

    function notice(text, kind) {
        const n = $("notice");
        n.textContent = text;
        n.dataset.kind = kind || "info";
        n.hidden = !text;
    }

    /* --------------------------------------------------------------------------------- rendering */

    function queueRender() {
        if (renderQueued)
            return;
        renderQueued = true;
        window.requestAnimationFrame(() => {
            renderQueued = false;
            render();
        });
    }

    function render() {
        renderCluster();
        /* Keep keyboard focus where it was across the re-render (buttons carry a data-key). */
        const focused = document.activeElement && document.activeElement.dataset
            ? document.activeElement.dataset.key : null;
        renderHosts();
        renderVclusters();
        renderGroups();
        renderJobs();
        fillWhatIfHosts();
        if (focused) {
            const again = document.querySelector(`[data-key="${CSS.escape(focused)}"]`);
            if (again)
                again.focus();
        }
        $("app").setAttribute("aria-busy", "false");
    }

    function renderCluster() {
        if (!cluster || !cluster.valid) {
            $("cluster-connected").textContent = "vmhad does not answer on this host";
            $("cluster-connected").dataset.state = "bad";
            return;
        }
        $("cluster-name").textContent = cluster.Name || "(unnamed)";
        const connected = cluster.Connected;
        $("cluster-connected").textContent = connected ? "connected to the cluster" : "still connecting";
        $("cluster-connected").dataset.state = connected ? "good" : "warn";
        const q = $("cluster-quorum");
        q.textContent = !connected ? "unknown" : (cluster.Quorate ? "quorate" : "no quorum");
        q.dataset.state = !connected ? "unknown" : (cluster.Quorate ? "good" : "bad");
        $("cluster-dc").textContent = cluster.DesignatedController || "none";
        $("cluster-stonith").textContent = cluster.StonithEnabled ? "enabled" : "disabled";
        $("cluster-stonith").dataset.state = cluster.StonithEnabled ? "good" : "warn";
    }

    function vmsOn(host) {
        return sortedValues(vms).filter(v => (v.Hosts || []).includes(host));
    }

    function number(s) {
        const n = parseFloat(s);
        return Number.isFinite(n) ? n : 0;
    }

    /* Capacity bars: each utilization the host offers, and what its running VMs take of it. */
    function capacity(host) {
        const offered = host.Utilization || {};
        const keys = Object.keys(offered).sort();
        if (keys.length === 0)
            return el("p", { class: "muted" }, "No capacity set for this host.");
        const running = vmsOn(host.Name);
        return el("div", { class: "capacity" }, keys.map(k => {
            const max = number(offered[k]);
            const used = running.reduce((sum, v) => sum + number((v.Utilization || {})[k]), 0);
            const id = `cap-${host.Name}-${k}`;
            const unit = k.includes("memory") ? " MiB" : "";
            return el("div", { class: "bar" },
                      el("label", { for: id }, `${k}: ${used} of ${max}${unit}`),
                      el("meter", {
                          id,
                          min: "0",
                          max: String(max || 1),
                          value: String(used),
                          high: String(max * 0.8),
                          optimum: "0",
                          "data-used": String(used),
                          "data-max": String(max),
                      }));
        }));
    }

    function refreshReadiness() {
        if (readinessAsked)
            return;
        readinessAsked = true;
        client.call(ROOT + "/readiness", BUS + ".Readiness", "Reports", [], { type: "" })
                .then(([json]) => {
                    readiness.clear();
                    let reports = [];
                    try {
                        reports = JSON.parse(json);
                    } catch (e) {
                        reports = [];
                    }
                    for (const r of Array.isArray(reports) ? reports : []) {
                        if (r && typeof r.host === "string")
                            readiness.set(r.host, r);
                    }
                    queueRender();
                })
                .catch(ex => console.warn("readiness reports:", describeError(ex)))
                .finally(() => {
                    readinessAsked = false;
                });
    }

    /* One line on a host's readiness: its clock, and whether it sees the managed VMs' storage. */
    function readinessLine(name) {
        const r = readiness.get(name);
        if (!r)
            return el("p", { class: "readiness muted", "data-field": "readiness" }, "Readiness: no report");
        const clock = r.clock || {};
        const synced = clock.synchronized === true ? "synchronized" : clock.synchronized === false ? "not synchronized" : "unknown";
        const offset = Number.isFinite(r.offset_ms) ? `, offset ${r.offset_ms} ms` : "";
        const paths = Array.isArray(r.storage) ? r.storage : [];
        const missing = paths.filter(p => p.exists !== true);
        /* Today's vmhad lists only the paths it does not see and counts them all in storage_summary; an
           older one listed every path (the first 256). */
        const summary = r.storage_summary;
        const total = summary ? summary.paths : paths.length;
        const unseen = summary ? summary.problems : missing.length;
        const sweeping = summary && summary.looked_at < summary.vms;
        const ok = clock.synchronized === true && unseen === 0 && !sweeping;
        let storage;
        if (unseen > 0)
            storage = `${unseen} of ${total} paths not visible: ${missing.slice(0, 3).map(p => p.path).join(", ")}${unseen > 3 ? ", …" : ""}`;
        else if (sweeping)
            storage = `looked at ${summary.looked_at} of ${summary.vms} VMs so far, all ${total} paths visible`;
        else
            storage = `${total} of ${total} paths visible`;
        return el("p", { class: "readiness", "data-field": "readiness", "data-state": ok ? "good" : "warn" },
                  `Clock ${synced} (${clock.ntp_daemon || "no NTP daemon"}${offset}); storage: ${storage}`);
    }

    function stateBadge(state) {
        return el("span", { class: "badge", "data-state": state || "unknown" }, state || "unknown");
    }

    function guestLine(vm) {
        const seen = guests.get(vm.Name);
        if (!seen)
            return "no message seen";
        return `${seen.kind} at ${seen.at.toLocaleTimeString()}`;
    }

    /* The VM's health monitoring as vmhad's Health property reads it (settings, and heartbeats and the
       application's verdict as the vmhad of this host sees them). The property sends no PropertiesChanged:
       it is read again when an event or a guest message about the VM arrives. */
    const health = new Map();

    function refreshHealth(name) {
        const vm = sortedValues(vms).find(v => v.Name === name);
        if (!vm)
            return;
        client.call(vm.path, "org.freedesktop.DBus.Properties", "Get", [IFACE.vm, "Health"], { type: "ss" })
                .then(([variant]) => {
                    health.set(name, (variant && variant.v) || {});
                    queueRender();
                })
                .catch(ex => console.warn("health of", name, describeError(ex)));
    }

    function healthLine(vm) {
        const h = health.get(vm.Name) || vm.Health || {};
        if (h.monitoring !== "on")
            return "not monitored";
        const parts = [];
        if (h.heartbeats)
            parts.push(`heartbeats ${h.heartbeats}` +
                       (h.last_heartbeat_ms_ago ? ` (last ${h.last_heartbeat_ms_ago} ms ago)` : ""));
        if (h.application)
            parts.push(`application ${h.application}` + (h.application_reason ? `: ${h.application_reason}` : ""));
        return "monitored" + (parts.length ? ": " + parts.join(", ") : " (seen from another host)");
    }

    function vmCard(vm) {
        const failedOn = vm.FailedOn || [];
        const counts = Object.entries(vm.FailCounts || {}).filter(([, n]) => n > 0);
        const failures = failedOn.length || counts.length
            ? failedOn.join(", ") + (counts.length ? ` (${counts.map(([h, n]) => `${h}: ${n}`).join(", ")})` : "")
            : "none";
        const running = vm.State === "running";
        const name = vm.Name;
        return el("article", { class: "vm", "data-vm": name, "data-state": vm.State, "aria-label": `VM ${name}` },
                  el("h4", {}, name, " ", stateBadge(vm.State)),
                  el("dl", { class: "vm-facts" },
                     el("div", {}, el("dt", {}, "Host"), el("dd", {}, (vm.Hosts || []).join(", ") || "none")),
                     el("div", {}, el("dt", {}, "Failures"), el("dd", { "data-field": "failures" }, failures)),
                     el("div", {}, el("dt", {}, "Guest channel"), el("dd", { "data-field": "guest" }, guestLine(vm))),
                     el("div", {}, el("dt", {}, "Health"), el("dd", { "data-field": "health" }, healthLine(vm))),
                     el("div", {}, el("dt", {}, "Agent"), el("dd", {}, vm.Agent || "?"))),
                  el("div", { class: "actions", role: "group", "aria-label": `Actions for VM ${name}` },
                     el("button", {
                         type: "button",
                         "data-key": `vm-start-${name}`,
                         "data-action": "start",
                         "aria-label": `Start VM ${name}`,
                         disabled: running,
                         onclick: () => confirmVm(vm, "Start"),
                     }, "Start"),
                     el("button", {
                         type: "button",
                         "data-key": `vm-stop-${name}`,
                         "data-action": "stop",
                         "aria-label": `Stop VM ${name}`,
                         disabled: vm.State === "stopped",
                         onclick: () => confirmVm(vm, "Stop"),
                     }, "Stop"),
                     el("button", {
                         type: "button",
                         "data-key": `vm-move-${name}`,
                         "data-action": "move",
                         "aria-label": `Move VM ${name} to another host`,
                         onclick: () => confirmMove(vm),
                     }, "Move…"),
                     el("button", {
                         type: "button",
                         "data-key": `vm-cleanup-${name}`,
                         "data-action": "cleanup",
                         "aria-label": `Clear the failures of VM ${name}`,
                         onclick: () => confirmCleanup(vm),
                     }, "Clear failures"),
                     el("button", {
                         type: "button",
                         "data-key": `vm-clone-${name}`,
                         "data-action": "clone",
                         "aria-label": `Live clone VM ${name}`,
                         onclick: () => confirmClone(vm),
                     }, "Clone…")));
    }

    function hostColumn(host) {
        const name = host.Name;
        const flags = [];
        if (host.IsDesignatedController)
            flags.push(el("span", { class: "badge", "data-state": "dc", title: "designated controller" }, "DC"));
        if (host.Standby)
            flags.push(el("span", { class: "badge", "data-state": "standby" }, "standby"));
        if (host.Maintenance)
            flags.push(el("span", { class: "badge", "data-state": "maintenance" }, "maintenance"));
        const here = vmsOn(name);
        return el("section", {
            class: "host",
            "data-host": name,
            "data-state": host.State,
            "aria-labelledby": `host-title-${name}`,
        },
                  el("h3", { id: `host-title-${name}` }, name, " ", stateBadge(host.State), " ", flags),
                  capacity(host),
                  readinessLine(name),
                  el("div", { class: "actions", role: "group", "aria-label": `Actions for host ${name}` },
                     el("button", {
                         type: "button",
                         "data-key": `host-standby-${name}`,
                         "data-action": "standby",
                         "aria-pressed": host.Standby ? "true" : "false",
                         onclick: () => confirmHost(host, "SetStandby", !host.Standby),
                     }, host.Standby ? "Leave standby" : "Standby"),
                     el("button", {
                         type: "button",
                         "data-key": `host-maintenance-${name}`,
                         "data-action": "maintenance",
                         "aria-pressed": host.Maintenance ? "true" : "false",
                         onclick: () => confirmHost(host, "SetMaintenance", !host.Maintenance),
                     }, host.Maintenance ? "Leave maintenance" : "Maintenance")),
                  el("div", { class: "vms", "aria-label": `VMs on ${name}` },
                     here.length ? here.map(vmCard) : el("p", { class: "muted" }, "No VMs run here.")));
    }

    function renderHosts() {
        const list = sortedValues(hosts);
        $("hosts").replaceChildren(...(list.length
            ? list.map(hostColumn)
            : [el("p", { class: "muted" }, "No hosts (yet).")]));
        const elsewhere = sortedValues(vms).filter(v => (v.Hosts || []).length === 0);
        $("unplaced").replaceChildren(...(elsewhere.length
            ? [el("section", { class: "host", "data-host": "", "aria-labelledby": "unplaced-title" },
                  el("h3", { id: "unplaced-title" }, "On no host"),
                  el("div", { class: "vms" }, elsewhere.map(vmCard)))]
            : []));
    }

    /* Virtual clusters and elastic groups: the Cluster's VirtualClusters (a(sas)) and ElasticGroups
       (a(ssuuas)) properties, kept current by their PropertiesChanged. */
    function vclusterList() {
        const raw = (cluster && cluster.valid && Array.isArray(cluster.VirtualClusters)) ? cluster.VirtualClusters : [];
        return raw.map(([name, members]) => ({ name: String(name), members: (members || []).map(String) }));
    }

    function groupList() {
        const raw = (cluster && cluster.valid && Array.isArray(cluster.ElasticGroups)) ? cluster.ElasticGroups : [];
        return raw.map(([name, template, min, max, members]) => ({
            name: String(name), template: String(template), min: Number(min), max: Number(max),
            members: (members || []).map(String),
        }));
    }

    /* Where a member runs, as the page's VM objects say ("vm1 on node2"); a member that is no VM (an IP
       address, ...) is shown by its name. */
    function memberText(name) {
        const vm = sortedValues(vms).find(v => v.Name === name);
        if (!vm)
            return name;
        const on = (vm.Hosts || []).join(", ");
        return `${name} ${on ? "on " + on : "(" + (vm.State || "not running") + ")"}`;
    }

    function memberList(members) {
        return el("ul", { class: "members" }, members.map(m => {
            const vm = sortedValues(vms).find(v => v.Name === m);
            const on = vm && (vm.Hosts || []).length === 1 ? vm.Hosts[0] : "";
            return el("li", { "data-member": m, "data-host": on }, memberText(m));
        }));
    }

    function renderVclusters() {
        const list = vclusterList();
        $("vclusters").replaceChildren(...(list.length
            ? list.map(v => el("li", { class: "vcluster", "data-vcluster": v.name, "data-members": JSON.stringify(v.members) },
                               el("h3", {}, v.name,
                                  el("span", { class: "muted" }, `${v.members.length} member(s)`)),
                               memberList(v.members),
                               el("button", {
                                   type: "button",
                                   "data-key": `vcluster-capture-${v.name}`,
                                   "aria-label": `Capture virtual cluster ${v.name}`,
                                   onclick: () => confirmCapture(v.name),
                               }, "Capture…")))
            : [el("li", { class: "empty" }, "No virtual clusters (vmha vcluster create NAME RESOURCE... makes one).")]));
    }

    function renderGroups() {
        const list = groupList();
        $("groups").replaceChildren(...(list.length
            ? list.map(g => el("li", {
                class: "group",
                "data-group": g.name,
                "data-template": g.template,
                "data-min": String(g.min),
                "data-max": String(g.max),
                "data-members": JSON.stringify(g.members),
            },
                               el("h3", {}, g.name,
                                  el("span", { class: "muted" },
                                     `${g.members.length} member(s), min ${g.min}, max ${g.max}, template ${g.template}`),
                                  el("button", {
                                      type: "button",
                                      "data-key": `group-scale-${g.name}`,
                                      "aria-label": `Scale group ${g.name}`,
                                      onclick: () => confirmScale(g.name),
                                  }, "Scale…")),
                               memberList(g.members)))
            : [el("li", { class: "empty" }, "No elastic groups in the stored placement policy.")]));
    }

    /* The archive store: StoredArchives (a(stt)) read again at start and whenever a job ends. */
    let archives = [];
    /* The dry run whose plan the page waits for or shows: {job, archive, maps, name}. */
    let planFor = null;

    function refreshArchives() {
        call(ROOT, IFACE.cluster, "StoredArchives", "", [])
                .then(([list]) => {
                    archives = (list || []).map(([name, size, mtime]) => ({
                        name: String(name), size: Number(size), mtime: Number(mtime),
                    }));
                    renderArchives();
                })
                .catch(ex => notice("Listing the stored archives: " + describeError(ex), "error"));
    }

    function renderArchives() {
        $("archives").replaceChildren(...(archives.length
            ? archives.map(a => el("li", { class: "archive", "data-archive": a.name },
                                   el("h3", {}, a.name,
                                      el("span", { class: "muted" },
                                         (a.size < 1048576 ? `${Math.ceil(a.size / 1024)} KiB, ` : `${(a.size / 1048576).toFixed(1)} MiB, `) +
                                         new Date(a.mtime * 1000).toISOString().replace("T", " ").substring(0, 16) + " UTC")),
                                   el("button", {
                                       type: "button",
                                       "data-key": `archive-instantiate-${a.name}`,
                                       "aria-label": `Instantiate archive ${a.name}`,
                                       onclick: () => confirmPlan(a.name),
                                   }, "Instantiate…")))
            : [el("li", { class: "empty" }, "No archives (Capture… of a virtual cluster stores one).")]));
    }

    function stamp() {
        const d = new Date();
        const two = n => String(n).padStart(2, "0");
        return `${d.getUTCFullYear()}${two(d.getUTCMonth() + 1)}${two(d.getUTCDate())}-${two(d.getUTCHours())}${two(d.getUTCMinutes())}`;
    }

    function confirmCapture(name) {
        const archive = el("input", {
            id: "capture-archive", name: "archive", type: "text", required: true,
            pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,63}", value: `${name}-${stamp()}`,
        });
        const disks = el("input", { id: "capture-disks", name: "disks", type: "checkbox" });
        confirmAction(`Capture virtual cluster ${name}?`,
                      "Writes its members' definitions, cluster configuration and addresses (and with disks, " +
                      "their disk images, the guests' file systems frozen meanwhile) into vmhad's archive store " +
                      "on this host. The job's progress shows under Jobs.",
                      [el("label", { for: "capture-archive" }, "Archive name"), archive,
                          el("label", { for: "capture-disks" }, disks, " with the disk images")], "Capture",
                      form => {
                          const a = form.querySelector("#capture-archive").value;
                          const d = form.querySelector("#capture-disks").checked;
                          return call(ROOT, IFACE.cluster, "CaptureVclusterToStore", "ssbb", [name, a, d, false])
                                  .then(([job]) => `Capture of ${name} into ${a} started (job ${job}).`);
                      });
    }

    function planArgs(form) {
        const maps = form.querySelector("#plan-maps").value.split(/\s+/).filter(x => x.length > 0);
        return { maps, name: form.querySelector("#plan-name").value.trim() };
    }

    function confirmPlan(archive) {
        const maps = el("input", { id: "plan-maps", name: "maps", type: "text", placeholder: "hosts=OLD:NEW storage=/OLD:/NEW" });
        const name = el("input", { id: "plan-name", name: "name", type: "text", placeholder: "(the archive's)" });
        confirmAction(`Plan an instantiate of ${archive}?`,
                      "A dry run: vmhad reads the archive and says what it would create where, and what stands in " +
                      "the way. Nothing changes. The plan shows under Stored archives.",
                      [el("label", { for: "plan-maps" }, "Maps (KIND=OLD:NEW, space-separated)"), maps,
                          el("label", { for: "plan-name" }, "New name"), name], "Show plan",
                      form => {
                          const a = planArgs(form);
                          return call(ROOT, IFACE.cluster, "InstantiateVclusterFromStore", "sassbu",
                                      [archive, a.maps, a.name, true, 0])
                                  .then(([job]) => {
                                      planFor = { job, archive, maps: a.maps, name: a.name };
                                      $("plan").hidden = false;
                                      $("plan-run").hidden = true;
                                      $("plan-title").textContent = `Plan of ${archive}: being made (job ${job})`;
                                      $("plan-text").textContent = "";
                                      $("plan-problems").replaceChildren();
                                      return `Plan of ${archive} asked (job ${job}).`;
                                  });
                      });
    }

    /* A job ended: the dry run's plan, when it is the one the page waits for. */
    function jobFinished(path, success, message) {
        refreshArchives();
        if (!planFor || path !== planFor.job || planFor.shown)
            return;
        const want = planFor;
        const state = success ? "succeeded" : "failed";
        client.call(path, "org.freedesktop.DBus.Properties", "Get", [IFACE.job, "Details"], { type: "ss" })
                .then(([v]) => v.v).then(details => {
            let doc = {};
            try {
                doc = JSON.parse(details || "{}");
            } catch (e) {
                doc = {};
            }
            want.shown = true;
            const ok = state === "succeeded" && doc.plan_text;
            $("plan-title").textContent = doc.plan_text
                ? `Plan of ${want.archive}` + (want.maps.length ? ` with ${want.maps.join(" ")}` : "") +
                  (ok ? "" : ": it cannot be instantiated here as it stands")
                : `No plan for ${want.archive}: ${message}`;
            $("plan").dataset.archive = want.archive;
            $("plan").dataset.state = state;
            $("plan-text").textContent = doc.plan_text || "";
            $("plan-problems").replaceChildren(...(doc.problems || []).map(p => el("li", { class: "problem" }, String(p))));
            $("plan-run").hidden = !ok || (doc.problems || []).length > 0;
        }).catch(ex => notice("Reading the plan: " + describeError(ex), "error"));
    }

    function confirmRunPlan() {
        if (!planFor || !planFor.shown)
            return;
        const p = planFor;
        confirmAction(`Instantiate ${p.archive} as planned?`,
                      "Creates the virtual cluster as the plan above says; everything it created is removed again " +
                      "if it fails. The job's progress shows under Jobs.",
                      [], "Instantiate",
                      () => call(ROOT, IFACE.cluster, "InstantiateVclusterFromStore", "sassbu",
                                 [p.archive, p.maps, p.name, false, 0])
                              .then(([job]) => `Instantiate of ${p.archive} started (job ${job}).`));
    }

    function renderJobs() {
        for (const [path, p] of Object.entries(jobs)) {
            if (p.valid !== false && p.Kind !== undefined) {
                jobLog.set(path, {
                    Kind: p.Kind, Target: p.Target, State: p.State, Progress: p.Progress, Message: p.Message,
                });
            }
        }
        /* Newest first: vmhad numbers its jobs (/org/vmha/Vmha1/job/<n>). */
        const number = path => parseInt(path.split("/").pop(), 10) || 0;
        const entries = [...jobLog.entries()].sort((a, b) => number(b[0]) - number(a[0])).slice(0, 20);
        if (entries.length === 0) {
            $("jobs").replaceChildren(el("li", { class: "empty" }, "No jobs."));
            return;
        }
        $("jobs").replaceChildren(...entries.map(([path, j]) => {
            const pct = Math.round(Math.max(0, Math.min(1, j.Progress || 0)) * 100);
            const id = "job-" + path.split("/").pop();
            return el("li", { class: "job", "data-job": path, "data-state": j.State },
                      el("label", { for: id }, `${j.Kind} ${j.Target}: ${j.State} (${pct} %)`),
                      el("progress", { id, max: "100", value: String(pct) }),
                      el("span", { class: "job-message" }, j.Message || ""));
        }));
    }

    function addEvent(kind, subject, message) {
        const list = $("events");
        const at = new Date();
        list.prepend(el("li", { class: "event", "data-kind": kind },
                        el("time", { datetime: at.toISOString() }, at.toLocaleTimeString()), " ",
                        el("strong", {}, kind), " ", subject ? el("span", { class: "subject" }, subject) : null,
                        subject ? ": " : " ", message));
        while (list.children.length > MAX_EVENTS)
            list.lastChild.remove();
    }

    /* --------------------------------------------------------------------------------- actions */

    let dialogRun = null;

    /* Asks before anything changes. run(form) returns a promise; its refusal stays in the dialog. */
    function confirmAction(title, text, fields, okLabel, run) {
        const d = $("confirm");
        $("confirm-title").textContent = title;
        $("confirm-text").textContent = text;
        $("confirm-fields").replaceChildren(...(fields || []));
        $("confirm-error").hidden = true;
        $("confirm-error").textContent = "";
        $("confirm-ok").textContent = okLabel;
        $("confirm-ok").disabled = false;
        dialogRun = run;
        d.showModal();
        const first = d.querySelector("#confirm-fields input, #confirm-fields select") || $("confirm-ok");
        first.focus();
    }

    function onConfirm(ev) {
        ev.preventDefault();
        if (!dialogRun)
            return;
        const run = dialogRun;
        $("confirm-ok").disabled = true;
        $("confirm-error").hidden = true;
        Promise.resolve()
                .then(() => run($("confirm-form")))
                .then(done => {
                    dialogRun = null;
                    $("confirm").close();
                    notice(done || "", "info");
                })
                .catch(ex => {
                    const text = "vmhad refused: " + describeError(ex);
                    $("confirm-error").textContent = text;
                    $("confirm-error").hidden = false;
                    $("confirm-ok").disabled = false;
                    notice(text, "error");
                });
    }

    function call(path, iface, method, signature, args) {
        return client.call(path, iface, method, args, { type: signature });
    }

    function confirmVm(vm, method) {
        const verb = method === "Start" ? "Start" : "Stop";
        confirmAction(`${verb} VM ${vm.Name}?`,
                      method === "Start"
                          ? `Pacemaker starts ${vm.Name} on a host it chooses.`
                          : `Pacemaker shuts ${vm.Name} down; it stays stopped until started again.`,
                      [], verb,
                      () => call(vm.path, IFACE.vm, method, "", [])
                              .then(([job]) => `${verb} of ${vm.Name} asked (job ${job}).`));
    }

    function confirmMove(vm) {
        const current = vm.Hosts || [];
        const candidates = sortedValues(hosts).filter(h => !current.includes(h.Name));
        const select = el("select", { id: "move-host", name: "host", required: true },
                          candidates.map(h => el("option", { value: h.Name },
                                                 `${h.Name} (${h.State}${h.Standby ? ", standby" : ""})`)));
        confirmAction(`Move VM ${vm.Name}?`,
                      `${vm.Name} runs on ${current.join(", ") || "no host"}. Live migration to:`,
                      [el("label", { for: "move-host" }, "Target host"), select], "Move",
                      form => {
                          const to = form.querySelector("#move-host").value;
                          return call(vm.path, IFACE.vm, "Move", "s", [to])
                                  .then(([job]) => `Move of ${vm.Name} to ${to} asked (job ${job}).`);
                      });
    }

    function confirmCleanup(vm) {
        const select = el("select", { id: "cleanup-host", name: "host" },
                          el("option", { value: "" }, "every host"),
                          hostNames().map(h => el("option", { value: h }, h)));
        confirmAction(`Clear the failures of VM ${vm.Name}?`,
                      "Pacemaker forgets the fail counts and probes the VM again.",
                      [el("label", { for: "cleanup-host" }, "On"), select], "Clear failures",
                      form => call(vm.path, IFACE.vm, "Cleanup", "s", [form.querySelector("#cleanup-host").value])
                              .then(([probed]) => `Failures of ${vm.Name} cleared (probed again on ${
                                  (probed || []).join(", ") || "no host"}).`));
    }

    function confirmClone(vm) {
        const name = el("input", { id: "clone-name", name: "name", required: true, value: vm.Name + "-clone" });
        const host = el("select", { id: "clone-host", name: "host" },
                        el("option", { value: "" }, "the host with the most free memory"),
                        hostNames().map(h => el("option", { value: h }, h)));
        confirmAction(`Live clone VM ${vm.Name}?`,
                      `A running copy of ${vm.Name} (its guest is asked to prepare first). ` +
                      "The job's progress shows under Jobs.",
                      [el("label", { for: "clone-name" }, "Name of the clone"), name,
                          el("label", { for: "clone-host" }, "Host"), host], "Clone",
                      form => call(ROOT, IFACE.cluster, "CloneVm", "sssub",
                                   [vm.Name, form.querySelector("#clone-name").value,
                                       form.querySelector("#clone-host").value, 1, false])
                              .then(([job]) => `Clone of ${vm.Name} started (job ${job}).`));
    }

    function confirmHost(host, method, on) {
        const what = method === "SetStandby" ? "standby" : "maintenance";
        const text = method === "SetStandby"
            ? (on ? `No VM may run on ${host.Name}: Pacemaker moves its VMs away (${
                vmsOn(host.Name).map(v => v.Name).join(", ") || "none runs there now"}).`
                : `VMs may run on ${host.Name} again.`)
            : (on ? `Pacemaker neither starts, stops nor monitors anything on ${host.Name}.`
                : `Pacemaker manages ${host.Name} again.`);
        confirmAction(`${on ? "Put" : "Take"} host ${host.Name} ${on ? "in" : "out of"} ${what}?`, text, [],
                      on ? `Put in ${what}` : `Leave ${what}`,
                      () => call(host.path, IFACE.host, method, "b", [on])
                              .then(() => `Host ${host.Name}: ${what} ${on ? "on" : "off"}.`));
    }

    /* --------------------------------------------------------------------------------- what-if */

    function fillWhatIfHosts() {
        const select = $("whatif-host");
        const chosen = select.value;
        const names = hostNames();
        const now = [...select.options].map(o => o.value).slice(1);
        if (now.join("\n") === names.join("\n"))
            return;
        select.replaceChildren(el("option", { value: "" }, "(none)"),
                               ...names.map(h => el("option", { value: h, selected: h === chosen }, h)));
    }

    /* Where each VM runs now (the page's own view), for the "Now" column. */
    function nowOn(name) {
        const vm = sortedValues(vms).find(v => v.Name === name);
        return vm ? ((vm.Hosts || []).join(", ") || "no host") : "?";
    }

    function outcomeText(v) {
        switch (v.outcome) {
        case "stays": return [v.host, `stays on ${v.host}`];
        case "moves": return [v.to, `moves to ${v.to}`];
        case "starts": return [v.to, `starts on ${v.to}`];
        case "stops": return ["", "STOPS: no host has room"];
        case "stays-stopped": return ["", "stays stopped: no host has room"];
        default: return ["", String(v.outcome)];
        }
    }

    function showWhatIf(asked, doc) {
        const rows = Array.isArray(doc.vms) ? doc.vms : [];
        const failed = Array.isArray(doc.failed_hosts) ? doc.failed_hosts : [];
        $("whatif-caption").textContent = `If ${asked} failed (${failed.join(", ") || "no host"}):`;
        $("whatif-rows").replaceChildren(...rows.map(v => {
            const [then, text] = outcomeText(v);
            return el("tr", { "data-vm": String(v.vm), "data-outcome": String(v.outcome), "data-then": then || "" },
                      el("th", { scope: "row" }, String(v.vm)),
                      el("td", {}, nowOn(v.vm)),
                      el("td", {}, text),
                      el("td", {}, v.step_label ? String(v.step_label) : ""));
        }));
        const result = $("whatif-result");
        result.dataset.asked = asked;
        result.hidden = false;
        const lost = rows.filter(v => v.outcome === "stops" || v.outcome === "stays-stopped").length;
        $("whatif-status").textContent = `${rows.length} VM(s): ${lost ? lost + " without a place" : "every VM keeps a place"}. Nothing changed.`;
    }

    function runWhatIf(ev) {
        ev.preventDefault();
        const host = $("whatif-host").value;
        const zone = $("whatif-zone").value.trim();
        if (!host === !zone) {
            $("whatif-status").textContent = "Choose a host or name a zone (one of the two).";
            return;
        }
        const asked = host ? `host ${host}` : `zone ${zone}`;
        $("whatif-run").disabled = true;
        $("whatif-result").hidden = true;
        $("whatif-result").dataset.asked = "";
        $("whatif-status").textContent = `Asking Pacemaker's scheduler what happens if ${asked} fails…`;
        call(ROOT, IFACE.cluster, "WhatIf", "ass", [host ? [host] : [], zone])
                .then(([json]) => showWhatIf(asked, JSON.parse(json)))
                .catch(ex => {
                    $("whatif-status").textContent = "vmhad refused: " + describeError(ex);
                })
                .finally(() => {
                    $("whatif-run").disabled = false;
                });
    }

    /* --------------------------------------------------------------------------------- group scale */

    /* The group is chosen from vmhad's list (a labelled select, the dialog's first field); the number of
       members is bounded by the chosen group's min and max and starts at its size. */
    function confirmScale(name) {
        const groups = groupList();
        if (groups.length === 0)
            return;
        const select = el("select", { id: "scale-group", name: "group", required: true },
                          groups.map(g => el("option", { value: g.name, selected: g.name === name },
                                             `${g.name} (${g.members.length} member(s), ${g.min} to ${g.max})`)));
        const size = el("input", { id: "scale-size", name: "size", type: "number", required: true });
        const bounds = el("p", { id: "scale-bounds", class: "muted" });
        const follow = () => {
            const g = groups.find(x => x.name === select.value) || groups[0];
            size.min = String(g.min);
            size.max = String(g.max);
            size.value = String(g.members.length);
            bounds.textContent = `${g.name} has ${g.members.length} member(s): ${g.members.join(", ")}; ` +
                `it may have ${g.min} to ${g.max}.`;
        };
        select.addEventListener("change", follow);
        follow();
        size.setAttribute("aria-describedby", "scale-bounds");
        confirmAction("Scale an elastic group?",
                      "Grows by live clones of the group's template, shrinks by draining and destroying its " +
                      "newest members (each guest gets 60 s to drain). The job's progress shows under Jobs.",
                      [el("label", { for: "scale-group" }, "Group"), select,
                          el("label", { for: "scale-size" }, "Members"), size, bounds], "Scale",
                      form => {
                          const group = form.querySelector("#scale-group").value;
                          const n = parseInt(form.querySelector("#scale-size").value, 10);
                          return call(ROOT, IFACE.cluster, "ScaleGroup", "subu", [group, n, false, 60000])
                                  .then(([job]) => `Scale of group ${group} to ${n} started (job ${job}).`);
                      });
    }

    /* --------------------------------------------------------------------------------- wiring */

    function start() {
        $("confirm-form").addEventListener("submit", onConfirm);
        $("whatif-form").addEventListener("submit", runWhatIf);
        $("plan-run").addEventListener("click", confirmRunPlan);
        $("confirm-cancel").addEventListener("click", () => {
            dialogRun = null;
            $("confirm").close();
        });
        cockpit.user().then(u => {
            $("cluster-user").textContent = u.name + (u.id === 0 ? " (root)" : "");
        });

        client = cockpit.dbus(BUS, { bus: "system" });
        client.addEventListener("close", (ev, options) => {
            notice("The connection to vmhad closed: " + (options.problem || "unknown problem"), "error");
        });
        cluster = client.proxy(IFACE.cluster, ROOT);
        hosts = client.proxies(IFACE.host, ROOT);
        vms = client.proxies(IFACE.vm, ROOT);
        jobs = client.proxies(IFACE.job, ROOT);
        for (const p of [cluster, hosts, vms, jobs])
            p.addEventListener("changed", queueRender);
        for (const p of [hosts, vms, jobs]) {
            p.addEventListener("added", queueRender);
            p.addEventListener("removed", queueRender);
        }
        client.subscribe({ path: ROOT, interface: IFACE.cluster, member: "Event" }, (path, iface, signal, args) => {
            const [kind, subject, message] = args;
            addEvent(kind, subject, message);
            refreshReadiness();
            if (subject && sortedValues(vms).some(v => v.Name === subject))
                refreshHealth(subject);
        });
        client.subscribe({ path: ROOT, interface: IFACE.cluster, member: "GuestMessage" },
                         (path, iface, signal, args) => {
                             const [vm, json] = args;
                             /* Untrusted: from inside the VM. Only its type is shown, as text. */
                             let kind = "message";
                             try {
                                 const parsed = JSON.parse(json);
                                 if (parsed && typeof parsed.type === "string")
                                     kind = parsed.type.substring(0, 40);
                             } catch (e) {
                                 kind = "unreadable message";
                             }
                             guests.set(vm, { kind, at: new Date() });
                             if (kind !== "heartbeat" || !health.has(vm))
                                 refreshHealth(vm);
                             queueRender();
                         });
        /* A job's end is in the feed already (Event "job"); Finished only brings its final state in. */
        client.subscribe({ interface: IFACE.job, member: "Finished" }, (path, iface, signal, args) => {
            queueRender();
            jobFinished(path, args[0], String(args[1]));
        });
        Promise.all([cluster.wait(), hosts.wait(), vms.wait(), jobs.wait()]).then(() => {
            addEvent("page", "", "showing the cluster as vmhad on this host sees it");
            refreshReadiness();
            refreshArchives();
            render();
        });
        render();
    }

    document.addEventListener("DOMContentLoaded", start);
}());
