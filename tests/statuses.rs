//! Every status of ack / release / renew, and the order of the checks in semantics.md:
//! not found (missing, wrong pool, dead, acked) -> not current -> invalid token -> lease
//! expired (the boundary instant counts) -> the operation itself.

mod common;

use std::time::Duration;

use cleanup_queue::{
    reason, Error, InputError, OpStatus, Operation, OperationResult, Queue, Reservation,
    ReserveFilter,
};
use common::*;
use uuid::Uuid;

const OPS: [Operation; 3] = [Operation::Ack, Operation::Release, Operation::Renew];

fn run(q: &Queue, op: Operation, pool: Uuid, id: Uuid, token: &str) -> OperationResult {
    match op {
        Operation::Ack => q.ack(pool, id, token),
        Operation::Release => q.release(pool, id, token, "worker_gave_up"),
        Operation::Renew => q.renew(pool, id, token),
    }
    .unwrap()
}

/// A queue with one reserved message; returns it all.
fn reserved() -> (Queue, cleanup_queue::ManualClock, Uuid, Uuid, Reservation) {
    let (q, clock) = queue();
    let pool = uuid();
    let id = enqueue_new(&q, pool, "k");
    let r = reserve_one(&q, pool);
    (q, clock, pool, id, r)
}

#[track_caller]
fn assert_rejected(res: &OperationResult, op: Operation, id: Uuid, status: OpStatus, why: &str) {
    assert_eq!(res.message_id, id);
    assert_eq!(res.operation, op);
    assert_eq!(res.status, status, "{res:?}");
    assert_eq!(res.reason.as_deref(), Some(why), "{res:?}");
    assert_eq!(res.lease_expires_at, None);
    assert_eq!(res.dead_letter, None);
}

/// Everything observable about one message: a rejected op must leave it all unchanged.
fn snapshot(q: &Queue, pool: Uuid, id: Uuid) -> impl PartialEq + std::fmt::Debug {
    (
        q.read_message(pool, id).unwrap(),
        q.read_reservation(pool, id).unwrap(),
        q.read_dead_letter(pool, id).unwrap(),
        q.read_wakeup_sequence(pool).unwrap(),
    )
}

#[test]
fn missing_message_is_not_found() {
    let (q, _clock) = queue();
    let pool = uuid();
    enqueue_new(&q, pool, "other");
    for op in OPS {
        let missing = uuid();
        let res = run(&q, op, pool, missing, "whatever-token");
        assert_rejected(&res, op, missing, OpStatus::NotFound, "message_not_found");
    }
    assert_eq!(q.read_wakeup_sequence(pool).unwrap(), 1);
    assert_clean(&q);
}

#[test]
fn wrong_pool_is_not_found_with_the_right_token_and_changes_nothing() {
    let (q, _clock, pool, id, r) = reserved();
    let other = uuid();
    let before = snapshot(&q, pool, id);
    for op in OPS {
        let res = run(&q, op, other, id, &r.reservation_token);
        assert_rejected(&res, op, id, OpStatus::NotFound, reason::MESSAGE_NOT_FOUND);
        assert_eq!(snapshot(&q, pool, id), before);
        assert_eq!(q.read_wakeup_sequence(other).unwrap(), 0);
    }
    assert_clean(&q);
}

#[test]
fn dead_message_is_not_found() {
    let (q, _clock) = queue();
    q.set_policy(with_max(1)).unwrap();
    let pool = uuid();
    let id = enqueue_new(&q, pool, "k");
    let r = reserve_one(&q, pool);
    let res = q.release(pool, id, &r.reservation_token, "nope").unwrap();
    assert_eq!(res.status, OpStatus::DeadLettered);
    let before = snapshot(&q, pool, id);
    for op in OPS {
        let res = run(&q, op, pool, id, &r.reservation_token);
        assert_rejected(&res, op, id, OpStatus::NotFound, reason::MESSAGE_NOT_FOUND);
        assert_eq!(snapshot(&q, pool, id), before);
    }
    assert_clean(&q);
}

