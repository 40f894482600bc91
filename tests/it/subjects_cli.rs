//! `tokenproxy subjects import|list|delete CLIENT`: the running sidecar's
//! subjects, through its admin listener, from the command line.
//!
//! The binary runs as a child process against a sidecar started in the test;
//! `list` is also called as a library function writing to a buffer.

use crate::support;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use http::{Method, StatusCode};
use support::{start_sidecar_env, PosConfig, Reply, TestClient, CLIENT_SECRET};
use tokenproxy::config::MapEnv;
use tokenproxy::secret::Secret;
use tokenproxy::Running;
use tokenproxy_mock::{MockApi, MockProvider, ProviderConfig};

const ADMIN_KEY: &str = "subjects-cli-admin-key-93fd10";

struct Market {
    provider: MockProvider,
    api: MockApi,
    http: TestClient,
    _running: Running,
    proxy: SocketAddr,
    admin: SocketAddr,
    /// The sidecar's config on disk, for the CLI.
    config: PathBuf,
}

async fn market() -> Market {
    let provider = MockProvider::start(ProviderConfig {
        lifetime: Duration::from_secs(300),
        refresh_tokens: true,
        rotate_refresh_tokens: true,
        ..ProviderConfig::default()
    })
    .await
    .expect("provider");
    let api = MockApi::start(provider.validator()).await.expect("api");
    let template = PosConfig {
        upstream: &api.url(),
        token_url: &provider.token_url(),
        admin_auth: &format!("api_key = \"{ADMIN_KEY}\""),
        grant: "grant = \"refresh_token\"",
        client: "",
        subjects: "",
        tail: "",
    }
    .text();
    let env = MapEnv::new().var("CLIENT_SECRET", CLIENT_SECRET);
    let (running, proxy, admin) = start_sidecar_env(&template, env).await;
    let config = support::temp_dir("subjects-cli").join("tokenproxy.toml");
    // The CLI reads the file with the process environment: the secret written in.
    let text = template
        .replace("{admin}", &admin.to_string())
        .replace("{listen}", &proxy.to_string())
        .replace("${CLIENT_SECRET}", CLIENT_SECRET);
    std::fs::write(&config, text).expect("config file");
    Market {
        provider,
        api,
        http: TestClient::new(),
        _running: running,
        proxy,
        admin,
        config,
    }
}

impl Market {
    /// Runs `tokenproxy subjects ARGS --config CONFIG` with `stdin`, off the
    /// runtime's threads (the sidecar keeps serving it).
    async fn cli(&self, args: &[&str], stdin: &str) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tokenproxy"));
        cmd.arg("subjects")
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("TOKENPROXY_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let stdin = stdin.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut child = cmd.spawn().expect("tokenproxy runs");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(stdin.as_bytes())
                .expect("write stdin");
            child.wait_with_output().expect("tokenproxy ends")
        })
        .await
        .expect("join")
    }

    /// A payment of `merchant` naming `subject`.
    async fn pay(&self, merchant: &str, subject: &str) -> Reply {
        let url = format!("http://{}/merchants/{merchant}/payments", self.proxy);
        self.http
            .request(Method::GET, &url, &[("x-tokenproxy-subject", subject)], b"")
            .await
    }

    /// The account the API saw the last request's token belong to.
    fn last_account(&self) -> Option<String> {
        self.api
            .recorded()
            .last()
            .and_then(|r| r.token_account.clone())
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An import reports each refused line by its number without echoing any
/// token, imports and replaces the others, and exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_reports_bad_lines_by_number_and_imports_the_others() {
    let m = market().await;
    // m-1 comes first with a token the provider never issued, then again with
    // a live one: only the replacement makes m-1 work.
    let rt1 = "secret-value-never-issued".to_owned();
    let rt2 = m.provider.issue_refresh_token_for("m-2");
    let rt1_new = m.provider.issue_refresh_token_for("m-1");
    let input = [
        serde_json::json!({"subject": "m-1", "refresh_token": rt1}).to_string(),
        String::new(),
        r#"{"subject": "bad id!", "refresh_token": "secret-value-bad-subject"}"#.to_owned(),
        r#"{"subject": "m-4", "refresh_token": "secret-value-not-json""#.to_owned(),
        r#"{"subject": "m-5", "refresh_token": "secret-value-bad-field", "expires_in": "soon"}"#
            .to_owned(),
        serde_json::json!({"subject": "m-2", "refresh_token": rt2}).to_string(),
        serde_json::json!({"subject": "m-1", "refresh_token": rt1_new}).to_string(),
        r#"{"subject": "m-8"}"#.to_owned(),
    ]
    .join("\n");

    let out = m.cli(&["import", "pos"], &input).await;
    let stdout = text(&out.stdout);
    let printed = format!("{stdout}{}", text(&out.stderr));
    assert!(
        !out.status.success(),
        "an import with refused lines exits non-zero: {printed}"
    );
    for (line, what) in [
        (3, "subject must be"),
        (4, "not valid JSON"),
        (5, "subject m-5: 400"),
        (8, "subject m-8: no \"refresh_token\""),
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("line {line}: ")) && l.contains(what)),
            "line {line} is reported ({what}): {stdout}"
        );
    }
    for line in [1, 2, 6, 7] {
        assert!(
            !stdout.contains(&format!("line {line}:")),
            "line {line} went in and is not reported: {stdout}"
        );
    }
    assert!(
        stdout.contains("imported 2, replaced 1, failed 4"),
        "the summary counts new, replaced and refused lines: {stdout}"
    );
    for secret in [rt1.as_str(), &rt2, &rt1_new, "secret-value"] {
        assert!(!printed.contains(secret), "a token was printed: {printed}");
    }

    // The imported subjects work, each with its own token; m-1 with the replacement.
    for merchant in ["m-1", "m-2"] {
        let r = m.pay(merchant, merchant).await;
        assert_eq!(r.status, StatusCode::OK, "{merchant}: {}", r.text());
        assert_eq!(m.last_account().as_deref(), Some(merchant));
    }
    assert_eq!(
        m.provider.grant_requests("refresh_token"),
        2,
        "one refresh per subject, with the imported (replacing) tokens"
    );
    for merchant in ["m-4", "m-5", "m-8"] {
        let r = m.pay(merchant, merchant).await;
        assert_eq!(
            r.error_code(),
            Some("subject_unknown"),
            "refused line {merchant} imported nothing"
        );
    }
}

