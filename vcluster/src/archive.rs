//! The virtual-cluster archive: a zstd-compressed tar stream of regular files, with `MANIFEST.json` as
//! its last entry.
//!
//! ```text
//! cluster/resources.xml    <resources> holding the members' definitions (primitives, groups) as captured
//! cluster/constraints.xml  <constraints> holding the constraints among the members and to hosts
//! cluster/tag.xml          the Pacemaker <tag> naming the members
//! domains/<vm>.xml         each VM's libvirt domain definition
//! disks/<n>/<offset>       with --with-disks: the non-zero chunks of disk image n (offset: 16 hex digits)
//! MANIFEST.json            format and vmha version, source cluster, hosts, creation time, VM-to-host
//!                          mapping, the disks, and the size and sha256 of every other entry
//! ```
//!
//! The manifest comes last so that a capture streams: every checksum is known once its entry is written.
//! [`verify`] reads the whole stream before anything is created and rejects, naming the problem, a
//! truncated or tampered archive, paths that are absolute or hold `..`, links, device files and other
//! non-regular entries, oversized entries, a wrong format version and entries the manifest does not list
//! (or lists but the archive lacks). Disk images are written back by a second pass, [`extract_disks`], that
//! checks every chunk again while it writes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The archive format this version writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's entry name (the last entry).
pub const MANIFEST: &str = "MANIFEST.json";
pub const RESOURCES: &str = "cluster/resources.xml";
pub const CONSTRAINTS: &str = "cluster/constraints.xml";
pub const TAG: &str = "cluster/tag.xml";
/// Disk images are stored in chunks of this size; all-zero chunks are left out (holes).
pub const CHUNK: u64 = 4 << 20;
/// Largest metadata entry (XML, manifest) accepted.
pub const MAX_METADATA: u64 = 16 << 20;
/// Most entries an archive may hold.
pub const MAX_ENTRIES: usize = 4 << 20;

/// Why an archive was rejected or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("truncated or corrupt archive: {0}")]
    Truncated(String),
    #[error("tampered archive: {0}")]
    Tampered(String),
    #[error("hostile archive: {0}")]
    Hostile(String),
    #[error("unsupported archive: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Size and sha256 of one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSum {
    pub size: u64,
    pub sha256: String,
}

/// One VM of the virtual cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    /// The resource id.
    pub resource: String,
    /// Its domain definition in the archive (`domains/<vm>.xml`).
    pub domain_file: String,
}

/// One disk image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    /// Its directory in the archive is `disks/<id>/`.
    pub id: u32,
    /// The VM (resource id) whose domain uses it.
    pub vm: String,
    /// Its path on the source cluster (the domain XML's `<source file>`).
    pub path: String,
    /// Its logical size in bytes.
    pub size: u64,
    /// How many chunks the archive holds (the rest are holes).
    pub chunks: u64,
    /// Bytes of data (non-hole) stored.
    pub stored: u64,
}

/// The archive's table of contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub vmha_version: String,
    /// The virtual cluster's name (its tag).
    pub name: String,
    pub source_cluster: Option<String>,
    /// The source cluster's hosts.
    pub hosts: Vec<String>,
    /// Capture time, RFC 3339 UTC.
    pub created: String,
    /// Whether the VMs were stopped (`--halt`) or frozen while the disks were read.
    pub consistency: String,
    /// Member resource ids.
    pub members: Vec<String>,
    pub vms: Vec<VmEntry>,
    /// VM resource -> the host it ran on at capture time.
    pub placement: BTreeMap<String, String>,
    pub disks: Vec<DiskEntry>,
    /// Every entry but the manifest.
    pub files: BTreeMap<String, FileSum>,
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `2026-11-22T02:47:01Z` for seconds since the epoch (proleptic Gregorian calendar).
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Writes an archive: metadata with [`ArchiveWriter::add_file`], disks with [`ArchiveWriter::add_disk`],
/// then [`ArchiveWriter::finish`] with the manifest (its `files` and `disks` are filled in here).
pub struct ArchiveWriter<W: Write> {
    tar: tar::Builder<zstd::stream::write::Encoder<'static, W>>,
    files: BTreeMap<String, FileSum>,
    disks: Vec<DiskEntry>,
}

