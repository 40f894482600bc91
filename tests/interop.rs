//! Interop: the real `tokenproxy` binary in front of real OAuth2 servers.
//!
//! Each case starts one peer from `../shared/peers` (django-oauth-toolkit `dot` or
//! panva/oidc-provider `oidc`) with short access token lifetimes, runs the built
//! binary in front of the peer's protected API, drives concurrent GET and POST
//! traffic for a little over three token lifetimes, and then checks:
//!
//! * every request the app sent succeeded (GET 200, POST 201, the echo shows the
//!   right client and, for POST, the body that was sent);
//! * the peer's own log shows about one token request per lifetime, at least one
//!   renewal, and no token endpoint answer other than 200 (so no refresh token was
//!   ever used twice) apart from `use_dpop_nonce`, which is counted on its own;
//! * for DPoP clients: every token reached the API DPoP-bound with a proof that
//!   passed the API's checks (its `/healthz` counters), and a proof the sidecar
//!   made, sent to the API once more, is refused as a replay.
//!
//! The peers need python3 (with venv) and node/npm and install their own
//! dependencies, so these tests are `#[ignore]`d; `tests/interop.sh` runs them.
//! The peers directory is `$TOKENPROXY_PEERS`, else `<crate>/../shared/peers`.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Access token lifetime given to the peers (`ACCESS_TOKEN_EXPIRE_SECONDS`).
const LIFETIME_SECS: u64 = 4;
/// How long the load runs: a little over three lifetimes.
const LOAD: Duration = Duration::from_millis(13_250);
/// Concurrent app workers, each alternating GET and POST.
const WORKERS: usize = 8;
/// Longest one app request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the sidecar may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
const API_PATH: &str = "/api/v1/payments";
/// The request header naming the subject (`[clients.NAME.subjects] header`'s default).
const SUBJECT_HEADER: &str = "x-tokenproxy-subject";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

// ------------------------------------------------------------------ the cases

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn dot_client_credentials() {
    run(Case {
        name: "dot-cc",
        peer: Peer::Dot,
        peer_env: &[],
        token: Token::new("client_credentials", "sidecar-cc", "sidecar-cc-secret"),
        bootstrap_refresh_token: false,
        expect_refresh_grant: false,
        mode: Mode::Single,
    });
}

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn dot_password_rotating_refresh_token() {
    run(Case {
        name: "dot-pw-rotate",
        peer: Peer::Dot,
        peer_env: &[("ROTATE_REFRESH_TOKEN", "1")],
        token: Token::new("password", "sidecar-pw", "sidecar-pw-secret").user(),
        bootstrap_refresh_token: false,
        expect_refresh_grant: true,
        mode: Mode::Single,
    });
}

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn dot_password_refresh_token_not_rotated() {
    run(Case {
        name: "dot-pw-norotate",
        peer: Peer::Dot,
        peer_env: &[("ROTATE_REFRESH_TOKEN", "0")],
        token: Token::new("password", "sidecar-pw", "sidecar-pw-secret").user(),
        bootstrap_refresh_token: false,
        expect_refresh_grant: true,
        mode: Mode::Single,
    });
}

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn dot_password_special_secret_basic_auth() {
    run(Case {
        name: "dot-pw-special",
        peer: Peer::Dot,
        peer_env: &[],
        token: Token::new("password", "sidecar-pw-special", "Sp3c+al:secret/&=%").user(),
        bootstrap_refresh_token: false,
        expect_refresh_grant: true,
        mode: Mode::Single,
    });
}

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn oidc_client_credentials_opaque() {
    run(Case {
        name: "oidc-cc-opaque",
        peer: Peer::Oidc,
        peer_env: &[("OIDC_ACCESS_TOKEN_FORMAT", "opaque")],
        token: Token::new("client_credentials", "sidecar-cc", "sidecar-cc-secret"),
        bootstrap_refresh_token: false,
        expect_refresh_grant: false,
        mode: Mode::Single,
    });
}

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn oidc_client_credentials_jwt() {
    run(Case {
        name: "oidc-cc-jwt",
        peer: Peer::Oidc,
        peer_env: &[("OIDC_ACCESS_TOKEN_FORMAT", "jwt")],
        token: Token::new("client_credentials", "sidecar-cc", "sidecar-cc-secret"),
        bootstrap_refresh_token: false,
        expect_refresh_grant: false,
        mode: Mode::Single,
    });
}

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn oidc_client_credentials_special_secret_basic_auth() {
    run(Case {
        name: "oidc-cc-special",
        peer: Peer::Oidc,
        peer_env: &[],
        token: Token::new(
            "client_credentials",
            "sidecar-cc-special",
            "Sp3c+al:secret/&=%",
        ),
        bootstrap_refresh_token: false,
        expect_refresh_grant: false,
        mode: Mode::Single,
    });
}

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn oidc_refresh_token_grant_rotating() {
    run(Case {
        name: "oidc-rt-rotate",
        peer: Peer::Oidc,
        peer_env: &[("ROTATE_REFRESH_TOKEN", "1")],
        token: Token::new("refresh_token", "sidecar-code", "sidecar-code-secret"),
        bootstrap_refresh_token: true,
        expect_refresh_grant: true,
        mode: Mode::Single,
    });
}

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn oidc_rotating_refresh_token_survives_kill_and_restart_with_file_store() {
    run(Case {
        name: "oidc-rt-restart",
        peer: Peer::Oidc,
        peer_env: &[("ROTATE_REFRESH_TOKEN", "1")],
        token: Token::new("refresh_token", "sidecar-code", "sidecar-code-secret"),
        bootstrap_refresh_token: true,
        expect_refresh_grant: true,
        mode: Mode::RestartWithFileStore,
    });
}

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers and redis-server; run tests/interop.sh"]
fn oidc_rotating_refresh_token_shared_by_two_replicas_through_redis() {
    run(Case {
        name: "oidc-rt-2-redis",
        peer: Peer::Oidc,
        peer_env: &[("ROTATE_REFRESH_TOKEN", "1")],
        token: Token::new("refresh_token", "sidecar-code", "sidecar-code-secret"),
        bootstrap_refresh_token: true,
        expect_refresh_grant: true,
        mode: Mode::TwoReplicasWithRedis,
    });
}

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn oidc_authorize_gets_the_first_refresh_token_for_a_waiting_sidecar() {
    let name = "oidc-authorize";
    let mut summary = SummaryGuard {
        name,
        printed: false,
    };
    let workdir = WorkDir::new(name);
    let (peer, peer_port, log) = start_peer(name, Peer::Oidc, &[("ROTATE_REFRESH_TOKEN", "1")]);
    let issuer = format!("http://127.0.0.1:{peer_port}");
    let (admin_port, listen_port) = (free_port(), free_port());
    let config = format!(
        r#"[admin]
listen = "127.0.0.1:{admin_port}"

[store]
kind = "file"
path = "{state}"
key = "{STORE_KEY}"

[clients.peer]
listen = "127.0.0.1:{listen_port}"
upstream = "{issuer}"

[clients.peer.token]
url = "{issuer}/token"
grant = "refresh_token"
client_id = "sidecar-code"
client_secret = "${{PEER_SECRET}}"

[clients.peer.authorize]
url = "{issuer}/auth"
redirect_uri = "{issuer}/cb"
scope = "openid offline_access payments"
params = {{ prompt = "consent" }}
"#,
        state = workdir.path.join("tokens.json").display(),
    );
    let config_path = workdir.path.join("tokenproxy.toml");
    fs::write(&config_path, config).expect("config written");
    let log_offset = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let stderr_path = workdir.path.join("tokenproxy.stderr");
    let stderr_file = File::create(&stderr_path).expect("stderr file");
    let child = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .env_remove("RUST_LOG")
        .env("PEER_SECRET", "sidecar-code-secret")
        .stdin(Stdio::null())
        .stdout(stderr_file.try_clone().expect("clone"))
        .stderr(stderr_file)
        .spawn()
        .expect("tokenproxy starts");
    let started = Instant::now();
    let mut sidecar = SidecarGuard {
        child: Some(child),
        stderr: stderr_path,
        name,
    };
    let runtime = test_runtime();
    let stats = Arc::new(Stats::default());
    let (waiting, metrics, ready_after) = runtime.block_on(async {
        let http = app_client();
        let readyz = format!("http://127.0.0.1:{admin_port}/readyz");
        // 1. no refresh token anywhere: the sidecar waits and names the command.
        let deadline = Instant::now() + READY_TIMEOUT;
        let waiting = loop {
            let text = get_text(&http, &readyz).await;
            if text.contains("needs_authorization") {
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "[{name}] never in needs_authorization: {text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // 2. the person runs authorize and logs in through oidc-provider's pages.
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
            .args([
                "authorize",
                "peer",
                "--no-listen",
                "--timeout",
                "60s",
                "--config",
            ])
            .arg(&config_path)
            .env("PEER_SECRET", "sidecar-code-secret")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tokenproxy authorize starts");
        let mut err = std::io::BufReader::new(cmd.stderr.take().expect("stderr"));
        let url = loop {
            let mut line = String::new();
            let n = std::io::BufRead::read_line(&mut err, &mut line).expect("stderr");
            assert!(n > 0, "[{name}] authorize printed no URL");
            if let Some(rest) = line.trim().strip_prefix("http") {
                break format!("http{rest}");
            }
        };
        let redirected = Browser::new(&http)
            .sign_in(&url, "alice", &format!("{issuer}/cb"))
            .await;
        {
            use std::io::Write as _;
            let stdin = cmd.stdin.as_mut().expect("stdin");
            writeln!(stdin, "{redirected}").expect("paste the redirected URL");
        }
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut rest);
        let out = cmd.wait_with_output().expect("authorize exits");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "[{name}] authorize failed: {rest}{stdout}"
        );
        eprintln!("[{name}] authorize: {}", stdout.trim().replace('\n', " | "));
        // 3. the waiting sidecar picks the tokens up from the store, no restart.
        let authorized_at = Instant::now();
        loop {
            let request = Request::get(&readyz)
                .body(Full::new(Bytes::new()))
                .expect("request");
            if let Ok(r) = http.request(request).await {
                if r.status() == StatusCode::OK {
                    break;
                }
            }
            assert!(
                authorized_at.elapsed() < Duration::from_secs(10),
                "[{name}] the sidecar did not become ready after authorize"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ready_after = authorized_at.elapsed();
        drive_load(&http, &[listen_port], "sidecar-code", false, LOAD, &stats).await;
        let metrics = get_text(&http, &format!("http://127.0.0.1:{admin_port}/metrics")).await;
        (waiting, metrics, ready_after)
    });
    drop(runtime);
    let exit = sidecar.stop();
    let elapsed = started.elapsed();
    let calls = count_token_calls(Peer::Oidc, &read_from(&log, log_offset));
    let requests = stats.sent.load(Ordering::Relaxed);
    let failures = stats.failed.load(Ordering::Relaxed);
    let refresh_grants = metric_sum(
        &metrics,
        "tokenproxy_token_refreshes_total",
        &[("grant", "refresh_token"), ("outcome", "success")],
    );
    eprintln!(
        "[{name}] ready {:.2} s after authorize; requests {requests}, failures {failures}; token calls {} ({} answered 200); exit {exit:?}",
        ready_after.as_secs_f64(),
        calls.total,
        calls.ok
    );
    let mut problems = Vec::new();
    if !waiting.contains("tokenproxy authorize peer --config") {
        problems.push(format!("/readyz did not name the command: {waiting}"));
    }
    if requests == 0 || failures > 0 {
        problems.push(format!("{failures} of {requests} app requests failed"));
    }
    if !calls.bad.is_empty() {
        problems.push(format!(
            "token endpoint answers other than 200: {:?}",
            calls.bad
        ));
    }
    if refresh_grants < 1.0 {
        problems.push("the stored refresh token was never used to refresh".to_owned());
    }
    let verdict = if problems.is_empty() { "PASS" } else { "FAIL" };
    eprintln!(
        "INTEROP | {:<16} | {:>8} | {:>8} | {:>6} / {:<5} | {:>8} | {:>9} | {:>6.1} s | {verdict}",
        name,
        requests,
        failures,
        calls.total,
        "-",
        refresh_grants as u64,
        0,
        elapsed.as_secs_f64(),
    );
    summary.printed = true;
    if !problems.is_empty() {
        sidecar.print_tail();
        panic!("[{name}] {}", problems.join("; "));
    }
    drop(sidecar);
    drop(peer);
    workdir.remove();
}

// ------------------------------------------------------------------ client authentication

/// The peer checks every client assertion more strictly than oidc-provider's own
/// rules: `sub` = `iss`, an `iat`, and `exp - iat` at most this many seconds.
const ASSERTION_MAX_SECONDS: &str = "60";
/// `sidecar-csjwt`'s secret in the peer's clients table.
const CSJWT_SECRET: &str =
    "sidecar-csjwt-secret-for-HS256-and-HS512-0123456789abcdefghijklmnopqrstuv";

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn oidc_private_key_jwt_rs256() {
    run(assertion_case(
        "oidc-pkjwt-rs256",
        Token::new("client_credentials", "sidecar-pkjwt", "").auth(Auth::PrivateKey {
            key: "rs256",
            alg: "RS256",
            kid: true,
            issuer_audience: false,
        }),
    ));
}

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn oidc_private_key_jwt_ps256_without_kid() {
    run(assertion_case(
        "oidc-pkjwt-ps256",
        Token::new("client_credentials", "sidecar-pkjwt", "").auth(Auth::PrivateKey {
            key: "rs256",
            alg: "PS256",
            kid: false,
            issuer_audience: false,
        }),
    ));
}

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn oidc_private_key_jwt_es256_issuer_audience() {
    run(assertion_case(
        "oidc-pkjwt-es256",
        Token::new("client_credentials", "sidecar-pkjwt", "").auth(Auth::PrivateKey {
            key: "es256",
            alg: "ES256",
            kid: true,
            issuer_audience: true,
        }),
    ));
}

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn oidc_private_key_jwt_eddsa() {
    run(assertion_case(
        "oidc-pkjwt-eddsa",
        Token::new("client_credentials", "sidecar-pkjwt", "").auth(Auth::PrivateKey {
            key: "ed25519",
            alg: "EdDSA",
            kid: true,
            issuer_audience: false,
        }),
    ));
}

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn oidc_client_secret_jwt_hs256() {
    run(assertion_case(
        "oidc-csjwt-hs256",
        Token::new("client_credentials", "sidecar-csjwt", CSJWT_SECRET)
            .auth(Auth::SecretJwt { alg: "HS256" }),
    ));
}

#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn oidc_tls_client_auth() {
    run(assertion_case(
        "oidc-mtls",
        Token::new("client_credentials", "sidecar-mtls", "").auth(Auth::Tls),
    ));
}

/// A JWT made outside the sidecar (as a projected service-account token is),
/// signed here with the peer's Ed25519 key and rewritten every 250 ms: the
/// peer accepts each jti once, so the sidecar must read the file again for
/// every token request.
#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn oidc_client_assertion_file() {
    run(assertion_case(
        "oidc-assert-file",
        Token::new("client_credentials", "sidecar-pkjwt", "").auth(Auth::File),
    ));
}

