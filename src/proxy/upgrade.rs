//! Upgrade passthrough: an HTTP/1.1 request that asks to switch protocols
//! (`Connection: upgrade` and `Upgrade: websocket`) is forwarded like any other
//! (same route, `Host`, header rules and injected token) with the upgrade
//! headers kept, when the client lists the protocol in `upgrades`. The
//! upstream's `101` goes to the app, and the two connections then become a
//! tunnel that copies bytes both ways ([`Tunnel`]) until either side closes,
//! no byte moves for `limits.upgrade_idle_timeout`, or a drain's grace runs out.
//!
//! The handshake goes out once, on a connection of its own that is never
//! pooled (an upgraded connection belongs to its tunnel), offering only
//! HTTP/1.1 to an https upstream (an HTTP/2 connection carries no Upgrade). It
//! is neither buffered nor replayed: a 401 to it goes back to the app, counted
//! `not_replayable`, and tells the token handle, so the app's next attempt
//! meets a new token. Any other answer goes back as it came.
//!
//! An `Upgrade` naming no protocol the client lists is stripped with the other
//! hop-by-hop headers and the request is served as a plain one, as RFC 9110
//! §7.8 lets an intermediary do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::header::{CONNECTION, UPGRADE};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, info, Instrument};

use super::body::{self, Paced};
use super::{
    headers, nonce_demanded, on_unauthorized, ready_key, says_invalid_token, take_token,
    ClientRuntime, Exchange,
};
use super::{Outgoing, ACCESS_LOG};
use crate::error::ProxyError;
use crate::http::client::UpgradeConnector;
use crate::metrics::{ClientMetrics, RetryOutcome, UpgradeOutcome};
use crate::server::UpgradeHold;
use crate::token::dpop::DPOP_HEADER;

/// Each direction of a tunnel reads into a buffer of this size (tokio's own
/// copy uses the same).
const TUNNEL_BUFFER: usize = 8 * 1024;

/// A client's upgrade passthrough: the protocols it forwards and how it
/// reaches the upstream for them.
pub struct Upgrades {
    /// Protocol names, lower case.
    protocols: Vec<String>,
    connector: UpgradeConnector,
    /// `scheme://authority/`: where the connector connects.
    target: Uri,
    idle_timeout: Duration,
}

impl Upgrades {
    /// Forwards `protocols` (lower-case names, not empty) to `scheme://authority`
    /// through `connector`; tunnels close after `idle_timeout` without a byte.
    pub fn new(
        protocols: Vec<String>,
        connector: UpgradeConnector,
        scheme: Scheme,
        authority: http::uri::Authority,
        idle_timeout: Duration,
    ) -> Self {
        let mut target = http::uri::Parts::default();
        target.scheme = Some(scheme);
        target.authority = Some(authority);
        target.path_and_query = Some(PathAndQuery::from_static("/"));
        Upgrades {
            protocols,
            connector,
            target: Uri::from_parts(target).expect("scheme, authority and / make a valid URI"),
            idle_timeout,
        }
    }

    /// The configured name of a protocol token (`name` or `name/version`).
    fn listed(&self, token: &str) -> Option<&str> {
        listed(&self.protocols, token)
    }
}

fn listed<'a>(protocols: &'a [String], token: &str) -> Option<&'a str> {
    let name = token.split('/').next().unwrap_or(token).trim();
    protocols
        .iter()
        .find(|p| p.eq_ignore_ascii_case(name))
        .map(String::as_str)
}

/// What a request asks for.
pub(super) enum Asked {
    /// No upgrade (by far the most requests).
    Nothing,
    /// An upgrade to no protocol the client lists.
    NotAllowed,
    /// An upgrade the client forwards.
    Allowed(Offer),
}

/// The protocols of an upgrade request that the client forwards.
pub(super) struct Offer {
    /// The `Upgrade` value sent upstream: the app's tokens the client lists, in
    /// the app's order of preference.
    header: HeaderValue,
    /// The configured name of the app's first choice (the metric label until
    /// the upstream picks one).
    first: String,
}

