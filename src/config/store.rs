//! `[store]`: where token state lives (memory, an encrypted file, or Redis).

use std::fmt;
use std::path::PathBuf;

use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::file::RawStore;
use super::{ConfigError, Table};
use crate::secret::Secret;

const KEY_HINT: &str =
    "use 32 random bytes in base64, e.g. the output of `openssl rand -base64 32`";
const REDIS_URL_HINT: &str =
    "write it like \"redis://127.0.0.1:6379/0\" or \"rediss://redis.internal:6380/0\"";

/// `[store]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// Per-process token state (the default); lost on restart.
    Memory,
    /// One encrypted file for every client, for one process.
    File(FileStoreConfig),
    /// A shared Redis, for replicas of one app sharing one OAuth client.
    Redis(RedisStoreConfig),
}

impl StoreConfig {
    /// The `kind` spelling.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreConfig::Memory => "memory",
            StoreConfig::File(_) => "file",
            StoreConfig::Redis(_) => "redis",
        }
    }
}

/// `kind = "file"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStoreConfig {
    /// The state file (resolved against the config file's directory).
    pub path: PathBuf,
    /// Encrypts the state.
    pub key: StoreKey,
    /// Earlier keys: they only open records (key rotation).
    pub previous_keys: Vec<StoreKey>,
}

/// `kind = "redis"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisStoreConfig {
    /// How the primary is found: one URL, Sentinel, or a Cluster.
    pub topology: RedisTopology,
    /// Where the store is, without credentials, for messages.
    pub display_url: String,
    /// Prepended to every key (`PREFIX:{CLIENT:IDENTITY}:token`).
    pub key_prefix: String,
    /// Encrypts the values.
    pub key: StoreKey,
    /// Earlier keys: they only open records (key rotation).
    pub previous_keys: Vec<StoreKey>,
    /// AUTH user name for the data nodes, when not in the URL.
    pub username: Option<String>,
    /// AUTH password for the data nodes, when not in the URL.
    pub password: Option<Secret>,
    /// TLS to the data nodes (`rediss://`, or `tls = true`).
    pub tls: bool,
    /// Extra CA certificates (PEM) to trust for TLS (data nodes and sentinels).
    pub ca_pem: Option<String>,
    /// Replicas that must acknowledge a write carrying a refresh token
    /// (`WAIT`) before it counts as stored; 0 waits for none.
    pub min_replicas_acked: u32,
}

impl RedisStoreConfig {
    /// The `[store]` key that says where Redis is: url | sentinels | cluster.
    pub fn location_key(&self) -> &'static str {
        match self.topology {
            RedisTopology::Url(_) => "url",
            RedisTopology::Sentinel(_) => "sentinels",
            RedisTopology::Cluster(_) => "cluster",
        }
    }
}

/// Where the Redis primary is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTopology {
    /// One node (`url`), which may hold a password.
    Url(Secret),
    /// A primary found through Sentinel, followed across failovers.
    Sentinel(SentinelConfig),
    /// A Redis Cluster, found from these seed nodes.
    Cluster(Vec<NodeAddr>),
}

/// `sentinels` and the keys that go with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelConfig {
    /// The sentinels to ask.
    pub nodes: Vec<NodeAddr>,
    /// The primary's name at the sentinels (`service_name`).
    pub service_name: String,
    /// AUTH user name for the sentinels.
    pub username: Option<String>,
    /// AUTH password for the sentinels.
    pub password: Option<Secret>,
    /// TLS to the sentinels.
    pub tls: bool,
}

/// A `host:port` from `sentinels` or `cluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddr {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The 32-byte key that encrypts stored token state. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreKey([u8; 32]);

impl StoreKey {
    /// Decodes a base64 key of exactly 32 bytes.
    pub fn from_base64(text: &str) -> Result<StoreKey, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| "is not valid base64".to_owned())?;
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| format!("decodes to {} bytes, not 32", bytes.len()))?;
        Ok(StoreKey(key))
    }

    /// The key bytes; call only where they are handed to the cipher.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoreKey([redacted])")
    }
}

