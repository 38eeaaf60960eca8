//! The virtual-cluster archive: a zstd-compressed tar stream of regular files, in this order:
//!
//! ```text
//! MANIFEST.json            first: format and vmha version, source cluster, hosts, creation time, members,
//!                          VM-to-host mapping, the disks (source path, size) and the size and BLAKE3
//!                          hash of every metadata entry
//! MANIFEST.sig             signed archives only: the signer's public key and its ed25519 signature
//!                          over the manifest
//! cluster/resources.xml    <resources> holding the members' definitions (primitives, groups) as captured
//! cluster/constraints.xml  <constraints> holding the constraints among the members and to hosts
//! cluster/tag.xml          the Pacemaker <tag> naming the members
//! domains/<vm>.xml         each VM's libvirt domain definition
//! disks/<n>/<offset>       with --with-disks: the non-zero chunks of disk image n (offset: 16 hex digits)
//! CHUNKS.json              the size and BLAKE3 hash of every disk chunk
//! CHUNKS.sig               signed archives only, last: the signature over the manifest's hash and the
//!                          chunk list
//! ```
//!
//! A signature (see [`crate::signature`]) is checked where it is read: the manifest's right after the
//! manifest, before the metadata is read or the caller sees anything (an unsigned or untrusted archive
//! is refused there when [`Trust::require`] says so), the chunk list's at the end, before [`read`]
//! succeeds. A bad signature is refused whatever the trust.
//!
//! The plan comes first and the disk checksums last, so both ends stream in one pass: a capture learns a
//! chunk's checksum as it writes the chunk, and an instantiate knows, once it has read the manifest and
//! the (checked) metadata, where every disk goes, and writes the disks while it reads them. [`read`]
//! rejects, naming the problem, a truncated or tampered archive, paths that are absolute or hold `..`,
//! links, device files and other non-regular entries, oversized entries, a wrong format version, entries
//! out of order and entries the manifest or the chunk list does not list (or lists but the archive
//! lacks). Metadata is checked before the caller sees it; disk data is checked by the end of the stream,
//! so a caller writing disks writes them to files it removes unless [`read`] succeeds. [`verify`] checks
//! a whole archive and writes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::signature::{PublicKey, SecretKey, Signer, Trust};

/// The archive format this version writes and reads.
pub const FORMAT_VERSION: u32 = 3;
/// The manifest's entry name (the first entry).
pub const MANIFEST: &str = "MANIFEST.json";
/// The chunk list's entry name (the last entry).
pub const CHUNK_LIST: &str = "CHUNKS.json";
/// The manifest's signature (right after the manifest, signed archives only).
pub const MANIFEST_SIG: &str = "MANIFEST.sig";
/// The chunk list's signature (right after the chunk list, signed archives only).
pub const CHUNKS_SIG: &str = "CHUNKS.sig";
/// Largest signature entry accepted.
pub const MAX_SIGNATURE: u64 = 4096;
/// What the manifest's signature signs: this, then the manifest's bytes.
const MANIFEST_CONTEXT: &[u8] = b"vmha archive format 3: manifest\0";
/// What the chunk list's signature signs: this, the manifest's BLAKE3 hash, then the chunk list's bytes.
const CHUNKS_CONTEXT: &[u8] = b"vmha archive format 3: chunk list\0";
pub const RESOURCES: &str = "cluster/resources.xml";
pub const CONSTRAINTS: &str = "cluster/constraints.xml";
pub const TAG: &str = "cluster/tag.xml";
/// Disk images are stored in chunks of this size; all-zero chunks are left out (holes).
pub const CHUNK: u64 = 4 << 20;
/// Largest metadata entry (XML, manifest) accepted.
pub const MAX_METADATA: u64 = 16 << 20;
/// Most entries an archive may hold.
pub const MAX_ENTRIES: usize = 4 << 20;
/// Largest chunk list accepted (about 128 bytes per chunk).
pub const MAX_CHUNK_LIST: u64 = 128 * MAX_ENTRIES as u64;
/// Most bytes all metadata entries together (manifest, XML) may hold: they are kept in memory.
pub const MAX_METADATA_TOTAL: u64 = 64 << 20;

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
    #[error("signature: {0}")]
    Signature(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Size and BLAKE3 hash (hex) of one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSum {
    pub size: u64,
    pub blake3: String,
}

impl FileSum {
    /// The size and hash of `data`.
    pub fn of(data: &[u8]) -> FileSum {
        FileSum {
            size: data.len() as u64,
            blake3: hash_hex(data),
        }
    }
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
    /// Its directory in the archive is `disks/<id>/`; disks are numbered from 0 in archive order.
    pub id: u32,
    /// The VM (resource id) whose domain uses it.
    pub vm: String,
    /// Its path on the source cluster (the domain XML's `<source file>`).
    pub path: String,
    /// Its logical size in bytes.
    pub size: u64,
}

/// The archive's table of contents (its first entry).
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
    /// Every metadata entry (all entries but the manifest, the disk chunks and the chunk list).
    pub files: BTreeMap<String, FileSum>,
}

