//! Log subscriber setup: `log.level` (overridden by `RUST_LOG`) and `log.format`.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `rust_log` is the `RUST_LOG` value, if set.
pub fn init(level: &str, format: LogFormat, rust_log: Option<String>) -> Result<(), String> {
    let directive = rust_log
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| level.to_owned());
    let filter = EnvFilter::try_new(&directive)
        .map_err(|e| format!("log level {directive:?} is not a valid filter: {e}"))?;
    // Colour only on a terminal: under Kubernetes or docker logs stderr is a pipe.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("cannot install the log subscriber: {e}"))
}
