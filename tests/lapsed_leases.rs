//! Lapsed leases across a restart (issue 4, item 6): leases that ran out while no process
//! had the database open are expired after the reopen, by the sweeper or by the next
//! `reserve` of the pool (or `expire_leases`, or the lease operation itself), and the pool
//! is woken exactly when a message becomes visible again. (tests/crash_recovery.rs checks
//! the same after a SIGKILL instead of a clean close.)

use std::path::Path;
use std::time::{Duration, Instant};

use cleanup_queue::{
    CleanupKind, Durability, ManualClock, NewMessage, OpStatus, Queue, QueueBuilder, ReserveFilter,
    Timestamp,
};
use serde_json::json;
use uuid::Uuid;

const START: Timestamp = Timestamp::from_micros(1_796_399_700_000_000);
const LEASE: Duration = Duration::from_secs(30);

fn builder(path: &Path, clock: &ManualClock) -> QueueBuilder {
    Queue::builder(path)
        .clock(clock.clone())
        .sweep_interval(None)
        .durability(Durability::Fsync)
        .lease(LEASE)
        .max_delivery_attempts(3)
}

fn enqueue(q: &Queue, pool: Uuid, id: Uuid) {
    q.enqueue(NewMessage::new(
        pool,
        id,
        format!("key-{id}"),
        CleanupKind::CancellingTimeoutTeardown,
        json!({"id": id.to_string()}),
    ))
    .expect("enqueue");
}

/// Pool `a`: `a1`, `a2` reserved, `a3` visible. Pool `b`: `b1` reserved. Closed at START.
struct Setup {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    a: Uuid,
    b: Uuid,
    a1: Uuid,
    a2: Uuid,
    a3: Uuid,
    b1: Uuid,
    tokens: Vec<String>,
    seq_a: u64,
    seq_b: u64,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let clock = ManualClock::new(START);
    let q = builder(&path, &clock).open().expect("open");
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (a1, a2, a3, b1) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    enqueue(&q, a, a1);
    enqueue(&q, a, a2);
    enqueue(&q, b, b1);
    let mut tokens = Vec::new();
    for (pool, id) in [(a, a1), (a, a2), (b, b1)] {
        let r = q
            .reserve(pool, &ReserveFilter::any())
            .expect("reserve")
            .expect("work");
        assert_eq!(r.message.message_id, id);
        tokens.push(r.reservation_token);
    }
    enqueue(&q, a, a3);
    let seq_a = q.read_wakeup_sequence(a).expect("seq");
    let seq_b = q.read_wakeup_sequence(b).expect("seq");
    drop(q);
    Setup {
        _dir: dir,
        path,
        a,
        b,
        a1,
        a2,
        a3,
        b1,
        tokens,
        seq_a,
        seq_b,
    }
}

fn after_the_leases() -> ManualClock {
    ManualClock::new(START.saturating_add(LEASE * 2))
}

