//! `${VAR}` expansion and `*_file` secret reads, through an injected [`Env`].
//!
//! The process environment and the file system are reached only through the
//! [`Env`] trait, so tests use [`MapEnv`] and never touch the real environment
//! (`std::env::set_var` is banned). Errors name the dotted key and the variable
//! or path, never a secret value.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use super::error::{io_text, ConfigError};
use crate::secret::Secret;

/// Where `${VAR}` values and `*_file` contents come from.
pub trait Env {
    /// The value of environment variable `name`, if it is set (and valid UTF-8).
    fn var(&self, name: &str) -> Option<String>;
    /// The whole content of the file at `path`.
    fn read_file(&self, path: &Path) -> io::Result<String>;
    /// The permission bits of the file at `path` when tokenproxy's own user
    /// owns it; `None` for another user's file (as ssh, which checks only its
    /// user's keys: a Kubernetes secret is root's, shared with the pod's group)
    /// and where there are no unix modes.
    fn owned_file_mode(&self, path: &Path) -> io::Result<Option<u32>>;
    /// `Ok` when `dir` is a directory tokenproxy may create files in.
    fn check_dir_writable(&self, dir: &Path) -> io::Result<()>;
}

/// The real process environment and file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemEnv;

impl Env for SystemEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn read_file(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    #[cfg(unix)]
    fn owned_file_mode(&self, path: &Path) -> io::Result<Option<u32>> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        let mine = meta.uid() == rustix::process::geteuid().as_raw();
        Ok(mine.then_some(meta.mode() & 0o7777))
    }

    #[cfg(not(unix))]
    fn owned_file_mode(&self, _path: &Path) -> io::Result<Option<u32>> {
        Ok(None)
    }

    fn check_dir_writable(&self, dir: &Path) -> io::Result<()> {
        let meta = std::fs::metadata(dir)?;
        if !meta.is_dir() {
            return Err(io::Error::other("not a directory"));
        }
        #[cfg(unix)]
        {
            use rustix::fs::Access;
            rustix::fs::access(dir, Access::WRITE_OK | Access::EXEC_OK)?;
        }
        #[cfg(not(unix))]
        if meta.permissions().readonly() {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only"));
        }
        Ok(())
    }
}

/// An in-memory environment for tests: `MapEnv::new().var("A", "b").file("/x", "y")`.
///
/// The builder method `var` shadows [`Env::var`] on a `MapEnv` value; call the
/// lookup as `Env::var(&env, "A")` when you need it directly.
#[derive(Clone, Default)]
pub struct MapEnv {
    vars: HashMap<String, String>,
    files: HashMap<PathBuf, String>,
    modes: HashMap<PathBuf, u32>,
    unwritable_dirs: HashMap<PathBuf, io::ErrorKind>,
}

impl MapEnv {
    /// An environment with no variables and no files.
    pub fn new() -> Self {
        MapEnv::default()
    }

    /// Sets environment variable `name` to `value`.
    pub fn var(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.vars.insert(name.into(), value.into());
        self
    }

    /// Adds a readable file at `path` with `content`.
    pub fn file(mut self, path: impl Into<PathBuf>, content: impl Into<String>) -> Self {
        self.files.insert(path.into(), content.into());
        self
    }

    /// Gives the file at `path` permission bits `mode` (files are 0600 otherwise).
    pub fn mode(mut self, path: impl Into<PathBuf>, mode: u32) -> Self {
        self.modes.insert(path.into(), mode);
        self
    }

    /// Makes `dir` fail [`Env::check_dir_writable`] with `kind` (directories are writable otherwise).
    pub fn unwritable_dir(mut self, dir: impl Into<PathBuf>, kind: io::ErrorKind) -> Self {
        self.unwritable_dirs.insert(dir.into(), kind);
        self
    }
}

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.vars.get(name).cloned()
    }

    fn read_file(&self, path: &Path) -> io::Result<String> {
        self.files
            .get(path)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file or directory"))
    }

    fn owned_file_mode(&self, path: &Path) -> io::Result<Option<u32>> {
        Ok(Some(self.modes.get(path).copied().unwrap_or(0o600)))
    }

    fn check_dir_writable(&self, dir: &Path) -> io::Result<()> {
        match self.unwritable_dirs.get(dir) {
            Some(kind) => Err(io::Error::from(*kind)),
            None => Ok(()),
        }
    }
}

