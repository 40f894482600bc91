//! `tokenproxy demo`: the URLs it prints are the addresses it bound (a taken
//! port falls back to a free one, and the banner shows that one); and its
//! marketplace: a newcomer opens a printed connect link, signs in at the mock
//! provider as the merchant, and requests naming that merchant then carry its
//! own token.
//!
//! The demo binary runs as a child process; the test reads what it prints and
//! acts as the browser with plain HTTP (one cookie), as tests/it/connect.rs does.

use crate::support;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::{Method, StatusCode};
use support::{hidden_inputs, Reply, TestClient};
use tokio::sync::mpsc;

/// The demo process; killed when the test ends, however it ends.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        // Best effort: the process may have exited already.
        let _killed = self.0.kill();
        let _reaped = self.0.wait();
    }
}

/// The demo's output, line by line: stdout (the banner) and stderr (notices, logs).
struct Output {
    stdout: mpsc::UnboundedReceiver<String>,
    stderr: mpsc::UnboundedReceiver<String>,
}

/// Starts the demo on free ports; returns it and its output.
fn start_demo() -> (Demo, Output) {
    start_demo_on("127.0.0.1:0", "127.0.0.1:0")
}

/// Starts the demo with its sidecar on `listen` and its admin listener on
/// `admin`, everything else on free ports.
fn start_demo_on(listen: &str, admin: &str) -> (Demo, Output) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenproxy"))
        .arg("demo")
        .args(["--listen", listen, "--admin", admin])
        .args(["--wallet-listen", "127.0.0.1:0", "--redirect-port", "0"])
        .args(["--market-listen", "127.0.0.1:0"])
        .args(["--connect-listen", "127.0.0.1:0"])
        .args(["--interval", "10s", "--exit-after", "60s"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the demo starts");
    let stdout = lines_of(child.stdout.take().expect("stdout"));
    let stderr = lines_of(child.stderr.take().expect("stderr"));
    (Demo(child), Output { stdout, stderr })
}

/// The lines of a pipe, read to the end on a thread so the demo never blocks
/// on a full pipe.
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            // The test may have stopped listening; keep draining the pipe anyway.
            let _unheard = tx.send(line);
        }
    });
    rx
}

/// The demo's start-up text, up to the last line of its marketplace section.
async fn banner(lines: &mut mpsc::UnboundedReceiver<String>) -> String {
    let mut text = String::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.recv())
            .await
            .unwrap_or_else(|_| panic!("the demo printed no marketplace section:\n{text}"))
            .unwrap_or_else(|| panic!("the demo ended early:\n{text}"));
        text.push_str(&line);
        text.push('\n');
        if line.contains("tokenproxy subjects list market --config ") {
            return text;
        }
    }
}

/// The first URL on the first line that starts with `start` (after
/// indentation) and holds one.
fn url_after<'a>(banner: &'a str, start: &str) -> &'a str {
    banner
        .lines()
        .map(str::trim)
        .find_map(|l| {
            l.strip_prefix(start)
                .and_then(|rest| rest.split_whitespace().find(|w| w.starts_with("http://")))
        })
        .unwrap_or_else(|| panic!("no line starting {start:?} with a URL in:\n{banner}"))
}

