//! Unit tests of how a configuration's problems are reported: every one in a
//! run, each at its line and column, with a "write it like" hint for a value of
//! the wrong type, and no problem that only the search itself caused.

use super::tests::{fail, MIN};
use super::*;

/// Two clients beside the `[admin]` table; the tests put problems into it.
const TWO: &str = r#"[admin]
listen = "127.0.0.1:9090"

[clients.a]
listen = "127.0.0.1:8080"
upstream = "https://api.pay.example"

[clients.a.token]
url = "https://api.pay.example/oauth2/token"
client_id = "id-a"
client_secret = "secret-a"

[clients.b]
listen = "127.0.0.1:8081"
upstream = "https://api.pay.example"

[clients.b.token]
url = "https://api.pay.example/oauth2/token"
client_id = "id-b"
client_secret = "secret-b"
"#;

fn keys(err: &ConfigError) -> Vec<&str> {
    err.errors().map(ConfigProblem::key).collect()
}

fn problem<'a>(err: &'a ConfigError, key: &str) -> &'a ConfigProblem {
    err.errors()
        .find(|p| p.key() == key)
        .unwrap_or_else(|| panic!("a problem about {key} should be reported, got:\n{err}"))
}

#[test]
fn problems_in_different_places_are_all_reported_each_with_its_line_and_column() {
    let text = TWO
        .replace(
            "listen = \"127.0.0.1:9090\"",
            "listen = \"127.0.0.1:9090\"\nlisen = \"x\"",
        )
        .replace(
            "upstream = \"https://api.pay.example\"\n\n[clients.a.token]",
            "upstream = \"https://api.pay.example\"\ntimeout = 30\n\n[clients.a.token]",
        )
        .replace(
            "listen = \"127.0.0.1:8081\"",
            "listen = \"127.0.0.1:8081\"\nunauthorized_status = 401",
        );
    let err = fail(&text);
    assert_eq!(
        keys(&err),
        [
            "admin.lisen",
            "clients.a.timeout",
            "clients.b.unauthorized_status"
        ],
        "all three problems, in file order:\n{err}"
    );
    assert_eq!(problem(&err, "admin.lisen").location(), Some((3, 1)));
    assert_eq!(problem(&err, "clients.a.timeout").location(), Some((8, 1)));
    assert_eq!(
        problem(&err, "clients.b.unauthorized_status").location(),
        Some((17, 23)),
        "a wrong type points at the value"
    );
    let text = err.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "one problem per line:\n{err}");
    assert!(
        lines[0].starts_with("tokenproxy.toml:3:1: admin.lisen: unknown key `lisen`"),
        "{err}"
    );
    assert!(
        lines[1].starts_with("tokenproxy.toml:8:1: clients.a.timeout: 30 has no unit"),
        "{err}"
    );
    assert!(
        lines[2].starts_with("tokenproxy.toml:17:23: clients.b.unauthorized_status: "),
        "{err}"
    );
    assert_eq!(err.tally(), "3 problems in tokenproxy.toml");
    // The accessors describe the first problem, as they always did.
    assert_eq!(err.key(), "admin.lisen");
    assert_eq!(err.problem(), "unknown key `lisen`");
}

#[test]
fn validation_problems_of_independent_parts_are_all_reported() {
    let text = TWO
        .replace(
            "[admin]",
            "[log]\nlevel = \"verbose\"\n\n[limits]\nmax_headers = 0\nidle_timeout = \"soon\"\n\n[admin]",
        )
        .replace("url = \"https://api.pay.example/oauth2/token\"\nclient_id = \"id-a\"",
            "url = \"https://api.pay.example/oauth2/token\"\nclient_id = \"id-a\"\ntimeout = \"0s\"")
        .replace("listen = \"127.0.0.1:8081\"", "listen = \"localhost:8081\"");
    let err = fail(&text);
    assert_eq!(
        keys(&err),
        [
            "log.level",
            "limits.max_headers",
            "limits.idle_timeout",
            "clients.a.token.timeout",
            "clients.b.listen"
        ],
        "{err}"
    );
    assert!(
        err.errors().all(|p| p.location().is_some()),
        "each validation problem is placed at its key:\n{err}"
    );
}

#[test]
fn every_safety_refusal_of_a_client_is_listed() {
    let text = MIN
        .replace("127.0.0.1:8080", "0.0.0.0:8080")
        .replace("upstream = \"https://", "upstream = \"http://")
        .replace(
            "url = \"https://api.pay.example/oauth2/token\"",
            "url = \"http://auth.pay.example/oauth2/token\"\nrefresh_url = \"http://auth.pay.example/refresh\"",
        );
    let err = fail(&text);
    assert_eq!(
        keys(&err),
        [
            "clients.payments.listen",
            "clients.payments.upstream",
            "clients.payments.token.url",
            "clients.payments.token.refresh_url"
        ],
        "{err}"
    );
}

