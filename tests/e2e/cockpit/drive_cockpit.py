#!/usr/bin/python3
"""Drives Debian's headless Chromium (chromium-driver, python3-selenium) through the cockpit-vmha page for the
lab scenario tests/e2e/tests/cockpit_shows_and_drives_the_cluster.rs.

It runs inside a lab host's namespaces, beside that host's cockpit-ws, and takes one command a line on stdin
(JSON), answering each with one JSON line on stdout: {"ok": true, ...} or {"ok": false, "error": "..."}. The
scenario decides what happens in the cluster; this script only looks at and clicks on the page, and waits
on page conditions with deadlines (WebDriverWait), never with sleeps.

Usage: drive_cockpit.py BASE_URL ARTIFACT_DIR
"""

import json
import os
import sys
import tempfile
import time
import traceback

from selenium import webdriver
from selenium.common.exceptions import (
    ElementNotInteractableException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

BASE, ARTIFACTS = sys.argv[1], sys.argv[2]
PAGE = BASE + "/cockpit/@localhost/vmha/index.html"
os.makedirs(ARTIFACTS, exist_ok=True)

driver = None


def log(*args):
    print("drive_cockpit:", *args, file=sys.stderr, flush=True)


def new_driver():
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1400,1000", "--no-first-run", "--disable-extensions",
              "--user-data-dir=" + tempfile.mkdtemp(prefix="vmha-cockpit-chromium-")):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=opts)


def css(sel):
    return driver.find_elements(By.CSS_SELECTOR, sel)