// ------------------------------------------------------------------ DPoP

/// The peer demands DPoP nonces at its token endpoint and at its API, whose
/// nonce changes every 2 s (each good for 2 to 4 s): the sidecar keeps both
/// from every answer, and meets `use_dpop_nonce` only now and then.
const DPOP_NONCES: &[(&str, &str)] = &[
    ("OIDC_DPOP_NONCE", "1"),
    ("API_DPOP_NONCE", "1"),
    ("API_DPOP_NONCE_SECONDS", "2"),
    ("OIDC_ASSERTION_MAX_SECONDS", ASSERTION_MAX_SECONDS),
];

/// `sidecar-dpop` (client secret; every token DPoP-bound) with an ES256 key.
#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn oidc_dpop_es256_with_nonces() {
    run(dpop_case(
        "oidc-dpop-es256",
        Token::new("client_credentials", "sidecar-dpop", "sidecar-dpop-secret").dpop("ES256"),
    ));
}

/// FAPI 2.0 as a card network asks for it: `private_key_jwt` and DPoP-bound
/// tokens (`sidecar-fapi`), here with an EdDSA DPoP key. A challenged token
/// request has spent its assertion: the retry carries a new one.
#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers; run tests/interop.sh"]
fn oidc_fapi_private_key_jwt_and_dpop_eddsa() {
    run(dpop_case(
        "oidc-fapi-dpop",
        Token::new("client_credentials", "sidecar-fapi", "")
            .auth(Auth::PrivateKey {
                key: "es256",
                alg: "ES256",
                kid: true,
                issuer_audience: true,
            })
            .dpop("EdDSA"),
    ));
}

fn dpop_case(name: &'static str, token: Token) -> Case {
    Case {
        name,
        peer: Peer::Oidc,
        peer_env: DPOP_NONCES,
        token,
        bootstrap_refresh_token: false,
        expect_refresh_grant: false,
        mode: Mode::Single,
    }
}

/// Sends a proof the sidecar made once more, straight to the peer's API (as
/// someone who copied it from the wire would): the API must refuse it as a
/// replay. The proof comes from the echo of a request through the sidecar.
async fn replay_a_proof(http: &HttpClient, listen_port: u16, peer_port: u16) -> (u16, String) {
    let via_sidecar = get_text(http, &format!("http://127.0.0.1:{listen_port}{API_PATH}")).await;
    let echo: Value = serde_json::from_str(&via_sidecar).unwrap_or(Value::Null);
    let Some(proof) = echo["headers"]["dpop"].as_str() else {
        return (0, format!("no proof in the echo: {via_sidecar}"));
    };
    // The token is not needed: the API refuses a seen jti before it looks at ath.
    let request = Request::get(format!("http://127.0.0.1:{peer_port}{API_PATH}"))
        .header("authorization", "DPoP copied-token")
        .header("dpop", proof)
        .body(Full::new(Bytes::new()))
        .expect("request builds");
    match http.request(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.map(|b| b.to_bytes());
            let text = body.map_or_else(
                |e| e.to_string(),
                |b| String::from_utf8_lossy(&b).into_owned(),
            );
            (status, text)
        }
        Err(e) => (0, e.to_string()),
    }
}

/// What the peer's DPoP counters (read before the replay) and the replay say
/// is wrong.
fn dpop_problems(health: &str, replay: Option<&(u16, String)>) -> Vec<String> {
    let mut problems = Vec::new();
    let counters: Value = serde_json::from_str(health).unwrap_or(Value::Null);
    let count = |name: &str| counters[name].as_u64().unwrap_or(0);
    if count("dpop_ok") == 0 {
        problems.push("the API never accepted a DPoP proof".to_owned());
    }
    // Nonce challenges are DPoP refusals too; any other is a bad proof.
    let refused = count("dpop_rejected").saturating_sub(count("dpop_nonce_challenges"));
    if refused > 0 {
        problems.push(format!("the API refused {refused} proof(s) or binding(s)"));
    }
    if count("dpop_replayed") > 0 {
        problems.push("the API saw a proof twice from the sidecar".to_owned());
    }
    match replay {
        Some((401, text)) if text.contains("replayed") => {}
        Some((status, text)) => problems.push(format!(
            "a copied proof was not refused as a replay: {status} {text}"
        )),
        None => problems.push("no proof was replayed".to_owned()),
    }
    problems
}

fn assertion_case(name: &'static str, token: Token) -> Case {
    Case {
        name,
        peer: Peer::Oidc,
        peer_env: &[("OIDC_ASSERTION_MAX_SECONDS", ASSERTION_MAX_SECONDS)],
        token,
        bootstrap_refresh_token: false,
        expect_refresh_grant: false,
        mode: Mode::Single,
    }
}

// ------------------------------------------------------------------ subjects

