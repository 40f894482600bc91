//! Connect sessions: a merchant or customer connects their account through a
//! one-time link, without a CLI.
//!
//! The app's backend asks the admin API for a link ([`Connect::create`]); the
//! person opens it on the public connect listener ([`Connect::handle`]):
//!
//! - `GET /connect/<id>` takes the link (once, across replicas: it lives in
//!   the store), starts a sign-in with a fresh `state` and PKCE S256 verifier,
//!   binds it to this browser with an HttpOnly cookie nonce, and redirects to
//!   the client's `[authorize]` login page;
//! - `GET /callback` takes the sign-in named by `state`, checks the cookie,
//!   exchanges the code, stores the subject the link was made for (never one
//!   named by the request), and redirects to the session's `return_to` with
//!   `subject`, `status` and `error`.
//!
//! A link opened twice, expired, or called back from another browser binds
//! nothing. Every answer carries no-store, no-referrer, no-framing and a CSP
//! that loads nothing. Links, states, codes and tokens are never logged.

mod page;
mod session;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::{info, warn};

use crate::config::{AuthorizeConfig, ConnectConfig};
use crate::http::body::Body;
use crate::secret::Secret;
use crate::server::PeerAddr;
use crate::store::{to_ms, Saved, SubjectLoad};
use crate::subjects::Subjects;
use session::{Link, SignIn};

/// The cookie binding a sign-in to the browser that opened the link; on https
/// the `__Host-` form, which a sibling subdomain cannot set.
const COOKIE_NAME: &str = "tokenproxy_connect";
const SECURE_COOKIE_NAME: &str = "__Host-tokenproxy_connect";

/// One client that links can connect subjects of.
#[derive(Clone)]
pub struct ConnectClient {
    /// The client's name.
    pub name: String,
    /// Its subjects.
    pub subjects: Subjects,
    /// Its provider's login page; without one its links cannot be made.
    pub authorize: Option<AuthorizeConfig>,
}

/// A link made by [`Connect::create`].
#[derive(Debug)]
pub struct Created {
    /// `<public_url>/connect/<id>`: give it to the person, once.
    pub url: String,
    /// When it stops working.
    pub expires_at: SystemTime,
}

/// Why a link could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The client has no `[authorize]` table.
    #[error("client {0} has no [clients.{0}.authorize] table: connect links lead to the provider's login page named there")]
    NoAuthorize(String),
    /// `return_to` is not allowed.
    #[error("return_to must be an absolute URL without a fragment that starts with one of connect.return_to")]
    ReturnTo,
    /// The store did not take the session, or no random id could be made.
    #[error("{0}")]
    Unavailable(String),
}

/// The connect listener's state: its settings and the clients it serves.
pub struct Connect {
    config: ConnectConfig,
    clients: ArcSwap<Vec<ConnectClient>>,
}