impl<W: Write> std::fmt::Debug for ArchiveWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveWriter")
            .field("files", &self.files.len())
            .finish()
    }
}

fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o600);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn is_zero(buf: &[u8]) -> bool {
    let (chunks, rest) = buf.split_at(buf.len() - buf.len() % 16);
    chunks
        .chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
        && rest.iter().all(|&b| b == 0)
}

/// The data regions of a file as `(start, end)` (`SEEK_DATA`/`SEEK_HOLE`; the whole file where the file
/// system does not report holes).
fn data_regions(file: &File, size: u64) -> Vec<(u64, u64)> {
    use nix::unistd::{lseek, Whence};
    let fd = file.as_raw_fd();
    let mut regions = Vec::new();
    let mut pos: i64 = 0;
    let end = size as i64;
    while pos < end {
        let start = match lseek(fd, pos, Whence::SeekData) {
            Ok(start) => start,
            // No data after pos.
            Err(nix::errno::Errno::ENXIO) => break,
            // No hole support: read the rest.
            Err(_) => {
                regions.push((pos as u64, size));
                break;
            }
        };
        let stop = lseek(fd, start, Whence::SeekHole).unwrap_or(end).min(end);
        if stop <= start {
            break;
        }
        regions.push((start as u64, stop as u64));
        pos = stop;
    }
    regions
}

impl<W: Write> ArchiveWriter<W> {
    /// Starts an archive on `out`, zstd at `level` (1 is fast, 3 is zstd's default).
    pub fn new(out: W, level: i32) -> Result<Self, ArchiveError> {
        let mut encoder = zstd::stream::write::Encoder::new(out, level)?;
        encoder.include_checksum(true)?;
        // Compression runs on zstd's worker threads while this one reads, checks for zeros and hashes.
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4)) as u32;
        encoder.multithread(workers)?;
        Ok(ArchiveWriter {
            tar: tar::Builder::new(encoder),
            files: BTreeMap::new(),
            disks: Vec::new(),
        })
    }

    fn append(&mut self, path: &str, data: &[u8]) -> Result<(), ArchiveError> {
        let sum = sha256_hex(data);
        self.append_hashed(path, data, sum)
    }

    /// [`Self::append`] with the data's sha256 computed already.
    fn append_hashed(&mut self, path: &str, data: &[u8], sha256: String) -> Result<(), ArchiveError> {
        check_path(path)?;
        if self.files.contains_key(path) {
            return Err(ArchiveError::Unsupported(format!("entry {path} added twice")));
        }
        let mut h = header(data.len() as u64);
        self.tar.append_data(&mut h, path, data)?;
        self.files.insert(
            path.to_string(),
            FileSum {
                size: data.len() as u64,
                sha256,
            },
        );
        Ok(())
    }

    /// Adds a metadata file.
    pub fn add_file(&mut self, path: &str, data: &[u8]) -> Result<(), ArchiveError> {
        if data.len() as u64 > MAX_METADATA {
            return Err(ArchiveError::Unsupported(format!(
                "{path} is {} bytes, more than the {MAX_METADATA} a metadata entry may hold",
                data.len()
            )));
        }
        self.append(path, data)
    }

    /// Adds a disk image read from `file` (sparse-aware: holes and all-zero chunks are not stored).
    /// `progress` is called with the bytes of the image gone through so far.
    pub fn add_disk(
        &mut self,
        vm: &str,
        path: &str,
        file: &File,
        progress: &mut dyn FnMut(u64),
    ) -> Result<DiskEntry, ArchiveError> {
        let id = self.disks.len() as u32;
        let size = file.metadata()?.len();
        let mut offsets = Vec::new();
        let mut seen = BTreeSet::new();
        for (start, end) in data_regions(file, size) {
            let mut offset = start - start % CHUNK;
            while offset < end {
                if seen.insert(offset) {
                    offsets.push(offset);
                }
                offset += CHUNK;
            }
        }
        let mut chunks = 0;
        let mut stored = 0;
        // A reader thread reads ahead, skips all-zero chunks and hashes the rest, while this one writes
        // into the tar stream and zstd's workers compress: disk, hashing and compression overlap.
        std::thread::scope(|scope| -> Result<(), ArchiveError> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<(u64, Option<(Vec<u8>, String)>)>>(4);
            scope.spawn(move || {
                for offset in offsets {
                    let len = CHUNK.min(size - offset) as usize;
                    let mut buf = vec![0u8; len];
                    let item = file.read_exact_at(&mut buf, offset).map(|()| {
                        let data = (!is_zero(&buf)).then(|| {
                            let sum = sha256_hex(&buf);
                            (buf, sum)
                        });
                        (offset, data)
                    });
                    let failed = item.is_err();
                    if tx.send(item).is_err() || failed {
                        break;
                    }
                }
            });
            for item in rx {
                let (offset, data) = item?;
                if let Some((buf, sum)) = data {
                    self.append_hashed(&format!("disks/{id}/{offset:016x}"), &buf, sum)?;
                    chunks += 1;
                    stored += buf.len() as u64;
                }
                progress((offset + CHUNK).min(size));
            }
            Ok(())
        })?;
        progress(size);
        let entry = DiskEntry {
            id,
            vm: vm.to_string(),
            path: path.to_string(),
            size,
            chunks,
            stored,
        };
        self.disks.push(entry.clone());
        Ok(entry)
    }

    /// Writes the manifest (with the checksums and disks gathered here) and ends the stream.
    pub fn finish(mut self, mut manifest: Manifest) -> Result<(W, Manifest), ArchiveError> {
        manifest.format_version = FORMAT_VERSION;
        manifest.files = std::mem::take(&mut self.files);
        manifest.disks = std::mem::take(&mut self.disks);
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| ArchiveError::Unsupported(e.to_string()))?;
        let mut h = header(json.len() as u64);
        self.tar.append_data(&mut h, MANIFEST, json.as_slice())?;
        let encoder = self.tar.into_inner()?;
        let out = encoder.finish()?;
        Ok((out, manifest))
    }
}

