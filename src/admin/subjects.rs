//! The subjects API on the admin listener:
//!
//! - `GET /clients/NAME/subjects?state=&after=&limit=`: a page of subjects;
//! - `GET /clients/NAME/subjects/SUBJECT`: one subject's state (never a token);
//! - `PUT /clients/NAME/subjects/SUBJECT`: import tokens (migration);
//! - `DELETE /clients/NAME/subjects/SUBJECT`: forget (and revoke when configured);
//! - `POST /clients/NAME/subjects/SUBJECT/connect`: a one-time connect link.
//!
//! With `admin.api_key` set every call needs it; without one, reads are
//! answered to loopback peers only and writes are refused. Host and origin are
//! checked as for every admin write (a browser page cannot drive it).

use std::time::{Duration, SystemTime};

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;

use super::{error_response, json_response, Admin, AdminError};
use crate::clock::rfc3339;
use crate::http::body::Body;
use crate::secret::Secret;
use crate::server::PeerAddr;
use crate::store::{from_ms, Saved, SubjectLoad, SubjectMeta, SubjectStatus};
use crate::subjects::{is_valid_subject, Subjects};

const MAX_IMPORT_BYTES: usize = 64 * 1024;
const MAX_CONNECT_BYTES: usize = 8 * 1024;
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// A subjects call, as its path names it.
enum Call<'a> {
    List { client: &'a str },
    One { client: &'a str, subject: &'a str },
    Connect { client: &'a str, subject: &'a str },
}

/// The call a path names, if it is a subjects path.
fn parse(path: &str) -> Option<Call<'_>> {
    let rest = path.strip_prefix("/clients/")?;
    let (client, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("subjects")?;
    if rest.is_empty() {
        return Some(Call::List { client });
    }
    let subject = rest.strip_prefix('/')?;
    if let Some(subject) = subject.strip_suffix("/connect") {
        return (!subject.contains('/')).then_some(Call::Connect { client, subject });
    }
    (!subject.contains('/')).then_some(Call::One { client, subject })
}

/// Whether `path` is one of the subjects API's.
pub(super) fn is_subjects_path(path: &str) -> bool {
    parse(path).is_some()
}

/// The body of an import.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Import {
    refresh_token: String,
    #[serde(default)]
    access_token: Option<String>,
    /// Seconds from now.
    #[serde(default)]
    expires_in: Option<u64>,
    /// RFC 3339, or seconds since the epoch.
    #[serde(default)]
    expires_at: Option<serde_json::Value>,
    /// Seconds from now.
    #[serde(default)]
    refresh_token_expires_in: Option<u64>,
}

/// The body of a connect request (optional).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConnectRequest {
    #[serde(default)]
    return_to: Option<String>,
}