#[test]
fn acked_message_is_not_found() {
    let (q, _clock, pool, id, r) = reserved();
    assert_eq!(
        q.ack(pool, id, &r.reservation_token).unwrap().status,
        OpStatus::Accepted
    );
    let before = snapshot(&q, pool, id);
    for op in OPS {
        let res = run(&q, op, pool, id, &r.reservation_token);
        assert_rejected(&res, op, id, OpStatus::NotFound, reason::MESSAGE_NOT_FOUND);
        assert_eq!(snapshot(&q, pool, id), before);
    }
    assert_clean(&q);
}

#[test]
fn visible_message_is_not_current_even_with_a_stale_or_bogus_token() {
    let (q, _clock) = queue();
    let pool = uuid();
    let never_reserved = enqueue_new(&q, pool, "never");
    for op in OPS {
        let res = run(&q, op, pool, never_reserved, "bogus");
        assert_rejected(
            &res,
            op,
            never_reserved,
            OpStatus::NotCurrent,
            "no_active_reservation",
        );
    }

    // Released: the old token now finds a visible message (not_current beats invalid_token).
    let other = enqueue_new(&q, pool, "released");
    let r = q
        .reserve(pool, &ReserveFilter::any())
        .unwrap()
        .expect("first message");
    assert_eq!(r.message.message_id, never_reserved);
    let r2 = reserve_one(&q, pool);
    assert_eq!(r2.message.message_id, other);
    q.release(pool, other, &r2.reservation_token, "later")
        .unwrap();
    let before = snapshot(&q, pool, other);
    for op in OPS {
        let res = run(&q, op, pool, other, &r2.reservation_token);
        assert_rejected(
            &res,
            op,
            other,
            OpStatus::NotCurrent,
            reason::NO_ACTIVE_RESERVATION,
        );
        assert_eq!(snapshot(&q, pool, other), before);
    }
    assert_clean(&q);
}

#[test]
fn wrong_token_is_invalid_token_and_changes_nothing() {
    let (q, _clock, pool, id, r) = reserved();
    let before = snapshot(&q, pool, id);
    let t = &r.reservation_token;
    let bad = [
        String::new(),
        "x".to_string(),
        t[..t.len() - 1].to_string(),
        format!("{t}x"),
        t.to_uppercase(),
    ];
    for op in OPS {
        for token in &bad {
            if token == t {
                continue;
            }
            let res = run(&q, op, pool, id, token);
            assert_rejected(
                &res,
                op,
                id,
                OpStatus::InvalidToken,
                "reservation_token_mismatch",
            );
            assert_eq!(snapshot(&q, pool, id), before);
        }
    }
    // The real token still works.
    assert_eq!(q.ack(pool, id, t).unwrap().status, OpStatus::Accepted);
    assert_clean(&q);
}

#[test]
fn invalid_token_is_checked_before_expiry() {
    let (q, clock, pool, id, r) = reserved();
    clock.advance(secs(31));
    let before = snapshot(&q, pool, id);
    for op in OPS {
        let res = run(&q, op, pool, id, "someone-else");
        assert_rejected(
            &res,
            op,
            id,
            OpStatus::InvalidToken,
            "reservation_token_mismatch",
        );
        // The expiry transition is not applied by a rejected op: still reserved, no wake.
        assert_eq!(snapshot(&q, pool, id), before);
    }
    assert!(q.read_reservation(pool, id).unwrap().is_some());
    assert_eq!(
        q.ack(pool, id, &r.reservation_token).unwrap().status,
        OpStatus::Expired
    );
    assert_clean(&q);
}

