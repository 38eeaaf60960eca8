//! Remembers which domain a resource started on this host, so that stop and monitor still find it
//! when the `config` file has become unreadable (shared storage gone).
//!
//! The record lives in a runtime directory (`$HA_RSCTMP`, default `/run/resource-agents`), which is
//! emptied at boot: no record means this agent started nothing for the resource since boot.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The runtime directory used when `HA_RSCTMP` is unset.
pub const DEFAULT_DIR: &str = "/run/resource-agents";

/// The record of one resource instance's domain name on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameCache {
    path: PathBuf,
}

impl NameCache {
    /// The record for resource `instance` in `dir`. Characters that cannot appear in a file name
    /// are replaced.
    pub fn new(dir: &Path, instance: &str) -> NameCache {
        let safe: String = instance
            .chars()
            .map(|c| if c == '/' || c.is_control() { '_' } else { c })
            .collect();
        NameCache {
            path: dir.join(format!("vmha-VirtualMachine-{safe}.domain")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded name, if any.
    pub fn read(&self) -> Option<String> {
        let text = fs::read_to_string(&self.path).ok()?;
        let name = text.trim();
        (!name.is_empty()).then(|| name.to_owned())
    }

    /// Records `name`, creating the directory if needed (atomically: write, then rename).
    pub fn write(&self, name: &str) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        fs::write(&tmp, format!("{name}\n"))?;
        fs::rename(&tmp, &self.path)
    }

    /// Forgets the record; a missing record is fine.
    pub fn remove(&self) -> io::Result<()> {
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmha-name-cache-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn write_read_remove() {
        let dir = scratch_dir("cycle");
        let cache = NameCache::new(&dir.join("sub"), "vm-web:0");
        assert_eq!(cache.read(), None);
        cache.write("web1").expect("write");
        assert_eq!(cache.read().as_deref(), Some("web1"));
        cache.write("web2").expect("overwrite");
        assert_eq!(cache.read().as_deref(), Some("web2"));
        cache.remove().expect("remove");
        assert_eq!(cache.read(), None);
        cache.remove().expect("removing twice is fine");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn instance_names_cannot_escape_the_directory() {
        let cache = NameCache::new(Path::new("/run/x"), "../../etc/passwd");
        assert_eq!(cache.path().parent(), Some(Path::new("/run/x")));
        assert!(cache
            .path()
            .to_string_lossy()
            .ends_with("vmha-VirtualMachine-.._.._etc_passwd.domain"));
    }
}
