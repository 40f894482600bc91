//! Where token state lives beyond one process: an encrypted file, or Redis.
//!
//! A [`Store`] is opened once from `[store]`; each client gets a [`ClientStore`]
//! bound to its credential identity: a hash of the client id, the token and
//! refresh URLs, the grant, the user name, the scope, the extra `params` (such
//! as `audience`) and the bootstrap refresh token the chain started from. The
//! identity is part of the record's name (`CLIENT:IDENTITY`), so two
//! deployments that share a store under one client name (tenants, staging and
//! prod) never read, adopt or overwrite each other's records. Secrets that may
//! be rotated (client secret, password) are left out, so rotating one keeps the
//! chain; the bootstrap refresh token enters only as a hash of a hash.
//!
//! A record is a [`TokenState`] sealed with ChaCha20-Poly1305 under the store
//! key, with the store's namespace (the Redis key prefix, or `file`), the
//! record's own name (`CLIENT:IDENTITY`) and its generation as associated data
//! (format 2, its data marked `v2.`), so a record written under another key,
//! copied into another client's slot (two clients of one OAuth client have the
//! same identity hash) or with its generation edited does not open. Records of
//! format 1 (the identity hash and generation only) are still read, and the
//! next write seals them in format 2. Such records are ignored with a warning
//! and never sent to a provider.
//!
//! Every record carries a generation that only grows. A write names the
//! generation it creates and is refused when the store already holds that one or
//! a newer one (fencing): a replica that stalled while it refreshed cannot
//! overwrite the token a newer leader stored. With Redis, a lease decides which
//! replica talks to the provider, and a record read reports another process's
//! spending mark on it ([`Loaded::spent_elsewhere`]); see `redis.rs`.
//!
//! A client with `[dpop]` has one more record beside its token record: its
//! DPoP key, written once and shared by every process (see `dpop_key.rs`).
//!
//! Records written by earlier versions live under the bare client name and are
//! bound only to client id, token URL, user and scope. When a client has no
//! record under its identity, such a record is taken over once, if that older
//! binding matches: it is re-sealed under the identity and the old record is
//! removed in the same step, so a second deployment cannot take it over too.
//! Its `params`, grant and bootstrap origin cannot be checked (the old format
//! did not record them); this is logged.

mod dpop_key;
mod file;
mod file_subjects;
mod private_file;
mod redis;
mod seal;
mod subjects;

pub use subjects::{
    SubjectKey, SubjectLoad, SubjectMeta, SubjectRecord, SubjectStatus, SubjectStore,
};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use crate::config::{ClientConfig, Grant, StoreConfig};
use crate::secret::Secret;
use seal::{NotOpened, Sealer};

/// Marks sealed data of format 2 (base64 never holds a dot).
const FORMAT_2: &str = "v2.";

/// Why the store could not be used. A cause from below (an I/O or Redis
/// error) is kept as the error's source and shown once, after the context.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer in time, or not as required (replicas).
    #[error("{0}")]
    Unavailable(String),
    /// The store's content or format cannot be used.
    #[error("{0}")]
    Io(String),
    /// A local file operation failed.
    #[error("{context}: {source}")]
    File {
        /// What was being done, to which path.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Redis could not be reached or answered with an error.
    #[error("{context}: {source}")]
    Redis {
        /// What was being done, on which server.
        context: String,
        /// The Redis client's error, without credentials.
        #[source]
        source: redis::RedisCause,
    },
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
    /// The generation of the client's record when it opened, else 0: the
    /// generation of a record that does not open (another key, damaged,
    /// forged) is not trusted.
    pub generation: u64,
    /// The record, when there is one this client can use.
    pub record: Option<Record>,
    /// The client's record, when there is one and it did not open.
    pub not_opened: Option<NotOpenedRecord>,
    /// When the record carries another process's spending mark at its
    /// generation (Redis): since when, by the store's clock. That process took
    /// the lease to send the record's refresh token, and has neither written
    /// the answer nor said it did not send it: the refresh token may be spent.
    pub spent_elsewhere: Option<SystemTime>,
}

/// A record under the client's name that did not open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotOpenedRecord {
    /// Sealed data that none of the configured keys opens for this record: it
    /// may hold the newest refresh token of the chain (under a key this
    /// process does not have), so nothing is spent over it and only an
    /// operator's action replaces it. False: the record does not parse at all
    /// (not written by tokenproxy); the next fenced write replaces it.
    pub locked: bool,
    /// What is wrong, for logs and `/status`.
    pub problem: String,
    /// Whether this read is the first to find it (it is counted and logged once).
    pub first_seen: bool,
}