#[test]
fn lease_expired_at_the_exact_boundary_instant() {
    for op in OPS {
        let (q, clock, pool, id, r) = reserved();
        assert_eq!(r.lease_expires_at, START.saturating_add(secs(30)));
        let seq = q.read_wakeup_sequence(pool).unwrap();
        clock.set(r.lease_expires_at); // lease_expires_at == now
        let res = run(&q, op, pool, id, &r.reservation_token);
        assert_rejected(&res, op, id, OpStatus::Expired, "lease_expired");

        // The expiry transition happened instead of the operation.
        assert!(q.read_reservation(pool, id).unwrap().is_none());
        let m = q.read_message(pool, id).unwrap().expect("visible again");
        assert_eq!(m.delivery_count, 1);
        assert_eq!(m.updated_at, clock.now());
        assert!(q.read_dead_letter(pool, id).unwrap().is_none());
        assert_eq!(q.read_wakeup_sequence(pool).unwrap(), seq + 1);

        // And it is reservable again, with a fresh token.
        let again = reserve_one(&q, pool);
        assert_eq!(again.message.message_id, id);
        assert_eq!(again.message.delivery_count, 2);
        assert_ne!(again.reservation_token, r.reservation_token);
        assert_clean(&q);
    }
}

#[test]
fn one_microsecond_before_the_boundary_is_still_live() {
    for op in OPS {
        let (q, clock, pool, id, r) = reserved();
        clock.set(r.lease_expires_at.saturating_sub(Duration::from_micros(1)));
        let res = run(&q, op, pool, id, &r.reservation_token);
        assert_eq!(res.status, OpStatus::Accepted, "{op}: {res:?}");
        assert_eq!(res.reason, None);
        assert_clean(&q);
    }
}

#[test]
fn expired_op_at_max_attempts_dead_letters_with_token_and_lease() {
    for op in OPS {
        let (q, clock) = queue();
        q.set_policy(with_max(1)).unwrap();
        let pool = uuid();
        let id = enqueue_new(&q, pool, "k");
        let r = reserve_one(&q, pool);
        let seq = q.read_wakeup_sequence(pool).unwrap();
        clock.advance(secs(45));

        let res = run(&q, op, pool, id, &r.reservation_token);
        assert_eq!(res.status, OpStatus::DeadLettered);
        assert_eq!(res.operation, op);
        assert_eq!(res.reason.as_deref(), Some("max_delivery_attempts_reached"));
        assert_eq!(res.lease_expires_at, None);
        let dl = res.dead_letter.clone().expect("dead letter in the result");
        assert_eq!(dl.reason, "max_delivery_attempts_reached");
        assert_eq!(dl.final_delivery_count, 1);
        assert_eq!(dl.moved_at, clock.now());
        assert_eq!(dl.reservation_token.as_deref(), Some(&*r.reservation_token));
        assert_eq!(dl.lease_expires_at, Some(r.lease_expires_at));
        assert_eq!(
            dl.release_reason, None,
            "an expiry records no release reason"
        );
        assert_eq!(dl.message.message_id, id);
        assert_eq!(dl.message.delivery_count, 1);

        assert_eq!(q.read_dead_letter(pool, id).unwrap(), Some(dl));
        assert!(q.read_message(pool, id).unwrap().is_none());
        assert!(q.read_reservation(pool, id).unwrap().is_none());
        assert_eq!(q.read_wakeup_sequence(pool).unwrap(), seq, "no wake on DLQ");
        assert!(q.reserve(pool, &ReserveFilter::any()).unwrap().is_none());
        assert_clean(&q);
    }
}

