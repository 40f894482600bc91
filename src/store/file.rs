//! `kind = "file"`: one JSON file holding every client's sealed record, each
//! under `CLIENT:IDENTITY` (earlier versions: under `CLIENT`).
//!
//! A write reads the file, replaces one client's entry and writes the whole file
//! to a temporary file in the same directory (mode 0600), fsyncs it, renames it
//! over the old one and fsyncs the directory: a crash leaves the old file or the
//! new one, never a mix. An exclusive lock on `PATH.lock` serializes writers
//! across processes (the sidecar and a `tokenproxy` command writing the same
//! file); entries of clients not in the current configuration are kept.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{Envelope, Saved, StoreError};

const FORMAT: &str = "tokenproxy-token-state";

#[derive(Debug, Default, Serialize, Deserialize)]
struct Document {
    format: String,
    version: u32,
    clients: BTreeMap<String, Envelope>,
}

pub(crate) struct FileBackend {
    path: Arc<PathBuf>,
}

impl FileBackend {
    /// Checks that the file's directory exists; the file itself may not yet.
    pub(crate) fn open(path: &Path) -> Result<FileBackend, StoreError> {
        let dir = parent(path);
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StoreError::Io(format!(
                    "store.path: {} is not a directory",
                    dir.display()
                )))
            }
            Err(e) => {
                return Err(StoreError::Io(format!(
                    "store.path: directory {}: {e}",
                    dir.display()
                )))
            }
        }
        if path.is_dir() {
            return Err(StoreError::Io(format!(
                "store.path: {} is a directory; name a file in it",
                path.display()
            )));
        }
        Ok(FileBackend {
            path: Arc::new(path.to_path_buf()),
        })
    }

    pub(crate) async fn load(&self, key: &str) -> Result<Option<Envelope>, StoreError> {
        let path = Arc::clone(&self.path);
        let key = key.to_owned();
        blocking(move || Ok(read_document(&path)?.clients.remove(&key))).await
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
                .map(|(key, envelope)| (key, envelope.account))
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
            let mut doc = read_document(&path)?;
            let unchanged = doc
                .clients
                .get(&legacy_key)
                .is_some_and(|cur| cur.generation == generation && cur.data == data);
            if !unchanged || doc.clients.contains_key(&key) {
                return Ok(false);
            }
            doc.clients.remove(&legacy_key);
            doc.clients.insert(key, envelope);
            doc.format = FORMAT.to_owned();
            doc.version = 1;
            write_atomically(&path, &doc)?;
            Ok(true)
        })
        .await
    }

    pub(crate) async fn save(&self, key: &str, envelope: Envelope) -> Result<Saved, StoreError> {
        let path = Arc::clone(&self.path);
        let client = key.to_owned();
        blocking(move || {
            let _lock = lock(&path)?;
            let mut doc = read_document(&path)?;
            if let Some(cur) = doc.clients.get(&client) {
                if cur.generation >= envelope.generation {
                    return Ok(Saved::Stale {
                        generation: cur.generation,
                    });
                }
            }
            doc.format = FORMAT.to_owned();
            doc.version = 1;
            doc.clients.insert(client, envelope);
            write_atomically(&path, &doc)?;
            Ok(Saved::Written)
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
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

fn io_error(what: &str, path: &Path, e: &io::Error) -> StoreError {
    StoreError::Io(format!("{what} {}: {e}", path.display()))
}

/// The document; a missing file is empty, an unreadable one is reported and
/// treated as empty (its records cannot be used; the next write replaces it).
fn read_document(path: &Path) -> Result<Document, StoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Document::default()),
        Err(e) => return Err(io_error("cannot read", path, &e)),
    };
    match serde_json::from_slice::<Document>(&bytes) {
        Ok(doc) if doc.format == FORMAT && doc.version == 1 => Ok(doc),
        Ok(doc) => {
            warn!(path = %path.display(), format = %doc.format, version = doc.version,
                "ignoring the token state file: not a tokenproxy state file of version 1");
            Ok(Document::default())
        }
        Err(e) => {
            warn!(path = %path.display(), error = %e,
                "ignoring the token state file: it is not valid JSON; the next write replaces it");
            Ok(Document::default())
        }
    }
}

fn lock(path: &Path) -> Result<File, StoreError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file =
        open_private(&lock_path, false).map_err(|e| io_error("cannot open", &lock_path, &e))?;
    file.lock()
        .map_err(|e| io_error("cannot lock", &lock_path, &e))?;
    Ok(file)
}

fn open_private(path: &Path, truncate: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(truncate);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options.open(path)
}

fn write_atomically(path: &Path, doc: &Document) -> Result<(), StoreError> {
    let text = serde_json::to_vec_pretty(doc)
        .map_err(|e| StoreError::Io(format!("cannot encode the state file: {e}")))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut file = open_private(&tmp, true)?;
        file.write_all(&text)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        #[cfg(unix)]
        File::open(parent(path))?.sync_all()?;
        Ok(())
    })();
    result.map_err(|e: io::Error| {
        let _best_effort = fs::remove_file(&tmp);
        io_error("cannot write", path, &e)
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
        assert_eq!(store.save("a", envelope(1)).await.unwrap(), Saved::Written);
        assert_eq!(store.save("b", envelope(5)).await.unwrap(), Saved::Written);
        assert_eq!(
            store.save("a", envelope(1)).await.unwrap(),
            Saved::Stale { generation: 1 }
        );
        assert_eq!(store.save("a", envelope(2)).await.unwrap(), Saved::Written);
        assert_eq!(store.load("a").await.unwrap().unwrap().data, "sealed-2");
        assert_eq!(store.load("b").await.unwrap().unwrap().generation, 5);
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

    #[tokio::test]
    async fn a_garbage_file_reads_as_empty_and_is_replaced_by_the_next_write() {
        let dir = temp_dir("garbage");
        let path = dir.join("tokens.json");
        fs::write(&path, b"\x00not json").unwrap();
        let store = FileBackend::open(&path).unwrap();
        assert!(store.load("a").await.unwrap().is_none());
        assert_eq!(store.save("a", envelope(1)).await.unwrap(), Saved::Written);
        assert_eq!(store.load("a").await.unwrap().unwrap().generation, 1);
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
