//! Where token state lives beyond one process: an encrypted file, or Redis.
//!
//! A [`Store`] is opened once from `[store]`; each client gets a [`ClientStore`]
//! bound to its identity (client id, token URL, user name, scope). A record is a
//! [`TokenState`] sealed with ChaCha20-Poly1305 under the store key, with the
//! client's binding and the record's generation as associated data, so a record
//! written for another client, under another key or with its generation edited
//! does not open. Such records are ignored with a warning and never sent to a
//! provider.
//!
//! Every record carries a generation that only grows. A write names the
//! generation it creates and is refused when the store already holds that one or
//! a newer one (fencing): a replica that stalled while it refreshed cannot
//! overwrite the token a newer leader stored. With Redis, a lease decides which
//! replica talks to the provider; see `redis.rs`.

mod file;
mod redis;
mod seal;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::config::{ClientConfig, Grant, StoreConfig};
use crate::secret::Secret;
use seal::Sealer;

/// Why the store could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time.
    #[error("{0}")]
    Unavailable(String),
    /// A local file operation failed.
    #[error("{0}")]
    Io(String),
}

/// Token state as stored: what a restarted or another replica needs to carry on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenState {
    /// The access token, if one is held.
    pub access_token: Option<Secret>,
    /// When it expires (wall clock), if known.
    pub access_expires_at: Option<SystemTime>,
    /// Its lifetime as issued, which sets the refresh margin.
    pub lifetime: Option<Duration>,
    /// The refresh token, if one is held.
    pub refresh_token: Option<Secret>,
    /// When the refresh token expires, if known.
    pub refresh_expires_at: Option<SystemTime>,
    /// When this state was obtained.
    pub obtained_at: SystemTime,
}

/// A stored state and its generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Grows by one with every write; the fencing token.
    pub generation: u64,
    /// The state.
    pub state: TokenState,
}

/// The result of a read.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The highest generation seen under the client's key, including a record
    /// that was ignored; a new write must be above it.
    pub generation: u64,
    /// The record, when there is one this client can use.
    pub record: Option<Record>,
}

/// The result of a fenced write.
#[derive(Debug, PartialEq, Eq)]
pub enum Saved {
    /// Written.
    Written,
    /// Refused: the store already holds this generation or a newer one.
    Stale {
        /// The generation the store holds.
        generation: u64,
    },
}

/// A held right to refresh one client's token (Redis); local stores always grant one.
#[derive(Debug)]
pub struct Lease {
    value: Option<String>,
}

/// An opened `[store]`.
#[derive(Clone)]
pub struct Store {
    backend: Arc<Backend>,
    sealer: Option<Arc<Sealer>>,
}

enum Backend {
    Memory,
    File(file::FileBackend),
    Redis(Box<redis::RedisBackend>),
}

impl Store {
    /// Opens the configured store. Redis is connected lazily: an unreachable
    /// Redis does not stop the start.
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        let (backend, key) = match config {
            StoreConfig::Memory => (Backend::Memory, None),
            StoreConfig::File(f) => (
                Backend::File(file::FileBackend::open(&f.path)?),
                Some(&f.key),
            ),
            StoreConfig::Redis(r) => (
                Backend::Redis(Box::new(redis::RedisBackend::open(r)?)),
                Some(&r.key),
            ),
        };
        Ok(Store {
            backend: Arc::new(backend),
            sealer: key.map(|k| Arc::new(Sealer::new(k))),
        })
    }

    /// The store as seen by one client.
    pub fn client(&self, client: &ClientConfig) -> ClientStore {
        ClientStore {
            store: self.clone(),
            name: client.name.clone(),
            binding: binding(client),
            last_warned: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }

    /// memory | file | redis.
    pub fn kind(&self) -> &'static str {
        match &*self.backend {
            Backend::Memory => "memory",
            Backend::File(_) => "file",
            Backend::Redis(_) => "redis",
        }
    }
}

/// One client's view of the store.
#[derive(Clone)]
pub struct ClientStore {
    store: Store,
    name: String,
    binding: String,
    /// The generation of the last record warned about, so a poll does not repeat it.
    last_warned: Arc<AtomicU64>,
}

