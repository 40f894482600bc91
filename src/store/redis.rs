//! `kind = "redis"`: one hash per client, a lease per client, fenced writes,
//! on one Redis, a primary found through Sentinel, or a Cluster (`conn.rs`).
//!
//! Keys (PREFIX is `key_prefix`, CLIENT the client's name, IDENTITY the hash of
//! its credential identity, see `store/mod.rs`); the braces are a Cluster hash
//! tag, so that a client's record and lease share a slot and one script may
//! touch both:
//! - `PREFIX:{CLIENT:IDENTITY}:token`, a hash with `generation`, `binding`,
//!   `account`, `data` (the sealed state) and `writer` (the process that wrote
//!   it). Written only by a script that refuses a generation not above the
//!   stored one (the writer may write its own generation again, see [`SAVE`]).
//!   Its field `spending`, `HOLDER GENERATION MILLIS`, is the spending mark:
//!   set with the lease (see [`TRY_LEASE`]), it says that this holder may
//!   send the refresh token of that generation, from when (the store's clock,
//!   in ms). Every write of a new record removes it; a holder that gives the
//!   lease back without having sent the refresh token removes its own (see
//!   [`RELEASE`]). It is acknowledged by replicas with the lease, so it
//!   survives a failover that loses the holder's write, and a later leader
//!   that finds another process's mark at the stored generation knows that
//!   refresh token may be spent (see `token/refresher/stored.rs`).
//! - `PREFIX:{CLIENT:IDENTITY}:lease`, a string `HOLDER GENERATION`: the
//!   replica holding it is the only one that calls the provider for this
//!   client, starting from the record of that generation. A lease whose holder
//!   (or anyone) has since stored a newer generation counts as released (see
//!   [`TRY_LEASE`]): a release lost in a failover blocks nobody.
//! - Written by earlier versions, taken over on first read (not in a Cluster,
//!   which earlier versions did not support): `PREFIX:CLIENT:token` (bound to
//!   fewer fields: re-sealed by `store/mod.rs`, moved by [`TAKE_OVER`]) and
//!   `PREFIX:CLIENT:IDENTITY:token` (the same record without the hash tag:
//!   renamed by [`UNTAG`]).
//!
//! Subjects have keys of their own, one hash tag per subject and one for a
//! client's index of them: see `redis/subjects.rs`.
//!
//! A write that carries a refresh token waits for `min_replicas_acked`
//! replicas (`WAIT`): a replica promoted after a failover has it. One not
//! acknowledged in time is reported as not stored, so the refresher keeps it
//! pending and writes it again. A lease (and its spending mark) waits for
//! them too; one they did not acknowledge is given back and not used. Neither
//! waits when the node has fewer replicas connected than that (a promoted
//! replica whose old primary is gone): it counts as not acknowledged at once.
//!
//! Every operation is bounded by twice [`OP_TIMEOUT`].

mod conn;
mod subjects;

use std::time::{Duration, SystemTime};

use redis::Script;
use tracing::debug;

use super::{Envelope, Read, Saved, StoreError, Unopened, MAX_GENERATION};
use crate::config::RedisStoreConfig;
use conn::{Conn, Handle, OP_TIMEOUT};

/// How long a write waits for replicas to acknowledge it.
const WAIT_TIMEOUT: Duration = Duration::from_millis(500);

/// ARGV[5] and ARGV[6], when set, name a record that did not open (generation
/// and data as read): it is replaced whatever its generation. ARGV[7] is the
/// writer: a process may write its own generation again (a write it was not
/// sure of: no answer in time, or not acknowledged by replicas), never
/// another's. Generations are compared as text where they must be equal,
/// since Lua numbers are doubles; one that is not a whole number up to 2^53
/// (which tokenproxy never writes) counts as 2^53, so only a write naming it
/// replaces it.
const SAVE: &str = r"
local raw = redis.call('HGET', KEYS[1], 'generation')
local replace = ARGV[5] ~= '' and raw == ARGV[5] and (redis.call('HGET', KEYS[1], 'data') or '') == ARGV[6]
local own = raw == ARGV[1] and redis.call('HGET', KEYS[1], 'writer') == ARGV[7]
local cur = tonumber(raw or '0')
if cur == nil or cur ~= math.floor(cur) or cur < 0 or cur > 9007199254740992 then cur = 9007199254740992 end
if cur >= tonumber(ARGV[1]) and not replace and not own then return cur end
redis.call('HSET', KEYS[1], 'generation', ARGV[1], 'binding', ARGV[2], 'account', ARGV[3], 'data', ARGV[4], 'writer', ARGV[7])
redis.call('HDEL', KEYS[1], 'spending')
return -1
";

