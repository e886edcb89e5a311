//! Idempotency and tombstones: an acked message keeps its key taken for the retention
//! period (`completed_at + retention <= now` counts as gone), pruning removes only expired
//! tombstones, DLQ entries are kept for ever, ids and keys are scoped per pool, and input
//! errors leave the database exactly as it was.

mod common;

use std::time::Duration;

use cleanup_queue::{
    CleanupKind, Error, InputError, Message, NewMessage, Policy, Queue, MAX_IDEMPOTENCY_KEY_BYTES,
};
use common::*;
use serde_json::json;
use uuid::Uuid;

/// Enqueues, reserves and acks a message; returns it as it was when acked.
fn acked(q: &Queue, pool: Uuid, id: Uuid, key: &str) -> Message {
    q.enqueue(msg(pool, id, key)).unwrap();
    let r = q
        .reserve(pool, &cleanup_queue::ReserveFilter::any())
        .unwrap()
        .expect("reservable");
    assert_eq!(r.message.message_id, id);
    let res = q.ack(pool, id, &r.reservation_token).unwrap();
    assert_eq!(res.status, cleanup_queue::OpStatus::Accepted);
    Message {
        updated_at: q.now(),
        ..r.message
    }
}

#[test]
fn tombstone_keeps_the_key_while_live_and_frees_it_at_the_boundary() {
    let (q, clock) = queue();
    q.set_policy(with_retention(secs(60))).unwrap();
    let pool = uuid();
    let id = uuid();
    let as_acked = acked(&q, pool, id, "k");
    let completed_at = clock.now();
    assert_eq!(as_acked.delivery_count, 1);
    let seq = q.read_wakeup_sequence(pool).unwrap();

    clock.set(
        completed_at
            .saturating_add(secs(60))
            .saturating_sub(Duration::from_micros(1)),
    );
    for caller_id in [uuid(), id] {
        let d = q.enqueue_detailed(msg(pool, caller_id, "k")).unwrap();
        assert!(d.duplicate);
        assert_eq!(d.message, as_acked, "the message exactly as acked");
    }
    assert!(q.read_message(pool, id).unwrap().is_none());
    assert_eq!(
        q.read_wakeup_sequence(pool).unwrap(),
        seq,
        "tombstone duplicates never wake"
    );

    clock.set(completed_at.saturating_add(secs(60))); // completed_at + retention == now
    let new_id = uuid();
    let d = q.enqueue_detailed(msg(pool, new_id, "k")).unwrap();
    assert!(!d.duplicate);
    assert_eq!(d.message.message_id, new_id);
    assert_eq!(d.message.created_at, clock.now());
    assert_eq!(d.message.updated_at, clock.now());
    assert_eq!(d.message.delivery_count, 0);
    assert_eq!(q.read_wakeup_sequence(pool).unwrap(), seq + 1);
    assert_eq!(reserve_one(&q, pool).message.message_id, new_id);
    assert_clean(&q);
}

#[test]
fn retention_zero_frees_key_and_id_at_once() {
    let (q, _clock) = queue();
    q.set_policy(with_retention(Duration::ZERO)).unwrap();
    let pool = uuid();
    let id = uuid();
    acked(&q, pool, id, "k");
    // Same id, same key: a new message (no clock movement at all).
    let d = q.enqueue_detailed(msg(pool, id, "k")).unwrap();
    assert!(!d.duplicate);
    assert_eq!(d.message.delivery_count, 0);
    acked(&q, pool, id, "k");
    // Same id, another key: the id is free too.
    let d = q.enqueue_detailed(msg(pool, id, "other")).unwrap();
    assert!(!d.duplicate);
    assert_eq!(d.message.idempotency_key, "other");
    // And the old key is free as well.
    let id2 = uuid();
    let d = q.enqueue_detailed(msg(pool, id2, "k")).unwrap();
    assert!(!d.duplicate);
    assert_eq!(d.message.message_id, id2);
    assert!(q.read_message(pool, id).unwrap().is_some());
    assert!(q.read_message(pool, id2).unwrap().is_some());
    assert_clean(&q);
}

#[test]
fn expired_tombstone_id_can_be_reused_with_another_key() {
    let (q, clock) = queue();
    q.set_policy(with_retention(secs(10))).unwrap();
    let pool = uuid();
    let id = uuid();
    acked(&q, pool, id, "old");
    // While live, the id belongs to "old".
    let err = q.enqueue(msg(pool, id, "new")).unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidInput(InputError::MessageIdConflict)
    ));
    clock.advance(secs(10));
    let d = q.enqueue_detailed(msg(pool, id, "new")).unwrap();
    assert!(!d.duplicate);
    assert_eq!(d.message.idempotency_key, "new");
    // "old" no longer refers to anything.
    let other = uuid();
    assert_eq!(
        q.enqueue(msg(pool, other, "old")).unwrap().message_id,
        other
    );
    assert_clean(&q);
}