/// Subjects connected through connect links in the subjects case.
const SUBJECTS: usize = 50;
/// Replicas sharing Redis in the subjects case.
const SUBJECT_REPLICAS: usize = 3;
/// How long the subjects case drives load: five lifetimes.
const SUBJECT_LOAD: Duration = Duration::from_secs(20);
/// Concurrent app workers in the subjects case.
const SUBJECT_WORKERS: usize = 12;
/// Browsers connecting subjects at the same time.
const BROWSERS: usize = 5;
/// How long before expiry the sidecar renews a 4 s token (a tenth of the
/// lifetime, at least 1 s).
const MARGIN_SECS: f64 = 1.0;
/// The admin API's bearer key in the subjects case.
const ADMIN_KEY: &str = "interop-admin-key-7f3a91";

/// Issue 16's acceptance measurement: 50 subjects of one client connected
/// through real connect links (oidc-provider's login and consent pages driven
/// like a browser, signing in as the subject), three replicas sharing Redis,
/// rotating refresh tokens with reuse detection, 4 s tokens, then load across
/// every subject on every replica. Every answer's `sub` (the API's own reading
/// of the token) must be the subject the app named, no request may fail, no
/// token request may be refused (a reused refresh token revokes the grant),
/// and the token requests must stay near one per lifetime per subject.
#[test]
#[ignore = "needs the OAuth2 peers in ../shared/peers and redis-server; run tests/interop.sh"]
fn oidc_fifty_subjects_connected_by_links_on_three_replicas_through_redis() {
    let name = "oidc-subjects-50";
    let mut summary = SummaryGuard {
        name,
        printed: false,
    };
    let workdir = WorkDir::new(name);
    let ports: Vec<ReplicaPorts> = (0..SUBJECT_REPLICAS)
        .map(|_| ReplicaPorts {
            admin: free_port(),
            listen: free_port(),
            connect: free_port(),
        })
        .collect();
    // Each replica has its own connect listener; browsers use one public
    // address (the first listener's), as they would an ingress in front of all
    // three, and the test routes each request to the replica it chooses.
    let public_url = format!("http://127.0.0.1:{}", ports[0].connect);
    let callback = format!("{public_url}/callback");
    let (peer, peer_port, log) = start_peer(
        name,
        Peer::Oidc,
        &[
            ("ROTATE_REFRESH_TOKEN", "1"),
            ("OIDC_REDIRECT_URIS", &callback),
        ],
    );
    let issuer = format!("http://127.0.0.1:{peer_port}");
    let redis = RedisGuard::start(&workdir.path);
    // Where the person lands after connecting (never fetched).
    let return_base = format!("http://127.0.0.1:{}/connected/", free_port());
    let started = Instant::now();
    let mut sidecars: Vec<SidecarGuard> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let config = subjects_config(p, redis.port, &issuer, &public_url, &return_base);
            let path = workdir.path.join(format!("tokenproxy-{i}.toml"));
            fs::write(&path, config).expect("config written");
            spawn_sidecar(
                name,
                &path,
                &workdir.path.join(format!("tokenproxy-{i}.stderr")),
            )
        })
        .collect();
    let onboard_offset = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let subjects: Arc<Vec<String>> = Arc::new(
        (0..SUBJECTS)
            .map(|i| format!("merchant-{i:02}@pos.example"))
            .collect(),
    );
    let runtime = test_runtime();
    let stats = Arc::new(Stats::default());
    let last = Arc::new(Stats::default());
    let run = runtime.block_on(async {
        let http = app_client();
        for (sidecar, p) in sidecars.iter_mut().zip(&ports) {
            wait_ready(&http, p.admin, sidecar).await;
        }
        eprintln!(
            "[{name}] {SUBJECT_REPLICAS} replicas ready after {:.2} s; connecting {SUBJECTS} subjects with {BROWSERS} browsers",
            started.elapsed().as_secs_f64()
        );

        // 1. every subject connected through its own link
        let onboarding = Arc::new(Onboarding {
            http: http.clone(),
            subjects: Arc::clone(&subjects),
            admin_ports: ports.iter().map(|p| p.admin).collect(),
            connect_ports: ports.iter().map(|p| p.connect).collect(),
            public_url: public_url.clone(),
            callback: callback.clone(),
            issuer: issuer.clone(),
            return_base: return_base.clone(),
        });
        let t0 = Instant::now();
        let next = Arc::new(AtomicU64::new(0));
        let crossed = Arc::new(AtomicU64::new(0));
        let browsers: Vec<_> = (0..BROWSERS)
            .map(|_| {
                let (onboarding, next, crossed) =
                    (Arc::clone(&onboarding), Arc::clone(&next), Arc::clone(&crossed));
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        if i >= SUBJECTS {
                            break;
                        }
                        if onboarding.connect(i).await {
                            crossed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for browser in browsers {
            browser.await.expect("every subject connects through its link");
        }
        let onboarded_in = t0.elapsed();
        let valid = list_subjects(&http, ports[SUBJECT_REPLICAS - 1].admin, "valid").await;
        eprintln!(
            "[{name}] {SUBJECTS} subjects connected in {:.2} s ({} of them across replicas: link made, opened and called back on different ones); {} valid in the store",
            onboarded_in.as_secs_f64(),
            crossed.load(Ordering::Relaxed),
            valid.len()
        );
        let mut missing: Vec<&String> = subjects.iter().filter(|s| !valid.contains(s)).collect();
        missing.truncate(5);
        assert!(
            missing.is_empty(),
            "[{name}] connected subjects not valid in the store: {missing:?}"
        );

        // 2. load across every subject on every replica, then each once more everywhere
        let load_offset = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let load_started = Instant::now();
        let listen_ports: Vec<u16> = ports.iter().map(|p| p.listen).collect();
        let served = subject_load(&http, &listen_ports, &subjects, SUBJECT_LOAD, &stats).await;
        let mut seq = 0;
        for subject in subjects.iter() {
            for port in &listen_ports {
                seq += 1;
                let app = App {
                    client_id: "sidecar-code",
                    subject: Some(subject),
                    dpop: false,
                };
                let url = format!("http://127.0.0.1:{port}{API_PATH}");
                one_request(&http, &url, &app, 0, seq, &last).await;
            }
        }
        let load_elapsed = load_started.elapsed();
        let dead = list_subjects(&http, ports[0].admin, "needs_authorization").await;
        let mut metrics = String::new();
        for p in &ports {
            metrics += &get_text(&http, &format!("http://127.0.0.1:{}/metrics", p.admin)).await;
        }
        SubjectRun {
            onboarded_in,
            crossed: crossed.load(Ordering::Relaxed),
            load_offset,
            load_elapsed,
            served,
            dead,
            metrics,
        }
    });
    drop(runtime);
    for sidecar in sidecars.iter_mut() {
        sidecar.stop();
    }
    let elapsed = started.elapsed();
    let onboarding_calls = count_token_calls(
        Peer::Oidc,
        &read_between(&log, onboard_offset, run.load_offset),
    );
    let calls = count_token_calls(Peer::Oidc, &read_from(&log, run.load_offset));

    // 3. figures
    let seconds = run.load_elapsed.as_secs_f64();
    let lifetime = LIFETIME_SECS as f64;
    let limit = (SUBJECTS as f64 * (seconds / (lifetime - MARGIN_SECS) + 2.0)).floor() as usize;
    let floor = (SUBJECTS as f64 * (seconds / lifetime - 2.0))
        .max(0.0)
        .floor() as usize;
    let requests = stats.sent.load(Ordering::Relaxed) + last.sent.load(Ordering::Relaxed);
    let failures = stats.failed.load(Ordering::Relaxed) + last.failed.load(Ordering::Relaxed);
    let checked = stats.subject_checked.load(Ordering::Relaxed)
        + last.subject_checked.load(Ordering::Relaxed);
    let wrong =
        stats.wrong_subject.load(Ordering::Relaxed) + last.wrong_subject.load(Ordering::Relaxed);
    let per_subject_minute = calls.refresh_grants as f64 / SUBJECTS as f64 / (seconds / 60.0);
    let per_subject_lifetime = calls.refresh_grants as f64 / SUBJECTS as f64 / (seconds / lifetime);
    let metric_refreshes = metric_sum(
        &run.metrics,
        "tokenproxy_token_refreshes_total",
        &[("grant", "refresh_token"), ("outcome", "success")],
    );
    let unauthorized_recovered = metric_sum(
        &run.metrics,
        "tokenproxy_unauthorized_retries_total",
        &[("outcome", "recovered")],
    );
    let least_served = run.served.iter().min().copied().unwrap_or(0);
    eprintln!(
        "[{name}] onboarding: {SUBJECTS} connect links, {} code exchanges and {} refreshes at the provider, {:.2} s, {} across replicas",
        onboarding_calls.code_grants,
        onboarding_calls.refresh_grants,
        run.onboarded_in.as_secs_f64(),
        run.crossed
    );
    eprintln!(
        "[{name}] load: {requests} requests ({:.0}/s) over {seconds:.1} s, {SUBJECT_WORKERS} workers, every subject on each of the {SUBJECT_REPLICAS} replicas (at least {least_served} answers per subject and replica), then each once more everywhere; failures {failures}; sub = the named subject in {checked} answers, another subject's in {wrong}; slowest {:.1} ms",
        requests as f64 / seconds,
        stats.max_micros.load(Ordering::Relaxed).max(last.max_micros.load(Ordering::Relaxed)) as f64 / 1000.0
    );
    eprintln!(
        "[{name}] token requests at the provider during the load: {} ({} refresh grants, {} answered 200; expected between {floor} and {limit}); {per_subject_minute:.1} per subject per minute = {per_subject_lifetime:.2} per subject per {LIFETIME_SECS} s lifetime; sidecars' refresh metric {metric_refreshes}; API 401s {}",
        calls.total,
        calls.refresh_grants,
        calls.ok,
        calls.api_unauthorized
    );
    for sample in stats
        .samples
        .lock()
        .expect("samples")
        .iter()
        .chain(last.samples.lock().expect("samples").iter())
    {
        eprintln!("[{name}]   failure: {sample}");
    }
    for bad in onboarding_calls.bad.iter().chain(&calls.bad) {
        eprintln!("[{name}]   token endpoint problem: {bad}");
    }

    let mut problems = Vec::new();
    if onboarding_calls.code_grants != SUBJECTS {
        problems.push(format!(
            "{} code exchanges for {SUBJECTS} connect links",
            onboarding_calls.code_grants
        ));
    }
    if failures > 0 {
        problems.push(format!("{failures} of {requests} app requests failed"));
    }
    if wrong > 0 {
        problems.push(format!("{wrong} answers carried another subject's token"));
    }
    if checked != requests {
        problems.push(format!(
            "the API's sub was checked in {checked} of {requests} answers"
        ));
    }
    if least_served == 0 {
        problems.push("a subject was never served by one of the replicas".to_owned());
    }
    if !onboarding_calls.bad.is_empty() || !calls.bad.is_empty() {
        problems.push(format!(
            "{} token endpoint answer(s) other than 200 or grant revocations (refresh token reuse?)",
            onboarding_calls.bad.len() + calls.bad.len()
        ));
    }
    if !run.dead.is_empty() {
        problems.push(format!(
            "{} subject(s) need authorization at the end: {:?}",
            run.dead.len(),
            run.dead.iter().take(5).collect::<Vec<_>>()
        ));
    }
    if calls.total > limit {
        problems.push(format!(
            "{} token requests in {seconds:.1} s for {SUBJECTS} subjects (limit {limit})",
            calls.total
        ));
    }
    if calls.refresh_grants < floor {
        problems.push(format!(
            "only {} refresh grants in {seconds:.1} s for {SUBJECTS} subjects of {LIFETIME_SECS} s tokens (at least {floor})",
            calls.refresh_grants
        ));
    }
    let verdict = if problems.is_empty() { "PASS" } else { "FAIL" };
    eprintln!(
        "INTEROP | {:<16} | {:>8} | {:>8} | {:>6} / {:<5} | {:>8} | {:>9} | {:>6.1} s | {verdict}",
        name,
        requests,
        failures,
        calls.total,
        limit,
        metric_refreshes as u64,
        unauthorized_recovered as u64,
        elapsed.as_secs_f64(),
    );
    summary.printed = true;
    if !problems.is_empty() {
        for sidecar in &sidecars {
            sidecar.print_tail();
        }
        panic!("[{name}] {}", problems.join("; "));
    }
    drop(sidecars);
    drop(redis);
    drop(peer);
    workdir.remove();
}

/// One replica's listeners in the subjects case.
struct ReplicaPorts {
    admin: u16,
    listen: u16,
    connect: u16,
}

/// What the subjects case measured inside its runtime.
struct SubjectRun {
    onboarded_in: Duration,
    /// Subjects whose link was made, opened and called back not all on one replica.
    crossed: u64,
    /// Where the peer's log stood when the load began.
    load_offset: u64,
    load_elapsed: Duration,
    /// Answers that passed, per subject and replica.
    served: Vec<u64>,
    /// Subjects in needs_authorization at the end.
    dead: Vec<String>,
    metrics: String,
}

fn subjects_config(
    p: &ReplicaPorts,
    redis_port: u16,
    issuer: &str,
    public_url: &str,
    return_base: &str,
) -> String {
    format!(
        r#"[admin]
listen = "127.0.0.1:{admin}"
api_key = "{ADMIN_KEY}"

[log]
level = "info,tokenproxy::access=off"

[store]
kind = "redis"
url = "redis://127.0.0.1:{redis_port}/0"
key = "{STORE_KEY}"

[clients.pos]
listen = "127.0.0.1:{listen}"
upstream = "{issuer}"

[clients.pos.token]
url = "{issuer}/token"
grant = "refresh_token"
client_id = "sidecar-code"
client_secret = "${{PEER_SECRET}}"

[clients.pos.authorize]
url = "{issuer}/auth"
scope = "openid offline_access payments"
params = {{ prompt = "consent" }}

# {SUBJECTS} subjects with {LIFETIME_SECS} s tokens, connected together, come due together: the
# budget lets all of them through well within the 1 s refresh margin (the default, 600 a
# minute, is for real lifetimes).
[clients.pos.subjects]
max_concurrent_token_requests = 8
max_token_requests_per_minute = 12000

[connect]
listen = "127.0.0.1:{connect}"
public_url = "{public_url}"
return_to = ["{return_base}"]
"#,
        admin = p.admin,
        listen = p.listen,
        connect = p.connect,
    )
}

/// Starts `tokenproxy run` with `config`, its output in `stderr`.
fn spawn_sidecar(name: &'static str, config: &Path, stderr: &Path) -> SidecarGuard {
    let file = File::create(stderr).expect("stderr file");
    let child = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .arg("run")
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .env_remove("TOKENPROXY_CONFIG")
        .env("PEER_SECRET", "sidecar-code-secret")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("stderr file clone"))
        .stderr(file)
        .spawn()
        .expect("tokenproxy starts");
    SidecarGuard {
        child: Some(child),
        stderr: stderr.to_owned(),
        name,
    }
}

/// Everything a browser connecting one subject needs to know.
struct Onboarding {
    http: HttpClient,
    subjects: Arc<Vec<String>>,
    admin_ports: Vec<u16>,
    connect_ports: Vec<u16>,
    public_url: String,
    callback: String,
    issuer: String,
    return_base: String,
}

impl Onboarding {
    /// Connects subject `i` as the app and the person would: the app's backend
    /// asks replica A's admin API for a link; the person's browser opens it
    /// (the ingress sends that to replica B), signs in at the provider as the
    /// subject and consents, and comes back to `/callback` (on replica C),
    /// ending on `return_to` with `status=connected`. A, B and C go through
    /// every combination; whether they were not all one replica.
    async fn connect(&self, i: usize) -> bool {
        let subject = &self.subjects[i];
        let n = self.connect_ports.len();
        let (made, opened, called_back) = (i % n, (i / n) % n, (i / (n * n)) % n);
        let return_to = format!("{}{subject}", self.return_base);

        let request = Request::post(format!(
            "http://127.0.0.1:{}/clients/pos/subjects/{subject}/connect",
            self.admin_ports[made]
        ))
        .header("authorization", format!("Bearer {ADMIN_KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({ "return_to": return_to }).to_string(),
        )))
        .expect("request builds");
        let response = self
            .http
            .request(request)
            .await
            .expect("the admin API answers");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(
            status,
            StatusCode::CREATED,
            "connect link for {subject}: {}",
            String::from_utf8_lossy(&body)
        );
        let created: Value = serde_json::from_slice(&body).expect("the link is JSON");
        let link = created["url"].as_str().expect("the link has a url");
        assert!(
            link.starts_with(&format!("{}/connect/", self.public_url)),
            "the link {link} is not on public_url {}",
            self.public_url
        );

        let mut browser = Browser::new(&self.http);
        let page = browser
            .visit(Method::GET, &self.via(link, opened), String::new())
            .await;
        assert!(
            page.status.is_redirection(),
            "opening the link of {subject}: {} {}",
            page.status,
            page.html
        );
        let authorize = page.location.expect("the link redirects somewhere");
        let query: std::collections::HashMap<String, String> = authorize
            .strip_prefix(&format!("{}/auth?", self.issuer))
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_else(|| {
                panic!("the link of {subject} led to {authorize}, not the provider's /auth")
            });
        for (key, want) in [
            ("client_id", "sidecar-code"),
            ("response_type", "code"),
            ("redirect_uri", self.callback.as_str()),
            ("code_challenge_method", "S256"),
            ("scope", "openid offline_access payments"),
            ("prompt", "consent"),
        ] {
            assert_eq!(
                query.get(key).map(String::as_str),
                Some(want),
                "{key} in the authorization request of {subject}"
            );
        }
        for key in ["state", "code_challenge"] {
            assert!(
                query.get(key).is_some_and(|v| v.len() >= 32),
                "the authorization request of {subject} has no proper {key}"
            );
        }
        assert!(
            browser.jar.iter().any(|(k, _)| k == "tokenproxy_connect"),
            "opening the link set no connect cookie"
        );

        let back = browser.sign_in(&authorize, subject, &self.callback).await;
        let page = browser
            .visit(Method::GET, &self.via(&back, called_back), String::new())
            .await;
        let landed = page.location.unwrap_or_default();
        assert!(
            page.status.is_redirection(),
            "the callback of {subject}: {} {}",
            page.status,
            page.html
        );
        let outcome: std::collections::HashMap<String, String> = landed
            .strip_prefix(&format!("{return_to}?"))
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_else(|| {
                panic!("the callback of {subject} led to {landed}, not {return_to}")
            });
        assert_eq!(
            (
                outcome.get("subject").map(String::as_str),
                outcome.get("status").map(String::as_str),
                outcome.get("error").map(String::as_str)
            ),
            (Some(subject.as_str()), Some("connected"), None),
            "the outcome of connecting {subject}: {landed}"
        );
        !(made == opened && opened == called_back)
    }

    /// `url` on public_url, as the ingress sends it to replica `i`.
    fn via(&self, url: &str, i: usize) -> String {
        let rest = url
            .strip_prefix(&self.public_url)
            .unwrap_or_else(|| panic!("{url} is not on public_url {}", self.public_url));
        format!("http://127.0.0.1:{}{rest}", self.connect_ports[i])
    }
}

