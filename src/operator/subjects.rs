//! `tokenproxy subjects import|list|delete|connect CLIENT`: a client's subjects
//! through the running sidecar's admin API (`/clients/CLIENT/subjects...`).
//!
//! Every command goes through one pooled HTTP client, so an import of many
//! lines reuses one keep-alive connection. Nothing here prints a token: an
//! import line that is refused is reported by its line number and subject.

use std::io::{BufRead, Write};
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::{bearer, call, path_segment, unreachable, OperatorError};
use crate::secret::Secret;
use crate::subjects::is_valid_subject;

/// The largest page `list` asks for (the admin API's maximum).
const PAGE: usize = 1000;

/// The running sidecar's admin API, as one operator command uses it.
struct AdminApi {
    http: Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    authorization: Option<HeaderValue>,
}

impl AdminApi {
    /// A client for `addr`; `api_key` is sent with every call when given.
    fn new(addr: SocketAddr, api_key: Option<&Secret>) -> Result<AdminApi, OperatorError> {
        let authorization = api_key.map(|k| bearer(Some(k))).transpose()?;
        Ok(AdminApi {
            http: Client::builder(TokioExecutor::new()).build_http(),
            addr,
            authorization,
        })
    }

    /// As [`AdminApi::new`], for commands that write: they need the key.
    fn for_writes(addr: SocketAddr, api_key: Option<&Secret>) -> Result<AdminApi, OperatorError> {
        let api = AdminApi::new(addr, api_key)?;
        if api.authorization.is_none() {
            return Err(OperatorError::NoApiKey);
        }
        Ok(api)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: String,
    ) -> Result<(StatusCode, Bytes), OperatorError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/json");
        if let Some(authorization) = &self.authorization {
            req = req.header(http::header::AUTHORIZATION, authorization.clone());
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unreachable(self.addr, e))?;
        call(&self.http, self.addr, req).await
    }
}

/// The path of `client`'s subjects API, with `rest` appended.
fn subjects_path(client: &str, rest: &str) -> String {
    format!("/clients/{}/subjects{rest}", path_segment(client))
}

/// The refusal of a call, with the sidecar's answer.
fn refused(status: StatusCode, body: &[u8]) -> OperatorError {
    OperatorError::Refused {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    }
}

/// A connect link made by the running sidecar.
#[derive(Debug, Clone)]
pub struct ConnectLink {
    /// The one-time URL.
    pub url: String,
    /// When it stops working (RFC 3339).
    pub expires_at: String,
}

/// Asks the sidecar at `admin` for a one-time connect link of `subject` of
/// `client` (`POST /clients/CLIENT/subjects/SUBJECT/connect`).
pub async fn connect_link(
    admin: SocketAddr,
    api_key: Option<&Secret>,
    client: &str,
    subject: &str,
    return_to: Option<&str>,
) -> Result<ConnectLink, OperatorError> {
    let api = AdminApi::for_writes(admin, api_key)?;
    let body = match return_to {
        Some(url) => serde_json::json!({ "return_to": url }).to_string(),
        None => String::new(),
    };
    let path = subjects_path(client, &format!("/{}/connect", path_segment(subject)));
    let (status, body) = api.send(Method::POST, &path, body).await?;
    let value: Value = serde_json::from_slice(&body).unwrap_or_default();
    match (status, value["url"].as_str(), value["expires_at"].as_str()) {
        (StatusCode::CREATED, Some(url), Some(expires_at)) => Ok(ConnectLink {
            url: url.to_owned(),
            expires_at: expires_at.to_owned(),
        }),
        _ => Err(refused(status, &body)),
    }
}

/// What an import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// Subjects that were new.
    pub imported: usize,
    /// Subjects whose tokens were replaced.
    pub replaced: usize,
    /// Lines that were refused (each reported with its number).
    pub failed: usize,
}

/// Why one import line did not go in.
enum LineError {
    /// This line is wrong (or the store was busy); the others may go in.
    Line(String),
    /// The sidecar refuses every line (key, client, unreachable): stop.
    Stop(OperatorError),
}