pub(super) fn build_store(mut raw: RawStore, t: &Table<'_>) -> Result<StoreConfig, ConfigError> {
    #[derive(Clone, Copy)]
    enum Kind {
        Memory,
        File,
        Redis,
    }
    let kinds = [
        ("memory", Kind::Memory),
        ("file", Kind::File),
        ("redis", Kind::Redis),
    ];
    let mut p = super::Problems::default();
    let kind = p.take(t.choice("kind", raw.kind.clone(), Some(Kind::Memory), &kinds));
    let key_name = if raw.key_file.is_some() {
        "key_file"
    } else {
        "key"
    };
    // Read the key even where it is not used: a broken secret mount is reported as such.
    let key = p.take(t.secret("key", raw.key.take(), raw.key_file.take()));
    let previous_keys = p.take(previous_keys(
        raw.previous_keys.take(),
        raw.previous_key_files.take(),
        t,
    ));
    let password_name = if raw.password_file.is_some() {
        "password_file"
    } else {
        "password"
    };
    let password = p.take(t.secret("password", raw.password.take(), raw.password_file.take()));
    let sentinel_password_name = if raw.sentinel_password_file.is_some() {
        "sentinel_password_file"
    } else {
        "sentinel_password"
    };
    let sentinel_password = p.take(t.secret(
        "sentinel_password",
        raw.sentinel_password.clone(),
        raw.sentinel_password_file.clone(),
    ));
    // Each of these is read or parsed on its own: all their problems at once.
    let (Some(kind), Some(key), Some(previous_keys), Some(password), Some(sentinel_password)) =
        (kind, key, previous_keys, password, sentinel_password)
    else {
        return Err(p.into_error());
    };
    let kind_name = match kind {
        Kind::Memory => "memory",
        Kind::File => "file",
        Kind::Redis => "redis",
    };
    let unused = |name: &str| {
        t.err(name, format!("is not used by kind = \"{kind_name}\""))
            .with_hint(format!("remove {name} from [store]"))
    };
    let redis_only = [
        ("url", raw.url.is_some()),
        ("sentinels", raw.sentinels.is_some()),
        ("cluster", raw.cluster.is_some()),
        ("key_prefix", raw.key_prefix.is_some()),
        ("username", raw.username.is_some()),
        (password_name, password.is_some()),
        ("ca_file", raw.ca_file.is_some()),
        ("tls", raw.tls.is_some()),
        ("service_name", raw.service_name.is_some()),
        ("sentinel_username", raw.sentinel_username.is_some()),
        (sentinel_password_name, sentinel_password.is_some()),
        ("sentinel_tls", raw.sentinel_tls.is_some()),
        ("min_replicas_acked", raw.min_replicas_acked.is_some()),
        (
            "allow_plaintext_password",
            raw.allow_plaintext_password.is_some(),
        ),
    ];
    let parse_key = |key: Option<Secret>| -> Result<StoreKey, ConfigError> {
        let key = t.required(
            "key",
            key,
            "set key_file (or key = \"${TOKENPROXY_STORE_KEY}\") to 32 random bytes in base64 (openssl rand -base64 32)",
        )?;
        StoreKey::from_base64(key.expose())
            .map_err(|problem| t.err(key_name, problem).with_hint(KEY_HINT))
    };
    match kind {
        Kind::Memory => {
            let file_only = [
                ("path", raw.path.is_some()),
                (key_name, key.is_some()),
                ("previous_keys", !previous_keys.is_empty()),
            ];
            for (name, _) in redis_only.iter().chain(&file_only).filter(|(_, set)| *set) {
                p.add(unused(name));
            }
            p.finish()?;
            Ok(StoreConfig::Memory)
        }
        Kind::File => {
            for (name, _) in redis_only.iter().filter(|(_, set)| *set) {
                p.add(unused(name));
            }
            let path = p.take(
                t.non_empty("path", raw.path)
                    .and_then(|path| t.required(
                        "path",
                        path,
                        "set path to a file on a persistent volume, e.g. \"/var/lib/tokenproxy/tokens.json\"",
                    ))
                    .map(|path| t.x.resolve_path(&path))
                    .and_then(|path| {
                        t.x.check_store_dir(&t.key("path"), &path)?;
                        Ok(path)
                    }),
            );
            let key = p.take(parse_key(key));
            let (Some(path), Some(key), true) = (path, key, p.is_empty()) else {
                return Err(p.into_error());
            };
            Ok(StoreConfig::File(FileStoreConfig {
                path,
                key,
                previous_keys,
            }))
        }
        Kind::Redis => {
            if raw.path.is_some() {
                p.add(unused("path"));
            }
            let key = p.take(parse_key(key));
            let (Some(key), true) = (key, p.is_empty()) else {
                return Err(p.into_error());
            };
            build_redis(raw, t, password, sentinel_password, key, previous_keys)
                .map(StoreConfig::Redis)
        }
    }
}

