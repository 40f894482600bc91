//! Guards for rules that a review can miss: library code (everything before a
//! file's `#[cfg(test)]`; a `tests.rs` file is unit tests whole) has no `unwrap()`, no `#[instrument]` without
//! `skip_all` (it would log every argument, secrets included), never formats a
//! token-endpoint body or a `Secret`'s exposed value into a log or error, and never
//! mutates the process environment.

use std::path::{Path, PathBuf};

fn library_sources() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src/ is readable").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_name().is_some_and(|n| n != "tests.rs")
            {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("source is readable");
            let library = match text.find("#[cfg(test)]") {
                Some(i) => text[..i].to_owned(),
                None => text,
            };
            (path, library)
        })
        .collect()
}

fn violations(rule: impl Fn(&str) -> bool) -> Vec<String> {
    let mut found = Vec::new();
    for (path, text) in library_sources() {
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if rule(code) {
                found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn the_scan_sees_the_library() {
    let files = library_sources();
    assert!(
        files.len() > 20,
        "the scan must read src/ ({} files)",
        files.len()
    );
    assert!(files
        .iter()
        .any(|(p, t)| p.ends_with("refresher/install.rs") && t.contains("fn install")));
}

#[test]
fn library_code_has_no_unwrap() {
    let found = violations(|code| code.contains(".unwrap()"));
    assert!(
        found.is_empty(),
        "use ? or expect(\"why it cannot fail\"):\n{}",
        found.join("\n")
    );
}

#[test]
fn instrument_always_skips_all_arguments() {
    let found = violations(|code| code.contains("#[instrument") && !code.contains("skip_all"));
    assert!(
        found.is_empty(),
        "#[instrument] must use skip_all:\n{}",
        found.join("\n")
    );
}

#[test]
fn token_endpoint_bodies_and_exposed_secrets_are_never_formatted() {
    let found = violations(|code| {
        let formats = [
            "format!(",
            "info!(",
            "warn!(",
            "error!(",
            "debug!(",
            "trace!(",
            "println!(",
            "eprintln!(",
        ]
        .iter()
        .any(|m| code.contains(m));
        let body = code.contains("?body")
            || code.contains("%body")
            || code.contains("{body:?}")
            || code.contains("body = ?");
        let exposed_in_log = ["info!(", "warn!(", "error!(", "debug!(", "trace!("]
            .iter()
            .any(|m| code.contains(m))
            && code.contains(".expose()");
        (formats && body) || exposed_in_log
    });
    assert!(
        found.is_empty(),
        "bodies and secrets stay out of logs and messages:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_process_environment_is_never_mutated() {
    let found = violations(|code| code.contains("set_var(") || code.contains("remove_var("));
    assert!(
        found.is_empty(),
        "inject an Env lookup instead:\n{}",
        found.join("\n")
    );
}
