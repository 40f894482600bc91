//! `kind = "redis"`: one hash per client, a lease per client, fenced writes.
//!
//! Keys (PREFIX is `key_prefix`, CLIENT the client's name, IDENTITY the hash of
//! its credential identity, see `store/mod.rs`):
//! - `PREFIX:CLIENT:IDENTITY:token`, a hash with `generation`, `binding`,
//!   `account` and `data` (the sealed state). Written only by a script that
//!   refuses a generation not above the stored one.
//! - `PREFIX:CLIENT:IDENTITY:lease`, a string `SET NX PX`: the replica holding
//!   it is the only one that calls the provider for this client. It is released
//!   (or extended while its holder backs off) by scripts that check the holder.
//! - `PREFIX:CLIENT:token`, written by earlier versions: taken over once by a
//!   script that moves it to the identity's key.
//!
//! The connection is made lazily and remade after failures, so tokenproxy starts
//! and serves while Redis is down. Every command is bounded by [`OP_TIMEOUT`].

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, IntoConnectionInfo, Script};

use super::{Envelope, Read, Saved, StoreError, Unopened, MAX_GENERATION};
use crate::config::RedisStoreConfig;

/// Longest time one Redis command may take, connecting included.
const OP_TIMEOUT: Duration = Duration::from_secs(1);

/// ARGV[5] and ARGV[6], when set, name a record that did not open (generation
/// and data as read): it is replaced whatever its generation. Generations
/// are compared as text where they must be equal, since Lua numbers are
/// doubles; one that is not a whole number up to 2^53 (which tokenproxy never
/// writes) counts as 2^53, so only a write naming it replaces it.
const SAVE: &str = r"
local raw = redis.call('HGET', KEYS[1], 'generation')
local replace = ARGV[5] ~= '' and raw == ARGV[5] and (redis.call('HGET', KEYS[1], 'data') or '') == ARGV[6]
local cur = tonumber(raw or '0')
if cur == nil or cur ~= math.floor(cur) or cur < 0 or cur > 9007199254740992 then cur = 9007199254740992 end
if cur >= tonumber(ARGV[1]) and not replace then return cur end
redis.call('HSET', KEYS[1], 'generation', ARGV[1], 'binding', ARGV[2], 'account', ARGV[3], 'data', ARGV[4])
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

/// Longest number of records of one client looked at for other chains.
const MAX_CHAINS: usize = 1000;

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

pub(crate) struct RedisBackend {
    manager: ConnectionManager,
    prefix: String,
    display_url: String,
    /// Identifies this process in the lease value: `pid:random`.
    instance: String,
    save: Script,
    take_over: Script,
    release: Script,
    extend: Script,
}

