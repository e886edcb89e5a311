//! Prefect 3.9.1's `WorkerCleanupQueueStandardTestSuite`
//! (`prefect/testing/standard_test_suites/worker_cleanup_queue.py`), translated case by case.
//! Each test carries the Python name; the parametrized pool-scope case becomes three tests.
//! The Python `clock` fixture is a [`ManualClock`]; `cleanup_policy_settings(...)` is
//! [`common::under_policy`].

mod common;

use std::time::Duration;

use cleanup_queue::{CleanupKind, NewMessage, OpStatus, Policy, ReserveFilter};
use common::*;
use serde_json::json;

/// Python's `_enqueue_message`: a `cancelling_timeout_teardown.v1` message with a fresh
/// target and the given key (default `"cleanup-key"`).
fn enqueue_message(
    q: &cleanup_queue::Queue,
    pool: uuid::Uuid,
    key: &str,
    work_queue: Option<uuid::Uuid>,
) -> uuid::Uuid {
    let id = uuid();
    let mut m = msg(pool, id, key);
    m.work_queue_id = work_queue;
    q.enqueue(m).unwrap();
    id
}

#[test]
fn test_enqueue_is_idempotent_for_stable_cleanup_keys() {
    let (q, _clock) = queue();
    let pool = uuid();
    let first_id = uuid();
    let second_id = uuid();

    let first = q.enqueue(msg(pool, first_id, "flow-run-cleanup")).unwrap();
    let second = q.enqueue(msg(pool, second_id, "flow-run-cleanup")).unwrap();

    assert_eq!(second.message_id, first.message_id);
    assert_ne!(second.message_id, second_id);
    assert_clean(&q);
}

#[test]
fn test_enqueue_deep_copies_payload_state() {
    let (q, _clock) = queue();
    let pool = uuid();
    let id = uuid();
    let mut target = json!({"flow_run": {"id": uuid().to_string()}});
    let mut data = json!({"resources": [{"id": uuid().to_string()}]});
    let original_target = target.clone();
    let original_data = data.clone();

    q.enqueue(NewMessage {
        message_id: id,
        idempotency_key: "flow-run-cleanup".into(),
        work_pool_id: pool,
        work_queue_id: None,
        kind: CleanupKind::CancellingTimeoutTeardown,
        target: target.clone(),
        data: Some(data.clone()),
    })
    .unwrap();

    target["flow_run"]["id"] = json!(uuid().to_string());
    data["resources"][0]["id"] = json!(uuid().to_string());
    assert_ne!(target, original_target);
    assert_ne!(data, original_data);

    let message = q.read_message(pool, id).unwrap().expect("stored message");
    assert_eq!(serde_json::Value::Object(message.target), original_target);
    assert_eq!(serde_json::Value::Object(message.data), original_data);
}

#[test]
fn test_reserve_commits_delivery_count_and_single_active_reservation() {
    let (q, clock) = queue();
    let pool = uuid();
    let id = enqueue_message(&q, pool, "cleanup-key", None);

    let reservation = q.reserve(pool, &ReserveFilter::any()).unwrap().unwrap();

    assert_eq!(reservation.message.message_id, id);
    assert_eq!(reservation.message.delivery_count, 1);
    assert_eq!(
        reservation.lease_expires_at,
        clock.now().saturating_add(Duration::from_secs(30))
    );
    assert!(reservation.reservation_token.len() > 32);

    assert!(q.reserve(pool, &ReserveFilter::any()).unwrap().is_none());
    assert_clean(&q);
}

#[test]
fn test_reservation_operations_require_current_token() {
    let (q, _clock) = queue();
    let pool = uuid();
    let id = enqueue_message(&q, pool, "cleanup-key", None);
    let reservation = reserve_one(&q, pool);

    let rejected = q.ack(pool, id, "not-the-current-token").unwrap();
    assert_eq!(rejected.status.as_str(), "invalid_token");
    assert!(q.read_message(pool, id).unwrap().is_some());

    let accepted = q.ack(pool, id, &reservation.reservation_token).unwrap();
    assert_eq!(accepted.status.as_str(), "accepted");
    assert!(q.read_message(pool, id).unwrap().is_none());
    assert_clean(&q);
}

#[derive(Clone, Copy)]
enum Op {
    Ack,
    Release,
    Renew,
}

