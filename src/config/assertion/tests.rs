//! Config tests of `client_auth` by JWT and by TLS client certificate.

use super::*;
use crate::config::{from_str, MapEnv};
use crate::jose::tests::{generated_pem, RSA_PEM};

const BASE: &str = r#"
[clients.bank]
listen = "127.0.0.1:8080"
upstream = "https://api.bank.example"

[clients.bank.token]
url = "https://as.bank.example/token"
client_id = "sidecar"
"#;
const CLIENT_SECRET: &str = "csjwt-secret-Hq7Vd2-for-hmac";
const ASSERTION: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzYSJ9.c2ln";

/// Keys and certificates on a fake file system, made for this test.
struct Files {
    env: MapEnv,
    ec_pem: String,
    ec_cert_der: Vec<u8>,
}

fn files() -> Files {
    let ec_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("EC key");
    let ec_cert = rcgen::CertificateParams::new(vec!["sidecar.bank.example".into()])
        .expect("params")
        .self_signed(&ec_pair)
        .expect("certificate");
    let other = rcgen::generate_simple_self_signed(vec!["other.example".into()]).expect("cert");
    let ec_pem = ec_pair.serialize_pem();
    let tls = rcgen::generate_simple_self_signed(vec!["sidecar".into()]).expect("cert");
    let env = MapEnv::new()
        .var("CSJWT_SECRET", CLIENT_SECRET)
        .file("/keys/rsa.pem", RSA_PEM)
        .file("/keys/ec.pem", ec_pem.clone())
        .file("/keys/ed.pem", generated_pem(&rcgen::PKCS_ED25519))
        .file(
            "/keys/p384.pem",
            generated_pem(&rcgen::PKCS_ECDSA_P384_SHA384),
        )
        .file("/keys/ec.crt", ec_cert.pem())
        .file("/keys/other.crt", other.cert.pem())
        .file(
            "/keys/garbage.pem",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .file("/keys/open.pem", RSA_PEM)
        .mode("/keys/open.pem", 0o644)
        .file("/tokens/sa", format!("{ASSERTION}\n"))
        .file("/tokens/empty", "\n")
        .file("/tokens/not-a-jwt", "just some text")
        .file("/tls/client.crt", tls.cert.pem())
        .file("/tls/client.key", tls.key_pair.serialize_pem());
    Files {
        env,
        ec_pem,
        ec_cert_der: ec_cert.der().to_vec(),
    }
}

fn load(files: &Files, extra: &str) -> Result<TokenConfig, ConfigError> {
    let text = format!("{BASE}{extra}\n");
    from_str(&text, Some(Path::new("tokenproxy.toml")), &files.env)
        .map(|mut c| c.clients.remove(0).token)
}

fn parse(files: &Files, extra: &str) -> TokenConfig {
    match load(files, extra) {
        Ok(t) => t,
        Err(e) => panic!("{extra:?} should be accepted, got: {e}"),
    }
}

fn signer(token: &TokenConfig) -> &AssertionSigner {
    match &token.assertion {
        Some(ClientAssertion::Signed(s)) => s,
        other => panic!("expected a signed assertion, got {other:?}"),
    }
}

/// The load fails at `clients.bank.token.KEY`, naming the file, the problem and a hint.
fn refused(files: &Files, extra: &str, key: &str, problem: &str, hint: &str) {
    let err = match load(files, extra) {
        Ok(t) => panic!("{extra:?} should be refused, got {t:?}"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert_eq!(
        err.key(),
        format!("clients.bank.token.{key}"),
        "wrong key in {text}"
    );
    assert_eq!(
        err.file(),
        Some(Path::new("tokenproxy.toml")),
        "the file is named in {text}"
    );
    assert!(
        err.problem().contains(problem),
        "{text:?} should say {problem:?}"
    );
    assert!(
        err.hint().is_some_and(|h| h.contains(hint)),
        "{text:?} should hint {hint:?}"
    );
    for leak in ["-----BEGIN", "MII", CLIENT_SECRET, ASSERTION] {
        assert!(
            !text.contains(leak),
            "{text:?} must not show key material or secrets"
        );
    }
}

#[test]
fn private_key_jwt_reads_the_key_alg_kid_certificate_and_audience() {
    let f = files();
    let t = parse(
        &f,
        r#"client_auth = "private_key_jwt"
signing_key_file = "/keys/ec.pem"
signing_alg = "ES256"
key_id = "k1"
certificate_file = "/keys/ec.crt"
assertion_audience = "https://as.bank.example""#,
    );
    assert_eq!(t.client_auth, ClientAuth::PrivateKeyJwt);
    let s = signer(&t);
    let expected = SigningKey::from_pem(&f.ec_pem, None).expect("key");
    assert_eq!(s.key, expected, "the key of signing_key_file");
    assert_eq!(s.key.alg(), Alg::Es256);
    assert_eq!(s.key_file.as_deref(), Some(Path::new("/keys/ec.pem")));
    assert_eq!(s.key_id.as_deref(), Some("k1"));
    assert_eq!(
        s.certificate_file.as_deref(),
        Some(Path::new("/keys/ec.crt"))
    );
    assert_eq!(
        s.x5t_s256.as_deref(),
        Some(jose::x5t_s256(&f.ec_cert_der).as_str()),
        "x5t#S256 is the thumbprint of the certificate's DER"
    );
    assert_eq!(s.audience.as_deref(), Some("https://as.bank.example"));
}

#[test]
fn the_algorithm_defaults_to_the_keys_own() {
    let f = files();
    let alg_of = |extra: &str| {
        signer(&parse(
            &f,
            &format!("client_auth = \"private_key_jwt\"\n{extra}"),
        ))
        .key
        .alg()
    };
    assert_eq!(alg_of("signing_key_file = \"/keys/rsa.pem\""), Alg::Rs256);
    assert_eq!(
        alg_of("signing_key_file = \"/keys/rsa.pem\"\nsigning_alg = \"PS256\""),
        Alg::Ps256
    );
    assert_eq!(alg_of("signing_key_file = \"/keys/ec.pem\""), Alg::Es256);
    assert_eq!(alg_of("signing_key_file = \"/keys/ed.pem\""), Alg::EdDsa);
    let s = parse(
        &f,
        "client_auth = \"private_key_jwt\"\nsigning_key_file = \"/keys/ed.pem\"",
    );
    let s = signer(&s);
    assert_eq!(
        (s.key_id.as_ref(), s.x5t_s256.as_ref(), s.audience.as_ref()),
        (None, None, None),
        "no kid, no x5t#S256, the default audience"
    );
}

#[test]
fn client_secret_jwt_signs_with_the_client_secret() {
    let f = files();
    let t = parse(
        &f,
        "client_auth = \"client_secret_jwt\"\nclient_secret = \"${CSJWT_SECRET}\"",
    );
    let expected = SigningKey::hmac(Alg::Hs256, CLIENT_SECRET.as_bytes()).expect("key");
    assert_eq!(
        signer(&t).key,
        expected,
        "HS256 keyed with the client secret"
    );
    assert_eq!(signer(&t).key_file, None);
    let t = parse(
        &f,
        "client_auth = \"client_secret_jwt\"\nclient_secret = \"${CSJWT_SECRET}\"\nsigning_alg = \"HS512\"\nkey_id = \"s1\"",
    );
    assert_eq!(signer(&t).key.alg(), Alg::Hs512);
    assert_eq!(signer(&t).key_id.as_deref(), Some("s1"));
}

#[test]
fn client_assertion_reads_its_file_and_type() {
    let f = files();
    let t = parse(
        &f,
        "client_auth = \"client_assertion\"\nclient_assertion_file = \"/tokens/sa\"",
    );
    assert_eq!(
        t.assertion,
        Some(ClientAssertion::File {
            path: PathBuf::from("/tokens/sa"),
            assertion_type: JWT_BEARER_ASSERTION.to_owned(),
        })
    );
    let t = parse(
        &f,
        "client_auth = \"client_assertion\"\nclient_assertion_file = \"/tokens/sa\"\nclient_assertion_type = \"urn:example:saml\"",
    );
    assert!(
        matches!(&t.assertion, Some(ClientAssertion::File { assertion_type, .. }) if assertion_type == "urn:example:saml")
    );
}

#[test]
fn tls_client_auth_uses_the_token_endpoint_certificate() {
    let f = files();
    let t = parse(
        &f,
        "client_auth = \"tls_client_auth\"\n[clients.bank.token.tls]\nclient_cert_file = \"/tls/client.crt\"\nclient_key_file = \"/tls/client.key\"",
    );
    assert_eq!(t.client_auth, ClientAuth::TlsClientAuth);
    assert!(t.tls.client_cert_pem.is_some() && t.assertion.is_none());
}

#[test]
fn a_missing_or_unusable_signing_key_is_refused() {
    let f = files();
    let pkjwt = "client_auth = \"private_key_jwt\"\n";
    refused(
        &f,
        pkjwt,
        "signing_key_file",
        "is required when client_auth = \"private_key_jwt\"",
        "PEM private key",
    );
    refused(
        &f,
        &format!("{pkjwt}signing_key_file = \"/keys/missing.pem\""),
        "signing_key_file",
        "cannot read /keys/missing.pem",
        "mounted",
    );
    refused(
        &f,
        &format!("{pkjwt}signing_key_file = \"/keys/open.pem\""),
        "signing_key_file",
        "open to group or others",
        "chmod 600 /keys/open.pem",
    );
    refused(
        &f,
        &format!("{pkjwt}signing_key_file = \"/keys/ec.crt\""),
        "signing_key_file",
        "/keys/ec.crt holds no unencrypted PEM private key",
        "PKCS#8 (BEGIN PRIVATE KEY)",
    );
    refused(
        &f,
        &format!("{pkjwt}signing_key_file = \"/keys/garbage.pem\""),
        "signing_key_file",
        "/keys/garbage.pem holds",
        "PKCS#1 (BEGIN RSA PRIVATE KEY)",
    );
    refused(
        &f,
        &format!("{pkjwt}signing_key_file = \"/keys/p384.pem\""),
        "signing_key_file",
        "an EC key on a curve other than P-256",
        "SEC1",
    );
}

#[test]
fn an_algorithm_that_does_not_fit_the_key_or_the_method_is_refused() {
    let f = files();
    refused(
        &f,
        "client_auth = \"private_key_jwt\"\nsigning_key_file = \"/keys/rsa.pem\"\nsigning_alg = \"ES256\"",
        "signing_alg",
        "/keys/rsa.pem holds an RSA key, but ES256 needs an EC P-256 key",
        "use RS256, PS256",
    );
    refused(
        &f,
        "client_auth = \"private_key_jwt\"\nsigning_key_file = \"/keys/ed.pem\"\nsigning_alg = \"RS256\"",
        "signing_alg",
        "holds an Ed25519 key, but RS256 needs an RSA key",
        "use EdDSA",
    );
    refused(
        &f,
        "client_auth = \"private_key_jwt\"\nsigning_key_file = \"/keys/rsa.pem\"\nsigning_alg = \"HS256\"",
        "signing_alg",
        "\"HS256\" is not an accepted value",
        "\"RS256\", \"PS256\", \"ES256\", \"EdDSA\"",
    );
    refused(
        &f,
        "client_auth = \"client_secret_jwt\"\nclient_secret = \"${CSJWT_SECRET}\"\nsigning_alg = \"RS256\"",
        "signing_alg",
        "\"RS256\" is not an accepted value",
        "\"HS256\", \"HS512\"",
    );
}

#[test]
fn a_certificate_of_another_key_is_refused() {
    let f = files();
    refused(
        &f,
        "client_auth = \"private_key_jwt\"\nsigning_key_file = \"/keys/ec.pem\"\ncertificate_file = \"/keys/other.crt\"",
        "certificate_file",
        "the first certificate in /keys/other.crt is not for the key in signing_key_file",
        "issued for that key",
    );
    refused(
        &f,
        "client_auth = \"private_key_jwt\"\nsigning_key_file = \"/keys/ec.pem\"\ncertificate_file = \"/keys/ec.pem\"",
        "certificate_file",
        "/keys/ec.pem holds no PEM certificate",
        "PEM certificate",
    );
}

#[test]
fn client_secret_jwt_without_a_secret_is_refused() {
    let f = files();
    refused(
        &f,
        "client_auth = \"client_secret_jwt\"",
        "client_secret",
        "is required when client_auth = \"client_secret_jwt\"",
        "signed (HS256 or HS512) with it",
    );
}

#[test]
fn tls_client_auth_without_a_certificate_or_over_http_is_refused() {
    let f = files();
    refused(
        &f,
        "client_auth = \"tls_client_auth\"",
        "tls.client_cert_file",
        "is required when client_auth = \"tls_client_auth\"",
        "[clients.bank.token.tls]",
    );
    let text = format!(
        "{}\nclient_auth = \"tls_client_auth\"\n[clients.bank.token.tls]\nclient_cert_file = \"/tls/client.crt\"\nclient_key_file = \"/tls/client.key\"\n",
        BASE.replace("https://as.bank.example/token", "http://127.0.0.1:9000/token")
    );
    let err = from_str(&text, None, &f.env).expect_err("plain http cannot carry a certificate");
    assert_eq!(err.key(), "clients.bank.token.url");
    assert!(err.problem().contains("is not https"), "{err}");
    assert!(
        err.hint()
            .is_some_and(|h| h.contains("mtls_endpoint_aliases")),
        "{err}"
    );
}

#[test]
fn every_signing_method_needs_a_client_id_and_refuses_an_unused_secret() {
    let f = files();
    let no_id = |extra: &str| format!("{}{extra}", BASE.replace("client_id = \"sidecar\"\n", ""));
    for (extra, hint) in [
        (
            "client_auth = \"private_key_jwt\"\nsigning_key_file = \"/keys/ec.pem\"",
            "iss and sub",
        ),
        (
            "client_auth = \"client_secret_jwt\"\nclient_secret = \"x\"",
            "iss and sub",
        ),
        (
            "client_auth = \"tls_client_auth\"",
            "registered certificate",
        ),
    ] {
        let err = from_str(&no_id(extra), None, &f.env).expect_err("client_id is required");
        assert_eq!(err.key(), "clients.bank.token.client_id", "{err}");
        assert!(
            err.problem().contains("is required when client_auth"),
            "{err}"
        );
        assert!(err.hint().is_some_and(|h| h.contains(hint)), "{err}");
    }
    // client_assertion: the assertion names the client; client_id is optional.
    let text = no_id("client_auth = \"client_assertion\"\nclient_assertion_file = \"/tokens/sa\"");
    let c = from_str(&text, None, &f.env).expect("no client_id needed");
    assert_eq!(c.clients[0].token.client_id, None);

    for extra in [
        "client_auth = \"private_key_jwt\"\nsigning_key_file = \"/keys/ec.pem\"\nclient_secret = \"x\"",
        "client_auth = \"tls_client_auth\"\nclient_secret = \"x\"",
        "client_auth = \"client_assertion\"\nclient_assertion_file = \"/tokens/sa\"\nclient_secret = \"x\"",
    ] {
        refused(&f, extra, "client_secret", "never sends it", "client_secret_jwt");
    }
}

#[test]
fn assertion_keys_are_refused_where_client_auth_does_not_read_them() {
    let f = files();
    refused(
        &f,
        "client_secret = \"x\"\nsigning_key_file = \"/keys/ec.pem\"",
        "signing_key_file",
        "is only used with client_auth = \"private_key_jwt\", not \"basic\"",
        "set client_auth = \"private_key_jwt\"",
    );
    refused(
        &f,
        "client_auth = \"client_secret_jwt\"\nclient_secret = \"x\"\ncertificate_file = \"/keys/ec.crt\"",
        "certificate_file",
        "only used with client_auth = \"private_key_jwt\"",
        "remove it",
    );
    refused(
        &f,
        "client_auth = \"private_key_jwt\"\nsigning_key_file = \"/keys/ec.pem\"\nclient_assertion_file = \"/tokens/sa\"",
        "client_assertion_file",
        "only used with client_auth = \"client_assertion\"",
        "remove it",
    );
    refused(
        &f,
        "client_auth = \"client_assertion\"\nclient_assertion_file = \"/tokens/sa\"\nassertion_audience = \"x\"",
        "assertion_audience",
        "only used with client_auth = \"private_key_jwt\" or \"client_secret_jwt\"",
        "remove it",
    );
    refused(
        &f,
        "client_auth = \"private_key_jwt\"\nsigning_key_file = \"/keys/ec.pem\"\nparams = { client_assertion = \"x\" }",
        "params.client_assertion",
        "set by tokenproxy",
        "remove it from params",
    );
}

#[test]
fn a_missing_empty_or_foreign_assertion_file_is_refused() {
    let f = files();
    let ca = "client_auth = \"client_assertion\"\n";
    refused(
        &f,
        ca,
        "client_assertion_file",
        "is required when client_auth = \"client_assertion\"",
        "projected service-account token",
    );
    refused(
        &f,
        &format!("{ca}client_assertion_file = \"/tokens/missing\""),
        "client_assertion_file",
        "cannot read /tokens/missing",
        "mounted",
    );
    refused(
        &f,
        &format!("{ca}client_assertion_file = \"/tokens/empty\""),
        "client_assertion_file",
        "/tokens/empty is empty",
        "compact JWT",
    );
    refused(
        &f,
        &format!("{ca}client_assertion_file = \"/tokens/not-a-jwt\""),
        "client_assertion_file",
        "/tokens/not-a-jwt does not hold a JWT",
        "compact JWT",
    );
}

#[test]
fn check_names_the_method_key_source_and_audience_but_never_key_material() {
    let f = files();
    let text = format!(
        "{BASE}client_auth = \"private_key_jwt\"\nsigning_key_file = \"/keys/ec.pem\"\nkey_id = \"k1\"\ncertificate_file = \"/keys/ec.crt\"\n"
    );
    let summary = from_str(&text, None, &f.env).expect("valid").summary();
    for row in [
        "token.client_auth",
        "private_key_jwt",
        "token.signing_key",
        "ES256, an EC P-256 key from /keys/ec.pem [key redacted]",
        "token.key_id",
        "k1",
        "token.x5t#S256",
        &jose::x5t_s256(&f.ec_cert_der),
        "(the URL of each request)",
        "1m, a new jti for every request",
    ] {
        assert!(
            summary.contains(row),
            "check should show {row:?}:\n{summary}"
        );
    }
    assert!(
        !summary.contains("-----BEGIN") && !summary.contains("MII"),
        "{summary}"
    );

    let text = format!(
        "{BASE}client_auth = \"client_secret_jwt\"\nclient_secret = \"${{CSJWT_SECRET}}\"\nsigning_alg = \"HS512\"\nassertion_audience = \"https://as.bank.example\"\n"
    );
    let summary = from_str(&text, None, &f.env).expect("valid").summary();
    assert!(
        summary.contains("HS512, token.client_secret [key redacted]"),
        "{summary}"
    );
    assert!(summary.contains("https://as.bank.example"), "{summary}");
    assert!(!summary.contains(CLIENT_SECRET), "{summary}");

    let text = format!(
        "{BASE}client_auth = \"client_assertion\"\nclient_assertion_file = \"/tokens/sa\"\n"
    );
    let summary = from_str(&text, None, &f.env).expect("valid").summary();
    assert!(
        summary.contains("/tokens/sa (read for every request)"),
        "{summary}"
    );
    assert!(summary.contains(JWT_BEARER_ASSERTION), "{summary}");
    assert!(
        !summary.contains(ASSERTION),
        "the assertion itself is not shown:\n{summary}"
    );
}