#[test]
fn no_retention_keeps_tombstones_for_ever() {
    let (q, clock) = queue();
    let pool = uuid();
    let id = uuid();
    let as_acked = acked(&q, pool, id, "k");
    clock.advance(Duration::from_secs(10 * 365 * 86_400));
    assert_eq!(q.enqueue(msg(pool, uuid(), "k")).unwrap(), as_acked);
    assert_eq!(q.prune_tombstones(100).unwrap(), 0);
    assert_eq!(q.enqueue(msg(pool, uuid(), "k")).unwrap(), as_acked);
    assert_clean(&q);
}

#[test]
fn prune_removes_only_expired_tombstones_in_bounded_batches() {
    let (q, clock) = queue();
    let pool = uuid();
    let mut ids = Vec::new();
    for i in 0..4 {
        let id = uuid();
        acked(&q, pool, id, &format!("k{i}"));
        ids.push(id);
        clock.advance(secs(10));
    }
    // Completed at +0, +10, +20, +30; now +40. Retention 20: +0 and +10 and +20 are gone
    // (+20 + 20 == now counts as gone), +30 is live.
    q.set_policy(with_retention(secs(20))).unwrap();
    assert_eq!(q.prune_tombstones(1).unwrap(), 1);
    assert_eq!(q.prune_tombstones(100).unwrap(), 2);
    assert_eq!(q.prune_tombstones(100).unwrap(), 0);
    assert_clean(&q);

    // With retention switched off again, pruned keys stay free while the unpruned one is
    // live again: proof that exactly the expired ones were removed.
    q.set_policy(Policy::default()).unwrap();
    for (i, id) in ids.iter().enumerate() {
        let d = q
            .enqueue_detailed(msg(pool, uuid(), &format!("k{i}")))
            .unwrap();
        assert_eq!(d.duplicate, i == 3, "key k{i}");
        if i == 3 {
            assert_eq!(d.message.message_id, *id);
        }
    }
    assert_clean(&q);
}

#[test]
fn prune_older_than_uses_its_own_retention() {
    let (q, clock) = queue();
    let pool = uuid();
    acked(&q, pool, uuid(), "a");
    clock.advance(secs(5));
    acked(&q, pool, uuid(), "b");
    assert_eq!(q.prune_tombstones_older_than(secs(6), 10).unwrap(), 0);
    assert_eq!(q.prune_tombstones_older_than(secs(5), 10).unwrap(), 1);
    assert_eq!(
        q.prune_tombstones_older_than(Duration::ZERO, 10).unwrap(),
        1
    );
    assert!(
        !q.enqueue_detailed(msg(pool, uuid(), "a"))
            .unwrap()
            .duplicate
    );
    assert_clean(&q);
}

#[test]
fn dead_letters_are_never_pruned_and_keep_their_key() {
    let (q, clock) = queue();
    q.set_policy(with_max(1)).unwrap();
    let pool = uuid();
    let id = enqueue_new(&q, pool, "k");
    let r = reserve_one(&q, pool);
    q.release(pool, id, &r.reservation_token, "boom").unwrap();
    let dl = q.read_dead_letter(pool, id).unwrap().unwrap();

    q.set_policy(policy(secs(30), 1, Some(Duration::ZERO)))
        .unwrap();
    clock.advance(Duration::from_secs(365 * 86_400));
    assert_eq!(q.prune_tombstones(1000).unwrap(), 0);
    assert_eq!(
        q.prune_tombstones_older_than(Duration::ZERO, 1000).unwrap(),
        0
    );
    assert_eq!(q.read_dead_letter(pool, id).unwrap(), Some(dl.clone()));

    let seq = q.read_wakeup_sequence(pool).unwrap();
    for caller_id in [uuid(), id] {
        let d = q.enqueue_detailed(msg(pool, caller_id, "k")).unwrap();
        assert!(d.duplicate);
        assert_eq!(d.message, dl.message, "the dead letter's snapshot");
    }
    assert_eq!(q.read_wakeup_sequence(pool).unwrap(), seq);
    let err = q.enqueue(msg(pool, id, "another")).unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidInput(InputError::MessageIdConflict)
    ));
    assert_clean(&q);
}