/// `test_reservation_operations_require_matching_work_pool_scope[operation]`.
fn require_matching_work_pool_scope(operation: Op) {
    let (q, _clock) = queue();
    let pool = uuid();
    let id = enqueue_message(&q, pool, "cleanup-key", None);
    let reservation = reserve_one(&q, pool);
    let token = reservation.reservation_token.as_str();

    let other_pool = uuid();
    let rejected = match operation {
        Op::Ack => q.ack(other_pool, id, token),
        Op::Release => q.release(other_pool, id, token, "wrong_pool"),
        Op::Renew => q.renew(other_pool, id, token),
    }
    .unwrap();

    assert!(
        ["unauthorized", "not_found"].contains(&rejected.status.as_str()),
        "{rejected:?}"
    );
    assert!(
        ["work_pool_mismatch", "message_not_found"].contains(&rejected.reason.as_deref().unwrap()),
        "{rejected:?}"
    );
    assert!(q.read_message(pool, id).unwrap().is_some());

    let accepted = q.ack(pool, id, token).unwrap();
    assert_eq!(accepted.status, OpStatus::Accepted);
    assert_clean(&q);
}

#[test]
fn test_reservation_operations_require_matching_work_pool_scope_ack() {
    require_matching_work_pool_scope(Op::Ack);
}

#[test]
fn test_reservation_operations_require_matching_work_pool_scope_release() {
    require_matching_work_pool_scope(Op::Release);
}

#[test]
fn test_reservation_operations_require_matching_work_pool_scope_renew() {
    require_matching_work_pool_scope(Op::Renew);
}

#[test]
fn test_read_helpers_require_matching_work_pool_scope() {
    let (q, _clock) = queue();
    let pool = uuid();
    let other_pool = uuid();
    let id = enqueue_message(&q, pool, "cleanup-key", None);

    let message = q.read_message(pool, id).unwrap();
    let wrong_pool_message = q.read_message(other_pool, id).unwrap();
    assert!(message.is_some());
    assert!(wrong_pool_message.is_none());

    let result = under_policy(&q, with_max(1), || {
        let reservation = reserve_one(&q, pool);
        q.release(
            pool,
            id,
            &reservation.reservation_token,
            "unsupported_cleanup_kind",
        )
        .unwrap()
    });

    let dead_letter = q.read_dead_letter(pool, id).unwrap();
    let wrong_pool_dead_letter = q.read_dead_letter(other_pool, id).unwrap();

    assert_eq!(result.status.as_str(), "dead_lettered");
    assert!(dead_letter.is_some());
    assert!(wrong_pool_dead_letter.is_none());
    assert_clean(&q);
}

#[test]
fn test_reserve_prefers_matching_work_queue_but_falls_back_to_pool() {
    let (q, _clock) = queue();
    let pool = uuid();
    let preferred_queue = uuid();
    let fallback_queue = uuid();
    let fallback_id = enqueue_message(&q, pool, "fallback-cleanup", Some(fallback_queue));
    let preferred_id = enqueue_message(&q, pool, "preferred-cleanup", Some(preferred_queue));

    let prefer = ReserveFilter {
        preferred_work_queue_ids: Some(vec![preferred_queue]),
        ..ReserveFilter::default()
    };
    let preferred = q.reserve(pool, &prefer).unwrap().unwrap();
    assert_eq!(preferred.message.message_id, preferred_id);

    let accepted = q
        .ack(pool, preferred_id, &preferred.reservation_token)
        .unwrap();
    assert_eq!(accepted.status, OpStatus::Accepted);

    let fallback = q.reserve(pool, &prefer).unwrap().unwrap();
    assert_eq!(fallback.message.message_id, fallback_id);
    assert_clean(&q);
}

#[test]
fn test_enqueue_after_ack_keeps_idempotency_key_completed() {
    let (q, _clock) = queue();
    let pool = uuid();
    let id = uuid();
    let key = "flow-run-cleanup";
    let first = q.enqueue(msg(pool, id, key)).unwrap();
    let reservation = reserve_one(&q, pool);
    let accepted = q.ack(pool, id, &reservation.reservation_token).unwrap();
    let wakeup_sequence = q.read_wakeup_sequence(pool).unwrap();

    let duplicate = q.enqueue(msg(pool, uuid(), key)).unwrap();

    assert_eq!(accepted.status, OpStatus::Accepted);
    assert_eq!(duplicate.message_id, first.message_id);
    assert!(q.read_message(pool, id).unwrap().is_none());
    assert!(q.reserve(pool, &ReserveFilter::any()).unwrap().is_none());
    assert_eq!(q.read_wakeup_sequence(pool).unwrap(), wakeup_sequence);
    assert_clean(&q);
}

