//! Subjects on Redis (see `store/subjects.rs`), ready for a Cluster: every
//! subject's keys share a hash tag of their own, and a client's index another.
//!
//! Keys (PREFIX is `key_prefix`, NAME the client's record name
//! `CLIENT:IDENTITY`, SUBJECT the subject id):
//! - `PREFIX:{NAME:SUBJECT}:subject`, a hash with `generation`, `meta` (the
//!   clear part) and `data` (the sealed tokens). Written only by [`PUT`],
//!   which refuses a generation not above the stored one. A write that was
//!   not acknowledged by replicas is reported as failed; written again, it
//!   is refused as stale, and reading the record shows whether it is there.
//! - `PREFIX:{NAME:SUBJECT}:lease`, a string set with `NX PX` to a random
//!   value: its holder alone refreshes the subject; given back by [`RELEASE`]
//!   only while it holds that value.
//! - `PREFIX:{NAME}:once:ID`, a one-time entry: `SET PX`, taken with `GETDEL`.
//! - The client's index, in one slot: `PREFIX:{NAME}:subjects` (every
//!   subject, score 0, paged with `ZRANGEBYLEX`), `PREFIX:{NAME}:status:STATUS`
//!   (the same per status), `PREFIX:{NAME}:due` (scored by `due_at_ms`) and
//!   `PREFIX:{NAME}:indexed` (a hash: the generation each subject was indexed at).
//!
//! The record and the index live in different slots, so no script can
//! change both: the index is updated after the record is written ([`INDEX`],
//! which ignores an update older than the one it holds, so writers that race
//! leave it at the newest record). It is advisory: a process that stops
//! between the two writes leaves it behind until the subject's next write.
//! Listing and sweeping re-read each record and drop entries whose record is
//! gone or no longer matches; counts are the index's cardinalities and may be
//! off by such entries.
//!
//! Writes of records and takes of one-time entries wait for
//! `min_replicas_acked` replicas, as for clients (see `redis.rs`), and so does
//! a lease: none of them may be lost in a failover.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use redis::Script;
use tracing::{debug, warn};

use super::{wait_for_replicas, RedisBackend, WAIT_TIMEOUT};
use crate::store::subjects::SubjectEnvelope;
use crate::store::{Lease, Saved, StoreError, SubjectMeta, SubjectStatus, MAX_RECORD_BYTES};

/// Every status, in the order of the index's status keys.
const STATUSES: [SubjectStatus; 2] = [SubjectStatus::Valid, SubjectStatus::NeedsAuthorization];

/// The position of `status` in [`STATUSES`] (a new status must be added there).
fn position(status: SubjectStatus) -> usize {
    match status {
        SubjectStatus::Valid => 0,
        SubjectStatus::NeedsAuthorization => 1,
    }
}

/// How many index entries one round of listing reads at most.
const BATCH: usize = 200;

/// The fenced write of KEYS[1]: generation ARGV[1], meta ARGV[2], data
/// ARGV[3]; with ARGV[4] = '1' only over an existing record (a subject
/// deleted meanwhile stays deleted: 0). Returns -1 when written, else the stored
/// generation. A stored generation that is not a whole number, or a key of
/// another type, was not written by tokenproxy and fences nothing; one above
/// 2^53 fences everything (reported as 2^53).
pub(super) const PUT: &str = r"
local t = redis.call('TYPE', KEYS[1])['ok']
if ARGV[4] == '1' and t == 'none' then return 0 end
local raw = false
if t == 'hash' then raw = redis.call('HGET', KEYS[1], 'generation') end
local cur = tonumber(raw or '0')
if cur == nil or cur ~= math.floor(cur) or cur < 0 then cur = 0 end
if cur > 9007199254740992 then cur = 9007199254740992 end
if cur >= tonumber(ARGV[1]) then return cur end
if t ~= 'hash' and t ~= 'none' then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'generation', ARGV[1], 'meta', ARGV[2], 'data', ARGV[3])
return -1
";

