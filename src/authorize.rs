//! `tokenproxy authorize CLIENT`: a person logs in once through the provider's
//! authorization-code flow, and the refresh token lands in the token store.
//!
//! The command prints the authorization URL (with `state` and, by default, a
//! PKCE S256 challenge), receives the redirect on a one-shot loopback listener
//! (or, with `--no-listen`, reads the redirected URL pasted on stdin), checks
//! `state`, exchanges the code at the token endpoint with the client's
//! configured authentication, and writes the tokens into the configured store
//! (file or Redis), where a running sidecar picks them up. With the memory
//! store it hands the refresh token to the running sidecar's admin listener.
//! Any failure leaves the stored state untouched. Tokens are never printed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::clock::SystemClock;
use crate::config::{AuthorizeConfig, ClientConfig, Config, StoreConfig, TokenConfig};
use crate::secret::Secret;
use crate::store::{next_generation, Record, Saved, Store, StoreError, TokenState};
use crate::token::{TokenEndpoint, TokenError};

/// How the command runs.
#[derive(Debug, Clone)]
pub struct AuthorizeOptions {
    /// Receive the redirect on the loopback listener of `redirect_uri` (default);
    /// false: read the redirected URL from the input.
    pub listen: bool,
    /// Give up after this long without a redirect.
    pub timeout: Duration,
    /// Try to open the URL in a browser.
    pub open: bool,
}

/// What was stored, without any token.
#[derive(Debug, Clone)]
pub struct Authorized {
    /// Where the tokens went, e.g. `file store /var/lib/tokenproxy/tokens.json`.
    pub stored_in: String,
    /// The stored record's generation (0 for a hand-over to a running sidecar).
    pub generation: u64,
    /// The granted scope, when the provider said.
    pub scope: Option<String>,
    /// When the access token expires, if stated.
    pub access_expires_at: Option<SystemTime>,
    /// When the refresh token expires, if stated.
    pub refresh_expires_at: Option<SystemTime>,
}

/// Why `authorize` failed; nothing was stored.
#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    /// No such client in the configuration.
    #[error("no client {0:?} in the configuration")]
    NoClient(String),
    /// The client has no `[authorize]` table.
    #[error("clients.{0} has no [clients.{0}.authorize] table: set url and redirect_port (or redirect_uri) there")]
    NotConfigured(String),
    /// The redirect cannot be received here.
    #[error("{0}")]
    Listen(String),
    /// No redirect came in time.
    #[error("no redirect within {0}; nothing was stored")]
    Timeout(String),
    /// The redirect's `state` is not the one sent.
    #[error("the redirect's state does not match the one this command sent (a stale or forged redirect); nothing was stored")]
    StateMismatch,
    /// The provider answered with an error on the redirect.
    #[error("the provider refused the authorization: {error}{}; nothing was stored", .description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Denied {
        /// The `error` parameter, e.g. access_denied.
        error: String,
        /// Its `error_description`.
        description: Option<String>,
    },
    /// The redirected URL could not be understood.
    #[error("{0}; nothing was stored")]
    BadRedirect(String),
    /// The code exchange failed.
    #[error("code exchange failed: {0}; nothing was stored")]
    Exchange(#[from] TokenError),
    /// The provider issued no refresh token.
    #[error("the provider issued no refresh token, so the sidecar could not refresh on its own; providers often need a scope like offline_access or a parameter like access_type = \"offline\" in [authorize] params; nothing was stored")]
    NoRefreshToken,
    /// The store could not be written.
    #[error("cannot write the token store: {0}")]
    Store(#[from] StoreError),
    /// The running sidecar did not take the token (memory store).
    #[error("the store is memory, so the refresh token was to go to the running sidecar, which did not take it: {0}; configure [store] kind = \"file\" or \"redis\" to keep it")]
    Handover(#[from] crate::operator::OperatorError),
    /// The HTTP client for the token endpoint could not be built.
    #[error("{0}")]
    Client(String),
}

/// The authorization request: its URL and the secrets that go with it.
pub struct AuthorizationRequest {
    /// Where to send the person.
    pub url: String,
    state: String,
    verifier: Option<Secret>,
}

/// Builds the authorization URL for `client`.
pub fn authorization_request(
    client: &ClientConfig,
) -> Result<AuthorizationRequest, AuthorizeError> {
    let a = client
        .authorize
        .as_ref()
        .ok_or_else(|| AuthorizeError::NotConfigured(client.name.clone()))?;
    let state = random_b64(16);
    let verifier = a.pkce.then(|| Secret::new(random_b64(32)));
    let url = authorization_url(
        a,
        &client.token,
        &a.redirect_uri.to_string(),
        &state,
        verifier.as_ref(),
    );
    Ok(AuthorizationRequest {
        url,
        state,
        verifier,
    })
}

/// The URL that sends a person to the provider's login page of `a`:
/// response_type=code, client_id, `redirect_uri`, scope (`[authorize]`'s, else
/// the token's), `state`, the S256 challenge of `verifier`, then `a.params`.
pub(crate) fn authorization_url(
    a: &AuthorizeConfig,
    token: &TokenConfig,
    redirect_uri: &str,
    state: &str,
    verifier: Option<&Secret>,
) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("response_type", "code");
    if let Some(id) = &token.client_id {
        query.append_pair("client_id", id);
    }
    query.append_pair("redirect_uri", redirect_uri);
    if let Some(scope) = a.scope.as_ref().or(token.scope.as_ref()) {
        query.append_pair("scope", scope);
    }
    query.append_pair("state", state);
    if let Some(v) = verifier {
        let digest = ring::digest::digest(&ring::digest::SHA256, v.expose().as_bytes());
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref());
        query.append_pair("code_challenge", &challenge);
        query.append_pair("code_challenge_method", "S256");
    }
    for (k, v) in &a.params {
        query.append_pair(k, v);
    }
    let base = a.url.to_string();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{}", query.finish())
}

