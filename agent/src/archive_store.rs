//! The archive store: virtual-cluster archives vmhad keeps in a directory of its own (root's, mode 0700),
//! named by the caller, for clients that cannot pass a file descriptor over D-Bus (Cockpit's bridge
//! passes none). `CaptureVclusterToStore` writes one, `InstantiateVclusterFromStore` reads one,
//! `StoredArchives` lists them.
//!
//! A caller names an archive, never a path: a name is 1 to 64 of `A-Z a-z 0-9 . _ -`, starting with a
//! letter or digit, and becomes `<dir>/<name>.vmha`. A capture writes `<name>.vmha.partial` (created new,
//! never following a symbolic link) and links it to its final name only when the capture succeeded (a link
//! never replaces an archive that exists), so a failed or interrupted capture leaves no archive; a partial
//! file of a crashed vmhad is never listed or read. An archive is opened without following a symbolic
//! link and must be a regular file.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where vmhad keeps archives unless `--archive-dir` says otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/vmha/archives";

const SUFFIX: &str = ".vmha";
const PARTIAL: &str = ".partial";

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("archive name {0:?}: {1}")]
    BadName(String, &'static str),
    #[error("archive {0} exists already in the store")]
    Exists(String),
    #[error("archive {0} is not in the store")]
    Missing(String),
    #[error("archive store {}: {what}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        what: String,
        source: io::Error,
    },
}

/// Checks an archive name (see the module's documentation).
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let bad = |why| Err(StoreError::BadName(name.chars().take(80).collect(), why));
    if name.is_empty() || name.len() > 64 {
        return bad("must be 1 to 64 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return bad("may hold only letters, digits, '.', '_' and '-'");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return bad("must start with a letter or a digit");
    }
    Ok(())
}

/// The store in `dir`.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// A capture's file, being written: linked to its name by [`Pending::finish`], removed when dropped
/// unfinished.
#[derive(Debug)]
pub struct Pending {
    partial: PathBuf,
    path: PathBuf,
    name: String,
    done: bool,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Store {
        Store { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, what: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError + '_ {
        let what = what.into();
        move |source| StoreError::Io {
            dir: self.dir.clone(),
            what,
            source,
        }
    }

    fn path(&self, name: &str) -> Result<PathBuf, StoreError> {
        check_name(name)?;
        Ok(self.dir.join(format!("{name}{SUFFIX}")))
    }

    /// Makes the directory (mode 0700) if it is not there, and checks that it is a directory, not a
    /// symbolic link.
    fn ensure_dir(&self) -> Result<(), StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(self.io("making the directory"))?;
        let meta = fs::symlink_metadata(&self.dir).map_err(self.io("inspecting the directory"))?;
        if !meta.is_dir() {
            return Err(StoreError::Io {
                dir: self.dir.clone(),
                what: "checking the directory".into(),
                source: io::Error::other("not a directory (a symbolic link is not followed)"),
            });
        }
        Ok(())
    }

    /// Creates archive `name`'s file for a capture: refused when the archive exists.
    pub fn create(&self, name: &str) -> Result<(File, Pending), StoreError> {
        let path = self.path(name)?;
        self.ensure_dir()?;
        if fs::symlink_metadata(&path).is_ok() {
            return Err(StoreError::Exists(name.into()));
        }
        let partial = self.dir.join(format!("{name}{SUFFIX}{PARTIAL}"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&partial)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    StoreError::Exists(format!("{name} (a capture into it is under way)"))
                } else {
                    (self.io(format!("creating {}", partial.display())))(e)
                }
            })?;
        Ok((
            file,
            Pending {
                partial,
                path,
                name: name.into(),
                done: false,
            },
        ))
    }

    /// Opens archive `name` for reading.
    pub fn open(&self, name: &str) -> Result<File, StoreError> {
        let path = self.path(name)?;
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => StoreError::Missing(name.into()),
                _ => (self.io(format!("opening {}", path.display())))(e),
            })?;
        let meta = file
            .metadata()
            .map_err(self.io(format!("inspecting {}", path.display())))?;
        if !meta.is_file() {
            return Err(StoreError::Io {
                dir: self.dir.clone(),
                what: format!("opening {}", path.display()),
                source: io::Error::other("not a regular file"),
            });
        }
        Ok(file)
    }

    /// The archives in the store: (name, bytes, modified as seconds since the epoch), by name. Partial
    /// files, symbolic links, other files and names the store would not take are left out; a missing
    /// directory is an empty store.
    pub fn list(&self) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err((self.io("listing the directory"))(e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(SUFFIX)) else {
                continue;
            };
            if check_name(name).is_err() {
                continue;
            }
            let Ok(meta) = fs::symlink_metadata(entry.path()) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            out.push((name.to_string(), meta.len(), modified));
        }
        out.sort();
        Ok(out)
    }
}