/// Without a line of its own to blame (a wrong key), the import stops at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_with_a_wrong_key_stops_at_the_first_line() {
    let m = market().await;
    let input = "{\"subject\": \"m-1\", \"refresh_token\": \"rt-one\"}\n\
                 {\"subject\": \"m-2\", \"refresh_token\": \"rt-two\"}\n";
    let mut out = Vec::new();
    let err = tokenproxy::operator::import_subjects(
        m.admin,
        Some(&Secret::new("not-the-key")),
        "pos",
        &mut input.as_bytes(),
        &mut out,
    )
    .await
    .expect_err("a wrong key refuses the import");
    let out = text(&out);
    assert!(err.to_string().contains("401"), "{err}");
    assert!(
        out.contains("line 1: stopped") && !out.contains("line 2"),
        "the import stops at the first refusal: {out}"
    );
    assert!(out.contains("imported 0, replaced 0, failed 1"), "{out}");
}

/// `list` prints every subject as a JSON line, `--state` filters, and no
/// token is in the listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_prints_json_lines_and_filters_by_state() {
    let m = market().await;
    let mut tokens = Vec::new();
    let mut input = String::new();
    for merchant in ["m-1", "m-2"] {
        let rt = m.provider.issue_refresh_token_for(merchant);
        input.push_str(&format!(
            "{}\n",
            serde_json::json!({"subject": merchant, "refresh_token": rt})
        ));
        tokens.push(rt);
    }
    // A refresh token the provider never issued: its subject ends in needs_authorization.
    input.push_str("{\"subject\": \"m-3\", \"refresh_token\": \"never-issued-rt\"}\n");
    let out = m.cli(&["import", "pos"], &input).await;
    assert!(out.status.success(), "{}", text(&out.stdout));
    let r = m.pay("m-3", "m-3").await;
    assert_eq!(r.error_code(), Some("needs_authorization"), "{}", r.text());

    let listed = |out: &[u8]| -> Vec<(String, String)> {
        text(out)
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("each line is JSON ({e}): {l}"));
                let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
                (field("subject"), field("state"))
            })
            .collect()
    };
    let mut all = Vec::new();
    let n = tokenproxy::operator::list_subjects(
        m.admin,
        Some(&Secret::new(ADMIN_KEY)),
        "pos",
        None,
        &mut all,
    )
    .await
    .expect("list");
    assert_eq!(n, 3);
    let subjects: Vec<String> = listed(&all).into_iter().map(|(s, _)| s).collect();
    assert_eq!(subjects, ["m-1", "m-2", "m-3"], "{}", text(&all));
    for rt in tokens.iter().map(String::as_str).chain(["never-issued-rt"]) {
        assert!(!text(&all).contains(rt), "no token in a listing");
    }

    let out = m
        .cli(&["list", "pos", "--state", "needs_authorization"], "")
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        listed(&out.stdout),
        [("m-3".to_owned(), "needs_authorization".to_owned())],
        "--state needs_authorization lists m-3 only"
    );
    let out = m.cli(&["list", "pos", "--state", "valid"], "").await;
    let valid: Vec<String> = listed(&out.stdout).into_iter().map(|(s, _)| s).collect();
    assert_eq!(valid, ["m-1", "m-2"], "{}", text(&out.stdout));

    let out = m.cli(&["list", "pos", "--state", "sleepy"], "").await;
    assert!(!out.status.success(), "an unknown state is refused");
    assert!(text(&out.stderr).contains("400"), "{}", text(&out.stderr));
}

/// `delete` forgets a subject: its requests get subject_unknown, and a second
/// delete fails naming subject_unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_forgets_a_subject() {
    let m = market().await;
    let rt = m.provider.issue_refresh_token_for("m-1");
    let line = serde_json::json!({"subject": "m-1", "refresh_token": rt}).to_string();
    let out = m.cli(&["import", "pos"], &line).await;
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert_eq!(m.pay("m-1", "m-1").await.status, StatusCode::OK);

    let out = m.cli(&["delete", "pos", "m-1"], "").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("client pos: subject m-1 deleted"),
        "{}",
        text(&out.stdout)
    );
    let r = m.pay("m-1", "m-1").await;
    assert_eq!(r.error_code(), Some("subject_unknown"), "{}", r.text());

    let out = m.cli(&["delete", "pos", "m-1"], "").await;
    assert!(!out.status.success(), "deleting an unknown subject fails");
    assert!(
        text(&out.stderr).contains("subject_unknown"),
        "{}",
        text(&out.stderr)
    );
    let out = m.cli(&["delete", "nope", "m-1"], "").await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no client \"nope\""),
        "{}",
        text(&out.stderr)
    );
}