def wait(timeout, what, cond):
    """Polls cond() until it returns something true. An element that went stale while cond() read it (the
    page re-renders its lists on vmhad's signals) is not an answer: cond() is asked again."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=[StaleElementReferenceException]).until(lambda d: cond())
    except TimeoutException:
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}") from None


def host_states():
    """Host name -> state, as the host columns show them now (read in one script: the page re-renders)."""
    return driver.execute_script(
        "const o = {}; document.querySelectorAll('#hosts section.host')"
        ".forEach(e => { o[e.dataset.host] = e.dataset.state; }); return o;")


def vm_placement():
    """VM name -> [host column it shows in, its state] as the page shows it now (one script, so that a
    re-render in between cannot leave a stale element)."""
    return driver.execute_script(
        "const o = {}; document.querySelectorAll('section.host').forEach(c => c.querySelectorAll('article.vm')"
        ".forEach(v => { o[v.dataset.vm] = [c.dataset.host, v.dataset.state]; })); return o;")


def cmd_login(c):
    global driver
    if driver is not None:
        driver.quit()
    driver = new_driver()
    driver.get(PAGE)
    user = wait(60, "Cockpit's login form", lambda: (css("#login-user-input") or [None])[0])
    user.send_keys(c["user"])
    css("#login-password-input")[0].send_keys(c["password"])
    css("#login-button")[0].click()
    wait(60, "the page to load after sign-in",
         lambda: driver.current_url.startswith(PAGE) and css("#app[aria-busy='false']"))
    wait(60, "the page to show the cluster's hosts", lambda: css("#hosts section.host"))
    # Gone if the page is ever reloaded: what it shows later came from vmhad's signals into this load.
    driver.execute_script("window.vmhaSameLoad = true")
    return {"url": driver.current_url, "user": css("#cluster-user")[0].text}


def cmd_wait_cluster(c):
    want = c["hosts"]
    wait(c.get("timeout", 30), f"{want} online hosts and a quorate cluster",
         lambda: len([s for s in host_states().values() if s == "online"]) == want
         and css("#cluster-quorum")[0].text == "quorate")
    return {"hosts": host_states(), "dc": css("#cluster-dc")[0].text, "vms": vm_placement()}


def cmd_wait_vm(c):
    vm, host, state = c["vm"], c.get("host"), c.get("state", "running")
    t0 = time.monotonic()

    def shown():
        p = vm_placement().get(vm)
        return p and p[1] == state and (host is None or p[0] == host) and p
    placed = wait(c.get("timeout", 30), f"{vm} {state} on {host or 'any host'} on the page", shown)
    return {"host": placed[0], "state": placed[1], "seconds": time.monotonic() - t0,
            "same_load": driver.execute_script("return window.vmhaSameLoad === true")}


def cmd_wait_readiness(c):
    """Every online host column shows its readiness report (clock and storage)."""
    script = ("const o = {}; document.querySelectorAll('#hosts section.host[data-state=online]')"
              ".forEach(c => { const r = c.querySelector('[data-field=readiness]');"
              " o[c.dataset.host] = r ? r.textContent : null; }); return o;")
    lines = wait(c.get("timeout", 20), "every online host's readiness report on the page",
                 lambda: (lambda o: o if o and all(v and v.startswith("Clock") for v in o.values()) else None)(
                     driver.execute_script(script)))
    return {"readiness": lines}


def cmd_placement(c):
    return {"vms": vm_placement(), "hosts": host_states()}


def dialog_fields():
    """The dialog's fields as shown: id, the text of its label, its value, bounds and (a select) options."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#confirm-fields input, #confirm-fields select')].map(f => {
            const l = document.querySelector('#confirm-fields label[for="' + f.id + '"]');
            return {id: f.id, label: l ? l.textContent : null, value: f.value, min: f.min || null,
                    max: f.max || null,
                    options: f.tagName === 'SELECT' ? [...f.options].map(o => o.value) : null};
        });""")


def choose_by_keyboard(field_id, value):
    """Moves the select FIELD_ID to VALUE with the arrow keys (as a keyboard user does)."""
    sel = css("#" + field_id)[0]
    options = driver.execute_script("return [...arguments[0].options].map(o => o.value)", sel)
    if value not in options:
        raise RuntimeError(f"{value} is not among the options of #{field_id}: {options}")
    now = options.index(driver.execute_script("return arguments[0].value", sel))
    step = Keys.ARROW_DOWN if options.index(value) > now else Keys.ARROW_UP
    for _ in range(abs(options.index(value) - now)):
        sel.send_keys(step)
    chosen = driver.execute_script("return arguments[0].value", sel)
    if chosen != value:
        raise RuntimeError(f"the arrow keys left #{field_id} at {chosen}, not {value}")


def cmd_act(c):
    """Clicks the button with data-key KEY (by keyboard: focus and Enter), fills the dialog, confirms, and
    reports what became of it: the notice, or vmhad's refusal shown in the dialog."""
    def press():
        button = (css(f"button[data-key='{c['key']}']") or [None])[0]
        if button is None:
            return None
        try:
            driver.execute_script("arguments[0].focus()", button)
            button.send_keys(Keys.ENTER)
        except (StaleElementReferenceException, ElementNotInteractableException):
            # The page re-rendered its list (a signal from vmhad) between finding the button and
            # pressing it, or is rendering it: find it again. A button that stays out of reach
            # fails the wait below.
            return None
        return True
    wait(10, f"button {c['key']} pressed", press)
    wait(10, "the confirmation dialog", lambda: css("dialog#confirm[open]"))
    focused = driver.switch_to.active_element
    in_dialog = driver.execute_script("return document.getElementById('confirm').contains(arguments[0])", focused)
    focused_id = focused.get_attribute("id")
    title = css("#confirm-title")[0].text
    if "choose" in c:
        choose_by_keyboard(c["choose"]["id"], c["choose"]["value"])
    fields = dialog_fields()
    if "select" in c:
        Select(css("#" + c["select"]["id"])[0]).select_by_value(c["select"]["value"])
    # One field ({"id", "value"}) or several (a list of them), filled in order.
    fills = c.get("fill", [])
    for fill in fills if isinstance(fills, list) else [fills]:
        field = css("#" + fill["id"])[0]
        field.clear()
        field.send_keys(fill["value"])
    css("#confirm-ok")[0].click()
    outcome = wait(c.get("timeout", 60), "the dialog to close or show a refusal",
                   lambda: ("refused" if css("#confirm-error:not([hidden])") else None)
                   or ("done" if not css("dialog#confirm[open]") else None))
    result = {"title": title, "focus_in_dialog": bool(in_dialog), "focused": focused_id, "fields": fields,
              "outcome": outcome, "notice": css("#notice")[0].text}
    if outcome == "refused":
        result["error"] = css("#confirm-error")[0].text
        if c.get("screenshot"):
            driver.save_screenshot(os.path.join(ARTIFACTS, c["screenshot"] + ".png"))
        css("#confirm-cancel")[0].click()
        wait(10, "the dialog to close", lambda: not css("dialog#confirm[open]"))
    return result