/// The subjects in `state`, from replica's admin API.
async fn list_subjects(http: &HttpClient, admin_port: u16, state: &str) -> Vec<String> {
    let request = Request::get(format!(
        "http://127.0.0.1:{admin_port}/clients/pos/subjects?state={state}&limit=1000"
    ))
    .header("authorization", format!("Bearer {ADMIN_KEY}"))
    .body(Full::new(Bytes::new()))
    .expect("request builds");
    let response = http.request(request).await.expect("the admin API answers");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(
        status,
        StatusCode::OK,
        "listing {state} subjects: {}",
        String::from_utf8_lossy(&body)
    );
    let page: Value = serde_json::from_slice(&body).expect("the list is JSON");
    page["subjects"]
        .as_array()
        .expect("a subjects array")
        .iter()
        .filter_map(|s| s["subject"].as_str().map(str::to_owned))
        .collect()
}

/// `SUBJECT_WORKERS` request loops for `duration`: request n names subject
/// n mod SUBJECTS and goes to the replicas in turn, so every subject is used
/// on every replica; the answers that passed, per subject and replica.
async fn subject_load(
    http: &HttpClient,
    ports: &[u16],
    subjects: &Arc<Vec<String>>,
    duration: Duration,
    stats: &Arc<Stats>,
) -> Vec<u64> {
    let deadline = Instant::now() + duration;
    let counter = Arc::new(AtomicU64::new(0));
    let served: Arc<Vec<AtomicU64>> = Arc::new(
        (0..subjects.len() * ports.len())
            .map(|_| AtomicU64::new(0))
            .collect(),
    );
    let ports: Arc<Vec<u16>> = Arc::new(ports.to_vec());
    let mut tasks = Vec::new();
    for worker in 0..SUBJECT_WORKERS {
        let (http, stats, subjects, ports, counter, served) = (
            http.clone(),
            Arc::clone(stats),
            Arc::clone(subjects),
            Arc::clone(&ports),
            Arc::clone(&counter),
            Arc::clone(&served),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let s = (n % subjects.len() as u64) as usize;
                let r = ((n / subjects.len() as u64) % ports.len() as u64) as usize;
                let url = format!("http://127.0.0.1:{}{API_PATH}", ports[r]);
                let app = App {
                    client_id: "sidecar-code",
                    subject: Some(&subjects[s]),
                    dpop: false,
                };
                if one_request(&http, &url, &app, worker, n, &stats).await {
                    served[s * ports.len() + r].fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("load worker");
    }
    served.iter().map(|c| c.load(Ordering::Relaxed)).collect()
}

/// A browser, as far as these cases need one: a cookie jar (sent to every port
/// of 127.0.0.1, as browsers do: cookies are not scoped by port), redirects,
/// and oidc-provider's development login and consent pages.
struct Browser {
    http: HttpClient,
    jar: Vec<(String, String)>,
}

/// One answer the browser got: status, `Location` made absolute, and the page.
struct Visit {
    status: StatusCode,
    location: Option<String>,
    html: String,
}

impl Browser {
    fn new(http: &HttpClient) -> Browser {
        Browser {
            http: http.clone(),
            jar: Vec::new(),
        }
    }

    /// One request with the jar's cookies; keeps the cookies the answer sets.
    async fn visit(&mut self, method: Method, url: &str, form: String) -> Visit {
        let cookie = self
            .jar
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut builder = Request::builder().method(method.clone()).uri(url);
        if !cookie.is_empty() {
            builder = builder.header("cookie", cookie);
        }
        if method == Method::POST {
            builder = builder.header("content-type", "application/x-www-form-urlencoded");
        }
        let request = builder.body(Full::new(Bytes::from(form))).expect("request");
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.http.request(request))
            .await
            .unwrap_or_else(|_| panic!("{method} {url} timed out"))
            .unwrap_or_else(|e| panic!("{method} {url} failed: {e}"));
        for value in response.headers().get_all("set-cookie") {
            let Ok(text) = value.to_str() else { continue };
            let pair = text.split(';').next().unwrap_or("");
            if let Some((k, v)) = pair.split_once('=') {
                let (k, v) = (k.trim().to_owned(), v.trim().to_owned());
                self.jar.retain(|(name, _)| *name != k);
                if !v.is_empty() && !text.contains("expires=Thu, 01 Jan 1970") {
                    self.jar.push((k, v));
                }
            }
        }
        let status = response.status();
        let location = response
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .map(|l| {
                if l.starts_with("http") {
                    l.to_owned()
                } else {
                    format!("{}{l}", origin_of(url))
                }
            });
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Visit {
            status,
            location,
            html: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// What a person does on oidc-provider's development pages: from `url` (the
    /// authorization request), follow the redirects, sign in as `login`,
    /// consent, until the provider sends the browser to `redirect_uri`; returns
    /// that address (not fetched).
    async fn sign_in(&mut self, url: &str, login: &str, redirect_uri: &str) -> String {
        let mut next = (Method::GET, url.to_owned(), String::new());
        for _ in 0..20 {
            let (method, target, form) = next.clone();
            let page = self.visit(method, &target, form).await;
            if page.status.is_redirection() {
                let location = page.location.expect("a redirect has a location");
                if location.starts_with(redirect_uri) {
                    return location;
                }
                next = (Method::GET, location, String::new());
                continue;
            }
            assert_eq!(
                page.status,
                StatusCode::OK,
                "unexpected page at {target}: {}",
                page.html
            );
            let html = &page.html;
            let uid = html
                .split("action=\"/interaction/")
                .nth(1)
                .and_then(|r| r.split(['"', '/', '?']).next())
                .or_else(|| target.split("/interaction/").nth(1))
                .expect("an interaction page")
                .to_owned();
            let prompt = html
                .split("name=\"prompt\" value=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("consent");
            let form = if prompt == "login" {
                form_urlencoded::Serializer::new(String::new())
                    .append_pair("prompt", "login")
                    .append_pair("login", login)
                    .append_pair("password", "any")
                    .finish()
            } else {
                "prompt=consent".to_owned()
            };
            next = (
                Method::POST,
                format!("{}/interaction/{uid}", origin_of(&target)),
                form,
            );
        }
        panic!("did not reach {redirect_uri} within 20 steps");
    }
}

/// `scheme://host:port` of an absolute URL.
fn origin_of(url: &str) -> String {
    url.split('/').take(3).collect::<Vec<_>>().join("/")
}

// ------------------------------------------------------------------ case model

struct Case {
    name: &'static str,
    peer: Peer,
    /// Extra environment for the peer's start script.
    peer_env: &'static [(&'static str, &'static str)],
    token: Token,
    /// Get a refresh token with `oidc/get-refresh-token.sh` and configure it.
    bootstrap_refresh_token: bool,
    /// The sidecar's metrics must show successful refresh_token grants.
    expect_refresh_grant: bool,
    mode: Mode,
}

/// How many sidecars, with which token store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One sidecar, tokens in memory.
    Single,
    /// One sidecar with `[store] kind = "file"`, killed with SIGKILL halfway
    /// through the load (after at least one rotation) and started again.
    RestartWithFileStore,
    /// Two sidecars sharing `[store] kind = "redis"` (a redis-server started here),
    /// the load spread over both.
    TwoReplicasWithRedis,
}

/// The store key the interop sidecars use (32 bytes, base64).
const STORE_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

struct Token {
    grant: &'static str,
    client_id: &'static str,
    client_secret: &'static str,
    password_user: bool,
    auth: Auth,
    /// `[clients.peer.dpop] alg`: DPoP-bound tokens.
    dpop: Option<&'static str>,
}

/// How the sidecar authenticates to the token endpoint.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// `client_secret` with HTTP Basic (the default).
    Secret,
    /// `private_key_jwt` with the peer's key `oidc/keys/<key>.pem`.
    PrivateKey {
        key: &'static str,
        alg: &'static str,
        /// Send kid = the key's file stem (the peer's registered kid).
        kid: bool,
        /// `assertion_audience` = the issuer, as FAPI 2.0 does, instead of the token URL.
        issuer_audience: bool,
    },
    /// `client_secret_jwt` keyed with the client secret.
    SecretJwt { alg: &'static str },
    /// `tls_client_auth` with `oidc/keys/tls/client.crt` on the peer's HTTPS listener.
    Tls,
    /// `client_assertion` from a file this test keeps rewriting.
    File,
}

impl Token {
    fn new(grant: &'static str, client_id: &'static str, client_secret: &'static str) -> Self {
        Token {
            grant,
            client_id,
            client_secret,
            password_user: false,
            auth: Auth::Secret,
            dpop: None,
        }
    }

    /// DPoP-bound tokens, the key made for `alg`.
    fn dpop(mut self, alg: &'static str) -> Self {
        self.dpop = Some(alg);
        self
    }

    fn auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// The password grant's resource owner (alice).
    fn user(mut self) -> Self {
        self.password_user = true;
        self
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Peer {
    Dot,
    Oidc,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Dot => "dot",
            Peer::Oidc => "oidc",
        }
    }

    fn token_path(self) -> &'static str {
        match self {
            Peer::Dot => "/o/token/",
            Peer::Oidc => "/token",
        }
    }

    fn log_key(self) -> &'static str {
        match self {
            Peer::Dot => "DOT_LOG",
            Peer::Oidc => "OIDC_LOG",
        }
    }
}

// ------------------------------------------------------------------ the run

fn run(case: Case) {
    let peers = peers_dir();
    let mut summary = SummaryGuard {
        name: case.name,
        printed: false,
    };
    let workdir = WorkDir::new(case.name);

    // 1. the peer (with its HTTPS listener for tls_client_auth)
    let mtls_port = free_port();
    let mtls_port_text = mtls_port.to_string();
    let mut peer_env: Vec<(&str, &str)> = case.peer_env.to_vec();
    if case.token.auth == Auth::Tls {
        peer_env.push(("OIDC_MTLS_PORT", &mtls_port_text));
    }
    let (peer, peer_port, log) = start_peer(case.name, case.peer, &peer_env);
    let auth = auth_config(&case, &peers, &workdir.path, peer_port, mtls_port);

    // 2. a bootstrap refresh token (oidc authorization_code flow), kept out of every file
    let mut child_env: Vec<(&str, String)> = vec![
        ("PEER_SECRET", case.token.client_secret.to_owned()),
        ("PEER_PASSWORD", "alice-password-1".to_owned()),
    ];
    if case.bootstrap_refresh_token {
        child_env.push(("BOOTSTRAP_RT", bootstrap_refresh_token(&peers, peer_port)));
    }

    // 3. the sidecar(s); only token calls made from here on count
    let log_offset = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let _redis = match case.mode {
        Mode::TwoReplicasWithRedis => Some(RedisGuard::start(&workdir.path)),
        _ => None,
    };
    let store = match (case.mode, &_redis) {
        (Mode::RestartWithFileStore, _) => format!(
            "[store]\nkind = \"file\"\npath = \"{}\"\nkey = \"{STORE_KEY}\"\n\n",
            workdir.path.join("tokens.json").display()
        ),
        (Mode::TwoReplicasWithRedis, Some(redis)) => format!(
            "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{}/0\"\nkey = \"{STORE_KEY}\"\n\n",
            redis.port
        ),
        _ => String::new(),
    };
    let replicas = if case.mode == Mode::TwoReplicasWithRedis {
        2
    } else {
        1
    };
    let ports: Vec<(u16, u16)> = (0..replicas).map(|_| (free_port(), free_port())).collect();
    let configs: Vec<PathBuf> = ports
        .iter()
        .enumerate()
        .map(|(i, (admin_port, listen_port))| {
            let mut config = store.clone()
                + &sidecar_config(&case, peer_port, *admin_port, *listen_port)
                + &auth.toml;
            if let Some(alg) = case.token.dpop {
                config += &format!("\n[clients.peer.dpop]\nalg = \"{alg}\"\n");
            }
            let path = workdir.path.join(format!("tokenproxy-{i}.toml"));
            fs::write(&path, config).expect("config written");
            path
        })
        .collect();
    let spawn = |i: usize, run: usize| {
        let stderr_path = workdir.path.join(format!("tokenproxy-{i}-run{run}.stderr"));
        let stderr_file = File::create(&stderr_path).expect("stderr file");
        let stdout_file = stderr_file.try_clone().expect("stderr file clone");
        let child = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
            .arg("run")
            .arg("--config")
            .arg(&configs[i])
            .env_remove("RUST_LOG")
            .env_remove("TOKENPROXY_CONFIG")
            .envs(child_env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(stdout_file)
            .stderr(stderr_file)
            .spawn()
            .expect("tokenproxy starts");
        SidecarGuard {
            child: Some(child),
            stderr: stderr_path,
            name: case.name,
        }
    };
    let started = Instant::now();
    let mut sidecars: Vec<SidecarGuard> = (0..replicas).map(|i| spawn(i, 1)).collect();
    let listen_ports: Vec<u16> = ports.iter().map(|p| p.1).collect();

    // 4. ready, load, counters
    let runtime = test_runtime();
    let stats = Arc::new(Stats::default());
    let (metrics, health, restart_token_calls, replay) = runtime.block_on(async {
        let http = app_client();
        for (sidecar, (admin_port, _)) in sidecars.iter_mut().zip(&ports) {
            wait_ready(&http, *admin_port, sidecar).await;
        }
        eprintln!(
            "[{}] {replicas} sidecar(s) ready after {:.2} s; {WORKERS} workers for {:.2} s",
            case.name,
            started.elapsed().as_secs_f64(),
            LOAD.as_secs_f64()
        );
        let mut restart_token_calls = None;
        if case.mode == Mode::RestartWithFileStore {
            drive_load(
                &http,
                &listen_ports,
                case.token.client_id,
                case.token.dpop.is_some(),
                LOAD / 2,
                &stats,
            )
            .await;
            // Abruptly, as a crash or an OOM kill would: no chance to save anything now.
            if let Some(mut child) = sidecars[0].child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let before = count_token_calls(case.peer, &read_from(&log, log_offset)).total;
            eprintln!(
                "[{}] killed the sidecar (SIGKILL) after {before} token calls; starting it again",
                case.name
            );
            sidecars.push(spawn(0, 2));
            let restarted = sidecars.len() - 1;
            wait_ready(&http, ports[0].0, &mut sidecars[restarted]).await;
            let after = count_token_calls(case.peer, &read_from(&log, log_offset)).total;
            restart_token_calls = Some(after - before);
            drive_load(
                &http,
                &listen_ports,
                case.token.client_id,
                case.token.dpop.is_some(),
                LOAD / 2,
                &stats,
            )
            .await;
        } else {
            drive_load(
                &http,
                &listen_ports,
                case.token.client_id,
                case.token.dpop.is_some(),
                LOAD,
                &stats,
            )
            .await;
        }
        let mut metrics = String::new();
        for (admin_port, _) in &ports {
            metrics += &get_text(&http, &format!("http://127.0.0.1:{admin_port}/metrics")).await;
        }
        let health = get_text(&http, &format!("http://127.0.0.1:{peer_port}/healthz")).await;
        let replay = match case.token.dpop {
            Some(_) => Some(replay_a_proof(&http, listen_ports[0], peer_port).await),
            None => None,
        };
        (metrics, health, restart_token_calls, replay)
    });
    drop(runtime);

    // 5. stop the sidecar(s) (SIGTERM), then read what the peer saw
    let mut exit = None;
    for sidecar in sidecars.iter_mut() {
        if sidecar.child.is_some() {
            exit = sidecar.stop();
        }
    }
    let sidecar = sidecars.pop().expect("a sidecar");
    let elapsed = started.elapsed();
    let seen = read_from(&log, log_offset);
    let calls = count_token_calls(case.peer, &seen);

    // 6. report
    let lifetimes = elapsed.as_secs_f64() / LIFETIME_SECS as f64;
    let limit = lifetimes.ceil() as usize + 2;
    let requests = stats.sent.load(Ordering::Relaxed);
    let failures = stats.failed.load(Ordering::Relaxed);
    let refresh_grants = metric_sum(
        &metrics,
        "tokenproxy_token_refreshes_total",
        &[("grant", "refresh_token"), ("outcome", "success")],
    );
    let unauthorized_recovered = metric_sum(
        &metrics,
        "tokenproxy_unauthorized_retries_total",
        &[("outcome", "recovered")],
    );
    eprintln!(
        "[{}] requests sent {requests} (GET {}, POST {}), failures {failures}, slowest {:.1} ms",
        case.name,
        stats.gets.load(Ordering::Relaxed),
        stats.posts.load(Ordering::Relaxed),
        stats.max_micros.load(Ordering::Relaxed) as f64 / 1000.0
    );
    for sample in stats.samples.lock().expect("samples").iter() {
        eprintln!("[{}]   failure: {sample}", case.name);
    }
    eprintln!(
        "[{}] token requests in the peer log: {} ({} answered 200; limit {limit} for {lifetimes:.2} lifetimes); API 401s absorbed by the sidecar: {}",
        case.name, calls.total, calls.ok, calls.api_unauthorized
    );
    if calls.nonce_challenges > 0 {
        eprintln!(
            "[{}] token requests answered use_dpop_nonce (and sent again with the nonce): {}",
            case.name, calls.nonce_challenges
        );
    }
    for bad in &calls.bad {
        eprintln!("[{}]   token endpoint problem: {bad}", case.name);
    }
    eprintln!("[{}] peer /healthz: {}", case.name, health.trim());
    for line in metrics.lines().filter(|l| {
        l.starts_with("tokenproxy_token_refreshes_total")
            || l.starts_with("tokenproxy_unauthorized_retries_total")
            || l.starts_with("tokenproxy_token_wait_seconds_sum")
            || l.starts_with("tokenproxy_requests_total")
    }) {
        eprintln!("[{}]   {line}", case.name);
    }
    eprintln!(
        "[{}] sidecar ran {:.2} s; exit on SIGTERM: {}",
        case.name,
        elapsed.as_secs_f64(),
        exit.map_or_else(
            || "killed (no exit within 10 s)".to_owned(),
            |s| s.to_string()
        )
    );

    let mut problems = Vec::new();
    if requests == 0 {
        problems.push("no request was sent".to_owned());
    }
    if failures > 0 {
        problems.push(format!("{failures} of {requests} app requests failed"));
    }
    if calls.total > limit {
        problems.push(format!(
            "{} token requests in {lifetimes:.2} lifetimes (limit {limit})",
            calls.total
        ));
    }
    if calls.total < 2 {
        problems.push(format!(
            "{} token request(s): the token was never renewed",
            calls.total
        ));
    }
    if !calls.bad.is_empty() {
        problems.push(format!(
            "{} token endpoint answer(s) other than 200 (refresh token reuse or a rejected credential)",
            calls.bad.len()
        ));
    }
    if case.token.auth != Auth::Secret {
        // The peer states its assertion policy (and mTLS origin) when it starts.
        let start = read_from(&log, 0);
        let policy = format!("assertion_max={ASSERTION_MAX_SECONDS}s");
        if !start.contains(&policy) {
            problems.push(format!("the peer did not run with {policy}"));
        }
        if case.token.auth == Auth::Tls
            && !start.contains(&format!("mtls=https://127.0.0.1:{mtls_port}"))
        {
            problems.push("the peer's HTTPS listener did not start".to_owned());
        }
    }
    if case.token.dpop.is_some() {
        problems.extend(dpop_problems(&health, replay.as_ref()));
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("tokenproxy_dpop_nonce_retries_total"))
        {
            eprintln!("[{}]   {line}", case.name);
        }
        if let Some((status, text)) = &replay {
            eprintln!("[{}] a proof sent again: {status} {text}", case.name);
        }
    }
    if case.expect_refresh_grant && refresh_grants < 1.0 {
        problems.push("the refresh_token grant was never used successfully".to_owned());
    }
    if let Some(calls_at_restart) = restart_token_calls {
        eprintln!(
            "[{}] token calls while the restarted sidecar became ready: {calls_at_restart}",
            case.name
        );
        // The stored token is either still valid (no call) or due (one refresh).
        if calls_at_restart > 1 {
            problems.push(format!(
                "the restarted sidecar made {calls_at_restart} token calls before it was ready"
            ));
        }
    }
    let verdict = if problems.is_empty() { "PASS" } else { "FAIL" };
    eprintln!(
        "INTEROP | {:<16} | {:>8} | {:>8} | {:>6} / {:<5} | {:>8} | {:>9} | {:>6.1} s | {verdict}",
        case.name,
        requests,
        failures,
        calls.total,
        limit,
        refresh_grants as u64,
        unauthorized_recovered as u64,
        elapsed.as_secs_f64(),
    );
    summary.printed = true;
    if !problems.is_empty() {
        sidecar.print_tail();
        panic!("[{}] {}", case.name, problems.join("; "));
    }
    drop(sidecar);
    drop(auth);
    drop(peer);
    workdir.remove();
}

/// The token settings of `case.token.auth` after the common ones, and what keeps
/// them working (the thread rewriting an assertion file) until dropped.
struct AuthConfig {
    /// `url` and the client authentication keys of `[clients.peer.token]`, and
    /// any `[clients.peer.token.tls]` table.
    toml: String,
    writer: Option<AssertionWriter>,
}

impl Drop for AuthConfig {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            writer.stop();
        }
    }
}

