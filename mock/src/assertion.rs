//! `client_secret_jwt` for the mock provider (RFC 7523 §2.2, OpenID Connect Core §9):
//! a client may authenticate with an HS256 or HS512 JWT keyed with its secret instead of
//! sending the secret. The provider keeps the `jti`s it accepted and refuses one seen
//! before, as real providers do.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ring::hmac;
use serde_json::Value;

/// `client_assertion_type` for a JWT (RFC 7523 §2.2).
pub(crate) const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Checks `jwt` as a client assertion of `client_id` for `token_url`, signed with
/// `secret`; its `jti` on success, else why it is refused.
pub(crate) fn check(
    jwt: &str,
    client_id: &str,
    secret: &str,
    token_url: &str,
) -> Result<String, &'static str> {
    let mut parts = jwt.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a compact JWS");
    };
    let decode = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()
    };
    let json = |s: &str| decode(s).and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    let header = json(header).ok_or("the header is not base64url JSON")?;
    let algorithm = match header["alg"].as_str() {
        Some("HS256") => hmac::HMAC_SHA256,
        Some("HS512") => hmac::HMAC_SHA512,
        _ => return Err("alg must be HS256 or HS512"),
    };
    let signature = decode(signature).ok_or("the signature is not base64url")?;
    let key = hmac::Key::new(algorithm, secret.as_bytes());
    let input = format!("{}.{payload}", jwt.split('.').next().unwrap_or_default());
    hmac::verify(&key, input.as_bytes(), &signature).map_err(|_| "bad signature")?;
    let claims = json(payload).ok_or("the claims are not base64url JSON")?;
    if claims["iss"] != client_id || claims["sub"] != client_id {
        return Err("iss and sub must be the client_id");
    }
    let audience_ok = match &claims["aud"] {
        Value::String(aud) => aud == token_url,
        Value::Array(auds) => auds.iter().any(|a| a == token_url),
        _ => false,
    };
    if !audience_ok {
        return Err("aud must be the token endpoint");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    match claims["exp"].as_u64() {
        Some(exp) if exp > now => {}
        _ => return Err("expired or without exp"),
    }
    claims["jti"]
        .as_str()
        .filter(|j| !j.is_empty())
        .map(str::to_owned)
        .ok_or("no jti")
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://127.0.0.1:1/oauth2/token";

    fn jwt(alg: &str, secret: &str, claims: Value) -> String {
        let b64 = |v: &Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
        };
        let input = format!(
            "{}.{}",
            b64(&serde_json::json!({ "alg": alg })),
            b64(&claims)
        );
        let algorithm = if alg == "HS512" {
            hmac::HMAC_SHA512
        } else {
            hmac::HMAC_SHA256
        };
        let sig = hmac::sign(
            &hmac::Key::new(algorithm, secret.as_bytes()),
            input.as_bytes(),
        );
        format!(
            "{input}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig.as_ref())
        )
    }

    fn claims(iss: &str, aud: &str, exp_in: i64) -> Value {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        serde_json::json!({"iss": iss, "sub": iss, "aud": aud, "exp": now + exp_in, "jti": "j1"})
    }

    #[test]
    fn only_a_fresh_assertion_of_the_client_for_this_endpoint_passes() {
        let good = jwt("HS512", "s", claims("c", URL, 60));
        assert_eq!(check(&good, "c", "s", URL), Ok("j1".to_owned()));
        let refused = [
            jwt("HS256", "other", claims("c", URL, 60)),
            jwt("HS256", "s", claims("someone", URL, 60)),
            jwt("HS256", "s", claims("c", "http://elsewhere/token", 60)),
            jwt("HS256", "s", claims("c", URL, -5)),
            jwt("RS256", "s", claims("c", URL, 60)),
            "a.b".to_owned(),
        ];
        for jwt in refused {
            assert!(check(&jwt, "c", "s", URL).is_err(), "{jwt} must be refused");
        }
    }
}
