//! Building token endpoint requests: grant parameters, client authentication
//! (`basic` | `body` | `both` | `none`, a client assertion, or `client_id` beside
//! a TLS client certificate) and body encoding (`form` | `json`).

use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request};

use super::assertion::Assertion;
use super::redact::Redactor;
use crate::config::{BodyFormat, ClientAuth, Grant, TokenConfig};
use crate::http::body::{full, Body};
use crate::secret::Secret;

/// Which request to make.
#[derive(Clone, Copy)]
pub(crate) enum GrantKind<'a> {
    /// The configured grant (client_credentials or password).
    Primary,
    /// `grant_type=refresh_token` with this refresh token.
    Refresh(&'a Secret),
    /// `grant_type=authorization_code`: a code from the authorization endpoint.
    AuthorizationCode {
        /// The code from the redirect.
        code: &'a Secret,
        /// The redirect URI the code was issued for.
        redirect_uri: &'a str,
        /// The PKCE verifier, when PKCE was used.
        verifier: Option<&'a Secret>,
    },
    /// RFC 7009 revocation of a refresh token at `url` (not a grant).
    Revoke {
        /// The revocation endpoint.
        url: &'a http::Uri,
        /// The refresh token to revoke.
        token: &'a Secret,
    },
}

impl GrantKind<'_> {
    /// The `grant` label value.
    pub(crate) fn label(&self, config: &TokenConfig) -> &'static str {
        match self {
            GrantKind::Primary => config.grant.as_str(),
            GrantKind::Refresh(_) => "refresh_token",
            GrantKind::AuthorizationCode { .. } => "authorization_code",
            GrantKind::Revoke { .. } => "revoke",
        }
    }
}

/// The token endpoint request for `kind`, with `assertion` when the client
/// authenticates with one (made for this request alone).
pub(crate) fn build_request(
    config: &TokenConfig,
    kind: GrantKind<'_>,
    assertion: Option<&Assertion<'_>>,
) -> Result<Request<Body>, http::Error> {
    // Values are borrowed from config/secrets; the Vec lives only for this call.
    let mut params: Vec<(&str, &str)> = Vec::with_capacity(8);
    let url = match kind {
        GrantKind::Primary => {
            params.push(("grant_type", config.grant.as_str()));
            if let Grant::Password { username, password } = &config.grant {
                params.push(("username", username));
                params.push(("password", password.expose()));
            }
            if let Some(scope) = &config.scope {
                params.push(("scope", scope));
            }
            for (k, v) in &config.params {
                params.push((k, v));
            }
            &config.url
        }
        GrantKind::Refresh(token) => {
            params.push(("grant_type", "refresh_token"));
            params.push(("refresh_token", token.expose()));
            config.refresh_url.as_ref().unwrap_or(&config.url)
        }
        GrantKind::AuthorizationCode {
            code,
            redirect_uri,
            verifier,
        } => {
            params.push(("grant_type", "authorization_code"));
            params.push(("code", code.expose()));
            params.push(("redirect_uri", redirect_uri));
            if let Some(v) = verifier {
                params.push(("code_verifier", v.expose()));
            }
            &config.url
        }
        GrantKind::Revoke { url, token } => {
            params.push(("token", token.expose()));
            params.push(("token_type_hint", "refresh_token"));
            url
        }
    };

    let in_header = matches!(config.client_auth, ClientAuth::Basic | ClientAuth::Both);
    let in_body = matches!(config.client_auth, ClientAuth::Body | ClientAuth::Both);
    let basic = in_header.then(|| {
        basic_credentials(
            config.client_id.as_deref().unwrap_or(""),
            config
                .client_secret
                .as_ref()
                .map(Secret::expose)
                .unwrap_or(""),
        )
    });
    // Public clients (`none`) and the secretless methods still identify
    // themselves with client_id: RFC 8705 §2.1 requires it beside a certificate,
    // and some providers want it beside an assertion too.
    if !in_header || in_body {
        if let Some(id) = &config.client_id {
            params.push(("client_id", id));
        }
    }
    if in_body {
        if let Some(secret) = &config.client_secret {
            params.push(("client_secret", secret.expose()));
        }
    }
    if let Some(a) = assertion {
        params.push(("client_assertion_type", a.assertion_type));
        params.push(("client_assertion", a.value.expose()));
    }

    let (content_type, body) = match config.body {
        BodyFormat::Form => {
            let mut ser = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &params {
                ser.append_pair(k, v);
            }
            (
                "application/x-www-form-urlencoded",
                ser.finish().into_bytes(),
            )
        }
        BodyFormat::Json => {
            let map: serde_json::Map<String, serde_json::Value> = params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), serde_json::Value::String((*v).to_owned())))
                .collect();
            let bytes = serde_json::to_vec(&map).unwrap_or_default();
            ("application/json", bytes)
        }
    };

    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(url.clone())
        .header(CONTENT_TYPE, content_type)
        .header(ACCEPT, "application/json");
    if let Some(value) = basic {
        builder = builder.header(AUTHORIZATION, value);
    }
    let mut request = builder.body(full(Bytes::from(body)))?;
    add_configured_headers(request.headers_mut(), config);
    Ok(request)
}

