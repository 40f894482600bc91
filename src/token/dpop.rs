//! DPoP for one client (RFC 9449): its key, the proofs of its token requests
//! and of its requests to the API, and the nonces servers hand out.
//!
//! The key is read from the store on first use, or made there (see
//! `store/dpop_key.rs`), so replicas and restarts sign with one key. A proof
//! is made for every request sent, a retry or replay included: servers accept
//! each `jti` once.
//!
//! A client with subjects signs each subject's token requests and API
//! requests with that subject's own key instead ([`LazyProofKey`]), kept in
//! the subject's record (see `subjects/`): a token bound to one subject's key
//! is useless beside another subject's proof.
//!
//! Nonces (RFC 9449 §8, §9) are kept per server: the token endpoint's per
//! origin, apart from the API's even on one origin (a provider hands out its
//! own at each), each replaced by every `DPoP-Nonce` the server sends. A
//! `use_dpop_nonce` answer is met by one more attempt carrying the new nonce:
//! at the token endpoint here, at the API by the request path's replay.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::UNIX_EPOCH;

use arc_swap::ArcSwapOption;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use tokio::sync::OnceCell;
use tracing::info;

use crate::clock::SharedClock;
use crate::config::{ClientConfig, DpopConfig};
use crate::jose::{Alg, ProofClaims, ProofKey, SigningKey};
use crate::metrics::{ClientMetrics, NonceWhere};
use crate::secret::Secret;
use crate::store::{ClientStore, SubjectKey};

/// The header a proof travels in.
pub static DPOP_HEADER: HeaderName = HeaderName::from_static("dpop");
/// The header a server hands out its nonce in.
pub static NONCE_HEADER: HeaderName = HeaderName::from_static("dpop-nonce");
/// The error code of a server that wants a (newer) nonce.
pub const USE_DPOP_NONCE: &str = "use_dpop_nonce";
/// The longest nonce kept; a longer one is ignored.
const MAX_NONCE_LEN: usize = 1024;
/// The most token endpoint origins whose nonces are kept (a token URL and a
/// refresh URL, usually one origin).
const MAX_TOKEN_ORIGINS: usize = 4;

/// Why a proof could not be made. Never holds key material.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct DpopError(String);

/// One client's DPoP state; shared by its token endpoint and its request path.
pub struct Dpop {
    client: String,
    config: DpopConfig,
    store: ClientStore,
    key: OnceCell<Arc<ProofKey>>,
    clock: SharedClock,
    metrics: ClientMetrics,
    /// `scheme://host[:port]` of the upstream, the start of every API proof's `htu`.
    api_origin: String,
    /// The API's latest nonce.
    api_nonce: ArcSwapOption<HeaderValue>,
    /// The token endpoints' latest nonces, by origin.
    token_nonces: Mutex<Vec<(String, String)>>,
}

impl std::fmt::Debug for Dpop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dpop")
            .field("client", &self.client)
            .field("alg", &self.config.alg)
            .finish_non_exhaustive()
    }
}

impl Dpop {
    /// The DPoP state of `client`, when it has `[dpop]`; its key lives in `store`.
    pub fn for_client(
        client: &ClientConfig,
        store: ClientStore,
        clock: SharedClock,
        metrics: ClientMetrics,
    ) -> Option<Arc<Dpop>> {
        let config = client.dpop.clone()?;
        metrics.dpop_init();
        Some(Arc::new(Dpop {
            client: client.name.clone(),
            config,
            store,
            key: OnceCell::new(),
            clock,
            metrics,
            api_origin: origin(
                client.upstream.scheme.as_str(),
                Some(&client.upstream.authority),
            ),
            api_nonce: ArcSwapOption::empty(),
            token_nonces: Mutex::new(Vec::new()),
        }))
    }