/// Moves a record of an earlier version (KEYS[1], as read: generation ARGV[1],
/// data ARGV[2]) to the identity's key (KEYS[2]) unless that holds one.
const TAKE_OVER: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('HGET', KEYS[1], 'generation') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'data') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], 'generation', ARGV[1], 'binding', ARGV[3], 'account', ARGV[4], 'data', ARGV[5])
redis.call('DEL', KEYS[1])
return 1
";

/// Renames the record an earlier version stored without the hash tag
/// (KEYS[1]) to the tagged name (KEYS[2]) unless that holds one.
const UNTAG: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
";

/// Sets the spending mark of holder ARGV[1] on the record KEYS[2] at its
/// generation `gen`, when the record exists and carries no mark at that
/// generation: a mark of another holder at the stored generation stays, since
/// that holder may have spent the refresh token without writing its answer.
const MARK: &str = r"
if redis.call('HEXISTS', KEYS[2], 'generation') == 1 then
  local mark = redis.call('HGET', KEYS[2], 'spending')
  if not mark or string.match(mark, '^%S+ (%S+)') ~= gen then
    local t = redis.call('TIME')
    redis.call('HSET', KEYS[2], 'spending', ARGV[1] .. ' ' .. gen .. ' ' .. t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000)))
  end
end
";

/// Takes the lease (KEYS[1]) for holder ARGV[1] for ARGV[2] ms when it is free:
/// absent, or held from a record generation older than the one stored now
/// (KEYS[2]), which means its holder finished (its release may have been lost
/// in a failover) or was overtaken. The value records the stored generation;
/// the record gets the holder's spending mark (see [`MARK`]).
const TRY_LEASE: &str = r"
local gen = redis.call('HGET', KEYS[2], 'generation') or '0'
local g = tonumber(gen)
if g == nil or g ~= math.floor(g) or g < 0 or g > 9007199254740992 then
  g = 9007199254740992
  gen = '9007199254740992'
end
local held = redis.call('GET', KEYS[1])
local cleared = 0
if held then
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl < 0 or pttl > tonumber(ARGV[3]) then
    redis.call('DEL', KEYS[1])
    cleared = 1
  else
    local base = string.match(held, ' (%d+)$')
    if base == nil or g <= tonumber(base) then return 0 end
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. gen, 'PX', ARGV[2])
-- MARK
return 1 + cleared
";

/// Longer than any lease tokenproxy sets (`token.timeout` + 2 s, or a backoff
/// of at most 5 minutes): a lease key without expiry, or with a longer one,
/// was put there by someone else and would stop every refresh; it is cleared.
const LEASE_TTL_MAX: Duration = Duration::from_secs(310);

/// Gives the lease back if ARGV[1] holds it, and removes the spending mark
/// on the record (KEYS[2]) when it begins with ARGV[2] (not empty): the
/// holder's own (`HOLDER `), or any of its process (`INSTANCE:`), whether or
/// not the lease is still held.
const RELEASE: &str = r"
if ARGV[2] ~= '' then
  local mark = redis.call('HGET', KEYS[2], 'spending')
  if mark and string.sub(mark, 1, #ARGV[2]) == ARGV[2] then redis.call('HDEL', KEYS[2], 'spending') end
end
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Keeps the lease for ARGV[2] ms if ARGV[1] holds it, from the generation
/// stored now: its holder has taken that record (or written it) and goes on,
/// and may send its refresh token: the record gets the holder's spending mark
/// (see [`MARK`]).
const EXTEND: &str = r"
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  local gen = redis.call('HGET', KEYS[2], 'generation') or '0'
  redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. gen, 'PX', ARGV[2])
  -- MARK
  return 1
