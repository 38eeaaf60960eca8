//! Signed archives: an operator's ed25519 key (ed25519-dalek) signs an archive's manifest (which binds
//! every metadata entry's BLAKE3 sum) at its head and its chunk list (which binds every disk chunk's) at
//! its end, so that instantiate can check the signature before anything is created.
//!
//! Key files are one line of text: a secret key `vmha-ed25519-secret <base64 of the 32-byte seed>` (kept
//! 0600), a public key `vmha-ed25519 <base64 of the 32-byte key> [comment]`. A key's fingerprint is
//! `ed25519:` and the first 32 hex digits of the BLAKE3 hash of its 32 bytes.

use std::io::Read;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::Serialize;

/// The first word of a public key file.
pub const PUBLIC_TAG: &str = "vmha-ed25519";
/// The first word of a secret key file.
pub const SECRET_TAG: &str = "vmha-ed25519-secret";
/// Largest key file read.
pub const MAX_KEY_FILE: u64 = 4096;
/// Where instantiate finds the keys it trusts unless told otherwise (`*.pub`).
pub const TRUSTED_KEYS_DIR: &str = "/etc/vmha/trusted-keys";

/// A key file that is not one (its content is never repeated: a secret key file is secret).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{what}: {why}")]
    Malformed { what: String, why: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn malformed(what: &str, why: impl Into<String>) -> KeyError {
    KeyError::Malformed {
        what: what.to_string(),
        why: why.into(),
    }
}

/// Parses `<tag> <base64 of 32 bytes>[ comment]` (one line, trailing newline allowed).
fn parse_line(text: &str, tag: &str, what: &str, comment_ok: bool) -> Result<[u8; 32], KeyError> {
    let line = text.strip_suffix('\n').unwrap_or(text);
    if line.contains('\n') || line.contains('\r') {
        return Err(malformed(what, "a key file holds one line"));
    }
    let mut words = line.split(' ');
    let first = words.next().unwrap_or_default();
    if first != tag {
        let other = if tag == PUBLIC_TAG { SECRET_TAG } else { PUBLIC_TAG };
        return Err(malformed(
            what,
            if first == other {
                format!("this is a {} key file, not a {} one", kind(other), kind(tag))
            } else {
                format!("not a {} key file (it does not start with \"{tag} \")", kind(tag))
            },
        ));
    }
    let b64 = words.next().unwrap_or_default();
    if !comment_ok && words.next().is_some() {
        return Err(malformed(what, "trailing text after the key"));
    }
    let bytes = B64
        .decode(b64)
        .map_err(|_| malformed(what, "the key is not valid base64"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| malformed(what, format!("the key is {} bytes, not 32", b.len())))
}

fn kind(tag: &str) -> &'static str {
    if tag == SECRET_TAG {
        "secret"
    } else {
        "public"
    }
}

/// Reads at most [`MAX_KEY_FILE`] bytes of UTF-8 text.
pub fn read_key_text(mut r: impl Read, what: &str) -> Result<String, KeyError> {
    let mut buf = Vec::new();
    (&mut r)
        .take(MAX_KEY_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|source| KeyError::Io {
            what: what.to_string(),
            source,
        })?;
    if buf.len() as u64 > MAX_KEY_FILE {
        return Err(malformed(
            what,
            format!("larger than {MAX_KEY_FILE} bytes: not a key file"),
        ));
    }
    String::from_utf8(buf).map_err(|_| malformed(what, "not text: not a key file"))
}

/// An operator's secret (signing) key (wiped from memory when dropped). Its Debug output does not show
/// it.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SecretKey").field(&self.public().fingerprint()).finish()
    }
}