/// `tokenproxy subjects import CLIENT`: one `PUT /clients/CLIENT/subjects/SUBJECT`
/// per JSON line of `input` (`{"subject": …, "refresh_token": …}`, optionally
/// `access_token` with `expires_in` or `expires_at`, and `refresh_token_expires_in`).
/// Refused lines are reported to `out` by number, then a summary line. A
/// refusal that no line could pass (a wrong key, no such client, the sidecar
/// gone) stops the import after the summary and is returned.
pub async fn import_subjects(
    admin: SocketAddr,
    api_key: Option<&Secret>,
    client: &str,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<ImportSummary, OperatorError> {
    let api = AdminApi::for_writes(admin, api_key)?;
    let mut summary = ImportSummary::default();
    let mut line = Vec::new();
    let mut number = 0usize;
    let mut stopped = None;
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        number += 1;
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        match import_line(&api, client, text).await {
            Ok(true) => summary.imported += 1,
            Ok(false) => summary.replaced += 1,
            Err(LineError::Line(problem)) => {
                summary.failed += 1;
                writeln!(out, "line {number}: {problem}")?;
            }
            Err(LineError::Stop(e)) => {
                summary.failed += 1;
                writeln!(out, "line {number}: stopped: {e}")?;
                stopped = Some(e);
                break;
            }
        }
    }
    writeln!(
        out,
        "imported {}, replaced {}, failed {}",
        summary.imported, summary.replaced, summary.failed
    )?;
    match stopped {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

/// Imports one line; `true` when the subject is new. Problems name the
/// subject (never a token, nor a value of the line that could be one).
async fn import_line(api: &AdminApi, client: &str, text: &[u8]) -> Result<bool, LineError> {
    let value: Value = serde_json::from_slice(text)
        .map_err(|e| LineError::Line(format!("not valid JSON (error at column {})", e.column())))?;
    let Value::Object(mut fields) = value else {
        return Err(LineError::Line(
            "not a JSON object: expected {\"subject\": …, \"refresh_token\": …}".to_owned(),
        ));
    };
    let subject = match fields.remove("subject") {
        Some(Value::String(s)) if is_valid_subject(&s) => s,
        Some(Value::String(_)) => {
            return Err(LineError::Line(
                "subject must be 1 to 128 characters of A-Za-z0-9._:@-".to_owned(),
            ))
        }
        _ => return Err(LineError::Line("no \"subject\" string".to_owned())),
    };
    if !matches!(fields.get("refresh_token"), Some(Value::String(t)) if !t.is_empty()) {
        return Err(LineError::Line(format!(
            "subject {subject}: no \"refresh_token\" string"
        )));
    }
    let path = subjects_path(client, &format!("/{}", path_segment(&subject)));
    let (status, body) = api
        .send(Method::PUT, &path, Value::Object(fields).to_string())
        .await
        .map_err(LineError::Stop)?;
    match status {
        StatusCode::CREATED => return Ok(true),
        StatusCode::OK => return Ok(false),
        _ => {}
    }
    let answer: Value = serde_json::from_slice(&body).unwrap_or_default();
    match answer["error"].as_str() {
        // About this line: its fields, or a store that was busy for it.
        Some("bad_request" | "bad_subject" | "busy") => Err(LineError::Line(format!(
            "subject {subject}: {} {}",
            status.as_u16(),
            answer["detail"].as_str().unwrap_or("refused")
        ))),
        _ => Err(LineError::Stop(refused(status, &body))),
    }
}

/// `tokenproxy subjects list CLIENT [--state S]`: every subject (of `state`,
/// when given) as one JSON line on `out`, paging through the admin API.
/// Returns how many were written.
pub async fn list_subjects(
    admin: SocketAddr,
    api_key: Option<&Secret>,
    client: &str,
    state: Option<&str>,
    out: &mut dyn Write,
) -> Result<usize, OperatorError> {
    let api = AdminApi::new(admin, api_key)?;
    let mut after: Option<String> = None;
    let mut written = 0;
    loop {
        let mut query = form_urlencoded::Serializer::new(String::new());
        if let Some(state) = state {
            query.append_pair("state", state);
        }
        if let Some(after) = &after {
            query.append_pair("after", after);
        }
        query.append_pair("limit", &PAGE.to_string());
        let path = subjects_path(client, &format!("?{}", query.finish()));
        let (status, body) = api.send(Method::GET, &path, String::new()).await?;
        let page: Value = serde_json::from_slice(&body).unwrap_or_default();
        let (StatusCode::OK, Some(items)) = (status, page["subjects"].as_array()) else {
            return Err(refused(status, &body));
        };
        for item in items {
            writeln!(out, "{item}")?;
            written += 1;
        }
        match page["next"].as_str() {
            // A cursor that does not move would page forever.
            Some(next) if after.as_deref() != Some(next) && !items.is_empty() => {
                after = Some(next.to_owned());
            }
            _ => return Ok(written),
        }
    }
}

/// `tokenproxy subjects delete CLIENT SUBJECT`: forgets the subject (the
/// sidecar revokes its refresh token when `revoke_url` is configured) and
/// says so on `out`. An unknown subject is an error.
pub async fn delete_subject(
    admin: SocketAddr,
    api_key: Option<&Secret>,
    client: &str,
    subject: &str,
    out: &mut dyn Write,
) -> Result<(), OperatorError> {
    let api = AdminApi::for_writes(admin, api_key)?;
    let path = subjects_path(client, &format!("/{}", path_segment(subject)));
    let (status, body) = api.send(Method::DELETE, &path, String::new()).await?;
    if status != StatusCode::OK {
        return Err(refused(status, &body));
    }
    let answer: Value = serde_json::from_slice(&body).unwrap_or_default();
    let revoked = match &answer["revoked"] {
        Value::Bool(true) => "; its refresh token was revoked at the provider".to_owned(),
        Value::Object(o) => format!(
            "; revoking its refresh token at the provider failed: {}",
            o.get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown error")
        ),
        _ => String::new(),
    };
    writeln!(out, "client {client}: subject {subject} deleted{revoked}")?;
    Ok(())
}
