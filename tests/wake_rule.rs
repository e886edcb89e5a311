//! The wake rule: a pool's sequence rises exactly when one of its messages becomes visible
//! (enqueue, duplicate of a visible message, accepted release, expiry that redelivers through
//! any path), never on reserve, ack, renew, a DLQ move, a rejected op or a duplicate of a
//! reserved / dead / acked message; other pools never move. Then `wait_for_wakeup`.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use cleanup_queue::{CleanupKind, OpStatus, Queue, ReserveFilter, Wakeup};
use common::*;
use uuid::Uuid;

/// Watches one pool's sequence and a bystander pool that must never move.
struct Seq<'a> {
    q: &'a Queue,
    pool: Uuid,
    bystander: Uuid,
    last: u64,
}

impl<'a> Seq<'a> {
    fn new(q: &'a Queue, pool: Uuid) -> Seq<'a> {
        let last = q.read_wakeup_sequence(pool).unwrap();
        Seq {
            q,
            pool,
            bystander: uuid(),
            last,
        }
    }

    /// Asserts the pool moved by exactly `by` since the last check.
    #[track_caller]
    fn moved(&mut self, by: u64, what: &str) {
        let now = self.q.read_wakeup_sequence(self.pool).unwrap();
        assert_eq!(
            now,
            self.last + by,
            "{what}: sequence {} -> {now}",
            self.last
        );
        assert_eq!(self.q.read_wakeup_sequence(self.bystander).unwrap(), 0);
        self.last = now;
    }
}

#[test]
fn sequences_start_at_zero() {
    let (q, _clock) = queue();
    for p in uuids(3) {
        assert_eq!(q.read_wakeup_sequence(p).unwrap(), 0);
        assert_eq!(q.wait_for_wakeup(p, 0, Some(Duration::ZERO)).unwrap(), None);
    }
}

#[test]
fn enqueue_and_duplicate_of_visible_wake() {
    let (q, _clock) = queue();
    let pool = uuid();
    let mut s = Seq::new(&q, pool);
    let id = uuid();
    q.enqueue(msg(pool, id, "a")).unwrap();
    s.moved(1, "enqueue");
    let d = q.enqueue_detailed(msg(pool, uuid(), "a")).unwrap();
    assert!(d.duplicate);
    s.moved(1, "duplicate (same key) of a visible message");
    let d = q.enqueue_detailed(msg(pool, id, "a")).unwrap();
    assert!(d.duplicate);
    s.moved(1, "duplicate (same id) of a visible message");
    q.enqueue(msg(pool, uuid(), "b")).unwrap();
    s.moved(1, "second enqueue");
    assert_clean(&q);
}

#[test]
fn duplicates_of_reserved_dead_or_acked_do_not_wake() {
    let (q, _clock) = queue();
    q.set_policy(with_max(1)).unwrap();
    let pool = uuid();
    let mut s = Seq::new(&q, pool);

    let reserved = enqueue_new(&q, pool, "reserved");
    let r = reserve_one(&q, pool);
    assert_eq!(r.message.message_id, reserved);
    let dead = enqueue_new(&q, pool, "dead");
    let rd = reserve_one(&q, pool);
    q.release(pool, dead, &rd.reservation_token, "x").unwrap();
    let acked = enqueue_new(&q, pool, "acked");
    let ra = reserve_one(&q, pool);
    q.ack(pool, acked, &ra.reservation_token).unwrap();
    s.moved(3, "three enqueues");

    for (id, key) in [(reserved, "reserved"), (dead, "dead"), (acked, "acked")] {
        let by_key = q.enqueue_detailed(msg(pool, uuid(), key)).unwrap();
        assert!(by_key.duplicate);
        assert_eq!(by_key.message.message_id, id);
        s.moved(0, key);
        let by_id = q.enqueue_detailed(msg(pool, id, key)).unwrap();
        assert!(by_id.duplicate);
        s.moved(0, key);
    }
    assert_clean(&q);
}

#[test]
fn reserve_ack_renew_do_not_wake() {
    let (q, clock) = queue();
    let pool = uuid();
    let id = enqueue_new(&q, pool, "k");
    let mut s = Seq::new(&q, pool);
    let r = reserve_one(&q, pool);
    s.moved(0, "reserve");
    assert!(q.reserve(pool, &ReserveFilter::any()).unwrap().is_none());
    s.moved(0, "empty reserve");
    clock.advance(secs(10));
    assert_eq!(
        q.renew(pool, id, &r.reservation_token).unwrap().status,
        OpStatus::Accepted
    );
    s.moved(0, "renew");
    assert_eq!(
        q.ack(pool, id, &r.reservation_token).unwrap().status,
        OpStatus::Accepted
    );
    s.moved(0, "ack");
    assert_clean(&q);
}

#[test]
fn accepted_release_wakes() {
    let (q, _clock) = queue();
    let pool = uuid();
    let id = enqueue_new(&q, pool, "k");
    let mut s = Seq::new(&q, pool);
    let r = reserve_one(&q, pool);
    q.release(pool, id, &r.reservation_token, "later").unwrap();
    s.moved(1, "accepted release");
    assert_clean(&q);
}

#[test]
fn rejected_operations_do_not_wake() {
    let (q, clock) = queue();
    let pool = uuid();
    let other = uuid();
    let visible = enqueue_new(&q, pool, "visible");
    let held = enqueue_new(&q, pool, "held");
    let r = q
        .reserve(pool, &ReserveFilter::any())
        .unwrap()
        .expect("first");
    assert_eq!(r.message.message_id, visible);
    // Release and re-reserve so that `held` is the reserved one and `visible` is visible.
    q.release(pool, visible, &r.reservation_token, "swap")
        .unwrap();
    let r = reserve_one(&q, pool);
    assert_eq!(r.message.message_id, held);
    let mut s = Seq::new(&q, pool);
    let tok = r.reservation_token.as_str();

    for (id, p, t, want) in [
        (uuid(), pool, tok, OpStatus::NotFound),
        (held, other, tok, OpStatus::NotFound),
        (visible, pool, tok, OpStatus::NotCurrent),
        (held, pool, "bad-token", OpStatus::InvalidToken),
    ] {
        assert_eq!(q.ack(p, id, t).unwrap().status, want);
        assert_eq!(q.release(p, id, t, "r").unwrap().status, want);
        assert_eq!(q.renew(p, id, t).unwrap().status, want);
        s.moved(0, want.as_str());
    }
    // Input errors do not wake either.
    assert!(q.release(pool, held, tok, "").is_err());
    assert!(q.expire_leases(0, Some(pool)).is_err());
    assert!(q.enqueue(msg(pool, uuid(), "")).is_err());
    s.moved(0, "input errors");
    // Wrong token on an expired lease: rejected, no expiry, no wake.
    clock.advance(secs(31));
    assert_eq!(
        q.renew(pool, held, "bad-token").unwrap().status,
        OpStatus::InvalidToken
    );
    s.moved(0, "invalid token on an expired lease");
    assert_eq!(q.read_wakeup_sequence(other).unwrap(), 0);
    assert_clean(&q);
}

#[test]
fn expiry_redelivery_wakes_through_every_path() {
    // expire_leases
    let (q, clock) = queue();
    let pool = uuid();
    enqueue_new(&q, pool, "k");
    let mut s = Seq::new(&q, pool);
    reserve_one(&q, pool);
    clock.advance(secs(30));
    assert_eq!(q.expire_leases(100, None).unwrap().redelivered.len(), 1);
    s.moved(1, "expire_leases redelivery");
    assert!(q.expire_leases(100, None).unwrap().is_empty());
    s.moved(0, "nothing due");

    // reserve (even one that finds nothing matching)
    reserve_one(&q, pool);
    clock.advance(secs(30));
    let none = q
        .reserve(
            pool,
            &ReserveFilter::any().kinds([CleanupKind::PendingClaimTeardown]),
        )
        .unwrap();
    assert!(none.is_none());
    s.moved(1, "reserve's own expiry");

    // an operation on the expired lease
    let r = reserve_one(&q, pool);
    assert_eq!(r.message.delivery_count, 3);
    q.set_policy(with_max(5)).unwrap();
    clock.advance(secs(31));
    let res = q
        .ack(pool, r.message.message_id, &r.reservation_token)
        .unwrap();
    assert_eq!(res.status, OpStatus::Expired);
    s.moved(1, "expired-lease operation");
    assert_clean(&q);
}

#[test]
fn many_redeliveries_in_one_step_wake_at_least_once() {
    let (q, clock) = queue();
    let pool = uuid();
    for i in 0..5 {
        enqueue_new(&q, pool, &format!("k{i}"));
    }
    for _ in 0..5 {
        reserve_one(&q, pool);
    }
    let before = q.read_wakeup_sequence(pool).unwrap();
    clock.advance(secs(30));
    assert_eq!(
        q.expire_leases(100, Some(pool)).unwrap().redelivered.len(),
        5
    );
    let after = q.read_wakeup_sequence(pool).unwrap();
    assert!(after > before && after <= before + 5, "{before} -> {after}");
    assert_clean(&q);
}

#[test]
fn dlq_moves_do_not_wake() {
    let (q, clock) = queue();
    q.set_policy(with_max(1)).unwrap();
    let pool = uuid();
    let a = enqueue_new(&q, pool, "a");
    let b = enqueue_new(&q, pool, "b");
    let c = enqueue_new(&q, pool, "c");
    let mut s = Seq::new(&q, pool);

    // release at max
    let ra = reserve_one(&q, pool);
    assert_eq!(ra.message.message_id, a);
    let res = q.release(pool, a, &ra.reservation_token, "no").unwrap();
    assert_eq!(res.status, OpStatus::DeadLettered);
    s.moved(0, "release at max");

    // expiry at max via expire_leases
    let rb = reserve_one(&q, pool);
    assert_eq!(rb.message.message_id, b);
    clock.advance(secs(30));
    assert_eq!(q.expire_leases(10, None).unwrap().dead_lettered.len(), 1);
    s.moved(0, "expire_leases to DLQ");

    // expiry at max via an operation
    let rc = reserve_one(&q, pool);
    assert_eq!(rc.message.message_id, c);
    clock.advance(secs(30));
    assert_eq!(
        q.renew(pool, c, &rc.reservation_token).unwrap().status,
        OpStatus::DeadLettered
    );
    s.moved(0, "expired op to DLQ");

    // expiry at max via reserve
    let d = enqueue_new(&q, pool, "d");
    s.moved(1, "enqueue");
    let rd = reserve_one(&q, pool);
    assert_eq!(rd.message.message_id, d);
    clock.advance(secs(30));
    let detail = q.reserve_detailed(pool, &ReserveFilter::any()).unwrap();
    assert_eq!(detail.expired.dead_lettered.len(), 1);
    assert!(detail.reservation.is_none());
    s.moved(0, "reserve's expiry to DLQ");

    // DLQ on scan after lowering max
    q.set_policy(with_max(3)).unwrap();
    let e = enqueue_new(&q, pool, "e");
    s.moved(1, "enqueue");
    let re = reserve_one(&q, pool);
    q.release(pool, e, &re.reservation_token, "later").unwrap();
    s.moved(1, "release");
    q.set_policy(with_max(1)).unwrap();
    let detail = q.reserve_detailed(pool, &ReserveFilter::any()).unwrap();
    assert_eq!(detail.dead_lettered.len(), 1);
    assert!(detail.reservation.is_none());
    s.moved(0, "DLQ on scan");
    assert_clean(&q);
}

#[test]
fn other_pools_are_untouched() {
    let (q, clock) = queue();
    let a = uuid();
    let b = uuid();
    q.enqueue(msg(b, uuid(), "b")).unwrap();
    assert_eq!(q.read_wakeup_sequence(b).unwrap(), 1);
    let id = enqueue_new(&q, a, "a");
    let r = reserve_one(&q, a);
    q.release(a, id, &r.reservation_token, "x").unwrap();
    reserve_one(&q, a);
    clock.advance(secs(30));
    q.expire_leases(10, None).unwrap();
    q.wake_dispatchers(a).unwrap();
    assert_eq!(q.read_wakeup_sequence(a).unwrap(), 4);
    assert_eq!(q.read_wakeup_sequence(b).unwrap(), 1);
}

#[test]
fn wake_dispatchers_bumps_by_one() {
    let (q, _clock) = queue();
    let pool = uuid();
    for n in 1..=3 {
        assert_eq!(
            q.wake_dispatchers(pool).unwrap(),
            Wakeup {
                work_pool_id: pool,
                sequence: n
            }
        );
        assert_eq!(q.read_wakeup_sequence(pool).unwrap(), n);
    }
}

#[test]
fn zero_timeout_is_a_non_blocking_check_returning_the_current_sequence() {
    let (q, _clock) = queue();
    let pool = uuid();
    assert_eq!(
        q.wait_for_wakeup(pool, 0, Some(Duration::ZERO)).unwrap(),
        None
    );
    for _ in 0..3 {
        q.wake_dispatchers(pool).unwrap();
    }
    let w = Wakeup {
        work_pool_id: pool,
        sequence: 3,
    };
    assert_eq!(
        q.wait_for_wakeup(pool, 0, Some(Duration::ZERO)).unwrap(),
        Some(w)
    );
    assert_eq!(
        q.wait_for_wakeup(pool, 2, Some(Duration::ZERO)).unwrap(),
        Some(w)
    );
    assert_eq!(
        q.wait_for_wakeup(pool, 3, Some(Duration::ZERO)).unwrap(),
        None
    );
    assert_eq!(
        q.wait_for_wakeup(pool, 7, Some(Duration::ZERO)).unwrap(),
        None
    );
    // Already past `after`: returns at once even without a timeout.
    assert_eq!(q.wait_for_wakeup(pool, 1, None).unwrap(), Some(w));
}

#[test]
fn elapsed_timeout_returns_none() {
    let (q, _clock) = queue();
    let pool = uuid();
    q.wake_dispatchers(pool).unwrap();
    assert_eq!(
        q.wait_for_wakeup(pool, 1, Some(Duration::from_millis(30)))
            .unwrap(),
        None
    );
}

#[test]
fn waiter_is_woken_by_its_own_pool_not_by_another() {
    let (q, _clock) = queue();
    let pool = uuid();
    let other = uuid();
    let (started_tx, started_rx) = mpsc::channel();
    let waiter = {
        let q = q.clone();
        std::thread::spawn(move || {
            started_tx.send(()).unwrap();
            let w = q
                .wait_for_wakeup(pool, 0, Some(Duration::from_secs(60)))
                .unwrap();
            // A woken waiter always finds the work reservable.
            let r = q.reserve(pool, &ReserveFilter::any()).unwrap();
            (w, r)
        })
    };
    started_rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    for i in 0..3 {
        q.enqueue(msg(other, uuid(), &format!("o{i}"))).unwrap();
    }
    assert_eq!(q.read_wakeup_sequence(other).unwrap(), 3);
    let id = enqueue_new(&q, pool, "mine");
    let (w, r) = waiter.join().unwrap();
    assert_eq!(
        w,
        Some(Wakeup {
            work_pool_id: pool,
            sequence: 1
        })
    );
    assert_eq!(r.expect("work is there").message.message_id, id);
}

#[test]
fn other_pools_traffic_does_not_satisfy_a_waiter() {
    let (q, _clock) = queue();
    let pool = uuid();
    let other = uuid();
    let waiter = {
        let q = q.clone();
        std::thread::spawn(move || {
            q.wait_for_wakeup(pool, 0, Some(Duration::from_millis(300)))
                .unwrap()
        })
    };
    for i in 0..10 {
        q.enqueue(msg(other, uuid(), &format!("o{i}"))).unwrap();
        q.wake_dispatchers(other).unwrap();
    }
    assert_eq!(waiter.join().unwrap(), None);
    assert_eq!(q.read_wakeup_sequence(pool).unwrap(), 0);
}

#[test]
fn waiter_without_timeout_is_woken_by_enqueue() {
    let (q, _clock) = queue();
    let pool = uuid();
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let q = q.clone();
            std::thread::spawn(move || q.wait_for_wakeup(pool, 0, None).unwrap())
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    enqueue_new(&q, pool, "k");
    for w in waiters {
        assert_eq!(
            w.join().unwrap(),
            Some(Wakeup {
                work_pool_id: pool,
                sequence: 1
            })
        );
    }
}

#[test]
fn waiter_is_woken_by_release_and_by_expiry() {
    let (q, clock) = queue();
    let pool = uuid();
    let id = enqueue_new(&q, pool, "k");
    let r = reserve_one(&q, pool);
    let spawn_waiter = |after: u64| {
        let q = q.clone();
        std::thread::spawn(move || {
            q.wait_for_wakeup(pool, after, Some(Duration::from_secs(60)))
                .unwrap()
        })
    };
    let w = spawn_waiter(1);
    q.release(pool, id, &r.reservation_token, "later").unwrap();
    assert_eq!(w.join().unwrap().map(|w| w.sequence), Some(2));

    reserve_one(&q, pool);
    let w = spawn_waiter(2);
    clock.advance(secs(30));
    q.expire_leases(1, None).unwrap();
    assert_eq!(w.join().unwrap().map(|w| w.sequence), Some(3));
}