/// Reads KEYS[1]: nil when absent, else {generation, size, meta, data}, the
/// last two only when meta and data together are at most ARGV[1] bytes. A
/// key of another type reads as a generation that is not a number.
const READ: &str = r"
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then return false end
if t ~= 'hash' then return {'', '0'} end
local g = redis.call('HGET', KEYS[1], 'generation') or ''
local size = redis.call('HSTRLEN', KEYS[1], 'meta') + redis.call('HSTRLEN', KEYS[1], 'data')
if size > tonumber(ARGV[1]) then return {g, tostring(size)} end
return {g, tostring(size), redis.call('HGET', KEYS[1], 'meta') or '', redis.call('HGET', KEYS[1], 'data') or ''}
";

/// Deletes KEYS[1]; returns nil when there was none, else the generation it
/// held (2^53 when not a number: its index entries go whatever they are).
const DELETE: &str = r"
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then return false end
local g = false
if t == 'hash' then g = tonumber(redis.call('HGET', KEYS[1], 'generation') or '') end
redis.call('DEL', KEYS[1])
if g == nil or g == false or g ~= math.floor(g) or g < 0 or g > 9007199254740992 then return '9007199254740992' end
return string.format('%d', g)
";

/// Indexes subject ARGV[1] at generation ARGV[2], due at ARGV[3] (empty:
/// never), of the status at position ARGV[4] (from 1) among KEYS[4..]; KEYS
/// are `subjects`, `due`, `indexed`, then one key per status. An update not
/// newer than the one indexed is ignored.
const INDEX: &str = r"
local held = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '-1') or -1
if held >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], 0, ARGV[1])
if ARGV[3] == '' then redis.call('ZREM', KEYS[2], ARGV[1]) else redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1]) end
for i = 4, #KEYS do
  if i - 3 == tonumber(ARGV[4]) then redis.call('ZADD', KEYS[i], 0, ARGV[1]) else redis.call('ZREM', KEYS[i], ARGV[1]) end
end
return 1
";

/// Removes subject ARGV[1], deleted at generation ARGV[2], from the index
/// (KEYS as for [`INDEX`]), unless a newer record was indexed meanwhile.
const UNINDEX: &str = r"
local held = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '-1') or -1
if held > tonumber(ARGV[2]) then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 4, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 1
";

/// Gives the lease KEYS[1] back if it still holds ARGV[1].
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// The subject scripts, hashed once.
pub(super) struct Scripts {
    put: Script,
    read: Script,
    delete: Script,
    index: Script,
    unindex: Script,
    release: Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            put: Script::new(PUT),
            read: Script::new(READ),
            delete: Script::new(DELETE),
            index: Script::new(INDEX),
            unindex: Script::new(UNINDEX),
            release: Script::new(RELEASE),
        }
    }
}

/// A record as [`READ`] returns it.
fn envelope(fields: Vec<Vec<u8>>) -> SubjectEnvelope {
    let mut fields = fields.into_iter();
    let generation = fields.next().unwrap_or_default();
    let size = fields.next().unwrap_or_default();
    let generation = std::str::from_utf8(&generation)
        .ok()
        .and_then(|g| g.parse::<u64>().ok());
    let Some(generation) = generation else {
        return SubjectEnvelope::refused(0, "its generation is not a whole number".to_owned());
    };
    if generation > crate::store::MAX_GENERATION {
        return SubjectEnvelope::refused(
            generation,
            format!("its generation {generation} is above 2^53, which tokenproxy never writes"),
        );
    }
    let (Some(meta), Some(data)) = (fields.next(), fields.next()) else {
        let size = String::from_utf8_lossy(&size).into_owned();
        return SubjectEnvelope::refused(
            generation,
            format!("it is {size} bytes, above the {MAX_RECORD_BYTES} a record may have"),
        );
    };
    match (String::from_utf8(meta), String::from_utf8(data)) {
        (Ok(meta), Ok(data)) => SubjectEnvelope {
            generation,
            meta,
            data,
            refused: None,
        },
        _ => SubjectEnvelope::refused(generation, "its meta or data field is not text".to_owned()),
    }
}

