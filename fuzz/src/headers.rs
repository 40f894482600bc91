//! Properties of `tokenproxy::proxy::headers::{strip_hop_by_hop, prepare_request}`.
//!
//! The input is a list of headers (names and values valid per the `http` crate, as hyper
//! would hand them over), the upstream's `Host`, the inject header and a request id.
//! After `strip_hop_by_hop`:
//! - no hop-by-hop header remains (RFC 9110 §7.6.1: connection, keep-alive,
//!   proxy-connection, proxy-authenticate, proxy-authorization, te, trailer,
//!   transfer-encoding, upgrade), nor any header named in an original `Connection`
//!   header (a comma-separated list; each element trimmed of spaces and tabs);
//! - every other header is still there with all its values, in order.
//!
//! After `prepare_request`, additionally:
//! - no `authorization` remains, and no inject header either (the app cannot choose the
//!   credential) unless the inject header is `host` or `x-request-id`, which are set again;
//! - `host` has exactly one value, the upstream's;
//! - `x-request-id` is exactly the given id (the caller passes `request_id`'s);
//!
//! and `request_id` is the app's `x-request-id` when it sent exactly one, of 1 to 128
//! characters of `A-Za-z0-9._:@/+=-`, otherwise a new safe id.

use arbitrary::Arbitrary;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use tokenproxy::proxy::headers::{prepare_request, request_id, strip_hop_by_hop, REQUEST_ID};

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Names the generator prefers: the ones the code treats specially, and a few plain ones.
const KNOWN: [&str; 20] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "authorization",
    "host",
    "x-request-id",
    "x-api-token",
    "content-length",
    "content-type",
    "accept",
    "cookie",
    "x-forwarded-for",
    "x-internal-hop",
    "idempotency-key",
];

/// One fuzz case.
#[derive(Arbitrary, Debug)]
pub struct Case {
    headers: Vec<(Name, Value)>,
    upstream_host: Value,
    inject: Name,
    request_id: Value,
}

