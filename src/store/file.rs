//! `kind = "file"`: one JSON file holding every client's sealed record, each
//! under `CLIENT:IDENTITY` (earlier versions: under `CLIENT`).
//!
//! Subjects do not live here but in an SQLite database beside it,
//! `PATH.subjects.db` (see `file_subjects.rs`).
//!
//! A write reads the file, replaces one client's entry and writes the whole file
//! to a temporary file in the same directory (mode 0600), fsyncs it, renames it
//! over the old one and fsyncs the directory: a crash leaves the old file or the
//! new one, never a mix. An exclusive lock on `PATH.lock` serializes writers
//! across processes (the sidecar and a `tokenproxy` command writing the same
//! file); entries of clients not in the current configuration are kept.
//!
//! The directory must not be writable by other users (unless sticky), the
//! temporary file gets a random name and is created exclusively, and neither it
//! nor the lock file is opened through a symbolic link: nobody else can make a
//! write land elsewhere. A file that is not a state file (damaged, or another
//! program's) is moved aside to `PATH.corrupt-SECONDS-RANDOM`, never
//! overwritten, and an error is logged; a state file of a newer format version
//! is left alone and writes to it are refused.
//!
//! Each client's entry is parsed on its own: an entry that does not parse
//! (edited, or bigger than [`MAX_RECORD_BYTES`]) is that client's record not
//! opening, never the whole file being unusable. A file bigger than
//! [`MAX_FILE_BYTES`] is refused before it is read.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use super::private_file::{io_error, open_error, private_options};
use super::{Envelope, Read, Saved, StoreError, Unopened, MAX_GENERATION, MAX_RECORD_BYTES};

const FORMAT: &str = "tokenproxy-token-state";
const VERSION: u32 = 1;
/// The largest state file read: far above what thousands of clients need.
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Document {
    format: String,
    version: u32,
    /// Entries as JSON, each parsed on its own (see [`read_entry`]).
    clients: BTreeMap<String, serde_json::Value>,
}

/// One entry as read: parsed when it is a record, with its fields as read.
fn read_entry(entry: &serde_json::Value) -> Read {
    let field = |name: &str| match entry.get(name) {
        Some(serde_json::Value::String(s)) => s.clone().into_bytes(),
        Some(other) => other.to_string().into_bytes(),
        None => Vec::new(),
    };
    let seen = Unopened {
        generation: field("generation"),
        data: field("data"),
    };
    let size = entry.to_string().len();
    let envelope = if size > MAX_RECORD_BYTES {
        Err(format!(
            "it is {size} bytes, above the {MAX_RECORD_BYTES} a record may have"
        ))
    } else {
        match serde_json::from_value::<Envelope>(entry.clone()) {
            Ok(e) if e.generation <= MAX_GENERATION => Ok(e),
            Ok(e) => Err(format!(
                "its generation {} is above 2^53, which tokenproxy never writes",
                e.generation
            )),
            Err(e) => Err(format!("it is not a record: {e}")),
        }
    };
    Read {
        envelope,
        seen,
        spent_elsewhere: None,
    }
}

fn to_entry(envelope: &Envelope) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(envelope)
        .map_err(|e| StoreError::Io(format!("cannot encode the record: {e}")))
}

/// What is in the file.
enum Content {
    Document(Document),
    /// Not a state file at all: moved aside under the lock.
    Unusable(String),
    /// A state file of another format version: neither used nor overwritten.
    OtherVersion(u32),
}

pub(crate) struct FileBackend {
    path: Arc<PathBuf>,
    /// The subjects' database beside the state file, opened on first use.
    pub(super) subjects: Arc<super::file_subjects::SubjectDb>,
}

