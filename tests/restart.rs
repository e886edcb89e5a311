//! Reopening a database: every state (visible, reserved with token and lease, dead letters,
//! tombstones with their keys, delivery counts, wake sequences, FIFO positions) comes back
//! exactly; a lease that lapsed while the database was closed is expired by the next
//! reserve or by the sweeper.

mod common;

use std::path::Path;
use std::time::Duration;

use cleanup_queue::{
    CleanupKind, DeadLetter, ManualClock, Message, OpStatus, Queue, Reservation, ReserveFilter,
};
use common::*;
use serde_json::json;
use uuid::Uuid;

#[derive(Debug, PartialEq)]
struct Seen {
    messages: Vec<Option<Message>>,
    reservations: Vec<Option<Reservation>>,
    dead: Vec<Option<DeadLetter>>,
    sequences: Vec<u64>,
}

fn observe(q: &Queue, ids: &[(Uuid, Uuid)], pools: &[Uuid]) -> Seen {
    Seen {
        messages: ids
            .iter()
            .map(|(p, id)| q.read_message(*p, *id).unwrap())
            .collect(),
        reservations: ids
            .iter()
            .map(|(p, id)| q.read_reservation(*p, *id).unwrap())
            .collect(),
        dead: ids
            .iter()
            .map(|(p, id)| q.read_dead_letter(*p, *id).unwrap())
            .collect(),
        sequences: pools
            .iter()
            .map(|p| q.read_wakeup_sequence(*p).unwrap())
            .collect(),
    }
}

fn open(path: &Path, clock: &ManualClock) -> Queue {
    path_builder(path, clock).open().unwrap()
}

struct World {
    pool_a: Uuid,
    pool_b: Uuid,
    visible: Uuid,
    twice: Uuid,
    reserved: Uuid,
    released_dead: Uuid,
    scan_dead: Uuid,
    tomb: Uuid,
    in_b: Uuid,
    reservation: Reservation,
    tomb_message: Message,
}

impl World {
    fn ids(&self) -> Vec<(Uuid, Uuid)> {
        let a = self.pool_a;
        vec![
            (a, self.visible),
            (a, self.twice),
            (a, self.reserved),
            (a, self.released_dead),
            (a, self.scan_dead),
            (a, self.tomb),
            (self.pool_b, self.in_b),
            // The same id in the other pool must stay absent.
            (self.pool_b, self.visible),
        ]
    }

    fn pools(&self) -> Vec<Uuid> {
        vec![self.pool_a, self.pool_b, Uuid::nil()]
    }
}

/// Builds one message in every state, over several clock instants.
fn build(q: &Queue, clock: &ManualClock) -> World {
    let pool_a = uuid();
    let pool_b = uuid();
    let wq = uuid();

    // released_dead: max 1, released -> DLQ with release reason, token and lease.
    q.set_policy(with_max(1)).unwrap();
    let released_dead = enqueue_new(q, pool_a, "released-dead");
    let r = reserve_one(q, pool_a);
    clock.advance(secs(1));
    assert_eq!(
        q.release(pool_a, released_dead, &r.reservation_token, "no_k8s")
            .unwrap()
            .status,
        OpStatus::DeadLettered
    );

    // scan_dead: delivered once under max 3, released, then dead-lettered by a scan at max 1.
    q.set_policy(with_max(3)).unwrap();
    let scan_dead = enqueue_new(q, pool_a, "scan-dead");
    let r = reserve_one(q, pool_a);
    q.release(pool_a, scan_dead, &r.reservation_token, "later")
        .unwrap();
    q.set_policy(with_max(1)).unwrap();
    let d = q.reserve_detailed(pool_a, &ReserveFilter::any()).unwrap();
    assert_eq!(d.dead_lettered.len(), 1);
    assert!(d.reservation.is_none());
    q.set_policy(with_max(3)).unwrap();

    // tomb: acked.
    clock.advance(secs(1));
    let tomb = enqueue_new(q, pool_a, "tomb");
    let r = reserve_one(q, pool_a);
    q.ack(pool_a, tomb, &r.reservation_token).unwrap();
    let tomb_message = q.enqueue(msg(pool_a, uuid(), "tomb")).unwrap();
    assert_eq!(tomb_message.message_id, tomb);

    // twice: delivered twice (once released, once expired), visible with count 2.
    clock.advance(secs(1));
    let twice = enqueue_new(q, pool_a, "twice");
    let r = reserve_one(q, pool_a);
    q.release(pool_a, twice, &r.reservation_token, "later")
        .unwrap();
    let r = reserve_one(q, pool_a);
    assert_eq!(r.message.delivery_count, 2);
    clock.advance(secs(30));
    assert_eq!(q.expire_leases(10, None).unwrap().redelivered.len(), 1);

    // visible: with a queue and data, never delivered. Then reserved: held now.
    clock.advance(secs(1));
    let visible = uuid();
    q.enqueue(
        msg_in(pool_a, visible, "visible", wq)
            .data(json!({"resources": [{"id": "job-1"}], "n": 1.5})),
    )
    .unwrap();
    let reserved = uuid();
    q.enqueue(msg_kind(
        pool_a,
        reserved,
        "reserved",
        CleanupKind::PendingClaimTeardown,
    ))
    .unwrap();
    let reservation = q
        .reserve(
            pool_a,
            &ReserveFilter::any().kinds([CleanupKind::PendingClaimTeardown]),
        )
        .unwrap()
        .unwrap();
    assert_eq!(reservation.message.message_id, reserved);

    // Pool b: a message and some explicit wakes.
    let in_b = enqueue_new(q, pool_b, "b");
    q.wake_dispatchers(pool_b).unwrap();
    q.wake_dispatchers(pool_b).unwrap();

    World {
        pool_a,
        pool_b,
        visible,
        twice,
        reserved,
        released_dead,
        scan_dead,
        tomb,
        in_b,
        reservation,
        tomb_message,
    }
}