#[derive(Arbitrary, Debug)]
enum Name {
    Known(u8),
    /// A known name in mixed case (HeaderName lower-cases it).
    Shouted(u8),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Value {
    Raw(Vec<u8>),
    /// A Connection-style list: names from the generator, joined with separators.
    List(Vec<(Name, Sep)>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Sep {
    Comma,
    CommaSpace,
    SpaceCommaTab,
    Commas,
    Space,
}

impl Name {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Name::Known(i) => KNOWN[usize::from(*i) % KNOWN.len()].as_bytes().to_vec(),
            Name::Shouted(i) => KNOWN[usize::from(*i) % KNOWN.len()]
                .bytes()
                .enumerate()
                .map(|(j, b)| {
                    if j % 2 == 0 {
                        b.to_ascii_uppercase()
                    } else {
                        b
                    }
                })
                .collect(),
            Name::Raw(b) => b.clone(),
        }
    }

    fn header_name(&self) -> Option<HeaderName> {
        HeaderName::from_bytes(&self.bytes()).ok()
    }
}

impl Value {
    fn header_value(&self) -> Option<HeaderValue> {
        let bytes = match self {
            Value::Raw(b) => b.clone(),
            Value::List(items) => {
                let mut out = Vec::new();
                for (name, sep) in items {
                    out.extend_from_slice(&name.bytes());
                    out.extend_from_slice(match sep {
                        Sep::Comma => b",",
                        Sep::CommaSpace => b", ",
                        Sep::SpaceCommaTab => b" ,\t",
                        Sep::Commas => b",,",
                        Sep::Space => b" ",
                    });
                }
                out
            }
        };
        HeaderValue::from_bytes(&bytes).ok()
    }
}

/// Runs both functions on the case's headers and checks every property above.
pub fn check(case: &Case) {
    let mut original = HeaderMap::new();
    for (name, value) in &case.headers {
        if let (Some(n), Some(v)) = (name.header_name(), value.header_value()) {
            original.append(n, v);
        }
    }
    let host = case
        .upstream_host
        .header_value()
        .unwrap_or_else(|| HeaderValue::from_static("api.pay.example"));
    let request_id = case
        .request_id
        .header_value()
        .unwrap_or_else(|| HeaderValue::from_static("0123456789abcdef"));
    let inject = case.inject.header_name().unwrap_or(header::AUTHORIZATION);
    let listed = connection_listed(&original);
    let stripped =
        |name: &HeaderName| HOP_BY_HOP.contains(&name.as_str()) || listed.iter().any(|l| l == name);

    // strip_hop_by_hop alone.
    let mut h = original.clone();
    strip_hop_by_hop(&mut h);
    for name in original.keys() {
        if stripped(name) {
            assert!(
                !h.contains_key(name),
                "{name} is hop-by-hop or listed in Connection but was forwarded"
            );
        } else {
            assert_eq!(
                values(&h, name),
                values(&original, name),
                "end-to-end header {name} was changed"
            );
        }
    }
    assert!(
        h.keys().all(|k| original.contains_key(k)),
        "strip_hop_by_hop added a header"
    );

    // prepare_request.
    let mut h = original.clone();
    prepare_request(&mut h, &host, &inject, &request_id);
    let managed = |name: &HeaderName| {
        name == header::AUTHORIZATION
            || *name == inject
            || name == header::HOST
            || *name == REQUEST_ID
    };
    for name in original.keys() {
        if stripped(name) && !managed(name) {
            assert!(
                !h.contains_key(name),
                "{name} is hop-by-hop or listed in Connection but was forwarded"
            );
        } else if !stripped(name) && !managed(name) {
            assert_eq!(
                values(&h, name),
                values(&original, name),
                "end-to-end header {name} was changed"
            );
        }
    }
    assert!(
        !h.contains_key(header::AUTHORIZATION),
        "the app's authorization header was forwarded"
    );
    if inject != header::HOST && inject != REQUEST_ID {
        assert!(
            !h.contains_key(&inject),
            "the app's {inject} header was forwarded"
        );
    }
    assert_eq!(
        values(&h, &header::HOST),
        vec![host.clone()],
        "host is not the upstream's"
    );
    assert_eq!(
        values(&h, &REQUEST_ID),
        vec![request_id.clone()],
        "x-request-id is not the given id"
    );
    check_request_id(&original);
}

/// `request_id` keeps the app's `x-request-id` only when it sent one, of 1 to 128
/// characters of `A-Za-z0-9._:@/+=-` (the access log writes it unquoted).
fn check_request_id(original: &HeaderMap) {
    let id = request_id(original);
    let sent = values(original, &REQUEST_ID);
    let safe = |v: &HeaderValue| {
        let b = v.as_bytes();
        (1..=128).contains(&b.len())
            && b.iter().all(|c| {
                c.is_ascii_alphanumeric()
                    || matches!(c, b'.' | b'_' | b':' | b'@' | b'/' | b'+' | b'=' | b'-')
            })
    };
    match sent.as_slice() {
        [one] if safe(one) => assert_eq!(&id, one, "the app's safe x-request-id was replaced"),
        _ => assert!(
            safe(&id) && !sent.contains(&id),
            "an unsafe or repeated x-request-id was kept, or the new one is unsafe"
        ),
    }
}

/// Every name listed in the Connection headers (RFC 9110 §7.6.1: a comma-separated list
/// of field names; OWS is spaces and tabs). Elements that are not valid names are ignored.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|element| {
            let start = element.iter().position(|b| !matches!(b, b' ' | b'\t'))?;
            let end = element.iter().rposition(|b| !matches!(b, b' ' | b'\t'))?;
            HeaderName::from_bytes(&element[start..=end]).ok()
        })
        .collect()
}

fn values(h: &HeaderMap, name: &HeaderName) -> Vec<HeaderValue> {
    h.get_all(name).iter().cloned().collect()
}
