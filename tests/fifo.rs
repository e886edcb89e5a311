//! Which message `reserve` hands out: FIFO by the instant a message last became visible
//! (ties by a monotonic sequence), kind filters, preferred work queues with and without
//! fallback, and dead-lettering of used-up candidates during the scan.

mod common;

use std::time::Duration;

use cleanup_queue::{CleanupKind, OpStatus, Queue, ReserveFilter};
use common::*;
use uuid::Uuid;

const CANCEL: CleanupKind = CleanupKind::CancellingTimeoutTeardown;
const PENDING: CleanupKind = CleanupKind::PendingClaimTeardown;

/// Reserves with `filter` until nothing qualifies; returns the ids in order.
fn drain(q: &Queue, pool: Uuid, filter: &ReserveFilter) -> Vec<Uuid> {
    let mut out = Vec::new();
    while let Some(r) = q.reserve(pool, filter).unwrap() {
        out.push(r.message.message_id);
        assert!(out.len() < 1000, "reserve never ran dry");
    }
    out
}

fn reserve_id(q: &Queue, pool: Uuid, filter: &ReserveFilter) -> Option<Uuid> {
    q.reserve(pool, filter)
        .unwrap()
        .map(|r| r.message.message_id)
}

#[test]
fn enqueue_order_is_delivery_order() {
    let (q, clock) = queue();
    let pool = uuid();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(enqueue_new(&q, pool, &format!("k{i}")));
        if i % 3 == 0 {
            clock.advance(secs(1));
        }
    }
    assert_eq!(drain(&q, pool, &ReserveFilter::any()), ids);
    assert_clean(&q);
}

#[test]
fn same_instant_ties_break_in_enqueue_order() {
    let (q, _clock) = queue();
    let pool = uuid();
    let ids: Vec<_> = (0..20)
        .map(|i| enqueue_new(&q, pool, &format!("k{i}")))
        .collect();
    assert_eq!(drain(&q, pool, &ReserveFilter::any()), ids);
}

#[test]
fn released_message_goes_to_the_back() {
    let (q, clock) = queue();
    let pool = uuid();
    let a = enqueue_new(&q, pool, "a");
    let b = enqueue_new(&q, pool, "b");
    clock.advance(secs(1));
    let c = enqueue_new(&q, pool, "c");
    let r = reserve_one(&q, pool);
    assert_eq!(r.message.message_id, a);
    // Released at the same instant as c's enqueue: the tie goes to the earlier (c).
    q.release(pool, a, &r.reservation_token, "later").unwrap();
    assert_eq!(drain(&q, pool, &ReserveFilter::any()), vec![b, c, a]);
    assert_clean(&q);
}

#[test]
fn released_message_goes_behind_later_enqueues_but_ahead_of_even_later_ones() {
    let (q, clock) = queue();
    let pool = uuid();
    let a = enqueue_new(&q, pool, "a");
    clock.advance(secs(1));
    let b = enqueue_new(&q, pool, "b");
    let r = reserve_one(&q, pool);
    clock.advance(secs(1));
    q.release(pool, a, &r.reservation_token, "later").unwrap();
    clock.advance(secs(1));
    let c = enqueue_new(&q, pool, "c");
    assert_eq!(drain(&q, pool, &ReserveFilter::any()), vec![b, a, c]);
}

#[test]
fn expired_message_goes_to_the_back_at_the_instant_it_expired() {
    let (q, clock) = queue();
    let pool = uuid();
    let a = enqueue_new(&q, pool, "a");
    let b = enqueue_new(&q, pool, "b");
    reserve_one(&q, pool); // a, lease until +30 s
    clock.advance(secs(40));
    // Enqueued after the lease ran out but before anything expired it.
    let c = enqueue_new(&q, pool, "c");
    clock.advance(secs(5));
    // This reserve expires a first (now +45 s), then scans: b, c, a.
    assert_eq!(drain(&q, pool, &ReserveFilter::any()), vec![b, c, a]);
    assert_clean(&q);
}

#[test]
fn expired_by_expire_leases_goes_to_the_back() {
    let (q, clock) = queue();
    let pool = uuid();
    let a = enqueue_new(&q, pool, "a");
    reserve_one(&q, pool);
    clock.advance(secs(10));
    let b = enqueue_new(&q, pool, "b");
    clock.advance(secs(20));
    assert_eq!(
        q.expire_leases(10, Some(pool)).unwrap().redelivered.len(),
        1
    );
    let c = enqueue_new(&q, pool, "c");
    assert_eq!(drain(&q, pool, &ReserveFilter::any()), vec![b, a, c]);
}

