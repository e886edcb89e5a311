//! The background sweeper: a named thread that expires lapsed leases and prunes tombstones
//! past retention, in bounded batches, through the same public operations callers use.
//!
//! Lifecycle as in sled's flusher: `Running -> ShuttingDown -> ShutDown`, a condvar whose
//! timed wait a shutdown cuts short, and a join in `Drop`. If a sweep fails (or panics), the
//! engine is poisoned: later calls return [`Error::Poisoned`](crate::Error::Poisoned)
//! instead of running silently without expiry.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::engine::Inner;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Running,
    ShuttingDown,
    ShutDown,
}

pub(crate) struct Sweeper {
    shared: Arc<(Mutex<State>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

/// At most this many batches per tick, so a shutdown is never kept waiting long.
const MAX_BATCHES_PER_TICK: usize = 64;

impl Sweeper {
    pub fn spawn(inner: Arc<Inner>, interval: Duration, batch: usize) -> std::io::Result<Sweeper> {
        let shared = Arc::new((Mutex::new(State::Running), Condvar::new()));
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cleanup-queue-sweeper".into())
            .spawn(move || run(&inner, &theirs, interval, batch))?;
        Ok(Sweeper {
            shared,
            thread: Some(thread),
        })
    }
}

fn run(inner: &Inner, shared: &(Mutex<State>, Condvar), interval: Duration, batch: usize) {
    let (state, cv) = shared;
    loop {
        {
            let guard = state.lock().unwrap_or_else(|p| p.into_inner());
            let (guard, _) = cv
                .wait_timeout_while(guard, interval, |s| *s == State::Running)
                .unwrap_or_else(|p| p.into_inner());
            if *guard != State::Running {
                break;
            }
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| sweep_once(inner, batch, state)));
        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(crate::Error::Poisoned(_))) => break,
            Ok(Err(e)) => Some(format!("the sweeper failed: {e}")),
            Err(_) => Some("the sweeper panicked".to_string()),
        };
        if let Some(why) = failure {
            inner.poison(why);
            break;
        }
    }
    let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
    *guard = State::ShutDown;
    cv.notify_all();
}

fn sweep_once(inner: &Inner, batch: usize, state: &Mutex<State>) -> crate::Result<()> {
    let running = || *state.lock().unwrap_or_else(|p| p.into_inner()) == State::Running;
    for _ in 0..MAX_BATCHES_PER_TICK {
        if inner.expire_leases(batch, None)?.len() < batch || !running() {
            break;
        }
    }
    for _ in 0..MAX_BATCHES_PER_TICK {
        if inner.prune_tombstones(batch)? < batch || !running() {
            break;
        }
    }
    Ok(())
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        let (state, cv) = &*self.shared;
        {
            let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
            if *guard == State::Running {
                *guard = State::ShuttingDown;
            }
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