// Values may be secrets: show only names and paths.
impl fmt::Debug for MapEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapEnv")
            .field("vars", &self.vars.keys().collect::<Vec<_>>())
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Expands strings and reads secrets for one config load.
pub(super) struct Expander<'a> {
    env: &'a dyn Env,
    /// Relative `*_file` paths are resolved against the config file's directory.
    base_dir: Option<&'a Path>,
}

impl<'a> Expander<'a> {
    /// An expander reading from `env`, resolving relative paths against `base_dir`.
    pub(super) fn new(env: &'a dyn Env, base_dir: Option<&'a Path>) -> Self {
        Expander { env, base_dir }
    }

    /// `raw` with `${VAR}` replaced and `$$` turned into `$`; errors name `key`.
    pub(super) fn string(&self, key: &str, raw: &str) -> Result<String, ConfigError> {
        expand(raw, key, self.env, false)
    }

    /// A secret given inline (`key`) or as a file (`key_file`), at most one of them.
    ///
    /// `prefix` is the dotted table (`clients.payments.token`), `name` the key
    /// without `_file`. File content loses its trailing newlines (`echo` and
    /// Kubernetes secrets add one). An empty secret is an error: it is almost
    /// always an unset variable or an empty mount.
    pub(super) fn secret(
        &self,
        prefix: &str,
        name: &str,
        inline: Option<String>,
        file: Option<String>,
    ) -> Result<Option<Secret>, ConfigError> {
        let key = format!("{prefix}.{name}");
        let file_key = format!("{key}_file");
        match (inline, file) {
            (Some(_), Some(_)) => Err(ConfigError::new(
                key,
                format!("is set together with {name}_file"),
            )
            .with_hint(format!("set only one of {name} and {name}_file"))),
            (Some(raw), None) => {
                let value = expand(&raw, &key, self.env, true)?;
                if value.is_empty() {
                    return Err(ConfigError::new(key, "is empty")
                        .with_hint(format!("set a value, or remove {name}")));
                }
                Ok(Some(Secret::new(value)))
            }
            (None, Some(raw_path)) => {
                let path = self.path(&self.string(&file_key, &raw_path)?);
                let content = self.env.read_file(&path).map_err(|e| {
                    ConfigError::new(
                        file_key.clone(),
                        format!("cannot read {}: {}", path.display(), io_text(&e)),
                    )
                    .with_hint("check that the secret is mounted and readable by tokenproxy")
                })?;
                self.check_private(&file_key, &path)?;
                let value = content.trim_end_matches(['\r', '\n']);
                if value.is_empty() {
                    return Err(
                        ConfigError::new(file_key, format!("{} is empty", path.display()))
                            .with_hint("write the secret into the file"),
                    );
                }
                Ok(Some(Secret::new(value)))
            }
            (None, None) => Ok(None),
        }
    }

    /// An environment variable, for settings that follow conventions such as `https_proxy`.
    pub(super) fn var(&self, name: &str) -> Option<String> {
        self.env.var(name)
    }

    /// Reads the (non-secret) file named by `raw_path` at `key`: its resolved path and content.
    pub(super) fn read(&self, key: &str, raw_path: &str) -> Result<(PathBuf, String), ConfigError> {
        let path = self.path(&self.string(key, raw_path)?);
        let content = self.env.read_file(&path).map_err(|e| {
            ConfigError::new(
                key,
                format!("cannot read {}: {}", path.display(), io_text(&e)),
            )
            .with_hint("check that the file is mounted and readable by tokenproxy")
        })?;
        Ok((path, content))
    }

