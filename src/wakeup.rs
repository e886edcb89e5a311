//! Per-pool wakeup sequences that waiting dispatchers block on.
//!
//! The engine bumps a pool's sequence inside the transaction that made work visible, and
//! publishes the new value here only after that transaction is durable: a woken waiter always
//! finds the work reservable. Each pool has its own condvar, so traffic in one pool never
//! wakes waiters of another. Publishing skips the notify when nobody waits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::error::Result;

#[derive(Default)]
struct Slot {
    sequence: Mutex<u64>,
    changed: Condvar,
    waiting: AtomicUsize,
}

#[derive(Default)]
pub(crate) struct Wakeups {
    pools: Mutex<HashMap<Uuid, Arc<Slot>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Wakeups {
    /// The pool's slot, created from `load` (the durable stored sequence) on first use.
    /// `load` runs without the map's lock (it may wait for a flush).
    fn slot(&self, pool: Uuid, load: impl FnOnce() -> Result<u64>) -> Result<Arc<Slot>> {
        if let Some(s) = lock(&self.pools).get(&pool) {
            return Ok(s.clone());
        }
        let loaded = load()?;
        let slot = lock(&self.pools).entry(pool).or_default().clone();
        // Another thread may have made the slot meanwhile, behind what is durable now.
        let raised = {
            let mut s = lock(&slot.sequence);
            let raised = loaded > *s;
            *s = (*s).max(loaded);
            raised
        };
        if raised && slot.waiting.load(Ordering::SeqCst) > 0 {
            slot.changed.notify_all();
        }
        Ok(slot)
    }

    /// The latest published sequence of `pool`.
    pub fn current(&self, pool: Uuid, load: impl FnOnce() -> Result<u64>) -> Result<u64> {
        let slot = self.slot(pool, load)?;
        let seq = *lock(&slot.sequence);
        Ok(seq)
    }

    /// Publishes `sequence` for `pool` (never lowering it) and wakes its waiters.
    pub fn publish(
        &self,
        pool: Uuid,
        sequence: u64,
        load: impl FnOnce() -> Result<u64>,
    ) -> Result<()> {
        let slot = self.slot(pool, load)?;
        {
            let mut s = lock(&slot.sequence);
            *s = (*s).max(sequence);
        }
        // A waiter increments `waiting` while holding the sequence lock, before it sleeps;
        // we took that lock after it, so we see its increment.
        if slot.waiting.load(Ordering::SeqCst) > 0 {
            slot.changed.notify_all();
        }
        Ok(())
    }

    /// Blocks until `pool`'s sequence exceeds `after`, returning it; `None` when `timeout`
    /// passes first. A zero timeout only checks; no timeout waits for ever.
    pub fn wait(
        &self,
        pool: Uuid,
        after: u64,
        timeout: Option<Duration>,
        load: impl FnOnce() -> Result<u64>,
    ) -> Result<Option<u64>> {
        let slot = self.slot(pool, load)?;
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut seq = lock(&slot.sequence);
        loop {
            if *seq > after {
                return Ok(Some(*seq));
            }
            let remaining = match (timeout, deadline) {
                (None, _) => None,
                (Some(_), Some(d)) => match d.checked_duration_since(Instant::now()) {
                    Some(r) if !r.is_zero() => Some(r),
                    _ => return Ok(None),
                },
                // A timeout too large to add to now: as good as none.
                (Some(_), None) => None,
            };
            slot.waiting.fetch_add(1, Ordering::SeqCst);
            seq = match remaining {
                None => slot.changed.wait(seq).unwrap_or_else(|p| p.into_inner()),
                Some(r) => {
                    slot.changed
                        .wait_timeout(seq, r)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
            slot.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
