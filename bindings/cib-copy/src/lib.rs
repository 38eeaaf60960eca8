//! A compact copy of the CIB, kept current by applying the v2 patchsets of the CIB manager's notifications.
//!
//! Pure Rust and no `unsafe`: `vmha-pacemaker` keeps its local copy of the CIB in it (its tests compare it
//! with Pacemaker's own `xml_apply_patchset` and digest), and the fuzz target `cib_patchset` runs it
//! without linking Pacemaker.
//!
//! vmhad keeps a local copy of the whole CIB so that a notification costs it only the parts the diff names.
//! A libxml2 tree is a poor container for that: every element, attribute and attribute value is a node of
//! its own, and Pacemaker hangs its private data on each (a CIB of 34,000 elements and 96,000 attributes took
//! 41 MiB). Here an element is its name (an index into the document's table of names), its attribute values
//! in one string, and its children: the same CIB takes a few MiB.
//!
//! [`Doc::apply`] follows Pacemaker 2.1's `xml_apply_patchset` for format 2: the version check first
//! (`admin_epoch`, `epoch`, `num_updates` of the diff's source against the document), then the changes in
//! order (`delete` and `modify` at once, `create` and `move` afterwards, sorted by position), then, when the
//! diff carries a `digest`, Pacemaker's digest of the result (an MD5 of its filtered, unformatted text) must
//! match. Anything it cannot follow exactly is refused, and the caller reads the CIB whole instead.

use std::collections::HashMap;
use std::fmt::Write as _;

use md5::{Digest as _, Md5};

/// The outcome of applying a diff.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Yes,
    /// The diff's source is older than the document (which already holds it): nothing done.
    Older,
    /// Not applied; the document may be half changed: drop it.
    No(String),
    /// Applied, but the result is not what the CIB manager's digest says: the copy had drifted from the
    /// CIB (or this module applied the diff otherwise than Pacemaker). Drop it.
    Drifted(String),
}

/// A node of the tree: positions in a v2 patchset count every node, so comments and text stay.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Element(Element),
    Comment(Box<str>),
    Text(Box<str>),
}

/// An element: its name, its attributes (names, and where each value ends in `values`), its children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    name: u32,
    /// Set while a diff is applied on the elements a `create` or `move` will need again.
    mark: u32,
    attrs: Box<[(u32, u32)]>,
    values: Box<str>,
    children: Vec<Node>,
}

/// The names of elements and attributes a document uses, each kept once.
#[derive(Debug, Default, Clone)]
struct Names {
    index: HashMap<Box<str>, u32>,
    names: Vec<Box<str>>,
}

impl Names {
    fn id(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.index.get(name) {
            return id;
        }
        let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.names.push(name.into());
        self.index.insert(name.into(), id);
        id
    }

    fn find(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }

    fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", |n| n)
    }
}

/// The whole CIB.
#[derive(Debug, Clone)]
pub struct Doc {
    names: Names,
    root: Element,
}

/// An element together with the table its names are in.
#[derive(Debug, Clone, Copy)]
pub struct ElementRef<'a> {
    names: &'a Names,
    element: &'a Element,
}

impl Element {
    fn new(names: &mut Names, name: &str, attrs: &[(&str, &str)], children: Vec<Node>) -> Element {
        let mut values = String::with_capacity(attrs.iter().map(|(_, v)| v.len()).sum());
        let mut packed = Vec::with_capacity(attrs.len());
        for (n, v) in attrs {
            values.push_str(v);
            packed.push((names.id(n), u32::try_from(values.len()).unwrap_or(u32::MAX)));
        }
        Element {
            name: names.id(name),
            mark: 0,
            attrs: packed.into_boxed_slice(),
            values: values.into_boxed_str(),
            children,
        }
    }