impl ClientStore {
    /// memory | file | redis.
    pub fn kind(&self) -> &'static str {
        self.store.kind()
    }

    /// Whether state outlives the process (file, redis).
    pub fn is_persistent(&self) -> bool {
        !matches!(&*self.store.backend, Backend::Memory)
    }

    /// Whether other processes share the state (redis).
    pub fn is_shared(&self) -> bool {
        matches!(&*self.store.backend, Backend::Redis(_))
    }

    /// Reads the client's record; an unusable one is reported and ignored.
    pub async fn load(&self) -> Result<Loaded, StoreError> {
        let envelope = match &*self.store.backend {
            Backend::Memory => return Ok(Loaded::default()),
            Backend::File(f) => f.load(&self.name).await?,
            Backend::Redis(r) => r.load(&self.name).await?,
        };
        let Some(envelope) = envelope else {
            return Ok(Loaded::default());
        };
        let generation = envelope.generation;
        let record = self.open(envelope);
        Ok(Loaded { generation, record })
    }

    /// Writes `record` unless the store already holds its generation or a newer one.
    pub async fn save(&self, record: &Record) -> Result<Saved, StoreError> {
        let Some(sealer) = &self.store.sealer else {
            return Ok(Saved::Written);
        };
        let plain = Plain::from_state(&record.state);
        let text = serde_json::to_vec(&plain)
            .map_err(|e| StoreError::Io(format!("cannot encode the state: {e}")))?;
        let data = sealer.seal(&self.binding, record.generation, &text);
        let envelope = Envelope {
            generation: record.generation,
            binding: self.binding.clone(),
            data,
        };
        match &*self.store.backend {
            Backend::Memory => Ok(Saved::Written),
            Backend::File(f) => f.save(&self.name, envelope).await,
            Backend::Redis(r) => r.save(&self.name, &envelope).await,
        }
    }

    /// Tries to become the one process that refreshes this client, for `ttl`.
    /// `None`: another holds the lease. Local stores always grant it.
    pub async fn try_lease(&self, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        match &*self.store.backend {
            Backend::Redis(r) => Ok(r
                .try_lease(&self.name, ttl)
                .await?
                .map(|value| Lease { value: Some(value) })),
            _ => Ok(Some(Lease { value: None })),
        }
    }

    /// Keeps the lease for `ttl` from now (a leader backing off keeps the others
    /// waiting); false when it was lost (expired, and perhaps taken by another).
    pub async fn extend_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        match (&*self.store.backend, &lease.value) {
            (Backend::Redis(r), Some(v)) => r.extend_lease(&self.name, v, ttl).await,
            _ => Ok(true),
        }
    }

    /// Gives the lease back.
    pub async fn release(&self, lease: Lease) -> Result<(), StoreError> {
        match (&*self.store.backend, &lease.value) {
            (Backend::Redis(r), Some(v)) => r.release(&self.name, v).await,
            _ => Ok(()),
        }
    }

    fn open(&self, envelope: Envelope) -> Option<Record> {
        let sealer = self.store.sealer.as_ref()?;
        let generation = envelope.generation;
        let problem = if envelope.binding != self.binding {
            "it was written for another client id, token URL, user or scope"
        } else {
            match sealer.open(&self.binding, generation, &envelope.data) {
                None => "it does not decrypt with the configured key (another key, or corrupted)",
                Some(text) => match serde_json::from_slice::<Plain>(&text) {
                    Ok(plain) => {
                        return Some(Record {
                            generation,
                            state: plain.into_state(),
                        })
                    }
                    Err(_) => "its content is not a token state",
                },
            }
        };
        if self.last_warned.swap(generation, Ordering::Relaxed) != generation {
            warn!(client = %self.name, store = self.kind(), generation,
                "ignoring the stored token state: {problem}; it will be replaced by the next token");
        }
        None
    }
}

/// The stored form of one client's record: the generation and binding in clear
/// (the store compares generations), the state sealed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub(crate) generation: u64,
    pub(crate) binding: String,
    pub(crate) data: String,
}

/// The sealed content.
#[derive(Serialize, Deserialize)]
struct Plain {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_expires_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lifetime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_expires_at_ms: Option<u64>,
    obtained_at_ms: u64,
}

fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn from_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

impl Plain {
    fn from_state(s: &TokenState) -> Plain {
        Plain {
            access_token: s.access_token.as_ref().map(|t| t.expose().to_owned()),
            access_expires_at_ms: s.access_expires_at.map(to_ms),
            lifetime_ms: s.lifetime.map(|l| l.as_millis() as u64),
            refresh_token: s.refresh_token.as_ref().map(|t| t.expose().to_owned()),
            refresh_expires_at_ms: s.refresh_expires_at.map(to_ms),
            obtained_at_ms: to_ms(s.obtained_at),
        }
    }

    fn into_state(self) -> TokenState {
        TokenState {
            access_token: self.access_token.map(Secret::new),
            access_expires_at: self.access_expires_at_ms.map(from_ms),
            lifetime: self.lifetime_ms.map(Duration::from_millis),
            refresh_token: self.refresh_token.map(Secret::new),
            refresh_expires_at: self.refresh_expires_at_ms.map(from_ms),
            obtained_at: from_ms(self.obtained_at_ms),
        }
    }
}

/// What a record is bound to: the client id, the token URL, the user and the
/// scope. A hash, so the store does not show them.
fn binding(client: &ClientConfig) -> String {
    let t = &client.token;
    let username = match &t.grant {
        Grant::Password { username, .. } => username.as_str(),
        _ => "",
    };
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [
        "tokenproxy-binding-v1",
        t.client_id.as_deref().unwrap_or(""),
        &t.url.to_string(),
        username,
        t.scope.as_deref().unwrap_or(""),
    ] {
        ctx.update(part.as_bytes());
        ctx.update(&[0]);
    }
    ctx.finish().as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