impl FileBackend {
    /// Checks the file's directory (it exists and only this user or group can
    /// write it) and moves an unusable file aside; the file itself may not exist yet.
    pub(crate) fn open(path: &Path) -> Result<FileBackend, StoreError> {
        let dir = parent(path);
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => check_directory(dir, &m)?,
            Ok(_) => {
                return Err(StoreError::Io(format!(
                    "store.path: {} is not a directory",
                    dir.display()
                )))
            }
            Err(e) => {
                return Err(StoreError::File {
                    context: format!("store.path: directory {}", dir.display()),
                    source: e,
                })
            }
        }
        if path.is_dir() {
            return Err(StoreError::Io(format!(
                "store.path: {} is a directory; name a file in it",
                path.display()
            )));
        }
        // Say so at the start when the file is damaged, not at the first write.
        read_document(path)?;
        Ok(FileBackend {
            path: Arc::new(path.to_path_buf()),
            subjects: Arc::new(super::file_subjects::SubjectDb::beside(path)),
        })
    }

    pub(crate) async fn load(&self, key: &str) -> Result<Option<Read>, StoreError> {
        let path = Arc::clone(&self.path);
        let key = key.to_owned();
        blocking(move || Ok(read_document(&path)?.clients.get(&key).map(read_entry))).await
    }
    /// The record names and account hashes of every record of client `name`.
    pub(crate) async fn accounts(&self, name: &str) -> Result<Vec<(String, String)>, StoreError> {
        let path = Arc::clone(&self.path);
        let prefix = format!("{name}:");
        blocking(move || {
            Ok(read_document(&path)?
                .clients
                .into_iter()
                .filter(|(key, _)| key.starts_with(&prefix))
                .filter_map(|(key, entry)| Some((key, read_entry(&entry).envelope.ok()?.account)))
                .collect())
        })
        .await
    }

    /// Moves `legacy` (as read under `legacy_key`) to `key` as `envelope`, in
    /// one write, unless `key` holds a record or `legacy_key` changed since.
    pub(crate) async fn take_over(
        &self,
        legacy_key: &str,
        legacy: &Envelope,
        key: &str,
        envelope: Envelope,
    ) -> Result<bool, StoreError> {
        let path = Arc::clone(&self.path);
        let (legacy_key, key) = (legacy_key.to_owned(), key.to_owned());
        let (generation, data) = (legacy.generation, legacy.data.clone());
        blocking(move || {
            let _lock = lock(&path)?;
            let mut doc = read_document_locked(&path)?;
            let unchanged = doc
                .clients
                .get(&legacy_key)
                .and_then(|cur| read_entry(cur).envelope.ok())
                .is_some_and(|cur| cur.generation == generation && cur.data == data);
            if !unchanged || doc.clients.contains_key(&key) {
                return Ok(false);
            }
            doc.clients.remove(&legacy_key);
            doc.clients.insert(key, to_entry(&envelope)?);
            doc.format = FORMAT.to_owned();
            doc.version = VERSION;
            write_atomically(&path, &doc)?;
            Ok(true)
        })
        .await
    }

    /// Writes `envelope` unless the file holds its generation or a newer one;
    /// `replace` names a record that did not open, which is overwritten whatever
    /// its generation while it is still there unchanged.
    pub(crate) async fn save(
        &self,
        key: &str,
        envelope: Envelope,
        replace: Option<Unopened>,
    ) -> Result<Saved, StoreError> {
        let path = Arc::clone(&self.path);
        let client = key.to_owned();
        blocking(move || {
            let _lock = lock(&path)?;
            let mut doc = read_document_locked(&path)?;
            if let Some(cur) = doc.clients.get(&client) {
                let cur = read_entry(cur);
                let replaceable = replace.as_ref() == Some(&cur.seen);
                // An entry that does not parse fences nothing, but only the one
                // as read is replaced: it may have been fixed meanwhile.
                let generation = match &cur.envelope {
                    Ok(e) => e.generation,
                    Err(_) => MAX_GENERATION,
                };
                if generation >= envelope.generation && !replaceable {
                    return Ok(Saved::Stale { generation });
                }
            }
            doc.format = FORMAT.to_owned();
            doc.version = VERSION;
            doc.clients.insert(client, to_entry(&envelope)?);
            write_atomically(&path, &doc)?;
            Ok(Saved::Written)
        })
        .await
    }
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io(format!("store task failed: {e}")))?
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Refuses a directory other users can write to (without the sticky bit):
/// they could plant or replace the state, temporary or lock file. A directory
/// writable by the process's own group is accepted (Kubernetes `fsGroup`).
#[cfg(unix)]
fn check_directory(dir: &Path, meta: &fs::Metadata) -> Result<(), StoreError> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let mode = meta.permissions().mode();
    if mode & 0o1000 != 0 {
        return Ok(());
    }
    let world = mode & 0o002 != 0;
    let foreign_group = mode & 0o020 != 0 && meta.gid() != rustix::process::getegid().as_raw();
    if world || foreign_group {
        let who = if world { "every user" } else { "another group" };
        return Err(StoreError::Io(format!(
            "store.path: directory {} is writable by {who} (mode {:o}) without the sticky bit; another user could plant files there: make it writable only by tokenproxy's user (chmod 700)",
            dir.display(),
            mode & 0o7777
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_directory(_dir: &Path, _meta: &fs::Metadata) -> Result<(), StoreError> {
    Ok(())
}

fn read_content(path: &Path) -> Result<Content, StoreError> {
    match fs::metadata(path) {
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            return Err(StoreError::Io(format!(
                "store.path: {} is {} bytes, above the {MAX_FILE_BYTES} a state file may have; not read",
                path.display(),
                m.len()
            )))
        }
        _ => {}
    }
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Content::Document(Document::default()))
        }
        Err(e) => return Err(io_error("cannot read", path, e)),
    };
    Ok(match serde_json::from_slice::<Document>(&bytes) {
        Ok(doc) if doc.format == FORMAT && doc.version == VERSION => Content::Document(doc),
        Ok(doc) if doc.format == FORMAT => Content::OtherVersion(doc.version),
        Ok(doc) => Content::Unusable(format!("its format is {:?}", doc.format)),
        Err(e) => Content::Unusable(format!("it is not a state file: {e}")),
    })
}