/// `token.headers` (a provider's version header, say). Config refuses every
/// header tokenproxy sets itself, so these add to the request; only `Accept`
/// can be replaced.
fn add_configured_headers(headers: &mut HeaderMap, config: &TokenConfig) {
    for (name, value) in &config.headers {
        headers.insert(name.clone(), value.clone());
    }
}

/// Every credential the request for `kind` may carry, to scrub from the provider's answer:
/// the client assertion, the client secret (also as Basic credentials), the password, the refresh token (the
/// one sent and the configured one), the authorization code and PKCE verifier, and
/// extra grant parameters whose name says they are credentials (`client_assertion`, ...).
pub(crate) fn redactor(
    config: &TokenConfig,
    kind: GrantKind<'_>,
    assertion: Option<&Assertion<'_>>,
) -> Redactor {
    let mut r = Redactor::default();
    if let Some(a) = assertion {
        r.secret(a.value.expose());
    }
    if let Some(secret) = &config.client_secret {
        r.basic(config.client_id.as_deref().unwrap_or(""), secret.expose());
    }
    if let Grant::Password { password, .. } = &config.grant {
        r.secret(password.expose());
    }
    if let Some(rt) = &config.refresh_token {
        r.secret(rt.expose());
    }
    match kind {
        GrantKind::Primary => {}
        GrantKind::Refresh(token) | GrantKind::Revoke { token, .. } => r.secret(token.expose()),
        GrantKind::AuthorizationCode { code, verifier, .. } => {
            r.secret(code.expose());
            if let Some(v) = verifier {
                r.secret(v.expose());
            }
        }
    }
    // A header value named like a credential (an API key) is one.
    for (_, value) in config.headers.iter().filter(|(_, v)| v.is_sensitive()) {
        if let Ok(value) = value.to_str() {
            r.secret(value);
        }
    }
    for (name, value) in &config.params {
        let name = name.to_ascii_lowercase();
        if ["assertion", "secret", "password", "token", "key"]
            .iter()
            .any(|word| name.contains(word))
        {
            r.secret(value);
        }
    }
    r
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))`, as RFC 6749 §2.3.1 requires.
fn basic_credentials(id: &str, secret: &str) -> HeaderValue {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let raw = format!("{}:{}", encode(id), encode(secret));
    let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
    let mut value = HeaderValue::from_str(&format!("Basic {b64}"))
        .expect("base64 output is a valid header value");
    value.set_sensitive(true);
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, MapEnv};

    fn token_config(extra: &str) -> TokenConfig {
        let text = format!(
            "[clients.c]\nlisten = \"127.0.0.1:8080\"\nupstream = \"https://api\"\n\
             [clients.c.token]\nurl = \"https://auth.example/token\"\nclient_id = \"id\"\n\
             client_secret = \"sec ret\"\n{extra}"
        );
        config::from_str(&text, None, &MapEnv::new())
            .expect("valid config")
            .clients
            .remove(0)
            .token
    }

    async fn body_of(req: Request<Body>) -> (http::request::Parts, String) {
        use http_body_util::BodyExt;
        let (parts, body) = req.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        (parts, String::from_utf8(bytes.to_vec()).expect("utf8"))
    }

    #[tokio::test]
    async fn client_credentials_form_with_basic_auth_scope_and_params() {
        let c = token_config("scope = \"payments read\"\nparams = { audience = \"api\" }");
        let (parts, body) =
            body_of(build_request(&c, GrantKind::Primary, None).expect("request")).await;
        assert_eq!(parts.method, Method::POST);
        assert_eq!(
            parts.headers[CONTENT_TYPE],
            "application/x-www-form-urlencoded"
        );
        assert!(parts.headers[AUTHORIZATION]
            .to_str()
            .is_ok_and(|v| v.starts_with("Basic ")));
        assert_eq!(
            body,
            "grant_type=client_credentials&scope=payments+read&audience=api"
        );
    }

    #[tokio::test]
    async fn json_body_with_body_auth_carries_the_credentials_as_members() {
        let c = token_config("client_auth = \"body\"\nbody = \"json\"");
        let (parts, body) =
            body_of(build_request(&c, GrantKind::Primary, None).expect("request")).await;
        assert_eq!(parts.headers[CONTENT_TYPE], "application/json");
        assert!(parts.headers.get(AUTHORIZATION).is_none());
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["grant_type"], "client_credentials");
        assert_eq!(v["client_id"], "id");
        assert_eq!(v["client_secret"], "sec ret");
    }

    #[tokio::test]
    async fn both_sends_basic_and_body_credentials() {
        let c = token_config("client_auth = \"both\"");
        let (parts, body) =
            body_of(build_request(&c, GrantKind::Primary, None).expect("request")).await;
        assert!(parts.headers.get(AUTHORIZATION).is_some());
        assert!(body.contains("client_id=id") && body.contains("client_secret=sec+ret"));
    }

    #[tokio::test]
    async fn password_grant_and_refresh_grant_on_the_refresh_url() {
        let c = token_config(
            "grant = \"password\"\nusername = \"alice\"\npassword = \"p&w\"\n\
             refresh_url = \"https://auth.example/refresh\"",
        );
        let (_, body) =
            body_of(build_request(&c, GrantKind::Primary, None).expect("request")).await;
        assert_eq!(body, "grant_type=password&username=alice&password=p%26w");
        let rt = Secret::new("rt-1");
        let (parts, body) =
            body_of(build_request(&c, GrantKind::Refresh(&rt), None).expect("request")).await;
        assert_eq!(parts.uri, "https://auth.example/refresh");
        assert_eq!(body, "grant_type=refresh_token&refresh_token=rt-1");
    }

    /// A client without a secret, keys on a fake file system.
    fn secretless(extra: &str) -> TokenConfig {
        let env = MapEnv::new()
            .file("/k/rsa.pem", crate::jose::tests::RSA_PEM)
            .file("/k/client.crt", TLS_CERT.0.as_str())
            .file("/k/client.key", TLS_CERT.1.as_str());
        let text = format!(
            "[clients.c]\nlisten = \"127.0.0.1:8080\"\nupstream = \"https://api\"\n\
             [clients.c.token]\nurl = \"https://auth.example/token\"\nclient_id = \"id\"\n{extra}"
        );
        config::from_str(&text, None, &env)
            .expect("valid config")
            .clients
            .remove(0)
            .token
    }

    static TLS_CERT: std::sync::LazyLock<(String, String)> = std::sync::LazyLock::new(|| {
        let c = rcgen::generate_simple_self_signed(vec!["id".into()]).expect("certificate");
        (c.cert.pem(), c.key_pair.serialize_pem())
    });

    #[tokio::test]
    async fn an_assertion_goes_in_the_body_with_its_type_and_the_client_id() {
        let c = secretless("client_auth = \"private_key_jwt\"\nsigning_key_file = \"/k/rsa.pem\"");
        let assertion = Assertion {
            assertion_type: crate::config::JWT_BEARER_ASSERTION,
            value: Secret::new("h.p.s"),
        };
        let request = build_request(&c, GrantKind::Primary, Some(&assertion)).expect("request");
        let (parts, body) = body_of(request).await;
        assert!(
            parts.headers.get(AUTHORIZATION).is_none(),
            "no Basic credentials beside an assertion"
        );
        assert_eq!(
            body,
            "grant_type=client_credentials&client_id=id&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion=h.p.s"
        );
        let r = redactor(&c, GrantKind::Primary, Some(&assertion));
        assert!(
            !r.scrub("echo: h.p.s").contains("h.p.s"),
            "a provider echoing the assertion is scrubbed"
        );
    }

    #[tokio::test]
    async fn tls_client_auth_sends_only_the_client_id() {
        let c = secretless(
            "client_auth = \"tls_client_auth\"\n[clients.c.token.tls]\n\
             client_cert_file = \"/k/client.crt\"\nclient_key_file = \"/k/client.key\"",
        );
        let (parts, body) =
            body_of(build_request(&c, GrantKind::Primary, None).expect("request")).await;
        assert!(
            parts.headers.get(AUTHORIZATION).is_none(),
            "no Basic credentials"
        );
        assert_eq!(body, "grant_type=client_credentials&client_id=id");
    }

    #[tokio::test]
    async fn configured_headers_go_on_grant_refresh_and_revocation_requests() {
        let c = token_config(
            "refresh_url = \"https://auth.example/refresh\"\n\
             headers = { \"Square-Version\" = \"2026-01-22\", Accept = \"application/vnd.pos+json\" }",
        );
        let rt = Secret::new("rt-1");
        let revoke_url: http::Uri = "https://auth.example/revoke".parse().expect("uri");
        let kinds = [
            ("grant", GrantKind::Primary),
            ("refresh", GrantKind::Refresh(&rt)),
            (
                "revocation",
                GrantKind::Revoke {
                    url: &revoke_url,
                    token: &rt,
                },
            ),
        ];
        for (what, kind) in kinds {
            let (parts, _) = body_of(build_request(&c, kind, None).expect("request")).await;
            assert_eq!(
                parts.headers.get("square-version").map(|v| v.as_bytes()),
                Some(&b"2026-01-22"[..]),
                "the {what} request carries the configured header"
            );
            assert_eq!(
                parts.headers.get_all(ACCEPT).iter().collect::<Vec<_>>(),
                ["application/vnd.pos+json"],
                "the {what} request's Accept is the configured one, once"
            );
            assert!(
                parts.headers[AUTHORIZATION]
                    .to_str()
                    .is_ok_and(|v| v.starts_with("Basic ")),
                "the {what} request keeps its client credentials"
            );
        }
    }

    #[test]
    fn a_header_value_named_like_a_credential_is_scrubbed_from_provider_text() {
        let c = token_config("headers = { \"X-Api-Key\" = \"ak-Zq81-value\" }");
        let r = redactor(&c, GrantKind::Primary, None);
        assert!(
            !r.scrub("unknown key ak-Zq81-value").contains("ak-Zq81"),
            "a provider echoing the API key header is scrubbed"
        );
    }

    #[test]
    fn basic_credentials_are_form_urlencoded_before_base64() {
        let v = basic_credentials("sidecar-cc-special", "Sp3c+al:secret/&=%");
        let b64 = v.to_str().expect("ascii").trim_start_matches("Basic ");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("valid base64");
        assert_eq!(
            String::from_utf8(raw).expect("utf8"),
            "sidecar-cc-special:Sp3c%2Bal%3Asecret%2F%26%3D%25"
        );
        assert!(v.is_sensitive(), "the header must be marked sensitive");
    }
}