impl Connect {
    /// Connect sessions as `config` says; clients come with [`Connect::set_clients`].
    pub fn new(config: ConnectConfig) -> Connect {
        Connect {
            config,
            clients: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// The settings.
    pub fn config(&self) -> &ConnectConfig {
        &self.config
    }

    /// Replaces the clients (after a reload).
    pub fn set_clients(&self, clients: Vec<ConnectClient>) {
        self.clients.store(Arc::new(clients));
    }

    fn client(&self, name: &str) -> Option<ConnectClient> {
        self.clients.load().iter().find(|c| c.name == name).cloned()
    }

    /// Makes a one-time link that connects `subject` of `client` (which has
    /// subjects), returning to `return_to` (else the first allowed prefix).
    pub async fn create(
        &self,
        client: &str,
        subject: &str,
        return_to: Option<&str>,
    ) -> Result<Created, CreateError> {
        let c = self
            .client(client)
            .filter(|c| c.authorize.is_some())
            .ok_or_else(|| CreateError::NoAuthorize(client.to_owned()))?;
        let return_to = match return_to {
            Some(url) if self.config.allows_return_to(url) => url.to_owned(),
            Some(_) => return Err(CreateError::ReturnTo),
            // Validated at load: non-empty.
            None => self.config.return_to.first().cloned().unwrap_or_default(),
        };
        let id = session::new_id(client)
            .ok_or_else(|| CreateError::Unavailable("the system RNG failed".to_owned()))?;
        let now = c.subjects.wall_now();
        let link = Link {
            client: client.to_owned(),
            subject: subject.to_owned(),
            return_to,
            created_at_ms: to_ms(now),
        };
        let json = serde_json::to_vec(&link)
            .map_err(|e| CreateError::Unavailable(format!("cannot encode the session: {e}")))?;
        let ttl = self.config.session_ttl;
        c.subjects
            .store()
            .put_once(&id, &json, ttl)
            .await
            .map_err(|e| CreateError::Unavailable(format!("the store cannot be written: {e}")))?;
        c.subjects.metrics().connect("created");
        info!(
            client,
            subject,
            ttl_s = ttl.as_secs(),
            "connect link created"
        );
        Ok(Created {
            url: format!("{}/connect/{id}", self.config.public_url),
            expires_at: now + ttl,
        })
    }

    /// Answers one request of the connect listener.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        _peer: PeerAddr,
    ) -> Result<Response<Body>, Infallible> {
        let path = req.uri().path();
        let path = path.strip_prefix(&*self.config.base_path).unwrap_or(path);
        let is_get = req.method() == Method::GET;
        if !is_get && req.method() != Method::HEAD {
            let mut r = page::page(
                StatusCode::METHOD_NOT_ALLOWED,
                "Not allowed",
                "Open the link in a browser.",
            );
            r.headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return Ok(r);
        }
        Ok(if let Some(id) = path.strip_prefix("/connect/") {
            if is_get {
                self.open(id, req.headers()).await
            } else {
                // A link checker's HEAD must not use the link up.
                page::page(StatusCode::OK, "Connect", "Open this link in a browser.")
            }
        } else if path == "/callback" && is_get {
            self.callback(req.uri().query().unwrap_or(""), req.headers())
                .await
        } else {
            page::page(
                StatusCode::NOT_FOUND,
                "Not found",
                "There is nothing at this address.",
            )
        })
    }

    /// `GET /connect/<id>`: takes the link, starts the sign-in, redirects to the provider.
    async fn open(&self, id: &str, headers: &HeaderMap) -> Response<Body> {
        let Some(c) = session::client_of(id).and_then(|name| self.client(name)) else {
            return used_or_expired();
        };
        let link = match c.subjects.store().take_once(id).await {
            Ok(Some(bytes)) => match serde_json::from_slice::<Link>(&bytes) {
                Ok(link) if link.client == c.name => link,
                _ => return used_or_expired(),
            },
            Ok(None) => return used_or_expired(),
            Err(e) => {
                warn!(client = %c.name, error = %e, "connect link cannot be read from the store");
                return try_again();
            }
        };
        let Some(authorize) = &c.authorize else {
            c.subjects.metrics().connect("error");
            warn!(client = %c.name, subject = %link.subject,
                "connect link opened, but the client has no [authorize] table any more");
            return page::page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Cannot connect now",
                "This service cannot send you to sign in at the moment. Ask for a new link later.",
            );
        };
        // A browser that opened a link before keeps its nonce, so two links
        // opened side by side both complete.
        let nonce = cookie(headers, self.cookie_name())
            .filter(|n| session::is_random(n))
            .map(str::to_owned)
            .or_else(session::random);
        let (Some(state), Some(verifier), Some(nonce)) =
            (session::new_id(&c.name), session::random(), nonce)
        else {
            return try_again();
        };
        let verifier = Secret::new(verifier);
        let sign_in = SignIn {
            client: c.name.clone(),
            subject: link.subject.clone(),
            verifier: verifier.expose().to_owned(),
            return_to: link.return_to.clone(),
            browser: session::browser_digest(&nonce),
        };
        let stored = match serde_json::to_vec(&sign_in) {
            Ok(json) => {
                c.subjects
                    .store()
                    .put_once(&session::state_key(&state), &json, self.config.session_ttl)
                    .await
            }
            Err(e) => Err(crate::store::StoreError::Io(e.to_string())),
        };
        if let Err(e) = stored {
            warn!(client = %c.name, error = %e, "connect sign-in cannot be stored");
            return try_again();
        }
        let url = crate::authorize::authorization_url(
            authorize,
            c.subjects.token_config(),
            &self.config.redirect_uri,
            &state,
            Some(&verifier),
        );
        c.subjects.metrics().connect("opened");
        info!(client = %c.name, subject = %link.subject, "connect link opened; sent to sign in");
        let mut r = page::redirect(&url);
        if let Ok(value) = HeaderValue::from_str(&self.set_cookie(&nonce)) {
            r.headers_mut().insert(SET_COOKIE, value);
        }
        r
    }