/// What the request in `parts` asks for. Only an HTTP/1.1 request whose
/// connection the server can hand over (it carries an [`UpgradeHold`]) and
/// that lists `upgrade` in `Connection` (RFC 9110 §7.8) asks for an upgrade.
pub(super) fn asked(upgrades: Option<&Upgrades>, parts: &http::request::Parts) -> Asked {
    if parts.extensions.get::<UpgradeHold>().is_none()
        || parts.version != Version::HTTP_11
        || !connection_lists_upgrade(&parts.headers)
        || !parts.headers.contains_key(UPGRADE)
    {
        return Asked::Nothing;
    }
    let Some(upgrades) = upgrades else {
        return Asked::NotAllowed;
    };
    offer(&upgrades.protocols, &parts.headers)
}

/// The part of the app's `Upgrade` that `protocols` allows.
fn offer(protocols: &[String], headers: &HeaderMap) -> Asked {
    let mut kept: Vec<&str> = Vec::new();
    let mut first = None;
    let tokens = headers
        .get_all(UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    for token in tokens {
        if let Some(name) = listed(protocols, token) {
            first.get_or_insert(name);
            kept.push(token);
        }
    }
    match (first, HeaderValue::from_str(&kept.join(", "))) {
        (Some(first), Ok(header)) => Asked::Allowed(Offer {
            header,
            first: first.to_owned(),
        }),
        _ => Asked::NotAllowed,
    }
}

fn connection_lists_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
}

/// The app's side of an upgrade request: hyper's hand-over of its connection,
/// and what the connection keeps of its listener.
pub(super) struct AppSide {
    on_upgrade: OnUpgrade,
    hold: Option<UpgradeHold>,
}

impl AppSide {
    /// Takes both out of the request's extensions; `None` when hyper cannot
    /// hand the connection over.
    pub(super) fn take(extensions: &mut http::Extensions) -> Option<Self> {
        Some(AppSide {
            on_upgrade: extensions.remove::<OnUpgrade>()?,
            hold: extensions.remove::<UpgradeHold>(),
        })
    }
}

/// What one upgrade request needs besides the client.
pub(super) struct Handshake<'a> {
    pub(super) outgoing: Outgoing,
    pub(super) body: Incoming,
    pub(super) app: AppSide,
    pub(super) offer: Offer,
    pub(super) subject: Option<&'a str>,
    pub(super) request_id: &'a HeaderValue,
}

/// Forwards an upgrade request to the upstream; a `101` opens a tunnel, any
/// other answer is returned as it came.
pub(super) async fn forward(
    client: &ClientRuntime,
    upgrades: &Upgrades,
    handshake: Handshake<'_>,
    exchange: &mut Exchange,
) -> Result<Response<Body>, ProxyError> {
    let Handshake {
        mut outgoing,
        body,
        app,
        offer,
        subject,
        request_id,
    } = handshake;
    let result = send(
        client,
        upgrades,
        &mut outgoing,
        body,
        &offer,
        subject,
        exchange,
    )
    .await;
    let mut response = match result {
        Ok(response) => response,
        Err(e) => {
            client.metrics.upgrade(&offer.first, UpgradeOutcome::Failed);
            return Err(e);
        }
    };
    exchange.upstream_status = Some(response.status().as_u16());
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        client
            .metrics
            .upgrade(&offer.first, UpgradeOutcome::Refused);
        let (mut parts, incoming) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::strip_sidecar_headers(&mut parts.headers);
        return Ok(Response::from_parts(parts, body::incoming(incoming)));
    }
    // RFC 9110 §7.8: the 101 names the protocol switched to, one the app offered.
    let chosen = response.headers().get(UPGRADE).cloned();
    let protocol = chosen
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|token| {
            let name = upgrades.listed(token)?;
            offered(&outgoing.headers, token).then(|| name.to_owned())
        });
    let (Some(chosen), Some(protocol)) = (chosen, protocol) else {
        client.metrics.upgrade(&offer.first, UpgradeOutcome::Failed);
        return Err(ProxyError::UpstreamUnreachable {
            upstream: client.upstream_display.clone(),
            detail: "the upstream switched to a protocol the app did not ask for".into(),
        });
    };
    let upstream_side = hyper::upgrade::on(&mut response);
    let (mut parts, _empty) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::strip_sidecar_headers(&mut parts.headers);
    parts
        .headers
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(UPGRADE, chosen);
    let tunnel = Tunnel {
        app,
        upstream: upstream_side,
        metrics: client.metrics.clone(),
        client: client.name.clone(),
        protocol,
        request_id: request_id.clone(),
        idle_timeout: upgrades.idle_timeout,
    };
    let span = tracing::debug_span!("tunnel", client = %client.name);
    tokio::spawn(tunnel.run().instrument(span));
    Ok(Response::from_parts(parts, body::empty()))
}

