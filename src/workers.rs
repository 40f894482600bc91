//! Proxy worker threads, one single-threaded tokio runtime each.
//!
//! Every worker serves every proxy listener: the workers share the listening
//! socket and take turns accepting. A connection is served start to end by the
//! worker that accepted it, and the upstream connections it borrows come from
//! that worker's share of the pool (see [`slot`]), so a request never crosses
//! threads: no work stealing and no cross-thread wake-ups on the hot path. This is
//! nginx's worker-process model, inside one process.
//!
//! Refreshers, the admin listener and reloads stay on the caller's runtime.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// The most slots any started worker set has asked for (workers + 1).
static SLOTS: AtomicUsize = AtomicUsize::new(1);

/// This thread's slot: `1..=n` on worker thread `0..n`, `0` anywhere else.
/// Per-thread state (the upstream pool's idle lists) is indexed by it.
pub fn slot() -> usize {
    SLOT.with(Cell::get)
}

/// How many slots per-thread state should have: 1 + the largest worker count
/// started in this process so far (slot numbers wrap around it).
pub fn slots() -> usize {
    SLOTS.load(Ordering::Relaxed)
}

/// Running worker threads. Dropping this stops them: each thread's runtime is
/// dropped on that thread, which cancels its remaining tasks.
pub struct Workers {
    handles: Vec<Handle>,
    // Dropping a sender ends its worker's `block_on`.
    _stops: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `n` (at least 1) worker threads named `tokenproxy-wN`.
    pub fn start(n: usize) -> io::Result<Workers> {
        let n = n.max(1);
        SLOTS.fetch_max(n + 1, Ordering::Relaxed);
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        for i in 0..n {
            let (stop, stopped) = oneshot::channel::<()>();
            let (ready, started) = std::sync::mpsc::channel::<io::Result<Handle>>();
            std::thread::Builder::new()
                .name(format!("tokenproxy-w{i}"))
                .spawn(move || {
                    SLOT.with(|s| s.set(i + 1));
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _caller_gone = ready.send(Err(e));
                            return;
                        }
                    };
                    let _caller_gone = ready.send(Ok(runtime.handle().clone()));
                    // Err means the sender was dropped: that is the stop signal too.
                    let _stopped = runtime.block_on(stopped);
                })?;
            let handle = started.recv().map_err(|_| {
                io::Error::other(format!(
                    "worker thread {i} ended before its runtime started"
                ))
            })??;
            handles.push(handle);
            stops.push(stop);
        }
        Ok(Workers {
            handles,
            _stops: stops,
        })
    }

    /// How many worker threads run.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Always false: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Spawns `task(i)` on every worker `i`.
    pub fn spawn_on_each<F, Fut>(&self, mut task: F) -> Vec<JoinHandle<()>>
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handles
            .iter()
            .enumerate()
            .map(|(i, handle)| handle.spawn(task(i)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_worker_runs_its_task_on_its_own_thread_with_its_own_slot() {
        let workers = Workers::start(3).expect("workers start");
        assert_eq!(workers.len(), 3);
        assert!(slots() >= 4);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let tasks = workers.spawn_on_each(|i| {
            let tx = tx.clone();
            async move {
                let name = std::thread::current().name().map(str::to_owned);
                let _ = tx.send((i, name, slot()));
            }
        });
        for task in tasks {
            task.await.expect("task ran");
        }
        drop(tx);
        let mut seen = Vec::new();
        while let Some(entry) = rx.recv().await {
            seen.push(entry);
        }
        seen.sort();
        assert_eq!(
            seen,
            (0..3)
                .map(|i| (i, Some(format!("tokenproxy-w{i}")), i + 1))
                .collect::<Vec<_>>()
        );
        assert_eq!(slot(), 0, "the caller's thread is not a worker");
    }

    #[tokio::test]
    async fn dropping_the_workers_cancels_their_tasks() {
        let workers = Workers::start(2).expect("workers start");
        let tasks = workers.spawn_on_each(|_| std::future::pending::<()>());
        drop(workers);
        for task in tasks {
            let ended = task.await;
            assert!(ended.is_err_and(|e| e.is_cancelled()), "task cancelled");
        }
    }
}
