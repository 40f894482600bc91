//! Header rules for forwarded requests and responses: hop-by-hop headers are
//! stripped (RFC 9110 §7.6.1, including those named in `Connection`), `Host` is
//! the upstream's, the app's credentials are replaced, and every request carries
//! an `x-request-id`. A header spelled with `_` where one of those has `-`
//! (`X_Api_Key`, `Content_Length`) is dropped: CGI and WSGI upstreams read `_` and
//! `-` alike and would merge it with the real one.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The request id header.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Removes hop-by-hop headers, including every header `Connection` names.
///
/// `TE: trailers` stays: it says the client accepts trailers, which gRPC
/// requires of every call and HTTP/2 allows as the only `TE`. `Trailer`, which
/// announces trailer fields, is not hop-by-hop (RFC 9110 §7.6.1 does not list
/// it) and stays too.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Look at the (few) names present first: most messages carry no hop-by-hop header
    // but `Connection`, and each removal hashes its name even when it is absent.
    let mut hop_by_hop = headers.keys().filter(|name| is_hop_by_hop(name));
    let Some(first) = hop_by_hop.next() else {
        return;
    };
    // The usual message: `Connection` alone (`keep-alive` or `close`), naming no
    // header present. One removal, nothing collected.
    if first == header::CONNECTION && hop_by_hop.next().is_none() && !lists_a_present(headers) {
        headers.remove(header::CONNECTION);
        return;
    }
    // The names `Connection` lists, split once; without the usual `keep-alive` that
    // list is mostly empty (no allocation).
    let listed: Vec<&[u8]> = connection_listed(headers).collect();
    // Names are compared without case, as `HeaderName` parses them.
    let gone: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            is_hop_by_hop(name)
                || listed
                    .iter()
                    .any(|l| l.eq_ignore_ascii_case(name.as_str().as_bytes()))
        })
        .cloned()
        .collect();
    // Looked up only when a TE is present (most messages carry none).
    let accepts_trailers = gone.contains(&header::TE)
        && headers
            .get_all(header::TE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .filter_map(|t| t.split(|b| *b == b';').next())
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
    for name in gone {
        headers.remove(name);
    }
    if accepts_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The names `Connection` lists, but the usual `keep-alive` (hop-by-hop
/// anyway), as raw bytes: a value with one obs-text byte (>= 0x80) is not
/// valid UTF-8 for `to_str`, and must not hide the names listed beside it.
fn connection_listed(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|n| !n.is_empty() && !n.eq_ignore_ascii_case(b"keep-alive"))
}

/// Whether `Connection` lists a header that `headers` holds, compared without
/// case as in [`strip_hop_by_hop`].
fn lists_a_present(headers: &HeaderMap) -> bool {
    connection_listed(headers).any(|listed| {
        headers
            .keys()
            .any(|name| listed.eq_ignore_ascii_case(name.as_str().as_bytes()))
    })
}

/// RFC 9110 §7.6.1 (and the legacy `keep-alive`, `proxy-connection`), by spelling:
/// cheaper than comparing with nine `HeaderName`s.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Prepares the app's request headers for the upstream.
///
/// `inject` is the header that carries the token; whatever the app put there (and
/// in `Authorization`) is dropped so the app can never choose the credential.
/// Returns the app's `Host`, which the upstream's replaces.
pub fn prepare_request(
    headers: &mut HeaderMap,
    upstream_host: &HeaderValue,
    inject: &HeaderName,
    request_id: &HeaderValue,
) -> Option<HeaderValue> {
    strip_hop_by_hop(headers);
    strip_underscore_aliases(headers, inject);
    // Room for `host`, `x-request-id` and the token: one growth at most, not one per insert.
    headers.reserve(3);
    headers.remove(header::AUTHORIZATION);
    if inject != header::AUTHORIZATION {
        headers.remove(inject);
    }
    let app_host = headers.insert(header::HOST, upstream_host.clone());
    // The id the access log shows: the app's when it was safe (see
    // [`request_id`]), else a new one.
    headers.insert(&REQUEST_ID, request_id.clone());
    app_host
}

/// The request's id: the app's `x-request-id` when it is 1 to 128 characters
/// of `A-Za-z0-9._:@/+=-`, else a new one. The text access log writes it
/// unquoted, so anything else (spaces, quotes, `=`-led fields) could forge
/// fields in the line.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    let safe = |v: &HeaderValue| {
        let b = v.as_bytes();
        (1..=128).contains(&b.len())
            && b.iter().all(|c| {
                c.is_ascii_alphanumeric()
                    || matches!(c, b'.' | b'_' | b':' | b'@' | b'/' | b'+' | b'=' | b'-')
            })
    };
    let mut values = headers.get_all(&REQUEST_ID).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if safe(v) => v.clone(),
        _ => new_request_id(),
    }
}

