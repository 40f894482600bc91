//! DNS rebinding and cross-site requests: a listener answers only to its own
//! names as `Host`, and a proxy listener refuses what a browser marks as sent
//! by a page of another site, before anything reaches the upstream. Admin
//! reads stay open to any Host (kubelet probes use the pod IP); admin writes
//! do not.

use crate::support;

use http::{Method, StatusCode};
use support::{harness, wait_ready, Options};

type Headers<'a> = &'a [(&'a str, &'a str)];

const KEYED_ADMIN: &str = r#"
[admin]
listen = "{admin}"
api_key = "admin-key-3f9c2a7d51e84b06"

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

/// Security review finding 6: a request whose Host is another name (a page on
/// a name re-pointed at 127.0.0.1) gets 421 and never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_foreign_host_never_reaches_the_upstream() {
    let h = harness(Options::default()).await;
    wait_ready(&h).await;
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let before = h.api.requests();
    for host in ["evil.example", &format!("evil.example:{}", h.proxy.port())] {
        let r = h
            .http
            .request(Method::GET, &url, &[("host", host)], b"")
            .await;
        assert_eq!(
            r.status,
            StatusCode::MISDIRECTED_REQUEST,
            "Host {host} is refused: {}",
            r.text()
        );
        assert_eq!(r.error_code(), Some("misdirected_request"));
        assert_eq!(r.json()["error"], "misdirected_request");
    }
    assert_eq!(
        h.api.requests(),
        before,
        "no refused request reached the upstream"
    );
    for host in [
        format!("localhost:{}", h.proxy.port()),
        format!("127.0.0.1:{}", h.proxy.port()),
    ] {
        let r = h
            .http
            .request(Method::GET, &url, &[("host", &host)], b"")
            .await;
        assert_eq!(r.status, StatusCode::OK, "Host {host} passes: {}", r.text());
    }
    assert_eq!(h.api.requests(), before + 2);
}

/// Security review finding 6: a payment POSTed by a page of another site (an
/// HTML form or `fetch` in no-cors mode) is refused; with `allowed_hosts` an
/// alias passes as Host and Origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_post_never_reaches_the_upstream() {
    let h = harness(Options::default().client(r#"allowed_hosts = ["payments.internal"]"#)).await;
    wait_ready(&h).await;
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let before = h.api.requests();
    let form = ("content-type", "application/x-www-form-urlencoded");
    for browser in [
        [("origin", "http://evil.example"), form],
        [("sec-fetch-site", "cross-site"), form],
        [("origin", "null"), form],
    ] {
        let r = h
            .http
            .request(Method::POST, &url, &browser, b"amount=1000")
            .await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "{browser:?} is refused: {}",
            r.text()
        );
        assert_eq!(r.error_code(), Some("cross_site_request"));
    }
    assert_eq!(
        h.api.requests(),
        before,
        "no cross-site request reached the upstream"
    );
    let alias = format!("payments.internal:{}", h.proxy.port());
    let origin = format!("http://{alias}");
    let r = h
        .http
        .request(
            Method::POST,
            &url,
            &[
                ("host", alias.as_str()),
                ("origin", origin.as_str()),
                ("content-type", "application/json"),
            ],
            b"{\"amount\":1}",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
}

/// Security review finding 6: `allow_cross_site = true` lets browsers call a
/// client; the Host rule still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_cross_site_lets_browsers_in_but_not_foreign_hosts() {
    let h = harness(Options::default().client("allow_cross_site = true")).await;
    wait_ready(&h).await;
    let url = format!("http://{}/api/v1/payments", h.proxy);
    let r = h
        .http
        .request(
            Method::GET,
            &url,
            &[
                ("origin", "https://app.example"),
                ("sec-fetch-site", "cross-site"),
            ],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = h
        .http
        .request(Method::GET, &url, &[("host", "evil.example")], b"")
        .await;
    assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST);
}

/// Security review finding 6: a browser-like admin write (another site's
/// Origin, or a rebound Host) is refused even with the right key, while probes
/// and scrapes with any Host are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_writes_from_a_browser_are_refused_and_reads_stay_open() {
    let h = harness(Options {
        template: KEYED_ADMIN,
        ..Options::default()
    })
    .await;
    wait_ready(&h).await;
    let write = format!("http://{}/clients/payments/refresh-token", h.admin);
    let bearer = "Bearer admin-key-3f9c2a7d51e84b06";
    let cases: [(Headers<'_>, StatusCode, &str); 3] = [
        (
            &[
                ("authorization", bearer),
                ("origin", "http://evil.example"),
                ("content-type", "text/plain"),
            ],
            StatusCode::FORBIDDEN,
            "cross_site_request",
        ),
        (
            &[("authorization", bearer), ("sec-fetch-site", "cross-site")],
            StatusCode::FORBIDDEN,
            "cross_site_request",
        ),
        (
            &[("authorization", bearer), ("host", "evil.example:9090")],
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected_request",
        ),
    ];
    for (headers, status, code) in cases {
        let r = h
            .http
            .request(Method::POST, &write, headers, b"rt-from-a-web-page")
            .await;
        assert_eq!(r.status, status, "{headers:?}: {}", r.text());
        assert_eq!(r.error_code(), Some(code));
    }
    let probe = h
        .http
        .request(
            Method::GET,
            &format!("http://{}/healthz", h.admin),
            &[("host", "10.1.2.3:9090")],
            b"",
        )
        .await;
    assert_eq!(probe.status, StatusCode::OK, "a kubelet probe is answered");
    let scrape = h
        .http
        .request(
            Method::GET,
            &format!("http://{}/metrics", h.admin),
            &[("host", "tokenproxy.payments.svc:9090")],
            b"",
        )
        .await;
    assert_eq!(scrape.status, StatusCode::OK, "a scrape is answered");
}