/// The document for reading; a missing file is empty. An unusable one is
/// moved aside (under the lock); one of another version reads as empty.
fn read_document(path: &Path) -> Result<Document, StoreError> {
    match read_content(path)? {
        Content::Document(doc) => Ok(doc),
        Content::OtherVersion(version) => {
            warn!(path = %path.display(), version,
                "ignoring the token state file: it was written by another version of tokenproxy (format version {version}, this one reads {VERSION}); it is left as it is");
            Ok(Document::default())
        }
        Content::Unusable(_) => {
            let _lock = lock(path)?;
            read_document_locked(path)
        }
    }
}

/// The document for a write, with the lock held: an unusable file is moved
/// aside first; one of another version is not overwritten.
fn read_document_locked(path: &Path) -> Result<Document, StoreError> {
    match read_content(path)? {
        Content::Document(doc) => Ok(doc),
        Content::OtherVersion(version) => Err(StoreError::Io(format!(
            "store.path: {} was written by another version of tokenproxy (format version {version}, this one writes {VERSION}); refusing to overwrite it",
            path.display()
        ))),
        Content::Unusable(problem) => {
            let aside = set_aside(path)?;
            error!(path = %path.display(), moved_to = %aside.display(), problem = %problem,
                "the token state file is damaged or not a tokenproxy state file; it was moved aside unchanged and every client starts without stored state (restore the records from the moved file if they matter)");
            Ok(Document::default())
        }
    }
}

/// Renames the file to `PATH.corrupt-SECONDS-RANDOM`.
fn set_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{secs}-{:08x}", fastrand::u32(..)));
    let aside = PathBuf::from(aside);
    fs::rename(path, &aside).map_err(|e| io_error("cannot move aside", path, e))?;
    Ok(aside)
}

fn lock(path: &Path) -> Result<File, StoreError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let mut options = private_options();
    options.write(true).create(true);
    let file = options
        .open(&lock_path)
        .map_err(|e| open_error(&lock_path, e))?;
    file.lock()
        .map_err(|e| io_error("cannot lock", &lock_path, e))?;
    Ok(file)
}

