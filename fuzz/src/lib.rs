//! Oracles shared by the fuzz targets in `fuzz_targets/`.
//!
//! Each target only turns its input into arguments for tokenproxy's public API; the
//! properties that must hold for every input live here, one module per area, so that
//! the raw-bytes and the structured target of the same parser check the same things.

pub mod config;
pub mod headers;
pub mod json;
pub mod mapped;
pub mod path;
pub mod token;

#[cfg(test)]
mod tests {
    //! The oracles themselves, on the seeds (`cargo test` in fuzz/; not part of CI).

    use std::path::{Path, PathBuf};

    use arbitrary::{Arbitrary, Unstructured};

    fn seeds(dir: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut out: Vec<_> = std::fs::read_dir(&root)
            .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
            .flatten()
            .map(|e| e.path())
            .map(|p| {
                let data = std::fs::read(&p).expect("readable seed");
                (p, data)
            })
            .collect();
        out.sort();
        assert!(!out.is_empty(), "no seeds in {dir}");
        out
    }

    #[test]
    fn token_seeds_pass() {
        for (_, body) in seeds("corpus/token_response") {
            crate::token::check(
                &body,
                crate::token::default_now(),
                crate::token::status_for(&body),
            );
        }
        for (_, data) in seeds("corpus/token_response_json") {
            if let Ok(case) = crate::json::Case::arbitrary_take_rest(Unstructured::new(&data)) {
                crate::token::check(&case.body(), case.now(), case.status());
            }
        }
    }

    #[test]
    fn mapped_token_seeds_and_regressions_pass() {
        for dir in [
            "corpus/token_response_mapped",
            "regressions/token_response_mapped",
        ] {
            for (_, data) in seeds(dir) {
                if let Ok(case) = crate::mapped::Case::arbitrary_take_rest(Unstructured::new(&data))
                {
                    crate::mapped::check(&case);
                }
            }
        }
    }

    #[test]
    fn rotation_keeps_classes() {
        assert_eq!(crate::token::rotate("ab-Z9.~"), "no-M4.~");
    }

    #[test]
    fn config_seeds_pass_and_valid_ones_parse() {
        for (path, data) in seeds("corpus/config") {
            let (&selector, text) = data.split_first().expect("selector byte");
            let text = String::from_utf8_lossy(text);
            crate::config::check(selector, &text);
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if [
                "example.toml",
                "password_grant_files.toml",
                "refresh_grant_mtls_proxy.toml",
            ]
            .contains(&name)
            {
                let env = crate::config::env(selector);
                if let Err(e) =
                    tokenproxy::config::from_str(&text, crate::config::source(selector), &env)
                {
                    panic!("{name} should be a valid config: {e}");
                }
            }
        }
    }

    #[test]
    fn config_marker_rules() {
        use crate::config::{legitimately_shown, MARKER};
        let client = |rest: &str| format!("[clients.c]\nlisten = \"127.0.0.1:8080\"\n{rest}");
        // A reference from a key that is shown by design may show.
        assert!(legitimately_shown(&client(
            "upstream = \"https://${SECRET}.example\""
        )));
        assert!(legitimately_shown(&client(
            "proxy = \"http://${SECRET}:3128\""
        )));
        assert!(legitimately_shown(&client(
            "[clients.c.token]\nclient_secret_file = \"/x/${SECRET}\""
        )));
        assert!(legitimately_shown(&format!("[log]\nlevel = \"{MARKER}\"")));
        // Secret keys never show their values.
        for secret in [
            "proxy = \"http://u:${SECRET}@proxy:3128\"",
            "[clients.c.token]\nclient_secret = \"${SECRET}\"",
            "[clients.c.token]\npassword = \"x${SECRET}\"",
            "[clients.c.token]\nrefresh_token = \"${SECRET}\"",
            "[clients.c.token.params]\naudience = \"${SECRET}\"",
        ] {
            assert!(!legitimately_shown(&client(secret)), "{secret}");
        }
        assert!(!legitimately_shown("[store]\nkey = \"${SECRET}\""));
    }

    #[test]
    fn header_seeds_and_regressions_pass() {
        for dir in ["corpus/headers", "regressions/headers"] {
            for (_, data) in seeds(dir) {
                if let Ok(case) =
                    crate::headers::Case::arbitrary_take_rest(Unstructured::new(&data))
                {
                    crate::headers::check(&case);
                }
            }
        }
    }
}
