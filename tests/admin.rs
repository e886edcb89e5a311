//! Operator operations: stats, dead-letter listing, redrive with audit, export / import,
//! persisted metrics.

use std::time::Duration;

use cleanup_queue::{
    CleanupKind, Counter, Durability, InputError, ManualClock, NewMessage, OpStatus, Queue,
    RedriveTarget, ReserveFilter, Timestamp,
};
use serde_json::json;
use uuid::Uuid;

fn open(path: &std::path::Path, clock: &ManualClock) -> Queue {
    Queue::builder(path)
        .clock(clock.clone())
        .sweep_interval(None)
        .durability(Durability::Flush)
        .max_delivery_attempts(1)
        .open()
        .unwrap()
}

fn new(pool: Uuid, n: u128, kind: CleanupKind) -> NewMessage {
    NewMessage::new(
        pool,
        Uuid::from_u128(n),
        format!("key-{n}"),
        kind,
        json!({"n": n as u64}),
    )
}

/// A pool with one visible, one reserved, two dead and one acked message.
fn populate(q: &Queue, clock: &ManualClock, pool: Uuid) {
    for n in 1..=5 {
        q.enqueue(new(pool, n, CleanupKind::CancellingTimeoutTeardown))
            .unwrap();
    }
    // 1 and 2 die by release at max 1; 3 is acked; 4 stays reserved; 5 stays visible.
    for n in 1..=4u128 {
        let r = q.reserve(pool, &ReserveFilter::any()).unwrap().unwrap();
        assert_eq!(r.message.message_id, Uuid::from_u128(n));
        let id = r.message.message_id;
        match n {
            1 | 2 => assert_eq!(
                q.release(pool, id, &r.reservation_token, "boom")
                    .unwrap()
                    .status,
                OpStatus::DeadLettered
            ),
            3 => assert_eq!(
                q.ack(pool, id, &r.reservation_token).unwrap().status,
                OpStatus::Accepted
            ),
            _ => {}
        }
        clock.advance(Duration::from_millis(1));
    }
}

#[test]
fn stats_and_dead_letter_listing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Timestamp::from_micros(1_700_000_000_000_000));
    let q = open(dir.path(), &clock);
    let (pool, other) = (Uuid::from_u128(7), Uuid::from_u128(8));
    populate(&q, &clock, pool);
    q.enqueue(new(other, 1, CleanupKind::PendingClaimTeardown))
        .unwrap();

    let s = q.pool_stats(pool).unwrap();
    assert_eq!(
        (s.visible, s.reserved, s.dead_lettered, s.tombstones),
        (1, 1, 2, 1)
    );
    assert_eq!(
        s.oldest_visible_at,
        Some(Timestamp::from_micros(1_700_000_000_000_000))
    );
    assert_eq!(
        s.next_lease_expires_at,
        Some(Timestamp::from_micros(
            1_700_000_000_000_000 + 3_000 + 30_000_000
        ))
    );
    assert_eq!(s.wakeup_sequence, q.read_wakeup_sequence(pool).unwrap());
    let mut pools = q.pools().unwrap();
    pools.sort();
    assert_eq!(pools, vec![pool, other]);

    assert_eq!(q.dead_letters(Some(pool), None, 10).unwrap().len(), 2);
    assert_eq!(q.dead_letters(Some(pool), None, 1).unwrap().len(), 1);
    assert_eq!(
        q.dead_letters(None, Some(CleanupKind::PendingClaimTeardown), 10)
            .unwrap()
            .len(),
        0
    );
    assert_eq!(q.dead_letters(Some(other), None, 10).unwrap().len(), 0);
}

#[test]
fn redrive_moves_dead_letters_back_with_an_audit_trail_and_a_wake() {
    let clock = ManualClock::new(Timestamp::from_micros(1_000_000));
    let q = Queue::temporary()
        .clock(clock.clone())
        .sweep_interval(None)
        .max_delivery_attempts(1)
        .open()
        .unwrap();
    let pool = Uuid::from_u128(7);
    populate(&q, &clock, pool);
    assert!(matches!(
        q.redrive(pool, RedriveTarget::All, "", "ops", true),
        Err(cleanup_queue::Error::InvalidInput(
            InputError::EmptyRedriveReason
        ))
    ));
    // Not a dead letter: nothing happens.
    assert!(q
        .redrive(
            pool,
            RedriveTarget::Message(Uuid::from_u128(5)),
            "why",
            "ops",
            true
        )
        .unwrap()
        .is_empty());

    let before = q.read_wakeup_sequence(pool).unwrap();
    let back = q
        .redrive(
            pool,
            RedriveTarget::Message(Uuid::from_u128(1)),
            "fixed the cluster",
            "alice",
            true,
        )
        .unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].delivery_count, 0);
    assert_eq!(q.read_wakeup_sequence(pool).unwrap(), before + 1);
    assert!(q
        .read_dead_letter(pool, Uuid::from_u128(1))
        .unwrap()
        .is_none());
    assert_eq!(
        q.read_message(pool, Uuid::from_u128(1))
            .unwrap()
            .unwrap()
            .delivery_count,
        0
    );
    let history = q.redrive_history(pool, Uuid::from_u128(1)).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(
        (history[0].actor.as_str(), history[0].reason.as_str()),
        ("alice", "fixed the cluster")
    );
    assert_eq!(
        history[0].dead_letter.release_reason.as_deref(),
        Some("boom")
    );

    // Redriven messages go to the back of the FIFO: 5 (visible all along) comes first.
    let r = q.reserve(pool, &ReserveFilter::any()).unwrap().unwrap();
    assert_eq!(r.message.message_id, Uuid::from_u128(5));
    let all = q
        .redrive(pool, RedriveTarget::All, "again", "bob", false)
        .unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].delivery_count, 1, "count kept without reset");
    assert!(q.check_integrity().unwrap().is_empty());
    assert_eq!(q.metrics().get(&Counter::op("redrive", "accepted")), 2);
}