/// The highest generation a record may carry: 2^53, the largest integer Lua
/// (Redis scripts) compares exactly. Generations grow by one per refresh, so
/// only a forged record comes near it; one above it does not parse.
pub const MAX_GENERATION: u64 = 1 << 53;

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

/// The generation after `generation`; an error at the end of the range (only
/// a record sealed with the store key can carry it).
pub fn next_generation(generation: u64) -> Result<u64, StoreError> {
    generation
        .checked_add(1)
        .filter(|g| *g <= MAX_GENERATION)
        .ok_or_else(|| {
            StoreError::Io(
                "the stored generation is at its maximum (2^53); delete the client's record to start again"
                    .to_owned(),
            )
        })
}

/// A record under the client's name that did not open, as read (its
/// generation and data fields, byte for byte): a write may replace it whatever
/// its generation, while it is still there unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Unopened {
    pub(crate) generation: Vec<u8>,
    pub(crate) data: Vec<u8>,
}

/// One record as a backend read it.
pub(crate) struct Read {
    /// The record, or why it does not parse.
    pub(crate) envelope: Result<Envelope, String>,
    /// The record as read, to name it when replacing it.
    pub(crate) seen: Unopened,
    /// See [`Loaded::spent_elsewhere`].
    pub(crate) spent_elsewhere: Option<SystemTime>,
}

