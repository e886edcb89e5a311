//! The background sweeper: with a manual clock it expires leases and prunes tombstones
//! without any caller; `sweep_interval(None)` switches it off; dropping the last `Queue`
//! clone stops and joins it (so the database can be reopened at once).

mod common;

use std::sync::Arc;
use std::time::Duration;

use cleanup_queue::{Clock, Error, ManualClock, OpStatus, Policy, Queue, ReserveFilter, Timestamp};
use common::*;

const TICK: Duration = Duration::from_millis(10);
const DEADLINE: Duration = Duration::from_secs(30);

fn swept(clock: &ManualClock) -> Queue {
    temp_builder(clock)
        .sweep_interval(Some(TICK))
        .open()
        .unwrap()
}

#[test]
fn sweeper_expires_a_lapsed_lease_without_any_caller() {
    let c = clock();
    let q = swept(&c);
    let pool = uuid();
    let id = enqueue_new(&q, pool, "k");
    let r = reserve_one(&q, pool);
    // Not due yet: several ticks pass and nothing changes.
    std::thread::sleep(TICK * 10);
    assert_eq!(q.read_reservation(pool, id).unwrap(), Some(r.clone()));

    c.advance(secs(30)); // exactly due
    let w = q.wait_for_wakeup(pool, 1, Some(DEADLINE)).unwrap();
    assert_eq!(w.map(|w| w.sequence), Some(2));
    assert!(eventually(DEADLINE, || q
        .read_reservation(pool, id)
        .unwrap()
        .is_none()));
    let m = q.read_message(pool, id).unwrap().unwrap();
    assert_eq!(m.delivery_count, 1);
    assert_eq!(
        q.ack(pool, id, &r.reservation_token).unwrap().status,
        OpStatus::NotCurrent
    );
    assert_clean(&q);
}

#[test]
fn sweeper_dead_letters_at_max_attempts() {
    let c = clock();
    let q = swept(&c);
    q.set_policy(with_max(1)).unwrap();
    let pool = uuid();
    let id = enqueue_new(&q, pool, "k");
    let r = reserve_one(&q, pool);
    c.advance(secs(31));
    assert!(eventually(DEADLINE, || q
        .read_dead_letter(pool, id)
        .unwrap()
        .is_some()));
    let dl = q.read_dead_letter(pool, id).unwrap().unwrap();
    assert_eq!(dl.reservation_token.as_deref(), Some(&*r.reservation_token));
    assert_eq!(dl.lease_expires_at, Some(r.lease_expires_at));
    assert_eq!(dl.release_reason, None);
    assert_eq!(dl.final_delivery_count, 1);
    assert_eq!(
        q.read_wakeup_sequence(pool).unwrap(),
        1,
        "a DLQ move never wakes"
    );
    assert_clean(&q);
}

#[test]
fn sweeper_works_through_more_than_one_batch() {
    let c = clock();
    let q = temp_builder(&c)
        .sweep_interval(Some(TICK))
        .sweep_batch(2)
        .open()
        .unwrap();
    let pools = uuids(3);
    let mut ids = Vec::new();
    for (i, p) in pools.iter().enumerate() {
        for j in 0..5 {
            ids.push((*p, enqueue_new(&q, *p, &format!("k{i}-{j}"))));
        }
        for _ in 0..5 {
            reserve_one(&q, *p);
        }
    }
    c.advance(secs(60));
    assert!(eventually(DEADLINE, || ids
        .iter()
        .all(|(p, id)| q.read_reservation(*p, *id).unwrap().is_none())));
    for p in &pools {
        let mut n = 0;
        while q.reserve(*p, &ReserveFilter::any()).unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 5);
    }
    assert_clean(&q);
}

#[test]
fn sweeper_prunes_expired_tombstones_only() {
    let c = clock();
    let q = swept(&c);
    let pool = uuid();
    let old = enqueue_new(&q, pool, "old");
    let r = reserve_one(&q, pool);
    q.ack(pool, old, &r.reservation_token).unwrap();
    c.advance(secs(10));
    let young = enqueue_new(&q, pool, "young");
    let r = reserve_one(&q, pool);
    q.ack(pool, young, &r.reservation_token).unwrap();
    c.advance(secs(10)); // old completed 20 s ago, young 10 s ago

    // Under a 15 s retention the sweeper may prune `old` but not `young`. Pruning is seen
    // by switching retention off: a pruned key is free, an unpruned one is taken again.
    let pruned = eventually(DEADLINE, || {
        q.set_policy(with_retention(secs(15))).unwrap();
        std::thread::sleep(TICK * 3);
        q.set_policy(Policy::default()).unwrap();
        !q.enqueue_detailed(msg(pool, uuid(), "old"))
            .unwrap()
            .duplicate
    });
    assert!(pruned, "the sweeper never pruned the expired tombstone");
    let d = q.enqueue_detailed(msg(pool, uuid(), "young")).unwrap();
    assert!(d.duplicate, "the live tombstone was pruned");
    assert_eq!(d.message.message_id, young);
    assert_clean(&q);
}

