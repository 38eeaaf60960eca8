//! The commit record of a replication round: what makes the renames of one round all-or-nothing.
//!
//! A round writes every disk's copy beside the peer's image (a hidden partial file, synced) and then
//! renames each over its image. The renames are one after another: a round that dies between two of
//! them would leave the peer with images of two points in time. So before the first rename the round
//! writes its record, the list of the images it is about to replace, into every directory they are in
//! (each copy written aside, synced, renamed into place, the directory synced). From the first record on
//! disk, the round is committed: whoever finds a record completes it ([`complete_in`]) by renaming the
//! round's partial files that are still there over their images, then removes the record. A round that
//! dies before its first record leaves only partial files, which later rounds remove: the peer keeps
//! the previous point whole.
//!
//! Who completes: the round itself (it removes its records once all its renames are done); the next
//! round at the site holding the ticket, before it starts; and the resource agent at the peer, before
//! it starts a VM whose disks are in such a directory (a failover after the holding site died mid-round).
//!
//! The records are on shared storage, so they are untrusted input: a record is read only when it is a
//! regular file (not a symbolic link) of at most [`MAX_BYTES`], not writable by group or others, named
//! for its round; it names at most [`MAX_IMAGES`] images, each an absolute, normal path. Completing a
//! record in a directory only ever renames `DIR/.NAME.ROUND.vmha-replica` over `DIR/NAME`, for the names
//! it lists in that directory: a forged record can do no more than install a partial copy that is
//! already there.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::replica::partial_name;

/// Start of a record's file name; the round's id and [`SUFFIX`] follow.
pub const PREFIX: &str = ".vmha-round-";
/// End of a record's file name.
pub const SUFFIX: &str = ".json";
/// The largest record read.
pub const MAX_BYTES: u64 = 1 << 20;
/// The most images one record may name.
pub const MAX_IMAGES: usize = 4096;
/// The version this build writes and reads.
pub const VERSION: u32 = 1;

/// A round's commit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundRecord {
    pub version: u32,
    /// The virtual cluster replicated (for the operator; not used to act).
    pub vcluster: String,
    /// The round's id: hexadecimal, as in its partial files' names.
    pub round: String,
    /// The round's consistent point, RFC 3339 (for the operator).
    pub point: String,
    /// The peer's images the round replaces (absolute paths).
    pub images: Vec<String>,
}

/// Why a record was not acted on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("replication round record {path}: {why}")]
    Invalid { path: String, why: String },
    #[error("replication round record {path}: {why}")]
    Io { path: String, why: String },
}

fn invalid(path: &Path, why: impl Into<String>) -> RecordError {
    RecordError::Invalid {
        path: crate::printable(&path.display().to_string()),
        why: why.into(),
    }
}

fn io(path: &Path, what: &str, e: &std::io::Error) -> RecordError {
    RecordError::Io {
        path: crate::printable(&path.display().to_string()),
        why: format!("{what}: {e}"),
    }
}

/// A round id as rounds draw them: 1 to 64 hexadecimal digits.
fn valid_round(round: &str) -> bool {
    !round.is_empty() && round.len() <= 64 && round.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The record's file name for round `round`.
pub fn file_name(round: &str) -> String {
    format!("{PREFIX}{round}{SUFFIX}")
}

/// The round of a record's file name, when `name` is one.
pub fn round_of(name: &str) -> Option<&str> {
    name.strip_prefix(PREFIX)
        .and_then(|n| n.strip_suffix(SUFFIX))
        .filter(|r| valid_round(r))
}

/// Whether `image` is a path a record may name: absolute, UTF-8 without control characters, only normal
/// components, a file name that is not hidden.
fn valid_image(image: &str) -> bool {
    let p = Path::new(image);
    image.len() <= 4096
        && p.is_absolute()
        && !image.ends_with('/')
        && !image.chars().any(char::is_control)
        && image.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != "..")
        && p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.starts_with('.'))
}