    fn attrs<'a>(&'a self, names: &'a Names) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let mut start = 0usize;
        self.attrs.iter().map(move |&(n, end)| {
            let end = end as usize;
            let value = self.values.get(start..end).unwrap_or("");
            start = end;
            (names.name(n), value)
        })
    }

    fn attr_by_id(&self, name: u32) -> Option<&str> {
        let mut start = 0usize;
        for &(n, end) in self.attrs.iter() {
            let end = end as usize;
            if n == name {
                return self.values.get(start..end);
            }
            start = end;
        }
        None
    }

    fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|c| match c {
            Node::Element(e) => Some(e),
            _ => None,
        })
    }
}

impl<'a> ElementRef<'a> {
    pub fn name(&self) -> &'a str {
        self.names.name(self.element.name)
    }

    pub fn attr(&self, name: &str) -> Option<&'a str> {
        self.element.attr_by_id(self.names.find(name)?)
    }

    /// The element children.
    pub fn elements(&self) -> impl Iterator<Item = ElementRef<'a>> + 'a {
        let names = self.names;
        self.element
            .elements()
            .map(move |element| ElementRef { names, element })
    }

    /// The first element child named `name`.
    pub fn first(&self, name: &str) -> Option<ElementRef<'a>> {
        self.elements().find(|e| e.name() == name)
    }

    /// The element as XML text.
    pub fn to_text(self) -> String {
        let mut out = String::new();
        write_element(&mut out, self.names, self.element, Style::Xml);
        out
    }

    /// The element's start tag alone, as an empty element: its attributes without its children.
    pub fn alone_text(self) -> String {
        let mut out = String::new();
        write_start(&mut out, self.names, self.element, Style::Xml);
        out.push_str("/>");
        out
    }
}

impl Doc {
    /// Reads a whole CIB (one `<cib>` element) from text. Blank text between elements is dropped, as
    /// Pacemaker's parser drops it.
    pub fn parse(text: &str) -> Result<Doc, String> {
        let xml = roxmltree::Document::parse(text).map_err(|e| format!("malformed XML: {e}"))?;
        let mut names = Names::default();
        let root = build(&mut names, xml.root_element());
        let doc = Doc { names, root };
        if doc.root().name() != "cib" {
            return Err(format!("the document is <{}>, not <cib>", doc.root().name()));
        }
        Ok(doc)
    }