/// Whether the `Upgrade` sent upstream offered `token`'s protocol.
fn offered(sent: &HeaderMap, token: &str) -> bool {
    let name = |t: &str| t.split('/').next().unwrap_or(t).trim().to_ascii_lowercase();
    let wanted = name(token);
    sent.get_all(UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| name(t) == wanted)
}

type Body = crate::http::body::Body;

/// Sends the handshake with the token and the upgrade headers, on a new
/// connection, and waits (within the client's `timeout`) for the answer's head.
async fn send(
    client: &ClientRuntime,
    upgrades: &Upgrades,
    outgoing: &mut Outgoing,
    body: Incoming,
    offer: &Offer,
    subject: Option<&str>,
    exchange: &mut Exchange,
) -> Result<Response<Incoming>, ProxyError> {
    let token = take_token(client, subject, exchange).await?;
    ready_key(client, &token).await?;
    outgoing
        .headers
        .insert(client.inject_header.clone(), token.header.clone());
    if let Some(proof) = client.proof(outgoing, &token)? {
        outgoing.headers.insert(DPOP_HEADER.clone(), proof);
    }
    outgoing
        .headers
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    outgoing.headers.insert(UPGRADE, offer.header.clone());
    // The origin form: the connection is made to the upstream by hand.
    let uri = outgoing
        .uri
        .path_and_query()
        .map_or_else(|| PathAndQuery::from_static("/"), Clone::clone);
    let mut req = Request::new(Paced::new(body, client.pace).boxed());
    *req.method_mut() = outgoing.method.clone();
    *req.uri_mut() = Uri::from(uri);
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = outgoing.headers.clone();

    let unreachable = |detail: String| ProxyError::UpstreamUnreachable {
        upstream: client.upstream_display.clone(),
        detail,
    };
    let exchange_with_upstream = async {
        let mut connector = upgrades.connector.clone();
        let io = tower_service::Service::call(&mut connector, upgrades.target.clone())
            .await
            .map_err(|e| unreachable(crate::token::error_chain(e.as_ref())))?;
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| unreachable(crate::token::error_chain(&e)))?;
        let span = tracing::debug_span!("upstream_upgrade", client = %client.name);
        tokio::spawn(drive(conn.with_upgrades()).instrument(span));
        sender.send_request(req).await.map_err(|e| {
            if body::is_body_timeout(&e) {
                ProxyError::BodyTimeout(crate::token::error_chain(&e))
            } else {
                unreachable(crate::token::error_chain(&e))
            }
        })
    };
    let response = match tokio::time::timeout(client.timeout, exchange_with_upstream).await {
        Ok(result) => result?,
        Err(_elapsed) => {
            return Err(ProxyError::UpstreamTimeout {
                upstream: client.upstream_display.clone(),
                timeout: humantime::format_duration(client.timeout).to_string(),
            })
        }
    };
    if let Some(dpop) = &client.dpop {
        dpop.note_api_nonce(response.headers());
    }
    if client.is_unauthorized(response.status()) && nonce_demanded(client, &response) {
        // The proof lacked the API's nonce, which is kept now: the app's next
        // attempt carries it, and the token stays.
        client
            .metrics
            .unauthorized_retry(RetryOutcome::NotReplayable);
    } else if client.is_unauthorized(response.status()) {
        // Not sent again (nothing was buffered), but the app's next attempt
        // should not meet the same 401.
        let _decision = on_unauthorized(
            client,
            subject,
            &token,
            says_invalid_token(response.headers()),
        );
        client
            .metrics
            .unauthorized_retry(RetryOutcome::NotReplayable);
    }
    Ok(response)
}