impl RoundRecord {
    /// Parses and checks a record's text.
    pub fn parse(path: &Path, text: &str) -> Result<RoundRecord, RecordError> {
        let r: RoundRecord = serde_json::from_str(text).map_err(|e| invalid(path, format!("not a record: {e}")))?;
        if r.version != VERSION {
            return Err(invalid(
                path,
                format!("version {} (this build reads {VERSION})", r.version),
            ));
        }
        if !valid_round(&r.round) {
            return Err(invalid(path, "the round id is not 1-64 hexadecimal digits"));
        }
        if r.images.is_empty() || r.images.len() > MAX_IMAGES {
            return Err(invalid(path, format!("{} images (1 to {MAX_IMAGES})", r.images.len())));
        }
        if let Some(bad) = r.images.iter().find(|i| !valid_image(i)) {
            return Err(invalid(
                path,
                format!("the image path {} is not absolute and normal", crate::printable(bad)),
            ));
        }
        Ok(r)
    }

    /// The directories the images are in, each once.
    pub fn directories(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self
            .images
            .iter()
            .filter_map(|i| Path::new(i).parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// The images in `dir`.
    pub fn images_in<'a>(&'a self, dir: &'a Path) -> impl Iterator<Item = &'a str> + 'a {
        self.images
            .iter()
            .filter(move |i| Path::new(i).parent() == Some(dir))
            .map(String::as_str)
    }

    /// Writes the record into every directory of its images (aside, synced, renamed into place, the
    /// directory synced). Returns the records written; on error, the ones written so far are removed
    /// again (the round is then not committed and must not rename anything).
    pub fn commit(&self) -> Result<Vec<PathBuf>, RecordError> {
        let text = serde_json::to_string(self).map_err(|e| invalid(Path::new(&self.round), e.to_string()))?;
        let mut written = Vec::new();
        for dir in self.directories() {
            match write_synced(&dir, &file_name(&self.round), text.as_bytes()) {
                Ok(path) => written.push(path),
                Err(e) => {
                    for p in &written {
                        let _ = fs::remove_file(p);
                    }
                    return Err(e);
                }
            }
        }
        Ok(written)
    }
}

fn sync_dir(dir: &Path) -> Result<(), RecordError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, "syncing the directory", &e))
}

fn write_synced(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, RecordError> {
    let path = dir.join(name);
    let aside = dir.join(format!("{name}.tmp"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&aside)
        .map_err(|e| io(&aside, "creating", &e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| io(&aside, "writing", &e))?;
    fs::rename(&aside, &path).map_err(|e| io(&path, "renaming into place", &e))?;
    sync_dir(dir)?;
    Ok(path)
}

/// Reads the record at `path` under the rules of the module documentation.
pub fn read(path: &Path) -> Result<RoundRecord, RecordError> {
    use std::io::Read as _;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let Some(round) = round_of(name) else {
        return Err(invalid(path, "not named for a round"));
    };
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io(path, "opening (a symbolic link is refused)", &e))?;
    let meta = f.metadata().map_err(|e| io(path, "reading its metadata", &e))?;
    if !meta.is_file() {
        return Err(invalid(path, "not a regular file"));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(invalid(path, "writable by group or others"));
    }
    if meta.len() > MAX_BYTES {
        return Err(invalid(path, format!("{} bytes (at most {MAX_BYTES})", meta.len())));
    }
    let mut text = String::new();
    f.take(MAX_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| io(path, "reading", &e))?;
    let r = RoundRecord::parse(path, &text)?;
    if r.round != round {
        return Err(invalid(
            path,
            format!("names round {} in the file of round {round}", r.round),
        ));
    }
    Ok(r)
}

/// What [`complete_in`] did with one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    pub record: PathBuf,
    pub vcluster: String,
    pub point: String,
    /// Partial copies renamed over their images now (the others were renamed before).
    pub renamed: usize,
}

/// Completes every round whose record is in `dir`: renames the round's partial copies of the images in
/// `dir` that are still there over their images, syncs the directory, removes the record. A record that
/// cannot be read is an error for it (the others are still completed); so is a rename that fails, and
/// the record then stays for the next try.
pub fn complete_in(dir: &Path) -> Vec<Result<Completed, RecordError>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => return vec![Err(io(dir, "listing the directory", &e))],
    };
    let mut records: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_str().and_then(round_of).is_some())
        .map(|e| e.path())
        .collect();
    records.sort();
    records.into_iter().map(|path| complete_one(dir, &path)).collect()
}

