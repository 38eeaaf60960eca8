//! Files an instantiate creates from an archive's plan: confined to the storage roots the operator
//! mapped. A destination is normalised ([`vmha_vcluster::domain_check::normalise`]: absolute, no `..`)
//! and split into a root and the rest; the root directory is opened (the operator named it: a link there
//! is the operator's), the rest is opened relative to it with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, so no link and no `..` on the way leads out, and the
//! file itself is created with `O_CREAT | O_EXCL | O_NOFOLLOW`: nothing existing is overwritten or
//! followed. Staged files are put in place with `linkat` (which does not replace an existing file) and
//! removed with `unlinkat`, all relative to the directory opened once.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use vmha_vcluster::domain_check::{normalise, under};
use vmha_vcluster::printable;

/// A directory under a storage root, opened without following links, and the path it was opened as
/// (for messages).
#[derive(Debug, Clone)]
pub struct ConfinedDir {
    fd: Arc<OwnedFd>,
    shown: PathBuf,
}

/// A file name in a [`ConfinedDir`].
#[derive(Debug, Clone)]
pub struct ConfinedPath {
    pub dir: ConfinedDir,
    pub name: String,
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

impl ConfinedPath {
    /// Locates `path` under the longest of `roots` it normalises to a place under, and opens its
    /// directory. Fails, naming the path, when it is outside every root, holds `..`, is a root itself, or
    /// a directory on the way is missing or a link.
    pub fn locate(path: &str, roots: &[String]) -> Result<ConfinedPath> {
        let shown = printable(path);
        let p = normalise(path).ok_or_else(|| anyhow!("{shown}: not an absolute path without '..'"))?;
        let root = roots
            .iter()
            .filter_map(|r| normalise(r))
            .filter(|r| under(&p, r))
            .max_by_key(String::len)
            .ok_or_else(|| anyhow!("{shown} is outside every storage root ({})", roots.join(", ")))?;
        let rest = p[root.len()..].trim_start_matches('/');
        let (dir, name) = match rest.rsplit_once('/') {
            Some((dir, name)) => (dir, name),
            None => ("", rest),
        };
        if name.is_empty() {
            bail!("{shown} is a storage root, not a file in one");
        }
        let root_fd = rustix::fs::open(
            root.as_str(),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening storage directory {}", printable(&root)))?;
        let fd = if dir.is_empty() {
            root_fd
        } else {
            rustix::fs::openat2(
                &root_fd,
                dir,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::empty(),
                RESOLVE,
            )
            .with_context(|| {
                format!(
                    "opening {} under storage directory {} (missing, or a link: links are not followed)",
                    printable(dir),
                    printable(&root)
                )
            })?
        };
        Ok(ConfinedPath {
            dir: ConfinedDir {
                fd: Arc::new(fd),
                shown: PathBuf::from(format!("{root}/{dir}")),
            },
            name: name.to_string(),
        })
    }

    /// The path for messages.
    pub fn shown(&self) -> PathBuf {
        self.dir.shown.join(&self.name)
    }

    /// Another name in the same directory.
    pub fn sibling(&self, name: String) -> ConfinedPath {
        ConfinedPath {
            dir: self.dir.clone(),
            name,
        }
    }

    /// Creates the file, which must not exist (not even as a link), for writing.
    pub fn create_new(&self) -> Result<File> {
        let fd = rustix::fs::openat2(
            &*self.dir.fd,
            self.name.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o666),
            RESOLVE,
        )
        .with_context(|| {
            format!(
                "creating {} (it must not exist yet)",
                printable(&self.shown().to_string_lossy())
            )
        })?;
        Ok(File::from(fd))
    }

    /// Gives the file another name in the same directory without replacing anything there.
    pub fn link_to(&self, to: &ConfinedPath) -> Result<()> {
        rustix::fs::linkat(
            &*self.dir.fd,
            self.name.as_str(),
            &*to.dir.fd,
            to.name.as_str(),
            AtFlags::empty(),
        )
        .with_context(|| format!("placing {}", printable(&to.shown().to_string_lossy())))
    }