#[test]
fn empty_kind_filter_matches_nothing_and_changes_nothing() {
    let (q, _clock) = queue();
    let pool = uuid();
    let a = enqueue_new(&q, pool, "a");
    let before = q.read_message(pool, a).unwrap();
    let nothing = ReserveFilter::any().kinds([]);
    assert_eq!(reserve_id(&q, pool, &nothing), None);
    assert_eq!(q.read_message(pool, a).unwrap(), before);
    assert_eq!(reserve_id(&q, pool, &ReserveFilter::any()), Some(a));
    assert_clean(&q);
}

#[test]
fn kind_filters_select_and_keep_fifo_across_kinds() {
    let (q, clock) = queue();
    let pool = uuid();
    let mut ids = Vec::new();
    for (i, kind) in [PENDING, CANCEL, PENDING, CANCEL, CANCEL, PENDING]
        .into_iter()
        .enumerate()
    {
        let id = uuid();
        q.enqueue(msg_kind(pool, id, &format!("k{i}"), kind))
            .unwrap();
        ids.push((id, kind));
        clock.advance(secs(1));
    }
    let of = |k: CleanupKind| -> Vec<Uuid> {
        ids.iter()
            .filter(|(_, kk)| *kk == k)
            .map(|(id, _)| *id)
            .collect()
    };
    // Only pending ones, in order, though a cancelling one is older.
    let pending = drain(&q, pool, &ReserveFilter::any().kinds([PENDING]));
    assert_eq!(pending, of(PENDING));
    // Both kinds named explicitly: one FIFO across both (here only cancelling ones remain).
    let rest = drain(&q, pool, &ReserveFilter::any().kinds([CANCEL, PENDING]));
    assert_eq!(rest, of(CANCEL));
    assert_clean(&q);
}

#[test]
fn no_kind_filter_and_both_kinds_merge_in_fifo_order() {
    for filter in [
        ReserveFilter::any(),
        ReserveFilter::any().kinds([PENDING, CANCEL]),
        ReserveFilter::any().kinds([CANCEL, PENDING, CANCEL]),
    ] {
        let (q, _clock) = queue();
        let pool = uuid();
        let mut ids = Vec::new();
        for (i, kind) in [PENDING, CANCEL, PENDING, CANCEL].into_iter().enumerate() {
            let id = uuid();
            q.enqueue(msg_kind(pool, id, &format!("k{i}"), kind))
                .unwrap();
            ids.push(id);
        }
        assert_eq!(drain(&q, pool, &filter), ids, "{filter:?}");
    }
}

#[test]
fn preferred_queue_first_then_fallback_in_fifo_order() {
    let (q, _clock) = queue();
    let pool = uuid();
    let (x, y) = (uuid(), uuid());
    let none = uuid();
    q.enqueue(msg(pool, none, "none")).unwrap();
    let in_x = uuid();
    q.enqueue(msg_in(pool, in_x, "x", x)).unwrap();
    let in_y1 = uuid();
    q.enqueue(msg_in(pool, in_y1, "y1", y)).unwrap();
    let in_y2 = uuid();
    q.enqueue(msg_in(pool, in_y2, "y2", y)).unwrap();

    let prefer_y = ReserveFilter::any().queues([y], true);
    assert_eq!(drain(&q, pool, &prefer_y), vec![in_y1, in_y2, none, in_x]);
    assert_clean(&q);
}

#[test]
fn several_preferred_queues_merge_in_fifo_order() {
    let (q, _clock) = queue();
    let pool = uuid();
    let (x, y, z) = (uuid(), uuid(), uuid());
    let mut want = Vec::new();
    for (i, wq) in [y, z, x, y, x].into_iter().enumerate() {
        let id = uuid();
        q.enqueue(msg_in(pool, id, &format!("k{i}"), wq)).unwrap();
        if wq != z {
            want.push(id);
        }
    }
    // Duplicated preference entries are harmless.
    let prefer = ReserveFilter::any().queues([x, y, x], false);
    assert_eq!(drain(&q, pool, &prefer), want);
    assert_eq!(drain(&q, pool, &ReserveFilter::any()).len(), 1);
}