/// Removes the headers only the sidecar may set (`x-tokenproxy-*`) from an
/// upstream's response: an upstream's own `x-tokenproxy-error` would make the
/// app (and the access log) take the upstream's answer for the sidecar's.
pub fn strip_sidecar_headers(headers: &mut HeaderMap) {
    if !headers
        .keys()
        .any(|n| n.as_str().starts_with("x-tokenproxy-"))
    {
        return;
    }
    let gone: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().starts_with("x-tokenproxy-"))
        .cloned()
        .collect();
    for name in gone {
        headers.remove(name);
    }
}

/// Removes headers whose name, read with `_` as `-`, is one the sidecar owns:
/// the credential headers, `Host`, the framing headers, hop-by-hop names.
fn strip_underscore_aliases(headers: &mut HeaderMap, inject: &HeaderName) {
    if !headers.keys().any(|n| n.as_str().contains('_')) {
        return;
    }
    let owned = |dashed: &str| {
        dashed == inject.as_str()
            || matches!(
                dashed,
                "authorization" | "host" | "content-length" | "x-request-id"
            )
            || HeaderName::from_bytes(dashed.as_bytes()).is_ok_and(|n| is_hop_by_hop(&n))
    };
    let gone: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().contains('_') && owned(&n.as_str().replace('_', "-")))
        .cloned()
        .collect();
    for name in gone {
        headers.remove(name);
    }
}