#[test]
fn message_ids_and_keys_are_scoped_per_pool() {
    let (q, _clock) = queue();
    let (a, b) = (uuid(), uuid());
    let id = uuid();
    let ma = q.enqueue_detailed(msg(a, id, "same-key")).unwrap();
    let mb = q.enqueue_detailed(msg(b, id, "same-key")).unwrap();
    assert!(!ma.duplicate && !mb.duplicate);
    assert_eq!(ma.message.work_pool_id, a);
    assert_eq!(mb.message.work_pool_id, b);
    assert_ne!(ma.message.target, mb.message.target);
    // A different key with the same id in a third pool is fine too.
    let c = uuid();
    assert!(!q.enqueue_detailed(msg(c, id, "other")).unwrap().duplicate);

    assert_eq!(q.read_message(a, id).unwrap(), Some(ma.message.clone()));
    assert_eq!(q.read_message(b, id).unwrap(), Some(mb.message.clone()));
    let ra = reserve_one(&q, a);
    assert_eq!(
        ra.message,
        Message {
            delivery_count: 1,
            ..ma.message.clone()
        }
    );
    q.ack(a, id, &ra.reservation_token).unwrap();
    // Pool b's message is untouched by everything done in pool a.
    assert_eq!(q.read_message(b, id).unwrap(), Some(mb.message.clone()));
    assert!(q.read_reservation(b, id).unwrap().is_none());
    let rb = reserve_one(&q, b);
    assert_eq!(rb.message.delivery_count, 1);
    // a's token does not work in b, and b's token does not work in a.
    assert_eq!(
        q.ack(b, id, &ra.reservation_token).unwrap().status,
        cleanup_queue::OpStatus::InvalidToken
    );
    assert_eq!(
        q.ack(a, id, &rb.reservation_token).unwrap().status,
        cleanup_queue::OpStatus::NotFound
    );
    assert_clean(&q);
}

/// Everything observable about the given messages and pools.
fn observe(q: &Queue, pools: &[Uuid], ids: &[Uuid]) -> Vec<String> {
    let mut out = Vec::new();
    for p in pools {
        out.push(format!("seq {p} {}", q.read_wakeup_sequence(*p).unwrap()));
        for id in ids {
            out.push(format!(
                "{p} {id} {:?} {:?} {:?}",
                q.read_message(*p, *id).unwrap(),
                q.read_reservation(*p, *id).unwrap(),
                q.read_dead_letter(*p, *id).unwrap()
            ));
        }
    }
    out
}

#[test]
fn input_errors_leave_the_database_unchanged() {
    let c = clock();
    let q = temp_builder(&c).payload_limit(200).open().unwrap();
    q.set_policy(policy(secs(30), 1, Some(secs(60)))).unwrap();
    let pool = uuid();
    let visible = enqueue_new(&q, pool, "visible");
    let reserved = enqueue_new(&q, pool, "reserved");
    let dead = enqueue_new(&q, pool, "dead");
    let tomb = enqueue_new(&q, pool, "tomb");
    // Build one message in each state: visible (released under a higher max), reserved,
    // dead (released at max 1) and a live tombstone.
    let r1 = reserve_one(&q, pool);
    assert_eq!(r1.message.message_id, visible);
    q.set_policy(policy(secs(30), 5, Some(secs(60)))).unwrap();
    q.release(pool, visible, &r1.reservation_token, "back")
        .unwrap();
    let r_res = reserve_one(&q, pool);
    assert_eq!(r_res.message.message_id, reserved);
    let r_dead = reserve_one(&q, pool);
    assert_eq!(r_dead.message.message_id, dead);
    q.set_policy(policy(secs(30), 1, Some(secs(60)))).unwrap();
    q.release(pool, dead, &r_dead.reservation_token, "x")
        .unwrap();
    let r_tomb = reserve_one(&q, pool);
    assert_eq!(r_tomb.message.message_id, tomb);
    q.ack(pool, tomb, &r_tomb.reservation_token).unwrap();
    assert!(q.read_dead_letter(pool, dead).unwrap().is_some());

    let fresh = uuid();
    let ids = [visible, reserved, dead, tomb, fresh];
    let pools = [pool];
    let before = observe(&q, &pools, &ids);

    let big = "x".repeat(300);
    let cases: Vec<(NewMessage, InputError)> = vec![
        (msg(pool, fresh, ""), InputError::EmptyIdempotencyKey),
        (
            msg(pool, fresh, &"k".repeat(MAX_IDEMPOTENCY_KEY_BYTES + 1)),
            InputError::IdempotencyKeyTooLong {
                len: MAX_IDEMPOTENCY_KEY_BYTES + 1,
                max: MAX_IDEMPOTENCY_KEY_BYTES,
            },
        ),
        (
            NewMessage::new(
                pool,
                fresh,
                "f",
                CleanupKind::PendingClaimTeardown,
                json!([1]),
            ),
            InputError::NotAnObject { field: "target" },
        ),
        (
            NewMessage::new(
                pool,
                fresh,
                "f",
                CleanupKind::PendingClaimTeardown,
                json!("s"),
            ),
            InputError::NotAnObject { field: "target" },
        ),
        (
            NewMessage::new(
                pool,
                fresh,
                "f",
                CleanupKind::PendingClaimTeardown,
                json!(null),
            ),
            InputError::NotAnObject { field: "target" },
        ),
        (
            msg(pool, fresh, "f").data(json!(42)),
            InputError::NotAnObject { field: "data" },
        ),
        (
            msg(pool, fresh, "f").data(json!(null)),
            InputError::NotAnObject { field: "data" },
        ),
        (
            // {"a":"<300 x>"} is 308 bytes, plus {} for the data.
            NewMessage::new(
                pool,
                fresh,
                "f",
                CleanupKind::PendingClaimTeardown,
                json!({ "a": big }),
            ),
            InputError::PayloadTooLarge {
                size: 310,
                limit: 200,
            },
        ),
        (msg(pool, visible, "other"), InputError::MessageIdConflict),
        (msg(pool, reserved, "other"), InputError::MessageIdConflict),
        (msg(pool, dead, "other"), InputError::MessageIdConflict),
        (msg(pool, tomb, "other"), InputError::MessageIdConflict),
    ];
    for (m, want) in cases {
        let err = q.enqueue(m.clone()).unwrap_err();
        match err {
            Error::InvalidInput(got) => assert_eq!(got, want, "{m:?}"),
            other => panic!("{m:?}: expected {want:?}, got {other:?}"),
        }
        assert_eq!(
            observe(&q, &pools, &ids),
            before,
            "{want:?} changed the database"
        );
        assert_clean(&q);
    }
    assert_eq!(
        InputError::MessageIdConflict.to_string(),
        "message_id is already associated with a different cleanup message"
    );
    assert_eq!(
        InputError::EmptyIdempotencyKey.to_string(),
        "idempotency_key must be non-empty"
    );
    // Payload exactly at the limit is fine: {"a":"x..."} + {} == 200 bytes.
    let at_limit = NewMessage::new(
        pool,
        fresh,
        "f",
        CleanupKind::PendingClaimTeardown,
        json!({ "a": "x".repeat(200 - 8 - 2) }),
    );
    assert!(!q.enqueue_detailed(at_limit).unwrap().duplicate);
    assert_clean(&q);
}

