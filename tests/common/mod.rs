//! Helpers shared by the integration tests: a fresh queue on a manual clock, message
//! builders, policy shortcuts and an integrity assertion.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use cleanup_queue::{
    CleanupKind, ManualClock, NewMessage, Policy, Queue, QueueBuilder, Reservation, ReserveFilter,
    Timestamp,
};
use serde_json::json;
use uuid::Uuid;

/// The instant every manual clock starts at: 2026-12-04T15:55:00Z.
pub const START: Timestamp = Timestamp::from_micros(1_796_399_700_000_000);

/// A fresh manual clock at [`START`].
pub fn clock() -> ManualClock {
    ManualClock::new(START)
}

/// A temporary queue on a manual clock with the sweeper off; returns both.
pub fn queue() -> (Queue, ManualClock) {
    let c = clock();
    let q = temp_builder(&c).open().expect("open temporary queue");
    (q, c)
}

/// A temporary-database builder on `clock` with the sweeper off.
pub fn temp_builder(clock: &ManualClock) -> QueueBuilder {
    Queue::temporary().clock(clock.clone()).sweep_interval(None)
}

/// A builder for the database at `path` on `clock` with the sweeper off.
pub fn path_builder(path: &Path, clock: &ManualClock) -> QueueBuilder {
    Queue::builder(path)
        .clock(clock.clone())
        .sweep_interval(None)
}

/// A fresh random id (pool, message or queue).
pub fn uuid() -> Uuid {
    Uuid::new_v4()
}

/// `n` fresh ids.
pub fn uuids(n: usize) -> Vec<Uuid> {
    (0..n).map(|_| Uuid::new_v4()).collect()
}

/// A fresh `{"flow_run_id": "<uuid>"}` target.
pub fn target() -> serde_json::Value {
    json!({ "flow_run_id": Uuid::new_v4().to_string() })
}

/// A `cancelling_timeout_teardown.v1` message with a fresh target, no queue and no data.
pub fn msg(pool: Uuid, id: Uuid, key: &str) -> NewMessage {
    NewMessage::new(
        pool,
        id,
        key,
        CleanupKind::CancellingTimeoutTeardown,
        target(),
    )
}

/// [`msg`] of another kind.
pub fn msg_kind(pool: Uuid, id: Uuid, key: &str, kind: CleanupKind) -> NewMessage {
    NewMessage::new(pool, id, key, kind, target())
}

/// [`msg`] in a work queue.
pub fn msg_in(pool: Uuid, id: Uuid, key: &str, queue: Uuid) -> NewMessage {
    msg(pool, id, key).work_queue(queue)
}

/// Enqueues a new message with a fresh id and returns the id.
pub fn enqueue_new(q: &Queue, pool: Uuid, key: &str) -> Uuid {
    let id = Uuid::new_v4();
    let m = q.enqueue(msg(pool, id, key)).expect("enqueue");
    assert_eq!(m.message_id, id, "a fresh key must store a new message");
    id
}

/// Reserves with no filter, expecting a reservation.
pub fn reserve_one(q: &Queue, pool: Uuid) -> Reservation {
    q.reserve(pool, &ReserveFilter::any())
        .expect("reserve")
        .expect("a visible message")
}

/// Seconds.
pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A policy from its three values.
pub fn policy(lease: Duration, max_delivery_attempts: u32, retention: Option<Duration>) -> Policy {
    Policy {
        lease,
        max_delivery_attempts,
        completed_retention: retention,
    }
}

/// The default policy with another lease.
pub fn with_lease(lease: Duration) -> Policy {
    Policy {
        lease,
        ..Policy::default()
    }
}

/// The default policy with another max delivery attempts.
pub fn with_max(max_delivery_attempts: u32) -> Policy {
    Policy {
        max_delivery_attempts,
        ..Policy::default()
    }
}

/// The default policy with a completed retention.
pub fn with_retention(retention: Duration) -> Policy {
    Policy {
        completed_retention: Some(retention),
        ..Policy::default()
    }
}

/// Asserts `check_integrity` finds nothing.
#[track_caller]
pub fn assert_clean(q: &Queue) {
    let problems = q.check_integrity().expect("check_integrity");
    assert!(problems.is_empty(), "integrity violations: {problems:#?}");
}

/// Polls `cond` every 5 ms until it holds or `within` passes; returns whether it held.
pub fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `f` with `p` as the queue's policy, then restores the default policy (the Rust
/// counterpart of the Python suite's `cleanup_policy_settings` context manager).
pub fn under_policy<R>(q: &Queue, p: Policy, f: impl FnOnce() -> R) -> R {
    q.set_policy(p).expect("set_policy");
    let out = f();
    q.set_policy(Policy::default()).expect("restore policy");
    out
}