/// Checks an entry name: relative, `/`-separated, no empty, `.` or `..` components, printable ASCII.
fn check_path(path: &str) -> Result<(), ArchiveError> {
    let hostile = |why: &str| Err(ArchiveError::Hostile(format!("entry {path:?}: {why}")));
    if path.starts_with('/') {
        return hostile("absolute path");
    }
    if path.split('/').any(|c| c == "..") {
        return hostile("path holds '..'");
    }
    if path.is_empty() || path.split('/').any(|c| c.is_empty() || c == ".") {
        return hostile("empty or '.' path component");
    }
    if !path.bytes().all(|b| b.is_ascii_graphic()) || path.contains('\\') {
        return hostile("path holds characters other than printable ASCII");
    }
    if path.len() > 255 {
        return hostile("path longer than 255 characters");
    }
    Ok(())
}

/// Where an entry may be and how large it may be: `None` if the layout has no such entry.
fn entry_limit(path: &str) -> Option<u64> {
    if path == MANIFEST || path == RESOURCES || path == CONSTRAINTS || path == TAG {
        return Some(MAX_METADATA);
    }
    if let Some(name) = path.strip_prefix("domains/") {
        return (name.ends_with(".xml") && !name.contains('/')).then_some(MAX_METADATA);
    }
    if let Some(rest) = path.strip_prefix("disks/") {
        let (id, offset) = rest.split_once('/')?;
        let ok = id.parse::<u32>().is_ok()
            && offset.len() == 16
            && u64::from_str_radix(offset, 16).is_ok_and(|o| o % CHUNK == 0);
        return ok.then_some(CHUNK);
    }
    None
}

