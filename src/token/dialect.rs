//! Building token endpoint requests: grant parameters, client authentication
//! (`basic` | `body` | `none`) and body encoding (`form` | `json`).

use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request};

use crate::config::{BodyFormat, ClientAuth, Grant, TokenConfig};
use crate::proxy::body::{full, Body};
use crate::secret::Secret;

/// Which request to make.
#[derive(Clone, Copy)]
pub(crate) enum GrantKind<'a> {
    /// The configured grant (client_credentials or password).
    Primary,
    /// `grant_type=refresh_token` with this refresh token.
    Refresh(&'a Secret),
}

impl GrantKind<'_> {
    /// The `grant` label value.
    pub(crate) fn label(&self, config: &TokenConfig) -> &'static str {
        match self {
            GrantKind::Primary => config.grant.as_str(),
            GrantKind::Refresh(_) => "refresh_token",
        }
    }
}

/// The token endpoint request for `kind`.
pub(crate) fn build_request(
    config: &TokenConfig,
    kind: GrantKind<'_>,
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
    };

    let mut basic = None;
    match config.client_auth {
        ClientAuth::Basic => {
            basic = Some(basic_credentials(
                config.client_id.as_deref().unwrap_or(""),
                config
                    .client_secret
                    .as_ref()
                    .map(Secret::expose)
                    .unwrap_or(""),
            ));
        }
        ClientAuth::Body => {
            if let Some(id) = &config.client_id {
                params.push(("client_id", id));
            }
            if let Some(secret) = &config.client_secret {
                params.push(("client_secret", secret.expose()));
            }
        }
        ClientAuth::None => {
            if let Some(id) = &config.client_id {
                params.push(("client_id", id));
            }
        }
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
    builder.body(full(Bytes::from(body)))
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