#[test]
fn every_state_survives_a_reopen_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = open(dir.path(), &clock);
    let w = build(&q, &clock);
    let before = observe(&q, &w.ids(), &w.pools());
    assert_clean(&q);
    // Sanity: the world is what we think it is.
    assert!(before.messages[0].is_some() && before.reservations[2].is_some());
    assert!(before.dead[3].as_ref().unwrap().release_reason.is_some());
    assert!(before.dead[4].as_ref().unwrap().reservation_token.is_none());
    assert_eq!(before.messages[1].as_ref().unwrap().delivery_count, 2);
    drop(q);

    let q = open(dir.path(), &clock);
    assert_eq!(observe(&q, &w.ids(), &w.pools()), before);
    assert_clean(&q);

    // The reservation's token still works and is the only one that does.
    let a = w.pool_a;
    assert_eq!(
        q.read_reservation(a, w.reserved).unwrap(),
        Some(w.reservation.clone())
    );
    assert_eq!(
        q.renew(a, w.reserved, "guess").unwrap().status,
        OpStatus::InvalidToken
    );
    // Tombstone and dead letters keep their keys; duplicates return them unchanged.
    let d = q.enqueue_detailed(msg(a, uuid(), "tomb")).unwrap();
    assert!(d.duplicate);
    assert_eq!(d.message, w.tomb_message);
    for (key, id) in [
        ("released-dead", w.released_dead),
        ("scan-dead", w.scan_dead),
    ] {
        let d = q.enqueue_detailed(msg(a, uuid(), key)).unwrap();
        assert!(d.duplicate);
        assert_eq!(
            Some(d.message),
            q.read_dead_letter(a, id).unwrap().map(|dl| dl.message)
        );
    }
    let d = q.enqueue_detailed(msg(a, uuid(), "reserved")).unwrap();
    assert!(d.duplicate);
    // Nothing above woke anything.
    assert_eq!(observe(&q, &w.ids(), &w.pools()), before);

    // FIFO positions and the sequence counter survive: a message enqueued after the reopen
    // at the same instant goes behind the old ones.
    let late = enqueue_new(&q, a, "late");
    let mut order = Vec::new();
    while let Some(r) = q.reserve(a, &ReserveFilter::any()).unwrap() {
        order.push(r.message.message_id);
    }
    assert_eq!(order, vec![w.twice, w.visible, late]);
    assert_clean(&q);

    // The ack of the pre-restart reservation works after the restart.
    assert_eq!(
        q.ack(a, w.reserved, &w.reservation.reservation_token)
            .unwrap()
            .status,
        OpStatus::Accepted
    );
    drop(q);

    // And a second reopen still agrees.
    let q = open(dir.path(), &clock);
    assert_eq!(q.read_message(a, w.reserved).unwrap(), None);
    assert_eq!(q.read_wakeup_sequence(a).unwrap(), before.sequences[0] + 1);
    assert_clean(&q);
}