    /// The DPoP state of `client` for a one-off command (`tokenproxy token`,
    /// `tokenproxy authorize`), with its key in `store` and metrics nobody reads.
    pub fn for_command(client: &ClientConfig, store: &crate::store::Store) -> Option<Arc<Dpop>> {
        let metrics = crate::metrics::Metrics::new().ok()?.client(&client.name);
        Dpop::for_client(
            client,
            store.client(client),
            Arc::new(crate::clock::SystemClock),
            metrics,
        )
    }

    /// The key, once it is loaded; the request path's cheap check.
    pub fn loaded_key(&self) -> Option<&Arc<ProofKey>> {
        self.key.get()
    }

    /// The key: loaded from the store, or made and stored, on first use (one
    /// caller does it; the others wait for it).
    pub async fn key(&self) -> Result<&Arc<ProofKey>, DpopError> {
        self.key
            .get_or_try_init(|| async {
                let alg = self.config.alg;
                // Boxed: the store's futures are deep, and every caller's
                // future would otherwise hold their whole layout.
                let pkcs8 = Box::pin(self.store.dpop_key(alg.as_str(), || {
                    SigningKey::generate(alg)
                        .map(|(_, pkcs8)| pkcs8)
                        .map_err(|e| format!("cannot make a DPoP key: {e}"))
                }))
                .await
                .map_err(|e| DpopError(format!("DPoP key: {e}")))?;
                let key = SigningKey::from_pkcs8_base64(&pkcs8, Some(alg))
                    .and_then(ProofKey::new)
                    .map_err(|e| DpopError(format!("the stored DPoP key {e}")))?;
                info!(client = %self.client, alg = alg.as_str(), jkt = key.thumbprint(),
                    store = self.store.kind(), "DPoP key ready");
                Ok(Arc::new(key))
            })
            .await
    }

    /// A proof for a token request to `url` (`htm` POST, no `ath`), with the
    /// nonce that endpoint's origin sent last.
    pub async fn token_proof(&self, url: &Uri) -> Result<HeaderValue, DpopError> {
        let key = self.key().await?;
        self.token_proof_with(key, url)
    }

    /// As [`Dpop::token_proof`], signed with `key` (a subject's).
    pub fn token_proof_with(&self, key: &ProofKey, url: &Uri) -> Result<HeaderValue, DpopError> {
        let origin = origin_of(url);
        let nonce = self.token_nonce(&origin);
        let claims = ProofClaims {
            htm: "POST",
            origin: &origin,
            path: url.path(),
            iat: self.iat(),
            ath: None,
            nonce: nonce.as_deref(),
        };
        header_value(key.proof(&claims).map_err(|e| DpopError(e.to_string()))?)
    }

    /// A proof for a request to the API: `method` on `path` (of the upstream's
    /// origin; a query is left out), sent with the token whose hash is `ath`,
    /// with the API's latest nonce.
    pub fn api_proof(
        &self,
        key: &ProofKey,
        method: &Method,
        path: &str,
        ath: &str,
    ) -> Result<HeaderValue, DpopError> {
        let nonce = self.api_nonce.load();
        let claims = ProofClaims {
            htm: method.as_str(),
            origin: &self.api_origin,
            path,
            iat: self.iat(),
            ath: Some(ath),
            nonce: nonce
                .as_deref()
                .and_then(|n| std::str::from_utf8(n.as_bytes()).ok()),
        };
        header_value(key.proof(&claims).map_err(|e| DpopError(e.to_string()))?)
    }

    /// Keeps the API's nonce from a response's `DPoP-Nonce`; true when it is
    /// one the next proof did not carry yet.
    pub fn note_api_nonce(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers
            .get(&NONCE_HEADER)
            .filter(|v| is_nonce(v.as_bytes()))
        else {
            return false;
        };
        let current = self.api_nonce.load();
        if current.as_deref() == Some(value) {
            return false;
        }
        self.api_nonce.store(Some(Arc::new(value.clone())));
        true
    }