impl SecretKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Result<SecretKey, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Io {
            what: "generating a key".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let key = SigningKey::from_bytes(&seed);
        seed.fill(0);
        Ok(SecretKey(key))
    }

    /// Parses a secret key file's text; `what` names it in errors.
    pub fn parse(text: &str, what: &str) -> Result<SecretKey, KeyError> {
        let mut seed = parse_line(text, SECRET_TAG, what, false)?;
        let key = SigningKey::from_bytes(&seed);
        seed.fill(0);
        Ok(SecretKey(key))
    }

    /// Reads and parses a secret key file.
    pub fn read(r: impl Read, what: &str) -> Result<SecretKey, KeyError> {
        SecretKey::parse(&read_key_text(r, what)?, what)
    }

    /// The key file's text (one line).
    pub fn to_text(&self) -> String {
        format!("{SECRET_TAG} {}\n", B64.encode(self.0.to_bytes()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub(crate) fn sign(&self, message: &[u8]) -> String {
        B64.encode(self.0.sign(message).to_bytes())
    }
}

/// A public (verifying) key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses a public key file's text (or a key as written in an archive); `what` names it in errors.
    pub fn parse(text: &str, what: &str) -> Result<PublicKey, KeyError> {
        let bytes = parse_line(text, PUBLIC_TAG, what, true)?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| malformed(what, "not a valid ed25519 public key"))
    }

    /// Reads and parses a public key file.
    pub fn read(r: impl Read, what: &str) -> Result<PublicKey, KeyError> {
        PublicKey::parse(&read_key_text(r, what)?, what)
    }

    /// `vmha-ed25519 <base64>` (no newline).
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_TAG} {}", B64.encode(self.0.to_bytes()))
    }

    /// `ed25519:` and 32 hex digits.
    pub fn fingerprint(&self) -> String {
        let hex = blake3::hash(self.0.as_bytes()).to_hex();
        format!("ed25519:{}", &hex[..32])
    }

    /// Whether `signature` (base64) is this key's over `message` (strict verification: no malleable or
    /// small-order forms).
    pub(crate) fn verifies(&self, message: &[u8], signature: &str) -> bool {
        let Ok(bytes) = B64.decode(signature) else {
            return false;
        };
        let Ok(sig) = Signature::from_slice(&bytes) else {
            return false;
        };
        self.0.verify_strict(message, &sig).is_ok()
    }
}

/// A key instantiate trusts, and where it came from (a file name, shown in the plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub key: PublicKey,
    pub source: String,
}

/// What [`crate::archive::read_trusting`] accepts: the trusted keys, and whether a signature by one of
/// them is required. The default trusts no key and requires nothing (a signature is still checked, and
/// a bad one refused).
#[derive(Debug, Clone, Default)]
pub struct Trust {
    pub keys: Vec<TrustedKey>,
    pub require: bool,
}

impl Trust {
    /// The source of `key` if it is trusted.
    pub fn source(&self, key: &PublicKey) -> Option<&str> {
        self.keys.iter().find(|k| &k.key == key).map(|k| k.source.as_str())
    }
}

/// The `*.pub` files of `dir` (none if it does not exist), in name order; a malformed one is an error
/// naming it.
pub fn load_dir(dir: &Path) -> Result<Vec<TrustedKey>, KeyError> {
    let io = |source| KeyError::Io {
        what: dir.display().to_string(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut paths = Vec::new();
    for e in entries {
        let path = e.map_err(io)?.path();
        if path.extension().is_some_and(|x| x == "pub") {
            paths.push(path);
        }
    }
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let what = p.display().to_string();
            let io = |source| KeyError::Io {
                what: what.clone(),
                source,
            };
            // Not a FIFO or device, which could block or never end.
            if !std::fs::metadata(p).map_err(io)?.is_file() {
                return Err(malformed(&what, "not a regular file"));
            }
            let f = std::fs::File::open(p).map_err(io)?;
            Ok(TrustedKey {
                key: PublicKey::read(f, &what)?,
                source: what,
            })
        })
        .collect()
}

/// Who signed an archive, as the plan shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Signer {
    /// The key's fingerprint.
    pub fingerprint: String,
    /// The public key (`vmha-ed25519 <base64>`).
    pub key: String,
    /// The trusted key file it matched, if any.
    pub trusted: Option<String>,
}