    pub fn root(&self) -> ElementRef<'_> {
        ElementRef {
            names: &self.names,
            element: &self.root,
        }
    }

    pub fn to_text(&self) -> String {
        self.root().to_text()
    }

    /// How many distinct element and attribute names the document's table holds.
    pub fn name_count(&self) -> usize {
        self.names.names.len()
    }

    /// Pacemaker's digest of the document (`calculate_xml_versioned_digest(doc, FALSE, TRUE, version)` for
    /// feature sets from 3.0.5 on): `None` when it cannot be computed exactly here (an older or missing
    /// `crm_feature_set`).
    pub fn digest(&self) -> Option<String> {
        let version = self.root().attr("crm_feature_set")?;
        if !version_at_least(version, &[3, 0, 5]) {
            return None;
        }
        let mut text = String::new();
        write_element(&mut text, &self.names, &self.root, Style::Digest);
        Some(
            Md5::digest(text.as_bytes())
                .iter()
                .fold(String::with_capacity(32), |mut s, b| {
                    let _ = write!(s, "{b:02x}");
                    s
                }),
        )
    }

    /// Applies a `<diff>` (format 2) in place. On [`Applied::No`] the document may be half changed.
    pub fn apply(&mut self, diff_text: &str) -> Applied {
        let diff = match roxmltree::Document::parse(diff_text) {
            Ok(d) => d,
            Err(e) => return Applied::No(format!("the diff is malformed XML: {e}")),
        };
        let diff = diff.root_element();
        if !diff.has_tag_name("diff") {
            return Applied::No(format!("<{}> is not a <diff>", diff.tag_name().name()));
        }
        if diff.attribute("format") != Some("2") {
            return Applied::No(format!("diff format {:?} is not 2", diff.attribute("format")));
        }
        match self.check_versions(diff) {
            Applied::Yes => {}
            other => return other,
        }
        if let Err(why) = self.apply_changes(diff) {
            return Applied::No(why);
        }
        if let Some(expected) = diff.attribute("digest") {
            match self.digest() {
                Some(d) if d.eq_ignore_ascii_case(expected) => {}
                Some(d) => return Applied::Drifted(format!("the diff's digest is {expected}, the copy's {d}")),
                None => return Applied::No("the copy's digest cannot be computed (crm_feature_set)".into()),
            }
        }
        Applied::Yes
    }

    /// Pacemaker's `xml_patch_version_check`.
    fn check_versions(&self, diff: roxmltree::Node) -> Applied {
        const FIELDS: [&str; 3] = ["admin_epoch", "epoch", "num_updates"];
        let root = self.root();
        let this: Vec<i64> = FIELDS
            .iter()
            .map(|f| root.attr(f).map_or(-1, int_value).max(0))
            .collect();
        let mut add = [this[0], this[1], this[2] + 1];
        let mut del = [this[0], this[1], this[2]];
        let version = diff.children().find(|n| n.has_tag_name("version"));
        let side = |name: &str| version.and_then(|v| v.children().find(|n| n.has_tag_name(name)));
        for (target, node) in [(&mut del, side("source")), (&mut add, side("target"))] {
            if let Some(node) = node {
                for (slot, f) in target.iter_mut().zip(FIELDS) {
                    if let Some(v) = node.attribute(f) {
                        *slot = int_value(v);
                    }
                }
            }
        }
        for i in 0..3 {
            if this[i] < del[i] {
                return Applied::No(format!(
                    "the diff is from {}.{}.{}, the copy is at {}.{}.{}",
                    del[0], del[1], del[2], this[0], this[1], this[2]
                ));
            }
            if this[i] > del[i] {
                return Applied::Older;
            }
        }
        if (0..3).all(|i| add[i] <= del[i]) {
            return Applied::Older;
        }
        Applied::Yes
    }

    fn apply_changes(&mut self, diff: roxmltree::Node) -> Result<(), String> {
        // Creates and moves wait until every delete and modify is done; their targets are marked so that
        // they are found again wherever the other changes left them.
        let mut later: Vec<(roxmltree::Node, u32, i64)> = Vec::new();
        // Marks are 0 outside of this function; 1, 2, ... within. Where each marked element is (for a
        // move, after it was put last): where it is looked for first (a whole walk of a 2000-VM copy per
        // create was most of applying a diff), the whole document only when later changes moved it.
        let mut marks = 0u32;
        let mut marked_at: Vec<Vec<usize>> = Vec::new();
        for change in diff.children().filter(|n| n.is_element()) {
            let Some(op) = change.attribute("operation") else {
                continue;
            };
            let path = change.attribute("path").unwrap_or("");
            let position = if op == "delete" {
                change.attribute("position").map_or(-1, int_value)
            } else {
                -1
            };
            let Some(at) = self.search(path, position) else {
                if op == "delete" {
                    continue;
                }
                return Err(format!("{op}: no match for {path}"));
            };
            match op {
                "create" | "move" => {
                    let target = self
                        .element_mut(&at)
                        .ok_or_else(|| format!("{op}: {path} is not an element"))?;
                    // Several creates under one parent share its mark.
                    if target.mark == 0 {
                        marks += 1;
                        target.mark = marks;
                        marked_at.push(at.clone());
                    }
                    let mark = target.mark;
                    if op == "move" {
                        // Put it last among its siblings for now, as Pacemaker does.
                        let Some((&index, parent)) = at.split_last() else {
                            return Err("move: the root has no siblings".into());
                        };
                        let siblings = self.children_mut(parent).ok_or("move: no parent")?;
                        let node = siblings.remove(index);
                        siblings.push(node);
                        // Where it is looked for first: where it went, not where it was marked.
                        let last = siblings.len() - 1;
                        if let Some(hint) = usize::try_from(mark)
                            .ok()
                            .and_then(|m| marked_at.get_mut(m.checked_sub(1)?))
                        {
                            *hint = [parent, &[last][..]].concat();
                        }
                    }
                    later.push((change, mark, change.attribute("position").map_or(-1, int_value)));
                }
                "delete" => {
                    let Some((&index, parent)) = at.split_last() else {
                        return Err(format!("delete: {path} is the whole document"));
                    };
                    self.children_mut(parent).ok_or("delete: no parent")?.remove(index);
                }
                "modify" => {
                    let result = change
                        .children()
                        .find(|n| n.has_tag_name("change-result"))
                        .and_then(|r| r.children().find(|n| n.is_element()))
                        .ok_or_else(|| format!("modify {path}: no change-result"))?;
                    let attrs: Vec<(&str, &str)> = result.attributes().map(|a| (a.name(), a.value())).collect();
                    let target = self
                        .element_mut(&at)
                        .ok_or_else(|| format!("modify: {path} is not an element"))?;
                    let children = std::mem::take(&mut target.children);
                    let (name, mark) = (target.name, target.mark);
                    let name = self.names.name(name).to_string();
                    let mut fresh = Element::new(&mut self.names, &name, &attrs, children);
                    fresh.mark = mark;
                    if let Some(target) = self.element_mut(&at) {
                        *target = fresh;
                    }
                }
                other => return Err(format!("unknown operation {other:?} on {path}")),
            }
        }
        // Pacemaker sorts them by position (a stable sort), then adds them.
        later.sort_by_key(|(_, _, position)| *position);
        for (change, mark, position) in later {
            let at = self
                .find_mark(mark, &marked_at)
                .ok_or("a create or move target was removed by the diff")?;
            let op = change.attribute("operation").unwrap_or("");
            if op == "create" {
                let content = change
                    .children()
                    .find(|n| n.is_element() || n.is_comment() || (n.is_text() && !is_blank(n.text())))
                    .ok_or("create: no content")?;
                let node = build_node(&mut self.names, content).ok_or("create: content of an unknown kind")?;
                let position = change.attribute("position").map_or(0, int_value);
                let children = self.children_mut(&at).ok_or("create: the target is not an element")?;
                match usize::try_from(position) {
                    Ok(p) if p < children.len() => children.insert(p, node),
                    _ => children.push(node),
                }
            } else {
                let Some((&index, parent)) = at.split_last() else {
                    return Err("move: the root has no siblings".into());
                };
                let siblings = self.children_mut(parent).ok_or("move: no parent")?;
                let current = index as i64;
                if position != current {
                    let mut p = position;
                    if p > current {
                        p += 1;
                    }
                    let node = siblings.remove(index);
                    match usize::try_from(p) {
                        // The sibling at p (counted with the moved node still in place) moves down by one
                        // when it came after it.
                        Ok(p) if p <= siblings.len() && p != index => {
                            let p = if p > index { p - 1 } else { p };
                            siblings.insert(p, node);
                        }
                        _ => siblings.push(node),
                    }
                    let now = siblings
                        .iter()
                        .position(|n| matches!(n, Node::Element(e) if e.mark == mark))
                        .unwrap_or(usize::MAX);
                    if now as i64 != position {
                        return Err(format!("move: ended at {now}, not {position}"));
                    }
                }
            }
        }
        for mark in 1..=marks {
            if let Some(at) = self.find_mark(mark, &marked_at) {
                if let Some(e) = self.element_mut(&at) {
                    e.mark = 0;
                }
            }
        }
        Ok(())
    }

    /// Pacemaker's `search_v2_xpath`: `/tag[@id='id']/...` from the document, the first match at each
    /// step; `position` (for a deleted comment) picks a comment by its position. The node as indices of
    /// children, the root being `[]`.
    fn search(&self, path: &str, position: i64) -> Option<Vec<usize>> {
        let steps = split_path(path)?;
        let (first, rest) = steps.split_first()?;
        // The name `id` is looked up once, not at every sibling.
        let id = self.names.find("id");
        if !element_matches(&self.names, id, &self.root, first) {
            return None;
        }
        let mut at = Vec::new();
        let mut node = &self.root;
        for (i, step) in rest.iter().enumerate() {
            let last = i + 1 == rest.len();
            let pos = if last { position } else { -1 };
            let (index, child) = node
                .children
                .iter()
                .enumerate()
                .find(|(index, child)| step_matches(&self.names, id, child, step, pos, *index))?;
            at.push(index);
            match child {
                Node::Element(e) => node = e,
                _ if last => return Some(at),
                _ => return None,
            }
        }
        Some(at)
    }

    /// The element at `at` (the root at `[]`); `None` when it is not an element.
    fn element(&self, at: &[usize]) -> Option<&Element> {
        let mut element = &self.root;
        for &i in at {
            match element.children.get(i)? {
                Node::Element(e) => element = e,
                _ => return None,
            }
        }
        Some(element)
    }

    /// The element at `at` (the root at `[]`); `None` when it is not an element.
    fn element_mut(&mut self, at: &[usize]) -> Option<&mut Element> {
        let mut element = &mut self.root;
        for &i in at {
            match element.children.get_mut(i)? {
                Node::Element(e) => element = e,
                _ => return None,
            }
        }
        Some(element)
    }

    fn children_mut(&mut self, at: &[usize]) -> Option<&mut Vec<Node>> {
        self.element_mut(at).map(|e| &mut e.children)
    }

    /// Where the element marked `mark` is: where it was marked (`marked_at[mark - 1]`) if it is still
    /// there, else wherever a walk of the whole document finds it.
    fn find_mark(&self, mark: u32, marked_at: &[Vec<usize>]) -> Option<Vec<usize>> {
        let hint = usize::try_from(mark)
            .ok()
            .and_then(|m| marked_at.get(m.checked_sub(1)?));
        if let Some(hint) = hint {
            if self.element(hint).is_some_and(|e| e.mark == mark) {
                return Some(hint.clone());
            }
        }
        self.walk_to_mark(mark)
    }

    fn walk_to_mark(&self, mark: u32) -> Option<Vec<usize>> {
        fn walk(e: &Element, mark: u32, at: &mut Vec<usize>) -> bool {
            for (i, child) in e.children.iter().enumerate() {
                if let Node::Element(c) = child {
                    at.push(i);
                    if c.mark == mark || walk(c, mark, at) {
                        return true;
                    }
                    at.pop();
                }
            }
            false
        }
        if self.root.mark == mark {
            return Some(Vec::new());
        }
        let mut at = Vec::new();
        walk(&self.root, mark, &mut at).then_some(at)
    }
}