/// Drives the handshake's upstream connection: its answer, and on a `101` the
/// hand-over of the connection to the tunnel (after which this ends).
async fn drive<C>(conn: C)
where
    C: std::future::Future<Output = Result<(), hyper::Error>>,
{
    if let Err(e) = conn.await {
        debug!(error = %e, "upgrade connection to the upstream ended with an error");
    }
}

/// One upgraded connection pair, copying bytes both ways.
struct Tunnel {
    app: AppSide,
    upstream: OnUpgrade,
    metrics: ClientMetrics,
    client: String,
    protocol: String,
    request_id: HeaderValue,
    idle_timeout: Duration,
}

/// Why a tunnel closed (the `ended` field of its access log line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// Both sides closed (or one did and the other followed).
    Closed,
    /// No byte either way for the idle timeout.
    Idle,
    /// The listener's drain grace ran out.
    Shutdown,
    /// A read or write failed (a side reset its connection).
    Error,
}

impl Ended {
    fn as_str(self) -> &'static str {
        match self {
            Ended::Closed => "closed",
            Ended::Idle => "idle",
            Ended::Shutdown => "shutdown",
            Ended::Error => "error",
        }
    }
}

impl Tunnel {
    async fn run(self) {
        let Tunnel {
            app,
            upstream,
            metrics,
            client,
            protocol,
            request_id,
            idle_timeout,
        } = self;
        let AppSide {
            on_upgrade,
            mut hold,
        } = app;
        // Both hand-overs complete at once: hyper writes the 101 to the app, and
        // the upstream connection's driver has read it.
        let sides = async { tokio::join!(on_upgrade, upstream) };
        let (app_io, upstream_io) = tokio::select! {
            sides = sides => match sides {
                (Ok(a), Ok(u)) => (a, u),
                (a, u) => {
                    let error = a.err().or(u.err()).map(|e| e.to_string()).unwrap_or_default();
                    debug!(error = %error, "the tunnel could not open: a side went away");
                    metrics.upgrade(&protocol, UpgradeOutcome::Failed);
                    return;
                }
            },
            () = closing(hold.as_mut()) => {
                metrics.upgrade(&protocol, UpgradeOutcome::Failed);
                return;
            }
        };
        metrics.upgrade(&protocol, UpgradeOutcome::Upgraded);
        let gauge = metrics.upgraded_connections().clone();
        gauge.inc();
        let _open = super::scopeguard(move || gauge.dec());
        let started = Instant::now();
        let moved = Moved::default();
        let ended = pump(
            app_io,
            upstream_io,
            idle_timeout,
            closing(hold.as_mut()),
            &moved,
        )
        .await;
        let elapsed = started.elapsed();
        info!(
            target: ACCESS_LOG,
            client = %client,
            request.id = %request_id.to_str().unwrap_or("-"),
            protocol = %protocol,
            duration_ms = (elapsed.as_secs_f64() * 1000.0 * 10.0).round() / 10.0,
            bytes.to_upstream = moved.to_upstream.load(Ordering::Relaxed),
            bytes.to_app = moved.to_app.load(Ordering::Relaxed),
            ended = ended.as_str(),
            "upgrade closed"
        );
    }
}