#[test]
fn release_at_max_attempts_dead_letters_with_release_reason_token_and_lease() {
    let (q, clock) = queue();
    let pool = uuid();
    let id = enqueue_new(&q, pool, "k");
    // Default max 3: two accepted releases, then the third delivery's release dead-letters.
    for n in 1..=2 {
        let r = reserve_one(&q, pool);
        assert_eq!(r.message.delivery_count, n);
        clock.advance(secs(1));
        let res = q.release(pool, id, &r.reservation_token, "busy").unwrap();
        assert_eq!(res.status, OpStatus::Accepted);
        assert_eq!(res.reason, None);
        assert_eq!(res.dead_letter, None);
        assert_eq!(res.lease_expires_at, None);
    }
    let r = reserve_one(&q, pool);
    assert_eq!(r.message.delivery_count, 3);
    let seq = q.read_wakeup_sequence(pool).unwrap();
    clock.advance(secs(2));
    let res = q
        .release(pool, id, &r.reservation_token, "cannot_handle_kind")
        .unwrap();
    assert_eq!(res.status, OpStatus::DeadLettered);
    assert_eq!(res.operation, Operation::Release);
    assert_eq!(
        res.reason.as_deref(),
        Some(reason::MAX_DELIVERY_ATTEMPTS_REACHED)
    );
    let dl = res.dead_letter.clone().unwrap();
    assert_eq!(dl.release_reason.as_deref(), Some("cannot_handle_kind"));
    assert_eq!(dl.reservation_token.as_deref(), Some(&*r.reservation_token));
    assert_eq!(dl.lease_expires_at, Some(r.lease_expires_at));
    assert_eq!(dl.final_delivery_count, 3);
    assert_eq!(dl.moved_at, clock.now());
    assert_eq!(dl.reason, reason::MAX_DELIVERY_ATTEMPTS_REACHED);
    assert_eq!(dl.message.delivery_count, 3);
    assert_eq!(dl.message.created_at, START);
    assert_eq!(q.read_dead_letter(pool, id).unwrap(), Some(dl));
    assert_eq!(q.read_wakeup_sequence(pool).unwrap(), seq, "no wake on DLQ");
    assert_clean(&q);
}

#[test]
fn accepted_release_requeues_with_count_unchanged_and_wakes() {
    let (q, clock, pool, id, r) = reserved();
    let seq = q.read_wakeup_sequence(pool).unwrap();
    clock.advance(secs(3));
    let res = q.release(pool, id, &r.reservation_token, "later").unwrap();
    assert_eq!(res.status, OpStatus::Accepted);
    assert_eq!(res.operation, Operation::Release);
    let m = q.read_message(pool, id).unwrap().unwrap();
    assert_eq!(m.delivery_count, 1);
    assert_eq!(m.updated_at, clock.now());
    assert_eq!(m.created_at, START);
    assert!(q.read_reservation(pool, id).unwrap().is_none());
    assert_eq!(q.read_wakeup_sequence(pool).unwrap(), seq + 1);
    assert_clean(&q);
}

#[test]
fn accepted_ack_removes_the_active_message_without_a_wake() {
    let (q, clock, pool, id, r) = reserved();
    let seq = q.read_wakeup_sequence(pool).unwrap();
    clock.advance(secs(3));
    let res = q.ack(pool, id, &r.reservation_token).unwrap();
    assert_eq!(res.status, OpStatus::Accepted);
    assert_eq!(res.operation, Operation::Ack);
    assert_eq!(res.reason, None);
    assert_eq!(res.lease_expires_at, None);
    assert_eq!(res.dead_letter, None);
    assert!(q.read_message(pool, id).unwrap().is_none());
    assert!(q.read_reservation(pool, id).unwrap().is_none());
    assert!(q.read_dead_letter(pool, id).unwrap().is_none());
    assert_eq!(q.read_wakeup_sequence(pool).unwrap(), seq);
    assert_clean(&q);
}

