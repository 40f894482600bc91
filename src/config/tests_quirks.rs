//! Unit tests of the provider-quirk keys of `[clients.NAME.token]`: `headers`,
//! the `response` mapping and the `errors` rules, each read and each refused
//! with its key, its place and a fix.

use super::tests::MIN;
use super::*;

fn env() -> MapEnv {
    MapEnv::new()
        .var("PAY_CLIENT_SECRET", "s3cret-value")
        .var("POS_VERSION", "2026-01-22")
        .var("API_KEY", "key-Zq81-value")
        .var("NEWLINE", "a\r\nInjected: yes")
}

fn with(extra: &str) -> String {
    format!("{MIN}{extra}\n")
}

fn token(extra: &str) -> TokenConfig {
    match from_str(&with(extra), Some(Path::new("tokenproxy.toml")), &env()) {
        Ok(mut c) => c.clients.remove(0).token,
        Err(e) => panic!("config should be valid, got:\n{e}"),
    }
}

fn fail(extra: &str) -> ConfigError {
    match from_str(&with(extra), Some(Path::new("tokenproxy.toml")), &env()) {
        Ok(c) => panic!("config should be rejected, got: {c:?}"),
        Err(e) => e,
    }
}

fn problem<'a>(err: &'a ConfigError, key: &str) -> &'a ConfigProblem {
    err.errors()
        .find(|p| p.key() == key)
        .unwrap_or_else(|| panic!("a problem about {key} should be reported, got:\n{err}"))
}

fn summary(extra: &str) -> String {
    match from_str(&with(extra), Some(Path::new("tokenproxy.toml")), &env()) {
        Ok(c) => c.summary(),
        Err(e) => panic!("config should be valid, got:\n{e}"),
    }
}

// --- token.headers -------------------------------------------------------------------

#[test]
fn headers_are_read_sorted_with_variables_expanded() {
    let t = token(
        r#"headers = { "Square-Version" = "${POS_VERSION}", "X-Api-Key" = "${API_KEY}", Accept = "application/vnd.pos+json" }"#,
    );
    let shown: Vec<(&str, &str)> = t
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.to_str().unwrap_or("(not text)")))
        .collect();
    assert_eq!(
        shown,
        [
            ("accept", "application/vnd.pos+json"),
            ("square-version", "2026-01-22"),
            ("x-api-key", "key-Zq81-value"),
        ],
        "every header, by name, with ${{VAR}} expanded"
    );
    let sensitive: Vec<bool> = t.headers.iter().map(|(_, v)| v.is_sensitive()).collect();
    assert_eq!(
        sensitive,
        [false, false, true],
        "a header named like a credential is marked sensitive"
    );
}

