//! Process signals: SIGTERM or SIGINT start a drain; a second one exits at once.

use tracing::{info, warn};

/// Resolves on the first SIGTERM or SIGINT, and arms the second one to exit the process.
pub async fn shutdown() -> std::io::Result<()> {
    wait_one().await?;
    info!("shutdown signal received; draining (send it again to exit now)");
    tokio::spawn(async {
        if wait_one().await.is_ok() {
            warn!("second shutdown signal; exiting without draining");
            std::process::exit(130);
        }
    });
    Ok(())
}

#[cfg(unix)]
async fn wait_one() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
async fn wait_one() -> std::io::Result<()> {
    tokio::signal::ctrl_c().await
}