/// One step of a path: a name, and the id it must have.
struct Step<'a> {
    name: &'a str,
    id: Option<&'a str>,
}

/// Splits `/a/b[@id='x']/c` into steps as Pacemaker's `sscanf` patterns read it: a step runs to the next
/// `/`, its name to the first `[`, its id (after `[@id='`) to the next `'`; a predicate of another shape is
/// ignored, as there. An empty step, which Pacemaker would read as the end of the path, is refused.
fn split_path(path: &str) -> Option<Vec<Step<'_>>> {
    path.strip_prefix('/')?
        .split('/')
        .map(|section| {
            let (name, predicate) = section.split_once('[').unwrap_or((section, ""));
            let id = predicate
                .strip_prefix("@id='")
                .map(|rest| rest.split('\'').next().unwrap_or(""))
                .filter(|id| !id.is_empty());
            (!name.is_empty()).then_some(Step { name, id })
        })
        .collect()
}

/// Pacemaker's `first_matching_xml_child` test for one child: its name (a comment's is `comment`, a text
/// node's `text`), its id when the step names one, and for a comment its position when one is given.
fn step_matches(names: &Names, id: Option<u32>, node: &Node, step: &Step, position: i64, index: usize) -> bool {
    match node {
        Node::Element(e) => element_matches(names, id, e, step),
        Node::Comment(_) => step.name == "comment" && step.id.is_none() && (position < 0 || position == index as i64),
        Node::Text(_) => step.name == "text" && step.id.is_none(),
    }
}

