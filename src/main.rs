//! The `tokenproxy` binary: CLI dispatch and exit codes.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _};
use clap::Parser;

use tokenproxy::cli::{Cli, Command, SubjectsCommand};
use tokenproxy::clock::SystemClock;
use tokenproxy::config::{self, Config, SystemEnv};
#[cfg(feature = "demo")]
use tokenproxy::demo;
use tokenproxy::workers::Workers;
use tokenproxy::{signal, telemetry, Listeners};

/// jemalloc instead of the system allocator: see Cargo.toml.
#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => config_path(cli.config.as_deref()).and_then(|p| run(&p)),
        Command::Check => config_path(cli.config.as_deref()).and_then(|p| check(&p)),
        Command::Token {
            client,
            show_token,
            spend_refresh_token,
            refresh_token_from_stdin,
        } => config_path(cli.config.as_deref()).and_then(|p| {
            if refresh_token_from_stdin {
                provide_refresh_token(&p, &client)
            } else {
                token_command(&p, &client, show_token, spend_refresh_token)
            }
        }),
        Command::Authorize {
            client,
            open,
            no_listen,
            timeout,
        } => config_path(cli.config.as_deref()).and_then(|p| {
            authorize_command(
                &p,
                &client,
                tokenproxy::authorize::AuthorizeOptions {
                    listen: !no_listen,
                    timeout,
                    open,
                },
            )
        }),
        Command::Subjects { command } => {
            config_path(cli.config.as_deref()).and_then(|p| subjects_command(&p, command))
        }
        #[cfg(feature = "demo")]
        Command::Demo {
            listen,
            admin,
            token_lifetime,
            interval,
            exit_after,
            wallet_listen,
            redirect_port,
            market_listen,
            connect_listen,
        } => run_demo(demo::DemoOptions {
            listen,
            admin,
            token_lifetime,
            interval,
            exit_after,
            wallet_listen,
            redirect_port,
            market_listen,
            connect_listen,
        }),
        #[cfg(not(feature = "demo"))]
        Command::Demo { .. } => Err(anyhow!(
            "this build has no demo: build with the default feature `demo`"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

/// Prints the error on stderr: a configuration's problems one per line, then
/// how many there are; any other error with its causes on one line.
fn report(e: &anyhow::Error) {
    match e.downcast_ref::<config::ConfigError>() {
        Some(problems) => {
            for line in problems.to_string().lines() {
                eprintln!("tokenproxy: {line}");
            }
            eprintln!("tokenproxy: {}", problems.tally());
        }
        None => eprintln!("tokenproxy: {}", causes(e)),
    }
}

/// The error and its causes on one line; a cause the text already shows
/// (an error that prints its source, perhaps in lower case) is not repeated.
fn causes(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if text.to_lowercase().contains(&cause.to_lowercase()) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

fn config_path(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    given
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("no configuration: pass --config PATH or set TOKENPROXY_CONFIG"))
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Ok(config::load(path, &SystemEnv)?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tokenproxy")
        .build()
        .context("cannot start the async runtime")
}

fn run(path: &Path) -> anyhow::Result<()> {
    let config = load(path)?;
    telemetry::init(
        &config.log.level,
        config.log.format,
        std::env::var("RUST_LOG").ok(),
    )
    .map_err(|e| anyhow!(e))?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let env_workers = std::env::var("TOKIO_WORKER_THREADS").ok();
    let n_workers = config.runtime.resolve_workers(env_workers.as_deref(), cpus);
    // The proxy listeners are served by their own worker threads; this thread
    // runs the refreshers, the admin listener, reloads and signals.
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    control.block_on(async move {
        let mut signals = signal::Signals::new().context("cannot listen for signals")?;
        let listeners = Listeners::bind(&config).await?;
        let workers = Workers::start(n_workers).context("cannot start the worker threads")?;
        tracing::info!(workers = n_workers, "proxy worker threads started");
        let mut running =
            tokenproxy::start_with_workers(config, listeners, Arc::new(SystemClock), workers)?;
        while signals.next().await == signal::Event::Reload {
            // Logged and counted by reload_from; a bad config keeps the old one serving.
            let _outcome = running.reload_from(path, &SystemEnv).await;
        }
        signals.arm_second_shutdown();
        running.shutdown().await;
        Ok(())
    })
}

fn check(path: &Path) -> anyhow::Result<()> {
    let config = load(path)?;
    writeln!(stdout(), "{}", config.summary())?;
    Ok(())
}

fn token_command(path: &Path, client: &str, show: bool, spend: bool) -> anyhow::Result<()> {
    let config = load(path)?;
    let mut out = stdout();
    runtime()?.block_on(tokenproxy::operator::token(
        &config, client, show, spend, &mut out,
    ))?;
    Ok(())
}

fn provide_refresh_token(path: &Path, client: &str) -> anyhow::Result<()> {
    let config = load(path)?;
    if !config.clients.iter().any(|c| c.name == client) {
        bail!("no client {client:?} in {}", path.display());
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
        .context("cannot read the refresh token from stdin")?;
    let token = text.trim();
    if token.is_empty() {
        bail!("stdin was empty: pipe the refresh token in");
    }
    let admin = tokenproxy::operator::admin_target(config.admin.listen);
    let status = runtime()?.block_on(tokenproxy::operator::provide_refresh_token(
        admin,
        config.admin.api_key.as_ref(),
        client,
        tokenproxy::secret::Secret::new(token),
        std::time::Duration::from_secs(15),
    ))?;
    writeln!(
        stdout(),
        "client {client}: refresh token accepted; state {}, access token expires {}",
        status["state"].as_str().unwrap_or("?"),
        status["access_token_expires_at"]
            .as_str()
            .unwrap_or("(no expiry stated)")
    )?;
    Ok(())
}

fn subjects_command(path: &Path, command: SubjectsCommand) -> anyhow::Result<()> {
    let config = load(path)?;
    let client = match &command {
        SubjectsCommand::Import { client }
        | SubjectsCommand::List { client, .. }
        | SubjectsCommand::Delete { client, .. }
        | SubjectsCommand::Connect { client, .. } => client.clone(),
    };
    if !config.clients.iter().any(|c| c.name == client) {
        bail!("no client {client:?} in {}", path.display());
    }
    let admin = tokenproxy::operator::admin_target(config.admin.listen);
    let key = config.admin.api_key.as_ref();
    let mut out = stdout();
    let runtime = runtime()?;
    match command {
        SubjectsCommand::Import { .. } => {
            let mut input = std::io::stdin().lock();
            let summary = runtime.block_on(tokenproxy::operator::import_subjects(
                admin, key, &client, &mut input, &mut out,
            ))?;
            if summary.failed > 0 {
                bail!("{} line(s) were not imported", summary.failed);
            }
        }
        SubjectsCommand::List { state, .. } => {
            runtime.block_on(tokenproxy::operator::list_subjects(
                admin,
                key,
                &client,
                state.as_deref(),
                &mut out,
            ))?;
        }
        SubjectsCommand::Delete { subject, .. } => {
            runtime.block_on(tokenproxy::operator::delete_subject(
                admin, key, &client, &subject, &mut out,
            ))?;
        }
        SubjectsCommand::Connect {
            subject, return_to, ..
        } => {
            let link = runtime.block_on(tokenproxy::operator::connect_link(
                admin,
                key,
                &client,
                &subject,
                return_to.as_deref(),
            ))?;
            writeln!(out, "{}", link.url)?;
            eprintln!(
                "one-time link for subject {subject} of client {client}; it expires at {}",
                link.expires_at
            );
        }
    }
    Ok(())
}

fn authorize_command(
    path: &Path,
    client: &str,
    options: tokenproxy::authorize::AuthorizeOptions,
) -> anyhow::Result<()> {
    let config = load(path)?;
    let done = runtime()?.block_on(async {
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
        let mut say = |text: &str| eprintln!("{text}");
        tokenproxy::authorize::authorize(&config, client, &options, &mut stdin, &mut say).await
    })?;
    let when = |t: Option<std::time::SystemTime>| {
        t.map_or_else(|| "not stated".to_owned(), tokenproxy::clock::rfc3339)
    };
    let mut out = stdout();
    writeln!(out, "client {client}: authorized")?;
    writeln!(out, "  stored in:               {}", done.stored_in)?;
    if done.generation > 0 {
        writeln!(out, "  generation:              {}", done.generation)?;
    }
    writeln!(
        out,
        "  scope:                   {}",
        done.scope.as_deref().unwrap_or("(not stated)")
    )?;
    writeln!(
        out,
        "  access token expires:    {}",
        when(done.access_expires_at)
    )?;
    writeln!(
        out,
        "  refresh token expires:   {}",
        when(done.refresh_expires_at)
    )?;
    writeln!(
        out,
        "A running sidecar sharing this store picks it up within a few seconds."
    )?;
    Ok(())
}

/// Standard output for what a command prints. Once its reader is gone
/// (`tokenproxy check … | head -1`), the rest is dropped and the command ends
/// as Unix tools do, instead of panicking (`println!`) or failing with "broken
/// pipe". Any other write error (a full disk under `> file`) is still an error.
struct Stdout {
    out: std::io::StdoutLock<'static>,
    reader_gone: bool,
}

fn stdout() -> Stdout {
    Stdout {
        out: std::io::stdout().lock(),
        reader_gone: false,
    }
}

impl Stdout {
    fn quiet<T>(&mut self, result: std::io::Result<T>, gone: T) -> std::io::Result<T> {
        match result {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.reader_gone = true;
                Ok(gone)
            }
            other => other,
        }
    }
}

impl std::io::Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.reader_gone {
            return Ok(buf.len());
        }
        let written = self.out.write(buf);
        self.quiet(written, buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.reader_gone {
            return Ok(());
        }
        let flushed = self.out.flush();
        self.quiet(flushed, ())
    }
}

#[cfg(feature = "demo")]
fn run_demo(options: demo::DemoOptions) -> anyhow::Result<()> {
    telemetry::init(
        "info",
        config::LogFormat::Text,
        std::env::var("RUST_LOG").ok(),
    )
    .map_err(|e| anyhow!(e))?;
    runtime()?.block_on(demo::run(options))?;
    Ok(())
}