fn auth_config(
    case: &Case,
    peers: &Path,
    dir: &Path,
    peer_port: u16,
    mtls_port: u16,
) -> AuthConfig {
    let issuer = format!("http://127.0.0.1:{peer_port}");
    let token_url = format!("{issuer}{}", case.peer.token_path());
    let keys = peers.join("oidc/keys");
    // The peer's files are world-readable; tokenproxy wants its keys private.
    let private_copy = |from: &Path, name: &str| {
        let to = dir.join(name);
        let content = fs::read(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        fs::write(&to, content).expect("key copy written");
        set_private(&to);
        to
    };
    let mut writer = None;
    let toml = match case.token.auth {
        Auth::Secret => format!("url = \"{token_url}\"\nclient_secret = \"${{PEER_SECRET}}\"\n"),
        Auth::PrivateKey {
            key,
            alg,
            kid,
            issuer_audience,
        } => {
            let file = private_copy(&keys.join(format!("{key}.pem")), "signing.pem");
            let mut t = format!(
                "url = \"{token_url}\"\nclient_auth = \"private_key_jwt\"\nsigning_key_file = \"{}\"\nsigning_alg = \"{alg}\"\n",
                file.display()
            );
            if kid {
                t += &format!("key_id = \"{key}\"\n");
            }
            if issuer_audience {
                t += &format!("assertion_audience = \"{issuer}\"\n");
            }
            t
        }
        Auth::SecretJwt { alg } => format!(
            "url = \"{token_url}\"\nclient_auth = \"client_secret_jwt\"\nclient_secret = \"${{PEER_SECRET}}\"\nsigning_alg = \"{alg}\"\n"
        ),
        Auth::Tls => {
            let tls = keys.join("tls");
            let key = private_copy(&tls.join("client.key"), "client.key");
            format!(
                "url = \"https://127.0.0.1:{mtls_port}/token\"\nclient_auth = \"tls_client_auth\"\n\n\
                 [clients.peer.token.tls]\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                tls.join("ca.crt").display(),
                tls.join("client.crt").display(),
                key.display()
            )
        }
        Auth::File => {
            let file = dir.join("assertion.jwt");
            let started = AssertionWriter::start(
                &keys.join("ed25519.pem"),
                file.clone(),
                case.token.client_id,
                token_url.clone(),
            );
            writer = Some(started);
            format!(
                "url = \"{token_url}\"\nclient_auth = \"client_assertion\"\nclient_assertion_file = \"{}\"\n",
                file.display()
            )
        }
    };
    AuthConfig { toml, writer }
}

fn set_private(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod 600");
    }
}