fn write_atomically(path: &Path, doc: &Document) -> Result<(), StoreError> {
    let text = serde_json::to_vec_pretty(doc)
        .map_err(|e| StoreError::Io(format!("cannot encode the state file: {e}")))?;
    // A name nobody can guess, created only if nothing (not even a link) is there.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(
        ".tmp.{}.{:016x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let tmp = PathBuf::from(tmp);
    let mut options = private_options();
    options.write(true).create_new(true);
    let mut file = options.open(&tmp).map_err(|e| open_error(&tmp, e))?;
    let result = (|| {
        file.write_all(&text)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        #[cfg(unix)]
        File::open(parent(path))?.sync_all()?;
        Ok(())
    })();
    result.map_err(|e: io::Error| {
        let _best_effort = fs::remove_file(&tmp);
        io_error("cannot write", path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(generation: u64) -> Envelope {
        Envelope {
            generation,
            binding: "b".into(),
            account: String::new(),
            data: format!("sealed-{generation}"),
        }
    }

    async fn loaded(store: &FileBackend, key: &str) -> Envelope {
        match store.load(key).await {
            Ok(Some(Read {
                envelope: Ok(e), ..
            })) => e,
            _ => panic!("a record that parses under {key}"),
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tokenproxy-file-store-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn writes_are_fenced_by_generation_and_keep_other_clients() {
        let dir = temp_dir("fence");
        let path = dir.join("tokens.json");
        let store = FileBackend::open(&path).unwrap();
        assert!(store.load("a").await.unwrap().is_none());
        assert_eq!(
            store.save("a", envelope(1), None).await.unwrap(),
            Saved::Written
        );
        assert_eq!(
            store.save("b", envelope(5), None).await.unwrap(),
            Saved::Written
        );
        assert_eq!(
            store.save("a", envelope(1), None).await.unwrap(),
            Saved::Stale { generation: 1 }
        );
        assert_eq!(
            store.save("a", envelope(2), None).await.unwrap(),
            Saved::Written
        );
        assert_eq!(loaded(&store, "a").await.data, "sealed-2");
        assert_eq!(loaded(&store, "b").await.generation, 5);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left behind");
        fs::remove_dir_all(&dir).unwrap();
    }

    fn corrupt_files(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains(".corrupt-"))
            .collect()
    }

    /// Security review (low): a damaged state file was silently replaced,
    /// dropping every other client's refresh token. It is moved aside with its
    /// bytes intact, and the next write goes to a new file.
    #[tokio::test]
    async fn a_damaged_state_file_is_moved_aside_unchanged_never_overwritten() {
        let dir = temp_dir("garbage");
        let path = dir.join("tokens.json");
        let original = b"{\"format\": \"tokenproxy-token-state\", \"version\": 1, \"clients\": {\"other:1\": TRUNCATED";
        fs::write(&path, original).unwrap();
        let store = FileBackend::open(&path).unwrap();
        let aside = corrupt_files(&dir);
        assert_eq!(
            aside.len(),
            1,
            "the damaged file should be moved aside at open"
        );
        assert!(store.load("a").await.unwrap().is_none());
        assert_eq!(
            store.save("a", envelope(1), None).await.unwrap(),
            Saved::Written
        );
        assert_eq!(loaded(&store, "a").await.generation, 1);
        assert_eq!(
            fs::read(&aside[0]).unwrap(),
            original,
            "the moved-aside file should hold the original bytes"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A state file of another format version is neither used nor overwritten.
    #[tokio::test]
    async fn a_state_file_of_another_version_is_not_overwritten() {
        let dir = temp_dir("version");
        let path = dir.join("tokens.json");
        let newer = br#"{"format": "tokenproxy-token-state", "version": 2, "clients": {}}"#;
        fs::write(&path, newer).unwrap();
        let store = FileBackend::open(&path).unwrap();
        assert!(store.load("a").await.unwrap().is_none());
        let err = store.save("a", envelope(1), None).await.unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), newer);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Security review (low): the temporary file had a predictable name and
    /// was opened through a symbolic link, so a write landed in the link's
    /// target; the lock file likewise.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_symlink_at_the_temporary_or_lock_name_is_not_followed() {
        let dir = temp_dir("symlink");
        let path = dir.join("tokens.json");
        let victim = dir.join("victim");
        fs::write(&victim, b"precious").unwrap();
        let old_tmp = dir.join(format!("tokens.json.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &old_tmp).unwrap();
        let store = FileBackend::open(&path).unwrap();
        assert_eq!(
            store.save("a", envelope(1), None).await.unwrap(),
            Saved::Written
        );
        assert_eq!(
            fs::read(&victim).unwrap(),
            b"precious",
            "the write followed the link"
        );
        assert!(
            !fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink(),
            "the state file should be a regular file, not the planted link"
        );

        fs::remove_file(dir.join("tokens.json.lock")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("tokens.json.lock")).unwrap();
        let err = store.save("a", envelope(2), None).await.unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Security review (low): a directory other users can write to lets them
    /// plant files; it is refused at open unless sticky.
    #[cfg(unix)]
    #[test]
    fn a_directory_writable_by_every_user_is_refused_unless_sticky() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = temp_dir("mode");
        let path = dir.join("tokens.json");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = FileBackend::open(&path)
            .err()
            .expect("a 0777 directory is refused");
        let text = err.to_string();
        assert!(
            text.contains("store.path") && text.contains("writable by every user"),
            "{text}"
        );
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(
            FileBackend::open(&path).is_ok(),
            "a sticky directory is accepted"
        );
        // Writable by the process's own group (Kubernetes fsGroup) is accepted.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).unwrap();
        assert!(FileBackend::open(&path).is_ok(), "own group");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Security review (low): a record that does not open may carry any
    /// generation, 2^64-1 included; a write naming it replaces it, while it is
    /// still there unchanged. (Issue 25, finding 6: one beyond 2^53 does not
    /// parse, and fences nothing but the write that names it.)
    #[tokio::test]
    async fn a_record_that_does_not_open_is_replaced_whatever_its_generation() {
        let dir = temp_dir("unopened");
        let path = dir.join("tokens.json");
        let store = FileBackend::open(&path).unwrap();
        let forged = envelope(u64::MAX);
        store.save("a", forged.clone(), None).await.unwrap();
        let other = Unopened {
            generation: u64::MAX.to_string().into_bytes(),
            data: b"something else".to_vec(),
        };
        assert_eq!(
            store.save("a", envelope(1), Some(other)).await.unwrap(),
            Saved::Stale {
                generation: MAX_GENERATION
            },
            "only the record as read may be replaced"
        );
        let seen = store.load("a").await.unwrap().unwrap().seen;
        assert_eq!(
            store.save("a", envelope(1), Some(seen)).await.unwrap(),
            Saved::Written
        );
        assert_eq!(loaded(&store, "a").await.generation, 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_directory_is_an_error_at_open() {
        let err = FileBackend::open(Path::new("/nonexistent-dir-tokenproxy/t.json"))
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("/nonexistent-dir-tokenproxy"),
            "{err}"
        );
    }
}