impl Admin {
    /// Answers a subjects call.
    pub(super) async fn subjects_call(
        &self,
        req: Request<Incoming>,
        peer: PeerAddr,
    ) -> Response<Body> {
        match self.subjects_inner(req, peer).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        }
    }

    async fn subjects_inner(
        &self,
        req: Request<Incoming>,
        peer: PeerAddr,
    ) -> Result<Response<Body>, AdminError> {
        let path = req.uri().path().to_owned();
        let call = parse(&path).ok_or(AdminError::NotFound)?;
        let write = !matches!(*req.method(), Method::GET | Method::HEAD);
        self.hosts
            .check_host(req.headers())
            .and_then(|()| self.hosts.check_same_origin(req.headers()))
            .map_err(AdminError::Browser)?;
        if self.api_key.is_some() || write {
            self.check_key(req.headers())?;
        } else if !peer.0.ip().to_canonical().is_loopback() {
            return Err(AdminError::Forbidden(
                "without admin.api_key the subjects API answers loopback only",
            ));
        }
        let (name, subject, connect) = match call {
            Call::List { client } => (client, None, false),
            Call::One { client, subject } => (client, Some(subject), false),
            Call::Connect { client, subject } => (client, Some(subject), true),
        };
        let subjects = self.subjects_of(name)?;
        let Some(subject) = subject else {
            if write {
                return Err(AdminError::MethodNotAllowed);
            }
            return self.list(name, &subjects, req.uri().query()).await;
        };
        if !is_valid_subject(subject) {
            return Err(AdminError::BadSubject);
        }
        if connect {
            if *req.method() != Method::POST {
                return Err(AdminError::MethodNotAllowed);
            }
            return self.connect_link(name, subject, req).await;
        }
        match *req.method() {
            Method::GET | Method::HEAD => self.show(name, &subjects, subject).await,
            Method::PUT => self.import(name, &subjects, subject, req).await,
            Method::DELETE => self.forget(name, &subjects, subject).await,
            _ => Err(AdminError::MethodNotAllowed),
        }
    }

    fn subjects_of(&self, name: &str) -> Result<Subjects, AdminError> {
        let clients = self.clients.load();
        let client = clients
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| AdminError::NoSuchClient(name.to_owned()))?;
        client
            .subjects
            .clone()
            .ok_or_else(|| AdminError::NoSubjects(name.to_owned()))
    }

    async fn list(
        &self,
        name: &str,
        subjects: &Subjects,
        query: Option<&str>,
    ) -> Result<Response<Body>, AdminError> {
        let mut state = None;
        let mut after = None;
        let mut limit = DEFAULT_PAGE;
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*k {
                "state" => {
                    state = Some(SubjectStatus::parse(&v).ok_or(AdminError::BadRequest(
                        "state must be valid or needs_authorization",
                    ))?)
                }
                "after" if is_valid_subject(&v) => after = Some(v.into_owned()),
                "after" => return Err(AdminError::BadSubject),
                "limit" => {
                    limit = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_PAGE).contains(n))
                        .ok_or(AdminError::BadRequest("limit must be 1 to 1000"))?
                }
                _ => return Err(AdminError::BadRequest("unknown query parameter")),
            }
        }
        let mut page = subjects
            .store()
            .list(state, after.as_deref(), limit + 1)
            .await
            .map_err(|e| AdminError::Busy(format!("the store cannot be read: {e}")))?;
        let next = (page.len() > limit).then(|| {
            page.truncate(limit);
            page.last().map(|(s, _)| s.clone())
        });
        let items: Vec<_> = page
            .iter()
            .map(|(subject, meta)| describe(subject, meta, None))
            .collect();
        Ok(json_response(
            StatusCode::OK,
            &json!({"client": name, "subjects": items, "next": next.flatten()}),
        ))
    }

    async fn show(
        &self,
        name: &str,
        subjects: &Subjects,
        subject: &str,
    ) -> Result<Response<Body>, AdminError> {
        let loaded = subjects
            .store()
            .get(subject)
            .await
            .map_err(|e| AdminError::Busy(format!("the store cannot be read: {e}")))?;
        match loaded {
            SubjectLoad::Missing => Ok(subject_unknown(name, subject)),
            SubjectLoad::NotOpened { problem, .. } => Ok(json_response(
                StatusCode::OK,
                &json!({"client": name, "subject": subject, "state": "unreadable", "problem": problem}),
            )),
            SubjectLoad::Found(record) => {
                let mut value = describe(subject, &record.meta, Some(subjects.is_cached(subject)));
                value["client"] = json!(name);
                Ok(json_response(StatusCode::OK, &value))
            }
        }
    }

    async fn import(
        &self,
        name: &str,
        subjects: &Subjects,
        subject: &str,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, AdminError> {
        let body = Limited::new(req.into_body(), MAX_IMPORT_BYTES)
            .collect()
            .await
            .map_err(|_| AdminError::BadRequest("body unreadable or over 64 KiB"))?
            .to_bytes();
        let import: Import = serde_json::from_slice(&body).map_err(|_| {
            AdminError::BadRequest(
                "the body must be JSON: {\"refresh_token\": …, \"access_token\": …, \"expires_in\" or \"expires_at\": …}",
            )
        })?;
        let printable = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic());
        if !printable(&import.refresh_token)
            || import
                .access_token
                .as_deref()
                .is_some_and(|t| !printable(t))
        {
            return Err(AdminError::BadRequest(
                "tokens must be non-empty printable ASCII",
            ));
        }
        let now = subjects.wall_now();
        let lifetime = match (import.expires_in, &import.expires_at) {
            (Some(s), _) => Some(Duration::from_secs(s)),
            (None, Some(at)) => Some(expiry(at, now)?),
            (None, None) => None,
        };
        // With [dpop], the subject's tokens are bound to its own key: an access
        // token obtained elsewhere is bound to none of ours and is not kept
        // (the first request refreshes, with the subject's key).
        let key = subjects
            .key_for_new_tokens(subject)
            .await
            .map_err(AdminError::Busy)?;
        let access = import
            .access_token
            .filter(|_| key.is_none())
            .map(|t| (Secret::new(t), lifetime));
        for _attempt in 0..3 {
            let (previous, connected_at) = match subjects.store().get(subject).await {
                Ok(SubjectLoad::Missing) => (0, None),
                Ok(SubjectLoad::Found(r)) => (r.generation, Some(from_ms(r.meta.connected_at_ms))),
                Ok(SubjectLoad::NotOpened { generation, .. }) => (generation, None),
                Err(e) => return Err(AdminError::Busy(format!("the store cannot be read: {e}"))),
            };
            let record = subjects.new_record(
                previous,
                access.clone(),
                Some(Secret::new(import.refresh_token.clone())),
                import.refresh_token_expires_in.map(Duration::from_secs),
                connected_at,
                key.as_ref().map(|(stored, _)| stored.clone()),
            );
            match subjects.store().put(subject, &record).await {
                Ok(Saved::Written) => {
                    subjects.forget(subject).await;
                    let status = if previous == 0 {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    };
                    tracing::info!(client = %name, subject, "subject imported");
                    return Ok(json_response(
                        status,
                        &json!({"client": name, "subject": subject, "state": "valid"}),
                    ));
                }
                Ok(Saved::Stale { .. }) => continue,
                Err(e) => {
                    return Err(AdminError::Busy(format!(
                        "the store cannot be written: {e}"
                    )))
                }
            }
        }
        Err(AdminError::Busy(
            "the subject's record keeps changing; try again".to_owned(),
        ))
    }

    async fn connect_link(
        &self,
        name: &str,
        subject: &str,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, AdminError> {
        let connect = self.connect.as_ref().ok_or(AdminError::NoConnect)?;
        let body = Limited::new(req.into_body(), MAX_CONNECT_BYTES)
            .collect()
            .await
            .map_err(|_| AdminError::BadRequest("body unreadable or over 8 KiB"))?
            .to_bytes();
        let request: ConnectRequest = if body.iter().all(u8::is_ascii_whitespace) {
            ConnectRequest::default()
        } else {
            serde_json::from_slice(&body).map_err(|_| {
                AdminError::BadRequest("the body must be empty or JSON: {\"return_to\": URL}")
            })?
        };
        let created = connect
            .create(name, subject, request.return_to.as_deref())
            .await
            .map_err(AdminError::Connect)?;
        Ok(json_response(
            StatusCode::CREATED,
            &json!({
                "client": name,
                "subject": subject,
                "url": created.url,
                "expires_at": rfc3339(created.expires_at),
            }),
        ))
    }

    async fn forget(
        &self,
        name: &str,
        subjects: &Subjects,
        subject: &str,
    ) -> Result<Response<Body>, AdminError> {
        // The refresh token revoked is the last one stored: read under the
        // subject's lease, after any refresh under way stored its rotation.
        let (deleted, refresh_token) = subjects.delete(subject).await.map_err(AdminError::Busy)?;
        if !deleted {
            return Ok(subject_unknown(name, subject));
        }
        let revoked = match (refresh_token, &subjects.config().revoke_url) {
            (Some(token), Some(url)) => Some(subjects.revoke(url, &token).await),
            _ => None,
        };
        tracing::info!(client = %name, subject, revoked = ?revoked.as_ref().map(|r| r.is_ok()), "subject deleted");
        let revoked = match revoked {
            None => json!(null),
            Some(Ok(())) => json!(true),
            Some(Err(e)) => json!({"error": e}),
        };
        Ok(json_response(
            StatusCode::OK,
            &json!({"client": name, "subject": subject, "deleted": true, "revoked": revoked}),
        ))
    }
}