end
return 0
";

/// Longest number of records of one client looked at for other chains.
const MAX_CHAINS: usize = 1000;

pub(crate) struct RedisBackend {
    conn: Conn,
    prefix: String,
    display_url: String,
    /// Identifies this process in leases and records: `pid:random`.
    instance: String,
    /// Replicas a write carrying a refresh token waits for.
    min_replicas_acked: u32,
    save: Script,
    take_over: Script,
    untag: Script,
    try_lease: Script,
    release: Script,
    extend: Script,
    subject_scripts: subjects::Scripts,
}

impl RedisBackend {
    pub(crate) fn open(config: &RedisStoreConfig) -> Result<RedisBackend, StoreError> {
        let conn = Conn::open(config).map_err(|e| StoreError::Redis {
            context: format!(
                "store.{} {}: cannot set up the client",
                config.location_key(),
                config.display_url,
            ),
            source: RedisCause(e),
        })?;
        Ok(RedisBackend {
            conn,
            prefix: config.key_prefix.clone(),
            display_url: config.display_url.clone(),
            instance: format!("{}:{:016x}", std::process::id(), fastrand::u64(..)),
            min_replicas_acked: config.min_replicas_acked,
            save: Script::new(SAVE),
            take_over: Script::new(TAKE_OVER),
            untag: Script::new(UNTAG),
            try_lease: Script::new(&TRY_LEASE.replace("-- MARK", MARK)),
            release: Script::new(RELEASE),
            extend: Script::new(&EXTEND.replace("-- MARK", MARK)),
            subject_scripts: subjects::Scripts::new(),
        })
    }

    /// `PREFIX:{NAME}:what`, NAME being `CLIENT:IDENTITY`.
    fn key(&self, name: &str, what: &str) -> String {
        format!("{}:{{{name}}}:{what}", self.prefix)
    }

    /// The name earlier versions used: `PREFIX:NAME:what`, without the hash tag.
    fn untagged_key(&self, name: &str, what: &str) -> String {
        format!("{}:{name}:{what}", self.prefix)
    }