/// The largest sealed record a backend reads; a bigger one is refused before
/// it is read whole (a token state is well under 8 KiB).
pub(crate) const MAX_RECORD_BYTES: usize = 64 * 1024;

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
    /// The namespace bound into every record: the Redis key prefix, or `file`.
    scope: Arc<str>,
    /// The memory store's subjects.
    memory: Arc<subjects::MemorySubjects>,
    /// The memory store's DPoP keys, by record name: a reloaded client of the
    /// same account keeps its key, as with the other stores.
    dpop_keys: Arc<Mutex<std::collections::HashMap<String, Secret>>>,
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
        let (backend, keys, scope) = match config {
            StoreConfig::Memory => (Backend::Memory, None, "memory"),
            StoreConfig::File(f) => (
                Backend::File(file::FileBackend::open(&f.path)?),
                Some((&f.key, &f.previous_keys)),
                "file",
            ),
            StoreConfig::Redis(r) => (
                Backend::Redis(Box::new(redis::RedisBackend::open(r)?)),
                Some((&r.key, &r.previous_keys)),
                r.key_prefix.as_str(),
            ),
        };
        Ok(Store {
            backend: Arc::new(backend),
            sealer: keys.map(|(key, previous)| Arc::new(Sealer::new(key, previous))),
            scope: Arc::from(scope),
            memory: Arc::default(),
            dpop_keys: Arc::default(),
        })
    }

    /// The store as seen by one client.
    pub fn client(&self, client: &ClientConfig) -> ClientStore {
        let identity = Identity::of(client);
        ClientStore {
            store: self.clone(),
            name: client.name.clone(),
            key: format!("{}:{}", client.name, identity.binding),
            identity: Arc::new(identity),
            last_warned: Arc::new(AtomicU64::new(u64::MAX)),
            looked_for_other_chains: Arc::new(AtomicBool::new(false)),
            unopened: Arc::new(Mutex::new(None)),
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
    /// The record's name in the store: `CLIENT:IDENTITY`.
    key: String,
    identity: Arc<Identity>,
    /// The generation of the last record warned about, so a poll does not repeat it.
    last_warned: Arc<AtomicU64>,
    /// Whether other chains of this account were looked for (once per process).
    looked_for_other_chains: Arc<AtomicBool>,
    /// The record last read under the client's name, when it did not open,
    /// and whether it is locked (see [`NotOpenedRecord::locked`]).
    unopened: Arc<Mutex<Option<(Unopened, bool)>>>,
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

    /// The record's name in the store (`CLIENT:IDENTITY`), for messages.
    pub fn record_name(&self) -> &str {
        &self.key
    }

    /// Reads the client's record; one that does not open is reported in
    /// [`Loaded::not_opened`] and never used. `Err` only when the store could
    /// not be read.
    pub async fn load(&self) -> Result<Loaded, StoreError> {
        let read = match self.backend_load(&self.key).await? {
            Some(read) => read,
            None => match self.take_over_legacy().await? {
                Some(read) => read,
                None => {
                    self.look_for_other_chains().await;
                    self.set_unopened(None);
                    return Ok(Loaded::default());
                }
            },
        };
        Ok(self.open(read))
    }

    /// Remembers the record that did not open; true when it is another one
    /// than the last time.
    fn set_unopened(&self, value: Option<(Unopened, bool)>) -> bool {
        match self.unopened.lock() {
            Ok(mut u) => {
                let changed = *u != value;
                *u = value;
                changed
            }
            Err(_) => true,
        }
    }

    /// What an operator does about a record that does not open.
    pub fn locked_hint(&self) -> String {
        let record = match &*self.store.backend {
            Backend::Redis(_) => format!("the Redis key {}:{}:token", self.store.scope, self.key),
            _ => format!("the entry \"{}\" of the state file", self.key),
        };
        format!(
            "restore the store key that sealed it (store.key_file, or list the old key in store.previous_key_files), \
             or hand the client a new refresh token (`tokenproxy token {name} --refresh-token-from-stdin`, or `tokenproxy authorize {name}`), \
             or delete {record} to start again from the configured credentials",
            name = self.name
        )
    }

    async fn backend_load(&self, key: &str) -> Result<Option<Read>, StoreError> {
        match &*self.store.backend {
            Backend::Memory => Ok(None),
            Backend::File(f) => f.load(key).await,
            Backend::Redis(r) => r.load(key).await,
        }
    }

    /// Takes over the record an earlier version wrote under the bare client
    /// name, when its (older, narrower) binding matches this client: re-sealed
    /// under the identity and moved in one step. Returns the record now stored
    /// under the identity, if any.
    async fn take_over_legacy(&self) -> Result<Option<Read>, StoreError> {
        let Some(sealer) = &self.store.sealer else {
            return Ok(None);
        };
        let found = match &*self.store.backend {
            Backend::Memory => None,
            Backend::File(f) => f.load(&self.name).await?,
            Backend::Redis(r) => r.load_legacy(&self.name).await?,
        };
        let Some(read) = found else {
            return Ok(None);
        };
        let Ok(legacy) = read.envelope else {
            return Ok(None);
        };
        let generation = legacy.generation;
        let problem = if legacy.binding != self.identity.legacy {
            "it was written for another client id, token URL, user or scope"
        } else {
            let aad = seal::associated_data_v1(&self.identity.legacy, generation);
            match sealer.open(&aad, &legacy.data) {
                Err(_) => "it does not decrypt with the configured key (another key, or corrupted)",
                Ok(opened) => {
                    let envelope = Envelope {
                        generation,
                        binding: self.identity.binding.clone(),
                        account: self.identity.account.clone(),
                        data: self.seal(sealer, generation, &opened.plain),
                    };
                    let moved = match &*self.store.backend {
                        Backend::Memory => false,
                        Backend::File(f) => {
                            f.take_over(&self.name, &legacy, &self.key, envelope)
                                .await?
                        }
                        Backend::Redis(r) => {
                            r.take_over(&self.name, &legacy, &self.key, &envelope)
                                .await?
                        }
                    };
                    if moved {
                        info!(client = %self.name, store = self.kind(), generation,
                            "took over the token state an earlier version stored under the client name; its params, grant and bootstrap refresh token could not be checked");
                    }
                    // Moved by us or by another process meanwhile: read it back.
                    return self.backend_load(&self.key).await;
                }
            }
        };
        if self.last_warned.swap(generation, Ordering::Relaxed) != generation {
            warn!(client = %self.name, store = self.kind(), generation,
                "not taking over the token state an earlier version stored under the client name: {problem}; it is left as it is");
        }
        Ok(None)
    }

    /// Once per process, when this client has no record: warns when the store
    /// holds a chain of the same account (client id, URLs, user, grant, scope,
    /// params) that started from another bootstrap refresh token, since the
    /// configured one starts a new chain instead of continuing that one.
    async fn look_for_other_chains(&self) {
        if self.looked_for_other_chains.swap(true, Ordering::Relaxed) {
            return;
        }
        let found = match &*self.store.backend {
            Backend::Memory => return,
            Backend::File(f) => f.accounts(&self.name).await,
            Backend::Redis(r) => r.accounts(&self.name).await,
        };
        let others = match found {
            Ok(others) => others,
            Err(e) => {
                debug!(client = %self.name, error = %e, "could not look for other token chains of this client");
                return;
            }
        };
        let other_origin = others
            .iter()
            .any(|(key, account)| key != &self.key && account == &self.identity.account);
        if other_origin {
            let configured = if self.identity.bootstrap {
                "the configured one"
            } else {
                "none (no bootstrap refresh token is configured)"
            };
            warn!(client = %self.name, store = self.kind(), using = configured,
                "the configured bootstrap refresh token is not the origin of the stored chain for this client id and token URL; the stored chain is not used");
        }
    }

    /// Writes `record` unless the store already holds its generation or a
    /// newer one. A record that did not parse, as last read, is replaced
    /// whatever its generation; a locked one (see [`NotOpenedRecord::locked`])
    /// is not.
    pub async fn save(&self, record: &Record) -> Result<Saved, StoreError> {
        self.write(record, false).await
    }

    /// As [`ClientStore::save`], and a locked record as last read is replaced
    /// too: only on an operator's action (a login, a refresh token handed in
    /// that the provider accepted).
    pub async fn save_replacing(&self, record: &Record) -> Result<Saved, StoreError> {
        self.write(record, true).await
    }

    async fn write(&self, record: &Record, replace_locked: bool) -> Result<Saved, StoreError> {
        let Some(sealer) = &self.store.sealer else {
            return Ok(Saved::Written);
        };
        let plain = Plain::from_state(&record.state);
        let text = serde_json::to_vec(&plain)
            .map_err(|e| StoreError::Io(format!("cannot encode the state: {e}")))?;
        let data = self.seal(sealer, record.generation, &text);
        let envelope = Envelope {
            generation: record.generation,
            binding: self.identity.binding.clone(),
            account: self.identity.account.clone(),
            data,
        };
        let replace = self
            .unopened
            .lock()
            .ok()
            .and_then(|u| u.clone())
            .filter(|(_, locked)| replace_locked || !locked)
            .map(|(seen, _)| seen);
        let saved = match &*self.store.backend {
            Backend::Memory => Ok(Saved::Written),
            Backend::File(f) => f.save(&self.key, envelope, replace).await,
            Backend::Redis(r) => {
                let durable = record.state.refresh_token.is_some();
                r.save(&self.key, &envelope, replace.as_ref(), durable)
                    .await
            }
        };
        if matches!(saved, Ok(Saved::Written)) {
            self.set_unopened(None);
        }
        saved
    }

    /// Tries to become the one process that refreshes this client, for `ttl`.
    /// `None`: another holds the lease. Local stores always grant it.
    pub async fn try_lease(&self, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        match &*self.store.backend {
            Backend::Redis(r) => Ok(r
                .try_lease(&self.key, ttl)
                .await?
                .map(|value| Lease { value: Some(value) })),
            _ => Ok(Some(Lease { value: None })),
        }
    }

    /// Keeps the lease for `ttl` from now (a leader backing off keeps the others
    /// waiting); false when it was lost (expired, and perhaps taken by another).
    pub async fn extend_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        match (&*self.store.backend, &lease.value) {
            (Backend::Redis(r), Some(v)) => r.extend_lease(&self.key, v, ttl).await,
            _ => Ok(true),
        }
    }

    /// Gives the lease back, with this process's spending mark: it did not
    /// send the stored refresh token, or its answer is stored.
    pub async fn release(&self, lease: Lease) -> Result<(), StoreError> {
        match (&*self.store.backend, &lease.value) {
            (Backend::Redis(r), Some(v)) => r.release(&self.key, v, Some(&r.own_marks())).await,
            _ => Ok(()),
        }
    }

    /// Gives the lease back and keeps the spending mark: the stored refresh
    /// token may have been spent (no answer came back, or it is not stored
    /// yet), and no other replica may send it again.
    pub async fn release_keeping_mark(&self, lease: Lease) -> Result<(), StoreError> {
        match (&*self.store.backend, &lease.value) {
            (Backend::Redis(r), Some(v)) => r.release(&self.key, v, None).await,
            _ => Ok(()),
        }
    }

    /// `plain` sealed in format 2 for this client's record at `generation`.
    fn seal(&self, sealer: &Sealer, generation: u64, plain: &[u8]) -> String {
        let aad = seal::associated_data(&self.store.scope, &self.key, generation);
        format!("{FORMAT_2}{}", sealer.seal(&aad, plain))
    }

    /// Opens data sealed for this client's record at `generation`, in format 2
    /// or (written by earlier versions) format 1.
    fn unseal(
        &self,
        sealer: &Sealer,
        generation: u64,
        data: &str,
    ) -> Result<seal::Opened, NotOpened> {
        let opened = match data.strip_prefix(FORMAT_2) {
            Some(sealed) => {
                let aad = seal::associated_data(&self.store.scope, &self.key, generation);
                sealer.open(&aad, sealed)?
            }
            None => {
                let aad = seal::associated_data_v1(&self.identity.binding, generation);
                let opened = sealer.open(&aad, data)?;
                debug!(client = %self.name, generation,
                    "the stored token state is in the earlier format; the next write seals it bound to its name");
                opened
            }
        };
        if opened.with_previous_key {
            debug!(client = %self.name, generation,
                "the stored token state opened with a previous store key; the next write seals it with the current key");
        }
        Ok(opened)
    }

    fn open(&self, read: Read) -> Loaded {
        let Some(sealer) = &self.store.sealer else {
            return Loaded::default();
        };
        let envelope = match read.envelope {
            Ok(envelope) => envelope,
            Err(problem) => return self.not_opened(read.seen, None, false, problem),
        };
        let generation = envelope.generation;
        let refused = if envelope.binding != self.identity.binding {
            Err(NotOpened::Sealed)
        } else {
            self.unseal(sealer, generation, &envelope.data)
        };
        let (locked, problem) = match refused {
            Ok(opened) => match serde_json::from_slice::<Plain>(&opened.plain) {
                Ok(plain) => {
                    self.set_unopened(None);
                    return Loaded {
                        generation,
                        record: Some(Record {
                            generation,
                            state: plain.into_state(),
                        }),
                        not_opened: None,
                        spent_elsewhere: read.spent_elsewhere,
                    };
                }
                // Sealed with our key for this record: perhaps a newer version's content.
                Err(_) => (true, "it opens, but its content is not a token state this version reads"),
            },
            Err(NotOpened::Sealed) => (
                true,
                "it does not open with the configured store key or any previous key (sealed with another key, copied from another client's record, or damaged)",
            ),
            Err(NotOpened::Malformed) => (false, "its data is not sealed data"),
        };
        self.not_opened(read.seen, Some(generation), locked, problem.to_owned())
    }

    /// Reports a record that did not open (once per record) and remembers it.
    fn not_opened(
        &self,
        seen: Unopened,
        generation: Option<u64>,
        locked: bool,
        problem: String,
    ) -> Loaded {
        let first_seen = self.set_unopened(Some((seen, locked)));
        if first_seen {
            if locked {
                error!(client = %self.name, store = self.kind(), record = %self.key, generation,
                    problem = %problem, hint = %self.locked_hint(),
                    "the stored token state does not open: it is kept, and no refresh token is spent over it");
            } else {
                warn!(client = %self.name, store = self.kind(), record = %self.key,
                    problem = %problem,
                    "ignoring the stored token state, which does not parse; the next token replaces it");
            }
        }
        Loaded {
            generation: 0,
            record: None,
            not_opened: Some(NotOpenedRecord {
                locked,
                problem,
                first_seen,
            }),
            spent_elsewhere: None,
        }
    }
}