impl RedisBackend {
    pub(crate) fn open(config: &RedisStoreConfig) -> Result<RedisBackend, StoreError> {
        let bad = |what: &str, e: redis::RedisError| {
            StoreError::Unavailable(format!(
                "store.url {}: {what}: {}",
                config.display_url,
                describe(&e)
            ))
        };
        let mut info = config
            .url
            .expose()
            .into_connection_info()
            .map_err(|e| bad("invalid URL", e))?;
        if let Some(password) = &config.password {
            let mut settings = info
                .redis_settings()
                .clone()
                .set_password(password.expose());
            if let Some(user) = &config.username {
                settings = settings.set_username(user);
            }
            info = info.set_redis_settings(settings);
        }
        let client = match &config.ca_pem {
            Some(pem) => Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.as_bytes().to_vec()),
                },
            ),
            None => Client::open(info),
        }
        .map_err(|e| bad("cannot set up the client", e))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200));
        let manager = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| bad("cannot set up the connection", e))?;
        Ok(RedisBackend {
            manager,
            prefix: config.key_prefix.clone(),
            display_url: config.display_url.clone(),
            instance: format!("{}:{:016x}", std::process::id(), fastrand::u64(..)),
            save: Script::new(SAVE),
            take_over: Script::new(TAKE_OVER),
            release: Script::new(RELEASE),
            extend: Script::new(EXTEND),
        })
    }

    fn key(&self, client: &str, what: &str) -> String {
        format!("{}:{client}:{what}", self.prefix)
    }

    async fn run<T>(
        &self,
        what: &str,
        op: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(OP_TIMEOUT * 2, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!(
                "redis {} {what}: {}",
                self.display_url,
                describe(&e)
            ))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "redis {} {what}: no answer within {} s",
                self.display_url,
                (OP_TIMEOUT * 2).as_secs()
            ))),
        }
    }

    /// The record; one whose fields do not parse is read as such (see
    /// [`parse_record`]), never as the store failing.
    pub(crate) async fn load(&self, client: &str) -> Result<Option<Read>, StoreError> {
        let mut conn = self.manager.clone();
        let key = self.key(client, "token");
        type Field = Option<Vec<u8>>;
        type Fields = (Field, Field, Field, Field);
        let (generation, binding, account, data): Fields = self
            .run(
                "read",
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg("generation")
                    .arg("binding")
                    .arg("account")
                    .arg("data")
                    .query_async(&mut conn),
            )
            .await?;
        Ok(generation.map(|generation| parse_record(generation, binding, account, data)))
    }

    /// The record names (`CLIENT:IDENTITY`) and account hashes of the records
    /// of client `name`, at most [`MAX_CHAINS`].
    pub(crate) async fn accounts(&self, name: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut conn = self.manager.clone();
        let head = format!("{}:", self.prefix);
        let pattern = format!("{}{}:*:token", glob_escape(&head), glob_escape(name));
        let mut cursor: u64 = 0;
        let mut keys: Vec<String> = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .run(
                    "scan",
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(500)
                        .query_async(&mut conn),
                )
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
                .run(
                    "read",
                    redis::cmd("HGET")
                        .arg(&key)
                        .arg("account")
                        .query_async(&mut conn),
                )
                .await?;
            let name = key
                .strip_prefix(&head)
                .and_then(|k| k.strip_suffix(":token"))
                .unwrap_or_default()
                .to_owned();
            out.push((name, account.unwrap_or_default()));
        }
        Ok(out)
    }

    /// Moves the record `legacy` read under `legacy_client` to `client` as
    /// `envelope`, unless `client` holds one or the old record changed.
    pub(crate) async fn take_over(
        &self,
        legacy_client: &str,
        legacy: &Envelope,
        client: &str,
        envelope: &Envelope,
    ) -> Result<bool, StoreError> {
        let mut conn = self.manager.clone();
        let mut invocation = self.take_over.key(self.key(legacy_client, "token"));
        invocation
            .key(self.key(client, "token"))
            .arg(legacy.generation.to_string())
            .arg(&legacy.data)
            .arg(&envelope.binding)
            .arg(&envelope.account)
            .arg(&envelope.data);
        let moved: i64 = self
            .run("take-over", invocation.invoke_async(&mut conn))
            .await?;
        Ok(moved == 1)
    }

    pub(crate) async fn save(
        &self,
        client: &str,
        envelope: &Envelope,
        replace: Option<&Unopened>,
    ) -> Result<Saved, StoreError> {
        let mut conn = self.manager.clone();
        let key = self.key(client, "token");
        let mut invocation = self.save.key(&key);
        invocation
            .arg(envelope.generation)
            .arg(&envelope.binding)
            .arg(&envelope.account)
            .arg(&envelope.data)
            .arg(replace.map(|r| r.generation.as_slice()).unwrap_or_default())
            .arg(replace.map(|r| r.data.as_slice()).unwrap_or_default());
        let answer: i64 = self
            .run("write", invocation.invoke_async(&mut conn))
            .await?;
        Ok(if answer < 0 {
            Saved::Written
        } else {
            Saved::Stale {
                generation: answer as u64,
            }
        })
    }

    pub(crate) async fn try_lease(
        &self,
        client: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        let mut conn = self.manager.clone();
        let key = self.key(client, "lease");
        let value = format!("{}:{:08x}", self.instance, fastrand::u32(..));
        let answer: Option<String> = self
            .run(
                "lease",
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&value)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis().max(1) as u64)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(answer.map(|_| value))
    }

    pub(crate) async fn extend_lease(
        &self,
        client: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.manager.clone();
        let key = self.key(client, "lease");
        let mut invocation = self.extend.key(&key);
        invocation.arg(value).arg(ttl.as_millis().max(1) as u64);
        let extended: i64 = self
            .run("lease extension", invocation.invoke_async(&mut conn))
            .await?;
        Ok(extended == 1)
    }

    pub(crate) async fn release(&self, client: &str, value: &str) -> Result<(), StoreError> {
        let mut conn = self.manager.clone();
        let key = self.key(client, "lease");
        let mut invocation = self.release.key(&key);
        invocation.arg(value);
        let _released: i64 = self
            .run("lease release", invocation.invoke_async(&mut conn))
            .await?;
        Ok(())
    }
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
    Read { envelope, seen }
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
fn describe(e: &redis::RedisError) -> String {
    let text = e.to_string();
    if text.contains('@') {
        format!("{:?}", e.kind())
    } else {
        text
    }
}
