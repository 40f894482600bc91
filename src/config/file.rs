//! The raw TOML schema: a serde mirror of the config file, private to `config`.
//!
//! Every struct denies unknown keys so a typo fails at load with the key's
//! position. Values stay unparsed strings here (durations, sizes, URLs,
//! `${VAR}` references); `config::mod` expands, parses and validates them once,
//! where the dotted key of each value is known. Required keys are `Option`s too,
//! so a missing one is reported by the validator with its full dotted key.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) admin: Option<RawAdmin>,
    pub(super) log: Option<RawLog>,
    pub(super) limits: Option<RawLimits>,
    pub(super) runtime: Option<RawRuntime>,
    pub(super) store: Option<RawStore>,
    pub(super) connect: Option<RawConnect>,
    // A BTreeMap keeps clients sorted by name, which is the order of `Config::clients`.
    pub(super) clients: Option<BTreeMap<String, RawClient>>,
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<String>,
    pub(super) api_key: Option<String>,
    pub(super) api_key_file: Option<String>,
    pub(super) max_connections: Option<Scalar>,
    pub(super) max_connections_per_ip: Option<Scalar>,
    pub(super) allowed_hosts: Option<Vec<String>>,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) level: Option<String>,
    pub(super) format: Option<String>,
}

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) header_read_timeout: Option<Scalar>,
    pub(super) max_header_bytes: Option<Scalar>,
    pub(super) max_headers: Option<Scalar>,
    pub(super) idle_timeout: Option<Scalar>,
    pub(super) max_connections: Option<Scalar>,
    pub(super) shutdown_grace: Option<Scalar>,
    pub(super) body_timeout: Option<Scalar>,
    pub(super) body_min_rate: Option<Scalar>,
    pub(super) max_buffered_bytes: Option<Scalar>,
    pub(super) http2_max_concurrent_streams: Option<Scalar>,
    pub(super) http2_keepalive_interval: Option<Scalar>,
    pub(super) upgrade_idle_timeout: Option<Scalar>,
    pub(super) preserve_header_case: Option<bool>,
}

/// `[runtime]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    pub(super) workers: Option<Scalar>,
}

/// `[store]`: every key of every kind is accepted here; the validator decides.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) kind: Option<String>,
    pub(super) path: Option<String>,
    pub(super) url: Option<String>,
    pub(super) key_prefix: Option<String>,
    pub(super) key: Option<String>,
    pub(super) key_file: Option<String>,
    pub(super) previous_keys: Option<Vec<String>>,
    pub(super) previous_key_files: Option<Vec<String>>,
    pub(super) allow_plaintext_password: Option<bool>,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) password_file: Option<String>,
    pub(super) ca_file: Option<String>,
    pub(super) tls: Option<bool>,
    pub(super) sentinels: Option<Vec<String>>,
    pub(super) service_name: Option<String>,
    pub(super) sentinel_username: Option<String>,
    pub(super) sentinel_password: Option<String>,
    pub(super) sentinel_password_file: Option<String>,
    pub(super) sentinel_tls: Option<bool>,
    pub(super) cluster: Option<Vec<String>>,
    pub(super) min_replicas_acked: Option<Scalar>,
}

/// `[clients.NAME]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    pub(super) listen: Option<String>,
    pub(super) upstream: Option<String>,
    pub(super) path_prefix: Option<String>,
    pub(super) allowed_hosts: Option<Vec<String>>,
    pub(super) allow_cross_site: Option<bool>,
    pub(super) retry_body_limit: Option<Scalar>,
    pub(super) timeout: Option<Scalar>,
    pub(super) token_wait_timeout: Option<Scalar>,
    pub(super) unauthorized_status: Option<Vec<Scalar>>,
    pub(super) idempotency_headers: Option<Vec<String>>,
    pub(super) replay_non_idempotent: Option<bool>,
    pub(super) http2: Option<bool>,
    pub(super) rewrite_location: Option<bool>,
    pub(super) upgrades: Option<Vec<String>>,
    pub(super) token: Option<RawToken>,
    pub(super) inject: Option<RawInject>,
    pub(super) tls: Option<super::tls::RawTls>,
    pub(super) proxy: Option<String>,
    pub(super) authorize: Option<super::authorize::RawAuthorize>,
    pub(super) subjects: Option<RawSubjects>,
    pub(super) dpop: Option<RawDpop>,
    pub(super) allow_insecure: Option<Vec<String>>,
}