#[test]
fn sweeper_never_prunes_without_a_retention() {
    let c = clock();
    let q = swept(&c);
    let pool = uuid();
    let id = enqueue_new(&q, pool, "k");
    let r = reserve_one(&q, pool);
    q.ack(pool, id, &r.reservation_token).unwrap();
    c.advance(Duration::from_secs(365 * 86_400));
    std::thread::sleep(TICK * 10);
    let d = q.enqueue_detailed(msg(pool, uuid(), "k")).unwrap();
    assert!(d.duplicate);
    assert_eq!(d.message.message_id, id);
}

#[test]
fn sweep_interval_none_means_nothing_expires_on_its_own() {
    let c = clock();
    let q = temp_builder(&c).open().unwrap(); // sweep_interval(None)
    q.set_policy(with_retention(Duration::ZERO)).unwrap();
    let pool = uuid();
    let acked = enqueue_new(&q, pool, "acked");
    let r = reserve_one(&q, pool);
    q.ack(pool, acked, &r.reservation_token).unwrap();
    let id = enqueue_new(&q, pool, "k");
    let r = reserve_one(&q, pool);
    c.advance(secs(3600));
    assert_eq!(
        q.wait_for_wakeup(pool, 2, Some(Duration::from_millis(200)))
            .unwrap(),
        None
    );
    assert_eq!(q.read_reservation(pool, id).unwrap(), Some(r));
    // The expired tombstone is still stored: with retention off again it takes its key.
    q.set_policy(Policy::default()).unwrap();
    assert!(
        q.enqueue_detailed(msg(pool, uuid(), "acked"))
            .unwrap()
            .duplicate
    );
    // Explicit calls still do the work.
    assert_eq!(q.expire_leases(10, None).unwrap().redelivered.len(), 1);
    assert_clean(&q);
}

#[test]
fn invalid_sweeper_settings_are_refused() {
    let c = clock();
    let err = temp_builder(&c)
        .sweep_interval(Some(Duration::ZERO))
        .open()
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    let err = temp_builder(&c).sweep_batch(0).open().unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
}

/// A clock that reports, through `alive`, whether the engine still holds it: the engine
/// keeps its clock for exactly as long as its shared state (which the sweeper thread also
/// holds) lives.
#[derive(Debug)]
struct TrackedClock {
    clock: ManualClock,
    _alive: Arc<()>,
}

impl Clock for TrackedClock {
    fn now(&self) -> Timestamp {
        self.clock.now()
    }
}

/// Opens the database at `path`. sled's own I/O threads may hold the file lock for a moment
/// after the engine is gone (the engine retries for about 1 s itself); `InUse` is retried
/// here too so a loaded machine cannot flake this. The sweeper join itself is proven
/// without any timing, by the engine letting go of its clock.
fn reopen_soon(open: impl Fn() -> cleanup_queue::Result<Queue>) -> Queue {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        match open() {
            Ok(q) => return q,
            Err(Error::InUse { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("reopen failed: {e:?}"),
        }
    }
}

#[test]
fn dropping_the_last_clone_joins_the_sweeper_and_releases_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    // Two rounds: each refused open below waits out the engine's lock retry (about 1 s).
    for _ in 0..2 {
        let alive = Arc::new(());
        let q = path_builder(dir.path(), &c)
            .clock(TrackedClock {
                clock: c.clone(),
                _alive: alive.clone(),
            })
            .sweep_interval(Some(TICK))
            .open()
            .unwrap();
        let q2 = q.clone();
        let pool = uuid();
        enqueue_new(&q, pool, "k");
        drop(q);
        // A clone is alive: the engine (and its sweeper) still runs and holds the database.
        assert_eq!(Arc::strong_count(&alive), 2);
        let err = path_builder(dir.path(), &c).open().unwrap_err();
        assert!(matches!(err, Error::InUse { .. }), "{err:?}");
        std::thread::sleep(TICK * 3); // let the sweeper tick while only q2 is left
        reserve_one(&q2, pool);
        drop(q2);
        // The drop returned only after the sweeper thread let go of the engine: joined.
        assert_eq!(
            Arc::strong_count(&alive),
            1,
            "the engine outlived its last handle: the sweeper was not joined"
        );
        let q = reopen_soon(|| {
            path_builder(dir.path(), &c)
                .sweep_interval(Some(TICK))
                .open()
        });
        assert!(q.reserve(pool, &ReserveFilter::any()).unwrap().is_none());
        assert_clean(&q);
        drop(q);
    }
}

#[test]
fn sweeper_runs_alongside_caller_traffic() {
    // The sweeper shares the engine with callers: heavy caller traffic alongside ticks.
    let c = clock();
    let q = swept(&c);
    let pool = uuid();
    for i in 0..50 {
        enqueue_new(&q, pool, &format!("k{i}"));
        if let Some(r) = q.reserve(pool, &ReserveFilter::any()).unwrap() {
            if i % 2 == 0 {
                q.ack(pool, r.message.message_id, &r.reservation_token)
                    .unwrap();
            }
        }
        c.advance(secs(7));
    }
    c.advance(secs(60));
    assert!(eventually(DEADLINE, || q
        .expire_leases(100, None)
        .unwrap()
        .is_empty()));
    assert_clean(&q);
}
