//! vmhad's modules import each other in one direction only, and the operations crate needs neither zbus
//! nor libvirt: a file's `crate::<module>` references (outside its unit tests) are its edges; the graph
//! must have no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The code of a source file outside its unit tests.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.split("#[cfg(test)]").next().unwrap_or("").to_string()
}

/// The `crate::<module>` references of `code`, other than to `own`.
fn references(code: &str, own: &str, deps: &mut BTreeSet<String>) {
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let m: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !m.is_empty() && m != own {
                deps.insert(m);
            }
        }
    }
}

/// The `.rs` files under `dir` (a module's own files), unit-test files left out.
fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().and_then(|e| e.to_str()) == Some("rs")
            && path.file_stem().and_then(|s| s.to_str()) != Some("tests")
        {
            out.push(path);
        }
    }
}

/// module -> modules it refers to (test code left out); a directory module's files count as its own.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "lib" || name == "bin" {
            continue;
        }
        let mut own = Vec::new();
        if path.is_dir() {
            files(&path, &mut own);
        } else if path.extension().and_then(|e| e.to_str()) == Some("rs") {
            own.push(path.clone());
        } else {
            continue;
        }
        let deps = g.entry(name.clone()).or_default();
        for f in own {
            references(&code(&f), &name, deps);
        }
    }
    g
}

/// A cycle through `node`, if any (depth-first).
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        n: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, d, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys().find_map(|n| visit(g, n, &mut Vec::new(), &mut done))
}

#[test]
fn vmhad_modules_import_each_other_without_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&src);
    assert!(g.len() > 20, "the modules are found: {g:?}");
    if let Some(c) = cycle(&g) {
        panic!("agent/src modules import each other in a circle: {}", c.join(" -> "));
    }
}

#[test]
fn the_operations_crate_needs_neither_zbus_nor_libvirt() {
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/Cargo.toml")).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .unwrap()
        .split("\n[")
        .next()
        .unwrap();
    for forbidden in [
        "zbus",
        "virt",
        "libvirt",
        "vmha-agent",
        "vmha-pacemaker",
        "vmha-corosync",
    ] {
        assert!(
            !deps.lines().any(|l| l.trim_start().starts_with(forbidden)),
            "ops depends on {forbidden}"
        );
    }
}

#[test]
fn a_cycle_is_seen() {
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert!(cycle(&g).is_some());
    g.insert("b".to_string(), BTreeSet::new());
    assert!(cycle(&g).is_none());
}