/// The keys that say where Redis is: exactly one of them is set.
const LOCATION_HINT: &str = "set exactly one of url = \"redis://host:6379/0\", sentinels = [\"host:26379\", ...] (with service_name), or cluster = [\"host:6379\", ...]";

fn build_redis(
    raw: RawStore,
    t: &Table<'_>,
    password: Option<Secret>,
    sentinel_password: Option<Secret>,
    key: StoreKey,
    previous_keys: Vec<StoreKey>,
) -> Result<RedisStoreConfig, ConfigError> {
    let set: Vec<&str> = [
        ("url", raw.url.is_some()),
        ("sentinels", raw.sentinels.is_some()),
        ("cluster", raw.cluster.is_some()),
    ]
    .iter()
    .filter(|(_, on)| *on)
    .map(|(name, _)| *name)
    .collect();
    match set.as_slice() {
        [_] => {}
        [] => {
            return Err(t
                .err("url", "is required (or sentinels, or cluster)")
                .with_hint(LOCATION_HINT))
        }
        [first, rest @ ..] => {
            return Err(t
                .err(
                    first,
                    format!(
                        "is set together with {}; only one may say where Redis is",
                        rest.join(" and ")
                    ),
                )
                .with_hint(LOCATION_HINT))
        }
    }
    let username = t.non_empty("username", raw.username)?;
    if username.is_some() && password.is_none() {
        return Err(t
            .err("username", "is set without a password")
            .with_hint("set password or password_file"));
    }
    let sentinel_only = [
        ("service_name", raw.service_name.is_some()),
        ("sentinel_username", raw.sentinel_username.is_some()),
        (
            if raw.sentinel_password_file.is_some() {
                "sentinel_password_file"
            } else {
                "sentinel_password"
            },
            sentinel_password.is_some(),
        ),
        ("sentinel_tls", raw.sentinel_tls.is_some()),
    ];
    let url_mode = raw.url.is_some();
    if raw.sentinels.is_none() {
        if let Some((name, _)) = sentinel_only.iter().find(|(_, on)| *on) {
            return Err(t
                .err(name, "is set but sentinels is not")
                .with_hint("it applies to Sentinel only: set sentinels, or remove it"));
        }
    }
    if url_mode && raw.tls.is_some() {
        return Err(t
            .err("tls", "is set together with url")
            .with_hint("with url, the scheme decides: rediss:// for TLS, redis:// without"));
    }
    let (topology, display_url, tls) = if let Some(raw_url) = raw.url {
        let url = t.required(
            "url",
            t.non_empty("url", Some(raw_url))?,
            "set url to your Redis, e.g. \"redis://127.0.0.1:6379/0\"",
        )?;
        let (display_url, has_credentials) = check_redis_url(&url)
            .map_err(|problem| t.err("url", problem).with_hint(REDIS_URL_HINT))?;
        if has_credentials && (username.is_some() || password.is_some()) {
            return Err(t
                .err("url", "holds credentials and username/password are set too")
                .with_hint("give the credentials in one place"));
        }
        let sends_password = has_credentials || password.is_some();
        if sends_password
            && display_url.starts_with("redis://")
            && !is_loopback_url(&display_url)
            && raw.allow_plaintext_password != Some(true)
        {
            return Err(t
                .err(
                    "url",
                    "is redis:// to a host that is not loopback, so the Redis password would cross the network in clear text",
                )
                .with_hint(
                    "use rediss:// (TLS), or set allow_plaintext_password = true in [store] if that network path is trusted",
                ));
        }
        let tls = display_url.starts_with("rediss://");
        (RedisTopology::Url(Secret::new(url)), display_url, tls)
    } else if let Some(raw_nodes) = raw.sentinels {
        let nodes = node_list(t, "sentinels", raw_nodes, "26379")?;
        let service_name = t.required(
            "service_name",
            t.non_empty("service_name", raw.service_name)?,
            "set service_name to the name the sentinels monitor the primary under, e.g. \"mymaster\"",
        )?;
        let sentinel_username = t.non_empty("sentinel_username", raw.sentinel_username)?;
        if sentinel_username.is_some() && sentinel_password.is_none() {
            return Err(t
                .err("sentinel_username", "is set without a sentinel password")
                .with_hint("set sentinel_password or sentinel_password_file"));
        }
        let tls = raw.tls.unwrap_or(false);
        let sentinel_tls = raw.sentinel_tls.unwrap_or(false);
        let display = format!(
            "{}://{}/{service_name}",
            if tls {
                "rediss+sentinel"
            } else {
                "redis+sentinel"
            },
            join(&nodes)
        );
        let sentinel = SentinelConfig {
            nodes,
            service_name,
            username: sentinel_username,
            password: sentinel_password,
            tls: sentinel_tls,
        };
        (RedisTopology::Sentinel(sentinel), display, tls)
    } else {
        let raw_nodes = raw.cluster.unwrap_or_default();
        let nodes = node_list(t, "cluster", raw_nodes, "6379")?;
        let tls = raw.tls.unwrap_or(false);
        let display = format!(
            "{}://{}",
            if tls {
                "rediss+cluster"
            } else {
                "redis+cluster"
            },
            join(&nodes)
        );
        (RedisTopology::Cluster(nodes), display, tls)
    };
    let key_prefix = match t.opt("key_prefix", raw.key_prefix)? {
        Some(p) if p.is_empty() || p.contains(|c: char| c.is_whitespace() || c == '{' || c == '}') => {
            return Err(t
                .err("key_prefix", format!("{p:?} is empty or has whitespace or braces"))
                .with_hint("write it like \"tokenproxy\" or \"payments:tokenproxy\" (braces are Redis Cluster hash tags, which tokenproxy sets itself)"))
        }
        Some(p) => p,
        None => "tokenproxy".to_owned(),
    };
    let any_tls = tls || matches!(&topology, RedisTopology::Sentinel(s) if s.tls);
    let ca_pem = match raw.ca_file {
        Some(path) => {
            let (path, pem) = t.x.read(&t.key("ca_file"), &path)?;
            if !CertificateDer::pem_slice_iter(pem.as_bytes()).any(|c| c.is_ok()) {
                return Err(t
                    .err(
                        "ca_file",
                        format!("{} holds no PEM certificate", path.display()),
                    )
                    .with_hint("use a PEM bundle with -----BEGIN CERTIFICATE----- blocks"));
            }
            if !any_tls {
                let hint = if url_mode {
                    "use a rediss:// URL for TLS, or remove ca_file"
                } else {
                    "set tls = true (or sentinel_tls = true), or remove ca_file"
                };
                return Err(t
                    .err("ca_file", "is set but no connection uses TLS")
                    .with_hint(hint));
            }
            Some(pem)
        }
        None => None,
    };
    let default_acks = if url_mode { 0 } else { 1 };
    let min_replicas_acked = t.count(
        "min_replicas_acked",
        raw.min_replicas_acked,
        default_acks,
        0..=16,
    )? as u32;
    Ok(RedisStoreConfig {
        topology,
        display_url,
        key_prefix,
        key,
        previous_keys,
        username,
        password,
        tls,
        ca_pem,
        min_replicas_acked,
    })
}