#[test]
fn test_completed_idempotency_retention_can_expire_tombstones() {
    let (q, _clock) = queue();
    let pool = uuid();
    let id = uuid();
    let key = "flow-run-cleanup";
    let new_id = uuid();
    let duplicate_after_retention = under_policy(&q, with_retention(Duration::ZERO), || {
        q.enqueue(msg(pool, id, key)).unwrap();
        let reservation = reserve_one(&q, pool);
        let accepted = q.ack(pool, id, &reservation.reservation_token).unwrap();
        assert_eq!(accepted.status, OpStatus::Accepted);

        q.enqueue(msg(pool, new_id, key)).unwrap()
    });

    assert_eq!(duplicate_after_retention.message_id, new_id);
    let reservation = reserve_one(&q, pool);
    assert_eq!(reservation.message.message_id, new_id);
    assert_clean(&q);
}

#[test]
fn test_release_makes_message_eligible_for_redelivery() {
    let (q, _clock) = queue();
    let pool = uuid();
    let id = enqueue_message(&q, pool, "cleanup-key", None);
    let first = reserve_one(&q, pool);

    let released = q
        .release(pool, id, &first.reservation_token, "cannot_act")
        .unwrap();
    let second = q.reserve(pool, &ReserveFilter::any()).unwrap();

    assert_eq!(released.status, OpStatus::Accepted);
    let second = second.unwrap();
    assert_eq!(second.message.message_id, id);
    assert_eq!(second.message.delivery_count, 2);
    assert_ne!(second.reservation_token, first.reservation_token);
    assert_clean(&q);
}

#[test]
fn test_release_moves_message_to_dlq_after_retry_limit() {
    let (q, _clock) = queue();
    let pool = uuid();
    let id = enqueue_message(&q, pool, "cleanup-key", None);
    let result = under_policy(&q, with_max(1), || {
        let reservation = reserve_one(&q, pool);
        q.release(
            pool,
            id,
            &reservation.reservation_token,
            "unsupported_cleanup_kind",
        )
        .unwrap()
    });
    let dead_letter = q.read_dead_letter(pool, id).unwrap();

    assert_eq!(result.status.as_str(), "dead_lettered");
    assert_eq!(
        result.reason.as_deref(),
        Some("max_delivery_attempts_reached")
    );
    let dead_letter = dead_letter.unwrap();
    assert_eq!(dead_letter.final_delivery_count, 1);
    assert_eq!(
        dead_letter.release_reason.as_deref(),
        Some("unsupported_cleanup_kind")
    );
    assert!(q.read_message(pool, id).unwrap().is_none());
    assert_clean(&q);
}

#[test]
fn test_expired_leases_redeliver_then_dlq_at_retry_limit() {
    let (q, clock) = queue();
    let pool = uuid();
    let id = enqueue_message(&q, pool, "cleanup-key", None);
    let (first_expiry, second, second_expiry) = under_policy(
        &q,
        Policy {
            lease: secs(10),
            max_delivery_attempts: 2,
            completed_retention: None,
        },
        || {
            reserve_one(&q, pool);

            clock.advance(secs(11));
            let first_expiry = q.expire_leases(100, None).unwrap();
            let second = reserve_one(&q, pool);

            clock.advance(secs(11));
            let second_expiry = q.expire_leases(100, None).unwrap();
            (first_expiry, second, second_expiry)
        },
    );
    let dead_letter = q.read_dead_letter(pool, id).unwrap();

    let redelivered: Vec<_> = first_expiry
        .redelivered
        .iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(redelivered, vec![id]);
    assert!(first_expiry.dead_lettered.is_empty());
    assert_eq!(second.message.delivery_count, 2);
    assert!(second_expiry.redelivered.is_empty());
    assert_eq!(second_expiry.dead_lettered.len(), 1);
    let dead_letter = dead_letter.unwrap();
    assert_eq!(dead_letter.final_delivery_count, 2);
    assert!(q.reserve(pool, &ReserveFilter::any()).unwrap().is_none());
    assert_clean(&q);
}