/// The clear part of a record that opens as far as listing needs.
fn listed(envelope: Option<SubjectEnvelope>) -> Option<SubjectMeta> {
    let envelope = envelope?;
    if envelope.refused.is_some() {
        return None;
    }
    serde_json::from_str(&envelope.meta).ok()
}

/// Runs `futures` at once (their commands share the multiplexed connection,
/// so a page of reads costs about one round trip) and returns their outputs in order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(v) => *output = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

impl RedisBackend {
    /// `PREFIX:{NAME:SUBJECT}:what`.
    fn subject_key(&self, name: &str, subject: &str, what: &str) -> String {
        format!("{}:{{{name}:{subject}}}:{what}", self.prefix)
    }

    /// The client's index keys, as [`INDEX`] and [`UNINDEX`] take them.
    fn index_keys(&self, name: &str) -> Vec<String> {
        let mut keys = vec![
            self.key(name, "subjects"),
            self.key(name, "due"),
            self.key(name, "indexed"),
        ];
        keys.extend(
            STATUSES
                .iter()
                .map(|s| self.key(name, &format!("status:{}", s.as_str()))),
        );
        keys
    }

    /// An error naming `what` when fewer than the configured replicas
    /// acknowledged it.
    fn acknowledged(&self, acked: u32, what: &str) -> Result<(), StoreError> {
        let wanted = self.min_replicas_acked;
        if acked < wanted {
            return Err(StoreError::Unavailable(format!(
                "redis {} {what}: on the primary, but acknowledged by {acked} of {wanted} replicas within {} ms (store.min_replicas_acked); not counted as done, as a failover could lose it",
                self.display_url,
                WAIT_TIMEOUT.as_millis()
            )));
        }
        Ok(())
    }

    pub(crate) async fn subject_get(
        &self,
        name: &str,
        subject: &str,
    ) -> Result<Option<SubjectEnvelope>, StoreError> {
        self.read_subject(&self.subject_key(name, subject, "subject"))
            .await
    }

    async fn read_subject(&self, key: &str) -> Result<Option<SubjectEnvelope>, StoreError> {
        let mut invocation = self.subject_scripts.read.key(key);
        invocation.arg(MAX_RECORD_BYTES);
        let fields: Option<Vec<Vec<u8>>> = self
            .run("read", async |h| invocation.invoke_async(h).await)
            .await?;
        Ok(fields.map(envelope))
    }

    /// The records of `subjects`, read at once.
    async fn read_subjects(
        &self,
        name: &str,
        subjects: &[String],
    ) -> Result<Vec<Option<SubjectEnvelope>>, StoreError> {
        let keys: Vec<String> = subjects
            .iter()
            .map(|s| self.subject_key(name, s, "subject"))
            .collect();
        join_all(keys.iter().map(|k| self.read_subject(k)).collect())
            .await
            .into_iter()
            .collect()
    }

    pub(crate) async fn subject_put(
        &self,
        name: &str,
        subject: &str,
        envelope: SubjectEnvelope,
        existing_only: bool,
    ) -> Result<Saved, StoreError> {
        let meta: SubjectMeta = serde_json::from_str(&envelope.meta).map_err(|e| {
            StoreError::Io(format!(
                "subject record to write has no valid clear part: {e}"
            ))
        })?;
        let key = self.subject_key(name, subject, "subject");
        let mut invocation = self.subject_scripts.put.key(&key);
        invocation
            .arg(envelope.generation)
            .arg(&envelope.meta)
            .arg(&envelope.data)
            .arg(if existing_only { "1" } else { "0" });
        let wanted = self.min_replicas_acked;
        let (answer, acked): (i64, u32) = self
            .run("write", async |h| {
                let answer: i64 = invocation.invoke_async(&mut *h).await?;
                let acked = if answer < 0 && wanted > 0 {
                    wait_for_replicas(h, &key, wanted).await?
                } else {
                    wanted
                };
                Ok((answer, acked))
            })
            .await?;
        if answer >= 0 {
            return Ok(Saved::Stale {
                generation: answer as u64,
            });
        }
        self.acknowledged(acked, "write")?;
        // The record is stored: an index left behind is repaired by the next
        // write, and must not make the caller think the tokens were lost.
        if let Err(e) = self.index(name, subject, envelope.generation, &meta).await {
            warn!(record = name, error = %e, "subject stored, but its listing index was not updated");
        }
        Ok(Saved::Written)
    }