#[test]
fn wake_sequences_continue_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let pool = uuid();
    {
        let q = open(dir.path(), &clock);
        for _ in 0..5 {
            q.wake_dispatchers(pool).unwrap();
        }
    }
    let q = open(dir.path(), &clock);
    assert_eq!(q.read_wakeup_sequence(pool).unwrap(), 5);
    assert_eq!(
        q.wait_for_wakeup(pool, 4, Some(Duration::ZERO))
            .unwrap()
            .map(|w| w.sequence),
        Some(5)
    );
    enqueue_new(&q, pool, "k");
    assert_eq!(q.read_wakeup_sequence(pool).unwrap(), 6);
}

#[test]
fn lease_that_lapsed_while_closed_is_expired_by_the_next_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let pool = uuid();
    let (id, other, old) = {
        let q = open(dir.path(), &clock);
        let id = enqueue_new(&q, pool, "k");
        let old = reserve_one(&q, pool);
        clock.advance(secs(1));
        let other = enqueue_new(&q, pool, "other");
        (id, other, old)
    };
    clock.advance(secs(60));
    let q = open(dir.path(), &clock);
    let seq = q.read_wakeup_sequence(pool).unwrap();
    assert_eq!(q.read_reservation(pool, id).unwrap(), Some(old.clone()));
    let d = q.reserve_detailed(pool, &ReserveFilter::any()).unwrap();
    assert_eq!(d.expired.redelivered.len(), 1);
    assert_eq!(d.expired.redelivered[0].message_id, id);
    // The expired one went to the back: `other` is handed out first.
    assert_eq!(d.reservation.unwrap().message.message_id, other);
    assert_eq!(q.read_wakeup_sequence(pool).unwrap(), seq + 1);
    let again = reserve_one(&q, pool);
    assert_eq!(again.message.message_id, id);
    assert_eq!(again.message.delivery_count, 2);
    assert_eq!(
        q.ack(pool, id, &old.reservation_token).unwrap().status,
        OpStatus::InvalidToken
    );
    assert_clean(&q);
}

#[test]
fn lease_that_lapsed_while_closed_is_expired_by_the_sweeper() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let pool = uuid();
    let id = {
        let q = open(dir.path(), &clock);
        let id = enqueue_new(&q, pool, "k");
        reserve_one(&q, pool);
        id
    };
    clock.advance(secs(31));
    let q = path_builder(dir.path(), &clock)
        .sweep_interval(Some(Duration::from_millis(10)))
        .open()
        .unwrap();
    // No caller touches the message: the sweeper alone makes it visible and wakes the pool.
    let woke = q
        .wait_for_wakeup(pool, 1, Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(woke.map(|w| w.sequence), Some(2));
    assert!(eventually(Duration::from_secs(30), || {
        q.read_reservation(pool, id).unwrap().is_none()
    }));
    let m = q.read_message(pool, id).unwrap().unwrap();
    assert_eq!(m.delivery_count, 1);
    assert_eq!(m.updated_at, clock.now());
    assert_clean(&q);
}

#[test]
fn with_the_sweeper_off_a_lapsed_lease_stays_until_someone_acts() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let pool = uuid();
    let (id, r) = {
        let q = open(dir.path(), &clock);
        let id = enqueue_new(&q, pool, "k");
        (id, reserve_one(&q, pool))
    };
    clock.advance(secs(31));
    let q = open(dir.path(), &clock); // sweep_interval(None)
    assert_eq!(
        q.wait_for_wakeup(pool, 1, Some(Duration::from_millis(200)))
            .unwrap(),
        None
    );
    assert_eq!(q.read_reservation(pool, id).unwrap(), Some(r.clone()));
    assert_eq!(
        q.ack(pool, id, &r.reservation_token).unwrap().status,
        OpStatus::Expired
    );
    assert_eq!(q.read_wakeup_sequence(pool).unwrap(), 2);
    assert_clean(&q);
}

/// Opens the raw sled database at `path`, retrying while the last handle's background
/// thread still holds the lock.
fn raw_sled(path: &Path) -> sled::Db {
    let started = std::time::Instant::now();
    loop {
        match sled::Config::new().path(path).segment_size(8 << 20).open() {
            Ok(db) => return db,
            Err(e) if started.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("raw open: {e}"),
        }
    }
}

/// Writes layout byte `byte` into the database at `path` directly, lets `then` change more,
/// and flushes.
fn set_layout(path: &Path, byte: u8, then: impl FnOnce(&sled::Db)) {
    let db = raw_sled(path);
    db.open_tree("meta")
        .unwrap()
        .insert("format", &[byte])
        .unwrap();
    then(&db);
    db.flush().unwrap();
}

/// The layout byte(s) a database records.
fn stored_layout(db: &sled::Db) -> Option<Vec<u8>> {
    db.open_tree("meta")
        .unwrap()
        .get("format")
        .unwrap()
        .map(|v| v.to_vec())
}