/// Whether element `e` is the step's: its name, and its id (`id` is the name `id` in `names`).
fn element_matches(names: &Names, id: Option<u32>, e: &Element, step: &Step) -> bool {
    names.name(e.name) == step.name
        && step
            .id
            .is_none_or(|want| id.and_then(|n| e.attr_by_id(n)) == Some(want))
}

fn is_blank(text: Option<&str>) -> bool {
    text.is_none_or(|t| t.chars().all(|c| c.is_ascii_whitespace()))
}

fn build(names: &mut Names, node: roxmltree::Node) -> Element {
    let attrs: Vec<(&str, &str)> = node.attributes().map(|a| (a.name(), a.value())).collect();
    let mut children: Vec<Node> = node.children().filter_map(|c| build_node(names, c)).collect();
    children.shrink_to_fit();
    Element::new(names, node.tag_name().name(), &attrs, children)
}

fn build_node(names: &mut Names, node: roxmltree::Node) -> Option<Node> {
    if node.is_element() {
        Some(Node::Element(build(names, node)))
    } else if node.is_comment() {
        Some(Node::Comment(node.text().unwrap_or("").into()))
    } else if node.is_text() && !is_blank(node.text()) {
        Some(Node::Text(node.text().unwrap_or("").into()))
    } else {
        None
    }
}