    /// `GET /callback`: takes the sign-in, checks the browser, exchanges the
    /// code, stores the subject, and sends the person back to `return_to`.
    async fn callback(&self, query: &str, headers: &HeaderMap) -> Response<Body> {
        let mut state = None;
        let mut code = None;
        let mut error = None;
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "state" => state = Some(v.into_owned()),
                "code" => code = Some(v.into_owned()),
                "error" => error = Some(v.into_owned()),
                _ => {}
            }
        }
        let Some(state) = state else {
            return unknown_sign_in();
        };
        let Some(c) = session::client_of(&state).and_then(|name| self.client(name)) else {
            return unknown_sign_in();
        };
        let sign_in = match c
            .subjects
            .store()
            .take_once(&session::state_key(&state))
            .await
        {
            Ok(Some(bytes)) => match serde_json::from_slice::<SignIn>(&bytes) {
                Ok(s) if s.client == c.name => s,
                _ => return unknown_sign_in(),
            },
            Ok(None) => return unknown_sign_in(),
            Err(e) => {
                warn!(client = %c.name, error = %e, "connect sign-in cannot be read from the store");
                return try_again();
            }
        };
        let subject = sign_in.subject.as_str();
        let same_browser = cookie(headers, self.cookie_name())
            .is_some_and(|nonce| session::same_browser(nonce, &sign_in.browser));
        if !same_browser {
            c.subjects.metrics().connect("error");
            warn!(client = %c.name, subject,
                "connect callback from a browser that did not open the link; nothing bound");
            return page::page(
                StatusCode::BAD_REQUEST,
                "Sign-in not completed",
                "This sign-in was started in another browser, so nothing was connected. Open a new link and sign in with the same browser.",
            );
        }
        let failed = |code: &str| {
            c.subjects.metrics().connect("error");
            page::redirect(&page::outcome_url(&sign_in.return_to, subject, Some(code)))
        };
        if let Some(e) = error {
            let e = page::error_code(&e);
            info!(client = %c.name, subject, error = e, "the provider did not authorize the connection");
            return failed(e);
        }
        let Some(code) = code.filter(|c| !c.is_empty()).map(Secret::new) else {
            return failed("invalid_request");
        };
        match self.bind(&c, subject, &code, &sign_in.verifier).await {
            Ok(()) => {
                c.subjects.metrics().connect("connected");
                info!(client = %c.name, subject, "subject connected");
                page::redirect(&page::outcome_url(&sign_in.return_to, subject, None))
            }
            Err(problem) => failed(problem),
        }
    }

    /// Exchanges `code` and stores the tokens as `subject`'s (fenced, as an
    /// import); the error is the code for `return_to`.
    async fn bind(
        &self,
        c: &ConnectClient,
        subject: &str,
        code: &Secret,
        verifier: &str,
    ) -> Result<(), &'static str> {
        let subjects = &c.subjects;
        let verifier = Secret::new(verifier);
        // The code exchange is a token request of the client: it waits its turn
        // in the budget its subjects' refreshes share.
        let _slot = subjects.token_request_slot().await;
        // With [dpop], the tokens are bound to the subject's own key, which is
        // stored with them below.
        let key = subjects.key_for_new_tokens(subject).await.map_err(|e| {
            warn!(client = %c.name, subject, error = %e, "connect cannot get the subject's DPoP key");
            "store_unavailable"
        })?;
        let set = subjects
            .endpoint()
            .exchange_code(
                subjects.token_config(),
                code,
                &self.config.redirect_uri,
                Some(&verifier),
                key.as_ref().map(|(_, k)| &**k),
            )
            .await
            .map_err(|e| {
                warn!(client = %c.name, subject, error = %e, "connect code exchange failed");
                "exchange_failed"
            })?;
        let set_is_dpop = set.is_dpop();
        let Some(refresh_token) = set.refresh_token else {
            warn!(client = %c.name, subject,
                "the provider issued no refresh token; add a scope like offline_access or a parameter to [authorize] params");
            return Err("no_refresh_token");
        };
        let refresh_lifetime = set
            .refresh_token_lifetime
            .filter(|l| !l.is_zero())
            .or(subjects.token_config().refresh_token_lifetime);
        // A Bearer token answering a DPoP-signed exchange is bound to no key:
        // not kept (the first request refreshes, and says why if it stays so).
        let bound = !subjects.uses_dpop() || set_is_dpop;
        if !bound {
            warn!(client = %c.name, subject, "the provider did not bind the subject's token to its DPoP key (token_type is not DPoP); it is not used");
        }
        let access = Some((set.access_token, set.lifetime)).filter(|_| bound);
        let now = subjects.wall_now();
        for _attempt in 0..3 {
            let previous = match subjects.store().get(subject).await {
                Ok(SubjectLoad::Missing) => 0,
                Ok(SubjectLoad::Found(r)) => r.generation,
                Ok(SubjectLoad::NotOpened { generation, .. }) => generation,
                Err(e) => {
                    warn!(client = %c.name, subject, error = %e, "connect cannot read the store");
                    return Err("store_unavailable");
                }
            };
            let record = subjects.new_record(
                previous,
                access.clone(),
                Some(refresh_token.clone()),
                refresh_lifetime,
                Some(now),
                key.as_ref().map(|(stored, _)| stored.clone()),
            );
            match subjects.store().put(subject, &record).await {
                Ok(Saved::Written) => {
                    subjects.forget(subject).await;
                    return Ok(());
                }
                Ok(Saved::Stale { .. }) => continue,
                Err(e) => {
                    warn!(client = %c.name, subject, error = %e, "connect cannot write the store");
                    return Err("store_unavailable");
                }
            }
        }
        warn!(client = %c.name, subject, "the subject's record kept changing while connecting");
        Err("store_unavailable")
    }

    fn cookie_name(&self) -> &'static str {
        if self.config.secure {
            SECURE_COOKIE_NAME
        } else {
            COOKIE_NAME
        }
    }

    fn set_cookie(&self, nonce: &str) -> String {
        let max_age = self.config.session_ttl.as_secs().max(1);
        let secure = if self.config.secure { "; Secure" } else { "" };
        format!(
            "{}={nonce}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}",
            self.cookie_name()
        )
    }
}

/// The value of cookie `name` in the request.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn used_or_expired() -> Response<Body> {
    page::page(
        StatusCode::GONE,
        "Link used or expired",
        "This link was already used or has expired. Ask for a new one.",
    )
}

fn unknown_sign_in() -> Response<Body> {
    page::page(
        StatusCode::BAD_REQUEST,
        "Sign-in not recognised",
        "This sign-in is unknown, was already completed, or has expired, so nothing was connected. Open a new link to try again.",
    )
}

fn try_again() -> Response<Body> {
    let mut r = page::page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Please try again",
        "This service is briefly unavailable. Reload the page in a moment.",
    );
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_static("a=1; tokenproxy_connect=abc"),
        );
        h.append(COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&h, COOKIE_NAME), Some("abc"));
        assert_eq!(cookie(&h, SECURE_COOKIE_NAME), None);
        assert_eq!(cookie(&HeaderMap::new(), COOKIE_NAME), None);
    }
}