/// What [`complete_for`] did: the rounds it completed that renamed something, and the records it could not
/// act on (left where they are).
#[derive(Debug, Default)]
pub struct Sweep {
    pub completed: Vec<Completed>,
    pub invalid: Vec<RecordError>,
}

/// [`complete_in`] every directory of `images` (each once). A rename or I/O failure ends the sweep with that
/// error: the images are then not fit to start from or replicate over.
pub fn complete_for<'a>(images: impl IntoIterator<Item = &'a str>) -> Result<Sweep, RecordError> {
    let dirs: std::collections::BTreeSet<&Path> = images.into_iter().filter_map(|i| Path::new(i).parent()).collect();
    let mut sweep = Sweep::default();
    for dir in dirs {
        for done in complete_in(dir) {
            match done {
                Ok(c) if c.renamed > 0 => sweep.completed.push(c),
                Ok(_) => {}
                Err(e @ RecordError::Invalid { .. }) => sweep.invalid.push(e),
                Err(e) => return Err(e),
            }
        }
    }
    Ok(sweep)
}

fn complete_one(dir: &Path, path: &Path) -> Result<Completed, RecordError> {
    let r = match read(path) {
        Ok(r) => r,
        // Removed meanwhile by another completer: nothing left to do.
        Err(RecordError::Io { .. }) if !path.exists() => {
            return Ok(Completed {
                record: path.to_path_buf(),
                vcluster: String::new(),
                point: String::new(),
                renamed: 0,
            })
        }
        Err(e) => return Err(e),
    };
    let mut renamed = 0;
    for image in r.images_in(dir) {
        let partial = PathBuf::from(partial_name(image, &r.round));
        match fs::symlink_metadata(&partial) {
            Ok(m) if m.is_file() => match fs::rename(&partial, image) {
                Ok(()) => renamed += 1,
                // Renamed by another completer between the look and the rename.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&partial, &format!("renaming over {image}"), &e)),
            },
            Ok(_) => return Err(invalid(&partial, "the partial copy is not a regular file")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&partial, "looking at the partial copy", &e)),
        }
    }
    sync_dir(dir)?;
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(path, "removing the completed record", &e)),
    }
    sync_dir(dir)?;
    Ok(Completed {
        record: path.to_path_buf(),
        vcluster: r.vcluster,
        point: r.point,
        renamed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmha-round-record-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn record(round: &str, images: &[&Path]) -> RoundRecord {
        RoundRecord {
            version: VERSION,
            vcluster: "vc".into(),
            round: round.into(),
            point: "2026-12-07T23:00:00Z".into(),
            images: images.iter().map(|p| p.display().to_string()).collect(),
        }
    }

    /// A round that died after its record and its first rename: completing the directories finishes
    /// the set (every image of the new point), removes the records, and a second completion does nothing.
    #[test]
    fn a_committed_round_that_died_mid_renames_is_completed() {
        let (a, b) = (scratch("died-a"), scratch("died-b"));
        let images = [a.join("m1.img"), a.join("m2.img"), b.join("m3.img")];
        for i in &images {
            fs::write(i, "old").unwrap();
            fs::write(partial_name(i.to_str().unwrap(), "ab12"), "new").unwrap();
        }
        let r = record("ab12", &images.iter().map(PathBuf::as_path).collect::<Vec<_>>());
        let written = r.commit().unwrap();
        assert_eq!(
            written,
            vec![a.join(".vmha-round-ab12.json"), b.join(".vmha-round-ab12.json")]
        );
        // The round died after renaming m1 only.
        fs::rename(partial_name(images[0].to_str().unwrap(), "ab12"), &images[0]).unwrap();
        let done_a = complete_in(&a);
        assert_eq!(done_a.len(), 1);
        assert_eq!(done_a[0].as_ref().unwrap().renamed, 1, "m2 only: m1 was renamed before");
        let done_b = complete_in(&b);
        assert_eq!(done_b[0].as_ref().unwrap().renamed, 1);
        for i in &images {
            assert_eq!(fs::read_to_string(i).unwrap(), "new", "{}", i.display());
        }
        for d in [&a, &b] {
            let left: Vec<_> = fs::read_dir(d).unwrap().flatten().map(|e| e.file_name()).collect();
            assert_eq!(
                left.len(),
                2 - usize::from(d == &b),
                "only the images are left: {left:?}"
            );
            assert!(complete_in(d).is_empty());
        }
    }

    /// A round that died before its record: nothing is renamed; the peer keeps the previous point.
    #[test]
    fn partial_copies_without_a_record_are_never_renamed() {
        let d = scratch("uncommitted");
        let image = d.join("m1.img");
        fs::write(&image, "old").unwrap();
        fs::write(partial_name(image.to_str().unwrap(), "cd34"), "new").unwrap();
        assert!(complete_in(&d).is_empty());
        assert_eq!(fs::read_to_string(&image).unwrap(), "old");
    }

    #[test]
    fn hostile_records_change_nothing() {
        let d = scratch("hostile");
        let image = d.join("m1.img");
        fs::write(&image, "old").unwrap();
        let partial = partial_name(image.to_str().unwrap(), "ee01");
        fs::write(&partial, "new").unwrap();
        let other = scratch("hostile-other");
        let elsewhere = other.join("secret");
        fs::write(&elsewhere, "keep").unwrap();
        fs::write(partial_name(elsewhere.to_str().unwrap(), "ee01"), "evil").unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let p = d.join(name);
            fs::write(&p, text).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let good = serde_json::to_string(&record("ee01", &[&image])).unwrap();
        let cases = [
            ("world-writable", write(&file_name("ee01"), &good, 0o666)),
            ("not json", write(&file_name("ee02"), "{", 0o600)),
            ("another round's name", write(&file_name("ee03"), &good, 0o600)),
            (
                "a relative path",
                write(
                    &file_name("ee04"),
                    &good.replace(image.to_str().unwrap(), "m1.img").replace("ee01", "ee04"),
                    0o600,
                ),
            ),
            (
                "dot-dot",
                write(
                    &file_name("ee05"),
                    &good
                        .replace(image.to_str().unwrap(), &format!("{}/../x/m1.img", d.display()))
                        .replace("ee01", "ee05"),
                    0o600,
                ),
            ),
            (
                "unknown field",
                write(
                    &file_name("ee06"),
                    &good
                        .replace("\"version\"", "\"x\":1,\"version\"")
                        .replace("ee01", "ee06"),
                    0o600,
                ),
            ),
            (
                "version 2",
                write(
                    &file_name("ee07"),
                    &good.replace("\"version\":1", "\"version\":2").replace("ee01", "ee07"),
                    0o600,
                ),
            ),
        ];
        let results = complete_in(&d);
        assert_eq!(results.len(), cases.len());
        for r in &results {
            assert!(matches!(r, Err(RecordError::Invalid { .. })), "{r:?}");
        }
        // A symbolic link named as a record, to a good record elsewhere: refused.
        let real = other.join(file_name("ee08"));
        fs::write(&real, good.replace("ee01", "ee08")).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&real, d.join(file_name("ee08"))).unwrap();
        assert!(read(&d.join(file_name("ee08"))).is_err());
        // A record naming an image of another directory renames nothing there.
        let cross = other.join("x");
        fs::create_dir_all(&cross).unwrap();
        let r = record("ee01", &[&elsewhere]);
        fs::write(
            d.join(file_name("ee09")),
            serde_json::to_string(&r).unwrap().replace("ee01", "ee09"),
        )
        .unwrap();
        fs::set_permissions(d.join(file_name("ee09")), fs::Permissions::from_mode(0o600)).unwrap();
        let _ = complete_in(&d);
        assert_eq!(fs::read_to_string(&elsewhere).unwrap(), "keep");
        assert_eq!(fs::read_to_string(&image).unwrap(), "old");
    }

    #[test]
    fn names_and_paths() {
        assert_eq!(round_of(".vmha-round-ab12.json"), Some("ab12"));
        assert_eq!(round_of(".vmha-round-.json"), None);
        assert_eq!(round_of(".vmha-round-xyz.json"), None);
        assert_eq!(round_of(".vmha-round-ab12.json.tmp"), None);
        assert!(valid_image("/srv/peer/m1.img"));
        for bad in [
            "m1.img",
            "/srv/../m1.img",
            "/srv/./m1.img",
            "/srv//m1.img",
            "/srv/",
            "/srv/.hidden",
            "/srv/a\nb",
            "/",
        ] {
            assert!(!valid_image(bad), "{bad:?}");
        }
    }
}