def cmd_whatif(c):
    """Asks the page's what-if panel what happens if host HOST fails (keyboard: focus the button, Enter), and
    returns its answer as the page shows it: VM -> [outcome, host it would run on or ""]."""
    Select(css("#whatif-host")[0]).select_by_value(c["host"])
    css("#whatif-zone")[0].clear()
    button = css("#whatif-run")[0]
    driver.execute_script("arguments[0].focus()", button)
    button.send_keys(Keys.ENTER)
    asked = "host " + c["host"]

    def answered():
        if driver.execute_script("const t = document.getElementById('whatif-result');"
                                 " return !t.hidden && t.dataset.asked === arguments[0];", asked):
            return True
        status = css("#whatif-status")[0].text
        if status.startswith("vmhad refused"):
            raise RuntimeError(status)
        return None
    wait(c.get("timeout", 60), f"the what-if of {asked} on the page", answered)
    rows = driver.execute_script(
        "const o = {}; document.querySelectorAll('#whatif-rows tr').forEach(r => {"
        " o[r.dataset.vm] = [r.dataset.outcome, r.dataset.then]; }); return o;")
    if c.get("screenshot"):
        driver.save_screenshot(os.path.join(ARTIFACTS, c["screenshot"] + ".png"))
    return {"vms": rows, "status": css("#whatif-status")[0].text,
            "same_load": driver.execute_script("return window.vmhaSameLoad === true")}


def cmd_trace_jobs(c):
    """From now on, records every change of the job list (each job's label and message as shown), so that
    steps shown only briefly are not missed between two looks."""
    driver.execute_script("""
        window.vmhaJobTrace = [];
        const seen = new Map();
        const look = () => document.querySelectorAll('#jobs li.job').forEach(li => {
            const label = li.querySelector('label'), msg = li.querySelector('.job-message');
            const text = (label ? label.textContent : '') + ' | ' + (msg ? msg.textContent : '');
            if (seen.get(li.dataset.job) !== text) {
                seen.set(li.dataset.job, text);
                window.vmhaJobTrace.push({job: li.dataset.job, state: li.dataset.state, text: text});
            }
        });
        if (window.vmhaJobObserver) window.vmhaJobObserver.disconnect();
        window.vmhaJobObserver = new MutationObserver(look);
        window.vmhaJobObserver.observe(document.getElementById('jobs'),
                                       {childList: true, subtree: true, characterData: true});
        look();
    """)
    return {}


def cmd_wait_job(c):
    """Waits for a job of KIND (as the Jobs list labels it; with JOB, that job's object path only) to reach
    STATE; returns what the trace saw of it."""
    kind, state, job = c["kind"], c.get("state", "succeeded"), c.get("job")
    script = ("return (window.vmhaJobTrace || []).filter(e => e.text.startsWith(arguments[0] + ' ')"
              " && (arguments[1] === null || e.job === arguments[1]));")

    def ended():
        trace = driver.execute_script(script, kind, job)
        done = [e for e in trace if e["state"] in ("succeeded", "failed")]
        return trace if done else None
    trace = wait(c.get("timeout", 120), f"a {kind} job to end on the page", ended)
    if c.get("screenshot"):
        driver.save_screenshot(os.path.join(ARTIFACTS, c["screenshot"] + ".png"))
    final = [e for e in trace if e["state"] in ("succeeded", "failed")][-1]
    if final["state"] != state:
        raise RuntimeError(f"the {kind} job ended {final['state']}: {final['text']}")
    return {"trace": trace, "final": final}


def cmd_scale(c):
    """Opens the Scale… dialog of group FROM (its button in the group list, by keyboard), chooses GROUP in
    the dialog's group list with the arrow keys, sets the number of members and confirms; like act, reports
    the outcome or vmhad's refusal, and the dialog's fields as they were shown."""
    return cmd_act({"key": "group-scale-" + c.get("from", c["group"]),
                    "choose": {"id": "scale-group", "value": c["group"]},
                    "fill": {"id": "scale-size", "value": str(c["size"])},
                    **{k: v for k, v in c.items() if k in ("screenshot", "timeout")}})


def cmd_wait_archive(c):
    """Waits until the Stored archives list shows archive NAME; returns the names listed."""
    wait(c.get("timeout", 60), f"archive {c['name']} in the list",
         lambda: css(f"#archives li.archive[data-archive='{c['name']}']"))
    return {"archives": driver.execute_script(
        "return [...document.querySelectorAll('#archives li.archive')].map(e => e.dataset.archive);")}


def cmd_wait_plan(c):
    """Waits until the plan panel shows the dry run's answer for archive ARCHIVE; returns its title, text,
    the problems listed and whether the page offers to instantiate as planned."""
    def shown():
        return driver.execute_script(
            "const p = document.getElementById('plan');"
            " return !p.hidden && p.dataset.archive === arguments[0] && p.dataset.state ? true : null;",
            c["archive"])
    wait(c.get("timeout", 120), f"the plan of {c['archive']}", shown)
    if c.get("screenshot"):
        driver.save_screenshot(os.path.join(ARTIFACTS, c["screenshot"] + ".png"))
    return {"title": css("#plan-title")[0].text, "text": css("#plan-text")[0].text,
            "state": css("#plan")[0].get_attribute("data-state"),
            "problems": [e.text for e in css("#plan-problems li")],
            "run_offered": css("#plan-run")[0].is_displayed()}