impl Signer {
    /// `signed by ed25519:... (trusted: FILE)` or `(not a trusted key)`.
    pub fn text(signer: Option<&Signer>) -> String {
        match signer {
            None => "unsigned".into(),
            Some(s) => match &s.trusted {
                Some(file) => format!("signed by {} (trusted: {})", s.fingerprint, crate::printable(file)),
                None => format!("signed by {} (not a trusted key)", s.fingerprint),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_roundtrip() {
        let k = SecretKey::generate().unwrap();
        let again = SecretKey::parse(&k.to_text(), "k").unwrap();
        assert_eq!(again.public(), k.public());
        let p = PublicKey::parse(&format!("{} operator@a\n", k.public().to_text()), "k.pub").unwrap();
        assert_eq!(p, k.public());
        assert!(p.fingerprint().starts_with("ed25519:") && p.fingerprint().len() == 8 + 32);
        assert_ne!(SecretKey::generate().unwrap().public(), k.public());
        let sig = k.sign(b"m");
        assert!(p.verifies(b"m", &sig));
        assert!(!p.verifies(b"n", &sig));
        assert!(!p.verifies(b"m", "not base64!"));
        assert!(!SecretKey::generate().unwrap().public().verifies(b"m", &sig));
        // The secret does not show in Debug output.
        let seed = k.to_text().split(' ').nth(1).unwrap().trim().to_string();
        assert!(!format!("{k:?}").contains(&seed));
    }

    #[test]
    fn malformed_key_files_are_refused_without_echoing_them() {
        let k = SecretKey::generate().unwrap();
        let secret = k.to_text();
        let public = k.public().to_text();
        let err = |r: Result<PublicKey, KeyError>| r.unwrap_err().to_string();
        // A secret key given as a public one (and the other way round): named, never echoed.
        let e = err(PublicKey::parse(&secret, "k.pub"));
        assert!(e.contains("k.pub") && e.contains("secret key file"), "{e}");
        assert!(!e.contains(secret.split(' ').nth(1).unwrap().trim()), "{e}");
        let e = SecretKey::parse(&public, "k").unwrap_err().to_string();
        assert!(e.contains("public key file"), "{e}");
        for (text, why) in [
            ("", "does not start"),
            ("ssh-ed25519 AAAA", "does not start"),
            ("vmha-ed25519 !!!", "base64"),
            ("vmha-ed25519 AAAA", "3 bytes, not 32"),
            (&format!("{public}\n{public}\n"), "one line"),
        ] {
            let e = err(PublicKey::parse(text, "x.pub"));
            assert!(e.contains(why), "{text:?}: {e}");
        }
        let e = SecretKey::parse(&format!("{} extra", secret.trim()), "k")
            .unwrap_err()
            .to_string();
        assert!(e.contains("trailing text"), "{e}");
        let big = vec![b'a'; MAX_KEY_FILE as usize + 1];
        assert!(PublicKey::read(big.as_slice(), "big")
            .unwrap_err()
            .to_string()
            .contains("larger"));
        let bin = [0xffu8, 0xfe];
        assert!(PublicKey::read(&bin[..], "bin")
            .unwrap_err()
            .to_string()
            .contains("not text"));
    }

    #[test]
    fn trusted_keys_directory() {
        let dir = std::env::temp_dir().join(format!("vmha-trusted-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(load_dir(&dir).unwrap().is_empty(), "a missing directory trusts nothing");
        std::fs::create_dir_all(&dir).unwrap();
        let k = SecretKey::generate().unwrap();
        std::fs::write(dir.join("a.pub"), k.public().to_text()).unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let keys = load_dir(&dir).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].key, k.public());
        assert!(keys[0].source.ends_with("a.pub"));
        std::fs::create_dir(dir.join("c.pub")).unwrap();
        let e = load_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("c.pub: not a regular file"), "{e}");
        std::fs::remove_dir(dir.join("c.pub")).unwrap();
        std::fs::write(dir.join("b.pub"), "garbage").unwrap();
        let e = load_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("b.pub"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