#[test]
fn problems_that_only_the_search_caused_are_not_reported() {
    let cases = [
        // A listen of the wrong type is set aside, and is then not "required".
        (
            MIN.replace("listen = \"127.0.0.1:8080\"", "listen = 8080"),
            "clients.payments.listen",
        ),
        // A misspelt table leaves the one meant unset.
        (
            MIN.replace("[clients.payments.token]", "[clients.payments.tokn]"),
            "clients.payments.tokn",
        ),
        // allow_insecure set aside would make the public listener a refusal.
        (
            MIN.replace("127.0.0.1:8080", "0.0.0.0:8080").replace(
                "[clients.payments.token]",
                "allow_insecure = \"public_listen\"\n[clients.payments.token]",
            ),
            "clients.payments.allow_insecure",
        ),
        // A grant set aside would be client_credentials, for which a username is stray.
        (
            MIN.replace(
                "grant = \"client_credentials\"",
                "grant = 3\nusername = \"u\"\npassword = \"p\"",
            ),
            "clients.payments.token.grant",
        ),
        // A client of the wrong type is not "no client is configured".
        (
            "[clients]\npayments = \"x\"\n".to_owned(),
            "clients.payments",
        ),
        // A path_prefix set aside would make two clients clash on one listener.
        (
            format!(
                "{}\n{}",
                MIN.replace(
                    "[clients.payments.token]",
                    "path_prefix = 1\n[clients.payments.token]"
                ),
                MIN.replace("clients.payments", "clients.zeta").replace(
                    "[clients.zeta.token]",
                    "path_prefix = \"/zeta\"\n[clients.zeta.token]"
                )
            ),
            "clients.payments.path_prefix",
        ),
    ];
    for (text, key) in cases {
        let err = fail(&text);
        assert_eq!(keys(&err), [key], "only the author's problem:\n{err}");
    }
}

#[test]
fn beyond_the_limit_problems_are_counted_not_shown() {
    let extra: String = (0..MAX_SHOWN + 5)
        .map(|i| format!("unknown_{i} = 1\n"))
        .collect();
    let err = fail(&MIN.replace(
        "[clients.payments.token]",
        &format!("{extra}[clients.payments.token]"),
    ));
    assert_eq!(err.count(), MAX_SHOWN + 5, "every problem is found:\n{err}");
    let text = err.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), MAX_SHOWN + 1, "{text}");
    assert_eq!(lines[MAX_SHOWN], "and 5 more");
    assert_eq!(
        err.tally(),
        format!("{} problems in tokenproxy.toml", MAX_SHOWN + 5)
    );
}

#[test]
fn a_syntax_error_stays_the_one_error() {
    let text = TWO
        .replace("[admin]", "[admin]\nnonsense = 1")
        .replace("client_id = \"id-b\"", "client_id = \"id-b");
    let err = fail(&text);
    assert_eq!(err.count(), 1, "{err}");
    assert!(err.problem().starts_with("invalid TOML"), "{err}");
}

#[test]
fn a_value_of_the_wrong_type_says_how_to_write_it() {
    let cases = [
        (
            "unauthorized_status = 401",
            "clients.payments.unauthorized_status",
            "is a whole number, but must be a list",
            "write it like unauthorized_status = [401]",
        ),
        (
            "timeout = 30",
            "clients.payments.timeout",
            "30 has no unit",
            "write it like timeout = \"30s\"",
        ),
        (
            "retry_body_limit = true",
            "clients.payments.retry_body_limit",
            "is true or false, but must be a string or a whole number",
            "write it like retry_body_limit = \"1MiB\"",
        ),
        (
            "allow_cross_site = \"true\"",
            "clients.payments.allow_cross_site",
            "is a string, but must be true or false",
            "write it like allow_cross_site = true, without quotes",
        ),
        (
            "path_prefix = [\"/a\"]",
            "clients.payments.path_prefix",
            "is a list, but must be a string",
            "write it like path_prefix = \"/payments\"",
        ),
        (
            "tls = \"on\"",
            "clients.payments.tls",
            "is a string, but must be a table",
            "write it as a table: a [clients.payments.tls] line",
        ),
    ];
    for (line, key, problem, hint) in cases {
        let err = fail(&MIN.replace(
            "[clients.payments.token]",
            &format!("{line}\n[clients.payments.token]"),
        ));
        assert_eq!(err.key(), key, "{line}: {err}");
        assert_eq!(err.problem(), problem, "{line}: {err}");
        assert!(
            err.hint().is_some_and(|h| h.starts_with(hint)),
            "{line}: the hint should start with {hint:?}: {err}"
        );
    }
    let err = fail(&MIN.replace("[clients.payments.token]", "[[clients.payments.token]]"));
    assert_eq!(err.key(), "clients.payments.token", "{err}");
    assert_eq!(
        err.problem(),
        "is a list of tables ([[...]]), but must be one table"
    );
    assert_eq!(
        err.hint(),
        Some("write its header with single brackets, like [clients.payments.token]")
    );
    let err = fail(&MIN.replace(
        "[clients.payments.token]",
        "timeout = 2024-01-01\n[clients.payments.token]",
    ));
    assert_eq!(
        err.problem(),
        "is a date or time, but must be a string or a whole number",
        "a date is not called a table: {err}"
    );
    let err = fail(&MIN.replace("listen = \"127.0.0.1:8080\"", "listen = 8080"));
    assert_eq!(
        err.hint(),
        Some("write it like listen = \"127.0.0.1:8080\", in quotes"),
        "{err}"
    );
    let err = fail(&format!("[admin]\nlisten = 9090\n{MIN}"));
    assert!(
        err.hint()
            .is_some_and(|h| h.contains("listen = \"127.0.0.1:9090\"")),
        "the admin example is the admin default: {err}"
    );
    let err = fail(&format!("[limits]\nidle_timeout = 60\n{MIN}"));
    assert!(
        err.hint()
            .is_some_and(|h| h.starts_with("write it like idle_timeout = \"60s\"")),
        "{err}"
    );
}

