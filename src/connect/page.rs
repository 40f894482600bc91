//! The connect listener's answers: small built-in HTML pages for the end
//! states and redirects, every one with headers that keep it out of caches,
//! frames and referrers and let it load nothing.

use http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, LOCATION, REFERRER_POLICY,
    X_FRAME_OPTIONS,
};
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use crate::http::body::{full, Body};

/// Sets the headers every connect response carries.
pub(super) fn secure(headers: &mut HeaderMap) {
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'"),
    );
}

/// A page with a heading and one message (both escaped).
pub(super) fn page(status: StatusCode, heading: &str, message: &str) -> Response<Body> {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n</head>\n<body>\n<h1>{title}</h1>\n<p>{message}</p>\n</body>\n</html>\n",
        title = escape(heading),
        message = escape(message),
    );
    let mut r = Response::new(full(html));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure(r.headers_mut());
    r
}

/// A 302 to `location`; a location that cannot be a header gets an error page.
pub(super) fn redirect(location: &str) -> Response<Body> {
    let Ok(value) = HeaderValue::from_str(location) else {
        return page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Something went wrong",
            "The address to continue at cannot be used.",
        );
    };
    let mut r = Response::new(full(""));
    *r.status_mut() = StatusCode::FOUND;
    r.headers_mut().insert(LOCATION, value);
    secure(r.headers_mut());
    r
}

/// `return_to` with the outcome appended to its query.
pub(super) fn outcome_url(return_to: &str, subject: &str, error: Option<&str>) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("subject", subject);
    match error {
        None => query.append_pair("status", "connected"),
        Some(code) => query
            .append_pair("status", "error")
            .append_pair("error", code),
    };
    let sep = match return_to.as_bytes().last() {
        Some(b'?' | b'&') => "",
        _ if return_to.contains('?') => "&",
        _ => "?",
    };
    format!("{return_to}{sep}{}", query.finish())
}

/// An OAuth error code from the provider as it may travel on: its own
/// characters (RFC 6749 §4.1.2.1 allows printable ASCII), else a generic one.
pub(super) fn error_code(raw: &str) -> &str {
    let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.');
    if !raw.is_empty() && raw.len() <= 64 && raw.bytes().all(ok) {
        raw
    } else {
        "provider_error"
    }
}

/// Escapes text for HTML content and quoted attribute values.
pub(super) fn escape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outcome_is_appended_to_any_query() {
        assert_eq!(
            outcome_url("https://app.example/done", "m-1", None),
            "https://app.example/done?subject=m-1&status=connected"
        );
        assert_eq!(
            outcome_url(
                "https://app.example/done?tab=2",
                "a:b@c",
                Some("access_denied")
            ),
            "https://app.example/done?tab=2&subject=a%3Ab%40c&status=error&error=access_denied"
        );
        assert_eq!(
            outcome_url("https://app.example/done?", "m", None),
            "https://app.example/done?subject=m&status=connected"
        );
    }

    #[test]
    fn provider_error_codes_pass_only_when_plain() {
        assert_eq!(error_code("access_denied"), "access_denied");
        assert_eq!(error_code("<script>"), "provider_error");
        assert_eq!(error_code(""), "provider_error");
        assert_eq!(error_code(&"x".repeat(65)), "provider_error");
    }

    #[test]
    fn pages_escape_everything_and_carry_the_security_headers() {
        let r = page(StatusCode::GONE, "<b>", "a \"quoted\" & <i>text</i>");
        let h = r.headers();
        assert_eq!(h["cache-control"], "no-store");
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["content-security-policy"], "default-src 'none'");
        assert_eq!(r.status(), StatusCode::GONE);
        assert_eq!(escape("<a href='x'>&"), "&lt;a href=&#39;x&#39;&gt;&amp;");
    }
}
