//! Subjects: one sealed record per merchant, customer or user of a client.
//!
//! A [`SubjectStore`] is one client's view of its subjects. Each subject has
//! one record: its tokens sealed under the store key, and beside them, in
//! clear, what is not secret ([`SubjectMeta`]: state, expiries, the last
//! refresh, when the sweeper should look at it), which listing and sweeping
//! read without opening anything. The associated data of the seal binds the
//! store's namespace, the client's record name (`CLIENT:IDENTITY`), the subject,
//! the generation and the clear part, so a record copied to another subject or
//! client, or with its clear part edited, does not open.
//!
//! Writes are fenced by generation, as for clients: a write names the
//! generation it creates and is refused when the store holds that one or a
//! newer one. One-time entries ([`SubjectStore::put_once`],
//! [`SubjectStore::take_once`]) carry connect sessions: an entry is taken at
//! most once, across processes.
//!
//! The memory store keeps records in process, unsealed; the file store in an
//! SQLite database beside the state file (`file_subjects.rs`); Redis under a
//! hash tag per subject, with a per-client index (`redis/subjects.rs`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::seal::{self, NotOpened};
use super::{from_ms, to_ms, Backend, Lease, Saved, Store, StoreError, TokenState, MAX_GENERATION};
use crate::secret::Secret;

/// Marks subject data sealed by this version.
const SUBJECT_FORMAT: &str = "s1.";

/// A subject's standing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectStatus {
    /// Holds a refresh token (and perhaps an access token).
    Valid,
    /// Its refresh token died: a person must connect again.
    NeedsAuthorization,
}

impl SubjectStatus {
    /// The name used in the admin API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SubjectStatus::Valid => "valid",
            SubjectStatus::NeedsAuthorization => "needs_authorization",
        }
    }

    /// The status named `name`.
    pub fn parse(name: &str) -> Option<SubjectStatus> {
        match name {
            "valid" => Some(SubjectStatus::Valid),
            "needs_authorization" => Some(SubjectStatus::NeedsAuthorization),
            _ => None,
        }
    }
}

/// What is not secret about a subject, kept in clear beside its sealed tokens
/// (and bound into the seal). Times are milliseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectMeta {
    pub status: SubjectStatus,
    pub connected_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_expires_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_expires_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_at_ms: Option<u64>,
    /// `success`, or the outcome label of the last failed token request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_outcome: Option<String>,
    /// Why the subject needs authorization (provider error code and text, never a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the sweeper should look at the subject next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_at_ms: Option<u64>,
}

/// One subject's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectRecord {
    /// Grows by one with every write; the fencing token.
    pub generation: u64,
    pub meta: SubjectMeta,
    pub tokens: TokenState,
    /// The subject's DPoP key (`[dpop]`), sealed with its tokens: the tokens
    /// of a record are bound to the key of that record, so a fenced write
    /// of the record keeps the two together, and deleting it deletes both.
    pub dpop_key: Option<SubjectKey>,
}

/// A subject's DPoP key as its record holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectKey {
    /// The JWS `alg` it signs with (`ES256`, `EdDSA`).
    pub alg: String,
    /// The PKCS#8 document, standard base64.
    pub pkcs8: Secret,
}

/// The result of reading one subject.
#[derive(Debug)]
pub enum SubjectLoad {
    /// No record.
    Missing,
    /// A record this client can use (boxed: the other variants are small).
    Found(Box<SubjectRecord>),
    /// A record that does not open (another key, copied from elsewhere,
    /// damaged): never used; `generation` is what it claims, so that an
    /// operator's import can replace it.
    NotOpened { generation: u64, problem: String },
}

/// One subject's record as a backend stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SubjectEnvelope {
    pub(crate) generation: u64,
    /// [`SubjectMeta`] as JSON, exactly as sealed over.
    pub(crate) meta: String,
    /// The sealed tokens (the memory store: their JSON).
    pub(crate) data: String,
    /// Set by a backend for a stored record it refuses to hand over as it is
    /// (too big, a field that is not text, a generation that is not a
    /// number): why. Such a record reads as one that does not open.
    #[serde(skip)]
    pub(crate) refused: Option<String>,
}