#[test]
fn a_secret_of_the_wrong_type_is_never_echoed() {
    let err = fail(&MIN.replace(
        "client_secret = \"${PAY_CLIENT_SECRET}\"",
        "client_secret = 987654321",
    ));
    assert_eq!(err.key(), "clients.payments.token.client_secret");
    assert!(!err.to_string().contains("987654321"), "{err}");
    let err = fail(&MIN.replace(
        "client_secret = \"${PAY_CLIENT_SECRET}\"",
        "client_secret = { value = \"hunter2-xyz\" }",
    ));
    assert!(!err.to_string().contains("hunter2-xyz"), "{err}");
}

/// Within one table too, every problem is reported, not only the first:
/// `[admin]`, `[store]`, `[connect]` and a client's `[subjects]` and `[tls]`.
/// (With `[connect]` in error, the `[authorize]` of a client with subjects
/// cannot be judged: the next test covers it.)
#[test]
fn every_problem_within_one_table_is_reported() {
    let text = super::tests::connect_config(
        r#"listen = "nowhere"
public_url = "https://connect.platform.example/"
return_to = ["https://app.platform.example", "http://evil.example/"]
session_ttl = "48h"

[admin]
listen = "127.0.0.1"
api_key = "short"
max_connections = 0
allowed_hosts = ["a/b", "c@d"]

[store]
kind = "memory"
path = "/var/lib/tokenproxy/tokens.json"
url = "redis://127.0.0.1:6379/0"
"#,
    )
    .replace(
        "params = { prompt = \"consent\" }",
        "params = { prompt = \"consent\", state = \"fixed\" }\nredirect_port = 70000",
    )
    .replace(
        "[clients.pos.subjects]\n",
        "[clients.pos.subjects]\nheader = \"not a header\"\nmax_cached = 0\n\n\
         [clients.pos.tls]\nserver_name = \"not a name!\"\nmin_version = \"1.1\"\n\
         client_cert_file = \"/pki/client.pem\"\n",
    );
    let err = fail(&text);
    let expected = [
        "connect.listen",
        "connect.public_url",
        "connect.return_to[0]",
        "connect.return_to[1]",
        "connect.session_ttl",
        "admin.listen",
        "admin.api_key",
        "admin.max_connections",
        "admin.allowed_hosts",
        "store.path",
        "store.url",
        "clients.pos.subjects.header",
        "clients.pos.subjects.max_cached",
        "clients.pos.tls.server_name",
        "clients.pos.tls.min_version",
        "clients.pos.tls.client_key_file",
    ];
    let reported = keys(&err);
    let missing: Vec<&&str> = expected.iter().filter(|k| !reported.contains(k)).collect();
    assert!(missing.is_empty(), "not reported: {missing:?} in:\n{err}");
    assert_eq!(
        reported
            .iter()
            .filter(|k| **k == "admin.allowed_hosts")
            .count(),
        2,
        "each bad host is named:\n{err}"
    );
}

#[test]
fn every_problem_of_an_authorize_table_is_reported() {
    let text = format!(
        "{MIN}\n[clients.payments.authorize]\nurl = \"https://api.pay.example/authorize\"\n\
         params = {{ prompt = \"consent\", state = \"fixed\", response_type = \"token\" }}\nredirect_port = 70000\n"
    );
    let err = fail(&text);
    assert_eq!(
        keys(&err),
        [
            "clients.payments.authorize.params.state",
            "clients.payments.authorize.params.response_type",
            "clients.payments.authorize.redirect_port"
        ],
        "{err}"
    );
}