#[test]
fn test_reserve_wakes_dispatchers_after_expiring_leases() {
    let (q, clock) = queue();
    let pool = uuid();
    let id = enqueue_message(&q, pool, "cleanup-key", None);

    let (unmatched, wakeup, sequence) = under_policy(&q, with_lease(secs(10)), || {
        reserve_one(&q, pool);
        let sequence = q.read_wakeup_sequence(pool).unwrap();

        clock.advance(secs(11));
        let unmatched = q
            .reserve(
                pool,
                &ReserveFilter::any().kinds([CleanupKind::PendingClaimTeardown]),
            )
            .unwrap();
        let wakeup = q
            .wait_for_wakeup(pool, sequence, Some(Duration::from_secs(1)))
            .unwrap();
        (unmatched, wakeup, sequence)
    });

    let redelivered = q.reserve(pool, &ReserveFilter::any()).unwrap();

    assert!(unmatched.is_none());
    let wakeup = wakeup.unwrap();
    assert_eq!(wakeup.sequence, sequence + 1);
    assert_eq!(redelivered.unwrap().message.message_id, id);
    assert_clean(&q);
}

#[test]
fn test_expire_leases_respects_limit_and_work_pool_scope() {
    let (q, clock) = queue();
    let pool = uuid();
    let other_pool = uuid();
    let first_id = enqueue_message(&q, pool, "first-cleanup", None);
    let second_id = enqueue_message(&q, pool, "second-cleanup", None);
    let other_id = enqueue_message(&q, other_pool, "other-cleanup", None);

    let (first_expiry, second_expiry, other_expiry) =
        under_policy(&q, with_lease(secs(10)), || {
            assert!(q.reserve(pool, &ReserveFilter::any()).unwrap().is_some());
            assert!(q.reserve(pool, &ReserveFilter::any()).unwrap().is_some());
            assert!(q
                .reserve(other_pool, &ReserveFilter::any())
                .unwrap()
                .is_some());

            clock.advance(secs(11));
            (
                q.expire_leases(1, Some(pool)).unwrap(),
                q.expire_leases(10, Some(pool)).unwrap(),
                q.expire_leases(10, Some(other_pool)).unwrap(),
            )
        });

    assert_eq!(first_expiry.redelivered.len(), 1);
    assert_eq!(second_expiry.redelivered.len(), 1);
    let got: std::collections::HashSet<_> = [
        first_expiry.redelivered[0].message_id,
        second_expiry.redelivered[0].message_id,
    ]
    .into_iter()
    .collect();
    assert_eq!(got, [first_id, second_id].into_iter().collect());
    let other: Vec<_> = other_expiry
        .redelivered
        .iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(other, vec![other_id]);
    assert_clean(&q);
}

#[test]
fn test_renew_extends_current_reservation() {
    let (q, clock) = queue();
    let pool = uuid();
    let id = enqueue_message(&q, pool, "cleanup-key", None);
    let reservation = reserve_one(&q, pool);

    clock.advance(secs(5));
    let result = q.renew(pool, id, &reservation.reservation_token).unwrap();

    assert_eq!(result.status, OpStatus::Accepted);
    assert_eq!(
        result.lease_expires_at,
        Some(clock.now().saturating_add(secs(30)))
    );
    assert_clean(&q);
}

#[test]
fn test_operation_on_expired_lease_wakes_dispatchers() {
    let (q, clock) = queue();
    let pool = uuid();
    let id = enqueue_message(&q, pool, "cleanup-key", None);
    let (result, sequence) = under_policy(&q, with_lease(secs(10)), || {
        let reservation = reserve_one(&q, pool);
        let sequence = q.read_wakeup_sequence(pool).unwrap();

        clock.advance(secs(11));
        let result = q.renew(pool, id, &reservation.reservation_token).unwrap();
        (result, sequence)
    });
    let wakeup = q
        .wait_for_wakeup(pool, sequence, Some(Duration::from_secs(1)))
        .unwrap();

    assert_eq!(result.status.as_str(), "expired");
    assert_eq!(wakeup.unwrap().sequence, sequence + 1);
    assert_clean(&q);
}

#[test]
fn test_enqueue_wakes_local_dispatchers() {
    let (q, _clock) = queue();
    let pool = uuid();
    let sequence = q.read_wakeup_sequence(pool).unwrap();
    let waiter = {
        let q = q.clone();
        // Python waits 1 s; a generous timeout keeps a slow CI machine from flaking.
        std::thread::spawn(move || {
            q.wait_for_wakeup(pool, sequence, Some(Duration::from_secs(30)))
                .unwrap()
        })
    };

    enqueue_message(&q, pool, "cleanup-key", None);
    let wakeup = waiter.join().unwrap();

    let wakeup = wakeup.unwrap();
    assert_eq!(wakeup.work_pool_id, pool);
    assert_eq!(wakeup.sequence, sequence + 1);
}