impl Pending {
    /// Gives the written archive its name (a hard link: never over an archive that appeared meanwhile)
    /// and removes the partial name.
    pub fn finish(mut self) -> Result<PathBuf, StoreError> {
        let dir = self.path.parent().map(Path::to_path_buf).unwrap_or_default();
        let linked = fs::hard_link(&self.partial, &self.path);
        let _ = fs::remove_file(&self.partial);
        self.done = true;
        match linked {
            Ok(()) => Ok(self.path.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(StoreError::Exists(self.name.clone())),
            Err(source) => Err(StoreError::Io {
                dir,
                what: format!("naming {}", self.path.display()),
                source,
            }),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.partial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A scratch directory of its own per test, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn store() -> (Scratch, Store) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmha-archive-store-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let s = Store::new(dir.join("archives"));
        (Scratch(dir), s)
    }

    #[test]
    fn names_are_names_not_paths() {
        for ok in ["shop", "shop-2026.12.06_1", "A", &"x".repeat(64)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../etc/passwd",
            "a/b",
            ".hidden",
            "-rf",
            "a b",
            "caf\u{e9}",
            "x\0y",
            &"x".repeat(65),
            "a\n",
        ] {
            assert!(matches!(check_name(bad), Err(StoreError::BadName(..))), "{bad:?}");
        }
    }

    #[test]
    fn a_capture_is_named_only_when_finished_and_never_over_another() {
        let (_t, s) = store();
        assert_eq!(s.list().unwrap(), [], "a missing directory is an empty store");
        let (mut f, pending) = s.create("shop").unwrap();
        f.write_all(b"archive").unwrap();
        assert_eq!(s.list().unwrap(), [], "a partial archive is not listed");
        assert!(matches!(s.open("shop"), Err(StoreError::Missing(_))));
        assert!(
            matches!(s.create("shop"), Err(StoreError::Exists(_))),
            "one capture into a name at a time"
        );
        pending.finish().unwrap();
        let listed = s.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].0.as_str(), listed[0].1), ("shop", 7));
        assert!(matches!(s.create("shop"), Err(StoreError::Exists(_))));
        let mut text = String::new();
        std::io::Read::read_to_string(&mut s.open("shop").unwrap(), &mut text).unwrap();
        assert_eq!(text, "archive");
        let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(s.dir()).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_failed_capture_leaves_nothing() {
        let (_t, s) = store();
        let (mut f, pending) = s.create("shop").unwrap();
        f.write_all(b"half").unwrap();
        drop(pending);
        assert_eq!(s.list().unwrap(), []);
        assert_eq!(fs::read_dir(s.dir()).unwrap().count(), 0, "the partial file is gone");
        // The name is free again.
        s.create("shop").unwrap();
    }

    #[test]
    fn links_and_other_files_are_neither_listed_nor_opened() {
        let (t, s) = store();
        s.ensure_dir().unwrap();
        let outside = t.path().join("secret");
        fs::write(&outside, "root's").unwrap();
        std::os::unix::fs::symlink(&outside, s.dir().join("link.vmha")).unwrap();
        fs::create_dir(s.dir().join("dir.vmha")).unwrap();
        fs::write(s.dir().join("other.txt"), "x").unwrap();
        fs::write(s.dir().join(".hidden.vmha"), "x").unwrap();
        assert_eq!(s.list().unwrap(), []);
        assert!(
            matches!(s.open("link"), Err(StoreError::Io { .. })),
            "a link is not followed"
        );
        assert!(s.open("dir").is_err());
        // A link planted as the partial name is not written through.
        std::os::unix::fs::symlink(&outside, s.dir().join("x.vmha.partial")).unwrap();
        assert!(s.create("x").is_err());
        assert_eq!(fs::read_to_string(&outside).unwrap(), "root's");
        // A store directory that is a link is refused.
        let (t2, _) = store();
        let real = t2.path().join("real");
        fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, t2.path().join("archives")).unwrap();
        assert!(Store::new(t2.path().join("archives")).create("y").is_err());
    }
}