/// The stored form of one client's record: the generation, identity and
/// account hashes in clear (the store compares generations; the account finds
/// chains of one account started from different bootstrap tokens), the state
/// sealed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub(crate) generation: u64,
    pub(crate) binding: String,
    /// Absent in records written by earlier versions.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) account: String,
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

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The time `ms` milliseconds after the Unix epoch.
pub(crate) fn from_ms(ms: u64) -> SystemTime {
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

/// Whether `a` and `b` hold tokens of the same account from the same origin
/// (the identity their records are bound to): only then may a reload hand the
/// tokens of one to the other.
pub fn same_account(a: &ClientConfig, b: &ClientConfig) -> bool {
    Identity::of(a).binding == Identity::of(b).binding
}

/// What a client's records are bound to, as hex hashes.
struct Identity {
    /// Account plus bootstrap origin: the record's name and associated data.
    binding: String,
    /// Client id, token and refresh URLs, grant, user, scope and params.
    account: String,
    /// The binding of earlier versions (client id, token URL, user, scope),
    /// checked before a record under the bare client name is taken over.
    legacy: String,
    /// Whether a bootstrap refresh token is configured.
    bootstrap: bool,
}

impl Identity {
    fn of(client: &ClientConfig) -> Identity {
        let t = &client.token;
        let username = match &t.grant {
            Grant::Password { username, .. } => Some(username.as_str()),
            _ => None,
        };
        let mut account = Fields::new("tokenproxy-account-v2");
        account.opt(t.client_id.as_deref());
        account.text(&t.url.to_string());
        account.opt(t.refresh_url.as_ref().map(ToString::to_string).as_deref());
        account.text(t.grant.as_str());
        account.opt(username);
        account.opt(t.scope.as_deref());
        account.count(t.params.len());
        for (name, value) in &t.params {
            account.text(name);
            account.text(value);
        }
        let account = account.finish();
        // The bootstrap token enters as a hash, hashed again with the rest: the
        // stored identity shows nothing of it, and a refresh token has far too
        // much entropy for a guess to be checked against it.
        let origin = t.refresh_token.as_ref().map(|rt| {
            let mut f = Fields::new("tokenproxy-bootstrap-refresh-token-v2");
            f.text(rt.expose());
            f.finish()
        });
        let mut binding = Fields::new("tokenproxy-identity-v2");
        binding.bytes(&account);
        match &origin {
            Some(o) => {
                binding.count(1);
                binding.bytes(o);
            }
            None => binding.count(0),
        }
        Identity {
            binding: hex(&binding.finish()),
            account: hex(&account),
            legacy: legacy_binding(client),
            bootstrap: t.refresh_token.is_some(),
        }
    }
}

/// SHA-256 over length-prefixed fields, so no two field lists encode alike.
struct Fields(ring::digest::Context);

impl Fields {
    fn new(domain: &str) -> Fields {
        let mut f = Fields(ring::digest::Context::new(&ring::digest::SHA256));
        f.text(domain);
        f
    }

    fn bytes(&mut self, b: &[u8]) {
        self.0.update(&(b.len() as u64).to_be_bytes());
        self.0.update(b);
    }

    fn text(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    fn count(&mut self, n: usize) {
        self.0.update(&(n as u64).to_be_bytes());
    }

    fn opt(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.count(1);
                self.text(s);
            }
            None => self.count(0),
        }
    }

    fn finish(self) -> Vec<u8> {
        self.0.finish().as_ref().to_vec()
    }
}