/// Rewrites an assertion file with a new Ed25519-signed JWT every 250 ms, as a
/// token projector would (only much more often, because the peer accepts each
/// jti once), until stopped.
struct AssertionWriter {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl AssertionWriter {
    fn start(key_pem: &Path, file: PathBuf, client_id: &'static str, audience: String) -> Self {
        let pem = fs::read_to_string(key_pem).expect("the peer's Ed25519 key");
        let der: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(der)
            .expect("PEM base64");
        let key = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .expect("an Ed25519 PKCS#8 key");
        let write = move |file: &Path| {
            let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
            let iat = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_secs();
            let header = json!({"alg": "EdDSA", "kid": "ed25519"});
            let claims = json!({
                "iss": client_id, "sub": client_id, "aud": audience,
                "jti": format!("{:032x}", fastrand::u128(..)), "iat": iat, "exp": iat + 60,
            });
            let input = format!(
                "{}.{}",
                b64(header.to_string().as_bytes()),
                b64(claims.to_string().as_bytes())
            );
            let jwt = format!("{input}.{}", b64(key.sign(input.as_bytes()).as_ref()));
            // Whole or not at all, as the kubelet swaps a projected token.
            let tmp = file.with_extension("tmp");
            fs::write(&tmp, jwt).expect("assertion written");
            set_private(&tmp);
            fs::rename(&tmp, file).expect("assertion in place");
        };
        write(&file);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                write(&file);
            }
        });
        AssertionWriter { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// Starts `peer` on a free port with `env`; its guard, port and log file.
fn start_peer(name: &str, peer: Peer, env: &[(&str, &str)]) -> (PeerGuard, u16, PathBuf) {
    let peers = peers_dir();
    let peer_port = free_port();
    let mut guard = PeerGuard {
        peers: peers.clone(),
        peer,
        port: peer_port,
        log: None,
    };
    eprintln!(
        "[{name}] starting {} on 127.0.0.1:{peer_port} (access tokens live {LIFETIME_SECS} s)",
        peer.name()
    );
    let out = Command::new(peers.join(format!("start-{}.sh", peer.name())))
        .arg(peer_port.to_string())
        .env("ACCESS_TOKEN_EXPIRE_SECONDS", LIFETIME_SECS.to_string())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("the peer's start script runs");
    let info = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "[{name}] start-{}.sh {peer_port} failed ({}):\n{info}",
        peer.name(),
        out.status
    );
    let log = info
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{}=", peer.log_key())))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("start script printed no {}=:\n{info}", peer.log_key()));
    guard.log = Some(log.clone());
    (guard, peer_port, log)
}

