//! Command-line types (clap). Dispatch lives in `main.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Authenticating reverse-proxy sidecar for OAuth2-protected APIs.
#[derive(Debug, Parser)]
#[command(name = "tokenproxy", version, about, propagate_version = true)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(
        short,
        long,
        env = "TOKENPROXY_CONFIG",
        global = true,
        value_name = "PATH"
    )]
    pub config: Option<PathBuf>,
    /// What to do; without one, run the sidecar.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar (the default).
    Run,
    /// Validate the configuration and print a redacted summary.
    Check,
    /// Obtain one token for CLIENT and print its metadata.
    Token {
        /// The client name (a `[clients.NAME]` table).
        client: String,
        /// Also print the access token (and a new refresh token, if one came back).
        #[arg(long)]
        show_token: bool,
        /// For `grant = "refresh_token"` clients: spend the configured refresh token.
        /// With a rotating provider the old one dies, so pair this with --show-token.
        #[arg(long)]
        spend_refresh_token: bool,
        /// Instead: read a new refresh token from stdin and hand it to the running
        /// sidecar (through its admin listener), e.g. for a client in needs_authorization.
        #[arg(long, conflicts_with_all = ["show_token", "spend_refresh_token"])]
        refresh_token_from_stdin: bool,
    },
    /// Log in once through the provider's authorization-code flow and store the
    /// refresh token where the sidecar finds it (for `[clients.CLIENT.authorize]`).
    Authorize {
        /// The client name (a `[clients.NAME]` table with an `[authorize]` table).
        client: String,
        /// Try to open the URL in a browser (xdg-open / open).
        #[arg(long)]
        open: bool,
        /// Do not listen for the redirect: paste the redirected URL on stdin instead
        /// (for hosts where the browser cannot reach this machine's loopback).
        #[arg(long)]
        no_listen: bool,
        /// Give up when no redirect came within this long.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Work with a client's subjects through the running sidecar's admin listener.
    Subjects {
        /// What to do.
        #[command(subcommand)]
        command: SubjectsCommand,
    },
    /// Run the sidecar in front of a built-in mock provider and API on loopback.
    Demo {
        /// Where the demo sidecar listens for the app.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the admin endpoints listen.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
        /// Access token lifetime at the mock provider.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        token_lifetime: std::time::Duration,
        /// How often the demo sends a request through the sidecar and prints the result.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Stop after this long (default: run until Ctrl-C).
        #[arg(long, value_parser = humantime::parse_duration)]
        exit_after: Option<std::time::Duration>,
        /// Where the demo's wallet client (which needs a person to log in once) listens.
        #[arg(long, default_value = "127.0.0.1:8081")]
        wallet_listen: SocketAddr,
        /// The loopback port `tokenproxy authorize wallet` receives the redirect on.
        #[arg(long, default_value = "8765")]
        redirect_port: u16,
        /// Where the demo's marketplace client (one token per merchant) listens.
        #[arg(long, default_value = "127.0.0.1:8082")]
        market_listen: SocketAddr,
        /// Where the demo's connect listener (the merchants' browsers) listens.
        #[arg(long, default_value = "127.0.0.1:8090")]
        connect_listen: SocketAddr,
    },
}

/// `tokenproxy subjects ...`: all through the running sidecar's admin listener
/// (`admin.listen`), with the admin key of the configuration.
#[derive(Debug, Subcommand)]
pub enum SubjectsCommand {
    /// Import subjects' tokens (migration): one JSON object per line on stdin,
    /// `{"subject": …, "refresh_token": …}`, optionally with `access_token` and
    /// `expires_in` (seconds) or `expires_at`, and `refresh_token_expires_in`.
    /// Refused lines are reported by number; exits non-zero if any was.
    Import {
        /// The client name (a `[clients.NAME]` table with `[subjects]`).
        client: String,
    },
    /// Print CLIENT's subjects, one JSON object per line (never a token).
    List {
        /// The client name (a `[clients.NAME]` table with `[subjects]`).
        client: String,
        /// Only subjects in this state, e.g. needs_authorization.
        #[arg(long, value_name = "STATE")]
        state: Option<String>,
    },
    /// Forget SUBJECT of CLIENT (and revoke its refresh token at `revoke_url`,
    /// when configured).
    Delete {
        /// The client name.
        client: String,
        /// The subject id.
        subject: String,
    },
    /// Print a one-time connect link for SUBJECT of CLIENT: whoever opens it
    /// signs in at the provider, and the tokens become SUBJECT's.
    Connect {
        /// The client name (a `[clients.NAME]` table with `[subjects]` and `[authorize]`).
        client: String,
        /// The subject id (1 to 128 characters of A-Za-z0-9._:@-).
        subject: String,
        /// Where the browser goes afterwards; must start with one of `connect.return_to`
        /// (default: the first of them).
        #[arg(long, value_name = "URL")]
        return_to: Option<String>,
    },
}