#[test]
fn check_shows_header_values_but_not_those_named_like_credentials() {
    let text =
        summary(r#"headers = { "Square-Version" = "2026-01-22", "X-Api-Key" = "${API_KEY}" }"#);
    assert!(
        text.contains("token.headers") && text.contains("square-version: 2026-01-22"),
        "the version header is shown:\n{text}"
    );
    assert!(
        text.contains("x-api-key: [redacted]") && !text.contains("key-Zq81-value"),
        "an API key header is not shown:\n{text}"
    );
    assert!(
        !summary("").contains("token.headers"),
        "no headers row without headers"
    );
}

#[test]
fn headers_tokenproxy_sets_are_refused_each_with_its_key_and_place() {
    let err = fail(
        "headers = { \"Content-Type\" = \"text/plain\", Host = \"auth.example\", \
         Connection = \"close\", \"Content-Length\" = \"0\", DPoP = \"x\", \
         \"Transfer-Encoding\" = \"chunked\", \"Square-Version\" = \"2026-01-22\" }",
    );
    for (key, why) in [
        ("Content-Type", "follows token.body"),
        ("Host", "follows token.url"),
        ("Connection", "hop-by-hop"),
        ("Content-Length", "computed"),
        ("DPoP", "proof"),
        ("Transfer-Encoding", "hop-by-hop"),
    ] {
        let p = problem(&err, &format!("clients.payments.token.headers.{key}"));
        assert!(
            p.problem().contains("is set by tokenproxy") && p.problem().contains(why),
            "{key}: {}",
            p.problem()
        );
        assert_eq!(p.hint(), Some("remove it from headers"));
        assert_eq!(
            p.location().map(|(line, _)| line),
            Some(11),
            "{key} is placed on the headers line"
        );
    }
    assert_eq!(err.count(), 6, "Square-Version is fine:\n{err}");
}

#[test]
fn authorization_is_refused_only_when_client_auth_sends_credentials_in_it() {
    for auth in ["basic", "both"] {
        let err = fail(&format!(
            "client_auth = \"{auth}\"\nheaders = {{ Authorization = \"Bearer x\" }}"
        ));
        let p = problem(&err, "clients.payments.token.headers.Authorization");
        assert!(
            p.problem().contains("carries the client credentials") && p.problem().contains(auth),
            "{}",
            p.problem()
        );
    }
    let default_auth = fail(r#"headers = { authorization = "Bearer x" }"#);
    problem(
        &default_auth,
        "clients.payments.token.headers.authorization",
    );

    let text = MIN.replace("client_secret = \"${PAY_CLIENT_SECRET}\"\n", "");
    let config = from_str(
        &format!("{text}client_auth = \"none\"\nheaders = {{ Authorization = \"Bearer ${{API_KEY}}\" }}\n"),
        None,
        &env(),
    )
    .unwrap_or_else(|e| panic!("a client sending no credentials may send Authorization: {e}"));
    let (name, value) = &config.clients[0].token.headers[0];
    assert_eq!(name, http::header::AUTHORIZATION);
    assert!(value.is_sensitive(), "an Authorization value is sensitive");
    assert!(
        !config.summary().contains("key-Zq81-value"),
        "and never shown by check"
    );
}

#[test]
fn a_bad_header_name_value_or_duplicate_is_refused() {
    let err = fail(
        "headers = { \"Bad Name\" = \"x\", \"X-Line\" = \"${NEWLINE}\", \"X-Empty\" = \" \", \
         \"X-Twice\" = \"1\", \"x-twice\" = \"2\", \"X-Missing\" = \"${NOT_SET}\" }",
    );
    let p = problem(&err, "clients.payments.token.headers.Bad Name");
    assert!(
        p.problem().contains("is not a header name"),
        "{}",
        p.problem()
    );
    let p = problem(&err, "clients.payments.token.headers.X-Line");
    assert!(
        p.problem().contains("is not a valid header value") && !p.problem().contains("Injected"),
        "a value with CR/LF is refused without echoing it: {}",
        p.problem()
    );
    let p = problem(&err, "clients.payments.token.headers.X-Empty");
    assert_eq!(p.problem(), "is empty");
    let p = problem(&err, "clients.payments.token.headers.x-twice");
    assert!(p.problem().contains("given twice"), "{}", p.problem());
    let p = problem(&err, "clients.payments.token.headers.X-Missing");
    assert!(p.problem().contains("NOT_SET"), "{}", p.problem());
    assert_eq!(err.count(), 5, "{err}");
}

// --- [clients.NAME.token.response] ------------------------------------------------------

#[test]
fn the_response_mapping_reads_names_dotted_paths_and_units() {
    let t = token(
        "[clients.payments.token.response]\n\
         access_token = \"data.token\"\n\
         refresh_token = \"refreshToken\"\n\
         token_type = \"kind\"\n\
         scope = \"grants\"\n\
         expires_in = \"data.ttl\"\n\
         expires_at = \"access_token_expiration\"\n\
         expires_at_unit = \"epoch_seconds\"\n\
         refresh_token_expires_in = \"rt.ttl\"\n\
         refresh_token_expires_at = \"refresh_token_expiration\"\n\
         refresh_token_expires_at_unit = \"epoch_millis\"",
    );
    let r = &t.response;
    let path = |p: &Option<FieldPath>| p.as_ref().map(|p| p.segments().join("/"));
    assert_eq!(path(&r.access_token).as_deref(), Some("data/token"));
    assert_eq!(path(&r.refresh_token).as_deref(), Some("refreshToken"));
    assert_eq!(path(&r.token_type).as_deref(), Some("kind"));
    assert_eq!(path(&r.scope).as_deref(), Some("grants"));
    assert_eq!(path(&r.expires_in).as_deref(), Some("data/ttl"));
    assert_eq!(
        path(&r.expires_at).as_deref(),
        Some("access_token_expiration")
    );
    assert_eq!(r.expires_at_unit, Some(TimestampUnit::EpochSeconds));
    assert_eq!(path(&r.refresh_token_expires_in).as_deref(), Some("rt/ttl"));
    assert_eq!(
        path(&r.refresh_token_expires_at).as_deref(),
        Some("refresh_token_expiration")
    );
    assert_eq!(
        r.refresh_token_expires_at_unit,
        Some(TimestampUnit::EpochMillis)
    );
    assert!(!r.is_standard());
    assert!(
        token("").response.is_standard(),
        "no table: the standard names"
    );
}

#[test]
fn the_product_inline_form_of_the_response_mapping_is_accepted() {
    let t = token(
        r#"response = { expires_at = "access_token_expiration", expires_at_unit = "epoch_seconds" }"#,
    );
    assert_eq!(
        t.response.expires_at.map(|p| p.to_string()).as_deref(),
        Some("access_token_expiration")
    );
    assert_eq!(
        t.response.expires_at_unit,
        Some(TimestampUnit::EpochSeconds)
    );
    let text = summary(
        r#"response = { expires_at = "access_token_expiration", expires_at_unit = "epoch_seconds" }"#,
    );
    assert!(
        text.contains("expires_at <- access_token_expiration, expires_at_unit = epoch_seconds"),
        "check shows the mapping:\n{text}"
    );
}

#[test]
fn a_bad_response_mapping_reports_every_problem_with_its_key() {
    let err = fail(
        "[clients.payments.token.response]\n\
         access_token = \"data..token\"\n\
         refresh_token = \"\"\n\
         expires_at_unit = \"seconds\"\n\
         expires_in = \"ttl\"\n\
         refresh_token_expires_in = \"ttl\"\n\
         expire_at = \"x\"",
    );
    let p = problem(&err, "clients.payments.token.response.access_token");
    assert!(p.problem().contains("has an empty part"), "{}", p.problem());
    assert_eq!(p.location(), Some((12, 1)));
    let p = problem(&err, "clients.payments.token.response.refresh_token");
    assert_eq!(p.problem(), "is empty");
    let p = problem(&err, "clients.payments.token.response.expires_at_unit");
    assert!(
        p.problem().contains("\"seconds\" is not an accepted value")
            && p.hint()
                .is_some_and(|h| h.contains("\"epoch_seconds\", \"epoch_millis\", \"rfc3339\"")),
        "{p:?}"
    );
    let p = problem(
        &err,
        "clients.payments.token.response.refresh_token_expires_in",
    );
    assert!(
        p.problem().contains("which expires_in reads too"),
        "{}",
        p.problem()
    );
    let p = problem(&err, "clients.payments.token.response.expire_at");
    assert_eq!(
        p.location(),
        Some((17, 1)),
        "an unknown key is placed too: {p:?}"
    );
}

#[test]
fn a_field_that_would_read_a_token_is_refused_so_the_token_never_shows_as_it() {
    let err = fail(
        "[clients.payments.token.response]\n\
         token_type = \"access_token\"\n\
         expires_in = \"refreshToken\"\n\
         scope = \"accessToken\"",
    );
    for (key, problem_text) in [
        (
            "token_type",
            "reads \"access_token\", where the access token is read",
        ),
        (
            "expires_in",
            "reads \"refreshToken\", where the refresh token is read",
        ),
        (
            "scope",
            "reads \"accessToken\", where the access token is read",
        ),
    ] {
        let p = problem(&err, &format!("clients.payments.token.response.{key}"));
        assert!(p.problem().contains(problem_text), "{key}: {p:?}");
    }
    assert_eq!(err.count(), 3, "{err}");
    // A token mapped elsewhere frees its standard name, and a field may read
    // another field's standard name.
    let t = token(
        "[clients.payments.token.response]\n\
         access_token = \"data.token\"\n\
         scope = \"access_token\"\n\
         expires_in = \"expires_at\"",
    );
    assert_eq!(
        t.response.scope.map(|p| p.to_string()).as_deref(),
        Some("access_token")
    );
}

// --- [[clients.NAME.token.errors]] ------------------------------------------------------

const RULES: &str = r#"
[[clients.payments.token.errors]]
status = 500
body_contains = "INVALID_CREDENTIALS"
means = "rejected"

[[clients.payments.token.errors]]
error = "invalid_grant"
means = "transient"

[[clients.payments.token.errors]]
status = "401"
error = "REFRESH_TOKEN_EXPIRED"
means = "needs_authorization"
"#;

#[test]
fn error_rules_are_read_in_order() {
    let t = token(RULES);
    assert_eq!(
        t.errors,
        [
            ErrorRule {
                status: Some(StatusCode::INTERNAL_SERVER_ERROR),
                error: None,
                body_contains: Some("INVALID_CREDENTIALS".to_owned()),
                means: ErrorMeaning::Rejected,
            },
            ErrorRule {
                status: None,
                error: Some("invalid_grant".to_owned()),
                body_contains: None,
                means: ErrorMeaning::Transient,
            },
            ErrorRule {
                status: Some(StatusCode::UNAUTHORIZED),
                error: Some("REFRESH_TOKEN_EXPIRED".to_owned()),
                body_contains: None,
                means: ErrorMeaning::NeedsAuthorization,
            },
        ]
    );
    let text = summary(RULES);
    assert!(
        text.contains("token.errors[0]")
            && text.contains("status 500 and body contains \"INVALID_CREDENTIALS\" -> rejected")
            && text
                .contains("status 401 and error \"REFRESH_TOKEN_EXPIRED\" -> needs_authorization"),
        "check lists the rules:\n{text}"
    );
    let inline = token(r#"errors = [{ status = 500, means = "transient" }]"#);
    assert_eq!(inline.errors.len(), 1, "an inline array works too");
}

#[test]
fn each_bad_rule_is_reported_at_its_own_table() {
    let err = fail(
        r#"
[[clients.payments.token.errors]]
status = 500
means = "rejected"

[[clients.payments.token.errors]]
status = 200
means = "rejected"

[[clients.payments.token.errors]]
body_contains = "x"
means = "retry"

[[clients.payments.token.errors]]
body_contains = "INVALID"

[[clients.payments.token.errors]]
means = "transient"
"#,
    );
    let p = problem(&err, "clients.payments.token.errors[1].status");
    assert_eq!(p.problem(), "must be at least 400");
    assert_eq!(p.location(), Some((17, 1)), "in the second rule");
    let p = problem(&err, "clients.payments.token.errors[2].means");
    assert!(
        p.problem().contains("\"retry\" is not an accepted value")
            && p.hint()
                .is_some_and(|h| h.contains("\"needs_authorization\"")),
        "{p:?}"
    );
    assert_eq!(p.location(), Some((22, 1)));
    let p = problem(&err, "clients.payments.token.errors[3].means");
    assert_eq!(p.problem(), "is required");
    assert_eq!(
        p.location(),
        Some((24, 1)),
        "a missing key points at its rule's header"
    );
    let p = problem(&err, "clients.payments.token.errors[4]");
    assert!(
        p.problem().contains("matches nothing in particular")
            && p.hint()
                .is_some_and(|h| h.contains("status, error or body_contains")),
        "{p:?}"
    );
    assert_eq!(p.location(), Some((27, 1)));
    assert_eq!(err.count(), 4, "the first rule is fine:\n{err}");
}

#[test]
fn a_rule_with_a_misspelt_or_mistyped_key_is_placed_and_written_like() {
    let err = fail(
        r#"
[[clients.payments.token.errors]]
status = 500
means = "rejected"

[[clients.payments.token.errors]]
stauts = 500
means = "rejected"

[[clients.payments.token.errors]]
status = 500
means = ["rejected"]
"#,
    );
    let misspelt = problem(&err, "clients.payments.token.errors[1].stauts");
    assert_eq!(misspelt.location(), Some((17, 1)), "{misspelt:?}");
    let mistyped = problem(&err, "clients.payments.token.errors[2].means");
    assert_eq!(mistyped.location(), Some((22, 9)), "{mistyped:?}");
    assert_eq!(
        mistyped.hint(),
        Some("write it like means = \"rejected\""),
        "{mistyped:?}"
    );
}

// --- generated response mappings --------------------------------------------------------

/// The path keys of `[token.response]`, in the order duplicates are judged.
const PATH_KEYS: [&str; 8] = [
    "access_token",
    "refresh_token",
    "token_type",
    "scope",
    "expires_in",
    "expires_at",
    "refresh_token_expires_in",
    "refresh_token_expires_at",
];

const UNIT_KEYS: [&str; 2] = ["expires_at_unit", "refresh_token_expires_at_unit"];

/// One generated value of a `[token.response]` key, as TOML, and whether it is valid.
fn generated_value(rng: &mut fastrand::Rng, key: &str) -> (String, Option<String>) {
    const SEGMENTS: [&str; 9] = [
        "data",
        "token",
        "accessToken",
        "é",
        "with space",
        "0",
        " ",
        "",
        "\t",
    ];
    const UNITS: [&str; 6] = [
        "epoch_seconds",
        "epoch_millis",
        "rfc3339",
        "seconds",
        "",
        "epoch",
    ];
    match rng.u8(..12) {
        0 => ("3600".into(), None),
        1 => ("[\"data\"]".into(), None),
        _ if UNIT_KEYS.contains(&key) => {
            let unit = UNITS[rng.usize(..UNITS.len())];
            let valid = valid_unit(unit);
            (toml_string(unit), valid.then(|| unit.to_owned()))
        }
        _ => {
            let segments: Vec<&str> = (0..rng.usize(1..=3))
                .map(|_| SEGMENTS[rng.usize(..SEGMENTS.len())])
                .collect();
            let text = segments.join(".");
            let valid = segments.iter().all(|s| !s.is_empty());
            (toml_string(&text), valid.then_some(text))
        }
    }
}

fn valid_unit(unit: &str) -> bool {
    ["epoch_seconds", "epoch_millis", "rfc3339"].contains(&unit)
}

fn toml_string(text: &str) -> String {
    // A JSON string is a TOML basic string for this text (no control characters but \t).
    serde_json::to_string(text).unwrap_or_default()
}

/// Many generated `[token.response]` tables, valid and broken: a valid one is
/// read as written (every path as its text, every unit as its name); a broken
/// one is refused with a problem at each bad key, and at no other.
#[test]
fn generated_response_mappings_are_read_as_written_or_refused_at_each_bad_key() {
    let mut rng = fastrand::Rng::with_seed(0x5eed_0319);
    let (mut valid_cases, mut refused_cases) = (0, 0);
    for case in 0..3000 {
        let mut table = String::from("[clients.payments.token.response]\n");
        let mut want: Vec<(&str, Option<String>)> = Vec::new();
        let mut type_error = false;
        for key in PATH_KEYS.iter().chain(UNIT_KEYS.iter()) {
            if rng.u8(..3) == 0 {
                continue;
            }
            let (toml, valid) = generated_value(&mut rng, key);
            type_error |= !toml.starts_with('"');
            table.push_str(&format!("{key} = {toml}\n"));
            want.push((key, valid));
        }
        // A path that an earlier field reads already is refused at the later
        // key; so is a token's standard name read by another field while that
        // token is not mapped.
        let mapped = |token: &str| want.iter().any(|(k, v)| *k == token && v.is_some());
        let unmapped_token_names: Vec<&str> = [
            ("access_token", ["access_token", "accessToken"]),
            ("refresh_token", ["refresh_token", "refreshToken"]),
        ]
        .iter()
        .filter(|(token, _)| !mapped(token))
        .flat_map(|(_, names)| *names)
        .collect();
        let mut read: Vec<String> = Vec::new();
        for (key, valid) in &mut want {
            let Some(path) = valid.clone().filter(|_| PATH_KEYS.contains(key)) else {
                continue;
            };
            let is_token = ["access_token", "refresh_token"].contains(key);
            if read.contains(&path) || (!is_token && unmapped_token_names.contains(&path.as_str()))
            {
                *valid = None;
            }
            read.push(path);
        }
        let bad: Vec<String> = want
            .iter()
            .filter(|(_, valid)| valid.is_none())
            .map(|(key, _)| format!("clients.payments.token.response.{key}"))
            .collect();
        match from_str(&with(&table), None, &env()) {
            Ok(mut config) => {
                assert!(bad.is_empty(), "case {case}: {bad:?} accepted in\n{table}");
                valid_cases += 1;
                let response = config.clients.remove(0).token.response;
                for (key, valid) in &want {
                    let shown = match *key {
                        "expires_at_unit" => response.expires_at_unit.map(|u| u.as_str().into()),
                        "refresh_token_expires_at_unit" => response
                            .refresh_token_expires_at_unit
                            .map(|u| u.as_str().into()),
                        _ => response
                            .fields()
                            .find(|(k, _)| k == key)
                            .map(|(_, p)| p.to_string()),
                    };
                    assert_eq!(&shown, valid, "case {case}: {key} in\n{table}");
                }
            }
            Err(err) => {
                refused_cases += 1;
                let keys: Vec<&str> = err.errors().map(ConfigProblem::key).collect();
                for key in &keys {
                    assert!(
                        bad.iter().any(|b| b == key),
                        "case {case}: a problem at {key}, which is fine, in\n{table}\n{err}"
                    );
                }
                if !type_error {
                    for key in &bad {
                        assert!(
                            keys.contains(&key.as_str()),
                            "case {case}: no problem at {key} in\n{table}\n{err}"
                        );
                    }
                }
                assert!(!keys.is_empty(), "case {case}: refused without a problem");
            }
        }
    }
    assert!(
        valid_cases > 100 && refused_cases > 100,
        "valid {valid_cases}, refused {refused_cases}"
    );
}
