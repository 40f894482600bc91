//! The command line: `check` accepts the examples and names the key of every
//! config error; `token` prints metadata but not the token; `demo` shows a
//! proxied request and a refresh.

use std::path::PathBuf;
use std::process::{Command, Output};

use tokenproxy_mock::{MockProvider, ProviderConfig};

fn tokenproxy(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tokenproxy"));
    cmd.args(args)
        .env_remove("TOKENPROXY_CONFIG")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("tokenproxy runs")
}

fn temp_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tokenproxy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

const VALID: &str = r#"
[clients.payments]
listen = "127.0.0.1:18080"
upstream = "https://api.pay.example"

[clients.payments.token]
url = "https://api.pay.example/oauth2/token"
client_id = "id"
client_secret = "${PAY_SECRET}"
"#;

#[test]
fn check_accepts_every_example_in_the_config_folder() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("config/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        // Examples take their secrets from the environment; give every variable they name a value.
        let text = std::fs::read_to_string(&path).expect("read example");
        let vars: Vec<String> = text
            .split("${")
            .skip(1)
            .filter_map(|rest| rest.split_once('}').map(|(v, _)| v.to_owned()))
            .collect();
        let env: Vec<(&str, &str)> = vars.iter().map(|v| (v.as_str(), "example-value")).collect();
        let out = tokenproxy(
            &["check", "--config", path.to_str().expect("utf8 path")],
            &env,
        );
        assert!(
            out.status.success(),
            "{} must pass check: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 1, "config/ holds examples");
}

#[test]
fn check_prints_a_redacted_summary() {
    let path = temp_config("valid.toml", VALID);
    let out = tokenproxy(
        &["check", "--config", path.to_str().expect("utf8")],
        &[("PAY_SECRET", "very-secret-value-123")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("payments"),
        "the summary names the client: {stdout}"
    );
    assert!(
        !stdout.contains("very-secret-value-123"),
        "the secret must not be printed"
    );
}

#[test]
fn every_config_error_class_names_its_key_and_exits_non_zero() {
    let cases: &[(&str, String, &str)] = &[
        (
            "unknown key",
            VALID.replace("upstream =", "upstreem ="),
            "upstreem",
        ),
        (
            "bad duration",
            VALID.replace(
                "[clients.payments.token]",
                "timeout = \"soon\"\n[clients.payments.token]",
            ),
            "clients.payments.timeout",
        ),
        (
            "missing env var",
            VALID.replace("${PAY_SECRET}", "${NOT_SET_ANYWHERE}"),
            "NOT_SET_ANYWHERE",
        ),
        (
            "unreadable secret file",
            VALID.replace(
                "client_secret = \"${PAY_SECRET}\"",
                "client_secret_file = \"/nonexistent/tokenproxy/secret\"",
            ),
            "clients.payments.token.client_secret_file",
        ),
        (
            "bad url",
            VALID.replace("https://api.pay.example/oauth2/token", "ftp://x/token"),
            "clients.payments.token.url",
        ),
        (
            "duplicate listen",
            format!(
                "{VALID}\n{}",
                VALID.replace("clients.payments", "clients.zeta")
            ),
            "clients.zeta.listen",
        ),
    ];
    for (what, text, key) in cases {
        let path = temp_config("bad.toml", text);
        let out = tokenproxy(
            &["check", "--config", path.to_str().expect("utf8")],
            &[("PAY_SECRET", "s3cret-do-not-print")],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: check must fail");
        assert!(
            stderr.contains(key),
            "{what}: the error names {key}: {stderr}"
        );
        assert!(
            stderr.contains("bad.toml"),
            "{what}: the error names the file: {stderr}"
        );
        assert!(
            !stderr.contains("s3cret-do-not-print"),
            "{what}: no secret in errors"
        );
    }
}

/// `check` reports every problem of the file in one run, one per line with
/// its line:column and dotted key, then how many there are.
#[test]
fn check_reports_every_problem_on_its_own_line_then_the_count() {
    let text = format!(
        "[admin]\nlisen = \"127.0.0.1:9090\"\n{}{}",
        VALID.replace(
            "upstream = \"https://api.pay.example\"",
            "upstream = \"https://api.pay.example\"\ntimeout = 30",
        ),
        VALID
            .replace("clients.payments", "clients.wallet")
            .replace("18080", "18081")
            .replace(
                "upstream = \"https://api.pay.example\"",
                "upstream = \"https://api.pay.example\"\nunauthorized_status = 401",
            ),
    );
    let path = temp_config("three.toml", &text);
    let out = tokenproxy(
        &["check", "--config", path.to_str().expect("utf8")],
        &[("PAY_SECRET", "s3cret-do-not-print")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "check exits 1: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    let file = path.display().to_string();
    assert_eq!(lines.len(), 4, "three problems and the count: {stderr}");
    for (line, place, key) in [
        (lines[0], "2:1", "admin.lisen"),
        (lines[1], "7:1", "clients.payments.timeout"),
        (lines[2], "17:23", "clients.wallet.unauthorized_status"),
    ] {
        assert!(
            line.starts_with(&format!("tokenproxy: {file}:{place}: {key}: ")),
            "{key} at {place}, on its own line: {stderr}"
        );
    }
    assert!(
        lines[1].contains("write it like timeout = \"30s\""),
        "{stderr}"
    );
    assert!(
        lines[2].contains("write it like unauthorized_status = [401]"),
        "{stderr}"
    );
    assert_eq!(lines[3], format!("tokenproxy: 3 problems in {file}"));
}

/// Runs the sidecar with `config`, expecting it to stop at start; its stderr.
fn run_expecting_failure(config: &std::path::Path) -> String {
    let child = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .args(["--config", config.to_str().expect("utf8")])
        .env_remove("TOKENPROXY_CONFIG")
        .env_remove("RUST_LOG")
        .env("PAY_SECRET", "s3cret-do-not-print")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tokenproxy starts");
    let pid = child.id();
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    let out = match outcome.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(out) => out.expect("tokenproxy ran"),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("tokenproxy should stop at start, but kept running");
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "run exits 1: {stderr}");
    stderr
}

/// A listen address in use stops the start with the key that names it and
/// the cause, each said once.
#[test]
fn a_listen_address_in_use_names_its_key_and_says_the_cause_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port to occupy");
    let taken = taken.local_addr().expect("occupied address");
    let cases = [
        (
            format!("[admin]\nlisten = \"{taken}\"\n{VALID}"),
            "admin.listen",
        ),
        (
            format!(
                "[admin]\nlisten = \"127.0.0.1:0\"\n{}",
                VALID.replace("127.0.0.1:18080", &taken.to_string())
            ),
            "clients.payments.listen",
        ),
    ];
    for (text, key) in cases {
        let path = temp_config("port-in-use.toml", &text);
        let stderr = run_expecting_failure(&path);
        let lower = stderr.to_lowercase();
        assert!(
            stderr.contains(&format!("tokenproxy: {key} {taken}: ")),
            "the error names {key} and its address: {stderr}"
        );
        assert_eq!(
            stderr.matches(key).count(),
            1,
            "{key} is named once: {stderr}"
        );
        assert_eq!(
            lower.matches("address already in use").count(),
            1,
            "the cause is said once: {stderr}"
        );
    }
}

/// A store file that cannot be read at start (here a symlink loop, which
/// `check` does not look into) stops the start naming store.path, the cause
/// said once.
#[cfg(unix)]
#[test]
fn a_store_that_cannot_be_opened_names_its_key_and_says_the_cause_once() {
    use std::os::unix::fs::PermissionsExt;
    let dir = crate::support::temp_dir("cli-store-loop");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod 700");
    let state = dir.join("tokens.json");
    std::os::unix::fs::symlink(&state, &state).expect("a symlink to itself");
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[store]\nkind = \"file\"\npath = \"{}\"\nkey = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\n{}",
        state.display(),
        // Port 0 twice would be one address; 127.0.0.2 is loopback too.
        VALID.replace("127.0.0.1:18080", "127.0.0.2:0")
    );
    let path = temp_config("store-loop.toml", &text);
    let stderr = run_expecting_failure(&path);
    assert!(
        stderr.contains(&format!(
            "tokenproxy: store.path: cannot read {}: ",
            state.display()
        )),
        "the error names store.path and the file: {stderr}"
    );
    assert_eq!(
        stderr.matches("store.path").count(),
        1,
        "store.path is named once: {stderr}"
    );
    assert_eq!(
        stderr
            .to_lowercase()
            .matches("too many levels of symbolic links")
            .count(),
        1,
        "the cause is said once: {stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_refuses_what_would_leak_a_credential_or_fail_later() {
    let dir = crate::support::temp_dir("cli-refusals");
    let open_secret = dir.join("open-secret");
    std::fs::write(&open_secret, "s3cret-do-not-print\n").expect("secret file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&open_secret, std::fs::Permissions::from_mode(0o644))
            .expect("chmod 644");
    }
    let store_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "cleartext token url",
            VALID.replace("https://api.pay.example/oauth2", "http://auth.pay.example/oauth2"),
            "clients.payments.token.url",
            "cleartext_token_url",
        ),
        (
            "cleartext upstream",
            VALID.replace("upstream = \"https://", "upstream = \"http://"),
            "clients.payments.upstream",
            "cleartext_upstream",
        ),
        (
            "public listen",
            VALID.replace("127.0.0.1:18080", "0.0.0.0:18080"),
            "clients.payments.listen",
            "public_listen",
        ),
        (
            "secret file open to others",
            VALID.replace(
                "client_secret = \"${PAY_SECRET}\"",
                &format!("client_secret_file = \"{}\"", open_secret.display()),
            ),
            "clients.payments.token.client_secret_file",
            "chmod 600",
        ),
        (
            "log level",
            format!("[log]\nlevel = \"verbose\"\n{VALID}"),
            "log.level",
            "nothing would be logged",
        ),
        (
            "variable without braces",
            VALID.replace("client_id = \"id\"", "client_id = \"$PAY_CLIENT_ID\""),
            "clients.payments.token.client_id",
            "write it like ${PAY_CLIENT_ID}",
        ),
        (
            "store in a missing directory",
            format!(
                "[store]\nkind = \"file\"\npath = \"{}/missing/tokens.json\"\nkey = \"{store_key}\"\n{VALID}",
                dir.display()
            ),
            "store.path",
            "does not exist",
        ),
        (
            "client_auth without a secret",
            VALID.replace("client_secret = \"${PAY_SECRET}\"", ""),
            "clients.payments.token.client_secret",
            "is required when client_auth = \"basic\"",
        ),
        (
            "zero refresh margin",
            format!("{VALID}refresh_before = \"0s\"\n"),
            "clients.payments.token.refresh_before",
            "is zero",
        ),
    ];
    for (what, text, key, needle) in cases {
        let path = temp_config("refused.toml", &text);
        let out = tokenproxy(
            &["check", "--config", path.to_str().expect("utf8")],
            &[("PAY_SECRET", "s3cret-do-not-print")],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: check must refuse it");
        assert!(
            stderr.contains(&format!("{key}: ")) && stderr.contains(needle),
            "{what}: the error names {key} and says {needle:?}: {stderr}"
        );
        assert!(
            !stderr.contains("s3cret-do-not-print"),
            "{what}: no secret in errors: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Security review (low): `default_lifetime = "10000y"` passed `check` and then
/// panicked the refresher; an absurd duration is refused, naming its key.
#[test]
fn check_refuses_durations_longer_than_ten_years() {
    for (key, line) in [
        (
            "clients.payments.token.default_lifetime",
            "default_lifetime = \"10000y\"",
        ),
        (
            "clients.payments.token.refresh_token_lifetime",
            "refresh_token_lifetime = \"11y\"",
        ),
    ] {
        let path = temp_config(
            "lifetime.toml",
            &VALID.replace("client_id = \"id\"", &format!("client_id = \"id\"\n{line}")),
        );
        let out = tokenproxy(
            &["check", "--config", path.to_str().expect("utf8")],
            &[("PAY_SECRET", "s3cret-do-not-print")],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{line}: check must fail");
        assert!(
            stderr.contains(key) && stderr.contains("10 years"),
            "{line}: the error names {key} and the limit: {stderr}"
        );
    }
}

/// Security review (low): `check` and `token` printed the token URL with its query,
/// which can carry a credential (`?api_key=…`); they print scheme://host/path only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_token_never_print_a_token_url_query() {
    const IN_QUERY: &str = "q-s3cret-in-the-query";
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let token_url = provider.token_url();
    let text = format!(
        r#"
[clients.payments]
listen = "127.0.0.1:18080"
upstream = "http://127.0.0.1:1"
[clients.payments.token]
url = "{token_url}?api_key={IN_QUERY}"
refresh_url = "{token_url}?api_key={IN_QUERY}&x=1"
client_id = "demo-client"
client_secret = "${{SECRET}}"
[clients.payments.authorize]
url = "{authorize}?tenant={IN_QUERY}"
redirect_port = 18765
"#,
        authorize = provider.authorize_url(),
    );
    let path = temp_config("query.toml", &text);
    for args in [
        vec!["check", "--config"],
        vec!["token", "payments", "--config"],
    ] {
        let p = path.to_str().expect("utf8").to_owned();
        let command = args.join(" ");
        let out = tokio::task::spawn_blocking(move || {
            let mut args = args;
            args.push(&p);
            tokenproxy(&args, &[("SECRET", "demo-secret")])
        })
        .await
        .expect("join");
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{command} succeeds: {printed}");
        assert!(
            printed.contains(&token_url),
            "{command} names the token endpoint: {printed}"
        );
        assert!(
            !printed.contains(IN_QUERY),
            "{command} must not print a URL's query: {printed}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_prints_metadata_and_the_token_only_when_asked() {
    let provider = MockProvider::start(ProviderConfig::default())
        .await
        .expect("provider");
    let text = format!(
        r#"
[clients.payments]
listen = "127.0.0.1:18080"
upstream = "http://127.0.0.1:1"
[clients.payments.token]
url = "{}"
client_id = "demo-client"
client_secret = "${{SECRET}}"
"#,
        provider.token_url()
    );
    let path = temp_config("token.toml", &text);
    let p = path.to_str().expect("utf8").to_owned();
    let out = tokio::task::spawn_blocking(move || {
        tokenproxy(
            &["token", "payments", "--config", &p],
            &[("SECRET", "demo-secret")],
        )
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("expires_in:     20s"), "{stdout}");
    assert!(
        !stdout.contains("access_token:"),
        "the token is hidden by default"
    );
    let p = path.to_str().expect("utf8").to_owned();
    let shown = tokio::task::spawn_blocking(move || {
        tokenproxy(
            &["token", "payments", "--show-token", "--config", &p],
            &[("SECRET", "demo-secret")],
        )
    })
    .await
    .expect("join");
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    let token = shown
        .lines()
        .find_map(|l| l.strip_prefix("access_token:"))
        .map(str::trim)
        .expect("--show-token prints it");
    assert!(
        provider.validator().check(token).is_some(),
        "the printed token is a real one"
    );
    assert_eq!(provider.token_requests(), 2);
}

#[test]
fn demo_shows_a_proxied_request_and_a_refresh() {
    let out = tokenproxy(
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--token-lifetime",
            "2s",
            "--interval",
            "250ms",
            "--exit-after",
            "3s",
            "--wallet-listen",
            "127.0.0.1:0",
            "--redirect-port",
            "0",
            "--market-listen",
            "127.0.0.1:0",
            "--connect-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo exits cleanly: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("curl -i http://127.0.0.1:"),
        "it prints what to curl: {stdout}"
    );
    assert!(
        stdout.contains("-> 200"),
        "a proxied request succeeded: {stdout}"
    );
    assert!(stdout.contains("token #1"), "{stdout}");
    assert!(
        stdout.contains("tokenproxy authorize wallet --config "),
        "it shows how to authorize the wallet client: {stdout}"
    );
    assert!(
        stdout.contains("token #2"),
        "the token was refreshed within the run: {stdout}"
    );
    assert!(
        !stdout.contains("-> 401") && !stdout.contains("-> 503"),
        "no request failed: {stdout}"
    );
}

/// Security review (low): `demo` wrote its config (client secret, store key) into a
/// world-readable file in a world-readable directory; both are private to the user.
#[cfg(unix)]
#[test]
fn demo_writes_its_config_readable_by_the_user_only() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;

    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--wallet-listen",
            "127.0.0.1:0",
            "--redirect-port",
            "0",
            "--market-listen",
            "127.0.0.1:0",
            "--connect-listen",
            "127.0.0.1:0",
            "--exit-after",
            "5s",
        ])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("demo starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut printed = String::new();
    let mut config = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read stdout");
        printed.push_str(&line);
        printed.push('\n');
        if let Some(path) = line
            .trim()
            .strip_prefix("tokenproxy authorize wallet --config ")
        {
            config = Some(PathBuf::from(path));
            break;
        }
    }
    let config = config.unwrap_or_else(|| panic!("demo printed no config path:\n{printed}"));
    let file_mode = std::fs::metadata(&config)
        .expect("the demo config exists while the demo runs")
        .permissions()
        .mode();
    let dir = config.parent().expect("a directory");
    let dir_mode = std::fs::metadata(dir).expect("dir").permissions().mode();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        file_mode & 0o077,
        0,
        "the demo config holds secrets and must be readable by its user only (mode {file_mode:o})"
    );
    assert_eq!(
        dir_mode & 0o077,
        0,
        "the demo directory must be private to its user (mode {dir_mode:o})"
    );
}

/// `tokenproxy token` is a library call writing to any `Write`: metadata only,
/// the token itself only when asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_command_writes_metadata_and_shows_the_token_only_when_asked() {
    let provider = tokenproxy_mock::MockProvider::start(tokenproxy_mock::ProviderConfig::default())
        .await
        .expect("provider");
    let text = format!(
        "[clients.payments]\nlisten = \"127.0.0.1:1\"\nupstream = \"http://127.0.0.1:2\"\n\
         [clients.payments.token]\nurl = \"{}?tenant=t\"\nclient_id = \"demo-client\"\nclient_secret = \"demo-secret\"\n",
        provider.token_url()
    );
    let config = tokenproxy::config::from_str(&text, None, &tokenproxy::config::MapEnv::new())
        .expect("valid");
    for show in [false, true] {
        let mut out = Vec::new();
        tokenproxy::operator::token(&config, "payments", show, false, &mut out)
            .await
            .expect("a token");
        let out = String::from_utf8(out).expect("text");
        assert!(out.contains("client:         payments"), "{out}");
        assert!(out.contains("grant:          client_credentials"), "{out}");
        assert!(!out.contains("tenant=t"), "no query string: {out}");
        assert_eq!(out.contains("access_token:"), show, "{out}");
    }
    let mut out = Vec::new();
    let err = tokenproxy::operator::token(&config, "nope", false, false, &mut out)
        .await
        .expect_err("no such client");
    assert!(err.to_string().contains("configured: payments"), "{err}");
}

/// `tokenproxy check … | head -1`: once the reader of its output is gone, the
/// command ends as Unix tools do (exit 0, nothing on stderr), not with a panic.
#[test]
fn check_piped_into_a_closed_reader_ends_quietly() {
    let path = temp_config("piped.toml", VALID);
    let (reader, writer) = std::io::pipe().expect("pipe");
    // Closed before the command writes a byte: every write meets a broken pipe.
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .args(["check", "--config", path.to_str().expect("utf8")])
        .env_remove("TOKENPROXY_CONFIG")
        .env_remove("RUST_LOG")
        .env("PAY_SECRET", "very-secret-value-123")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("tokenproxy runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.is_empty(),
        "exit {:?}, stderr: {stderr}",
        out.status
    );
}
