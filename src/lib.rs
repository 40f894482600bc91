//! tokenproxy: an authenticating reverse-proxy sidecar for OAuth2-protected APIs.
//!
//! An app sends plain HTTP to a local listener; tokenproxy obtains and caches an
//! access token per configured client, injects it into every forwarded request,
//! refreshes it before expiry and after a 401, and exports Prometheus metrics.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | TOML → validated runtime types; `${VAR}` and `*_file` secrets; precise errors |
//! | [`secret`] | [`secret::Secret`]: credentials that cannot be printed |
//! | [`jose`] | compact JWS on ring: signing keys from PEM or a secret, `sign`, ids and thumbprints (a leaf) |
//! | [`clock`] | wall-clock access behind a trait (scheduling uses tokio time) |
//! | [`token`] | per-client refresher task (single flight; a state machine owning one schedule, the endpoint behind a trait), hot-path handle, response parsing |
//! | [`store`] | token state beyond one process: encrypted file, or Redis with a lease and fenced writes; subject records |
//! | [`subjects`] | one token per merchant or customer: bounded cache, single flight per subject, budget, sweeper |
//! | `http` | HTTP plumbing for the request path and token endpoints alike: body type, client builder, egress, the upstream connection and its early answers (a leaf) |
//! | [`proxy`] | routing, header rules, paced and replayable bodies, the HTTP/1.1 pool, 401 replay, `Expect: 100-continue`, `Location` rewrite, upgrade (WebSocket) tunnels |
//! | [`app`] | the running sidecar: build, reload in place, drain |
//! | `server` | accept loop with limits and graceful drain, upgraded connections included |
//! | [`workers`] | proxy worker threads, one single-threaded runtime each |
//! | `admin` | `/healthz`, `/readyz`, `/status`, `/metrics` |
//! | `metrics` | every metric family, on an owned registry, with the label sets it uses (`Trigger`, `Outcome`, `State`) |
//! | `error` | errors the sidecar answers itself, mapped once to status + code |
//! | [`operator`] | commands that talk to a running sidecar's admin listener: a new refresh token, `subjects import/list/delete/connect`; `tokenproxy token` |
//! | `origin` | which `Host` and browser origin a listener accepts (DNS rebinding, cross-site requests) |
//! | [`authorize`] | `tokenproxy authorize`: the authorization-code flow into the token store |
//! | [`connect`] | connect sessions: one-time links, the public connect listener, `/callback`, end pages |
//! | [`telemetry`] | log subscriber setup |
//! | [`signal`] | SIGTERM/SIGINT → drain |
//! | `demo` | `tokenproxy demo`: the sidecar in front of the mocks (the `tokenproxy-mock` crate, default feature `demo`) |
//!
//! The lifecycle has three phases: [`config::load`] (no sockets), [`Listeners::bind`]
//! (sockets only), and [`start`] (tasks on the caller's runtime) or
//! [`start_with_workers`] (proxy listeners on worker threads, as `tokenproxy run`
//! does), which return a [`Running`] handle that reloads on [`Running::reload`] and
//! drains on [`Running::shutdown`]. Tests bind port 0 themselves and pass the
//! listeners in.
//!
//! Imports run one way: `app` and `admin` use `proxy` and `connect`, `connect` uses `subjects`, `proxy` uses `subjects`, `token`,
//! `http` and `server` (an upgraded connection's hold on its listener), `subjects` uses `token` and `store`, `token` uses `store`, `http`, `metrics` and `config`, and nothing low
//! imports anything high (no module imports one that imports it back).

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
// The refresher's future (run -> obtain -> coordinate -> the store's async calls, each
// through an instrumented span) nests deeper than rustc's default layout query limit.
#![recursion_limit = "256"]

pub(crate) mod admin;
pub mod app;
pub mod authorize;
pub mod cli;
pub mod clock;
pub mod config;
pub mod connect;
#[cfg(feature = "demo")]
pub mod demo;
pub(crate) mod error;
pub(crate) mod http;
pub mod jose;
pub(crate) mod metrics;
pub mod operator;
pub(crate) mod origin;
pub mod proxy;
pub mod secret;
pub(crate) mod server;
pub mod signal;
pub mod store;
pub mod subjects;
pub mod telemetry;
pub mod token;
pub mod workers;

pub use app::{start, start_with_workers, Listeners, ReloadSummary, Running, StartError};