/// The chunk list (the archive's last entry).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkList {
    /// Every disk chunk entry.
    pub chunks: BTreeMap<String, FileSum>,
}

/// What a disk contributed to an archive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DiskStats {
    /// Chunks stored (the rest of the image is holes).
    pub chunks: u64,
    /// Bytes of data stored.
    pub stored: u64,
}

/// `MANIFEST.sig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestSignature {
    /// The signer's public key, `vmha-ed25519 <base64>`.
    key: String,
    /// ed25519 over [`MANIFEST_CONTEXT`] and the manifest, base64.
    signature: String,
}

/// `CHUNKS.sig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChunksSignature {
    /// ed25519 over [`CHUNKS_CONTEXT`], the manifest's BLAKE3 hash and the chunk list, base64.
    signature: String,
}

fn manifest_message(manifest: &[u8]) -> Vec<u8> {
    [MANIFEST_CONTEXT, manifest].concat()
}

fn chunks_message(manifest: &[u8], chunks: &[u8]) -> Vec<u8> {
    [CHUNKS_CONTEXT, blake3::hash(manifest).as_bytes(), chunks].concat()
}

/// BLAKE3 of `data`, in hex: a cryptographic hash like SHA-256 at about three times its speed here,
/// which keeps hashing from being what limits capture and instantiate.
fn hash_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
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

/// Writes an archive: [`ArchiveWriter::new`] writes the manifest and the metadata, [`ArchiveWriter::add_disk`]
/// each disk the manifest lists (in order), [`ArchiveWriter::finish`] the chunk list.
pub struct ArchiveWriter<W: Write> {
    tar: tar::Builder<zstd::stream::write::Encoder<'static, W>>,
    manifest: Manifest,
    chunks: ChunkList,
    /// Disks added so far.
    added: Vec<DiskStats>,
    /// The signing key and the manifest as written (signed archives).
    signing: Option<(SecretKey, Vec<u8>)>,
}

