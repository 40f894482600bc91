//! Scrubbing the credentials of a token request out of the provider's answer.
//!
//! Some providers repeat what they were sent in their error text ("Invalid refresh
//! token: …"). Before any provider text is kept (errors, `/status`, logs), every
//! credential the request carried is replaced by `[redacted]` in every form the
//! provider may have written it: as sent or decoded, form-urlencoded (`+` or `%20` for
//! a space), strictly percent-encoded, JSON-escaped, and as the HTTP Basic base64 of
//! `id:secret` (RFC 6749 §2.3.1 urlencodes both halves first; some servers do not).

use base64::Engine as _;

/// What replaces a credential.
pub(crate) const REDACTED: &str = "[redacted]";

/// What is kept instead of provider text that still spells a credential once decoded.
const WITHHELD: &str = "[redacted: the provider's text repeated a credential]";

/// The credentials of one token request, ready to be scrubbed from provider text.
#[derive(Default)]
pub(crate) struct Redactor {
    /// Every written form of every credential, ASCII-lowercased (matching ignores
    /// ASCII case: percent-encoding may use either hex case).
    needles: Vec<String>,
    /// The credentials as they are, for the decoded check.
    raw: Vec<String>,
}

impl Redactor {
    /// Scrubs `secret` (a client secret, password, refresh token, code, ...) in every form.
    pub(crate) fn secret(&mut self, secret: &str) {
        if secret.is_empty() {
            return;
        }
        let form: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        let forms = [
            secret.to_owned(),
            form.replace('+', "%20"),
            percent_encode(secret),
            form,
        ];
        for f in &forms {
            self.needle(json_escape(f, false));
            self.needle(json_escape(f, true));
            self.needle(f.clone());
        }
        self.raw.push(secret.to_ascii_lowercase());
    }

    /// Scrubs HTTP Basic credentials for `id:secret`, and the secret itself.
    pub(crate) fn basic(&mut self, id: &str, secret: &str) {
        self.secret(secret);
        if secret.is_empty() {
            return;
        }
        let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        for pair in [
            format!("{}:{}", encode(id), encode(secret)),
            format!("{id}:{secret}"),
        ] {
            self.secret(&pair);
            for engine in [
                &base64::engine::general_purpose::STANDARD_NO_PAD,
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ] {
                // Unpadded, so that it also matches inside the padded form.
                self.needle(engine.encode(&pair));
            }
        }
    }

    fn needle(&mut self, needle: String) {
        let needle = needle.to_ascii_lowercase();
        if !needle.is_empty() && !self.needles.contains(&needle) {
            self.needles.push(needle);
        }
    }

    /// `text` with every credential replaced by `[redacted]`.
    ///
    /// Text that still contains a credential once percent-decoded (an encoding not
    /// listed above) is withheld as a whole.
    pub(crate) fn scrub(&self, text: &str) -> String {
        if self.needles.is_empty() {
            return text.to_owned();
        }
        let scrubbed = self.replace(text);
        let decoded = percent_decode(&scrubbed).to_ascii_lowercase();
        if self
            .raw
            .iter()
            .any(|secret| decoded.contains(secret.as_str()))
        {
            return WITHHELD.to_owned();
        }
        scrubbed
    }

    fn replace(&self, text: &str) -> String {
        // ASCII lowercasing keeps every byte offset, so ranges found in `lower` apply to `text`.
        let lower = text.to_ascii_lowercase();
        let mut ranges: Vec<(usize, usize)> = self
            .needles
            .iter()
            .flat_map(|needle| {
                lower
                    .match_indices(needle.as_str())
                    .map(|(at, m)| (at, at + m.len()))
            })
            .collect();
        if ranges.is_empty() {
            return text.to_owned();
        }
        ranges.sort_unstable();
        let mut out = String::with_capacity(text.len());
        let mut copied = 0;
        let mut end_of_redaction = 0;
        for (start, end) in ranges {
            if start < end_of_redaction {
                // Overlaps the redaction just written: extend it.
                end_of_redaction = end_of_redaction.max(end);
                copied = end_of_redaction;
                continue;
            }
            out.push_str(&text[copied..start]);
            out.push_str(REDACTED);
            end_of_redaction = end;
            copied = end;
        }
        out.push_str(&text[copied..]);
        out
    }
}

/// Every byte except RFC 3986 unreserved characters as `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `s` as it appears inside a JSON string; with `ascii`, non-ASCII as `\uXXXX` too.
fn json_escape(s: &str, ascii: bool) -> String {
    let quoted = serde_json::Value::String(s.to_owned()).to_string();
    let inner = &quoted[1..quoted.len() - 1];
    if !ascii {
        return inner.to_owned();
    }
    let mut out = String::with_capacity(inner.len());
    for c in inner.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// Percent-decoding with `+` as a space; invalid escapes stay as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(byte) = hex {
                    out.push(byte);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr+t/ \"q\"\\é~*";

    fn redactor() -> Redactor {
        let mut r = Redactor::default();
        r.basic("client id", SECRET);
        r.secret("rt-Plain123");
        r
    }

    #[test]
    fn every_written_form_of_a_credential_is_redacted() {
        let r = redactor();
        let form: String = form_urlencoded::byte_serialize(SECRET.as_bytes()).collect();
        let forms = [
            SECRET.to_owned(),
            form.clone(),
            form.replace('+', "%20"),
            form.to_ascii_lowercase(),
            percent_encode(SECRET),
            json_escape(SECRET, false),
            json_escape(SECRET, true),
            "rt-Plain123".to_owned(),
            "RT-PLAIN123".to_owned(),
        ];
        for f in forms {
            let text = format!("Invalid credential: {f} (try again)");
            assert_eq!(
                r.scrub(&text),
                "Invalid credential: [redacted] (try again)",
                "the form {f:?} should have been redacted"
            );
        }
    }

    #[test]
    fn basic_credentials_and_the_pair_inside_them_are_redacted() {
        let r = redactor();
        let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let inside = format!("{}:{}", encode("client id"), encode(SECRET));
        let b64 = base64::engine::general_purpose::STANDARD.encode(&inside);
        let raw_b64 =
            base64::engine::general_purpose::STANDARD.encode(format!("client id:{SECRET}"));
        for f in [format!("Basic {b64}"), inside, raw_b64] {
            let scrubbed = r.scrub(&format!("bad header {f}"));
            assert!(
                !scrubbed.contains(&f) && scrubbed.contains(REDACTED),
                "{f:?} should have been redacted: {scrubbed}"
            );
        }
    }

    #[test]
    fn text_that_decodes_to_a_credential_is_withheld() {
        let r = redactor();
        // "rt-Plain123" with only some characters encoded.
        assert_eq!(r.scrub("bad token %72t-Plain%3123"), WITHHELD);
    }

    #[test]
    fn text_without_credentials_is_kept_and_overlaps_make_one_redaction() {
        let r = redactor();
        assert_eq!(r.scrub("Invalid grant."), "Invalid grant.");
        let mut overlapping = Redactor::default();
        overlapping.secret("abcdef");
        overlapping.secret("defghi");
        assert_eq!(overlapping.scrub("x abcdefghi y"), "x [redacted] y");
        assert_eq!(Redactor::default().scrub("a b"), "a b");
    }
}