impl SubjectEnvelope {
    /// A stored record that is not handed over as it is: see [`SubjectEnvelope::refused`].
    pub(crate) fn refused(generation: u64, problem: String) -> SubjectEnvelope {
        SubjectEnvelope {
            generation,
            meta: String::new(),
            data: String::new(),
            refused: Some(problem),
        }
    }
}

/// The sealed content.
#[derive(Serialize, Deserialize)]
struct SubjectPlain {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lifetime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    obtained_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dpop: Option<PlainKey>,
}

/// A DPoP key in the sealed content.
#[derive(Serialize, Deserialize)]
struct PlainKey {
    alg: String,
    pkcs8: String,
}

/// One client's subjects.
#[derive(Clone)]
pub struct SubjectStore {
    store: Store,
    /// The client's record name, `CLIENT:IDENTITY`: subjects of two
    /// deployments sharing a store under one client name stay apart.
    pub(super) key: std::sync::Arc<str>,
}

impl Store {
    /// The subjects of `client`.
    pub fn subjects(&self, client: &crate::config::ClientConfig) -> SubjectStore {
        let identity = super::Identity::of(client);
        SubjectStore {
            store: self.clone(),
            key: format!("{}:{}", client.name, identity.binding).into(),
        }
    }
}

impl SubjectStore {
    /// memory | file | redis.
    pub fn kind(&self) -> &'static str {
        self.store.kind()
    }

    /// Whether other processes share the subjects (redis).
    pub fn is_shared(&self) -> bool {
        matches!(&*self.store.backend, Backend::Redis(_))
    }

    /// Reads one subject.
    pub async fn get(&self, subject: &str) -> Result<SubjectLoad, StoreError> {
        let envelope = match &*self.store.backend {
            Backend::Memory => self.store.memory.get(&self.key, subject),
            Backend::File(f) => f.subjects.subject_get(&self.key, subject).await?,
            Backend::Redis(r) => r.subject_get(&self.key, subject).await?,
        };
        Ok(match envelope {
            None => SubjectLoad::Missing,
            Some(envelope) => self.open(subject, envelope),
        })
    }

    /// Writes `record` if the store holds an older generation (or none);
    /// [`Saved::Stale`] names the generation it holds otherwise.
    pub async fn put(&self, subject: &str, record: &SubjectRecord) -> Result<Saved, StoreError> {
        self.write(subject, record, false).await
    }

    /// Writes `record` over an older generation of an existing record only: a
    /// subject deleted meanwhile stays deleted ([`Saved::Stale`] with
    /// generation 0). Refreshes write with this, so a deletion is never undone
    /// by a token request that was under way.
    pub async fn update(&self, subject: &str, record: &SubjectRecord) -> Result<Saved, StoreError> {
        self.write(subject, record, true).await
    }

    async fn write(
        &self,
        subject: &str,
        record: &SubjectRecord,
        existing_only: bool,
    ) -> Result<Saved, StoreError> {
        if record.generation == 0 || record.generation > MAX_GENERATION {
            return Err(StoreError::Io(format!(
                "subject record generation {} is out of range",
                record.generation
            )));
        }
        let envelope = self.seal(subject, record);
        match &*self.store.backend {
            Backend::Memory => {
                Ok(self
                    .store
                    .memory
                    .put(&self.key, subject, envelope, existing_only))
            }
            Backend::File(f) => {
                f.subjects
                    .subject_put(&self.key, subject, envelope, existing_only)
                    .await
            }
            Backend::Redis(r) => {
                r.subject_put(&self.key, subject, envelope, existing_only)
                    .await
            }
        }
    }

    /// Forgets one subject; whether there was one.
    pub async fn delete(&self, subject: &str) -> Result<bool, StoreError> {
        match &*self.store.backend {
            Backend::Memory => Ok(self.store.memory.delete(&self.key, subject)),
            Backend::File(f) => f.subjects.subject_delete(&self.key, subject).await,
            Backend::Redis(r) => r.subject_delete(&self.key, subject).await,
        }
    }

    /// Up to `limit` subjects in id order, strictly after `after`, with
    /// `status` when given. A record whose clear part does not parse is left out.
    pub async fn list(
        &self,
        status: Option<SubjectStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, SubjectMeta)>, StoreError> {
        match &*self.store.backend {
            Backend::Memory => Ok(self.store.memory.list(&self.key, status, after, limit)),
            Backend::File(f) => {
                f.subjects
                    .subject_list(&self.key, status, after, limit)
                    .await
            }
            Backend::Redis(r) => r.subject_list(&self.key, status, after, limit).await,
        }
    }

    /// Up to `limit` subjects whose `due_at` is at or before `until`, earliest first.
    pub async fn due(&self, until: SystemTime, limit: usize) -> Result<Vec<String>, StoreError> {
        let until = to_ms(until);
        match &*self.store.backend {
            Backend::Memory => Ok(self.store.memory.due(&self.key, until, limit)),
            Backend::File(f) => f.subjects.subject_due(&self.key, until, limit).await,
            Backend::Redis(r) => r.subject_due(&self.key, until, limit).await,
        }
    }

    /// How many subjects are in each status.
    pub async fn count(&self) -> Result<BTreeMap<SubjectStatus, u64>, StoreError> {
        match &*self.store.backend {
            Backend::Memory => Ok(self.store.memory.count(&self.key)),
            Backend::File(f) => f.subjects.subject_count(&self.key).await,
            Backend::Redis(r) => r.subject_count(&self.key).await,
        }
    }

    /// The right to refresh one subject: across processes with Redis; within
    /// this process otherwise, across reloads too (the subjects of a reloaded
    /// client are a new instance on the same store, and a token request of
    /// the old one may still be under way). A lease not given back lapses
    /// after `ttl`.
    pub async fn try_lease(
        &self,
        subject: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        match &*self.store.backend {
            Backend::Redis(r) => r.subject_lease(&self.key, subject, ttl).await,
            _ => Ok(self.store.memory.lease(&self.key, subject, ttl)),
        }
    }

    /// Gives a lease back.
    pub async fn release(&self, subject: &str, lease: Lease) -> Result<(), StoreError> {
        match (&*self.store.backend, lease.value) {
            (Backend::Redis(r), Some(v)) => r.subject_release(&self.key, subject, &v).await,
            (_, Some(v)) => {
                self.store.memory.release(&self.key, subject, &v);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Keeps `value` under `id` for `ttl`, sealed, to be taken once.
    pub async fn put_once(&self, id: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let data = match &self.store.sealer {
            Some(sealer) => sealer.seal(&self.once_aad(id), value),
            None => String::from_utf8_lossy(value).into_owned(),
        };
        let expires_at_ms = to_ms(SystemTime::now() + ttl);
        match &*self.store.backend {
            Backend::Memory => {
                self.store
                    .memory
                    .put_once(&self.key, id, data, expires_at_ms);
                Ok(())
            }
            Backend::File(f) => {
                f.subjects
                    .once_put(&self.key, id, data, expires_at_ms)
                    .await
            }
            Backend::Redis(r) => r.once_put(&self.key, id, data, ttl).await,
        }
    }

    /// Takes the entry under `id`: the first caller gets it, every later one
    /// (in any process) gets `None`, as after its ttl. An entry that does not
    /// open is taken and dropped.
    pub async fn take_once(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let now_ms = to_ms(SystemTime::now());
        let data = match &*self.store.backend {
            Backend::Memory => self.store.memory.take_once(&self.key, id, now_ms),
            Backend::File(f) => f.subjects.once_take(&self.key, id, now_ms).await?,
            Backend::Redis(r) => r.once_take(&self.key, id).await?,
        };
        let Some(data) = data else { return Ok(None) };
        Ok(match &self.store.sealer {
            Some(sealer) => sealer.open(&self.once_aad(id), &data).ok().map(|o| o.plain),
            None => Some(data.into_bytes()),
        })
    }

    fn once_aad(&self, id: &str) -> Vec<u8> {
        let name = format!("{}\0once\0{id}", self.key);
        seal::associated_data(&self.store.scope, &name, 0)
    }

    fn record_aad(&self, subject: &str, generation: u64, meta: &str) -> Vec<u8> {
        let name = format!("{}\0subject\0{subject}\0{meta}", self.key);
        seal::associated_data(&self.store.scope, &name, generation)
    }

    fn seal(&self, subject: &str, record: &SubjectRecord) -> SubjectEnvelope {
        let meta = serde_json::to_string(&record.meta).unwrap_or_default();
        let t = &record.tokens;
        let plain = SubjectPlain {
            access_token: t.access_token.as_ref().map(|s| s.expose().to_owned()),
            lifetime_ms: t.lifetime.map(|l| l.as_millis() as u64),
            refresh_token: t.refresh_token.as_ref().map(|s| s.expose().to_owned()),
            obtained_at_ms: to_ms(t.obtained_at),
            dpop: record.dpop_key.as_ref().map(|k| PlainKey {
                alg: k.alg.clone(),
                pkcs8: k.pkcs8.expose().to_owned(),
            }),
        };
        let plain = serde_json::to_vec(&plain).unwrap_or_default();
        let data = match &self.store.sealer {
            Some(sealer) => {
                let aad = self.record_aad(subject, record.generation, &meta);
                format!("{SUBJECT_FORMAT}{}", sealer.seal(&aad, &plain))
            }
            None => String::from_utf8_lossy(&plain).into_owned(),
        };
        SubjectEnvelope {
            generation: record.generation,
            meta,
            data,
            refused: None,
        }
    }

    fn open(&self, subject: &str, envelope: SubjectEnvelope) -> SubjectLoad {
        let generation = envelope.generation;
        let not_opened = |problem: &str| SubjectLoad::NotOpened {
            generation,
            problem: problem.to_owned(),
        };
        if let Some(problem) = &envelope.refused {
            return not_opened(problem);
        }
        let Ok(meta) = serde_json::from_str::<SubjectMeta>(&envelope.meta) else {
            return not_opened("its clear part is not a subject's state");
        };
        let plain = match &self.store.sealer {
            Some(sealer) => {
                let Some(sealed) = envelope.data.strip_prefix(SUBJECT_FORMAT) else {
                    return not_opened("its data is not sealed data of a subject");
                };
                let aad = self.record_aad(subject, generation, &envelope.meta);
                match sealer.open(&aad, sealed) {
                    Ok(opened) => opened.plain,
                    Err(NotOpened::Malformed) => return not_opened("its data is not sealed data"),
                    Err(NotOpened::Sealed) => {
                        return not_opened(
                            "it does not open with the configured store key or any previous key (sealed with another key, copied from another subject or client, or edited)",
                        )
                    }
                }
            }
            None => envelope.data.into_bytes(),
        };
        let Ok(plain) = serde_json::from_slice::<SubjectPlain>(&plain) else {
            return not_opened("it opens, but its content is not a subject's tokens");
        };
        SubjectLoad::Found(Box::new(SubjectRecord {
            generation,
            tokens: TokenState {
                access_token: plain.access_token.map(Secret::new),
                access_expires_at: meta.access_expires_at_ms.map(from_ms),
                lifetime: plain.lifetime_ms.map(Duration::from_millis),
                refresh_token: plain.refresh_token.map(Secret::new),
                refresh_expires_at: meta.refresh_expires_at_ms.map(from_ms),
                obtained_at: from_ms(plain.obtained_at_ms),
            },
            meta,
            dpop_key: plain.dpop.map(|k| SubjectKey {
                alg: k.alg,
                pkcs8: Secret::new(k.pkcs8),
            }),
        }))
    }
}

/// Subjects of the memory store.
#[derive(Default)]
pub(crate) struct MemorySubjects {
    records: Mutex<BTreeMap<(String, String), SubjectEnvelope>>,
    once: Mutex<BTreeMap<(String, String), (String, u64)>>,
    /// Leases held in this process (every store but Redis): holder and deadline.
    leases: Mutex<std::collections::HashMap<(String, String), (u64, tokio::time::Instant)>>,
    next_holder: std::sync::atomic::AtomicU64,
}

impl MemorySubjects {
    fn lease(&self, key: &str, subject: &str, ttl: Duration) -> Option<Lease> {
        let now = tokio::time::Instant::now();
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        let slot = (key.to_owned(), subject.to_owned());
        if leases.get(&slot).is_some_and(|(_, until)| *until > now) {
            return None;
        }
        let holder = self
            .next_holder
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        leases.insert(slot, (holder, now + ttl));
        Some(Lease {
            value: Some(holder.to_string()),
        })
    }

    fn release(&self, key: &str, subject: &str, holder: &str) {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        let slot = (key.to_owned(), subject.to_owned());
        if leases
            .get(&slot)
            .is_some_and(|(h, _)| h.to_string() == holder)
        {
            leases.remove(&slot);
        }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), SubjectEnvelope>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, key: &str, subject: &str) -> Option<SubjectEnvelope> {
        self.records()
            .get(&(key.to_owned(), subject.to_owned()))
            .cloned()
    }

    fn put(
        &self,
        key: &str,
        subject: &str,
        envelope: SubjectEnvelope,
        existing_only: bool,
    ) -> Saved {
        let mut records = self.records();
        let slot = (key.to_owned(), subject.to_owned());
        match records.get(&slot) {
            Some(held) if held.generation >= envelope.generation => {
                return Saved::Stale {
                    generation: held.generation,
                };
            }
            None if existing_only => return Saved::Stale { generation: 0 },
            _ => {}
        }
        records.insert(slot, envelope);
        Saved::Written
    }

    fn delete(&self, key: &str, subject: &str) -> bool {
        self.records()
            .remove(&(key.to_owned(), subject.to_owned()))
            .is_some()
    }

    fn metas<'a>(
        records: &'a BTreeMap<(String, String), SubjectEnvelope>,
        key: &'a str,
    ) -> impl Iterator<Item = (&'a String, SubjectMeta)> + 'a {
        records
            .range((key.to_owned(), String::new())..)
            .take_while(move |((k, _), _)| k == key)
            .filter_map(|((_, s), e)| {
                serde_json::from_str::<SubjectMeta>(&e.meta)
                    .ok()
                    .map(|m| (s, m))
            })
    }

    fn list(
        &self,
        key: &str,
        status: Option<SubjectStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Vec<(String, SubjectMeta)> {
        let records = self.records();
        Self::metas(&records, key)
            .filter(|(s, _)| after.is_none_or(|a| s.as_str() > a))
            .filter(|(_, m)| status.is_none_or(|st| m.status == st))
            .take(limit)
            .map(|(s, m)| (s.clone(), m))
            .collect()
    }

    fn due(&self, key: &str, until_ms: u64, limit: usize) -> Vec<String> {
        let records = self.records();
        let mut due: Vec<(u64, String)> = Self::metas(&records, key)
            .filter_map(|(s, m)| {
                m.due_at_ms
                    .filter(|d| *d <= until_ms)
                    .map(|d| (d, s.clone()))
            })
            .collect();
        due.sort();
        due.into_iter().take(limit).map(|(_, s)| s).collect()
    }

    fn count(&self, key: &str) -> BTreeMap<SubjectStatus, u64> {
        let records = self.records();
        let mut counts = BTreeMap::new();
        for (_, meta) in Self::metas(&records, key) {
            *counts.entry(meta.status).or_insert(0) += 1;
        }
        counts
    }

    fn put_once(&self, key: &str, id: &str, data: String, expires_at_ms: u64) {
        let mut once = self.once.lock().unwrap_or_else(|p| p.into_inner());
        once.insert((key.to_owned(), id.to_owned()), (data, expires_at_ms));
    }

    fn take_once(&self, key: &str, id: &str, now_ms: u64) -> Option<String> {
        let mut once = self.once.lock().unwrap_or_else(|p| p.into_inner());
        once.retain(|_, (_, expires)| *expires > now_ms);
        once.remove(&(key.to_owned(), id.to_owned()))
            .map(|(data, _)| data)
    }
}