#[test]
fn preference_without_fallback_never_leaves_the_preferred_queues() {
    let (q, _clock) = queue();
    let pool = uuid();
    let (x, z) = (uuid(), uuid());
    let none = uuid();
    q.enqueue(msg(pool, none, "none")).unwrap();
    let in_x = uuid();
    q.enqueue(msg_in(pool, in_x, "x", x)).unwrap();
    assert_eq!(
        reserve_id(&q, pool, &ReserveFilter::any().queues([z], false)),
        None
    );
    assert_eq!(
        reserve_id(&q, pool, &ReserveFilter::any().queues([x], false)),
        Some(in_x)
    );
    assert_eq!(
        reserve_id(&q, pool, &ReserveFilter::any().queues([x], false)),
        None
    );
    assert_eq!(
        reserve_id(&q, pool, &ReserveFilter::any().queues([z], true)),
        Some(none)
    );
    assert_clean(&q);
}

#[test]
fn empty_preference_matches_nothing_in_the_restricted_pass() {
    let (q, _clock) = queue();
    let pool = uuid();
    let x = uuid();
    let in_x = uuid();
    q.enqueue(msg_in(pool, in_x, "x", x)).unwrap();
    let none = uuid();
    q.enqueue(msg(pool, none, "none")).unwrap();
    assert_eq!(
        reserve_id(&q, pool, &ReserveFilter::any().queues([], false)),
        None
    );
    // With fallback, the pool pass still runs.
    assert_eq!(
        reserve_id(&q, pool, &ReserveFilter::any().queues([], true)),
        Some(in_x)
    );
}

#[test]
fn message_without_a_queue_never_matches_a_restricted_pass() {
    let (q, _clock) = queue();
    let pool = uuid();
    let none = uuid();
    q.enqueue(msg(pool, none, "none")).unwrap();
    for prefer in [vec![uuid()], vec![Uuid::nil()], vec![Uuid::max()]] {
        assert_eq!(
            reserve_id(&q, pool, &ReserveFilter::any().queues(prefer, false)),
            None
        );
    }
    assert_eq!(reserve_id(&q, pool, &ReserveFilter::any()), Some(none));
}

#[test]
fn queue_and_kind_filters_combine() {
    let (q, _clock) = queue();
    let pool = uuid();
    let x = uuid();
    let cancel_x = uuid();
    q.enqueue(msg_in(pool, cancel_x, "cx", x)).unwrap();
    let pending_x = uuid();
    q.enqueue(msg_kind(pool, pending_x, "px", PENDING).work_queue(x))
        .unwrap();
    let pending_none = uuid();
    q.enqueue(msg_kind(pool, pending_none, "p", PENDING))
        .unwrap();
    let f = ReserveFilter::any().kinds([PENDING]).queues([x], true);
    assert_eq!(drain(&q, pool, &f), vec![pending_x, pending_none]);
    assert_eq!(drain(&q, pool, &ReserveFilter::any()), vec![cancel_x]);
}

#[test]
fn reserve_never_crosses_pools() {
    let (q, _clock) = queue();
    let (a, b) = (uuid(), uuid());
    let x = uuid();
    let in_b = uuid();
    q.enqueue(msg_in(b, in_b, "b", x)).unwrap();
    assert_eq!(reserve_id(&q, a, &ReserveFilter::any()), None);
    assert_eq!(
        reserve_id(&q, a, &ReserveFilter::any().queues([x], true)),
        None
    );
    assert_eq!(reserve_id(&q, b, &ReserveFilter::any()), Some(in_b));
}