    /// Runs `op` on a handle on the primary, bounded in time; a failure makes
    /// the next operation look for the primary again (Sentinel).
    async fn run<T>(
        &self,
        what: &str,
        op: impl AsyncFnOnce(&mut Handle) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let attempt = async {
            let mut handle = self.conn.handle().await?;
            op(&mut handle).await
        };
        let result = tokio::time::timeout(OP_TIMEOUT * 2, attempt).await;
        if !matches!(result, Ok(Ok(_))) {
            self.conn.forget();
        }
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Redis {
                context: format!("redis {} {what}", self.display_url),
                source: RedisCause(e),
            }),
            Err(_) => Err(StoreError::Unavailable(format!(
                "redis {} {what}: no answer within {} s",
                self.display_url,
                (OP_TIMEOUT * 2).as_secs()
            ))),
        }
    }

    /// Reads the record `name` (`CLIENT:IDENTITY`); one an earlier version
    /// stored without the hash tag is renamed first.
    pub(crate) async fn load(&self, name: &str) -> Result<Option<Read>, StoreError> {
        let key = self.key(name, "token");
        let found = self.read(&key).await?;
        if found.is_some() || self.conn.is_cluster() {
            return Ok(found);
        }
        let old = self.untagged_key(name, "token");
        let mut invocation = self.untag.key(&old);
        invocation.key(&key);
        let moved: i64 = self
            .run("take-over", async |h| invocation.invoke_async(h).await)
            .await?;
        if moved == 1 {
            self.read(&key).await
        } else {
            Ok(None)
        }
    }

    /// Reads the record an earlier version stored under the bare client name;
    /// none in a Cluster, which earlier versions did not support.
    pub(crate) async fn load_legacy(&self, client: &str) -> Result<Option<Read>, StoreError> {
        if self.conn.is_cluster() {
            return Ok(None);
        }
        self.read(&self.untagged_key(client, "token")).await
    }

    /// The record at `key`; one whose fields do not parse is read as such
    /// (see [`parse_record`]), never as the store failing.
    async fn read(&self, key: &str) -> Result<Option<Read>, StoreError> {
        type Field = Option<Vec<u8>>;
        type Fields = (Field, Field, Field, Field, Field);
        let (generation, binding, account, data, spending): Fields = self
            .run("read", async |h| {
                redis::cmd("HMGET")
                    .arg(key)
                    .arg("generation")
                    .arg("binding")
                    .arg("account")
                    .arg("data")
                    .arg("spending")
                    .query_async(h)
                    .await
            })
            .await?;
        Ok(generation.map(|generation| {
            let spent_elsewhere = spending
                .as_deref()
                .and_then(|mark| self.foreign_mark(mark, &generation));
            let mut read = parse_record(generation, binding, account, data);
            read.spent_elsewhere = spent_elsewhere;
            read
        }))
    }

    /// When the spending mark `mark` is another process's at the record's
    /// generation `generation` (as read): since when (the store's clock).
    fn foreign_mark(&self, mark: &[u8], generation: &[u8]) -> Option<SystemTime> {
        let mark = std::str::from_utf8(mark).ok()?;
        let mut fields = mark.split(' ');
        let (holder, marked, millis) = (fields.next()?, fields.next()?, fields.next());
        let own = holder
            .strip_prefix(self.instance.as_str())
            .is_some_and(|rest| rest.starts_with(':'));
        if own || marked.as_bytes() != generation {
            return None;
        }
        let millis = millis.and_then(|m| m.parse::<u64>().ok()).unwrap_or(0);
        Some(SystemTime::UNIX_EPOCH + Duration::from_millis(millis))
    }

    /// The record names (`CLIENT:IDENTITY`) and account hashes of the records
    /// of client `name`, at most [`MAX_CHAINS`]. A Cluster spreads them over
    /// its nodes and is not searched: the look is only for a warning.
    pub(crate) async fn accounts(&self, name: &str) -> Result<Vec<(String, String)>, StoreError> {
        if self.conn.is_cluster() {
            return Ok(Vec::new());
        }
        let head = format!("{}:{{", self.prefix);
        let pattern = format!("{}{}:*}}:token", glob_escape(&head), glob_escape(name));
        let mut cursor: u64 = 0;
        let mut keys: Vec<String> = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .run("scan", async |h| {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(500)
                        .query_async(h)
                        .await
                })
                .await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 || keys.len() >= MAX_CHAINS {
                break;
            }
        }
        let mut out = Vec::with_capacity(keys.len());
        for key in keys.into_iter().take(MAX_CHAINS) {
            let account: Option<String> = self
                .run("read", async |h| {
                    redis::cmd("HGET")
                        .arg(&key)
                        .arg("account")
                        .query_async(h)
                        .await
                })
                .await?;
            let name = key
                .strip_prefix(&head)
                .and_then(|k| k.strip_suffix("}:token"))
                .unwrap_or_default()
                .to_owned();
            out.push((name, account.unwrap_or_default()));
        }
        Ok(out)
    }

    /// Moves the record `legacy` read under `legacy_client` to `name` as
    /// `envelope`, unless `name` holds one or the old record changed.
    pub(crate) async fn take_over(
        &self,
        legacy_client: &str,
        legacy: &Envelope,
        name: &str,
        envelope: &Envelope,
    ) -> Result<bool, StoreError> {
        let mut invocation = self
            .take_over
            .key(self.untagged_key(legacy_client, "token"));
        invocation
            .key(self.key(name, "token"))
            .arg(legacy.generation.to_string())
            .arg(&legacy.data)
            .arg(&envelope.binding)
            .arg(&envelope.account)
            .arg(&envelope.data);
        let moved: i64 = self
            .run("take-over", async |h| invocation.invoke_async(h).await)
            .await?;
        Ok(moved == 1)
    }

    /// The fenced write. `durable`: the record carries a refresh token, and
    /// counts as written only once `min_replicas_acked` replicas have it.
    pub(crate) async fn save(
        &self,
        name: &str,
        envelope: &Envelope,
        replace: Option<&Unopened>,
        durable: bool,
    ) -> Result<Saved, StoreError> {
        self.save_at(name, "token", envelope, replace, durable)
            .await
    }

    /// The record `PREFIX:{NAME}:what` (a client's DPoP key beside its token),
    /// read as [`RedisBackend::load`] reads a token record, without looking
    /// for records of earlier versions.
    pub(crate) async fn load_at(&self, name: &str, what: &str) -> Result<Option<Read>, StoreError> {
        self.read(&self.key(name, what)).await
    }

    /// A fenced write of the record `PREFIX:{NAME}:what`, as [`RedisBackend::save`]
    /// writes a token record.
    pub(crate) async fn save_at(
        &self,
        name: &str,
        what: &str,
        envelope: &Envelope,
        replace: Option<&Unopened>,
        durable: bool,
    ) -> Result<Saved, StoreError> {
        let key = self.key(name, what);
        let mut invocation = self.save.key(&key);
        invocation
            .arg(envelope.generation)
            .arg(&envelope.binding)
            .arg(&envelope.account)
            .arg(&envelope.data)
            .arg(replace.map(|r| r.generation.as_slice()).unwrap_or_default())
            .arg(replace.map(|r| r.data.as_slice()).unwrap_or_default())
            .arg(&self.instance);
        let wanted = if durable { self.min_replicas_acked } else { 0 };
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
        if acked < wanted {
            return Err(StoreError::Unavailable(format!(
                "redis {} write: on the primary, but acknowledged by {acked} of {wanted} replicas within {} ms (store.min_replicas_acked); kept pending, as a failover could lose it",
                self.display_url,
                WAIT_TIMEOUT.as_millis()
            )));
        }
        Ok(Saved::Written)
    }

    /// The start of the spending marks of this process's leases (`INSTANCE:`).
    pub(crate) fn own_marks(&self) -> String {
        format!("{}:", self.instance)
    }

    pub(crate) async fn try_lease(
        &self,
        name: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        let holder = format!("{}:{:08x}", self.instance, fastrand::u32(..));
        let mut invocation = self.try_lease.key(self.key(name, "lease"));
        invocation
            .key(self.key(name, "token"))
            .arg(&holder)
            .arg(ttl.as_millis().max(1) as u64)
            .arg(ttl.max(LEASE_TTL_MAX).as_millis() as u64);
        let lease_key = self.key(name, "lease");
        let wanted = self.min_replicas_acked;
        let (taken, acked): (i64, u32) = self
            .run("lease", async |h| {
                let taken: i64 = invocation.invoke_async(&mut *h).await?;
                // Only a lease that reached a replica survives a failover and
                // keeps the others waiting for this holder's write; one that
                // did not is no lease, and no refresh token is spent under it
                // (the outage rule applies: held tokens serve, grants that
                // spend nothing may still refresh).
                let acked = if taken >= 1 && wanted > 0 {
                    wait_for_replicas(h, &lease_key, wanted).await?
                } else {
                    wanted
                };
                Ok((taken, acked))
            })
            .await?;
        if taken == 2 {
            tracing::warn!(record = name,
                "a lease without expiry, or with one longer than tokenproxy sets, was cleared: something else wrote it, and it would have stopped every refresh (only tokenproxy may write its keys)");
        }
        let taken = taken >= 1;
        if taken && acked < wanted {
            // Given back at once, so that it does not keep others waiting
            // either; its mark goes with it (nothing was sent under it).
            if let Err(e) = self
                .release(name, &holder, Some(&format!("{holder} ")))
                .await
            {
                debug!(record = name, error = %e, "unacknowledged lease not released");
            }
            return Err(StoreError::Unavailable(format!(
                "redis lease: acknowledged by {acked} of {wanted} replicas within {} ms (store.min_replicas_acked); not used, as a failover could lose it",
                WAIT_TIMEOUT.as_millis()
            )));
        }
        Ok(taken.then_some(holder))
    }

    pub(crate) async fn extend_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut invocation = self.extend.key(self.key(name, "lease"));
        invocation
            .key(self.key(name, "token"))
            .arg(holder)
            .arg(ttl.as_millis().max(1) as u64);
        let extended: i64 = self
            .run("lease extension", async |h| {
                invocation.invoke_async(h).await
            })
            .await?;
        Ok(extended == 1)
    }

    /// Gives the lease of `holder` back; with `clear`, the spending mark too
    /// when it begins with `clear` (see [`RELEASE`]).
    pub(crate) async fn release(
        &self,
        name: &str,
        holder: &str,
        clear: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut invocation = self.release.key(self.key(name, "lease"));
        invocation
            .key(self.key(name, "token"))
            .arg(holder)
            .arg(clear.unwrap_or_default());
        let _released: i64 = self
            .run("lease release", async |h| invocation.invoke_async(h).await)
            .await?;
        Ok(())
    }
}