#[test]
fn export_import_export_is_identical_and_metrics_persist() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Timestamp::from_micros(1_000_000));
    let q = open(dir.path(), &clock);
    let pool = Uuid::from_u128(7);
    populate(&q, &clock, pool);
    q.redrive(
        pool,
        RedriveTarget::Message(Uuid::from_u128(2)),
        "retry",
        "ops",
        true,
    )
    .unwrap();
    // A rejected op writes nothing; its count rides with the next transaction.
    assert_eq!(
        q.ack(pool, Uuid::from_u128(99), "t").unwrap().status,
        OpStatus::NotFound
    );
    q.wake_dispatchers(pool).unwrap();
    let metrics = q.metrics();
    assert_eq!(metrics.get(&Counter::op("enqueue", "accepted")), 5);
    assert_eq!(metrics.get(&Counter::op("ack", "not_found")), 1);
    assert_eq!(
        metrics.get(&Counter::DeadLetter {
            kind: "cancelling_timeout_teardown.v1".into(),
            reason: "max_delivery_attempts_reached".into()
        }),
        2
    );

    let mut first = Vec::new();
    let lines = q.export(&mut first).unwrap();
    assert!(lines >= 8);
    drop(q);

    // Counters survive a restart.
    let q = open(dir.path(), &clock);
    assert_eq!(q.metrics(), metrics);

    let copy = Queue::temporary()
        .clock(clock.clone())
        .sweep_interval(None)
        .open()
        .unwrap();
    assert_eq!(copy.import(&mut first.as_slice()).unwrap(), lines);
    let mut second = Vec::new();
    copy.export(&mut second).unwrap();
    assert_eq!(
        String::from_utf8(first.clone()).unwrap(),
        String::from_utf8(second).unwrap()
    );
    assert!(copy.check_integrity().unwrap().is_empty());
    assert_eq!(
        copy.read_wakeup_sequence(pool).unwrap(),
        q.read_wakeup_sequence(pool).unwrap()
    );
    // The imported reservation still answers to its token.
    let held = q
        .read_reservation(pool, Uuid::from_u128(4))
        .unwrap()
        .unwrap();
    assert_eq!(
        copy.renew(pool, Uuid::from_u128(4), &held.reservation_token)
            .unwrap()
            .status,
        OpStatus::Accepted
    );

    // A second import into a non-empty database is refused; a bad line names its number.
    assert!(matches!(
        copy.import(&mut first.as_slice()),
        Err(cleanup_queue::Error::InvalidInput(
            InputError::ImportIntoNonEmpty
        ))
    ));
    let fresh = Queue::temporary().sweep_interval(None).open().unwrap();
    match fresh
        .import(&mut "{\"type\":\"meta\",\"format\":1,\"next_seq\":3}\nnot json\n".as_bytes())
    {
        Err(cleanup_queue::Error::InvalidInput(InputError::BadImportLine { line, .. })) => {
            assert_eq!(line, 2)
        }
        other => panic!("expected a bad line error, got {other:?}"),
    }
    // The partial state of a failed import is not worked on: the engine is poisoned.
    match fresh.enqueue(new(
        Uuid::new_v4(),
        1,
        CleanupKind::CancellingTimeoutTeardown,
    )) {
        Err(cleanup_queue::Error::Poisoned(why)) => {
            assert!(why.contains("an import failed part way"), "{why}")
        }
        other => panic!("expected a poisoned engine, got {other:?}"),
    }
    // A refused import into a non-empty database changed nothing: that engine works on.
    assert!(copy
        .enqueue(new(
            Uuid::new_v4(),
            2,
            CleanupKind::CancellingTimeoutTeardown
        ))
        .is_ok());
    // A message listed twice is refused at its second line.
    let text = String::from_utf8(first).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("\"type\":\"message\""))
        .unwrap();
    let mut doubled = lines.clone();
    doubled.insert(at + 1, lines[at]);
    let fresh = Queue::temporary().sweep_interval(None).open().unwrap();
    match fresh.import(&mut doubled.join("\n").as_bytes()) {
        Err(cleanup_queue::Error::InvalidInput(InputError::BadImportLine { line, detail })) => {
            assert_eq!(line as usize, at + 2, "{detail}");
            assert!(detail.contains("appears twice"), "{detail}");
        }
        other => panic!("expected a duplicate line error, got {other:?}"),
    }
}