#[test]
fn used_up_candidates_are_dead_lettered_during_the_scan_and_the_scan_goes_on() {
    let (q, clock) = queue();
    let pool = uuid();
    let a = enqueue_new(&q, pool, "a");
    let b = enqueue_new(&q, pool, "b");
    // Each delivered and released once: count 1, order a, b.
    for want in [a, b] {
        let r = reserve_one(&q, pool);
        assert_eq!(r.message.message_id, want);
        q.release(pool, want, &r.reservation_token, "later")
            .unwrap();
    }
    // A pending one with count 1 that the filter below skips, and a fresh one.
    let p = uuid();
    q.enqueue(msg_kind(pool, p, "p", PENDING)).unwrap();
    let rp = q
        .reserve(pool, &ReserveFilter::any().kinds([PENDING]))
        .unwrap()
        .unwrap();
    q.release(pool, p, &rp.reservation_token, "later").unwrap();
    let c = enqueue_new(&q, pool, "c");

    q.set_policy(with_max(1)).unwrap();
    clock.advance(secs(3));
    let seq = q.read_wakeup_sequence(pool).unwrap();
    let detail = q
        .reserve_detailed(pool, &ReserveFilter::any().kinds([CANCEL]))
        .unwrap();
    let dead: Vec<_> = detail
        .dead_lettered
        .iter()
        .map(|d| d.message.message_id)
        .collect();
    assert_eq!(dead, vec![a, b]);
    for d in &detail.dead_lettered {
        assert_eq!(d.reason, "max_delivery_attempts_reached");
        assert_eq!(d.final_delivery_count, 1);
        assert_eq!(d.moved_at, clock.now());
        assert_eq!(d.reservation_token, None);
        assert_eq!(d.lease_expires_at, None);
        assert_eq!(d.release_reason, None);
        let id = d.message.message_id;
        assert_eq!(q.read_dead_letter(pool, id).unwrap().as_ref(), Some(d));
        assert!(q.read_message(pool, id).unwrap().is_none());
    }
    let r = detail.reservation.expect("the scan went on to c");
    assert_eq!(r.message.message_id, c);
    assert_eq!(r.message.delivery_count, 1);
    assert_eq!(q.read_wakeup_sequence(pool).unwrap(), seq, "no wake");
    // The pending one was not a candidate, so it is untouched until a scan reaches it.
    assert_eq!(q.read_message(pool, p).unwrap().unwrap().delivery_count, 1);
    assert!(q.read_dead_letter(pool, p).unwrap().is_none());
    let detail = q.reserve_detailed(pool, &ReserveFilter::any()).unwrap();
    assert!(detail.reservation.is_none());
    assert_eq!(detail.dead_lettered.len(), 1);
    assert_eq!(detail.dead_lettered[0].message.message_id, p);
    assert_eq!(
        q.ack(pool, c, &r.reservation_token).unwrap().status,
        OpStatus::Accepted
    );
    assert_clean(&q);
}

#[test]
fn a_message_is_handed_out_at_most_max_times() {
    let (q, clock) = queue();
    let pool = uuid();
    let id = enqueue_new(&q, pool, "k");
    let mut deliveries = 0;
    while let Some(r) = q.reserve(pool, &ReserveFilter::any()).unwrap() {
        deliveries += 1;
        assert_eq!(r.message.delivery_count, deliveries);
        if deliveries % 2 == 0 {
            clock.advance(secs(30)); // let it expire
        } else {
            q.release(pool, id, &r.reservation_token, "again").unwrap();
        }
    }
    assert_eq!(deliveries, 3);
    let dl = q.read_dead_letter(pool, id).unwrap().unwrap();
    assert_eq!(dl.final_delivery_count, 3);
    assert_clean(&q);
}

#[test]
fn used_up_candidate_in_a_preferred_queue_is_dead_lettered_once_across_both_passes() {
    let (q, _clock) = queue();
    let pool = uuid();
    let x = uuid();
    let in_x = uuid();
    q.enqueue(msg_in(pool, in_x, "x", x)).unwrap();
    let r = reserve_one(&q, pool);
    q.release(pool, in_x, &r.reservation_token, "later")
        .unwrap();
    let plain = enqueue_new(&q, pool, "plain");
    q.set_policy(with_max(1)).unwrap();
    let d = q
        .reserve_detailed(pool, &ReserveFilter::any().queues([x], true))
        .unwrap();
    assert_eq!(d.dead_lettered.len(), 1, "{:?}", d.dead_lettered);
    assert_eq!(d.dead_lettered[0].message.message_id, in_x);
    assert_eq!(d.reservation.unwrap().message.message_id, plain);
    assert_clean(&q);
}

#[test]
fn expire_leases_takes_the_most_overdue_first() {
    let (q, clock) = queue();
    let pool = uuid();
    let other = uuid();
    let long = enqueue_new(&q, pool, "long");
    let short = enqueue_new(&q, pool, "short");
    let elsewhere = enqueue_new(&q, other, "elsewhere");
    reserve_one(&q, pool); // long: lease until +30 s
    q.set_policy(with_lease(secs(10))).unwrap();
    clock.advance(secs(1));
    reserve_one(&q, pool); // short: lease until +11 s
    clock.advance(secs(1));
    reserve_one(&q, other); // elsewhere: lease until +12 s
    clock.advance(secs(60));

    let first = q.expire_leases(1, None).unwrap();
    assert_eq!(first.redelivered[0].message_id, short);
    let second = q.expire_leases(1, None).unwrap();
    assert_eq!(second.redelivered[0].message_id, elsewhere);
    let third = q.expire_leases(5, None).unwrap();
    assert_eq!(third.redelivered.len(), 1);
    assert_eq!(third.redelivered[0].message_id, long);
    assert!(q.expire_leases(5, None).unwrap().is_empty());
    // They became visible in expiry order, so that is the FIFO order now.
    assert_eq!(drain(&q, pool, &ReserveFilter::any()), vec![short, long]);
    assert_clean(&q);
}