fn sidecar_config(case: &Case, peer_port: u16, admin_port: u16, listen_port: u16) -> String {
    let mut text = format!(
        r#"[admin]
listen = "127.0.0.1:{admin_port}"

[log]
level = "info"

[clients.peer]
listen = "127.0.0.1:{listen_port}"
upstream = "http://127.0.0.1:{peer_port}"

[clients.peer.token]
grant = "{grant}"
client_id = "{client_id}"
"#,
        grant = case.token.grant,
        client_id = case.token.client_id,
    );
    if case.token.password_user {
        text.push_str("username = \"alice\"\npassword = \"${PEER_PASSWORD}\"\n");
    }
    if case.bootstrap_refresh_token {
        text.push_str("refresh_token = \"${BOOTSTRAP_RT}\"\n");
    }
    text
}

fn bootstrap_refresh_token(peers: &Path, port: u16) -> String {
    let out = Command::new(peers.join("oidc/get-refresh-token.sh"))
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("get-refresh-token.sh runs");
    assert!(
        out.status.success(),
        "get-refresh-token.sh {port} failed ({})",
        out.status
    );
    let response: Value =
        serde_json::from_slice(&out.stdout).expect("get-refresh-token.sh prints JSON");
    response["refresh_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .expect("the token response has a refresh_token")
        .to_owned()
}

// ------------------------------------------------------------------ load

#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    failed: AtomicU64,
    gets: AtomicU64,
    posts: AtomicU64,
    max_micros: AtomicU64,
    /// Answers whose `sub` was compared with the subject the request named, and matched.
    subject_checked: AtomicU64,
    /// Answers whose `sub` was another subject's.
    wrong_subject: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Stats {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.samples.lock().expect("samples");
        if samples.len() < 10 {
            samples.push(what);
        }
    }
}

/// `WORKERS` request loops for `duration`, spread over the sidecars at `ports`.
async fn drive_load(
    http: &HttpClient,
    ports: &[u16],
    client_id: &'static str,
    dpop: bool,
    duration: Duration,
    stats: &Arc<Stats>,
) {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for worker in 0..WORKERS {
        let port = ports[worker % ports.len()];
        let url = format!("http://127.0.0.1:{port}{API_PATH}");
        let (http, stats) = (http.clone(), Arc::clone(stats));
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while Instant::now() < deadline {
                seq += 1;
                let app = App {
                    client_id,
                    subject: None,
                    dpop,
                };
                one_request(&http, &url, &app, worker, seq, &stats).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("load worker");
    }
}

/// Who the app's request is for: the client the API must see, and the
/// subject named in the request, whose id the API must see as the token's `sub`.
struct App<'a> {
    client_id: &'a str,
    subject: Option<&'a str>,
    /// The token must reach the API DPoP-bound, with a proof that passed.
    dpop: bool,
}

/// One app request, GET or POST (by `seq` and `worker`), checked against the
/// API's echo; whether it passed.
async fn one_request(
    http: &HttpClient,
    url: &str,
    app: &App<'_>,
    worker: usize,
    seq: u64,
    stats: &Stats,
) -> bool {
    let client_id = app.client_id;
    let post = (seq + worker as u64).is_multiple_of(2);
    let sent_json =
        json!({"amount": seq, "currency": "EUR", "reference": format!("w{worker}-{seq}")});
    let (method, body, want) = if post {
        stats.posts.fetch_add(1, Ordering::Relaxed);
        (Method::POST, sent_json.to_string(), StatusCode::CREATED)
    } else {
        stats.gets.fetch_add(1, Ordering::Relaxed);
        (Method::GET, String::new(), StatusCode::OK)
    };
    let mut builder = Request::builder().method(method.clone()).uri(url);
    if let Some(subject) = app.subject {
        builder = builder.header(SUBJECT_HEADER, subject);
    }
    if post {
        // As a payment app sends it: a key that makes the POST safe to replay after a 401.
        builder = builder
            .header("content-type", "application/json")
            .header("idempotency-key", format!("w{worker}-{seq}"));
    }
    let request = builder
        .body(Full::new(Bytes::from(body)))
        .expect("request builds");
    stats.sent.fetch_add(1, Ordering::Relaxed);
    let t0 = Instant::now();
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let response = http.request(request).await.map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((parts, body))
    })
    .await;
    let micros = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
    stats.max_micros.fetch_max(micros, Ordering::Relaxed);
    let (parts, body) = match answer {
        Err(_) => {
            stats.fail(format!("{method} timed out after {REQUEST_TIMEOUT:?}"));
            return false;
        }
        Ok(Err(e)) => {
            stats.fail(format!("{method} transport error: {e}"));
            return false;
        }
        Ok(Ok(reply)) => reply,
    };
    let text = String::from_utf8_lossy(&body);
    let short: String = text.chars().take(200).collect();
    if let Some(code) = parts.headers.get("x-tokenproxy-error") {
        stats.fail(format!(
            "{method} -> {} x-tokenproxy-error: {code:?} {short}",
            parts.status
        ));
        return false;
    }
    if parts.status != want {
        stats.fail(format!(
            "{method} -> {} (want {want}): {short}",
            parts.status
        ));
        return false;
    }
    let echo: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            stats.fail(format!("{method} -> {}: not JSON ({e})", parts.status));
            return false;
        }
    };
    if echo["client_id"] != client_id {
        stats.fail(format!(
            "{method}: the API saw client {} (want {client_id})",
            echo["client_id"]
        ));
        return false;
    }
    if app.dpop && echo["token_binding"] != "dpop" {
        stats.fail(format!(
            "{method}: the API saw no DPoP-bound token (token_binding {})",
            echo["token_binding"]
        ));
        return false;
    }
    if post && echo["json"] != sent_json {
        stats.fail(format!(
            "POST: the API saw body {} (sent {sent_json})",
            echo["json"]
        ));
        return false;
    }
    if let Some(subject) = app.subject {
        // The API's own check: the token it was shown belongs to this subject.
        if echo["sub"] != subject {
            stats.wrong_subject.fetch_add(1, Ordering::Relaxed);
            stats.fail(format!(
                "{method} for subject {subject}: the API saw the token of sub {}",
                echo["sub"]
            ));
            return false;
        }
        if echo["headers"].get(SUBJECT_HEADER).is_some() {
            stats.fail(format!(
                "{method} for subject {subject}: {SUBJECT_HEADER} reached the API"
            ));
            return false;
        }
        stats.subject_checked.fetch_add(1, Ordering::Relaxed);
    }
    true
}

