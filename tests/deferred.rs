//! `Queue::deferred`: mutating calls that leave their durability wait (and the wakeups that
//! follow it) to one later `Queue::complete`, as the Prefect plug-in runs them on its event
//! loop.

mod common;

use std::time::Duration;

use cleanup_queue::{Durability, OpStatus, Queue, ReserveFilter};
use common::*;

fn fsync_queue(dir: &tempfile::TempDir) -> Queue {
    path_builder(&dir.path().join("db"), &clock())
        .durability(Durability::Fsync)
        .open()
        .expect("open")
}

/// Results come back at once, later operations see them, and nothing is flushed or
/// published until `complete`, which one flush covers for all of them.
#[test]
fn deferred_operations_are_visible_at_once_and_durable_and_published_at_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = fsync_queue(&dir);
    let pool = uuid();
    // A dispatcher has looked at the pool before (its sequence is 0).
    assert_eq!(q.read_wakeup_sequence(pool).expect("seq"), 0);
    let before = q.commit_stats();
    let ((a, r, ack), pending) = q.deferred(|| {
        let a = q.enqueue(msg(pool, uuid(), "a")).expect("enqueue");
        let b = q.enqueue(msg(pool, uuid(), "b")).expect("enqueue");
        // Sees the staged enqueue of `a` (FIFO: a first).
        let r = q
            .reserve(pool, &ReserveFilter::any())
            .expect("reserve")
            .expect("a is visible");
        let ack = q
            .ack(pool, b.message_id, "not-a-token")
            .expect("ack of an unreserved message");
        (a, r, ack)
    });
    assert_eq!(r.message.message_id, a.message_id);
    assert_eq!(ack.status, OpStatus::NotCurrent);
    let staged = q.commit_stats();
    assert_eq!(staged.flushes, before.flushes, "nothing flushed yet");
    assert!(!q.is_durable(&pending));
    // The enqueues' wakeup is not published before it is durable.
    assert_eq!(
        q.wait_for_wakeup(pool, 0, Some(Duration::ZERO))
            .expect("check"),
        None
    );
    q.complete(pending).expect("complete");
    let after = q.commit_stats();
    assert_eq!(after.flushes, before.flushes + 1, "one flush for all");
    assert_eq!(
        after.storage_commits,
        before.storage_commits + 1,
        "one batch"
    );
    let woke = q
        .wait_for_wakeup(pool, 0, Some(Duration::ZERO))
        .expect("check")
        .expect("published at complete");
    assert_eq!(woke.sequence, 2);
    assert!(q
        .read_reservation(pool, a.message_id)
        .expect("read")
        .is_some());
    assert_clean(&q);
}

/// In `Buffered` mode there is nothing to wait for.
#[test]
fn in_buffered_mode_deferred_operations_are_durable_at_once() {
    let q = temp_builder(&clock())
        .durability(Durability::Buffered {
            every: Duration::from_secs(60),
        })
        .open()
        .expect("open");
    let pool = uuid();
    let (_, pending) = q.deferred(|| q.enqueue(msg(pool, uuid(), "a")).expect("enqueue"));
    assert!(q.is_durable(&pending));
    q.complete(pending).expect("complete");
    assert_eq!(q.read_wakeup_sequence(pool).expect("seq"), 1);
}

/// Only this thread's calls on this queue are deferred: another queue, another thread and
/// everything after the scope wait as usual; scopes nest.
#[test]
fn deferral_is_scoped_to_its_thread_queue_and_closure() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (q, other) = (fsync_queue(&d1), fsync_queue(&d2));
    let pool = uuid();
    let (_, pending) = q.deferred(|| {
        other.enqueue(msg(pool, uuid(), "o")).expect("enqueue");
        assert_eq!(other.read_wakeup_sequence(pool).unwrap(), 1, "not deferred");
        std::thread::scope(|s| {
            s.spawn(|| q.enqueue(msg(pool, uuid(), "t")).expect("enqueue"));
        });
        assert_eq!(
            q.read_wakeup_sequence(pool).unwrap(),
            1,
            "other thread waited"
        );
        let (_, inner) = q.deferred(|| q.enqueue(msg(pool, uuid(), "n")).expect("enqueue"));
        q.complete(inner).expect("complete");
        q.enqueue(msg(pool, uuid(), "d")).expect("enqueue");
    });
    // `t` and `n` are published (2); `d` is deferred: its wakeup (3) waits for complete.
    let check = |after| {
        q.wait_for_wakeup(pool, after, Some(Duration::ZERO))
            .unwrap()
            .map(|w| w.sequence)
    };
    assert_eq!(check(1), Some(2));
    assert_eq!(check(2), None);
    q.complete(pending).expect("complete");
    assert_eq!(check(2), Some(3));
    q.enqueue(msg(pool, uuid(), "after")).expect("enqueue");
    assert_eq!(check(3), Some(4), "no longer deferred");
}