#[test]
fn expire_leases_leaves_live_leases_alone() {
    let (q, clock) = queue();
    let pool = uuid();
    let a = enqueue_new(&q, pool, "a");
    let ra = reserve_one(&q, pool);
    clock.advance(secs(20));
    let b = enqueue_new(&q, pool, "b");
    let rb = reserve_one(&q, pool);
    clock.advance(secs(10)); // a due exactly now, b due in 20 s
    let res = q.expire_leases(100, None).unwrap();
    assert_eq!(res.redelivered.len(), 1);
    assert_eq!(res.redelivered[0].message_id, a);
    assert_eq!(
        res.redelivered[0].delivery_count, 1,
        "expiry never changes the count"
    );
    assert_eq!(q.read_reservation(pool, b).unwrap(), Some(rb));
    assert_eq!(
        q.ack(pool, a, &ra.reservation_token).unwrap().status,
        OpStatus::NotCurrent
    );
    assert_clean(&q);
}

/// `expire_leases` without a pool takes the most overdue leases of all pools first, and
/// stops at `limit` even when several pools have due leases.
#[test]
fn expiry_across_pools_is_most_overdue_first_and_respects_the_limit() {
    let (q, clock) = queue();
    let pools = uuids(3);
    let mut order = Vec::new();
    // Reserve one message per pool per second, cycling through the pools backwards, so
    // the pool order and the overdue order differ.
    for round in 0..3 {
        for p in pools.iter().rev() {
            enqueue_new(&q, *p, &format!("{round}"));
            order.push(reserve_one(&q, *p).message.message_id);
            clock.advance(secs(1));
        }
    }
    clock.advance(Duration::from_secs(3600));
    let mut got = Vec::new();
    loop {
        let r = q.expire_leases(4, None).unwrap();
        assert!(r.redelivered.len() <= 4);
        if r.redelivered.is_empty() {
            break;
        }
        got.extend(r.redelivered.iter().map(|m| m.message_id));
    }
    assert_eq!(got, order);
}

/// Leases that expire at the same instant in different pools are taken in the order they
/// were granted (the engine-wide sequence breaks the tie), across pools as within one.
#[test]
fn expiry_ties_across_pools_break_in_reservation_order() {
    let (q, clock) = queue();
    let pools = uuids(4);
    let mut order = Vec::new();
    for p in &pools {
        enqueue_new(&q, *p, "first");
        enqueue_new(&q, *p, "second");
    }
    // All at one instant: equal lease_expires_at everywhere.
    for p in pools.iter().rev().chain(pools.iter()) {
        order.push(reserve_one(&q, *p).message.message_id);
    }
    clock.advance(Duration::from_secs(3600));
    let mut got = Vec::new();
    for _ in 0..order.len() {
        let r = q.expire_leases(1, None).unwrap();
        got.extend(r.redelivered.iter().map(|m| m.message_id));
    }
    assert_eq!(got, order);
    assert!(q.expire_leases(1, None).unwrap().is_empty());
}

/// The pools at both ends of the id space (all zero, all 0xff bytes) take part in expiry
/// across pools like any other: the skip from one pool to the next ends after the last.
#[test]
fn expiry_across_pools_reaches_the_first_and_the_last_pool_id() {
    let (q, clock) = queue();
    let (low, high) = (Uuid::from_u128(0), Uuid::from_u128(u128::MAX));
    enqueue_new(&q, high, "h");
    let first = reserve_one(&q, high).message.message_id;
    clock.advance(secs(1));
    enqueue_new(&q, low, "l");
    let second = reserve_one(&q, low).message.message_id;
    clock.advance(Duration::from_secs(3600));
    let r = q.expire_leases(10, None).unwrap();
    let got: Vec<Uuid> = r.redelivered.iter().map(|m| m.message_id).collect();
    assert_eq!(got, vec![first, second]);
    assert!(q.expire_leases(10, None).unwrap().is_empty());
}
