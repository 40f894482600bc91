//! Subjects across replicas on Redis: three `tokenproxy` processes share the
//! subjects of one client. Each subject's token is requested once per
//! refresh for the whole fleet (single flight per subject across replicas,
//! through the subject's lease), no rotating refresh token is sent twice, and
//! every request carries the token of the subject it names (the mock API
//! refuses another merchant's token on `/merchants/ID/...`). While Redis is
//! stopped, subjects whose tokens are in memory keep being served.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use tokenproxy_mock::{MockApi, MockProvider};
use tokio::time::Instant;

use super::{
    free_addr, rotating, temp_dir, Redis, Replica, TestClient, CLIENT_ID, CLIENT_SECRET, KEY,
};

const ADMIN_KEY: &str = "replica-admin-key-51c9";

struct Market {
    provider: MockProvider,
    _api: MockApi,
    redis: Redis,
    replicas: Vec<Replica>,
    http: TestClient,
}

fn write_config(
    path: &Path,
    proxy: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    redis: &str,
    upstream: &str,
    token_url: &str,
) {
    std::fs::write(
        path,
        format!(
            r#"
[admin]
listen = "{admin}"
api_key = "{ADMIN_KEY}"

[log]
level = "info,tokenproxy::access=off"

[store]
kind = "redis"
url = "{redis}"
key_prefix = "test"
key = "{KEY}"

[clients.pos]
listen = "{proxy}"
upstream = "{upstream}"
token_wait_timeout = "8s"

[clients.pos.token]
url = "{token_url}"
grant = "refresh_token"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
timeout = "2s"

[clients.pos.subjects]
max_concurrent_token_requests = 16
max_token_requests_per_minute = 6000
"#
        ),
    )
    .expect("config");
}