/// A deferred call that fails after committing part of its work (reserve: the lease expiry
/// commits, the reservation write fails) leaves that part in the pending record, so
/// `complete` still publishes the expiry's wakeup.
#[test]
fn a_failed_deferred_call_still_completes_what_it_committed() {
    let (q, clock) = queue();
    let pool = uuid();
    let id = enqueue_new(&q, pool, "a");
    reserve_one(&q, pool);
    clock.advance(Duration::from_secs(3600));
    let seq = q.read_wakeup_sequence(pool).unwrap();
    q.inject_write_failure(2);
    let (result, pending) = q.deferred(|| q.reserve(pool, &ReserveFilter::any()));
    assert!(result.is_err());
    q.complete(pending).expect("complete");
    assert_eq!(q.read_wakeup_sequence(pool).unwrap(), seq + 1);
    let m = q.read_message(pool, id).unwrap().expect("redelivered");
    assert_eq!(m.delivery_count, 1);
    assert_clean(&q);
}

/// A durability-only copy of a pending record waits for the same writes and publishes
/// nothing: a thread can wait on it while another completes the record (the plug-in's
/// waiter and a cancelled caller), and only the record publishes the wakeups.
#[test]
fn a_durability_only_copy_waits_for_the_same_writes_and_publishes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = fsync_queue(&dir);
    let pool = uuid();
    assert_eq!(q.read_wakeup_sequence(pool).expect("seq"), 0);
    let (_, pending) = q.deferred(|| q.enqueue(msg(pool, uuid(), "a")).expect("enqueue"));
    let probe = pending.durability_only();
    assert!(!q.is_durable(&probe));
    let published = || {
        q.wait_for_wakeup(pool, 0, Some(Duration::ZERO))
            .expect("check")
            .map(|w| w.sequence)
    };
    std::thread::scope(|s| {
        let waiter = s.spawn(|| q.wait_durable(&probe));
        q.complete(pending).expect("complete");
        waiter.join().expect("join").expect("durable");
    });
    assert!(q.is_durable(&probe));
    assert_eq!(published(), Some(1), "the record published its wake");
    let (_, pending) = q.deferred(|| q.enqueue(msg(pool, uuid(), "b")).expect("enqueue"));
    let probe = pending.durability_only();
    q.complete(probe).expect("complete the copy");
    assert!(q.is_durable(&pending));
    assert_eq!(published(), Some(1), "the copy published nothing");
    q.complete(pending).expect("complete");
    assert_eq!(published(), Some(2));
}

/// `wait_durable_now` makes a record durable like `wait_durable` (one round for everything
/// staged), publishing nothing; `complete` then only publishes.
#[test]
fn wait_durable_now_flushes_what_is_staged_and_publishes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = fsync_queue(&dir);
    let pool = uuid();
    assert_eq!(q.read_wakeup_sequence(pool).expect("seq"), 0);
    let (_, first) = q.deferred(|| q.enqueue(msg(pool, uuid(), "a")).expect("enqueue"));
    let (_, second) = q.deferred(|| q.enqueue(msg(pool, uuid(), "b")).expect("enqueue"));
    let before = q.commit_stats();
    q.wait_durable_now(&second, || {}).expect("durable");
    assert!(q.is_durable(&first) && q.is_durable(&second));
    assert_eq!(
        q.commit_stats().flushes,
        before.flushes + 1,
        "one round for both"
    );
    assert_eq!(
        q.wait_for_wakeup(pool, 0, Some(Duration::ZERO))
            .expect("check"),
        None,
        "nothing published yet"
    );
    q.complete(first).expect("complete");
    q.complete(second).expect("complete");
    assert_eq!(
        q.commit_stats().flushes,
        before.flushes + 1,
        "no further flush"
    );
    let woke = q
        .wait_for_wakeup(pool, 0, Some(Duration::ZERO))
        .expect("check")
        .expect("published at complete");
    assert_eq!(woke.sequence, 2);
}

/// `wait_durable_now`'s callback runs once the writes are durable, exactly once, and not
/// after a failed flush.
#[test]
fn wait_durable_now_calls_back_once_when_durable_and_never_after_a_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = fsync_queue(&dir);
    let pool = uuid();
    let (_, pending) = q.deferred(|| q.enqueue(msg(pool, uuid(), "a")).expect("enqueue"));
    let mut calls = 0;
    q.wait_durable_now(&pending, || {
        assert!(q.is_durable(&pending), "durable before the callback");
        calls += 1;
    })
    .expect("durable");
    assert_eq!(calls, 1);
    // Already durable: called at once.
    q.wait_durable_now(&pending, || calls += 1)
        .expect("durable");
    assert_eq!(calls, 2);
    q.complete(pending).expect("complete");
    q.inject_flush_failure(1);
    let (_, failing) = q.deferred(|| q.enqueue(msg(pool, uuid(), "b")).expect("enqueue"));
    assert!(q.wait_durable_now(&failing, || calls += 1).is_err());
    assert_eq!(calls, 2, "no callback after a failed flush");
    assert!(q.complete(failing).is_err());
}
