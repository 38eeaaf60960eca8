//! A small mutable XML element tree for the simulated CIB: parsed with roxmltree, changed the way
//! Pacemaker's CIB API changes its document (create under a section, merge by tag and id, delete by tag
//! and id), written back with escaped attributes. Text content is not kept (the CIB has none).

use vmha_model::change::escape;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
}

impl Element {
    pub fn new(name: &str) -> Self {
        Element {
            name: name.to_string(),
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }

    pub fn parse(xml: &str) -> Result<Self, String> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
        Ok(Self::from_node(doc.root_element()))
    }

    fn from_node(node: roxmltree::Node) -> Self {
        Element {
            name: node.tag_name().name().to_string(),
            attrs: node
                .attributes()
                .map(|a| (a.name().to_string(), a.value().to_string()))
                .collect(),
            children: node
                .children()
                .filter(|c| c.is_element())
                .map(Self::from_node)
                .collect(),
        }
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn set_attr(&mut self, name: &str, value: &str) {
        match self.attrs.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => *v = value.to_string(),
            None => self.attrs.push((name.to_string(), value.to_string())),
        }
    }

    pub fn id(&self) -> Option<&str> {
        self.attr("id")
    }

    pub fn child_mut(&mut self, name: &str) -> Option<&mut Element> {
        self.children.iter_mut().find(|c| c.name == name)
    }

    /// The first element named `name` at any depth (this one included).
    pub fn find_mut(&mut self, name: &str) -> Option<&mut Element> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter_mut().find_map(|c| c.find_mut(name))
    }

    /// Whether an element with this tag and id exists below (at any depth).
    pub fn contains(&self, name: &str, id: &str) -> bool {
        self.children
            .iter()
            .any(|c| (c.name == name && c.id() == Some(id)) || c.contains(name, id))
    }

    /// Every id below (at any depth).
    pub fn ids(&self, out: &mut Vec<String>) {
        for c in &self.children {
            if let Some(id) = c.id() {
                out.push(id.to_string());
            }
            c.ids(out);
        }
    }

    /// Merges `update` into the element below with the same tag and id (depth first), creating it under
    /// this one when there is none: attributes are set, children merged the same way.
    pub fn merge(&mut self, update: &Element) {
        if let Some(target) = self.find_tagged_mut(&update.name, update.id()) {
            target.merge_into(update);
        } else {
            self.children.push(update.clone());
        }
    }

    fn merge_into(&mut self, update: &Element) {
        for (k, v) in &update.attrs {
            self.set_attr(k, v);
        }
        for child in &update.children {
            match self
                .children
                .iter_mut()
                .find(|c| c.name == child.name && c.id() == child.id())
            {
                Some(existing) => existing.merge_into(child),
                None => self.children.push(child.clone()),
            }
        }
    }

    fn find_tagged_mut(&mut self, name: &str, id: Option<&str>) -> Option<&mut Element> {
        if let Some(i) = self.children.iter().position(|c| c.name == name && c.id() == id) {
            return Some(&mut self.children[i]);
        }
        self.children.iter_mut().find_map(|c| c.find_tagged_mut(name, id))
    }

    /// Removes the first element below with this tag and id (depth first); whether there was one.
    pub fn remove(&mut self, name: &str, id: Option<&str>) -> bool {
        if let Some(i) = self.children.iter().position(|c| c.name == name && c.id() == id) {
            self.children.remove(i);
            return true;
        }
        self.children.iter_mut().any(|c| c.remove(name, id))
    }

    pub fn write(&self, out: &mut String) {
        out.push('<');
        out.push_str(&self.name);
        for (k, v) in &self.attrs {
            out.push_str(&format!(" {k}=\"{}\"", escape(v)));
        }
        if self.children.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        for c in &self.children {
            c.write(out);
        }
        out.push_str(&format!("</{}>", self.name));
    }

    pub fn to_xml(&self) -> String {
        let mut s = String::new();
        self.write(&mut s);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_and_remove_follow_tag_and_id() {
        let mut cib = Element::parse(r#"<nodes><node id="1" uname="a"><instance_attributes id="a-ia"><nvpair id="x" name="x" value="1"/></instance_attributes></node></nodes>"#).unwrap();
        let update = Element::parse(r#"<node id="1"><instance_attributes id="a-ia"><nvpair id="y" name="y" value="&quot;2&quot;"/></instance_attributes></node>"#).unwrap();
        cib.merge(&update);
        assert!(cib.contains("nvpair", "x") && cib.contains("nvpair", "y"));
        assert!(cib.to_xml().contains(r#"value="&quot;2&quot;""#));
        assert!(cib.remove("nvpair", Some("x")));
        assert!(!cib.contains("nvpair", "x"));
        assert!(!cib.remove("nvpair", Some("x")));
    }
}