def page_lists():
    """The virtual clusters and elastic groups as the page shows them now (one script: the page re-renders):
    vclusters: name -> members; groups: name -> template, min, max, size, members ({vm, host or None})."""
    return driver.execute_script("""
        const v = {}, g = {};
        document.querySelectorAll('#vclusters li.vcluster').forEach(e => {
            v[e.dataset.vcluster] = JSON.parse(e.dataset.members); });
        document.querySelectorAll('#groups li.group').forEach(e => {
            const members = [...e.querySelectorAll('ul.members > li')].map(m => ({
                vm: m.dataset.member, host: m.dataset.host || null}));
            g[e.dataset.group] = {template: e.dataset.template, min: Number(e.dataset.min),
                                  max: Number(e.dataset.max), size: members.length, members: members}; });
        return {vclusters: v, groups: g};""")


def cmd_wait_lists(c):
    """Waits until the page shows exactly the virtual clusters and elastic groups given (what the CLI lists)."""
    want = {"vclusters": c["vclusters"], "groups": c["groups"]}
    t0 = time.monotonic()
    seen = [None]

    def same():
        seen[0] = page_lists()
        return seen[0] == want
    try:
        wait(c.get("timeout", 30), "the page's virtual clusters and elastic groups to be the CLI's", same)
    except RuntimeError as e:
        raise RuntimeError(f"{e}: the page shows {json.dumps(seen[0])}, the CLI lists {json.dumps(want)}") from None
    seconds = time.monotonic() - t0
    if c.get("screenshot"):
        driver.execute_script("document.getElementById('vclusters-title').scrollIntoView()")
        driver.save_screenshot(os.path.join(ARTIFACTS, c["screenshot"] + ".png"))
    return {**seen[0], "seconds": seconds,
            "same_load": driver.execute_script("return window.vmhaSameLoad === true")}


def cmd_events(c):
    # Read in one script: the feed grows while it is read, and a found element can go stale.
    events = driver.execute_script(
        "return [...document.querySelectorAll('#events li')].map(e => e.innerText);")
    return {"events": events[: c.get("limit", 20)]}


def cmd_screenshot(c):
    path = os.path.join(ARTIFACTS, c["name"] + ".png")
    if "width" in c:
        driver.set_window_size(c["width"], c.get("height", 1000))
    driver.save_screenshot(path)
    if "width" in c:
        driver.set_window_size(1400, 1000)
    return {"path": path}


def cmd_narrow(c):
    """In a narrow window the host columns stack: each column about as wide as the window."""
    driver.set_window_size(c.get("width", 420), 900)
    widths = wait(10, "the columns to stack", lambda: [e.rect["width"] for e in css("#hosts section.host")]
                  if len({round(e.rect["x"]) for e in css("#hosts section.host")}) == 1 else None)
    path = os.path.join(ARTIFACTS, "narrow.png")
    driver.save_screenshot(path)
    viewport = driver.execute_script("return document.documentElement.clientWidth")
    scroll = driver.execute_script("return document.documentElement.scrollWidth")
    driver.set_window_size(1400, 1000)
    return {"widths": widths, "viewport": viewport, "scroll_width": scroll, "path": path}


COMMANDS = {
    "login": cmd_login,
    "wait_cluster": cmd_wait_cluster,
    "wait_vm": cmd_wait_vm,
    "placement": cmd_placement,
    "wait_readiness": cmd_wait_readiness,
    "act": cmd_act,
    "events": cmd_events,
    "whatif": cmd_whatif,
    "trace_jobs": cmd_trace_jobs,
    "wait_job": cmd_wait_job,
    "scale": cmd_scale,
    "wait_archive": cmd_wait_archive,
    "wait_plan": cmd_wait_plan,
    "wait_lists": cmd_wait_lists,
    "screenshot": cmd_screenshot,
    "narrow": cmd_narrow,
}


def main():
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        c = json.loads(line)
        if c["cmd"] == "quit":
            break
        try:
            reply = {"ok": True, **COMMANDS[c["cmd"]](c)}
        except Exception as e:  # the scenario gets the failure, with a screenshot of the page then
            log(traceback.format_exc())
            reply = {"ok": False, "error": f"{c['cmd']}: {e}"}
            if driver is not None:
                try:
                    driver.save_screenshot(os.path.join(ARTIFACTS, f"failed-{c['cmd']}.png"))
                    reply["page"] = driver.find_element(By.TAG_NAME, "body").text[:4000]
                except Exception:
                    pass
        print(json.dumps(reply), flush=True)
    if driver is not None:
        driver.quit()


if __name__ == "__main__":
    main()