#[test]
fn unknown_kind_is_an_input_error() {
    let err = "cancelling_timeout_teardown.v2"
        .parse::<CleanupKind>()
        .unwrap_err();
    assert_eq!(
        err,
        InputError::UnknownKind("cancelling_timeout_teardown.v2".into())
    );
    for k in CleanupKind::ALL {
        assert_eq!(k.as_str().parse::<CleanupKind>().unwrap(), k);
    }
    assert_eq!(
        CleanupKind::CancellingTimeoutTeardown.as_str(),
        "cancelling_timeout_teardown.v1"
    );
    assert_eq!(
        CleanupKind::PendingClaimTeardown.as_str(),
        "pending_claim_teardown.v1"
    );
}

#[test]
fn duplicate_never_changes_stored_state() {
    let (q, clock) = queue();
    let pool = uuid();
    let x = uuid();
    let id = uuid();
    let stored = q.enqueue(msg(pool, id, "k").data(json!({"n": 1}))).unwrap();
    clock.advance(secs(5));
    let dup = q
        .enqueue(
            NewMessage::new(
                pool,
                uuid(),
                "k",
                CleanupKind::PendingClaimTeardown,
                json!({"other": true}),
            )
            .work_queue(x)
            .data(json!({"n": 2})),
        )
        .unwrap();
    assert_eq!(dup, stored);
    assert_eq!(q.read_message(pool, id).unwrap(), Some(stored));
    assert_eq!(
        q.reserve(
            pool,
            &cleanup_queue::ReserveFilter::any().queues([x], false)
        )
        .unwrap(),
        None
    );
    assert_clean(&q);
}

#[test]
fn duplicate_of_a_reserved_message_returns_it_as_stored() {
    let (q, clock) = queue();
    let pool = uuid();
    let id = enqueue_new(&q, pool, "k");
    clock.advance(secs(3));
    let r = reserve_one(&q, pool);
    clock.advance(secs(3));
    let d = q.enqueue_detailed(msg(pool, uuid(), "k")).unwrap();
    assert!(d.duplicate);
    assert_eq!(d.message, r.message);
    assert_eq!(d.message.delivery_count, 1);
    assert_eq!(d.message.created_at, START);
    assert_eq!(Some(d.message), q.read_message(pool, id).unwrap());
    assert_eq!(q.read_reservation(pool, id).unwrap(), Some(r));
    assert_clean(&q);
}
