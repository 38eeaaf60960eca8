//! The cluster's relay key, `/etc/vmha/authkey`: generated once (`vmha keygen`) and copied to every host,
//! like Corosync's authkey. vmhad loads it at start; the relay between vmhads runs only with it
//! ([`crate::relay`]). The file must be a regular file owned by root, readable by nobody else.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::envelope::{Key, KeyError, MAX_KEY_FILE};

/// Where the key lives.
pub const AUTHKEY_PATH: &str = "/etc/vmha/authkey";
/// How many random bytes `vmha keygen` writes.
pub const KEYGEN_BYTES: usize = 64;

/// Why the authkey cannot be used or written.
#[derive(Debug, thiserror::Error)]
pub enum AuthKeyError {
    #[error("{path}: missing (generate one with `vmha keygen` on one host and copy it to every host)")]
    Missing { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path}: owned by uid {uid}, must be owned by root (chown root:root {path})")]
    NotRoot { path: PathBuf, uid: u32 },
    #[error("{path}: mode {mode:04o} lets others read it, must be 0600 (chmod 0600 {path})")]
    Readable { path: PathBuf, mode: u32 },
    #[error("{path}: {source}")]
    Content { path: PathBuf, source: KeyError },
    #[error("{path} exists: keep it (copy it to the other hosts) or replace it with --force (then copy the new one to every host)")]
    Exists { path: PathBuf },
    #[error("no random bytes from the kernel: {0}")]
    Random(String),
}

/// Checks an authkey file's owner and mode (pure).
pub fn check_owner_and_mode(path: &Path, uid: u32, mode: u32) -> Result<(), AuthKeyError> {
    if uid != 0 {
        return Err(AuthKeyError::NotRoot {
            path: path.to_path_buf(),
            uid,
        });
    }
    if mode & 0o077 != 0 {
        return Err(AuthKeyError::Readable {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Loads the key at `path`: a regular file (not followed through a link), owned by root, mode 0600 or
/// stricter, of 32..4096 bytes.
pub fn load(path: &Path) -> Result<Key, AuthKeyError> {
    let io = |source: std::io::Error| AuthKeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(AuthKeyError::Missing {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io(e)),
    };
    let meta = file.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(AuthKeyError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    check_owner_and_mode(path, meta.uid(), meta.mode())?;
    let mut bytes = Vec::new();
    (&mut file)
        .take(u64::try_from(MAX_KEY_FILE).unwrap_or(u64::MAX) + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    Key::from_file_bytes(&bytes).map_err(|source| AuthKeyError::Content {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a new random key to `path` with mode 0600, atomically: into a new file next to it, synced, then
/// linked in place (refused when `path` exists, unless `force`, which renames over it). Returns the new
/// key's fingerprint.
pub fn generate(path: &Path, force: bool) -> Result<String, AuthKeyError> {
    let io = |source: std::io::Error| AuthKeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    if !force && path.symlink_metadata().is_ok() {
        return Err(AuthKeyError::Exists {
            path: path.to_path_buf(),
        });
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut bytes = [0u8; KEYGEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| AuthKeyError::Random(e.to_string()))?;
    let fingerprint = crate::envelope::fingerprint(&bytes);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.new-{}", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&tmp)?;
        // The mode is 0600 whatever the umask.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        if force {
            std::fs::rename(&tmp, path)?;
        } else {
            // link() never replaces: a key that appeared meanwhile stays.
            std::fs::hard_link(&tmp, path)?;
            std::fs::remove_file(&tmp)?;
        }
        File::open(dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            return Err(AuthKeyError::Exists {
                path: path.to_path_buf(),
            });
        }
        return Err(io(e));
    }
    Ok(fingerprint)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmha-authkey-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn owner_and_mode_are_checked() {
        let p = Path::new("/etc/vmha/authkey");
        assert!(check_owner_and_mode(p, 0, 0o100600).is_ok());
        assert!(check_owner_and_mode(p, 0, 0o100400).is_ok());
        assert!(matches!(
            check_owner_and_mode(p, 1000, 0o100600),
            Err(AuthKeyError::NotRoot { uid: 1000, .. })
        ));
        for mode in [0o100640, 0o100604, 0o100644] {
            let e = check_owner_and_mode(p, 0, mode).unwrap_err();
            assert!(e.to_string().contains("chmod 0600"), "{e}");
        }
    }

    #[test]
    fn keygen_writes_0600_and_refuses_to_overwrite() {
        let d = scratch("keygen");
        let p = d.join("etc/vmha/authkey");
        let fp = generate(&p, false).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.len(), KEYGEN_BYTES as u64);
        let first = std::fs::read(&p).unwrap();
        assert_eq!(crate::envelope::fingerprint(&first), fp);
        assert!(matches!(generate(&p, false), Err(AuthKeyError::Exists { .. })));
        assert_eq!(std::fs::read(&p).unwrap(), first, "a refused keygen changes nothing");
        let fp2 = generate(&p, true).unwrap();
        assert_ne!(fp, fp2);
        assert_ne!(std::fs::read(&p).unwrap(), first);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
        if nix::unistd::geteuid().is_root() {
            assert_eq!(load(&p).unwrap().fingerprint(), fp2);
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn load_refuses_missing_links_and_readable_keys() {
        let d = scratch("load");
        std::fs::create_dir_all(&d).unwrap();
        assert!(matches!(load(&d.join("none")), Err(AuthKeyError::Missing { .. })));
        let p = d.join("authkey");
        generate(&p, false).unwrap();
        let link = d.join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(
            matches!(load(&link), Err(AuthKeyError::Io { .. })),
            "a link is not followed"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&p).unwrap_err();
        assert!(
            matches!(e, AuthKeyError::Readable { .. } | AuthKeyError::NotRoot { .. }),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