/// Pacemaker's integer reading (`crm_element_value_int`, `strtoll` underneath): leading white space and a
/// sign, then the digits up to the first other character; no digits, or a number out of `int`, is -1.
fn int_value(text: &str) -> i64 {
    let t = text.trim_start();
    let (negative, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let end = digits.bytes().take_while(u8::is_ascii_digit).count();
    if end == 0 {
        return -1;
    }
    match digits[..end].parse::<i64>() {
        Ok(v) => {
            let v = if negative { -v } else { v };
            if i32::try_from(v).is_ok() {
                v
            } else {
                -1
            }
        }
        Err(_) => -1,
    }
}

/// Whether a dotted version is at least `min` (Pacemaker's `compare_version`: missing parts are 0).
fn version_at_least(version: &str, min: &[u64]) -> bool {
    let parts: Vec<u64> = version.split('.').map(|p| p.parse().unwrap_or(0)).collect();
    for i in 0..min.len().max(parts.len()) {
        let (a, b) = (parts.get(i).copied().unwrap_or(0), min.get(i).copied().unwrap_or(0));
        if a != b {
            return a > b;
        }
    }
    true
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    /// XML any parser reads back to the same values.
    Xml,
    /// Pacemaker's filtered, unformatted dump that its digest is taken of.
    Digest,
}

/// The attributes Pacemaker's filtered dump leaves out (`pcmk__xa_filterable`).
const FILTERED: [&str; 5] = [
    "crm-debug-origin",
    "cib-last-written",
    "update-origin",
    "update-client",
    "update-user",
];

fn write_start(out: &mut String, names: &Names, e: &Element, style: Style) {
    out.push('<');
    out.push_str(names.name(e.name));
    for (name, value) in e.attrs(names) {
        if style == Style::Digest && FILTERED.contains(&name) {
            continue;
        }
        out.push(' ');
        out.push_str(name);
        out.push_str("=\"");
        match style {
            Style::Xml => escape_xml(out, value),
            Style::Digest => escape_pacemaker(out, value),
        }
        out.push('"');
    }
}

fn write_element(out: &mut String, names: &Names, e: &Element, style: Style) {
    write_start(out, names, e, style);
    if e.children.is_empty() {
        out.push_str("/>");
        return;
    }
    out.push('>');
    for child in &e.children {
        match child {
            Node::Element(c) => write_element(out, names, c, style),
            Node::Comment(text) => {
                out.push_str("<!--");
                out.push_str(text);
                out.push_str("-->");
            }
            // Pacemaker's dump leaves text out.
            Node::Text(_) if style == Style::Digest => {}
            Node::Text(text) => escape_xml(out, text),
        }
    }
    out.push_str("</");
    out.push_str(names.name(e.name));
    out.push('>');
}

/// Escapes an attribute value (or text) so that an XML parser reads back exactly `value`.
fn escape_xml(out: &mut String, value: &str) {
    for ch in value.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            c => out.push(c),
        }
    }
}