/// `[connect]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConnect {
    pub(super) listen: Option<String>,
    pub(super) public_url: Option<String>,
    pub(super) return_to: Option<Vec<String>>,
    pub(super) session_ttl: Option<Scalar>,
}

/// `[clients.NAME.subjects]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSubjects {
    pub(super) header: Option<String>,
    pub(super) fallback: Option<String>,
    pub(super) max_cached: Option<Scalar>,
    pub(super) active_window: Option<Scalar>,
    pub(super) refresh_every: Option<Scalar>,
    pub(super) max_concurrent_token_requests: Option<Scalar>,
    pub(super) max_token_requests_per_minute: Option<Scalar>,
    pub(super) revoke_url: Option<String>,
}

/// `[clients.NAME.token]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawToken {
    pub(super) url: Option<String>,
    pub(super) grant: Option<String>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<String>,
    pub(super) client_secret_file: Option<String>,
    pub(super) client_auth: Option<String>,
    pub(super) signing_key_file: Option<String>,
    pub(super) signing_alg: Option<String>,
    pub(super) key_id: Option<String>,
    pub(super) certificate_file: Option<String>,
    pub(super) assertion_audience: Option<String>,
    pub(super) client_assertion_file: Option<String>,
    pub(super) client_assertion_type: Option<String>,
    pub(super) body: Option<String>,
    pub(super) scope: Option<String>,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) password_file: Option<String>,
    pub(super) refresh_token: Option<String>,
    pub(super) refresh_token_file: Option<String>,
    pub(super) refresh_url: Option<String>,
    pub(super) refresh_before: Option<Scalar>,
    pub(super) default_lifetime: Option<Scalar>,
    pub(super) refresh_token_lifetime: Option<Scalar>,
    // Sorted by key, so the grant request is the same on every run.
    pub(super) params: Option<BTreeMap<String, String>>,
    pub(super) timeout: Option<Scalar>,
    pub(super) tls: Option<super::tls::RawTls>,
    // Sorted by name, so every token request carries them in the same order.
    pub(super) headers: Option<BTreeMap<String, String>>,
    pub(super) response: Option<RawResponse>,
    pub(super) errors: Option<Vec<RawErrorRule>>,
}

/// `[clients.NAME.token.response]`: where a non-standard response keeps its fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResponse {
    pub(super) access_token: Option<String>,
    pub(super) refresh_token: Option<String>,
    pub(super) token_type: Option<String>,
    pub(super) scope: Option<String>,
    pub(super) expires_in: Option<String>,
    pub(super) expires_at: Option<String>,
    pub(super) expires_at_unit: Option<String>,
    pub(super) refresh_token_expires_in: Option<String>,
    pub(super) refresh_token_expires_at: Option<String>,
    pub(super) refresh_token_expires_at_unit: Option<String>,
}

/// One `[[clients.NAME.token.errors]]` rule.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawErrorRule {
    pub(super) status: Option<Scalar>,
    pub(super) error: Option<String>,
    pub(super) body_contains: Option<String>,
    pub(super) means: Option<String>,
}

/// `[clients.NAME.dpop]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDpop {
    pub(super) alg: Option<String>,
}

/// `[clients.NAME.inject]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInject {
    pub(super) header: Option<String>,
    pub(super) format: Option<String>,
}

/// A value written either as a string or as a bare integer.
///
/// Sizes and counts are naturally integers (`max_headers = 100`) but may also
/// be strings (`"32KiB"`, `"${MAX_CONNECTIONS}"`); durations must be strings,
/// and accepting an integer here lets the validator say "needs a unit" instead
/// of a bare serde type error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Scalar {
    Int(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;

        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an integer")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                i64::try_from(v)
                    .map(Scalar::Int)
                    .map_err(|_| E::custom("integer is too large"))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar::Text(v))
            }
        }

        deserializer.deserialize_any(ScalarVisitor)
    }
}