    /// Keeps the nonce a token endpoint at `url` sent; true when it is new.
    pub(crate) fn note_token_nonce(&self, url: &Uri, headers: &HeaderMap) -> bool {
        let Some(value) = headers
            .get(&NONCE_HEADER)
            .filter(|v| is_nonce(v.as_bytes()))
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let origin = origin_of(url);
        let mut nonces = self.token_nonces.lock().unwrap_or_else(|p| p.into_inner());
        match nonces.iter_mut().find(|(o, _)| *o == origin) {
            Some((_, n)) if n == value => false,
            Some((_, n)) => {
                value.clone_into(n);
                true
            }
            None => {
                if nonces.len() >= MAX_TOKEN_ORIGINS {
                    nonces.remove(0);
                }
                nonces.push((origin, value.to_owned()));
                true
            }
        }
    }

    /// Counts one more attempt made for a nonce at `place`.
    pub fn nonce_retry(&self, place: NonceWhere) {
        self.metrics.dpop_nonce_retry(place);
    }

    fn token_nonce(&self, origin: &str) -> Option<String> {
        let nonces = self.token_nonces.lock().unwrap_or_else(|p| p.into_inner());
        nonces
            .iter()
            .find(|(o, _)| o == origin)
            .map(|(_, n)| n.clone())
    }

    fn iat(&self) -> u64 {
        self.clock
            .wall_now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// A subject's DPoP key as a cached token carries it: the stored document,
/// parsed on first use and then kept parsed. A subject the sweeper renewed
/// but no request asked for costs its document only.
pub struct LazyProofKey {
    alg: Alg,
    pkcs8: Secret,
    parsed: OnceLock<Arc<ProofKey>>,
}

impl std::fmt::Debug for LazyProofKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyProofKey")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl LazyProofKey {
    /// The key `stored` holds, not parsed yet; `Err` for an alg this version
    /// does not sign DPoP proofs with.
    pub fn new(stored: &SubjectKey) -> Result<LazyProofKey, DpopError> {
        Ok(LazyProofKey {
            alg: proof_alg(&stored.alg)?,
            pkcs8: stored.pkcs8.clone(),
            parsed: OnceLock::new(),
        })
    }

    /// The key `stored` holds, already parsed as `parsed`.
    pub fn parsed(stored: &SubjectKey, parsed: Arc<ProofKey>) -> Result<LazyProofKey, DpopError> {
        let key = LazyProofKey::new(stored)?;
        let _unset = key.parsed.set(parsed);
        Ok(key)
    }

    /// A new key for `alg`, and its stored form.
    pub fn generate(alg: Alg) -> Result<(SubjectKey, Arc<ProofKey>), DpopError> {
        let (signing, pkcs8) = SigningKey::generate(alg)
            .map_err(|e| DpopError(format!("cannot make a DPoP key: {e}")))?;
        let key = ProofKey::new(signing)
            .map_err(|e| DpopError(format!("cannot make a DPoP key: {e}")))?;
        let stored = SubjectKey {
            alg: alg.as_str().to_owned(),
            pkcs8,
        };
        Ok((stored, Arc::new(key)))
    }

    /// Whether this is the key `stored` holds.
    pub fn holds(&self, stored: &SubjectKey) -> bool {
        self.alg.as_str() == stored.alg && self.pkcs8 == stored.pkcs8
    }

    /// The parsed key (parsed on the first call).
    pub fn get(&self) -> Result<&Arc<ProofKey>, DpopError> {
        if let Some(key) = self.parsed.get() {
            return Ok(key);
        }
        let key = SigningKey::from_pkcs8_base64(&self.pkcs8, Some(self.alg))
            .and_then(ProofKey::new)
            .map_err(|e| DpopError(format!("the subject's stored DPoP key {e}")))?;
        // A racing caller may have set it first: both parsed the same key.
        Ok(self.parsed.get_or_init(|| Arc::new(key)))
    }
}

/// The DPoP alg named `name` in a stored key.
fn proof_alg(name: &str) -> Result<Alg, DpopError> {
    [Alg::Es256, Alg::EdDsa]
        .into_iter()
        .find(|a| a.as_str() == name)
        .ok_or_else(|| DpopError(format!("a stored DPoP key for {name:?} cannot be used")))
}

/// Whether a 401's `WWW-Authenticate` says `DPoP error="use_dpop_nonce"`
/// (RFC 9449 §9), alone or among other challenges in one value (an API that
/// takes Bearer too offers both).
pub fn demands_nonce(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::WWW_AUTHENTICATE)
        .iter()
        .any(|v| dpop_challenge_wants_nonce(v.as_bytes()))
}

