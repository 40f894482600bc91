//! Process signals: SIGTERM/SIGINT start a drain (a second one exits at once);
//! SIGHUP asks for a configuration reload.

use tracing::{info, warn};

/// What a signal asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// SIGTERM or SIGINT: drain and exit.
    Shutdown,
    /// SIGHUP: re-read the configuration and secret files.
    Reload,
}

/// The process's signal streams.
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts listening for SIGTERM, SIGINT and SIGHUP.
    #[cfg(unix)]
    pub fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Starts listening for Ctrl-C.
    #[cfg(not(unix))]
    pub fn new() -> std::io::Result<Signals> {
        Ok(Signals {})
    }

    /// The next signal.
    #[cfg(unix)]
    pub async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.term.recv() => Event::Shutdown,
            _ = self.int.recv() => Event::Shutdown,
            _ = self.hup.recv() => Event::Reload,
        }
    }

    /// The next signal.
    #[cfg(not(unix))]
    pub async fn next(&mut self) -> Event {
        let _ = tokio::signal::ctrl_c().await;
        Event::Shutdown
    }

    /// After the first shutdown signal: a second one exits the process at once.
    pub fn arm_second_shutdown(mut self) {
        info!("shutdown signal received; draining (send it again to exit now)");
        tokio::spawn(async move {
            loop {
                if self.next().await == Event::Shutdown {
                    warn!("second shutdown signal; exiting without draining");
                    std::process::exit(130);
                }
            }
        });
    }
}

/// Resolves on the first SIGTERM or SIGINT, and arms the second one to exit.
pub async fn shutdown() -> std::io::Result<()> {
    let mut signals = Signals::new()?;
    while signals.next().await != Event::Shutdown {}
    signals.arm_second_shutdown();
    Ok(())
}