/// The first 16 bytes, in hex: names stay short, and 128 bits do not collide.
fn hex(digest: &[u8]) -> String {
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// What earlier versions bound a record to: the client id, the token URL, the
/// user and the scope.
fn legacy_binding(client: &ClientConfig) -> String {
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
    hex(ctx.finish().as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{from_str, MapEnv};

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    /// A config with a file store at `path` and client `payments`; `token`
    /// holds the `[clients.payments.token]` lines.
    fn config(path: &std::path::Path, token: &str) -> crate::config::Config {
        let text = format!(
            r#"
[store]
kind = "file"
path = "{}"
key = "{KEY}"

[clients.payments]
listen = "127.0.0.1:0"
upstream = "http://127.0.0.1:1"

[clients.payments.token]
url = "https://auth.example/token"
client_secret = "s3cret"
{token}
"#,
            path.display()
        );
        match from_str(&text, None, &MapEnv::new()) {
            Ok(c) => c,
            Err(e) => panic!("config should be valid, got: {e}"),
        }
    }

    fn identity(token: &str) -> Identity {
        Identity::of(&config(std::path::Path::new("/tmp/t.json"), token).clients[0])
    }

    /// Security review finding 10: the identity covers everything that makes a
    /// token another account's, and nothing that is rotated in place.
    #[test]
    fn the_identity_changes_with_the_account_and_origin_but_not_with_secrets() {
        let base = "client_id = \"a\"\nparams = { audience = \"x\" }";
        let b = identity(base);
        for (what, other) in [
            ("client id", "client_id = \"b\"\nparams = { audience = \"x\" }"),
            ("audience", "client_id = \"a\"\nparams = { audience = \"y\" }"),
            ("scope", "client_id = \"a\"\nparams = { audience = \"x\" }\nscope = \"s\""),
            (
                "refresh URL",
                "client_id = \"a\"\nparams = { audience = \"x\" }\nrefresh_url = \"https://auth.example/r\"",
            ),
            (
                "grant",
                "client_id = \"a\"\nparams = { audience = \"x\" }\ngrant = \"password\"\nusername = \"u\"\npassword = \"p\"",
            ),
        ] {
            let o = identity(other);
            assert_ne!(o.account, b.account, "{what} should change the account");
            assert_ne!(o.binding, b.binding, "{what} should change the binding");
        }
        let user_a = identity(
            "client_id = \"a\"\ngrant = \"password\"\nusername = \"u1\"\npassword = \"p\"",
        );
        let user_b = identity(
            "client_id = \"a\"\ngrant = \"password\"\nusername = \"u2\"\npassword = \"p\"",
        );
        assert_ne!(user_a.binding, user_b.binding, "user name");
        let rotated = identity(
            "client_id = \"a\"\ngrant = \"password\"\nusername = \"u1\"\npassword = \"other\"",
        );
        assert_eq!(
            rotated.binding, user_a.binding,
            "a rotated password keeps the chain"
        );
        let secret = config(std::path::Path::new("/tmp/t.json"), base);
        let mut rotated_secret = secret.clients[0].clone();
        rotated_secret.token.client_secret = Some(Secret::new("rotated"));
        assert_eq!(
            Identity::of(&rotated_secret).binding,
            b.binding,
            "a rotated client secret keeps the chain"
        );
        // Unambiguous encoding: moving a character from one field to the next differs.
        let p1 = identity("client_id = \"a\"\nparams = { a = \"bc\" }");
        let p2 = identity("client_id = \"a\"\nparams = { ab = \"c\" }");
        assert_ne!(p1.binding, p2.binding, "params must be length-prefixed");

        let rt1 = identity(
            "client_id = \"a\"\ngrant = \"refresh_token\"\nrefresh_token = \"rt-one-8c1f\"",
        );
        let rt2 = identity(
            "client_id = \"a\"\ngrant = \"refresh_token\"\nrefresh_token = \"rt-two-77aa\"",
        );
        assert_eq!(rt1.account, rt2.account, "same account");
        assert_ne!(
            rt1.binding, rt2.binding,
            "another bootstrap is another chain"
        );
        assert!(rt1.bootstrap && !b.bootstrap);
    }

    fn temp_path(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tokenproxy-store-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("tokens.json")
    }

    fn state(access: &str) -> TokenState {
        TokenState {
            access_token: Some(Secret::new(access)),
            access_expires_at: None,
            lifetime: None,
            refresh_token: Some(Secret::new(format!("{access}-rt"))),
            refresh_expires_at: None,
            obtained_at: SystemTime::UNIX_EPOCH,
        }
    }

    /// Writes `state` the way earlier versions did: under the bare client
    /// name, sealed with the older binding.
    async fn write_legacy(store: &Store, client: &ClientConfig, generation: u64, s: &TokenState) {
        let Backend::File(f) = &*store.backend else {
            panic!("file store")
        };
        let sealer = store.sealer.as_ref().unwrap();
        let binding = legacy_binding(client);
        let text = serde_json::to_vec(&Plain::from_state(s)).unwrap();
        let envelope = Envelope {
            generation,
            binding: binding.clone(),
            account: String::new(),
            data: sealer.seal(&seal::associated_data_v1(&binding, generation), &text),
        };
        assert_eq!(
            f.save(&client.name, envelope, None).await.unwrap(),
            Saved::Written
        );
    }

    /// Security review finding 10: a record of an earlier version is taken
    /// over once, by a client whose older binding matches, and moved so that a
    /// second deployment cannot take it over too.
    #[tokio::test]
    async fn a_record_of_an_earlier_version_is_taken_over_once() {
        let path = temp_path("legacy");
        let staging = config(
            &path,
            "client_id = \"a\"\nparams = { audience = \"staging\" }",
        );
        let prod = config(&path, "client_id = \"a\"\nparams = { audience = \"prod\" }");
        let other = config(&path, "client_id = \"b\"");
        let store = Store::open(&staging.store).unwrap();
        write_legacy(&store, &staging.clients[0], 7, &state("old-access")).await;

        // Another client id: not taken over, left as it is.
        let loaded = store.client(&other.clients[0]).load().await.unwrap();
        assert!(
            loaded.record.is_none(),
            "another client id took the record over"
        );

        let first = store.client(&staging.clients[0]);
        let loaded = first.load().await.unwrap();
        let record = loaded
            .record
            .expect("the earlier version's record is taken over");
        assert_eq!(record.generation, 7, "the generation is kept");
        assert_eq!(record.state, state("old-access"));

        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(
            doc["clients"].get("payments").is_none(),
            "the old record should be moved, not copied: {doc}"
        );
        assert!(doc["clients"].get(first.record_name()).is_some(), "{doc}");
        assert!(!doc.to_string().contains("old-access"));

        // A second deployment whose old binding matched too finds nothing.
        let loaded = store.client(&prod.clients[0]).load().await.unwrap();
        assert!(
            loaded.record.is_none(),
            "a second deployment took over the same record"
        );
        // And the first keeps reading its own.
        let again = first.load().await.unwrap();
        assert_eq!(again.record.map(|r| r.generation), Some(7));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// Security review finding 5 (issue 25): a record of format 1 (bound to
    /// the identity hash only) is still read, and the next write seals it in
    /// format 2, bound to its own name.
    #[tokio::test]
    async fn a_record_of_format_1_is_read_and_rewritten_in_format_2() {
        let path = temp_path("format1");
        let config = config(&path, "client_id = \"a\"");
        let store = Store::open(&config.store).unwrap();
        let client = store.client(&config.clients[0]);
        let Backend::File(f) = &*store.backend else {
            panic!("file store")
        };
        let sealer = store.sealer.as_ref().unwrap();
        let binding = client.identity.binding.clone();
        let text = serde_json::to_vec(&Plain::from_state(&state("v1-access"))).unwrap();
        let envelope = Envelope {
            generation: 3,
            binding: binding.clone(),
            account: client.identity.account.clone(),
            data: sealer.seal(&seal::associated_data_v1(&binding, 3), &text),
        };
        f.save(client.record_name(), envelope, None).await.unwrap();

        let loaded = client.load().await.unwrap();
        let record = loaded.record.expect("a format-1 record opens");
        assert_eq!(record.state, state("v1-access"));
        let next = Record {
            generation: 4,
            state: state("v2-access"),
        };
        assert_eq!(client.save(&next).await.unwrap(), Saved::Written);
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let data = doc["clients"][client.record_name()]["data"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(data.starts_with(FORMAT_2), "written in format 2: {data}");
        assert_eq!(client.load().await.unwrap().record, Some(next));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    fn with_keys(path: &std::path::Path, key: u8, previous: &[u8]) -> Store {
        let k = |b: u8| {
            crate::config::StoreKey::from_base64(&base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                [b; 32],
            ))
            .unwrap()
        };
        Store::open(&StoreConfig::File(crate::config::FileStoreConfig {
            path: path.to_path_buf(),
            key: k(key),
            previous_keys: previous.iter().map(|b| k(*b)).collect(),
        }))
        .unwrap()
    }

    /// Issue 25, finding 4: a record sealed with a previous key opens, and the
    /// next write seals it with the current key; a record no configured key
    /// opens is locked: a plain write does not replace it, an operator's does.
    #[tokio::test]
    async fn previous_keys_open_records_and_a_locked_record_needs_an_operator() {
        let path = temp_path("rotation");
        let client = config(&path, "client_id = \"a\"").clients[0].clone();
        let old = with_keys(&path, 1, &[]).client(&client);
        let first = Record {
            generation: 1,
            state: state("first"),
        };
        assert_eq!(old.save(&first).await.unwrap(), Saved::Written);

        let rotated = with_keys(&path, 2, &[1]).client(&client);
        let loaded = rotated.load().await.unwrap();
        assert_eq!(loaded.record, Some(first), "a previous key opens it");
        let second = Record {
            generation: 2,
            state: state("second"),
        };
        assert_eq!(rotated.save(&second).await.unwrap(), Saved::Written);
        let only_new = with_keys(&path, 2, &[]).client(&client);
        assert_eq!(
            only_new.load().await.unwrap().record,
            Some(second.clone()),
            "re-sealed with the current key"
        );

        let stranger = with_keys(&path, 3, &[]).client(&client);
        let loaded = stranger.load().await.unwrap();
        let not_opened = loaded.not_opened.expect("reported");
        assert!(not_opened.locked && not_opened.first_seen, "{not_opened:?}");
        assert!(
            !stranger
                .load()
                .await
                .unwrap()
                .not_opened
                .unwrap()
                .first_seen,
            "reported once"
        );
        let third = Record {
            generation: 1,
            state: state("third"),
        };
        assert_eq!(
            stranger.save(&third).await.unwrap(),
            Saved::Stale { generation: 2 },
            "a locked record is not replaced by a plain write"
        );
        assert_eq!(only_new.load().await.unwrap().record, Some(second));
        stranger.load().await.unwrap();
        assert_eq!(
            stranger.save_replacing(&third).await.unwrap(),
            Saved::Written
        );
        assert_eq!(stranger.load().await.unwrap().record, Some(third));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// A file error keeps the operating system's error as its source: the
    /// message shows it once, and so does the error chain.
    #[test]
    fn a_file_error_keeps_its_cause_as_the_source_and_shows_it_once() {
        let dir = std::env::temp_dir().join(format!(
            "tokenproxy-store-error-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        let config = config(&dir.join("tokens.json"), "client_id = \"a\"");
        let err = match Store::open(&config.store) {
            Err(e) => e,
            Ok(_) => panic!("a store in a missing directory should not open"),
        };
        let source = std::error::Error::source(&err)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .expect("the io::Error is the source");
        assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        let text = err.to_string();
        assert!(
            text.starts_with("store.path: directory ") && text.ends_with(&source.to_string()),
            "the message names the key and the path, then the cause: {text}"
        );
        assert_eq!(
            crate::token::error_chain(&err),
            text,
            "the chain does not repeat the cause"
        );
    }

    /// A Redis error is the source too, but shown without text that could
    /// carry a password (a URL with credentials), in Display, Debug and chain.
    #[test]
    fn a_redis_error_is_the_source_without_credentials() {
        let raw = ::redis::RedisError::from((
            ::redis::ErrorKind::InvalidClientConfig,
            "bad url",
            "redis://user:hunter2@cache:6379".to_owned(),
        ));
        let err = StoreError::Redis {
            context: "redis cache:6379 read".into(),
            source: redis::RedisCause(raw),
        };
        assert!(
            std::error::Error::source(&err).is_some(),
            "the cause is kept"
        );
        for shown in [
            err.to_string(),
            format!("{err:?}"),
            crate::token::error_chain(&err),
        ] {
            assert!(
                shown.starts_with("redis cache:6379 read") || shown.starts_with("Redis"),
                "{shown}"
            );
            assert!(!shown.contains("hunter2"), "no password: {shown}");
        }
    }
}
