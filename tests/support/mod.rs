//! Builders for integration tests: a mock provider and API, a sidecar started
//! from a TOML template on loopback ports chosen by the OS, and a small client.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

use tokenproxy::clock::SystemClock;
use tokenproxy::config::{self, MapEnv};
use tokenproxy::workers::Workers;
use tokenproxy::{Listeners, Running};
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig};

pub const CLIENT_ID: &str = "demo-client";
pub const CLIENT_SECRET: &str = "demo-secret";

/// A sidecar in front of a mock provider and API.
pub struct Harness {
    pub provider: MockProvider,
    pub api: MockApi,
    pub running: Running,
    /// Bound proxy address (the first listener).
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub http: TestClient,
}

/// Placeholders replaced in a template: {listen} {admin} {upstream} {token_url}
/// {client_id}; `${CLIENT_SECRET}` is resolved from the injected env.
pub const ONE_CLIENT: &str = r#"
[admin]
listen = "{admin}"

[clients.payments]
listen = "{listen}"
upstream = "{upstream}"
{client_extra}

[clients.payments.token]
url = "{token_url}"
client_id = "{client_id}"
client_secret = "${CLIENT_SECRET}"
{token_extra}
"#;

pub struct Options {
    pub provider: ProviderConfig,
    pub client_extra: String,
    pub token_extra: String,
    pub template: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            provider: ProviderConfig::default(),
            client_extra: String::new(),
            token_extra: String::new(),
            template: ONE_CLIENT,
        }
    }
}

impl Options {
    pub fn lifetime(mut self, d: Duration) -> Self {
        self.provider.lifetime = d;
        self
    }
    pub fn client(mut self, extra: &str) -> Self {
        self.client_extra = extra.to_owned();
        self
    }
    pub fn token(mut self, extra: &str) -> Self {
        self.token_extra = extra.to_owned();
        self
    }
}

/// A mock provider with default settings and a mock API accepting its tokens.
pub async fn backends() -> (MockProvider, MockApi) {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("mock provider starts");
    let api = MockApi::start(provider.validator())
        .await
        .expect("mock api starts");
    (provider, api)
}

pub async fn harness(options: Options) -> Harness {
    let provider = MockProvider::start(options.provider.clone())
        .await
        .expect("mock provider starts");
    let api = MockApi::start(provider.validator())
        .await
        .expect("mock api starts");
    // Extras first, so they may use the placeholders too.
    let text = options
        .template
        .replace("{client_extra}", &options.client_extra)
        .replace("{token_extra}", &options.token_extra)
        .replace("{upstream}", &api.url())
        .replace("{token_url}", &provider.token_url())
        .replace("{client_id}", CLIENT_ID);
    let (running, proxy, admin) = start_sidecar(&text).await;
    Harness {
        provider,
        api,
        running,
        proxy,
        admin,
        http: TestClient::new(),
    }
}

/// Binds fresh ports for {listen}, {listen2}, {admin} and {connect}, fills them in, starts.
pub async fn start_sidecar(template: &str) -> (Running, SocketAddr, SocketAddr) {
    start_sidecar_env(template, MapEnv::new().var("CLIENT_SECRET", CLIENT_SECRET)).await
}