fn location(r: &Reply) -> String {
    r.headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("a redirect with a Location: {} {}", r.status, r.text()))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_connects_through_the_demos_printed_link_and_its_requests_carry_its_token() {
    let (_demo, mut output) = start_demo();
    let banner = banner(&mut output.stdout).await;
    let link = url_after(&banner, "merchant-a ");
    let market_request = url_after(&banner, "curl -i -H 'x-tokenproxy-subject: merchant-a'");
    assert!(
        market_request.ends_with("/merchants/merchant-a/payments"),
        "the demo shows a request for merchant-a: {market_request}"
    );
    let market = market_request.trim_end_matches("/merchants/merchant-a/payments");
    let http = TestClient::new();

    // Before connecting, merchant-a is unknown to the sidecar.
    let pay = |subject: &'static str| {
        let http = http.clone();
        let url = market_request.to_owned();
        async move {
            http.request(Method::GET, &url, &[("x-tokenproxy-subject", subject)], b"")
                .await
        }
    };
    assert_eq!(
        pay("merchant-a").await.error_code(),
        Some("subject_unknown")
    );

    // The browser opens the link: a cookie and a redirect to the sign-in page.
    let opened = http.request(Method::GET, link, &[], b"").await;
    assert_eq!(opened.status, StatusCode::FOUND, "{}", opened.text());
    let cookie = opened
        .headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.split(';').next())
        .expect("the link sets the connect cookie")
        .to_owned();
    let sign_in = location(&opened);
    let page = http.get(&sign_in).await;
    assert_eq!(page.status, StatusCode::OK, "sign-in page: {}", page.text());

    // Signs in as merchant-a, with the password the demo names, and approves.
    let mut form = form_urlencoded::Serializer::new(String::new());
    for (k, v) in hidden_inputs(&page.text()) {
        form.append_pair(&k, &v);
    }
    form.append_pair("username", "merchant-a");
    form.append_pair("password", "merchant-a-password");
    form.append_pair("decision", "approve");
    let action = sign_in.split('?').next().expect("url");
    let signed_in = http
        .request(
            Method::POST,
            action,
            &[("content-type", "application/x-www-form-urlencoded")],
            form.finish().as_bytes(),
        )
        .await;
    assert_eq!(
        signed_in.status,
        StatusCode::FOUND,
        "merchant-a / merchant-a-password signs in: {}",
        signed_in.text()
    );
    let callback = location(&signed_in);
    let back = http
        .request(Method::GET, &callback, &[("cookie", cookie.as_str())], b"")
        .await;
    assert_eq!(back.status, StatusCode::FOUND, "{}", back.text());
    let done = location(&back);
    assert!(
        done.ends_with("?subject=merchant-a&status=connected"),
        "the browser is sent to the done page with the outcome: {done}"
    );
    let page = http.get(&done).await;
    assert_eq!(page.status, StatusCode::OK, "the done page needs no token");
    assert!(
        page.text().contains("merchant-a is connected"),
        "{}",
        page.text()
    );

    // merchant-a's requests carry merchant-a's token (the mock API refuses
    // /merchants/merchant-a/... with any other account's token).
    let r = pay("merchant-a").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(
        r.json()["headers"].get("x-tokenproxy-subject").is_none(),
        "the subject header is not forwarded: {}",
        r.text()
    );
    // merchant-b has not connected: nothing of merchant-a's is used for it.
    assert_eq!(
        pay("merchant-b").await.error_code(),
        Some("subject_unknown")
    );
    let r = http
        .get(&format!("{market}/merchants/merchant-a/payments"))
        .await;
    assert_eq!(r.error_code(), Some("subject_required"), "{}", r.text());
}

/// A newcomer whose ports 8080 and 9090 are taken still gets URLs that work:
/// the demo falls back to free ports, says so, and prints the addresses it
/// bound, so the printed curl commands reach its sidecar and admin listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_prints_the_addresses_it_bound_when_the_ones_asked_for_are_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to occupy");
    let taken_admin = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to occupy");
    let (listen, admin) = (
        taken.local_addr().expect("addr").to_string(),
        taken_admin.local_addr().expect("addr").to_string(),
    );
    let (_demo, mut output) = start_demo_on(&listen, &admin);
    let banner = banner(&mut output.stdout).await;

    let sidecar = url_after(&banner, "tokenproxy ");
    let shown_admin = url_after(&banner, "admin ");
    for (shown, asked) in [(sidecar, &listen), (shown_admin, &admin)] {
        assert_ne!(
            shown,
            format!("http://{asked}"),
            "{asked} is taken, so the banner must show the free port used instead:\n{banner}"
        );
    }
    let mut notices = String::new();
    let said = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = output.stderr.recv().await {
            notices.push_str(&line);
            notices.push('\n');
            let fallback = |asked: &str, shown: &str| {
                notices.contains(&format!(
                    "{asked} is in use; using {} instead",
                    shown.trim_start_matches("http://")
                ))
            };
            if fallback(&listen, sidecar) && fallback(&admin, shown_admin) {
                return;
            }
        }
    })
    .await;
    assert!(
        said.is_ok(),
        "stderr names each taken address and the one used instead:\n{notices}"
    );

    // The printed commands work as printed.
    let http = TestClient::new();
    let through = url_after(&banner, "curl -i ");
    assert_eq!(
        through,
        format!("{sidecar}/api/v1/payments"),
        "the first curl goes through the sidecar:\n{banner}"
    );
    let r = http.get(through).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "through the sidecar: {}",
        r.text()
    );
    assert!(
        r.json()["token_serial"].as_u64().is_some(),
        "the API saw a token: {}",
        r.text()
    );
    let api = url_after(&banner, "mock payments API ");
    let direct = http.get(&format!("{api}/api/v1/payments")).await;
    assert_eq!(
        direct.status,
        StatusCode::UNAUTHORIZED,
        "the mock API itself wants a token: {}",
        direct.text()
    );
    let status = http.get(&format!("{shown_admin}/status")).await;
    assert_eq!(status.status, StatusCode::OK, "{}", status.text());
    assert!(
        status.text().contains("payments"),
        "/status on the printed admin address lists the demo's clients: {}",
        status.text()
    );
    drop((taken, taken_admin));
}
