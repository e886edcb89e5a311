//! Test-only failure injection in the storage layer: make the Nth transaction or the Nth
//! flush fail, to prove that every state change is all-or-nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Counters and triggers. 0 means "never fail".
#[derive(Default, Debug)]
pub(crate) struct Faults {
    writes: AtomicU64,
    fail_write: AtomicU64,
    flushes: AtomicU64,
    fail_flush: AtomicU64,
    /// 0: off; n: the next journaled apply stops after its journal and n - 1 writes.
    tear_apply: AtomicU64,
    /// The next flush panics (a bug in a flush round, as its callers would meet it).
    panic_flush: AtomicBool,
}

impl Faults {
    /// Fails the `n`th transaction from now (1 = the next one).
    pub fn fail_write_in(&self, n: u64) {
        let now = self.writes.load(Ordering::SeqCst);
        self.fail_write.store(now + n, Ordering::SeqCst);
    }

    /// Fails the `n`th flush from now (1 = the next one).
    pub fn fail_flush_in(&self, n: u64) {
        let now = self.flushes.load(Ordering::SeqCst);
        self.fail_flush.store(now + n, Ordering::SeqCst);
    }

    /// Makes the next flush panic.
    pub fn panic_next_flush(&self) {
        self.panic_flush.store(true, Ordering::SeqCst);
    }

    /// Stops the next batch applied through the journal after the journal and `writes` of
    /// its writes, as a crash would, failing it.
    pub fn tear_apply_after(&self, writes: u64) {
        self.tear_apply.store(writes + 1, Ordering::SeqCst);
    }

    /// Called before write `i` (0-based) of a journaled apply.
    pub fn before_applied_write(&self, i: u64) -> Result<()> {
        let at = self.tear_apply.load(Ordering::SeqCst);
        if at != 0 && at == i + 1 {
            self.tear_apply.store(0, Ordering::SeqCst);
            return Err(Error::Io(std::io::Error::other("injected torn apply")));
        }
        Ok(())
    }

    pub fn before_write(&self) -> Result<()> {
        trip(&self.writes, &self.fail_write, "write")
    }

    pub fn before_flush(&self) -> Result<()> {
        if self.panic_flush.swap(false, Ordering::SeqCst) {
            panic!("injected flush panic");
        }
        trip(&self.flushes, &self.fail_flush, "flush")
    }
}

fn trip(count: &AtomicU64, at: &AtomicU64, what: &str) -> Result<()> {
    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
    if at.load(Ordering::SeqCst) == n {
        return Err(Error::Io(std::io::Error::other(format!(
            "injected {what} failure"
        ))));
    }
    Ok(())
}