/// `WAIT` for `wanted` replicas on the node holding `key`, up to
/// [`WAIT_TIMEOUT`]; at once 0 when fewer are connected (after a failover
/// that left the new primary without a replica, every write would otherwise
/// hold up the shared connection for the whole timeout). A user not allowed
/// `INFO` waits.
async fn wait_for_replicas(h: &mut Handle, key: &str, wanted: u32) -> redis::RedisResult<u32> {
    match h.connected_replicas(key).await {
        Ok(connected) if connected < wanted => return Ok(0),
        Ok(_) => {}
        Err(e) => debug!(error = %describe(&e), "replicas not counted; waiting for them"),
    }
    h.wait(key, wanted, WAIT_TIMEOUT).await
}

/// A record's fields as read: a generation that is not a whole number up to
/// 2^53, or a missing or non-UTF-8 field, makes a record that does not parse.
fn parse_record(
    generation: Vec<u8>,
    binding: Option<Vec<u8>>,
    account: Option<Vec<u8>>,
    data: Option<Vec<u8>>,
) -> Read {
    let seen = Unopened {
        generation: generation.clone(),
        data: data.clone().unwrap_or_default(),
    };
    let text = |field: Option<Vec<u8>>| field.and_then(|b| String::from_utf8(b).ok());
    let number = std::str::from_utf8(&generation)
        .ok()
        .and_then(|g| g.parse::<u64>().ok());
    let envelope = match (number, text(binding), text(data)) {
        (None, _, _) => Err("its generation is not a whole number".to_owned()),
        (Some(g), _, _) if g > MAX_GENERATION => Err(format!(
            "its generation {g} is above 2^53, which tokenproxy never writes"
        )),
        (Some(generation), Some(binding), Some(data)) => Ok(Envelope {
            generation,
            binding,
            account: text(account).unwrap_or_default(),
            data,
        }),
        _ => Err("its binding or data field is missing or not text".to_owned()),
    };
    Read {
        envelope,
        seen,
        spent_elsewhere: None,
    }
}

/// `s` with the characters `SCAN MATCH` treats specially escaped.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A Redis error on one line, without the URL (which may hold a password).
/// A Redis client error as a [`StoreError`] source: shown without its text
/// when that could carry a credential (a URL with a password), and with no
/// further source, so no error chain prints the raw text either.
pub struct RedisCause(pub(super) redis::RedisError);

impl std::fmt::Display for RedisCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&describe(&self.0))
    }
}

impl std::fmt::Debug for RedisCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisCause({:?})", describe(&self.0))
    }
}

impl std::error::Error for RedisCause {}

fn describe(e: &redis::RedisError) -> String {
    let text = e.to_string();
    if text.contains('@') {
        format!("{:?}", e.kind())
    } else {
        text
    }
}
