//! The process as operators run it: SIGTERM drains (readiness off, no new
//! connections, in-flight requests finish, exit 0); logs are JSON when asked,
//! with one access line per request that never carries the query string.

use crate::support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::StatusCode;
use support::TestClient;
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig};

fn free_port() -> u16 {
    support::free_addr().port()
}

struct Sidecar(Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_zero() {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let (listen, admin) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("tokenproxy-lifecycle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("tokenproxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[admin]
listen = "127.0.0.1:{admin}"
[log]
format = "json"
[runtime]
workers = 2
[clients.payments]
listen = "127.0.0.1:{listen}"
upstream = "{upstream}"
[clients.payments.token]
url = "{token_url}"
client_id = "demo-client"
client_secret = "${{SECRET}}"
"#,
            upstream = api.url(),
            token_url = provider.token_url()
        ),
    )
    .expect("write config");
    let log_path = dir.join("stderr.log");
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .arg("--config")
        .arg(&config)
        .env("SECRET", "demo-secret")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("start tokenproxy");
    let mut sidecar = Sidecar(child);
    let pid = sidecar.0.id();
    let http = TestClient::new();

    let ready = support::eventually(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", admin)).is_ok()
    })
    .await;
    assert!(ready, "the admin listener comes up");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while http
        .get(&format!("http://127.0.0.1:{admin}/readyz"))
        .await
        .status
        != StatusCode::OK
    {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    #[cfg(target_os = "linux")]
    {
        // runtime.workers = 2: two proxy worker threads besides the main thread.
        let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("task list")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_owned())
            .filter(|n| n.starts_with("tokenproxy-w"))
            .collect();
        names.sort();
        assert_eq!(names, ["tokenproxy-w0", "tokenproxy-w1"]);
    }

    let slow = {
        let http = http.clone();
        tokio::spawn(async move {
            http.get(&format!(
                "http://127.0.0.1:{listen}/slow?ms=1500&card=4111111111111111"
            ))
            .await
        })
    };
    // Signal only once the sidecar holds the slow request in flight.
    let metrics_url = format!("http://127.0.0.1:{admin}/metrics");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = http.get(&metrics_url).await.text();
        if support::metric(
            &text,
            "tokenproxy_inflight_requests",
            &[("client", "payments")],
        ) == Some(1.0)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(pid, "TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let readyz = http.get(&format!("http://127.0.0.1:{admin}/readyz")).await;
    assert_eq!(
        readyz.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "readiness turns off while draining"
    );
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", listen))
            .await
            .is_err(),
        "no new connections are accepted while draining"
    );
    let slow = slow.await.expect("join");
    assert_eq!(
        slow.status,
        StatusCode::OK,
        "the in-flight request completes: {}",
        slow.text()
    );

    let status = tokio::task::spawn_blocking(move || {
        let status = sidecar.0.wait().expect("wait");
        drop(sidecar);
        status
    })
    .await
    .expect("join");
    assert_eq!(status.code(), Some(0), "exit 0 after draining");

    let logs = std::fs::read_to_string(&log_path).expect("read logs");
    let _ = std::fs::remove_dir_all(&dir);
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"))
        })
        .collect();
    let access: Vec<_> = lines.iter().filter(|l| l["message"] == "request").collect();
    assert_eq!(
        access.len(),
        1,
        "one access line per proxied request: {logs}"
    );
    assert_eq!(access[0]["path"], "/slow");
    assert_eq!(access[0]["status"], 200);
    assert_eq!(access[0]["client"], "payments");
    assert!(access[0]["request.id"].is_string());
    assert!(
        !logs.contains("4111111111111111"),
        "query strings are never logged"
    );
    assert!(
        lines.iter().any(|l| l["message"] == "token obtained"),
        "lifecycle lines are logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_good_config_and_rejects_a_bad_one_while_serving() {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let (listen, listen2, admin) = (free_port(), free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("tokenproxy-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("tokenproxy.toml");
    let client = |name: &str, port: u16| {
        format!(
            "[clients.{name}]\nlisten = \"127.0.0.1:{port}\"\nupstream = \"{}\"\n[clients.{name}.token]\nurl = \"{}\"\n\
             client_id = \"demo-client\"\nclient_secret_file = \"secret.txt\"\n",
            api.url(),
            provider.token_url()
        )
    };
    support::write_secret(&dir.join("secret.txt"), "demo-secret\n");
    let head = format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
    std::fs::write(&config, format!("{head}{}", client("one", listen))).expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tokenproxy");
    let sidecar = Sidecar(child);
    let pid = sidecar.0.id();
    let http = TestClient::new();
    let ok = |port: u16| format!("http://127.0.0.1:{port}/api/v1/payments");
    let up = support::eventually(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok()
    })
    .await;
    assert!(up);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while http.get(&ok(listen)).await.status != StatusCode::OK {
        assert!(tokio::time::Instant::now() < deadline, "never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A good change: a second client on a second port.
    std::fs::write(
        &config,
        format!("{head}{}{}", client("one", listen), client("two", listen2)),
    )
    .expect("config");
    signal(pid, "HUP");
    let added = support::eventually(Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", listen2)).is_ok()
    })
    .await;
    assert!(added, "the new listener comes up after SIGHUP");
    assert_eq!(http.get(&ok(listen2)).await.status, StatusCode::OK);

    // A bad change: rejected, logged, counted; the old configuration keeps serving.
    std::fs::write(
        &config,
        format!(
            "{head}{}\n[clients.three]\nlisten = \"nowhere\"\n",
            client("one", listen)
        ),
    )
    .expect("config");
    signal(pid, "HUP");
    let metrics_url = format!("http://127.0.0.1:{admin}/metrics");
    let mut failures = None;
    for _ in 0..100 {
        let text = http.get(&metrics_url).await.text();
        failures = support::metric(
            &text,
            "tokenproxy_config_reloads_total",
            &[("outcome", "failure")],
        );
        if failures == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(failures, Some(1.0), "the bad reload is counted");
    let text = http.get(&metrics_url).await.text();
    assert_eq!(
        support::metric(
            &text,
            "tokenproxy_config_reloads_total",
            &[("outcome", "success")]
        ),
        Some(1.0)
    );
    assert_eq!(
        http.get(&ok(listen)).await.status,
        StatusCode::OK,
        "still serving"
    );
    assert_eq!(
        http.get(&ok(listen2)).await.status,
        StatusCode::OK,
        "the last good config stays"
    );
    assert_eq!(
        provider.token_requests(),
        2,
        "no client was renewed by the reloads"
    );
    drop(sidecar);
    let _ = std::fs::remove_dir_all(&dir);
}