/// A subject's state as the API shows it (never a token).
fn describe(subject: &str, meta: &SubjectMeta, cached: Option<bool>) -> serde_json::Value {
    let time = |ms: Option<u64>| ms.map(|ms| rfc3339(from_ms(ms)));
    let mut value = json!({
        "subject": subject,
        "state": meta.status.as_str(),
        "connected_at": rfc3339(from_ms(meta.connected_at_ms)),
        "access_token_expires_at": time(meta.access_expires_at_ms),
        "refresh_token_expires_at": time(meta.refresh_expires_at_ms),
        "last_refresh_at": time(meta.last_refresh_at_ms),
        "last_outcome": meta.last_outcome,
        "next_renewal_at": time(meta.due_at_ms),
    });
    if let Some(reason) = &meta.reason {
        value["reason"] = json!(reason);
    }
    if let Some(cached) = cached {
        value["cached"] = json!(cached);
    }
    value
}

fn subject_unknown(client: &str, subject: &str) -> Response<Body> {
    error_response(
        StatusCode::NOT_FOUND,
        "subject_unknown",
        Some(client),
        &format!("subject {subject:?} is not connected"),
    )
}

/// An import's `expires_at`: RFC 3339 text or seconds since the epoch, as a lifetime from `now`.
fn expiry(at: &serde_json::Value, now: SystemTime) -> Result<Duration, AdminError> {
    let at = match at {
        serde_json::Value::Number(n) => n
            .as_u64()
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
        serde_json::Value::String(s) => humantime::parse_rfc3339_weak(s).ok(),
        _ => None,
    }
    .ok_or(AdminError::BadRequest(
        "expires_at must be RFC 3339 or seconds since the epoch",
    ))?;
    at.duration_since(now)
        .map_err(|_| AdminError::BadRequest("expires_at is in the past"))
}