    /// Removes the name.
    pub fn remove(&self) -> Result<()> {
        rustix::fs::unlinkat(&*self.dir.fd, self.name.as_str(), AtFlags::empty())
            .with_context(|| format!("removing {}", printable(&self.shown().to_string_lossy())))
    }

    /// Free bytes for unprivileged writers on the directory's file system, and its id.
    pub fn free_space(&self) -> Result<(u64, u64)> {
        let s =
            rustix::fs::fstatvfs(&*self.dir.fd).with_context(|| format!("statvfs of {}", self.dir.shown.display()))?;
        Ok((s.f_bavail.saturating_mul(s.f_frsize), s.f_fsid))
    }
}

/// Checks that the file systems under `files` (each with the bytes it will hold at most) have room.
pub fn check_free_space<'a>(files: impl IntoIterator<Item = (&'a ConfinedPath, u64)>) -> Result<()> {
    let mut need: std::collections::BTreeMap<u64, (u64, u64, PathBuf)> = Default::default();
    for (f, bytes) in files {
        let (free, fsid) = f.free_space()?;
        let e = need.entry(fsid).or_insert((0, free, f.dir.shown.clone()));
        e.0 = e.0.saturating_add(bytes);
    }
    for (need, free, dir) in need.values() {
        if need > free {
            bail!(
                "not enough free space for the disks in {}: they need up to {} MiB, the file system has {} MiB free",
                dir.display(),
                need >> 20,
                free >> 20
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::Path;

    fn temp_root(what: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmha-confined-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("sub")).unwrap();
        d
    }

    #[test]
    fn files_are_created_only_under_a_root_without_links_or_overwriting() {
        let root = temp_root("create");
        let roots = vec![root.to_string_lossy().into_owned()];
        let r = root.display();
        let f = ConfinedPath::locate(&format!("{r}/sub//./a.img"), &roots).unwrap();
        f.create_new().unwrap().write_all(b"x").unwrap();
        assert_eq!(std::fs::read(root.join("sub/a.img")).unwrap(), b"x");
        // Not twice, and not over a link.
        assert!(f.create_new().unwrap_err().to_string().contains("must not exist"));
        std::os::unix::fs::symlink("/etc/passwd-vmha-nonexistent", root.join("sub/link.img")).unwrap();
        let l = ConfinedPath::locate(&format!("{r}/sub/link.img"), &roots).unwrap();
        assert!(l.create_new().is_err());
        assert!(!Path::new("/etc/passwd-vmha-nonexistent").exists());
        // A linked directory on the way is not followed.
        std::os::unix::fs::symlink("/tmp", root.join("out")).unwrap();
        let e = ConfinedPath::locate(&format!("{r}/out/x.img"), &roots).unwrap_err();
        assert!(format!("{e:#}").contains("links are not followed"), "{e:#}");
        // Outside, '..', the root itself.
        for bad in [
            "/etc/x.xml".to_string(),
            format!("{r}/sub/../../x"),
            format!("{r}/"),
            "rel/x".into(),
        ] {
            assert!(ConfinedPath::locate(&bad, &roots).is_err(), "{bad}");
        }
        // Staging: link into place without replacing, then remove the staged name.
        let stage = f.sibling(".b.img.vmha-partial".into());
        stage.create_new().unwrap();
        let to = f.sibling("b.img".into());
        stage.link_to(&to).unwrap();
        stage.remove().unwrap();
        assert!(root.join("sub/b.img").exists() && !root.join("sub/.b.img.vmha-partial").exists());
        assert!(to.link_to(&f).is_err(), "linkat does not replace a file");
        check_free_space([(&f, 1)]).unwrap();
        let e = check_free_space([(&f, u64::MAX / 2), (&to, u64::MAX / 2)]).unwrap_err();
        assert!(e.to_string().contains("not enough free space"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