/// Walks the challenges of one `WWW-Authenticate` value (RFC 9110 §11.6.1:
/// `scheme [ token68 / #auth-param ]`, comma-separated, commas inside quoted
/// strings not counting): true when a DPoP challenge has `error` =
/// `use_dpop_nonce`. Another scheme's `error`, or the words in a description,
/// do not count.
fn dpop_challenge_wants_nonce(value: &[u8]) -> bool {
    let mut in_dpop = false;
    for item in split_unquoted_commas(value) {
        let item = item.trim_ascii();
        let name_len = item
            .iter()
            .position(|b| b.is_ascii_whitespace() || *b == b'=')
            .unwrap_or(item.len());
        let (name, after) = item.split_at(name_len);
        let param = if after.trim_ascii_start().starts_with(b"=") {
            // `name=value`: a parameter of the challenge in hand.
            Some(item)
        } else if name.is_empty() {
            None
        } else {
            // A scheme starts a challenge, maybe with its first parameter.
            in_dpop = name.eq_ignore_ascii_case(b"dpop");
            Some(after.trim_ascii_start()).filter(|p| !p.is_empty())
        };
        if in_dpop && param.is_some_and(is_use_dpop_nonce) {
            return true;
        }
    }
    false
}

/// Whether an `auth-param` is `error=use_dpop_nonce`, its value quoted or not.
fn is_use_dpop_nonce(param: &[u8]) -> bool {
    let Some(eq) = param.iter().position(|b| *b == b'=') else {
        return false;
    };
    let (name, value) = (param[..eq].trim_ascii(), param[eq + 1..].trim_ascii());
    let value = value
        .strip_prefix(b"\"")
        .and_then(|v| v.strip_suffix(b"\""))
        .unwrap_or(value);
    name.eq_ignore_ascii_case(b"error") && value == USE_DPOP_NONCE.as_bytes()
}

/// `value` split at the commas outside quoted strings.
fn split_unquoted_commas(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let (mut quoted, mut escaped) = (false, false);
    value.split(move |&b| {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == b',' && !quoted {
            return true;
        }
        false
    })
}

/// Whether a response's `DPoP-Nonce` is one a proof can carry (and is kept):
/// a demand for any other cannot be met by sending the request again.
pub fn offers_usable_nonce(headers: &HeaderMap) -> bool {
    headers
        .get(&NONCE_HEADER)
        .is_some_and(|v| is_nonce(v.as_bytes()))
}

/// RFC 9449 §8.1: a nonce is one or more NQCHARs (%x21 / %x23-5B / %x5D-7E).
fn is_nonce(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= MAX_NONCE_LEN
        && value
            .iter()
            .all(|&b| matches!(b, 0x21 | 0x23..=0x5b | 0x5d..=0x7e))
}

/// `scheme://host[:port]` of `url`.
fn origin_of(url: &Uri) -> String {
    origin(url.scheme_str().unwrap_or("http"), url.authority())
}