/// As [`start_sidecar`], resolving `${VAR}`s from `env`.
///
/// TOKENPROXY_TEST_WORKERS=N serves the proxy listeners on N worker threads, as
/// `tokenproxy run` does, instead of on the test's runtime.
pub async fn start_sidecar_env(template: &str, env: MapEnv) -> (Running, SocketAddr, SocketAddr) {
    let workers = std::env::var("TOKENPROXY_TEST_WORKERS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .map(|n| Workers::start(n).expect("worker threads start"));
    start_sidecar_with(template, env, workers).await
}

/// As [`start_sidecar`], with the proxy listeners served by `n` worker threads.
pub async fn start_sidecar_on_workers(
    template: &str,
    n: usize,
) -> (Running, SocketAddr, SocketAddr) {
    let env = MapEnv::new().var("CLIENT_SECRET", CLIENT_SECRET);
    let workers = Workers::start(n).expect("worker threads start");
    start_sidecar_with(template, env, Some(workers)).await
}

/// As [`start_sidecar_env`], with the proxy listeners served by `workers`,
/// which the caller started (and may have given work first, such as marking
/// their threads).
pub async fn start_sidecar_on(
    template: &str,
    env: MapEnv,
    workers: Workers,
) -> (Running, SocketAddr, SocketAddr) {
    start_sidecar_with(template, env, Some(workers)).await
}

async fn start_sidecar_with(
    template: &str,
    env: MapEnv,
    workers: Option<Workers>,
) -> (Running, SocketAddr, SocketAddr) {
    let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let proxy2 = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy2");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let connect = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind connect");
    let (p, p2, a, c) = (
        proxy.local_addr().expect("addr"),
        proxy2.local_addr().expect("addr"),
        admin.local_addr().expect("addr"),
        connect.local_addr().expect("addr"),
    );
    let text = template
        .replace("{listen}", &p.to_string())
        .replace("{listen2}", &p2.to_string())
        .replace("{admin}", &a.to_string())
        .replace("{connect}", &c.to_string());
    let config = config::from_str(&text, None, &env).expect("test config is valid");
    let mut proxies = BTreeMap::new();
    let uses2 = config.clients.iter().any(|c| c.listen == p2);
    proxies.insert(p, proxy);
    if uses2 {
        proxies.insert(p2, proxy2);
    }
    let connect = config.connect.is_some().then_some(connect);
    let listeners = Listeners {
        admin,
        proxies,
        connect,
    };
    let running = match workers {
        Some(workers) => {
            tokenproxy::start_with_workers(config, listeners, Arc::new(SystemClock), workers)
        }
        None => tokenproxy::start(config, listeners, Arc::new(SystemClock)),
    }
    .expect("sidecar starts");
    (running, p, a)
}

/// A sidecar with one client in front of `upstream` (plain http) and a default
/// mock provider: (provider, running, proxy address).
pub async fn sidecar_for_upstream(upstream: SocketAddr) -> (MockProvider, Running, SocketAddr) {
    sidecar_for_upstream_with(upstream, "").await
}

/// As [`sidecar_for_upstream`], with `top` (whole tables, such as `[limits]`)
/// before the others.
pub async fn sidecar_for_upstream_with(
    upstream: SocketAddr,
    top: &str,
) -> (MockProvider, Running, SocketAddr) {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let text = format!(
        "{top}[admin]\nlisten = \"{{admin}}\"\n[clients.payments]\nlisten = \"{{listen}}\"\nupstream = \"http://{upstream}\"\n\
         [clients.payments.token]\nurl = \"{}\"\nclient_id = \"demo-client\"\nclient_secret = \"${{CLIENT_SECRET}}\"\n",
        provider.token_url()
    );
    let (running, proxy, _) = start_sidecar(&text).await;
    (provider, running, proxy)
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn error_code(&self) -> Option<&str> {
        self.headers
            .get("x-tokenproxy-error")
            .and_then(|v| v.to_str().ok())
    }
}

#[derive(Clone)]
pub struct TestClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

impl TestClient {
    pub fn new() -> Self {
        TestClient {
            // Idle connections are dropped well before the sidecar's default idle
            // limit (10 s), so a request never races the server closing the
            // connection it picked from the pool.
            inner: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1024)
                .pool_idle_timeout(Duration::from_secs(5))
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .build_http(),
        }
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Reply {
        let response = self
            .inner
            .request(req)
            .await
            .expect("request reaches the sidecar");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body reads").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// The status, or the error when the request could not be completed (load tests).
    #[allow(dead_code)]
    pub async fn try_send(&self, req: Request<Full<Bytes>>) -> Result<StatusCode, String> {
        let response = self.inner.request(req).await.map_err(|e| e.to_string())?;
        let status = response.status();
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(status)
    }

    pub async fn get(&self, url: &str) -> Reply {
        self.send(
            Request::get(url)
                .body(Full::new(Bytes::new()))
                .expect("request builds"),
        )
        .await
    }

    pub async fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let mut builder = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        self.send(
            builder
                .body(Full::new(Bytes::copy_from_slice(body)))
                .expect("request builds"),
        )
        .await
    }
}

