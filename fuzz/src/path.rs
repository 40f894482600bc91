//! The request-path rule (`tokenproxy::proxy::route::check_path`).
//!
//! Property: a path the rule accepts names exactly the resource it spells,
//! however a hop behind the sidecar reads it. Each reading decodes `%XX` up to
//! three times, takes `\` for `/`, drops `;params`, and removes dot segments
//! (RFC 3986 §5.2.4); every reading of an accepted path must stay under the base
//! path with as many segments as the path had.

use tokenproxy::proxy::route::check_path;

const BASE: &str = "/v2/payments";

/// Checks the property for `input` (any bytes; non-UTF-8 is skipped, as the
/// http crate refuses it before the rule runs).
pub fn check(input: &[u8]) {
    let Ok(path) = std::str::from_utf8(input) else {
        return;
    };
    if check_path(path).is_err() {
        return;
    }
    let slashes = path.matches('/').count();
    let mut reading = path.as_bytes().to_vec();
    for _ in 0..4 {
        let text = String::from_utf8_lossy(&reading).replace('\\', "/");
        let without_params = text
            .split('/')
            .map(|s| s.split(';').next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("/");
        for candidate in [text, without_params] {
            let resolved = remove_dot_segments(&format!("{BASE}{candidate}"));
            assert!(
                resolved == BASE || resolved.starts_with(&format!("{BASE}/")),
                "{path:?} accepted but read as {resolved:?}"
            );
            assert_eq!(
                resolved[BASE.len()..].matches('/').count(),
                slashes,
                "{path:?} accepted but read as {resolved:?}"
            );
        }
        match decode(&reading) {
            Some(next) => reading = next,
            None => break,
        }
    }
}

fn decode(input: &[u8]) -> Option<Vec<u8>> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(input.len());
    let mut changed = false;
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' && i + 2 < input.len() {
            if let (Some(h), Some(l)) = (hex(input[i + 1]), hex(input[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                changed = true;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    changed.then_some(out)
}

/// RFC 3986 §5.2.4, with `//` collapsed as most servers do.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let trailing = path.ends_with('/');
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        match segment {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut resolved = format!("/{}", out.join("/"));
    if trailing && resolved.len() > 1 {
        resolved.push('/');
    }
    resolved
}