fn join(nodes: &[NodeAddr]) -> String {
    nodes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A non-empty list of `host:port` (IPv6 in brackets).
fn node_list(
    t: &Table<'_>,
    k: &str,
    raw: Vec<String>,
    port_example: &str,
) -> Result<Vec<NodeAddr>, ConfigError> {
    let hint =
        format!("write it like [\"10.0.0.1:{port_example}\", \"redis-2.internal:{port_example}\"]");
    if raw.is_empty() {
        return Err(t.err(k, "is an empty list").with_hint(hint));
    }
    let mut out = Vec::with_capacity(raw.len());
    for item in raw {
        let text = t.string(k, &item)?;
        let node = parse_node(text.trim()).ok_or_else(|| {
            t.err(k, format!("{text:?} is not a host:port"))
                .with_hint(&hint)
        })?;
        out.push(node);
    }
    Ok(out)
}

fn parse_node(text: &str) -> Option<NodeAddr> {
    let (host, port) = text.rsplit_once(':')?;
    let host = match host.strip_prefix('[') {
        Some(h) => h.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':');
    if host.is_empty() || !host.chars().all(host_ok) {
        return None;
    }
    Some(NodeAddr {
        host: host.to_owned(),
        port,
    })
}

/// `previous_keys` and the keys in `previous_key_files`: earlier store keys
/// that still open records sealed with them (read-only, for key rotation).
fn previous_keys(
    inline: Option<Vec<String>>,
    files: Option<Vec<String>>,
    t: &Table<'_>,
) -> Result<Vec<StoreKey>, ConfigError> {
    let mut keys = Vec::new();
    for (i, raw) in inline.unwrap_or_default().into_iter().enumerate() {
        let name = format!("previous_keys[{i}]");
        let Some(text) = t.secret(&name, Some(raw), None)? else {
            continue;
        };
        let key = StoreKey::from_base64(text.expose())
            .map_err(|problem| t.err(&name, problem).with_hint(KEY_HINT))?;
        keys.push(key);
    }
    for (i, raw_path) in files.unwrap_or_default().into_iter().enumerate() {
        let name = format!("previous_key_files[{i}]");
        let (path, text) = t.x.read_secret(&t.key(&name), &raw_path)?;
        let key = StoreKey::from_base64(&text).map_err(|problem| {
            t.err(&name, format!("{}: {problem}", path.display()))
                .with_hint(KEY_HINT)
        })?;
        keys.push(key);
    }
    Ok(keys)
}

/// Whether the host of a URL without credentials is a loopback address.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks a `redis://` or `rediss://` URL; returns it without credentials, and
/// whether it had any. Problems never quote the URL (it may hold a password).
fn check_redis_url(url: &str) -> Result<(String, bool), String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("is not a redis:// or rediss:// URL".into());
    };
    if !matches!(scheme, "redis" | "rediss") {
        return Err(format!(
            "has scheme {scheme:?}; only redis:// and rediss:// are supported"
        ));
    }
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (credentials, host) = match authority.rsplit_once('@') {
        Some((_, h)) => (true, h),
        None => (false, authority),
    };
    if host.is_empty() || host.starts_with(':') {
        return Err("has no host".into());
    }
    let db = path.trim_start_matches('/').split('?').next().unwrap_or("");
    if !db.is_empty() && db.parse::<u16>().is_err() {
        return Err(format!("has database {db:?}, which is not a number"));
    }
    redis::Client::open(url).map_err(|_| "is not a valid Redis URL".to_owned())?;
    Ok((format!("{scheme}://{host}{path}"), credentials))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_must_be_32_bytes_of_base64() {
        let ok = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(StoreKey::from_base64(&ok).map(|k| k.0[0]), Ok(7));
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 16]);
        assert_eq!(
            StoreKey::from_base64(&short).err().as_deref(),
            Some("decodes to 16 bytes, not 32")
        );
        assert_eq!(
            StoreKey::from_base64("not base64!").err().as_deref(),
            Some("is not valid base64")
        );
        assert_eq!(format!("{:?}", StoreKey([1; 32])), "StoreKey([redacted])");
    }

    #[test]
    fn redis_urls_are_checked_and_shown_without_credentials() {
        assert_eq!(
            check_redis_url("redis://:pw@127.0.0.1:6379/2"),
            Ok(("redis://127.0.0.1:6379/2".into(), true))
        );
        assert_eq!(
            check_redis_url("rediss://cache.internal:6380"),
            Ok(("rediss://cache.internal:6380".into(), false))
        );
        let err = check_redis_url("http://:hunter2@x:1").unwrap_err();
        assert!(
            err.contains("\"http\"") && !err.contains("hunter2"),
            "{err}"
        );
        assert_eq!(check_redis_url("redis://:pw@/0"), Err("has no host".into()));
        assert!(check_redis_url("redis://h:1/abc").is_err());
    }

    const STORE_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    /// `[store] kind = "redis"` with `lines`, and one client.
    fn redis(lines: &str) -> Result<RedisStoreConfig, ConfigError> {
        let text = format!(
            "[store]\nkind = \"redis\"\nkey = \"{STORE_KEY}\"\n{lines}\n\n[clients.payments]\nlisten = \"127.0.0.1:8080\"\nupstream = \"https://api.pay.example\"\n\n[clients.payments.token]\nurl = \"https://api.pay.example/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\n"
        );
        let env = super::super::MapEnv::new().file("/run/secrets/sentinel", "sentinel-s3cret\n");
        super::super::from_str(&text, None, &env).map(|c| match c.store {
            StoreConfig::Redis(r) => r,
            other => panic!("expected a redis store, got {other:?}"),
        })
    }

    fn rejected(lines: &str, key: &str, needle: &str) {
        match redis(lines) {
            Ok(r) => panic!("{lines:?} should be rejected, got {r:?}"),
            Err(e) => {
                assert_eq!(e.key(), key, "wrong key in: {e}");
                let text = e.to_string();
                assert!(text.contains(needle), "{text:?} should contain {needle:?}");
                assert!(!text.contains("sentinel-s3cret"), "{text}");
            }
        }
    }

    /// Issue 22, item 3: Sentinel under `[store] kind = "redis"`, with its own
    /// auth and TLS; one replica acknowledgement by default.
    #[test]
    fn sentinels_with_service_name_auth_and_tls() {
        let r = redis(
            "sentinels = [\"10.0.0.1:26379\", \"[::1]:26380\"]\nservice_name = \"mymaster\"\nsentinel_username = \"watcher\"\nsentinel_password_file = \"/run/secrets/sentinel\"\nsentinel_tls = true\ntls = true\npassword = \"data-pw\"",
        )
        .expect("valid");
        let RedisTopology::Sentinel(s) = &r.topology else {
            panic!("expected sentinel, got {:?}", r.topology)
        };
        assert_eq!(
            s.nodes[1],
            NodeAddr {
                host: "::1".into(),
                port: 26380
            }
        );
        assert_eq!(s.service_name, "mymaster");
        assert_eq!(s.username.as_deref(), Some("watcher"));
        assert_eq!(
            s.password.as_ref().map(|p| p.expose()),
            Some("sentinel-s3cret")
        );
        assert!(s.tls && r.tls);
        assert_eq!(
            r.min_replicas_acked, 1,
            "sentinel waits for one replica by default"
        );
        assert_eq!(r.location_key(), "sentinels");
        assert_eq!(
            r.display_url,
            "rediss+sentinel://10.0.0.1:26379,[::1]:26380/mymaster"
        );
        assert!(!format!("{r:?}").contains("sentinel-s3cret"));
    }

    /// Issue 22, item 3: Cluster seeds; a plain URL waits for no replica
    /// unless told to.
    #[test]
    fn cluster_seeds_and_replica_acknowledgements() {
        let r = redis("cluster = [\"10.0.0.1:6379\", \"10.0.0.2:6379\"]").expect("valid");
        assert!(matches!(&r.topology, RedisTopology::Cluster(n) if n.len() == 2));
        assert_eq!(r.min_replicas_acked, 1);
        assert_eq!(r.display_url, "redis+cluster://10.0.0.1:6379,10.0.0.2:6379");
        let r = redis("url = \"redis://127.0.0.1:6379/0\"").expect("valid");
        assert_eq!(r.min_replicas_acked, 0, "a single URL may have no replica");
        let r = redis("url = \"redis://127.0.0.1:6379/0\"\nmin_replicas_acked = 2").expect("valid");
        assert_eq!(r.min_replicas_acked, 2);
        let r = redis("cluster = [\"h:1\"]\nmin_replicas_acked = 0").expect("valid");
        assert_eq!(r.min_replicas_acked, 0);
    }

    /// Issue 22, item 3: exactly one of url, sentinels, cluster; keys of one
    /// topology are refused with another, naming the key.
    #[test]
    fn exactly_one_redis_location_and_no_stray_keys() {
        rejected("", "store.url", "is required (or sentinels, or cluster)");
        rejected(
            "url = \"redis://h:1\"\ncluster = [\"h:2\"]",
            "store.url",
            "is set together with cluster",
        );
        rejected(
            "sentinels = [\"h:1\"]\ncluster = [\"h:2\"]\nservice_name = \"m\"",
            "store.sentinels",
            "is set together with cluster",
        );
        rejected("sentinels = [\"h:1\"]", "store.service_name", "is required");
        rejected(
            "cluster = [\"h:1\"]\nservice_name = \"m\"",
            "store.service_name",
            "is set but sentinels is not",
        );
        rejected(
            "url = \"redis://h:1\"\nsentinel_password_file = \"/run/secrets/sentinel\"",
            "store.sentinel_password_file",
            "is set but sentinels is not",
        );
        rejected(
            "url = \"redis://h:1\"\ntls = true",
            "store.tls",
            "rediss://",
        );
        rejected("cluster = []", "store.cluster", "is an empty list");
        rejected("cluster = [\"h\"]", "store.cluster", "is not a host:port");
        rejected("cluster = [\"h:0\"]", "store.cluster", "is not a host:port");
        rejected(
            "sentinels = [\"::1:5\"]\nservice_name = \"m\"",
            "store.sentinels",
            "is not a host:port",
        );
        rejected(
            "cluster = [\"h:1\"]\nkey_prefix = \"a{b}\"",
            "store.key_prefix",
            "braces",
        );
        rejected(
            "sentinels = [\"h:1\"]\nservice_name = \"m\"\nsentinel_username = \"u\"",
            "store.sentinel_username",
            "without a sentinel password",
        );
        rejected(
            "cluster = [\"h:1\"]\nmin_replicas_acked = 99",
            "store.min_replicas_acked",
            "",
        );
    }

    /// Issue 25, finding 4 (key rotation): previous keys are read from the
    /// config and from files; a bad one is named by its dotted key, never shown.
    #[test]
    fn previous_keys_come_from_the_config_and_files_and_bad_ones_are_named() {
        use crate::config::{from_str, MapEnv};
        let key = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        let old = base64::engine::general_purpose::STANDARD.encode([2u8; 32]);
        let older = base64::engine::general_purpose::STANDARD.encode([3u8; 32]);
        let text = |previous: &str| {
            format!(
                "[store]\nkind = \"file\"\npath = \"/tmp/t.json\"\nkey = \"{key}\"\n{previous}\n\
                 [clients.a]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\n\
                 [clients.a.token]\nurl = \"https://auth.example/token\"\nclient_id = \"a\"\nclient_secret = \"s\"\n"
            )
        };
        let env = MapEnv::new().file("/run/old-key", format!("{older}\n"));
        let config = from_str(
            &text(&format!(
                "previous_keys = [\"{old}\"]\nprevious_key_files = [\"/run/old-key\"]"
            )),
            None,
            &env,
        )
        .expect("valid");
        match &config.store {
            StoreConfig::File(f) => {
                let firsts: Vec<u8> = f.previous_keys.iter().map(|k| k.expose()[0]).collect();
                assert_eq!(firsts, [2, 3]);
            }
            other => panic!("file store expected: {other:?}"),
        }
        let err = from_str(
            &text("previous_keys = [\"c2hvcnQ=\"]"),
            None,
            &MapEnv::new(),
        )
        .expect_err("a short key");
        assert_eq!(err.key(), "store.previous_keys[0]", "{err}");
        let err = from_str(
            &text("previous_key_files = [\"/run/missing\"]"),
            None,
            &MapEnv::new(),
        )
        .expect_err("a missing file");
        assert_eq!(err.key(), "store.previous_key_files[0]", "{err}");
        assert!(!err.to_string().contains(&old));
    }

    /// Security review (issue 25, low): a `redis://` URL with a password sent
    /// it in clear to any host; that needs rediss://, a loopback host, or an
    /// explicit `allow_plaintext_password = true`.
    #[test]
    fn a_redis_password_in_clear_to_a_remote_host_is_refused() {
        use crate::config::{from_str, MapEnv};
        let key = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        let text = |store: &str| {
            format!(
                "[store]\nkind = \"redis\"\nkey = \"{key}\"\n{store}\n\
                 [clients.a]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\n\
                 [clients.a.token]\nurl = \"https://auth.example/token\"\nclient_id = \"a\"\nclient_secret = \"s\"\n"
            )
        };
        let env = MapEnv::new();
        for refused in [
            "url = \"redis://:hunter2@redis.internal:6379/0\"",
            "url = \"redis://10.0.0.5/0\"\npassword = \"hunter2\"",
        ] {
            let err = from_str(&text(refused), None, &env).expect_err(refused);
            assert_eq!(err.key(), "store.url", "{err}");
            assert!(
                err.to_string().contains("clear text") && !err.to_string().contains("hunter2"),
                "{err}"
            );
        }
        for accepted in [
            "url = \"redis://:hunter2@127.0.0.1:6379/0\"",
            "url = \"redis://localhost/0\"\npassword = \"hunter2\"",
            "url = \"redis://[::1]:6379/0\"\npassword = \"hunter2\"",
            "url = \"rediss://:hunter2@redis.internal:6380/0\"",
            "url = \"redis://redis.internal:6379/0\"",
            "url = \"redis://:hunter2@redis.internal/0\"\nallow_plaintext_password = true",
        ] {
            assert!(from_str(&text(accepted), None, &env).is_ok(), "{accepted}");
        }
    }
}