/// Resolves when the listener tells its upgraded connections to close; never
/// without a hold.
async fn closing(hold: Option<&mut UpgradeHold>) {
    match hold {
        Some(hold) => hold.closing().await,
        None => std::future::pending().await,
    }
}

/// Bytes copied each way.
#[derive(Default)]
struct Moved {
    to_upstream: AtomicU64,
    to_app: AtomicU64,
}

/// When a byte last moved either way.
struct Activity {
    since: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            since: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = self.since + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let at = last + limit;
            if Instant::now() >= at {
                return;
            }
            tokio::time::sleep_until(at).await;
        }
    }
}

/// Copies both ways until both sides have closed (an end of stream is passed
/// on as one), a side fails, nothing moves for `idle`, or `closing` resolves.
async fn pump(
    app: Upgraded,
    upstream: Upgraded,
    idle: Duration,
    closing: impl std::future::Future<Output = ()>,
    moved: &Moved,
) -> Ended {
    let (mut app_read, mut app_write) = tokio::io::split(TokioIo::new(app));
    let (mut up_read, mut up_write) = tokio::io::split(TokioIo::new(upstream));
    let activity = Activity::new();
    let both = async {
        tokio::try_join!(
            copy(&mut app_read, &mut up_write, &activity, &moved.to_upstream),
            copy(&mut up_read, &mut app_write, &activity, &moved.to_app),
        )
    };
    tokio::select! {
        copied = both => match copied {
            Ok(_) => Ended::Closed,
            Err(e) => {
                debug!(error = %e, "tunnel broke");
                Ended::Error
            }
        },
        () = activity.idle_for(idle) => Ended::Idle,
        () = closing => Ended::Shutdown,
    }
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s writing side.
async fn copy<R, W>(
    from: &mut R,
    to: &mut W,
    activity: &Activity,
    moved: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; TUNNEL_BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // The other side may still be writing (a half-close); it learns that
            // this one is done.
            if let Err(e) = to.shutdown().await {
                debug!(error = %e, "cannot pass an end of stream on");
            }
            return Ok(());
        }
        activity.touch();
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        moved.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn connection_must_list_upgrade_as_a_whole_token() {
        assert!(connection_lists_upgrade(&headers(&[(
            "connection",
            "keep-alive, Upgrade"
        )])));
        assert!(connection_lists_upgrade(&headers(&[
            ("connection", "keep-alive"),
            ("connection", "upgrade")
        ])));
        assert!(!connection_lists_upgrade(&headers(&[(
            "connection",
            "x-upgraded"
        )])));
        assert!(!connection_lists_upgrade(&headers(&[(
            "upgrade",
            "websocket"
        )])));
    }

    #[test]
    fn the_offer_keeps_the_listed_protocols_in_the_apps_order() {
        let listed = ["websocket".to_owned(), "x-chat".to_owned()];
        let with = |v: &str| headers(&[("upgrade", v)]);
        match offer(&listed, &with("foo, X-Chat/2 , WebSocket")) {
            Asked::Allowed(o) => {
                assert_eq!(o.header, "X-Chat/2, WebSocket");
                assert_eq!(o.first, "x-chat", "the label is the configured name");
            }
            _ => panic!("listed protocols should be offered"),
        }
        assert!(matches!(offer(&listed, &with("h2c")), Asked::NotAllowed));
        assert!(matches!(offer(&listed, &with(" , ")), Asked::NotAllowed));
        assert!(matches!(offer(&[], &with("websocket")), Asked::NotAllowed));
    }

    #[test]
    fn only_the_protocols_sent_count_as_offered() {
        let sent = headers(&[("upgrade", "WebSocket, x-chat/2")]);
        assert!(offered(&sent, "websocket"));
        assert!(
            offered(&sent, "x-chat/3"),
            "matched by name, whatever the version"
        );
        assert!(!offered(&sent, "h2c"));
    }
}