/// A new request id: 16 random hex digits.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u64(..);
    let mut id = [0u8; 16];
    for (i, digit) in id.iter_mut().enumerate() {
        *digit = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    // Owned behind a reference count from the start: the id is cloned into the
    // upstream request, which for a `Vec`'s bytes would allocate once more.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(id))
        .expect("hex digits are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Security review (issue 25, low): the app's `x-request-id` went into
    /// the text access log unquoted, so it could forge fields; only a safe id
    /// is kept, and the upstream sees the same id as the log.
    #[test]
    fn only_a_safe_request_id_is_kept_and_sent_upstream() {
        let with = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(&REQUEST_ID, HeaderValue::from_bytes(v).unwrap());
            h
        };
        for ok in [&b"abc-123"[..], b"req:7@svc/a+b=_.x", &[b'a'; 128]] {
            assert_eq!(request_id(&with(ok)).as_bytes(), ok, "{ok:?} is safe");
        }
        for bad in [
            &b"x status=200 client=other"[..],
            b"\"quoted\"",
            b"a\tb",
            &[b'a'; 129],
            "caf\u{e9}".as_bytes(),
        ] {
            let id = request_id(&with(bad));
            assert_ne!(id.as_bytes(), bad, "{bad:?} should be replaced");
            assert_eq!(id.len(), 16, "a new id instead of {bad:?}");
        }
        let mut two = with(b"one");
        two.append(&REQUEST_ID, HeaderValue::from_static("two"));
        assert_eq!(request_id(&two).len(), 16, "two ids: a new one");

        let mut forwarded = with(b"x status=200");
        let id = request_id(&forwarded);
        prepare_request(
            &mut forwarded,
            &HeaderValue::from_static("api.example"),
            &header::AUTHORIZATION,
            &id,
        );
        assert_eq!(forwarded.get_all(&REQUEST_ID).iter().count(), 1);
        assert_eq!(
            forwarded[&REQUEST_ID], id,
            "the upstream sees the logged id"
        );
    }

    /// Security review (issue 25, low): an upstream's own `x-tokenproxy-*`
    /// headers reached the app.
    #[test]
    fn sidecar_headers_are_stripped_from_upstream_responses() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-tokenproxy-error",
            HeaderValue::from_static("token_unavailable"),
        );
        h.insert("x-tokenproxy-replayed", HeaderValue::from_static("1"));
        h.insert("x-request-id", HeaderValue::from_static("r"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        strip_sidecar_headers(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["content-type", "x-request-id"]);
    }

    /// Security review (low): underscore aliases of the inject, Authorization,
    /// Host and framing headers would merge with the real ones at a CGI/WSGI
    /// upstream; they are dropped, other underscore headers are kept.
    #[test]
    fn underscore_aliases_of_owned_headers_are_dropped() {
        let mut h = map(&[
            ("x_api_key", "app-chosen"),
            ("authorization", "Bearer app"),
            ("content_length", "5"),
            ("transfer_encoding", "chunked"),
            ("x_request_id", "forged"),
            ("x_custom_trace", "kept"),
            ("x_host", "kept"),
        ]);
        let inject = HeaderName::from_static("x-api-key");
        prepare_request(
            &mut h,
            &HeaderValue::from_static("api.example"),
            &inject,
            &HeaderValue::from_static("id"),
        );
        for gone in [
            "x_api_key",
            "content_length",
            "transfer_encoding",
            "x_request_id",
        ] {
            assert!(!h.contains_key(gone), "{gone} must be dropped");
        }
        assert_eq!(h["x_custom_trace"], "kept");
        assert_eq!(h["x_host"], "kept");
        assert!(!h.contains_key("authorization"));
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "gzip"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic abc"),
            ("accept", "application/json"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["accept"], "only end-to-end headers may remain");
    }

    #[test]
    fn every_fixed_hop_by_hop_name_goes_when_connection_lists_none_other() {
        let mut h = map(&[
            ("connection", "Keep-Alive"),
            ("connection", " keep-alive ,"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authorization", "Basic abc"),
            ("content-type", "application/json"),
            ("x-request-id", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            vec!["content-type", "te", "trailer", "x-request-id"],
            "TE: trailers and Trailer are what trailers (and gRPC) need end to end"
        );
    }

    #[test]
    fn te_keeps_only_its_trailers_token() {
        let mut h = map(&[("te", "gzip, Trailers;q=1"), ("connection", "te")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        let mut h = map(&[("te", "gzip, deflate")]);
        strip_hop_by_hop(&mut h);
        assert!(h.get("te").is_none(), "a TE without trailers goes");
    }

    #[test]
    fn names_beside_obs_text_in_connection_are_still_stripped() {
        // Found by the `headers` fuzz target (fuzz/regressions/headers).
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-hop, caf\xe9").expect("obs-text is a valid value"),
        );
        h.insert("x-hop", HeaderValue::from_static("secret"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "left: {h:?}");
    }

    #[test]
    fn app_credentials_are_dropped_host_rewritten_and_request_id_added() {
        let mut h = map(&[
            ("authorization", "Bearer app-chosen"),
            ("host", "127.0.0.1:8080"),
        ]);
        let host = HeaderValue::from_static("api.pay.example");
        let id = HeaderValue::from_static("abc");
        prepare_request(&mut h, &host, &header::AUTHORIZATION, &id);
        assert!(h.get(header::AUTHORIZATION).is_none());
        assert_eq!(h.get(header::HOST), Some(&host));
        assert_eq!(h.get(&REQUEST_ID), Some(&id));
    }

    #[test]
    fn new_request_ids_are_16_lower_case_hex_digits() {
        let id = new_request_id();
        assert_eq!(id.len(), 16, "{id:?}");
        assert!(
            id.as_bytes()
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)),
            "{id:?}"
        );
    }

    #[test]
    fn a_header_named_close_goes_when_connection_lists_it() {
        let mut h = map(&[("connection", "close"), ("close", "1"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["accept"], "a listed name goes, whatever it is");
    }

    #[test]
    fn connection_alone_goes_and_what_it_lists_goes_with_it() {
        let mut h = map(&[("connection", "keep-alive"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["accept"]);
        let mut h = map(&[
            ("connection", "close, X-Hop"),
            ("x-hop", "1"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["accept"], "a listed header present goes too");
    }

    #[test]
    fn connection_names_are_matched_without_case() {
        let mut h = map(&[
            ("connection", "X-Hop ,  Keep-Alive"),
            ("x-hop", "1"),
            ("x-hop-not", "2"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-hop-not"], "only the listed names may go");
    }

    #[test]
    fn an_existing_request_id_is_kept() {
        let mut h = map(&[("x-request-id", "from-app")]);
        let id = request_id(&h);
        prepare_request(
            &mut h,
            &HeaderValue::from_static("h"),
            &header::AUTHORIZATION,
            &id,
        );
        assert_eq!(
            h.get(&REQUEST_ID).map(|v| v.as_bytes()),
            Some(&b"from-app"[..])
        );
    }
}