async fn wait_ready(http: &HttpClient, admin_port: u16, sidecar: &mut SidecarGuard) {
    let url = format!("http://127.0.0.1:{admin_port}/readyz");
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("no answer");
    loop {
        // (the guard prints tokenproxy's stderr when this panics)
        if let Some(status) = sidecar.exited() {
            panic!(
                "[{}] tokenproxy exited before it was ready: {status}",
                sidecar.name
            );
        }
        let request = Request::get(&url)
            .body(Full::new(Bytes::new()))
            .expect("request builds");
        if let Ok(Ok(response)) =
            tokio::time::timeout(Duration::from_secs(2), http.request(request)).await
        {
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            if status == StatusCode::OK {
                return;
            }
            last = format!("{status} {}", String::from_utf8_lossy(&body));
        }
        if Instant::now() >= deadline {
            panic!(
                "[{}] tokenproxy not ready within {READY_TIMEOUT:?}; last /readyz: {last}",
                sidecar.name
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get_text(http: &HttpClient, url: &str) -> String {
    let request = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request builds");
    match tokio::time::timeout(Duration::from_secs(5), http.request(request)).await {
        Ok(Ok(response)) => match response.into_body().collect().await {
            Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            Err(e) => format!("(body error: {e})"),
        },
        Ok(Err(e)) => format!("(request error: {e})"),
        Err(_) => "(timed out)".to_owned(),
    }
}

/// Sum of the samples of `name` whose labels include all of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(series, value)| {
            let (metric, label_text) = series.split_once('{').unwrap_or((series, ""));
            let matches = metric == name
                && labels.iter().all(|(k, v)| {
                    label_text
                        .trim_end_matches('}')
                        .split(',')
                        .any(|pair| pair == format!("{k}=\"{v}\""))
                });
            if matches {
                value.parse::<f64>().ok()
            } else {
                None
            }
        })
        .sum()
}

// ------------------------------------------------------------------ peer logs

#[derive(Default)]
struct TokenCalls {
    total: usize,
    ok: usize,
    /// Every token endpoint answer other than 200 (and oidc grant revocations).
    bad: Vec<String>,
    api_unauthorized: usize,
    /// oidc: token requests answered `use_dpop_nonce` (not counted in `total`:
    /// the sidecar sends them again at once, with the nonce).
    nonce_challenges: usize,
    /// oidc: token requests answered 200 per grant type.
    refresh_grants: usize,
    code_grants: usize,
}

/// Counts token endpoint calls in a peer's server log.
///
/// dot (gunicorn access log):
/// `127.0.0.1 - sidecar-cc [22/Nov/2026:03:55:48 +0000] "POST /o/token/ HTTP/1.1" 200 123 "-" "ua"`
///
/// oidc (its own event log, one line per token endpoint outcome and per API call):
/// `2026-11-22T03:55:56.523Z token issued client_credentials client sidecar-cc`
/// `2026-11-22T03:55:56.574Z token error client_credentials invalid_client client authentication failed`
/// `2026-11-22T03:55:56.600Z grant revoked <id>`
/// `2026-11-22T03:56:33.370Z api GET /api/v1/payments 401 no token`
fn count_token_calls(peer: Peer, log: &str) -> TokenCalls {
    let mut calls = TokenCalls::default();
    for line in log.lines() {
        match peer {
            Peer::Dot => {
                let Some((request, after)) = access_log_request(line) else {
                    continue;
                };
                let status = after.split_whitespace().next().unwrap_or("");
                if request.starts_with("POST /o/token/ ") {
                    calls.total += 1;
                    if status == "200" {
                        calls.ok += 1;
                    } else {
                        calls.bad.push(line.to_owned());
                    }
                } else if request.contains(" /api/") && status == "401" {
                    calls.api_unauthorized += 1;
                }
            }
            Peer::Oidc => {
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.get(1..3) {
                    Some(["token", "issued"]) => {
                        calls.total += 1;
                        calls.ok += 1;
                        match words.get(3) {
                            Some(&"refresh_token") => calls.refresh_grants += 1,
                            Some(&"authorization_code") => calls.code_grants += 1,
                            _ => {}
                        }
                    }
                    Some(["token", "error"]) if words.get(4) == Some(&"use_dpop_nonce") => {
                        calls.nonce_challenges += 1;
                    }
                    Some(["token", "error"]) => {
                        calls.total += 1;
                        calls.bad.push(line.to_owned());
                    }
                    Some(["grant", "revoked"]) => calls.bad.push(line.to_owned()),
                    Some(["provider", "server_error"]) => calls.bad.push(line.to_owned()),
                    _ => {
                        if words.get(1) == Some(&"api") && words.get(4) == Some(&"401") {
                            calls.api_unauthorized += 1;
                        }
                    }
                }
            }
        }
    }
    calls
}

/// From a gunicorn access log line: the quoted request line and what follows it.
fn access_log_request(line: &str) -> Option<(&str, &str)> {
    let start = line.find("] \"")? + 3;
    let rest = &line[start..];
    let end = rest.find('"')?;
    Some((&rest[..end], &rest[end + 1..]))
}

/// The log between two offsets.
fn read_between(path: &Path, from: u64, to: u64) -> String {
    let text = read_from(path, from);
    let len = usize::try_from(to.saturating_sub(from)).unwrap_or(usize::MAX);
    let mut end = len.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    text
}

fn tail(path: &Path, lines: usize) -> String {
    let text = read_from(path, 0);
    let all: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for line in &all[all.len().saturating_sub(lines)..] {
        let _ = writeln!(out, "    {line}");
    }
    out
}

// ------------------------------------------------------------------ processes

fn peers_dir() -> PathBuf {
    let dir = std::env::var_os("TOKENPROXY_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers"));
    if !dir.join("start-dot.sh").is_file() || !dir.join("start-oidc.sh").is_file() {
        panic!(
            "OAuth2 peers not found in {} (no start-dot.sh / start-oidc.sh there); \
             set TOKENPROXY_PEERS to the peers directory, or run tests/interop.sh",
            dir.display()
        );
    }
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// The runtime the app side of a case runs on.
fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The app's HTTP client (keep-alive, like a real app's).
fn app_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http()
}

/// A redis-server on a free loopback port (no persistence), killed when dropped.
struct RedisGuard {
    child: Child,
    port: u16,
}

impl RedisGuard {
    fn start(dir: &Path) -> RedisGuard {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install redis-server)");
        let up = (0..500).any(|_| {
            let ok = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if !ok {
                std::thread::sleep(Duration::from_millis(20));
            }
            ok
        });
        assert!(up, "redis-server did not come up on {port}");
        RedisGuard { child, port }
    }
}

impl Drop for RedisGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Stops the peer started on `port` (only that instance) when dropped.
struct PeerGuard {
    peers: PathBuf,
    peer: Peer,
    port: u16,
    log: Option<PathBuf>,
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(log) = &self.log {
                eprintln!(
                    "--- last lines of the {} log ({}):\n{}",
                    self.peer.name(),
                    log.display(),
                    tail(log, 25)
                );
            }
        }
        let status = Command::new(self.peers.join(format!("stop-{}.sh", self.peer.name())))
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "stop-{}.sh {} failed: {status:?}",
                self.peer.name(),
                self.port
            );
        }
    }
}

/// The tokenproxy child: SIGTERM, then SIGKILL, when stopped or dropped.
struct SidecarGuard {
    child: Option<Child>,
    stderr: PathBuf,
    name: &'static str,
}

impl SidecarGuard {
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Stops the child; its exit status, or None when it had to be killed.
    fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    fn print_tail(&self) {
        eprintln!(
            "--- last lines of tokenproxy's stderr ({}):\n{}",
            self.stderr.display(),
            tail(&self.stderr, 40)
        );
    }
}

impl Drop for SidecarGuard {
    fn drop(&mut self) {
        if self.child.is_some() && std::thread::panicking() {
            self.print_tail();
        }
        self.stop();
    }
}

/// Prints the case's figures line as a failure when the case panics before its figures.
struct SummaryGuard {
    name: &'static str,
    printed: bool,
}

impl Drop for SummaryGuard {
    fn drop(&mut self) {
        if !self.printed && std::thread::panicking() {
            eprintln!(
                "INTEROP | {:<16} | {:>8} | {:>8} | {:>6} / {:<5} | {:>8} | {:>9} | {:>8} | FAIL (see above)",
                self.name, "-", "-", "-", "-", "-", "-", "-"
            );
        }
    }
}

/// A scratch directory for the config and the sidecar's stderr; kept when a case fails.
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn new(case: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "tokenproxy-interop-{case}-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&path).expect("work dir");
        WorkDir { path }
    }

    fn remove(self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