#[test]
fn renew_extends_from_now_not_from_the_old_lease() {
    let (q, clock, pool, id, r) = reserved();
    let seq = q.read_wakeup_sequence(pool).unwrap();
    clock.advance(secs(20));
    let res = q.renew(pool, id, &r.reservation_token).unwrap();
    let expected = START.saturating_add(secs(50));
    assert_eq!(res.status, OpStatus::Accepted);
    assert_eq!(res.operation, Operation::Renew);
    assert_eq!(res.reason, None);
    assert_eq!(res.dead_letter, None);
    assert_eq!(res.lease_expires_at, Some(expected));
    assert_ne!(
        Some(r.lease_expires_at.saturating_add(secs(30))),
        res.lease_expires_at
    );

    let now_held = q.read_reservation(pool, id).unwrap().unwrap();
    assert_eq!(now_held.reservation_token, r.reservation_token);
    assert_eq!(now_held.lease_expires_at, expected);
    assert_eq!(now_held.message.delivery_count, 1);
    assert_eq!(now_held.message.updated_at, clock.now());
    assert_eq!(
        q.read_wakeup_sequence(pool).unwrap(),
        seq,
        "renew never wakes"
    );

    // The old lease end no longer matters: at it, the renewed lease still holds.
    clock.set(r.lease_expires_at);
    let res = q.renew(pool, id, &r.reservation_token).unwrap();
    assert_eq!(res.status, OpStatus::Accepted);
    assert_eq!(res.lease_expires_at, Some(START.saturating_add(secs(60))));

    // A renew under a changed lease uses the new lease, still from now.
    q.set_policy(with_lease(secs(7))).unwrap();
    clock.advance(secs(1));
    let res = q.renew(pool, id, &r.reservation_token).unwrap();
    assert_eq!(
        res.lease_expires_at,
        Some(clock.now().saturating_add(secs(7)))
    );
    assert_eq!(res.lease_expires_at, Some(START.saturating_add(secs(38))));
    assert_clean(&q);
}

#[test]
fn reason_strings_are_prefects() {
    assert_eq!(reason::MESSAGE_NOT_FOUND, "message_not_found");
    assert_eq!(reason::NO_ACTIVE_RESERVATION, "no_active_reservation");
    assert_eq!(
        reason::RESERVATION_TOKEN_MISMATCH,
        "reservation_token_mismatch"
    );
    assert_eq!(reason::LEASE_EXPIRED, "lease_expired");
    assert_eq!(
        reason::MAX_DELIVERY_ATTEMPTS_REACHED,
        "max_delivery_attempts_reached"
    );
    let statuses = [
        (OpStatus::Accepted, "accepted"),
        (OpStatus::NotCurrent, "not_current"),
        (OpStatus::NotFound, "not_found"),
        (OpStatus::Expired, "expired"),
        (OpStatus::InvalidToken, "invalid_token"),
        (OpStatus::Unauthorized, "unauthorized"),
        (OpStatus::DeadLettered, "dead_lettered"),
    ];
    for (s, text) in statuses {
        assert_eq!(s.as_str(), text);
        assert_eq!(s.to_string(), text);
        assert_eq!(text.parse::<OpStatus>().unwrap(), s);
    }
    assert!("error".parse::<OpStatus>().is_err());
    assert_eq!(Operation::Ack.as_str(), "ack");
    assert_eq!(Operation::Release.as_str(), "release");
    assert_eq!(Operation::Renew.as_str(), "renew");
}

#[test]
fn empty_release_reason_is_an_input_error_before_any_check() {
    let (q, _clock, pool, id, r) = reserved();
    let before = snapshot(&q, pool, id);
    let err = q.release(pool, id, &r.reservation_token, "").unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput(InputError::EmptyReleaseReason)),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "release reason must be non-empty");
    // Even for a message that does not exist.
    let err = q.release(pool, uuid(), "t", "").unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidInput(InputError::EmptyReleaseReason)
    ));
    assert_eq!(snapshot(&q, pool, id), before);
    assert_clean(&q);
}

#[test]
fn expire_leases_limit_zero_is_an_input_error() {
    let (q, clock, pool, id, _r) = reserved();
    clock.advance(secs(60));
    let before = snapshot(&q, pool, id);
    for scope in [None, Some(pool)] {
        let err = q.expire_leases(0, scope).unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput(InputError::LimitTooSmall)),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "limit must be at least 1");
    }
    assert_eq!(snapshot(&q, pool, id), before, "nothing was expired");
    assert_eq!(q.expire_leases(1, None).unwrap().redelivered.len(), 1);
    assert_clean(&q);
}