#[test]
fn the_sweeper_expires_leases_that_lapsed_while_closed_and_wakes_the_pools() {
    let s = setup();
    let clock = after_the_leases();
    let q = builder(&s.path, &clock)
        .sweep_interval(Some(Duration::from_millis(20)))
        .open()
        .expect("reopen");
    // A dispatcher waiting on pool b from the moment of the reopen is woken.
    let waiter = {
        let q = q.clone();
        let (b, seq_b) = (s.b, s.seq_b);
        std::thread::spawn(move || q.wait_for_wakeup(b, seq_b, Some(Duration::from_secs(10))))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while [(s.a, s.a1), (s.a, s.a2), (s.b, s.b1)]
        .iter()
        .any(|(p, id)| q.read_reservation(*p, *id).expect("read").is_some())
    {
        assert!(
            Instant::now() < deadline,
            "the sweeper never expired the lapsed leases"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    for (p, id) in [(s.a, s.a1), (s.a, s.a2), (s.b, s.b1)] {
        let m = q.read_message(p, id).expect("read").expect("visible again");
        assert_eq!(m.delivery_count, 1);
        assert_eq!(m.updated_at, clock.now());
    }
    assert!(q.read_wakeup_sequence(s.a).expect("seq") > s.seq_a);
    assert!(q.read_wakeup_sequence(s.b).expect("seq") > s.seq_b);
    let woke = waiter.join().expect("waiter").expect("wait");
    assert!(woke.is_some_and(|w| w.sequence > s.seq_b), "{woke:?}");
    // The old tokens are dead.
    let r = q.ack(s.a, s.a1, &s.tokens[0]).expect("ack");
    assert_eq!(r.status, OpStatus::NotCurrent);
    assert!(q.check_integrity().expect("integrity").is_empty());
}

#[test]
fn the_next_reserve_expires_the_pools_lapsed_leases_and_wakes_it_once() {
    let s = setup();
    let clock = after_the_leases();
    let q = builder(&s.path, &clock).open().expect("reopen");
    // Before anything runs, the lapsed reservations are still recorded as they were.
    assert!(q.read_reservation(s.a, s.a1).expect("read").is_some());

    let r = q
        .reserve_detailed(s.a, &ReserveFilter::any())
        .expect("reserve");
    let mut expired: Vec<Uuid> = r.expired.redelivered.iter().map(|m| m.message_id).collect();
    expired.sort();
    let mut want = vec![s.a1, s.a2];
    want.sort();
    assert_eq!(
        expired, want,
        "reserve expires exactly its pool's lapsed leases"
    );
    // FIFO: a3 became visible before the two redelivered ones did (at the reopen's now).
    let got = r.reservation.expect("work");
    assert_eq!(got.message.message_id, s.a3);
    // One atomic expiry step: one wake.
    assert_eq!(q.read_wakeup_sequence(s.a).expect("seq"), s.seq_a + 1);
    assert!(q
        .wait_for_wakeup(s.a, s.seq_a, Some(Duration::ZERO))
        .expect("wait")
        .is_some());
    // Pool b is another pool: untouched until something expires it.
    assert!(q.read_reservation(s.b, s.b1).expect("read").is_some());
    assert_eq!(q.read_wakeup_sequence(s.b).expect("seq"), s.seq_b);
    let e = q.expire_leases(100, None).expect("expire");
    assert_eq!(e.redelivered.len(), 1);
    assert_eq!(e.redelivered[0].message_id, s.b1);
    assert_eq!(q.read_wakeup_sequence(s.b).expect("seq"), s.seq_b + 1);

    // The redelivered messages are reservable, in order, with the next delivery count.
    for _ in 0..2 {
        let r = q
            .reserve(s.a, &ReserveFilter::any())
            .expect("reserve")
            .expect("work");
        assert_eq!(r.message.delivery_count, 2);
        assert!(want.contains(&r.message.message_id));
    }
    assert!(q.check_integrity().expect("integrity").is_empty());
}

#[test]
fn a_lease_operation_after_the_restart_applies_the_expiry_instead() {
    let s = setup();
    let clock = after_the_leases();
    let q = builder(&s.path, &clock).open().expect("reopen");
    let r = q.ack(s.a, s.a1, &s.tokens[0]).expect("ack");
    assert_eq!(r.status, OpStatus::Expired);
    assert!(q.read_message(s.a, s.a1).expect("read").is_some());
    assert_eq!(q.read_wakeup_sequence(s.a).expect("seq"), s.seq_a + 1);
    let r = q.renew(s.b, s.b1, &s.tokens[2]).expect("renew");
    assert_eq!(r.status, OpStatus::Expired);
    assert_eq!(q.read_wakeup_sequence(s.b).expect("seq"), s.seq_b + 1);
    assert!(q.check_integrity().expect("integrity").is_empty());
}

#[test]
fn a_lease_that_lapsed_on_its_last_attempt_goes_to_the_dlq_without_a_wake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let clock = ManualClock::new(START);
    let pool = Uuid::new_v4();
    let id = Uuid::new_v4();
    let (token, seq) = {
        let q = builder(&path, &clock)
            .max_delivery_attempts(1)
            .open()
            .expect("open");
        enqueue(&q, pool, id);
        let r = q
            .reserve(pool, &ReserveFilter::any())
            .expect("reserve")
            .expect("work");
        (
            r.reservation_token,
            q.read_wakeup_sequence(pool).expect("seq"),
        )
    };
    let clock = after_the_leases();
    let q = builder(&path, &clock)
        .max_delivery_attempts(1)
        .sweep_interval(Some(Duration::from_millis(20)))
        .open()
        .expect("reopen");
    let deadline = Instant::now() + Duration::from_secs(10);
    let dl = loop {
        if let Some(dl) = q.read_dead_letter(pool, id).expect("read") {
            break dl;
        }
        assert!(
            Instant::now() < deadline,
            "the sweeper never dead-lettered it"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(dl.final_delivery_count, 1);
    assert_eq!(dl.reservation_token.as_deref(), Some(token.as_str()));
    assert_eq!(dl.release_reason, None);
    assert_eq!(
        q.read_wakeup_sequence(pool).expect("seq"),
        seq,
        "a DLQ move never wakes"
    );
    assert!(q.check_integrity().expect("integrity").is_empty());
}