// Migrations from layouts 1–4 need databases in the old layouts, which only the crate can
// write (old record bytes, old tree names): they are tested in `src/migrate.rs`.

/// A new database records layout 5, whose records live in `messages.5` by enqueue order;
/// none of layout 4's trees exists.
#[test]
fn a_new_database_records_layout_5() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let clock = clock();
    {
        let q = path_builder(&path, &clock).open().unwrap();
        enqueue_new(&q, uuid(), "k");
    }
    let db = raw_sled(&path);
    assert_eq!(stored_layout(&db), Some(vec![5u8]));
    let names: Vec<Vec<u8>> = db.tree_names().iter().map(|n| n.to_vec()).collect();
    assert!(names.contains(&b"messages.5".to_vec()), "{names:?}");
    assert!(names.contains(&b"message_ids".to_vec()), "{names:?}");
    assert!(!names.contains(&b"messages".to_vec()), "{names:?}");
    assert_eq!(db.open_tree("messages.5").unwrap().len(), 1);
}

/// A batch journal that does not decode is refused with a typed error naming it, before
/// anything is written.
#[test]
fn an_undecodable_batch_journal_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    drop(Queue::open(&path).unwrap());
    for bad in [
        &[9u8][..],
        &[1, 0, 0, 0, 1, 0][..],
        &[1, 0, 0, 0, 0, 77][..],
    ] {
        set_layout(&path, 3, |db| {
            db.open_tree("meta")
                .unwrap()
                .insert("journal", bad)
                .unwrap();
        });
        let e = Queue::open(&path).unwrap_err();
        assert!(matches!(e, cleanup_queue::Error::Corrupted { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("`meta`") && text.contains("journal"),
            "{text}"
        );
    }
}

/// Any other layout byte is refused with a typed error naming the tree and key.
#[test]
fn an_unknown_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    drop(Queue::open(&path).unwrap());
    set_layout(&path, 9, |_| {});
    let e = Queue::open(&path).unwrap_err();
    assert!(matches!(e, cleanup_queue::Error::Corrupted { .. }), "{e:?}");
    assert!(e.to_string().contains("unsupported database format"), "{e}");
    // An empty or longer layout value, even one starting with an old layout byte, is no
    // layout either (and never a panic).
    for bad in [&[][..], &[4, 0][..], &[5, 5][..]] {
        set_layout(&path, 9, |db| {
            db.open_tree("meta").unwrap().insert("format", bad).unwrap();
        });
        let e = Queue::open(&path).unwrap_err();
        assert!(
            e.to_string().contains("unsupported database format"),
            "{bad:?}: {e}"
        );
    }
}

/// With a small checkpoint size the write-ahead log checkpoints every few operations and
/// starts over (its file stays at one 1 MiB step), and the state reopens exactly; a size
/// under 4 KiB is refused.
#[test]
fn frequent_checkpoints_keep_the_log_small_and_reopen_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let clock = clock();
    let pool = uuid();
    let open = || {
        path_builder(&path, &clock)
            .durability(cleanup_queue::Durability::Fsync)
            .wal_checkpoint_bytes(4096)
            .open()
            .unwrap()
    };
    let (kept, acked) = {
        let q = open();
        let mut kept = Vec::new();
        let mut acked = Vec::new();
        // About 3 MiB of records: without checkpoints the file would grow past 1 MiB.
        for i in 0..5000 {
            let id = enqueue_new(&q, pool, &format!("k{i}"));
            if i % 3 == 0 {
                let r = reserve_one(&q, pool);
                let res = q
                    .ack(pool, r.message.message_id, &r.reservation_token)
                    .unwrap();
                assert_eq!(res.status, OpStatus::Accepted);
                acked.push(r.message.message_id);
            }
            kept.push(id);
        }
        let log = std::fs::metadata(path.join("wal")).unwrap().len();
        assert_eq!(log, 1 << 20, "the log started over instead of growing");
        (kept, acked)
    };
    let q = open();
    assert_clean(&q);
    for id in &kept {
        let present = q.read_message(pool, *id).unwrap().is_some();
        assert_eq!(present, !acked.contains(id), "{id}");
    }
    assert_eq!(
        q.read_wakeup_sequence(pool).unwrap(),
        5000,
        "one wake per enqueue"
    );
    drop(q);
    let e = path_builder(&path, &clock)
        .wal_checkpoint_bytes(4095)
        .open()
        .unwrap_err();
    assert!(matches!(e, cleanup_queue::Error::Config(_)), "{e:?}");
}