    /// Like [`Expander::read`], for a file holding a secret or private key: it
    /// must not be open to group or others.
    pub(super) fn read_secret(
        &self,
        key: &str,
        raw_path: &str,
    ) -> Result<(PathBuf, String), ConfigError> {
        let (path, content) = self.read(key, raw_path)?;
        self.check_private(key, &path)?;
        Ok((path, content))
    }

    /// Refuses, as ssh does for private keys, a secret file of tokenproxy's
    /// user that its group or others may read or write.
    fn check_private(&self, key: &str, path: &Path) -> Result<(), ConfigError> {
        let mode = self.env.owned_file_mode(path).map_err(|e| {
            ConfigError::new(
                key,
                format!("cannot read {}: {}", path.display(), io_text(&e)),
            )
        })?;
        match mode {
            Some(mode) if mode & 0o077 != 0 => Err(ConfigError::new(
                key,
                format!(
                    "{} is open to group or others (mode {:04o}): anyone who can read it holds the secret",
                    path.display(),
                    mode & 0o7777
                ),
            )
            .with_hint(format!(
                "chmod 600 {}; for a Kubernetes secret volume set defaultMode: 0400",
                path.display()
            ))),
            _ => Ok(()),
        }
    }

    /// The directory of the store file at `path` exists and tokenproxy may
    /// create files there (the database and its lock live beside each other):
    /// `check` says so rather than `run` failing at start.
    pub(super) fn check_store_dir(&self, key: &str, path: &Path) -> Result<(), ConfigError> {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        self.env.check_dir_writable(dir).map_err(|e| {
            let (problem, hint) = if e.kind() == io::ErrorKind::NotFound {
                (
                    format!("directory {} does not exist", dir.display()),
                    format!(
                        "create it (mkdir -p {}), or mount a persistent volume there",
                        dir.display()
                    ),
                )
            } else {
                (
                    format!(
                        "directory {} is not writable: {}",
                        dir.display(),
                        io_text(&e)
                    ),
                    "let tokenproxy's user write to it, or choose a path on a writable volume"
                        .to_owned(),
                )
            };
            ConfigError::new(key, problem).with_hint(hint)
        })
    }

    /// `text` as a path, relative ones resolved against the config file's directory.
    pub(super) fn resolve_path(&self, text: &str) -> PathBuf {
        self.path(text)
    }

    fn path(&self, text: &str) -> PathBuf {
        let path = Path::new(text);
        match self.base_dir {
            Some(dir) if path.is_relative() && !dir.as_os_str().is_empty() => dir.join(path),
            _ => path.to_path_buf(),
        }
    }
}