/// `bytes` random bytes from the system RNG, base64url without padding.
pub(crate) fn random_b64(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut buf).is_err() {
        // The system RNG does not fail on Linux; should it, a one-shot state from
        // fastrand is still not guessable by a third party in time.
        buf.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// Runs the whole flow for `client`; progress goes to `say`, the pasted URL (with
/// `--no-listen`) comes from `input`.
pub async fn authorize(
    config: &Config,
    client_name: &str,
    options: &AuthorizeOptions,
    input: &mut (impl AsyncBufRead + Unpin),
    say: &mut dyn FnMut(&str),
) -> Result<Authorized, AuthorizeError> {
    let client = config
        .clients
        .iter()
        .find(|c| c.name == client_name)
        .ok_or_else(|| AuthorizeError::NoClient(client_name.to_owned()))?;
    let a = client
        .authorize
        .as_ref()
        .ok_or_else(|| AuthorizeError::NotConfigured(client.name.clone()))?;
    let request = authorization_request(client)?;
    let redirect_uri = a.redirect_uri.to_string();
    let listener = if options.listen {
        let addr = a.redirect_listen.ok_or_else(|| {
            AuthorizeError::Listen(format!(
                "redirect_uri {redirect_uri} is not plain http on a loopback address with a port, so this command cannot receive the redirect; run it with --no-listen and paste the redirected URL"
            ))
        })?;
        Some(TcpListener::bind(addr).await.map_err(|e| {
            AuthorizeError::Listen(format!(
                "cannot listen on {addr} for the redirect to {redirect_uri}: {e}; free the port, or use --no-listen"
            ))
        })?)
    } else {
        None
    };
    say(&format!(
        "Open this URL in a browser, log in and approve access for client {client_name}:\n\n  {}\n",
        request.url
    ));
    if options.open {
        open_browser(&request.url, say);
    }
    let timeout_text = humantime::format_duration(options.timeout).to_string();
    let redirected = match listener {
        Some(listener) => {
            say(&format!(
                "Waiting up to {timeout_text} for the browser to come back to {redirect_uri} ..."
            ));
            let path = a.redirect_uri.path().to_owned();
            let waiting_for = request.state.clone();
            tokio::time::timeout(
                options.timeout,
                receive_redirect(listener, path, waiting_for),
            )
            .await
            .map_err(|_| AuthorizeError::Timeout(timeout_text.clone()))??
        }
        None => {
            say(&format!(
                "After you approve, the browser goes to {redirect_uri}?code=... (the page itself may not load; that is fine).\nPaste that whole address here and press Enter (waiting up to {timeout_text}):"
            ));
            let mut line = String::new();
            tokio::time::timeout(options.timeout, input.read_line(&mut line))
                .await
                .map_err(|_| AuthorizeError::Timeout(timeout_text.clone()))?
                .map_err(|e| AuthorizeError::BadRedirect(format!("cannot read stdin: {e}")))?;
            query_of(line.trim())?
        }
    };
    let code = check_redirect(&redirected, &request.state)?;
    say("Authorization received; exchanging the code for tokens ...");

    let http = crate::http::client::build_token_client(&client.token.tls, &client.proxy)
        .map_err(|e| AuthorizeError::Client(e.to_string()))?;
    // A DPoP-bound token (and, for a public client, refresh token) is bound to
    // the key the sidecar signs with: the one in the file or Redis store.
    let dpop = match &client.dpop {
        Some(_) => crate::token::Dpop::for_command(client, &Store::open(&config.store)?),
        None => None,
    };
    let endpoint = TokenEndpoint::new(http, Arc::new(SystemClock)).with_dpop(dpop);
    let set = endpoint
        .exchange_code(
            &client.token,
            &code,
            &redirect_uri,
            request.verifier.as_ref(),
            None,
        )
        .await?;
    let Some(refresh_token) = set.refresh_token else {
        return Err(AuthorizeError::NoRefreshToken);
    };
    let now = SystemTime::now();
    let access_expires_at = set.lifetime.map(|l| now + l);
    let refresh_expires_at = set
        .refresh_token_lifetime
        .filter(|l| !l.is_zero())
        .or(client.token.refresh_token_lifetime)
        .map(|l| now + l);
    let state = TokenState {
        access_token: Some(set.access_token),
        access_expires_at,
        lifetime: set.lifetime,
        refresh_token: Some(refresh_token),
        refresh_expires_at,
        obtained_at: now,
    };
    let (stored_in, generation) = match &config.store {
        StoreConfig::Memory => {
            let admin = crate::operator::admin_target(config.admin.listen);
            let token = state
                .refresh_token
                .clone()
                .unwrap_or_else(|| Secret::new(""));
            crate::operator::provide_refresh_token(
                admin,
                config.admin.api_key.as_ref(),
                client_name,
                token,
                Duration::from_secs(15),
            )
            .await?;
            (
                format!("the running sidecar (admin {admin}; memory store: a restart forgets it)"),
                0,
            )
        }
        other => {
            let store = Store::open(other)?;
            let client_store = store.client(client);
            let mut generation = next_generation(client_store.load().await?.generation)?;
            let mut attempts = 0;
            loop {
                let record = Record {
                    generation,
                    state: state.clone(),
                };
                // A person logged in: this replaces even a record that does not open.
                match client_store.save_replacing(&record).await? {
                    Saved::Written => break,
                    Saved::Stale { generation: theirs } if attempts < 3 => {
                        attempts += 1;
                        generation = next_generation(theirs)?;
                    }
                    Saved::Stale { .. } => {
                        return Err(AuthorizeError::Store(StoreError::Io(
                            "the stored state kept changing while writing; try again".into(),
                        )))
                    }
                }
            }
            let place = match other {
                StoreConfig::File(f) => format!("the file store {}", f.path.display()),
                StoreConfig::Redis(r) => format!(
                    "the redis store {} ({}:{{{}}}:token)",
                    r.display_url,
                    r.key_prefix,
                    client_store.record_name()
                ),
                StoreConfig::Memory => String::new(),
            };
            (place, generation)
        }
    };
    Ok(Authorized {
        stored_in,
        generation,
        scope: set.scope,
        access_expires_at,
        refresh_expires_at,
    })
}

/// Serves the loopback listener until the redirect of this login arrives (a request
/// to `path` with this `state`, carrying a code or the provider's error); answers
/// it with a short page and returns its query. Any other request gets 400 and the
/// wait goes on: a forged callback must not end the login.
async fn receive_redirect(
    listener: TcpListener,
    path: String,
    state: String,
) -> Result<String, AuthorizeError> {
    let (tx, mut rx) = mpsc::channel::<String>(1);
    let path = Arc::new((path, state));
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (tx, path) = (tx.clone(), Arc::clone(&path));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (tx, path) = (tx.clone(), Arc::clone(&path));
                    async move { Ok::<_, Infallible>(redirect_page(req, &path.0, &path.1, &tx)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let query = rx.recv().await;
    // Let the browser's page be written before the listener goes away.
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.abort();
    query.ok_or_else(|| AuthorizeError::Listen("the redirect listener stopped".into()))
}

fn redirect_page(
    req: Request<Incoming>,
    path: &str,
    state: &str,
    tx: &mpsc::Sender<String>,
) -> Response<Full<Bytes>> {
    if req.uri().path() != path {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    let query = req.uri().query().unwrap_or("").to_owned();
    let failed = match check_redirect(&query, state) {
        Ok(_) => false,
        Err(AuthorizeError::Denied { .. }) => true,
        Err(_) => {
            let mut r = Response::new(Full::new(Bytes::from_static(
                b"tokenproxy: this is not the redirect this login is waiting for\n",
            )));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return r;
        }
    };
    let _ = tx.try_send(query);
    let text = if failed {
        "tokenproxy: the provider did not authorize; see the terminal. You can close this window."
    } else {
        "tokenproxy: authorization received; see the terminal. You can close this window."
    };
    let html = format!("<!doctype html><title>tokenproxy</title><p>{text}</p>\n");
    let mut r = Response::new(Full::new(Bytes::from(html)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

/// The query of a pasted redirected URL (or of a bare `?code=…` / `code=…`).
fn query_of(text: &str) -> Result<String, AuthorizeError> {
    if text.is_empty() {
        return Err(AuthorizeError::BadRedirect(
            "nothing was pasted (expected the redirected URL with ?code=...)".into(),
        ));
    }
    let without_fragment = text.split('#').next().unwrap_or("");
    Ok(match without_fragment.split_once('?') {
        Some((_, q)) => q.to_owned(),
        None if without_fragment.contains('=') => without_fragment.to_owned(),
        None => return Err(AuthorizeError::BadRedirect(
            "the pasted text has no query (expected the redirected URL with ?code=...&state=...)"
                .into(),
        )),
    })
}

/// Checks `state` first (an error redirect with a foreign state is not ours
/// either), then the provider's error, then returns the code.
fn check_redirect(query: &str, state: &str) -> Result<Secret, AuthorizeError> {
    let mut got_state = None;
    let mut error = None;
    let mut description = None;
    let mut code = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "state" => got_state = Some(v.into_owned()),
            "error" => error = Some(v.into_owned()),
            "error_description" => description = Some(v.into_owned()),
            "code" => code = Some(v.into_owned()),
            _ => {}
        }
    }
    if got_state.as_deref() != Some(state) {
        return Err(AuthorizeError::StateMismatch);
    }
    if let Some(error) = error {
        return Err(AuthorizeError::Denied { error, description });
    }
    match code {
        Some(c) if !c.is_empty() => Ok(Secret::new(c)),
        _ => Err(AuthorizeError::BadRedirect(
            "the redirect has neither a code nor an error".into(),
        )),
    }
}

fn open_browser(url: &str, say: &mut dyn FnMut(&str)) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    match std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(_) => say(&format!("(opened with {opener})")),
        Err(_) => say(&format!("(could not run {opener}; open the URL yourself)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_checked_before_the_error_and_the_code() {
        assert!(matches!(
            check_redirect("code=abc&state=other", "mine"),
            Err(AuthorizeError::StateMismatch)
        ));
        assert!(matches!(
            check_redirect("error=access_denied&state=other", "mine"),
            Err(AuthorizeError::StateMismatch)
        ));
        assert!(matches!(
            check_redirect("code=abc", "mine"),
            Err(AuthorizeError::StateMismatch)
        ));
        match check_redirect(
            "error=access_denied&error_description=no+way&state=mine",
            "mine",
        ) {
            Err(AuthorizeError::Denied { error, description }) => {
                assert_eq!(error, "access_denied");
                assert_eq!(description.as_deref(), Some("no way"));
            }
            other => panic!("{other:?}"),
        }
        let code = check_redirect("code=c%2B1&state=mine", "mine").unwrap();
        assert_eq!(code.expose(), "c+1");
        assert!(matches!(
            check_redirect("state=mine", "mine"),
            Err(AuthorizeError::BadRedirect(_))
        ));
    }

    #[test]
    fn pasted_urls_and_bare_queries_are_accepted() {
        assert_eq!(
            query_of("http://127.0.0.1:1/cb?code=a&state=b#x").unwrap(),
            "code=a&state=b"
        );
        assert_eq!(query_of("code=a&state=b").unwrap(), "code=a&state=b");
        assert!(query_of("").is_err());
        assert!(query_of("http://127.0.0.1:1/cb").is_err());
    }
}