/// The value of one sample in Prometheus text, e.g.
/// `metric(&text, "tokenproxy_token_wait_seconds_sum", &[("client","payments")])`.
/// Imports `refresh_token` for `subject` of the client `pos` through the admin
/// listener at `admin`, as an operator does (`PUT /clients/pos/subjects/{subject}`
/// with the admin key's `authorization`).
pub async fn import_subject(
    http: &TestClient,
    admin: SocketAddr,
    authorization: &str,
    subject: &str,
    refresh_token: &str,
) -> Reply {
    http.request(
        Method::PUT,
        &format!("http://{admin}/clients/pos/subjects/{subject}"),
        &[
            ("authorization", authorization),
            ("content-type", "application/json"),
        ],
        serde_json::json!({ "refresh_token": refresh_token })
            .to_string()
            .as_bytes(),
    )
    .await
}

pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric_name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric_name != name {
            continue;
        }
        let all = labels.iter().all(|(k, v)| {
            label_text
                .split(',')
                .any(|pair| pair == format!("{k}=\"{v}\""))
        });
        if all {
            return value.parse().ok();
        }
    }
    None
}

/// The hidden inputs of a page's form (the mock provider's sign-in page), HTML-unescaped.
pub fn hidden_inputs(page: &str) -> Vec<(String, String)> {
    let unescape = |s: &str| {
        s.replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    };
    page.split("<input type=\"hidden\" name=\"")
        .skip(1)
        .filter_map(|rest| {
            let (name, rest) = rest.split_once('"')?;
            let value = rest.split_once("value=\"")?.1.split_once('"')?.0;
            Some((unescape(name), unescape(value)))
        })
        .collect()
}

/// Polls `f` every 20 ms until it is true or `within` passes.
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the sidecar's `/readyz` answers 200.
pub async fn wait_ready(h: &Harness) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = h.http.get(&format!("http://{}/readyz", h.admin)).await;
        if r.status == StatusCode::OK {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sidecar never became ready: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A new directory under the system's temporary directory, named after the
/// test (`name`), this process and a random number.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tokenproxy-test-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Writes a secret file readable by its owner only, as tokenproxy requires of
/// `*_file` secrets.
pub fn write_secret(path: &std::path::Path, content: impl AsRef<[u8]>) {
    std::fs::write(path, content).expect("write secret file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod 600 secret file");
    }
}

/// A port on 127.0.0.1 that was free a moment ago (for configs of child processes).
///
/// The listener is dropped, so the OS may offer the same port to the next bind:
/// ports already handed out in this test binary are skipped, or two tests running
/// side by side could configure the same port.
pub fn free_addr() -> SocketAddr {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let mut taken = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if taken.insert(addr.port()) {
            return addr;
        }
    }
}

/// Whether the Redis programs a group of tests starts (`redis-server`, and
/// `redis-cli` for a cluster) are on the PATH; a test returns at once when not.
///
/// A missing program never passes silently: the first test of `group` to find
/// it missing writes one `SKIPPED:` line naming the group and the program (the
/// harness still counts the tests as passed, so the line says so). It
/// goes straight to stderr, past the test harness's capture, so a plain
/// `cargo test` shows it. With `TOKENPROXY_REQUIRE_REDIS=1` (`.ci/run`, which
/// installs Redis) a missing program fails the test instead.
pub fn redis_on_path(group: &str, programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|program| !on_path(program))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{} not found on PATH (apt-get install redis-server redis-tools)",
        missing.join(" and ")
    );
    assert!(
        std::env::var_os("TOKENPROXY_REQUIRE_REDIS").is_none_or(|v| v != "1"),
        "{group} must run: {why}, and TOKENPROXY_REQUIRE_REDIS=1 makes that a failure"
    );
    static TOLD: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let first = TOLD
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(group.to_owned());
    if first {
        use std::io::Write as _;
        let line = format!(
            "SKIPPED: {group} report ok without running: {why}; \
             TOKENPROXY_REQUIRE_REDIS=1 makes this a failure\n"
        );
        // Best effort: a terminal that cannot be written to has nobody to tell.
        let _unheard = std::io::stderr().write_all(line.as_bytes());
    }
    false
}