/// Replaces `${VAR}` from `env` and `$$` with `$`; a `$` before anything but a
/// name or `{` stays as it is, and `$NAME` without braces is an error.
///
/// With `secret` set, error messages do not quote the text around the
/// reference, which may be part of the secret.
fn expand(raw: &str, key: &str, env: &dyn Env, secret: bool) -> Result<String, ConfigError> {
    const HINT: &str = "write ${NAME} for an environment variable and $$ for a literal $";
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let Some(end) = tail.find('}') else {
                return Err(
                    ConfigError::new(key, "has an unterminated ${ (no closing })").with_hint(HINT),
                );
            };
            let name = &tail[..end];
            if !is_var_name(name) {
                let problem = if secret {
                    "contains an invalid variable reference".to_owned()
                } else {
                    format!("${{{name}}} is not a valid variable reference")
                };
                return Err(ConfigError::new(key, problem).with_hint(
                    "variable names use letters, digits and _, and do not start with a digit",
                ));
            }
            let value = env.var(name).ok_or_else(|| {
                ConfigError::new(key, format!("environment variable {name} is not set")).with_hint(
                    format!("set {name} in tokenproxy's environment; write $$ for a literal $"),
                )
            })?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else if after.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            // `$NAME` is the shell's spelling; taken literally it fails much later
            // (an `invalid_client` from the provider), so it is refused here.
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            let name = &after[..end];
            let (problem, hint) = if secret {
                (
                    "contains $ followed by a name, which is not expanded".to_owned(),
                    HINT.to_owned(),
                )
            } else {
                (
                    format!("${name} is not expanded"),
                    format!("write it like ${{{name}}} for an environment variable, or $${name} for a literal $"),
                )
            };
            return Err(ConfigError::new(key, problem).with_hint(hint));
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> MapEnv {
        MapEnv::new().var("A", "alpha").var("EMPTY", "")
    }

    #[test]
    fn expands_variables_and_escapes() {
        let e = env();
        let x = |s: &str| expand(s, "k", &e, false);
        assert_eq!(x("${A}/${A}").ok().as_deref(), Some("alpha/alpha"));
        assert_eq!(x("$${A}").ok().as_deref(), Some("${A}"));
        assert_eq!(x("a$1 $-$").ok().as_deref(), Some("a$1 $-$"));
        assert_eq!(x("a$$b").ok().as_deref(), Some("a$b"));
        assert_eq!(x("x${EMPTY}y").ok().as_deref(), Some("xy"));
        assert_eq!(x("").ok().as_deref(), Some(""));
    }

    #[test]
    fn reference_errors_name_the_variable_and_key() {
        let e = env();
        let err = expand("${MISSING}", "clients.a.upstream", &e, false).unwrap_err();
        assert_eq!(err.key(), "clients.a.upstream");
        assert!(err.to_string().contains("MISSING is not set"), "{err}");
        let err = expand("x${A", "k", &e, false).unwrap_err();
        assert!(err.problem().contains("unterminated"), "{err}");
        let err = expand("${1x}", "k", &e, false).unwrap_err();
        assert!(err.problem().contains("not a valid variable"), "{err}");
        let err = expand("pw${a b}", "k", &e, true).unwrap_err();
        assert!(
            !err.to_string().contains("a b"),
            "secret text must not be echoed: {err}"
        );
    }

    #[test]
    fn a_name_after_a_dollar_without_braces_asks_for_braces() {
        let e = env();
        let err = expand("$PAY_CLIENT_ID", "clients.a.token.client_id", &e, false).unwrap_err();
        assert_eq!(err.key(), "clients.a.token.client_id");
        assert!(
            err.problem().contains("$PAY_CLIENT_ID is not expanded"),
            "{err}"
        );
        assert!(
            err.hint()
                .is_some_and(|h| h.contains("write it like ${PAY_CLIENT_ID}")),
            "the hint should show the braced form: {err}"
        );
        let err = expand("pw$sEcReT", "k", &e, true).unwrap_err();
        assert!(
            !err.to_string().contains("sEcReT"),
            "secret text must not be echoed: {err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn the_system_reports_the_mode_of_own_files_and_unwritable_directories() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tokenproxy-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("secret");
        std::fs::write(&file, "s").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let mode = SystemEnv.owned_file_mode(&file).expect("stat");
        assert_eq!(mode, Some(0o644), "a file of ours reports its mode");
        assert!(
            SystemEnv.check_dir_writable(&dir).is_ok(),
            "our temp dir is writable"
        );
        let missing = SystemEnv.check_dir_writable(&dir.join("missing"));
        assert_eq!(missing.map_err(|e| e.kind()), Err(io::ErrorKind::NotFound));
        assert!(
            SystemEnv.check_dir_writable(&file).is_err(),
            "a file is not a directory to write in"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn relative_secret_files_resolve_against_the_config_directory() {
        let e = MapEnv::new().file("/etc/tp/pw", "s3cret\r\n");
        let x = Expander::new(&e, Some(Path::new("/etc/tp")));
        let s = x.secret("t", "password", None, Some("pw".into()));
        assert_eq!(
            s.ok().flatten().map(|s| s.expose().to_owned()).as_deref(),
            Some("s3cret")
        );
    }
}