/// What [`verify`] found: the manifest and the metadata entries (disk chunks are checked, not kept).
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: Manifest,
    pub metadata: BTreeMap<String, Vec<u8>>,
}

impl Verified {
    /// A metadata entry as text.
    pub fn text(&self, path: &str) -> Result<&str, ArchiveError> {
        let data = self
            .metadata
            .get(path)
            .ok_or_else(|| ArchiveError::Tampered(format!("{path} is missing")))?;
        std::str::from_utf8(data).map_err(|_| ArchiveError::Tampered(format!("{path} is not UTF-8")))
    }
}

fn read_error(e: io::Error) -> ArchiveError {
    ArchiveError::Truncated(e.to_string())
}

/// Walks every entry of the archive in `input`, checking its type, path and size, and calls `each` with
/// the path and a reader limited to the entry.
fn walk<R: Read>(
    input: R,
    mut each: impl FnMut(&str, &mut dyn Read, u64) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let decoder = zstd::stream::read::Decoder::new(input).map_err(read_error)?;
    let mut archive = tar::Archive::new(decoder);
    let mut seen = BTreeSet::new();
    let mut manifest_seen = false;
    let entries = archive.entries().map_err(read_error)?;
    for entry in entries {
        let mut entry = entry.map_err(read_error)?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        if !kind.is_file() {
            let what = match kind {
                tar::EntryType::Symlink => "a symbolic link",
                tar::EntryType::Link => "a hard link",
                tar::EntryType::Char => "a character device file",
                tar::EntryType::Block => "a block device file",
                tar::EntryType::Fifo => "a FIFO",
                tar::EntryType::Directory => "a directory",
                _ => "not a regular file",
            };
            return Err(ArchiveError::Hostile(format!("entry {raw:?} is {what}")));
        }
        check_path(&raw)?;
        if manifest_seen {
            return Err(ArchiveError::Hostile(format!("entry {raw:?} follows the manifest")));
        }
        let size = entry.header().size().map_err(read_error)?;
        let limit = entry_limit(&raw)
            .ok_or_else(|| ArchiveError::Hostile(format!("entry {raw:?} is not part of the archive layout")))?;
        if size > limit {
            return Err(ArchiveError::Hostile(format!(
                "entry {raw:?} is oversized: {size} bytes, at most {limit} allowed"
            )));
        }
        if !seen.insert(raw.clone()) {
            return Err(ArchiveError::Hostile(format!("entry {raw:?} appears twice")));
        }
        if seen.len() > MAX_ENTRIES {
            return Err(ArchiveError::Hostile(format!("more than {MAX_ENTRIES} entries")));
        }
        manifest_seen = raw == MANIFEST;
        each(&raw, &mut entry, size)?;
    }
    // Read the compressed stream to its end: the zstd frame's own checksum and a cut-off end are only
    // seen there (tar stops reading at its end-of-archive blocks).
    let mut decoder = archive.into_inner();
    let rest = io::copy(&mut decoder, &mut io::sink()).map_err(read_error)?;
    if rest > 2 * 512 * 20 {
        return Err(ArchiveError::Hostile(format!(
            "{rest} bytes of data after the end of the archive"
        )));
    }
    Ok(())
}

/// Reads an entry whole (its size is already checked), failing if it is shorter than its header says.
fn read_all(reader: &mut dyn Read, size: u64, path: &str) -> Result<Vec<u8>, ArchiveError> {
    let mut data = Vec::with_capacity(size as usize);
    reader.take(size).read_to_end(&mut data).map_err(read_error)?;
    if data.len() as u64 != size {
        return Err(ArchiveError::Truncated(format!("entry {path} ends early")));
    }
    Ok(data)
}

/// Parses a manifest, checking its format version first.
pub fn parse_manifest(data: &[u8]) -> Result<Manifest, ArchiveError> {
    let value: serde_json::Value = serde_json::from_slice(data)
        .map_err(|e| ArchiveError::Tampered(format!("{MANIFEST} is not valid JSON: {e}")))?;
    match value.get("format_version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(FORMAT_VERSION) => {}
        Some(v) => {
            return Err(ArchiveError::Unsupported(format!(
                "format version {v}; this vmha reads format version {FORMAT_VERSION}"
            )))
        }
        None => return Err(ArchiveError::Tampered(format!("{MANIFEST} has no format_version"))),
    }
    serde_json::from_value(value).map_err(|e| ArchiveError::Tampered(format!("{MANIFEST}: {e}")))
}