    async fn index(
        &self,
        name: &str,
        subject: &str,
        generation: u64,
        meta: &SubjectMeta,
    ) -> Result<(), StoreError> {
        let keys = self.index_keys(name);
        let mut invocation = self.subject_scripts.index.prepare_invoke();
        for k in &keys {
            invocation.key(k);
        }
        invocation
            .arg(subject)
            .arg(generation)
            .arg(meta.due_at_ms.map(|d| d.to_string()).unwrap_or_default())
            .arg(position(meta.status) + 1);
        let _indexed: i64 = self
            .run("index", async |h| invocation.invoke_async(h).await)
            .await?;
        Ok(())
    }

    pub(crate) async fn subject_delete(
        &self,
        name: &str,
        subject: &str,
    ) -> Result<bool, StoreError> {
        let invocation = self
            .subject_scripts
            .delete
            .key(self.subject_key(name, subject, "subject"));
        let deleted: Option<String> = self
            .run("delete", async |h| invocation.invoke_async(h).await)
            .await?;
        let Some(generation) = deleted else {
            return Ok(false);
        };
        let keys = self.index_keys(name);
        let mut invocation = self.subject_scripts.unindex.prepare_invoke();
        for k in &keys {
            invocation.key(k);
        }
        invocation.arg(subject).arg(&generation);
        let unindexed: Result<i64, _> = self
            .run("index", async |h| invocation.invoke_async(h).await)
            .await;
        if let Err(e) = unindexed {
            warn!(record = name, error = %e, "subject deleted, but its listing index entry was not removed");
        }
        Ok(true)
    }