/// Pacemaker 2.1's `crm_xml_escape`, which its digest dump uses, byte for byte: markup characters as
/// entities, a tab as four spaces, a newline or carriage return as `\n` or `\r`, other control characters
/// as a backslash and three octal digits; and from the first character outside ASCII on, nothing more is
/// escaped (its loop stops there).
fn escape_pacemaker(out: &mut String, value: &str) {
    for (i, ch) in value.char_indices() {
        match ch {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '&' => out.push_str("&amp;"),
            '\t' => out.push_str("    "),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if !c.is_ascii() => {
                out.push_str(&value[i..]);
                return;
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\{:03o}", c as u32);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_read_as_pacemaker_reads_them() {
        for (text, value) in [
            ("3", 3),
            (" +3", 3),
            ("-3", -3),
            ("12abc", 12),
            ("abc", -1),
            ("", -1),
            ("-", -1),
            ("2147483647", 2147483647),
            ("2147483648", -1),
            ("99999999999999999999999", -1),
        ] {
            assert_eq!(int_value(text), value, "{text:?}");
        }
    }

    #[test]
    fn paths_split_as_pacemaker_splits_them() {
        let steps = |p: &str| {
            split_path(p).map(|s| {
                s.iter()
                    .map(|s| (s.name.to_string(), s.id.map(str::to_string)))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            steps("/cib/configuration/resources/primitive[@id='vm1']"),
            Some(vec![
                ("cib".into(), None),
                ("configuration".into(), None),
                ("resources".into(), None),
                ("primitive".into(), Some("vm1".into()))
            ])
        );
        // Another predicate, or an empty id, is ignored: the first element of that name matches.
        assert_eq!(
            steps("/cib/x[@name='a']"),
            Some(vec![("cib".into(), None), ("x".into(), None)])
        );
        assert_eq!(
            steps("/cib/x[@id='']"),
            Some(vec![("cib".into(), None), ("x".into(), None)])
        );
        for bad in ["", "cib", "/", "/cib//x", "/cib/", "/[@id='a']"] {
            assert_eq!(steps(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn several_creates_under_one_parent_all_land() {
        let mut doc = Doc::parse(
            r#"<cib admin_epoch="0" epoch="1" num_updates="0"><configuration><resources/></configuration></cib>"#,
        )
        .unwrap();
        let diff = r#"<diff format="2"><version><source admin_epoch="0" epoch="1" num_updates="0"/><target admin_epoch="0" epoch="2" num_updates="0"/></version><change operation="create" path="/cib/configuration/resources" position="1"><primitive id="b"/></change><change operation="create" path="/cib/configuration/resources" position="0"><primitive id="a"/></change><change operation="create" path="/cib/configuration/resources" position="2"><primitive id="c"/></change></diff>"#;
        assert_eq!(doc.apply(diff), Applied::Yes);
        let ids: Vec<&str> = doc
            .root()
            .first("configuration")
            .and_then(|c| c.first("resources"))
            .map(|r| r.elements().filter_map(|e| e.attr("id")).collect())
            .unwrap_or_default();
        assert_eq!(ids, ["a", "b", "c"]);
        assert!(!doc.to_text().contains("mark"));
    }
}