impl Market {
    async fn start(name: &str, n: usize, lifetime: Duration) -> Market {
        let provider = MockProvider::start(rotating(lifetime))
            .await
            .expect("provider");
        let dir = temp_dir(name);
        let api = MockApi::start(provider.validator()).await.expect("api");
        let redis = Redis::start(dir.clone());
        let http = TestClient::new();
        let mut replicas = Vec::new();
        for i in 0..n {
            let (proxy, admin) = (free_addr(), free_addr());
            let config = dir.join(format!("replica{i}.toml"));
            write_config(
                &config,
                proxy,
                admin,
                &redis.url(),
                &api.url(),
                &provider.token_url(),
            );
            let log = dir.join(format!("replica{i}.log"));
            let child = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
                .arg("--config")
                .arg(&config)
                .env_remove("RUST_LOG")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log"))
                .spawn()
                .expect("start tokenproxy");
            replicas.push(Replica {
                child: Some(child),
                proxy,
                admin,
                log,
            });
        }
        for r in &replicas {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !(std::net::TcpStream::connect(r.admin).is_ok()
                && http.get(&format!("http://{}/readyz", r.admin)).await.status == StatusCode::OK)
            {
                assert!(
                    Instant::now() < deadline,
                    "replica never ready: {}",
                    std::fs::read_to_string(&r.log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Market {
            provider,
            _api: api,
            redis,
            replicas,
            http,
        }
    }

    /// Imports a merchant's refresh token through replica `i`'s admin API.
    async fn connect(&self, i: usize, merchant: &str) {
        let rt = self.provider.issue_refresh_token_for(merchant);
        let bearer = format!("Bearer {ADMIN_KEY}");
        let r = self
            .http
            .request(
                Method::PUT,
                &format!(
                    "http://{}/clients/pos/subjects/{merchant}",
                    self.replicas[i].admin
                ),
                &[("authorization", bearer.as_str())],
                serde_json::json!({ "refresh_token": rt })
                    .to_string()
                    .as_bytes(),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    }

    /// `workers` request loops per replica over `merchants` until `until`:
    /// (ok, failed, wrong account).
    async fn load(
        &self,
        merchants: &[String],
        workers: usize,
        until: Instant,
    ) -> (usize, usize, usize) {
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let wrong = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for (r, replica) in self.replicas.iter().enumerate() {
            for w in 0..workers {
                let proxy = replica.proxy;
                let http = self.http.clone();
                let merchants = merchants.to_vec();
                let (ok, failed, wrong) =
                    (Arc::clone(&ok), Arc::clone(&failed), Arc::clone(&wrong));
                tasks.push(tokio::spawn(async move {
                    let mut i = r * 7 + w;
                    while Instant::now() < until {
                        let merchant = &merchants[i % merchants.len()];
                        i += 1;
                        let req = http::Request::get(format!(
                            "http://{proxy}/merchants/{merchant}/payments"
                        ))
                        .header("x-tokenproxy-subject", merchant.as_str())
                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                        .expect("request");
                        match tokio::time::timeout(Duration::from_secs(10), http.try_send(req))
                            .await
                        {
                            Ok(Ok(StatusCode::OK)) => ok.fetch_add(1, Ordering::Relaxed),
                            Ok(Ok(StatusCode::FORBIDDEN)) => wrong.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }));
            }
        }
        for t in tasks {
            t.await.expect("load task");
        }
        (
            ok.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
            wrong.load(Ordering::Relaxed),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_refresh_each_subject_once_per_lifetime_and_never_mix_subjects() {
    if !super::redis_installed() {
        return;
    }
    let m = Market::start("subject-fleet", 3, Duration::from_secs(3)).await;
    let merchants: Vec<String> = (0..20).map(|i| format!("m-{i}")).collect();
    for (i, merchant) in merchants.iter().enumerate() {
        m.connect(i % 3, merchant).await;
    }
    let started = Instant::now();
    let (ok, failed, wrong) = m
        .load(&merchants, 8, started + Duration::from_secs(9))
        .await;
    let elapsed = started.elapsed();
    assert_eq!(wrong, 0, "a request carried another merchant's token");
    assert_eq!(failed, 0, "requests failed");
    assert!(ok > 200, "load ran: {ok}");
    assert_eq!(
        m.provider.refresh_token_reuse(),
        0,
        "a rotating refresh token was sent twice"
    );
    // 3 s tokens renewed 1 s ahead: one refresh per subject every ~2 s for the
    // whole fleet. Three replicas refreshing on their own would make 3x.
    let requests = m.provider.grant_requests("refresh_token");
    let per_subject = 1 + (elapsed.as_secs_f64() / 2.0).ceil() as usize;
    let allowed = merchants.len() * per_subject;
    assert!(
        requests <= allowed,
        "{requests} token requests in {elapsed:?} for {} subjects on 3 replicas (at most {allowed})",
        merchants.len()
    );
    eprintln!(
        "{ok} requests, {requests} token requests for {} subjects in {elapsed:?}",
        merchants.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_in_memory_keep_serving_while_redis_is_down() {
    if !super::redis_installed() {
        return;
    }
    let mut m = Market::start("subject-outage", 1, Duration::from_secs(60)).await;
    let merchants: Vec<String> = (0..5).map(|i| format!("m-{i}")).collect();
    for merchant in &merchants {
        m.connect(0, merchant).await;
    }
    let warm = m
        .load(&merchants, 2, Instant::now() + Duration::from_millis(300))
        .await;
    assert_eq!((warm.1, warm.2), (0, 0), "warm-up");
    m.redis.stop();
    let (ok, failed, wrong) = m
        .load(&merchants, 4, Instant::now() + Duration::from_secs(2))
        .await;
    assert_eq!(
        failed + wrong,
        0,
        "cached subjects failed while Redis was down"
    );
    assert!(ok > 50);
    // A subject never loaded is unavailable (not unknown) while the store is down.
    let r = m
        .http
        .request(
            Method::GET,
            &format!("http://{}/merchants/m-new/payments", m.replicas[0].proxy),
            &[("x-tokenproxy-subject", "m-new")],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(r.error_code(), Some("token_unavailable"));
}