    pub(crate) async fn subject_list(
        &self,
        name: &str,
        status: Option<SubjectStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, SubjectMeta)>, StoreError> {
        let index = match status {
            Some(s) => self.key(name, &format!("status:{}", s.as_str())),
            None => self.key(name, "subjects"),
        };
        let mut from = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let mut out = Vec::new();
        while out.len() < limit {
            let batch = (limit - out.len()).min(BATCH);
            let ids: Vec<String> = self
                .run("list", async |h| {
                    redis::cmd("ZRANGEBYLEX")
                        .arg(&index)
                        .arg(&from)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(batch)
                        .query_async(h)
                        .await
                })
                .await?;
            let records = self.read_subjects(name, &ids).await?;
            for (id, record) in ids.iter().zip(records) {
                match listed(record) {
                    Some(meta) if status.is_none_or(|s| meta.status == s) => {
                        out.push((id.clone(), meta));
                    }
                    _ => {
                        debug!(record = name, subject = %id, "index entry without a matching record skipped")
                    }
                }
            }
            match ids.last() {
                Some(last) if ids.len() == batch => from = format!("({last}"),
                _ => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    pub(crate) async fn subject_due(
        &self,
        name: &str,
        until_ms: u64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let index = self.key(name, "due");
        let mut offset = 0;
        let mut out = Vec::new();
        while out.len() < limit {
            let batch = (limit - out.len()).min(BATCH);
            let ids: Vec<String> = self
                .run("due", async |h| {
                    redis::cmd("ZRANGEBYSCORE")
                        .arg(&index)
                        .arg("-inf")
                        .arg(until_ms)
                        .arg("LIMIT")
                        .arg(offset)
                        .arg(batch)
                        .query_async(h)
                        .await
                })
                .await?;
            let records = self.read_subjects(name, &ids).await?;
            for (id, record) in ids.iter().zip(records) {
                if listed(record).is_some_and(|m| m.due_at_ms.is_some_and(|d| d <= until_ms)) {
                    out.push(id.clone());
                }
            }
            if ids.len() < batch {
                break;
            }
            offset += ids.len();
        }
        out.truncate(limit);
        Ok(out)
    }

    pub(crate) async fn subject_count(
        &self,
        name: &str,
    ) -> Result<BTreeMap<SubjectStatus, u64>, StoreError> {
        let keys: Vec<String> = STATUSES
            .iter()
            .map(|s| self.key(name, &format!("status:{}", s.as_str())))
            .collect();
        let counts: Vec<u64> = self
            .run("count", async |h| {
                let mut counts = Vec::with_capacity(keys.len());
                for k in &keys {
                    counts.push(redis::cmd("ZCARD").arg(k).query_async(&mut *h).await?);
                }
                Ok(counts)
            })
            .await?;
        Ok(STATUSES
            .into_iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .collect())
    }

    pub(crate) async fn subject_lease(
        &self,
        name: &str,
        subject: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let key = self.subject_key(name, subject, "lease");
        let value = format!("{}:{:016x}", self.instance, fastrand::u64(..));
        let wanted = self.min_replicas_acked;
        let (taken, acked): (bool, u32) = self
            .run("lease", async |h| {
                let set: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&value)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis().max(1) as u64)
                    .query_async(&mut *h)
                    .await?;
                let taken = set.is_some();
                let acked = if taken && wanted > 0 {
                    wait_for_replicas(h, &key, wanted).await?
                } else {
                    wanted
                };
                Ok((taken, acked))
            })
            .await?;
        if !taken {
            return Ok(None);
        }
        if acked < wanted {
            // A lease a failover could lose is no lease: given back at once.
            if let Err(e) = self.subject_release(name, subject, &value).await {
                debug!(record = name, error = %e, "unacknowledged subject lease not released");
            }
            self.acknowledged(acked, "lease")?;
        }
        Ok(Some(Lease { value: Some(value) }))
    }

    pub(crate) async fn subject_release(
        &self,
        name: &str,
        subject: &str,
        value: &str,
    ) -> Result<(), StoreError> {
        let mut invocation = self
            .subject_scripts
            .release
            .key(self.subject_key(name, subject, "lease"));
        invocation.arg(value);
        let _released: i64 = self
            .run("lease release", async |h| invocation.invoke_async(h).await)
            .await?;
        Ok(())
    }

    pub(crate) async fn once_put(
        &self,
        name: &str,
        id: &str,
        data: String,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let key = self.key(name, &format!("once:{id}"));
        let ttl_ms = ttl.as_millis() as u64;
        self.run("write", async |h| {
            if ttl_ms == 0 {
                // Expired as soon as made: nothing to keep.
                return redis::cmd("DEL").arg(&key).query_async(h).await;
            }
            redis::cmd("SET")
                .arg(&key)
                .arg(&data)
                .arg("PX")
                .arg(ttl_ms)
                .query_async(h)
                .await
        })
        .await
    }

    pub(crate) async fn once_take(
        &self,
        name: &str,
        id: &str,
    ) -> Result<Option<String>, StoreError> {
        let key = self.key(name, &format!("once:{id}"));
        let wanted = self.min_replicas_acked;
        let (taken, acked): (Option<Vec<u8>>, u32) = self
            .run("take", async |h| {
                let taken: Option<Vec<u8>> =
                    redis::cmd("GETDEL").arg(&key).query_async(&mut *h).await?;
                let acked = if taken.is_some() && wanted > 0 {
                    wait_for_replicas(h, &key, wanted).await?
                } else {
                    wanted
                };
                Ok((taken, acked))
            })
            .await?;
        let Some(taken) = taken else { return Ok(None) };
        // Taken, but a failover could bring it back to be taken again: not used.
        self.acknowledged(acked, "take")?;
        if taken.len() > MAX_RECORD_BYTES {
            return Ok(None);
        }
        Ok(String::from_utf8(taken).ok())
    }
}