/// Whether an executable file named `program` is in a directory of the PATH.
fn on_path(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        let candidate = dir.join(program);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(&candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        }
        #[cfg(not(unix))]
        {
            candidate.is_file()
        }
    })
}

/// Log output captured by a global subscriber installed with [`LogCapture::install`].
#[derive(Clone, Default)]
pub struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

impl LogCapture {
    /// Installs the global subscriber at `level`, writing into the returned capture.
    /// Call once per test binary.
    pub fn install(level: tracing::Level) -> LogCapture {
        let capture = LogCapture::default();
        let writer = capture.clone();
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .init();
        capture
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The configuration of a sidecar whose client `pos` holds a token per
/// subject, for `start_sidecar*` (`{admin}` and `{listen}` left to fill):
/// `admin_auth` is the admin key line, `grant` the token grant line (empty:
/// client_credentials), `client`, `subjects` and `tail` extra lines of the
/// client table, its `[subjects]` table and after them (`[connect]`,
/// `[authorize]`, `[store]`...). The client secret is `${CLIENT_SECRET}`.
pub struct PosConfig<'a> {
    pub upstream: &'a str,
    pub token_url: &'a str,
    pub admin_auth: &'a str,
    pub grant: &'a str,
    pub client: &'a str,
    pub subjects: &'a str,
    pub tail: &'a str,
}

impl PosConfig<'_> {
    pub fn text(&self) -> String {
        format!(
            r#"
[admin]
listen = "{{admin}}"
{admin_auth}

[clients.pos]
listen = "{{listen}}"
upstream = "{upstream}"
{client}

[clients.pos.token]
url = "{token_url}"
{grant}
client_id = "{CLIENT_ID}"
client_secret = "${{CLIENT_SECRET}}"

[clients.pos.subjects]
{subjects}

{tail}
"#,
            admin_auth = self.admin_auth,
            upstream = self.upstream,
            client = self.client,
            token_url = self.token_url,
            grant = self.grant,
            subjects = self.subjects,
            tail = self.tail,
        )
    }
}

/// One HTTP/1 message read off a raw socket: the head exactly as sent, and the
/// body framed by its `Content-Length` (none: empty).
#[derive(Debug)]
pub struct RawMessage {
    pub head: String,
    pub body: Vec<u8>,
}

impl RawMessage {
    /// The status code of a response head (`HTTP/1.1 413 ...`), 0 if there is none.
    pub fn status(&self) -> u16 {
        self.head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// The header lines (`Name: value`) in the order and spelling they were sent.
    pub fn header_lines(&self) -> Vec<&str> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The value of the first header named `name` (compared without case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_lines().into_iter().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads up to the end of one HTTP/1 head (`\r\n\r\n`) from `stream`, taking
/// bytes already read from `pending` first; what follows the head stays in
/// `pending`. `None` when the stream ends (or fails) first.
pub async fn read_raw_head<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
    pending: &mut Vec<u8>,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = pending.drain(..end + 4).collect();
            return Some(String::from_utf8_lossy(&head).into_owned());
        }
        let mut chunk = [0u8; 16 * 1024];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads one HTTP/1 message (head, then a `Content-Length` body) as
/// [`read_raw_head`] does. `None` when the stream ends before it is whole.
pub async fn read_raw_message<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
    pending: &mut Vec<u8>,
) -> Option<RawMessage> {
    use tokio::io::AsyncReadExt;
    let head = read_raw_head(stream, pending).await?;
    let mut message = RawMessage {
        head,
        body: Vec::new(),
    };
    let length: usize = message
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while pending.len() < length {
        let mut chunk = [0u8; 64 * 1024];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
    message.body = pending.drain(..length).collect();
    Some(message)
}