/// Reads and checks a whole archive (see the module documentation); creates nothing.
pub fn verify<R: Read>(input: R) -> Result<Verified, ArchiveError> {
    let mut sums: BTreeMap<String, FileSum> = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    let mut manifest_data = None;
    // Disk chunks are hashed on a second thread while this one decompresses the next.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(String, Vec<u8>)>(4);
    let hasher = std::thread::spawn(move || {
        rx.into_iter()
            .map(|(path, data)| {
                let sum = FileSum {
                    size: data.len() as u64,
                    sha256: sha256_hex(&data),
                };
                (path, sum)
            })
            .collect::<Vec<_>>()
    });
    let walked = walk(input, |path, reader, size| {
        if path.starts_with("disks/") {
            let data = read_all(reader, size, path)?;
            tx.send((path.to_string(), data))
                .map_err(|_| ArchiveError::Unsupported("the hashing thread stopped".into()))?;
        } else {
            let data = read_all(reader, size, path)?;
            if path == MANIFEST {
                manifest_data = Some(data);
            } else {
                sums.insert(
                    path.to_string(),
                    FileSum {
                        size,
                        sha256: sha256_hex(&data),
                    },
                );
                metadata.insert(path.to_string(), data);
            }
        }
        Ok(())
    });
    drop(tx);
    let hashed = hasher
        .join()
        .map_err(|_| ArchiveError::Unsupported("the hashing thread panicked".into()))?;
    walked?;
    sums.extend(hashed);
    let manifest_data = manifest_data
        .ok_or_else(|| ArchiveError::Truncated(format!("no {MANIFEST} (the archive ends before its last entry)")))?;
    let manifest = parse_manifest(&manifest_data)?;
    for (path, sum) in &sums {
        match manifest.files.get(path) {
            None => {
                return Err(ArchiveError::Tampered(format!(
                    "entry {path} is not listed in the manifest"
                )))
            }
            Some(listed) if listed != sum => {
                return Err(ArchiveError::Tampered(format!(
                    "checksum mismatch for {path}: manifest says {} bytes sha256 {}, archive holds {} bytes sha256 {}",
                    listed.size, listed.sha256, sum.size, sum.sha256
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(missing) = manifest.files.keys().find(|p| !sums.contains_key(*p)) {
        return Err(ArchiveError::Tampered(format!(
            "the manifest lists {missing}, which the archive lacks"
        )));
    }
    check_manifest(&manifest)?;
    Ok(Verified { manifest, metadata })
}

/// Consistency of the manifest with its own file list.
fn check_manifest(m: &Manifest) -> Result<(), ArchiveError> {
    let bad = |why: String| Err(ArchiveError::Tampered(format!("{MANIFEST}: {why}")));
    for required in [RESOURCES, CONSTRAINTS, TAG] {
        if !m.files.contains_key(required) {
            return bad(format!("{required} is not listed"));
        }
    }
    for vm in &m.vms {
        if !m.files.contains_key(&vm.domain_file) || !vm.domain_file.starts_with("domains/") {
            return bad(format!(
                "VM {} names {} as its domain, which is not in the archive",
                vm.resource, vm.domain_file
            ));
        }
        if !m.members.contains(&vm.resource) {
            return bad(format!("VM {} is not a member", vm.resource));
        }
    }
    let mut ids = BTreeSet::new();
    for disk in &m.disks {
        if !ids.insert(disk.id) {
            return bad(format!("disk {} appears twice", disk.id));
        }
        let prefix = format!("disks/{}/", disk.id);
        let chunks: Vec<u64> = m
            .files
            .keys()
            .filter_map(|p| p.strip_prefix(&prefix))
            .filter_map(|o| u64::from_str_radix(o, 16).ok())
            .collect();
        if chunks.len() as u64 != disk.chunks {
            return bad(format!(
                "disk {} lists {} chunks, the archive holds {}",
                disk.id,
                disk.chunks,
                chunks.len()
            ));
        }
        if let Some(o) = chunks.iter().find(|&&o| o >= disk.size) {
            return bad(format!(
                "disk {} has a chunk at {o}, beyond its size {}",
                disk.id, disk.size
            ));
        }
        if !disk.path.starts_with('/') {
            return bad(format!("disk {} has a relative source path {:?}", disk.id, disk.path));
        }
    }
    if let Some(orphan) = m.files.keys().filter_map(|p| p.strip_prefix("disks/")).find(|rest| {
        rest.split_once('/')
            .and_then(|(id, _)| id.parse::<u32>().ok())
            .is_none_or(|id| !ids.contains(&id))
    }) {
        return bad(format!("disks/{orphan} belongs to no listed disk"));
    }
    Ok(())
}

/// Second pass: writes every disk image into the file `open` returns for it (created empty by the caller;
/// its size is set here, holes stay holes), checking each chunk against the manifest again.
/// `progress` gets the bytes written so far.
pub fn extract_disks<R: Read>(
    input: R,
    manifest: &Manifest,
    open: &mut dyn FnMut(&DiskEntry) -> Result<File, ArchiveError>,
    progress: &mut dyn FnMut(u64),
) -> Result<(), ArchiveError> {
    let mut files = BTreeMap::new();
    for disk in &manifest.disks {
        let file = open(disk)?;
        file.set_len(disk.size)?;
        files.insert(disk.id, file);
    }
    let mut written = 0u64;
    // Checking and writing a chunk happen on a second thread while this one decompresses the next.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(String, u32, u64, Vec<u8>)>(4);
    let writer = {
        let files: BTreeMap<u32, File> = files
            .iter()
            .map(|(id, f)| f.try_clone().map(|f| (*id, f)))
            .collect::<io::Result<_>>()?;
        let listed: BTreeMap<String, FileSum> = manifest.files.clone();
        std::thread::spawn(move || -> Result<(), ArchiveError> {
            for (path, id, offset, data) in rx {
                let ok = listed
                    .get(&path)
                    .is_some_and(|l| l.size == data.len() as u64 && l.sha256 == sha256_hex(&data));
                if !ok {
                    return Err(ArchiveError::Tampered(format!(
                        "checksum mismatch for {path} (the file changed since it was verified)"
                    )));
                }
                files[&id].write_all_at(&data, offset)?;
            }
            Ok(())
        })
    };
    let walked = walk(input, |path, reader, size| {
        let Some(rest) = path.strip_prefix("disks/") else {
            io::copy(&mut reader.take(size), &mut io::sink()).map_err(read_error)?;
            return Ok(());
        };
        let (id, offset) = rest.split_once('/').unwrap_or_default();
        let id: u32 = id
            .parse()
            .map_err(|_| ArchiveError::Hostile(format!("bad entry {path}")))?;
        let offset = u64::from_str_radix(offset, 16).map_err(|_| ArchiveError::Hostile(format!("bad entry {path}")))?;
        if !files.contains_key(&id) {
            return Err(ArchiveError::Tampered(format!("{path} belongs to no listed disk")));
        }
        if !manifest.files.contains_key(path) {
            return Err(ArchiveError::Tampered(format!(
                "entry {path} is not listed in the manifest"
            )));
        }
        let data = read_all(reader, size, path)?;
        if tx.send((path.to_string(), id, offset, data)).is_err() {
            // The writer stopped on an error: it is reported below.
            return Ok(());
        }
        written += size;
        progress(written);
        Ok(())
    });
    drop(tx);
    writer
        .join()
        .map_err(|_| ArchiveError::Unsupported("the writing thread panicked".into()))??;
    walked?;
    for file in files.values() {
        file.sync_data()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