/// `scheme://host[:port]` as servers compare an `htu` (RFC 9449 §4.3, RFC
/// 3986 §6.2.2, §6.2.3): scheme and host in lower case, no user info, and no
/// port when it is the scheme's default. Servers that compare the claim with
/// the URL they rebuild from the request (`https://api.example/...`) refuse
/// `https://API.example:443/...`.
fn origin(scheme: &str, authority: Option<&http::uri::Authority>) -> String {
    let scheme = scheme.to_ascii_lowercase();
    let Some(authority) = authority else {
        return format!("{scheme}://");
    };
    let host = authority.host().to_ascii_lowercase();
    match authority.port_u16() {
        Some(443) if scheme == "https" => format!("{scheme}://{host}"),
        Some(80) if scheme == "http" => format!("{scheme}://{host}"),
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    }
}

/// The proof as a header value, marked sensitive like the token beside it: a
/// `Debug` of the request shows no proof, and HTTP/2 never puts it in its
/// header compression table.
fn header_value(proof: String) -> Result<HeaderValue, DpopError> {
    // base64url and dots only: always a valid header value.
    let mut value = HeaderValue::from_maybe_shared(bytes::Bytes::from(proof))
        .map_err(|_| DpopError("the DPoP proof is not a header value".to_owned()))?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{from_str, MapEnv};
    use crate::store::Store;

    fn dpop(upstream: &str) -> Arc<Dpop> {
        let text = format!(
            "[clients.payments]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n\
             [clients.payments.token]\nurl = \"https://auth.example/token\"\nclient_id = \"a\"\nclient_secret = \"s\"\n\
             [clients.payments.dpop]\n"
        );
        let config = match from_str(&text, None, &MapEnv::new()) {
            Ok(c) => c,
            Err(e) => panic!("config should be valid: {e}"),
        };
        let client = &config.clients[0];
        let store = Store::open(&config.store).expect("memory store");
        let metrics = crate::metrics::Metrics::new()
            .expect("metrics")
            .client("payments");
        Dpop::for_client(
            client,
            store.client(client),
            Arc::new(crate::clock::SystemClock),
            metrics,
        )
        .expect("the client has [dpop]")
    }

    fn claims(proof: &HeaderValue) -> serde_json::Value {
        let text = proof.to_str().expect("ascii");
        crate::jose::verify_with_header_jwk(text).1
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[tokio::test]
    async fn token_proofs_post_to_the_token_url_without_query_and_carry_its_nonce() {
        let d = dpop("https://api.bank.example:8443/v1");
        let url: Uri = "https://auth.example/oauth2/token?tenant=a"
            .parse()
            .expect("uri");
        let first = claims(&d.token_proof(&url).await.expect("proof"));
        assert_eq!(first["htm"], "POST");
        assert_eq!(first["htu"], "https://auth.example/oauth2/token");
        let now = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let iat = first["iat"].as_u64().expect("iat in whole seconds");
        assert!(
            iat.abs_diff(now) <= 2,
            "iat is the clock's now: {iat} vs {now}"
        );
        assert!(first.get("ath").is_none(), "no ath at the token endpoint");
        assert!(first.get("nonce").is_none(), "no nonce before one was sent");
        assert!(d.note_token_nonce(&url, &headers(&[("dpop-nonce", "tn-1")])));
        assert!(
            !d.note_token_nonce(&url, &headers(&[("dpop-nonce", "tn-1")])),
            "not new"
        );
        let second = claims(&d.token_proof(&url).await.expect("proof"));
        assert_eq!(second["nonce"], "tn-1");
        assert_ne!(first["jti"], second["jti"]);
        let other: Uri = "https://other-as.example/token".parse().expect("uri");
        let elsewhere = claims(&d.token_proof(&other).await.expect("proof"));
        assert!(elsewhere.get("nonce").is_none(), "nonces are per origin");
    }

    #[tokio::test]
    async fn api_proofs_name_the_upstream_origin_the_token_hash_and_the_api_nonce() {
        let d = dpop("https://api.bank.example:8443/v1");
        let key = Arc::clone(d.key().await.expect("key"));
        let ath = crate::jose::access_token_hash("at");
        let proof = d
            .api_proof(&key, &Method::PATCH, "/v1/payments/7?x=1", &ath)
            .expect("proof");
        let c = claims(&proof);
        assert_eq!(c["htm"], "PATCH");
        assert_eq!(c["htu"], "https://api.bank.example:8443/v1/payments/7");
        assert_eq!(c["ath"], ath);
        assert!(c.get("nonce").is_none());
        // The token endpoint's nonce is not the API's, even on one origin.
        let token_url: Uri = "https://api.bank.example:8443/token".parse().expect("uri");
        d.note_token_nonce(&token_url, &headers(&[("dpop-nonce", "token-side")]));
        let c = claims(&d.api_proof(&key, &Method::GET, "/v1", &ath).expect("proof"));
        assert!(c.get("nonce").is_none(), "{c}");
        assert!(d.note_api_nonce(&headers(&[("dpop-nonce", "api-1")])));
        let c = claims(&d.api_proof(&key, &Method::GET, "/v1", &ath).expect("proof"));
        assert_eq!(c["nonce"], "api-1");
        for bad in ["", "has space", "quote\"d", "back\\slash"] {
            assert!(
                !d.note_api_nonce(&headers(&[("dpop-nonce", bad)])),
                "{bad:?} is no nonce"
            );
        }
        assert!(!d.note_api_nonce(&headers(&[("dpop-nonce", &"n".repeat(2000))])));
        let c = claims(&d.api_proof(&key, &Method::GET, "/v1", &ath).expect("proof"));
        assert_eq!(c["nonce"], "api-1", "a malformed nonce is not taken");
    }

    #[tokio::test]
    async fn htu_names_the_origin_as_servers_rebuild_it_lower_case_without_a_default_port() {
        let d = dpop("https://API.Bank.example:443/v1");
        let key = Arc::clone(d.key().await.expect("key"));
        let ath = crate::jose::access_token_hash("at");
        let c = claims(
            &d.api_proof(&key, &Method::GET, "/v1/Pay%20ments", &ath)
                .expect("proof"),
        );
        assert_eq!(
            c["htu"], "https://api.bank.example/v1/Pay%20ments",
            "the path is kept as sent"
        );
        for (url, htu) in [
            (
                "https://Auth.Example:443/token",
                "https://auth.example/token",
            ),
            ("http://auth.example:80/token", "http://auth.example/token"),
            (
                "http://auth.example:443/token",
                "http://auth.example:443/token",
            ),
            (
                "https://auth.example:8443/token",
                "https://auth.example:8443/token",
            ),
            ("http://[::1]:8080/token", "http://[::1]:8080/token"),
        ] {
            let url: Uri = url.parse().expect("uri");
            let c = claims(&d.token_proof(&url).await.expect("proof"));
            assert_eq!(c["htu"], htu, "{url}");
        }
        let other = dpop("http://127.0.0.1:8080");
        let key = Arc::clone(other.key().await.expect("key"));
        let c = claims(
            &other
                .api_proof(&key, &Method::GET, "/", &ath)
                .expect("proof"),
        );
        assert_eq!(c["htu"], "http://127.0.0.1:8080/");
    }

    #[tokio::test]
    async fn proofs_are_sensitive_header_values_like_the_token() {
        let d = dpop("https://api.bank.example");
        let url: Uri = "https://auth.example/token".parse().expect("uri");
        let token_proof = d.token_proof(&url).await.expect("proof");
        let key = Arc::clone(d.key().await.expect("key"));
        let api_proof = d
            .api_proof(
                &key,
                &Method::GET,
                "/",
                &crate::jose::access_token_hash("at"),
            )
            .expect("proof");
        for proof in [token_proof, api_proof] {
            assert!(proof.is_sensitive());
            assert_eq!(format!("{proof:?}"), "Sensitive");
        }
    }

    #[tokio::test]
    async fn the_key_is_made_once_and_its_thumbprint_logged_never_the_key() {
        let d = dpop("http://127.0.0.1:1");
        assert!(d.loaded_key().is_none(), "not before first use");
        let (a, b) = tokio::join!(d.key(), d.key());
        let (a, b) = (a.expect("key"), b.expect("key"));
        assert!(Arc::ptr_eq(a, b), "one key for concurrent callers");
        assert!(d.loaded_key().is_some());
        assert_eq!(
            format!("{d:?}"),
            "Dpop { client: \"payments\", alg: Es256, .. }"
        );
    }

    #[test]
    fn a_subject_key_is_parsed_on_first_use_into_the_key_that_was_made() {
        for alg in [Alg::Es256, Alg::EdDsa] {
            let (stored, made) = LazyProofKey::generate(alg).expect("a key");
            assert_eq!(stored.alg, alg.as_str());
            let lazy = LazyProofKey::new(&stored).expect("a known alg");
            assert!(lazy.parsed.get().is_none(), "not parsed before first use");
            assert!(lazy.holds(&stored));
            let key = Arc::clone(lazy.get().expect("parses"));
            assert!(Arc::ptr_eq(&key, lazy.get().expect("kept")), "parsed once");
            assert_eq!(key.thumbprint(), made.thumbprint(), "the same key");
            let (other, _) = LazyProofKey::generate(alg).expect("a key");
            assert!(!lazy.holds(&other), "another subject's key");
            let parsed = LazyProofKey::parsed(&stored, made).expect("known alg");
            assert!(parsed.parsed.get().is_some(), "handed over parsed");
            assert_eq!(
                format!("{lazy:?}"),
                format!("LazyProofKey {{ alg: {alg:?}, .. }}")
            );
        }
        let unknown = SubjectKey {
            alg: "RS256".to_owned(),
            pkcs8: Secret::new("AAAA"),
        };
        assert!(LazyProofKey::new(&unknown).is_err());
        let damaged = SubjectKey {
            alg: "ES256".to_owned(),
            pkcs8: Secret::new("AAAA"),
        };
        let err = LazyProofKey::new(&damaged)
            .expect("a known alg")
            .get()
            .expect_err("no key in it");
        assert!(!err.to_string().contains("AAAA"), "{err}");
    }

    #[test]
    fn only_a_dpop_challenge_for_a_nonce_asks_for_one() {
        assert!(demands_nonce(&headers(&[(
            "www-authenticate",
            "DPoP error=\"use_dpop_nonce\", error_description=\"Resource server requires nonce in DPoP proof\""
        )])));
        assert!(demands_nonce(&headers(&[
            ("www-authenticate", "Bearer realm=\"x\""),
            ("www-authenticate", "dpop error=\"use_dpop_nonce\""),
        ])));
        assert!(!demands_nonce(&headers(&[(
            "www-authenticate",
            "DPoP error=\"invalid_token\""
        )])));
        assert!(!demands_nonce(&headers(&[(
            "www-authenticate",
            "Bearer error=\"use_dpop_nonce\""
        )])));
        assert!(!demands_nonce(&HeaderMap::new()));
        for (value, wanted) in [
            (
                r#"Bearer realm="payments", DPoP error="use_dpop_nonce", algs="ES256""#,
                true,
            ),
            (
                r#"Bearer realm="a", DPoP algs="ES256", error=use_dpop_nonce"#,
                true,
            ),
            (r#"Bearer abc==, DPoP  error = "use_dpop_nonce""#, true),
            (
                r#"DPoP realm="payments", Bearer error="use_dpop_nonce""#,
                false,
            ),
            (r#"Bearer realm="a, DPoP error="use_dpop_nonce"""#, false),
            (
                r#"DPoP error="invalid_token", error_description="use_dpop_nonce""#,
                false,
            ),
            (r#"DPoPx error="use_dpop_nonce""#, false),
            (r#"DPoP error="use_dpop_nonce_later""#, false),
        ] {
            assert_eq!(
                demands_nonce(&headers(&[("www-authenticate", value)])),
                wanted,
                "{value}"
            );
        }
    }
}