impl<W: Write> std::fmt::Debug for ArchiveWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveWriter")
            .field("name", &self.manifest.name)
            .field("disks_added", &self.added.len())
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
    /// Starts an archive on `out`, zstd at `level` (1 is fast, 3 is zstd's default): writes `manifest`
    /// (its format version and `files` are set here from `metadata`) and the metadata entries.
    /// `manifest.disks` lists the disks [`Self::add_disk`] will add, numbered from 0.
    pub fn new(
        out: W,
        level: i32,
        manifest: Manifest,
        metadata: &BTreeMap<String, Vec<u8>>,
    ) -> Result<Self, ArchiveError> {
        Self::new_signed(out, level, manifest, metadata, None)
    }

    /// [`Self::new`], signed with `key` if given: the manifest's signature follows the manifest, the
    /// chunk list's is the last entry.
    pub fn new_signed(
        out: W,
        level: i32,
        mut manifest: Manifest,
        metadata: &BTreeMap<String, Vec<u8>>,
        key: Option<SecretKey>,
    ) -> Result<Self, ArchiveError> {
        manifest.format_version = FORMAT_VERSION;
        manifest.files.clear();
        for (path, data) in metadata {
            check_path(path)?;
            if entry_limit(path).is_none() || !is_metadata(path) {
                return Err(ArchiveError::Unsupported(format!("{path} is not a metadata entry")));
            }
            if data.len() as u64 > MAX_METADATA {
                return Err(ArchiveError::Unsupported(format!(
                    "{path} is {} bytes, more than the {MAX_METADATA} a metadata entry may hold",
                    data.len()
                )));
            }
            manifest.files.insert(path.clone(), FileSum::of(data));
        }
        check_manifest(&manifest)?;
        let mut encoder = zstd::stream::write::Encoder::new(out, level)?;
        encoder.include_checksum(true)?;
        // Compression runs on zstd's worker threads while the caller's thread reads, checks for zeros
        // and hashes.
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4)) as u32;
        encoder.multithread(workers)?;
        let mut tar = tar::Builder::new(encoder);
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| ArchiveError::Unsupported(e.to_string()))?;
        tar.append_data(&mut header(json.len() as u64), MANIFEST, json.as_slice())?;
        if let Some(key) = &key {
            let sig = ManifestSignature {
                key: key.public().to_text(),
                signature: key.sign(&manifest_message(&json)),
            };
            let sig = serde_json::to_vec(&sig).map_err(|e| ArchiveError::Unsupported(e.to_string()))?;
            tar.append_data(&mut header(sig.len() as u64), MANIFEST_SIG, sig.as_slice())?;
        }
        for (path, data) in metadata {
            tar.append_data(&mut header(data.len() as u64), path, data.as_slice())?;
        }
        Ok(ArchiveWriter {
            tar,
            manifest,
            chunks: ChunkList::default(),
            added: Vec::new(),
            signing: key.map(|k| (k, json)),
        })
    }

    /// Adds the next disk the manifest lists, read from `file` (sparse-aware: holes and all-zero chunks
    /// are not stored). Its size must still be the one in the manifest. `progress` is called with the
    /// bytes of the image gone through so far.
    pub fn add_disk(&mut self, file: &File, progress: &mut dyn FnMut(u64)) -> Result<DiskStats, ArchiveError> {
        let id = self.added.len();
        let disk = self
            .manifest
            .disks
            .get(id)
            .cloned()
            .ok_or_else(|| ArchiveError::Unsupported(format!("the manifest lists {id} disks", id = id)))?;
        let size = file.metadata()?.len();
        // Read front to back: a larger read-ahead.
        let _ = nix::fcntl::posix_fadvise(
            file.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
        );
        if size != disk.size {
            return Err(ArchiveError::Unsupported(format!(
                "disk {} changed size since the capture began ({} -> {size} bytes)",
                disk.path, disk.size
            )));
        }
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
        let mut stats = DiskStats::default();
        // A reader thread reads ahead, skips all-zero chunks and hashes the rest, while this one writes
        // into the tar stream and zstd's workers compress: disk, hashing and compression overlap.
        std::thread::scope(|scope| -> Result<(), ArchiveError> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<(u64, Option<(Vec<u8>, FileSum)>)>>(4);
            scope.spawn(move || {
                for offset in offsets {
                    let len = CHUNK.min(size - offset) as usize;
                    let mut buf = vec![0u8; len];
                    let item = file.read_exact_at(&mut buf, offset).map(|()| {
                        let data = (!is_zero(&buf)).then(|| {
                            let sum = FileSum::of(&buf);
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
                    let path = format!("disks/{id}/{offset:016x}");
                    self.tar
                        .append_data(&mut header(buf.len() as u64), &path, buf.as_slice())?;
                    self.chunks.chunks.insert(path, sum);
                    stats.chunks += 1;
                    stats.stored += buf.len() as u64;
                }
                progress((offset + CHUNK).min(size));
            }
            Ok(())
        })?;
        progress(size);
        self.added.push(stats);
        Ok(stats)
    }

    /// Writes the chunk list and ends the stream; returns the output, the manifest and what each disk
    /// stored.
    pub fn finish(mut self) -> Result<(W, Manifest, Vec<DiskStats>), ArchiveError> {
        if self.added.len() != self.manifest.disks.len() {
            return Err(ArchiveError::Unsupported(format!(
                "the manifest lists {} disks, {} were added",
                self.manifest.disks.len(),
                self.added.len()
            )));
        }
        let json = serde_json::to_vec(&self.chunks).map_err(|e| ArchiveError::Unsupported(e.to_string()))?;
        self.tar
            .append_data(&mut header(json.len() as u64), CHUNK_LIST, json.as_slice())?;
        if let Some((key, manifest)) = &self.signing {
            let sig = ChunksSignature {
                signature: key.sign(&chunks_message(manifest, &json)),
            };
            let sig = serde_json::to_vec(&sig).map_err(|e| ArchiveError::Unsupported(e.to_string()))?;
            self.tar
                .append_data(&mut header(sig.len() as u64), CHUNKS_SIG, sig.as_slice())?;
        }
        let encoder = self.tar.into_inner()?;
        let out = encoder.finish()?;
        Ok((out, self.manifest, self.added))
    }
}

/// Written data is flushed to disk on a second thread while writing goes on, after every this many
/// bytes (unless a flush still runs): otherwise all of it waits for the final sync.
const FLUSH_EVERY: u64 = 64 << 20;

/// Flushes files to disk on a thread of its own while they are being written: told the bytes written,
/// it starts a flush after every [`FLUSH_EVERY`] of them (unless one still runs).
#[derive(Debug)]
struct Flusher {
    unflushed: u64,
    tx: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    fn new(files: Vec<File>) -> io::Result<Flusher> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new().name("vmha-flush".into()).spawn(move || {
            for () in rx {
                for f in &files {
                    // An error shows again in the final sync, which is checked.
                    let _ = f.sync_data();
                }
            }
        })?;
        Ok(Flusher {
            unflushed: 0,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn wrote(&mut self, n: u64) {
        self.unflushed += n;
        if self.unflushed >= FLUSH_EVERY {
            if let Some(tx) = &self.tx {
                let _ = tx.try_send(());
            }
            self.unflushed = 0;
        }
    }

    /// Waits for the flushing thread to end.
    fn stop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A file written front to back (an archive being captured) whose data goes to disk behind the writer,
/// so that [`WriteBehind::finish`]'s sync has little left to wait for.
#[derive(Debug)]
pub struct WriteBehind {
    file: File,
    flusher: Flusher,
}

impl WriteBehind {
    pub fn new(file: File) -> io::Result<WriteBehind> {
        let flusher = Flusher::new(vec![file.try_clone()?])?;
        Ok(WriteBehind { file, flusher })
    }

    /// Waits for the flushing thread and syncs the whole file.
    pub fn finish(mut self) -> io::Result<File> {
        self.flusher.stop();
        self.file.sync_all()?;
        self.file.try_clone()
    }
}

impl Write for WriteBehind {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.flusher.wrote(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
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

fn misplaced(path: &str) -> String {
    format!(
        "entry {path:?} is out of place (the layout puts {MANIFEST_SIG} right after {MANIFEST} and {CHUNKS_SIG} \
         right after {CHUNK_LIST})"
    )
}

/// Whether `path` may be a metadata entry (one the manifest lists): not the manifest, the chunk list, a
/// signature or a disk chunk.
fn is_metadata(path: &str) -> bool {
    !(path.starts_with("disks/") || [MANIFEST, CHUNK_LIST, MANIFEST_SIG, CHUNKS_SIG].contains(&path))
}

/// Where an entry may be and how large it may be: `None` if the layout has no such entry.
fn entry_limit(path: &str) -> Option<u64> {
    if path == MANIFEST || path == RESOURCES || path == CONSTRAINTS || path == TAG {
        return Some(MAX_METADATA);
    }
    if path == CHUNK_LIST {
        return Some(MAX_CHUNK_LIST);
    }
    if path == MANIFEST_SIG || path == CHUNKS_SIG {
        return Some(MAX_SIGNATURE);
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

/// What [`read`] found: the manifest, the metadata entries and (once the whole archive is read) the
/// chunk list.
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: Manifest,
    pub metadata: BTreeMap<String, Vec<u8>>,
    /// Empty while only the head of the archive is read.
    pub chunks: ChunkList,
    /// Who signed the archive (checked), `None` if unsigned.
    pub signer: Option<Signer>,
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

    /// What the archive stores of disk `id`.
    pub fn stats(&self, id: u32) -> DiskStats {
        let prefix = format!("disks/{id}/");
        let mut stats = DiskStats::default();
        for sum in self
            .chunks
            .chunks
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .map(|(_, s)| s)
        {
            stats.chunks += 1;
            stats.stored += sum.size;
        }
        stats
    }
}

fn read_error(e: io::Error) -> ArchiveError {
    ArchiveError::Truncated(e.to_string())
}

/// Counts the bytes read through it.
struct Counting<'a, R> {
    inner: R,
    count: &'a AtomicU64,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Walks every entry of the archive in `input`, checking its type, path, place in the layout and size,
/// and calls `each` with the path and the entry's data.
fn walk<R: Read>(
    input: R,
    mut each: impl FnMut(String, Vec<u8>) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    // zstd reads its input straight from this buffer (`Decoder::new` would wrap the reader in a
    // buffer of its own and copy every byte once more); a caller's own 1 MiB buffer is bypassed by it.
    let decoder =
        zstd::stream::read::Decoder::with_buffer(io::BufReader::with_capacity(1 << 20, input)).map_err(read_error)?;
    let mut archive = tar::Archive::new(decoder);
    let mut seen = BTreeSet::new();
    // Raw entries: the tar crate would read a GNU long-name or PAX extension entry whole into memory
    // (whatever size its header claims) before returning the entry it describes; raw, each is an entry
    // of its own, refused here by its header before a byte of it is read.
    let entries = archive.entries().map_err(read_error)?.raw(true);
    let mut metadata_total: u64 = 0;
    for entry in entries {
        let mut entry = entry.map_err(read_error)?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        if !kind.is_file() {
            let what = match kind {
                tar::EntryType::GNULongName | tar::EntryType::GNULongLink => {
                    "a GNU long-name extension header (refused unread; vmha's names fit the header)"
                }
                tar::EntryType::XHeader | tar::EntryType::XGlobalHeader => {
                    "a PAX extension header (refused unread; vmha writes none)"
                }
                tar::EntryType::GNUSparse => "a GNU sparse file",
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
        let size = entry.header().size().map_err(read_error)?;
        let limit = entry_limit(&raw)
            .ok_or_else(|| ArchiveError::Hostile(format!("entry {raw:?} is not part of the archive layout")))?;
        if size > limit {
            return Err(ArchiveError::Hostile(format!(
                "entry {raw:?} is oversized: {size} bytes, at most {limit} allowed"
            )));
        }
        if !raw.starts_with("disks/") {
            metadata_total = metadata_total.saturating_add(size);
            if metadata_total > MAX_METADATA_TOTAL {
                return Err(ArchiveError::Hostile(format!(
                    "entry {raw:?}: the metadata entries hold more than {MAX_METADATA_TOTAL} bytes together"
                )));
            }
        }
        if !seen.insert(raw.clone()) {
            return Err(ArchiveError::Hostile(format!("entry {raw:?} appears twice")));
        }
        if seen.len() > MAX_ENTRIES {
            return Err(ArchiveError::Hostile(format!("more than {MAX_ENTRIES} entries")));
        }
        let mut data = Vec::with_capacity(size as usize);
        (&mut entry).take(size).read_to_end(&mut data).map_err(read_error)?;
        if data.len() as u64 != size {
            return Err(ArchiveError::Truncated(format!("entry {raw} ends early")));
        }
        each(raw, data)?;
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
    let m: Manifest = serde_json::from_value(value).map_err(|e| ArchiveError::Tampered(format!("{MANIFEST}: {e}")))?;
    check_manifest(&m)?;
    Ok(m)
}

/// Where the disks go: one file per disk id, created by the caller (its size is set here; holes stay
/// holes).
pub type DiskFiles = BTreeMap<u32, File>;

/// Reads and checks an archive in one pass (see the module documentation). Once the manifest and the
/// metadata are read and checked, `on_head` gets them and says where the disks go (`None`: nowhere, only
/// check them). Disk data is checked against the chunk list at the end of the stream: on an error the
/// files `on_head` returned hold data that failed, or was not yet, checked, and the caller removes them.
/// `progress` gets the bytes of `input` read so far.
pub fn read<R: Read + Send, E: From<ArchiveError>>(
    input: R,
    on_head: impl FnOnce(&Verified) -> Result<Option<DiskFiles>, E>,
    progress: &mut dyn FnMut(u64),
) -> Result<Verified, E> {
    read_trusting(input, &Trust::default(), on_head, progress)
}

/// [`read`], checking the archive's signature against `trust`: a signed archive's signatures must be
/// good (or it is refused), and with [`Trust::require`] an unsigned archive, or one signed by a key
/// `trust` does not hold, is refused right after its manifest, before `on_head` is called.
pub fn read_trusting<R: Read + Send, E: From<ArchiveError>>(
    input: R,
    trust: &Trust,
    on_head: impl FnOnce(&Verified) -> Result<Option<DiskFiles>, E>,
    progress: &mut dyn FnMut(u64),
) -> Result<Verified, E> {
    let count = AtomicU64::new(0);
    std::thread::scope(|scope| {
        // Decompressing, parsing and hashing on one thread, checking and writing on this one (the two
        // halves weigh about the same).
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Entry, ArchiveError>>(4);
        let counting = Counting {
            inner: input,
            count: &count,
        };
        scope.spawn(move || {
            let walked = walk(counting, |path, data| {
                let sum = FileSum::of(&data);
                tx.send(Ok(Entry { path, data, sum }))
                    .map_err(|_| ArchiveError::Unsupported("reading stopped".into()))
            });
            if let Err(e) = walked {
                // Fails only when the reader stopped first (and reports its own error).
                let _ = tx.send(Err(e));
            }
        });
        let mut reader = Reader {
            rx,
            files: None,
            trust,
            signed: None,
        };
        let result = reader.run(on_head, &mut || progress(count.load(Ordering::Relaxed)));
        // Dropping the receiver stops the walker at its next entry.
        drop(reader);
        result
    })
}

/// [`read`] without writing anything: checks a whole archive.
pub fn verify<R: Read + Send>(input: R) -> Result<Verified, ArchiveError> {
    read(input, |_| Ok::<_, ArchiveError>(None), &mut |_| {})
}

/// [`verify`] with a signature check (see [`read_trusting`]).
pub fn verify_trusting<R: Read + Send>(input: R, trust: &Trust) -> Result<Verified, ArchiveError> {
    read_trusting(input, trust, |_| Ok::<_, ArchiveError>(None), &mut |_| {})
}

/// An archive entry as read: its path, its data and their size and hash.
struct Entry {
    path: String,
    data: Vec<u8>,
    sum: FileSum,
}

struct Reader<'t> {
    rx: std::sync::mpsc::Receiver<Result<Entry, ArchiveError>>,
    files: Option<DiskFiles>,
    trust: &'t Trust,
    /// The signer's key and the manifest's bytes, once a good manifest signature was read.
    signed: Option<(PublicKey, Vec<u8>)>,
}

impl Reader<'_> {
    fn next(&self) -> Result<Option<Entry>, ArchiveError> {
        match self.rx.recv() {
            Ok(Ok(entry)) => Ok(Some(entry)),
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(None),
        }
    }

    fn run<E: From<ArchiveError>>(
        &mut self,
        on_head: impl FnOnce(&Verified) -> Result<Option<DiskFiles>, E>,
        progress: &mut dyn FnMut(),
    ) -> Result<Verified, E> {
        // The manifest, first.
        let (manifest, manifest_bytes) = match self.next()? {
            Some(e) if e.path == MANIFEST => (parse_manifest(&e.data)?, e.data),
            Some(Entry { path, .. }) => {
                return Err(
                    ArchiveError::Tampered(format!("the archive starts with {path}, not with {MANIFEST}")).into(),
                )
            }
            None => return Err(ArchiveError::Truncated(format!("no {MANIFEST} (the archive is empty)")).into()),
        };
        // Its signature, if any, checked before anything else is read.
        let mut next = self.next()?;
        let signer = match next.take() {
            Some(e) if e.path == MANIFEST_SIG => Some(self.manifest_signature(&e.data, manifest_bytes)?),
            other => {
                next = other;
                None
            }
        };
        if signer.is_none() && self.trust.require {
            return Err(ArchiveError::Signature(
                "the archive is unsigned, and a signature by a trusted key is required".into(),
            )
            .into());
        }
        // The metadata it lists, each checked.
        let mut metadata = BTreeMap::new();
        let mut pending = None;
        while let Some(entry) = next.take().map_or_else(|| self.next(), |e| Ok(Some(e)))? {
            let path = &entry.path;
            if path == MANIFEST_SIG || path == CHUNKS_SIG {
                return Err(ArchiveError::Hostile(misplaced(path)).into());
            }
            if !is_metadata(path) {
                pending = Some(entry);
                break;
            }
            let Some(listed) = manifest.files.get(path) else {
                return Err(ArchiveError::Tampered(format!("entry {path} is not listed in the manifest")).into());
            };
            let sum = &entry.sum;
            if listed != sum {
                return Err(ArchiveError::Tampered(format!(
                    "checksum mismatch for {path}: manifest says {} bytes blake3 {}, archive holds {} bytes blake3 {}",
                    listed.size, listed.blake3, sum.size, sum.blake3
                ))
                .into());
            }
            metadata.insert(entry.path, entry.data);
            progress();
        }
        if let Some(missing) = manifest.files.keys().find(|p| !metadata.contains_key(*p)) {
            return Err(match pending {
                Some(_) => ArchiveError::Tampered(format!(
                    "the manifest lists {missing}, which the archive lacks before its disk data"
                )),
                None => ArchiveError::Truncated(format!("the archive ends before {missing}")),
            }
            .into());
        }
        let head = Verified {
            manifest,
            metadata,
            chunks: ChunkList::default(),
            signer,
        };
        // Where the disks go.
        if let Some(files) = on_head(&head)? {
            for disk in &head.manifest.disks {
                let file = files.get(&disk.id).ok_or_else(|| {
                    ArchiveError::Unsupported(format!("no destination for disk {} ({})", disk.id, disk.path))
                })?;
                file.set_len(disk.size).map_err(ArchiveError::Io)?;
            }
            self.files = Some(files);
        }
        Ok(self.chunks(head, pending, progress)?)
    }

    /// Checks `MANIFEST.sig` (`data`) over the manifest (`manifest`) and the signer against the trust.
    fn manifest_signature(&mut self, data: &[u8], manifest: Vec<u8>) -> Result<Signer, ArchiveError> {
        let sig: ManifestSignature = serde_json::from_slice(data)
            .map_err(|e| ArchiveError::Signature(format!("{MANIFEST_SIG} is not valid: {e}")))?;
        let key = PublicKey::parse(&sig.key, MANIFEST_SIG).map_err(|e| ArchiveError::Signature(e.to_string()))?;
        let fingerprint = key.fingerprint();
        if !key.verifies(&manifest_message(&manifest), &sig.signature) {
            return Err(ArchiveError::Signature(format!(
                "{MANIFEST_SIG}: the signature by {fingerprint} does not match {MANIFEST}: the archive was \
                 altered after it was signed"
            )));
        }
        let trusted = self.trust.source(&key).map(str::to_string);
        if trusted.is_none() && self.trust.require {
            return Err(ArchiveError::Signature(format!(
                "the archive is signed by {fingerprint}, which is not a trusted key ({} trusted)",
                self.trust.keys.len()
            )));
        }
        let signer = Signer {
            fingerprint,
            key: key.to_text(),
            trusted,
        };
        self.signed = Some((key, manifest));
        Ok(signer)
    }

    /// Checks `CHUNKS.sig` (`data`) over the chunk list (`list`).
    fn chunks_signature(&self, data: &[u8], list: &[u8]) -> Result<(), ArchiveError> {
        let Some((key, manifest)) = &self.signed else {
            return Err(ArchiveError::Signature(format!(
                "{CHUNKS_SIG} in an archive without {MANIFEST_SIG}"
            )));
        };
        let sig: ChunksSignature = serde_json::from_slice(data)
            .map_err(|e| ArchiveError::Signature(format!("{CHUNKS_SIG} is not valid: {e}")))?;
        if !key.verifies(&chunks_message(manifest, list), &sig.signature) {
            return Err(ArchiveError::Signature(format!(
                "{CHUNKS_SIG}: the signature by {} does not match {CHUNK_LIST}: the archive was altered after \
                 it was signed",
                key.fingerprint()
            )));
        }
        Ok(())
    }

    /// The disk chunks and the chunk list.
    fn chunks(
        &self,
        mut head: Verified,
        pending: Option<Entry>,
        progress: &mut dyn FnMut(),
    ) -> Result<Verified, ArchiveError> {
        // Written data is flushed to disk on a second thread while the stream goes on.
        let mut flusher = match &self.files {
            Some(files) => Some(Flusher::new(
                files.values().map(File::try_clone).collect::<io::Result<_>>()?,
            )?),
            None => None,
        };
        let list = self.chunk_entries(&head, pending, progress, flusher.as_mut());
        drop(flusher);
        let list = list?;
        if let Some(files) = &self.files {
            for file in files.values() {
                file.sync_data()?;
            }
        }
        head.chunks = list;
        Ok(head)
    }

    /// The disk chunk entries, checked against the chunk list (returned); `flusher` is told what is
    /// written.
    fn chunk_entries(
        &self,
        head: &Verified,
        mut pending: Option<Entry>,
        progress: &mut dyn FnMut(),
        mut flusher: Option<&mut Flusher>,
    ) -> Result<ChunkList, ArchiveError> {
        let disks: BTreeMap<u32, u64> = head.manifest.disks.iter().map(|d| (d.id, d.size)).collect();
        let mut sums = BTreeMap::new();
        let mut list = None;
        let mut list_bytes = Vec::new();
        let mut list_signed = false;
        while let Some(entry) = pending.take().map_or_else(|| self.next(), |e| Ok(Some(e)))? {
            let Entry { path, data, sum } = entry;
            if path == CHUNKS_SIG && list.is_some() && !list_signed {
                self.chunks_signature(&data, &list_bytes)?;
                list_signed = true;
                continue;
            }
            if list.is_some() {
                let last = if list_signed { CHUNKS_SIG } else { CHUNK_LIST };
                return Err(ArchiveError::Hostile(format!("entry {path:?} follows {last}")));
            }
            if path == CHUNK_LIST {
                let l: ChunkList = serde_json::from_slice(&data)
                    .map_err(|e| ArchiveError::Tampered(format!("{CHUNK_LIST} is not valid: {e}")))?;
                list = Some(l);
                list_bytes = data;
                continue;
            }
            if path == MANIFEST_SIG || path == CHUNKS_SIG {
                return Err(ArchiveError::Hostile(misplaced(&path)));
            }
            let Some(rest) = path.strip_prefix("disks/") else {
                return Err(ArchiveError::Hostile(format!(
                    "entry {path:?} comes after the disk data (the layout puts it before)"
                )));
            };
            // entry_limit checked the form: disks/<u32>/<16 hex digits, a multiple of CHUNK>.
            let (id, offset) = rest.split_once('/').unwrap_or_default();
            let id: u32 = id
                .parse()
                .map_err(|_| ArchiveError::Hostile(format!("bad entry {path}")))?;
            let offset =
                u64::from_str_radix(offset, 16).map_err(|_| ArchiveError::Hostile(format!("bad entry {path}")))?;
            let Some(&size) = disks.get(&id) else {
                return Err(ArchiveError::Tampered(format!("{path} belongs to no listed disk")));
            };
            if offset.checked_add(data.len() as u64).is_none_or(|end| end > size) {
                return Err(ArchiveError::Tampered(format!(
                    "{path} ends beyond its disk's size {size}"
                )));
            }
            if let Some(files) = &self.files {
                files[&id].write_all_at(&data, offset)?;
                if let Some(f) = flusher.as_deref_mut() {
                    f.wrote(data.len() as u64);
                }
            }
            sums.insert(path, sum);
            progress();
        }
        let list = list.ok_or_else(|| {
            ArchiveError::Truncated(format!("no {CHUNK_LIST} (the archive ends before its last entry)"))
        })?;
        if self.signed.is_some() && !list_signed {
            return Err(ArchiveError::Signature(format!(
                "the archive's manifest is signed but it ends without {CHUNKS_SIG}: its disk data is unsigned \
                 (truncated or altered)"
            )));
        }
        for (path, sum) in &sums {
            match list.chunks.get(path) {
                None => return Err(ArchiveError::Tampered(format!("entry {path} is not listed in {CHUNK_LIST}"))),
                Some(listed) if listed != sum => {
                    return Err(ArchiveError::Tampered(format!(
                        "checksum mismatch for {path}: {CHUNK_LIST} says {} bytes blake3 {}, archive holds {} bytes blake3 {}",
                        listed.size, listed.blake3, sum.size, sum.blake3
                    )))
                }
                Some(_) => {}
            }
        }
        if let Some(missing) = list.chunks.keys().find(|p| !sums.contains_key(*p)) {
            return Err(ArchiveError::Tampered(format!(
                "{CHUNK_LIST} lists {missing}, which the archive lacks"
            )));
        }
        Ok(list)
    }
}

/// Consistency of a manifest with itself.
fn check_manifest(m: &Manifest) -> Result<(), ArchiveError> {
    let bad = |why: String| Err(ArchiveError::Tampered(format!("{MANIFEST}: {why}")));
    for required in [RESOURCES, CONSTRAINTS, TAG] {
        if !m.files.contains_key(required) {
            return bad(format!("{required} is not listed"));
        }
    }
    for p in m.files.keys() {
        check_path(p)?;
        if entry_limit(p).is_none() {
            return Err(ArchiveError::Hostile(format!(
                "entry {p:?} is not part of the archive layout"
            )));
        }
        if !is_metadata(p) {
            return bad(format!("lists {p} as a metadata entry"));
        }
    }
    for vm in &m.vms {
        if !m.files.contains_key(&vm.domain_file) || !vm.domain_file.starts_with("domains/") {
            return bad(format!(
                "VM {} names {} as its domain, which is not in the archive",
                crate::printable(&vm.resource),
                crate::printable(&vm.domain_file)
            ));
        }
        if !m.members.contains(&vm.resource) {
            return bad(format!("VM {} is not a member", crate::printable(&vm.resource)));
        }
    }
    for (i, disk) in m.disks.iter().enumerate() {
        if disk.id as usize != i {
            return bad(format!("disk {} is listed as disk number {i}", disk.id));
        }
        if !disk.path.starts_with('/') {
            return bad(format!("disk {} has a relative source path {:?}", disk.id, disk.path));
        }
        if disk.size > i64::MAX as u64 {
            return bad(format!(
                "disk {} claims {} bytes, more than a file can hold",
                disk.id, disk.size
            ));
        }
    }
    if m.disks
        .iter()
        .try_fold(0u64, |total, d| total.checked_add(d.size))
        .is_none()
    {
        return bad("the disks' sizes add up to more than 2^64 bytes".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
