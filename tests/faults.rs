//! Faults during writes (issue 4, item 4), through the storage layer's test hooks.
//!
//! * `inject_write_failure(n)`: the `n`th storage transaction from now fails before
//!   anything is applied. The operation returns an error; the state (in memory and on disk,
//!   after a reopen) is exactly the state before it; the wakeup sequence did not move; the
//!   next operations work.
//! * `inject_flush_failure(n)`: the `n`th durability flush fails. The operation waiting for
//!   it returns an error, every later call reports `Error::Poisoned`, and a reopen shows a
//!   consistent state: the failed operation either fully there or fully absent, and every
//!   operation that returned `Ok` present.
//! * `inject_torn_apply(k)`: the next batch written to disk stops after its journal and `k`
//!   of its writes, which is what a crash at that point leaves on disk. A reopen replays the
//!   journal: the batch is there in full and the state is consistent.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use cleanup_queue::{
    CleanupKind, DeadLetter, Durability, Error, ManualClock, Message, NewMessage, OpStatus, Queue,
    Reservation, ReserveFilter, Timestamp,
};
use serde_json::json;
use uuid::Uuid;

const START: Timestamp = Timestamp::from_micros(1_796_399_700_000_000);
const LEASE: Duration = Duration::from_secs(30);

fn open(path: &Path, clock: &ManualClock, durability: Durability) -> Queue {
    Queue::builder(path)
        .clock(clock.clone())
        .sweep_interval(None)
        .durability(durability)
        .lease(LEASE)
        .max_delivery_attempts(3)
        .completed_retention(Some(Duration::from_secs(60)))
        .open()
        .expect("open")
}

#[derive(Clone, Debug, PartialEq)]
enum View {
    Visible(Message),
    Reserved(Reservation),
    Dead(DeadLetter),
}

/// Everything observable without writing: each message's view and each pool's sequence.
#[derive(Clone, Debug, PartialEq)]
struct Snapshot {
    views: BTreeMap<Uuid, Option<View>>,
    wakes: BTreeMap<Uuid, u64>,
}

fn snapshot(q: &Queue, pool: Uuid, ids: &[Uuid]) -> Snapshot {
    let mut views = BTreeMap::new();
    for id in ids {
        let v = if let Some(r) = q.read_reservation(pool, *id).expect("read") {
            Some(View::Reserved(r))
        } else if let Some(m) = q.read_message(pool, *id).expect("read") {
            Some(View::Visible(m))
        } else {
            q.read_dead_letter(pool, *id).expect("read").map(View::Dead)
        };
        views.insert(*id, v);
    }
    let wakes = BTreeMap::from([(pool, q.read_wakeup_sequence(pool).expect("wake"))]);
    Snapshot { views, wakes }
}

fn msg(pool: Uuid, id: Uuid, key: &str) -> NewMessage {
    NewMessage::new(
        pool,
        id,
        key,
        CleanupKind::CancellingTimeoutTeardown,
        json!({"flow_run_id": key}),
    )
}

fn assert_injected_write(e: &Error) {
    assert!(
        e.to_string().contains("injected write failure"),
        "expected the injected write failure, got {e:?}"
    );
}

fn assert_clean(q: &Queue) {
    let report = q.check_integrity().expect("check_integrity");
    assert!(report.is_empty(), "integrity violations: {report:#?}");
}

/// A database with a visible message `a`, reserved `b` and `d`, and `c` reserved with a
/// lapsed lease (the clock is moved past it). Returns the tokens of b, c, d.
struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    clock: ManualClock,
    pool: Uuid,
    ids: Vec<Uuid>,
    tokens: BTreeMap<char, String>,
}

fn fixture(durability: Durability) -> (Fixture, Queue) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let clock = ManualClock::new(START);
    let q = open(&path, &clock, durability);
    let pool = Uuid::new_v4();
    let mut ids = Vec::new();
    let mut tokens = BTreeMap::new();
    // c first, so it is reserved first and its lease lapses first.
    for name in ['c', 'b', 'd', 'a'] {
        let id = Uuid::new_v4();
        q.enqueue(msg(pool, id, &name.to_string()))
            .expect("enqueue");
        ids.push(id);
        if name != 'a' {
            let r = q
                .reserve(pool, &ReserveFilter::any())
                .expect("reserve")
                .expect("work");
            assert_eq!(r.message.message_id, id);
            tokens.insert(name, r.reservation_token);
        }
        if name == 'c' {
            clock.advance(LEASE / 2);
        }
    }
    // c's lease lapses; b's and d's do not.
    clock.advance(LEASE / 2 + Duration::from_secs(1));
    (
        Fixture {
            _dir: dir,
            path,
            clock,
            pool,
            ids,
            tokens,
        },
        q,
    )
}

impl Fixture {
    fn id(&self, name: char) -> Uuid {
        let i = ['c', 'b', 'd', 'a']
            .iter()
            .position(|n| *n == name)
            .expect("name");
        self.ids[i]
    }
    fn token(&self, name: char) -> &str {
        &self.tokens[&name]
    }
}

type Op = Box<dyn Fn(&Queue, &Fixture) -> Result<(), Error>>;

/// Every mutating operation, each failing at its first storage write.
fn operations() -> Vec<(&'static str, Op)> {
    let fresh = Uuid::from_u128(0xf00d);
    vec![
        (
            "enqueue new",
            Box::new(move |q, f| q.enqueue(msg(f.pool, fresh, "fresh")).map(drop)),
        ),
        (
            "enqueue duplicate of a visible message (a wake only)",
            Box::new(|q, f| q.enqueue(msg(f.pool, f.id('a'), "a")).map(drop)),
        ),
        (
            "reserve (expiry of c, then the reservation)",
            Box::new(|q, f| q.reserve(f.pool, &ReserveFilter::any()).map(drop)),
        ),
        (
            "ack",
            Box::new(|q, f| q.ack(f.pool, f.id('b'), f.token('b')).map(drop)),
        ),
        (
            "release",
            Box::new(|q, f| q.release(f.pool, f.id('d'), f.token('d'), "boom").map(drop)),
        ),
        (
            "renew",
            Box::new(|q, f| q.renew(f.pool, f.id('b'), f.token('b')).map(drop)),
        ),
        (
            "ack of a lapsed lease (the expiry transition)",
            Box::new(|q, f| q.ack(f.pool, f.id('c'), f.token('c')).map(drop)),
        ),
        (
            "expire_leases",
            Box::new(|q, _| q.expire_leases(10, None).map(drop)),
        ),
        (
            "wake_dispatchers",
            Box::new(|q, f| q.wake_dispatchers(f.pool).map(drop)),
        ),
    ]
}

#[test]
fn a_failed_write_changes_nothing_and_the_next_operations_work() {
    for durability in [Durability::Fsync, Durability::Flush] {
        for (name, op) in operations() {
            let (f, q) = fixture(durability);
            let before = snapshot(&q, f.pool, &f.ids);
            let fresh = Uuid::from_u128(0xf00d);
            let mut ids = f.ids.clone();
            ids.push(fresh);

            q.inject_write_failure(1);
            let e = op(&q, &f).expect_err(name);
            assert_injected_write(&e);
            let after_failure = snapshot(&q, f.pool, &f.ids);
            assert_eq!(
                after_failure, before,
                "{name}: a failed write changed the state"
            );
            assert!(
                q.read_message(f.pool, fresh).expect("read").is_none(),
                "{name}"
            );
            assert_clean(&q);

            // The same operation now works, and its wake (if any) is the next number.
            op(&q, &f).unwrap_or_else(|e| panic!("{name}: retry failed: {e}"));
            let done = snapshot(&q, f.pool, &ids);
            assert_ne!(
                done,
                snapshot_with(&before, fresh),
                "{name}: the retry did nothing"
            );
            let seq_before = before.wakes[&f.pool];
            let seq_done = done.wakes[&f.pool];
            assert!(
                seq_done <= seq_before + 1,
                "{name}: the failed attempt consumed a wakeup sequence number ({seq_before} -> {seq_done})"
            );
            // More work goes through.
            let extra = Uuid::new_v4();
            q.enqueue(msg(f.pool, extra, "extra"))
                .expect("enqueue after");
            assert_eq!(q.read_wakeup_sequence(f.pool).expect("seq"), seq_done + 1);
            assert_clean(&q);
            let done = snapshot(&q, f.pool, &ids);
            drop(q);

            let q = open(&f.path, &f.clock, durability);
            assert_clean(&q);
            assert_eq!(
                snapshot(&q, f.pool, &ids),
                done,
                "{name}: the reopened state differs from the state the calls returned"
            );
            assert!(q.read_message(f.pool, extra).expect("read").is_some());
        }
    }
}

fn snapshot_with(s: &Snapshot, id: Uuid) -> Snapshot {
    let mut s = s.clone();
    s.views.insert(id, None);
    s
}

/// `reserve` is two atomic steps in one critical section: the pool's lease expiry, then
/// the reservation. When the second fails, the first stays committed; its wakeup must
/// still be published.
///
/// Postmortem: `reserve` returned early on the second commit's error (`txn.commit()?`)
/// and skipped `finish(first)`, so the expiry's wakeup (stored on disk and in the writer's
/// map) was never published: `read_wakeup_sequence` lagged behind the disk and a
/// dispatcher waiting on the pool slept through the redelivered message until some later
/// wake. Fixed in `Inner::reserve` by finishing the first step before reporting the
/// second step's error.
#[test]
fn reserve_whose_reservation_write_fails_still_publishes_its_expiry_wakeup() {
    let (f, q) = fixture(Durability::Fsync);
    let seq_before = q.read_wakeup_sequence(f.pool).expect("seq");
    q.inject_write_failure(2);
    let e = q
        .reserve(f.pool, &ReserveFilter::any())
        .expect_err("the reservation write fails");
    assert_injected_write(&e);
    // The expiry happened: c is visible again, nothing is reserved by this call.
    let c = q.read_message(f.pool, f.id('c')).expect("read").expect("c");
    assert_eq!(c.delivery_count, 1);
    assert!(q
        .read_reservation(f.pool, f.id('c'))
        .expect("read")
        .is_none());
    assert!(q
        .read_reservation(f.pool, f.id('a'))
        .expect("read")
        .is_none());
    let published = q.read_wakeup_sequence(f.pool).expect("seq");
    assert_eq!(
        published,
        seq_before + 1,
        "the expiry's wakeup was not published"
    );
    assert!(q
        .wait_for_wakeup(f.pool, seq_before, Some(Duration::ZERO))
        .expect("wait")
        .is_some());
    assert_clean(&q);
    let live = snapshot(&q, f.pool, &f.ids);
    drop(q);
    let q = open(&f.path, &f.clock, Durability::Fsync);
    assert_eq!(snapshot(&q, f.pool, &f.ids), live);
    assert_clean(&q);
}

#[test]
fn a_failed_flush_poisons_the_engine_and_a_reopen_is_consistent() {
    for durability in [Durability::Fsync, Durability::Flush] {
        let (f, q) = fixture(durability);
        let before = snapshot(&q, f.pool, &f.ids);
        let fresh = Uuid::new_v4();
        let mut ids = f.ids.clone();
        ids.push(fresh);

        q.inject_flush_failure(1);
        let e = q
            .enqueue(msg(f.pool, fresh, "fresh"))
            .expect_err("the flush fails");
        assert!(
            matches!(e, Error::Poisoned(_)) && e.to_string().contains("injected flush failure"),
            "{e:?}"
        );
        // Every later call, read or write, refuses.
        let poisoned = |r: Result<(), Error>, what: &str| match r {
            Err(Error::Poisoned(why)) => assert!(why.contains("flush"), "{what}: {why}"),
            other => panic!("{what} after a failed flush: {other:?}"),
        };
        poisoned(
            q.enqueue(msg(f.pool, Uuid::new_v4(), "x")).map(drop),
            "enqueue",
        );
        poisoned(
            q.reserve(f.pool, &ReserveFilter::any()).map(drop),
            "reserve",
        );
        poisoned(q.ack(f.pool, f.id('b'), f.token('b')).map(drop), "ack");
        poisoned(q.read_message(f.pool, f.id('a')).map(drop), "read_message");
        poisoned(
            q.read_wakeup_sequence(f.pool).map(drop),
            "read_wakeup_sequence",
        );
        poisoned(q.expire_leases(1, None).map(drop), "expire_leases");
        poisoned(q.wake_dispatchers(f.pool).map(drop), "wake_dispatchers");
        drop(q);

        // The failed enqueue is either all there or not at all.
        let q = open(&f.path, &f.clock, durability);
        assert_clean(&q);
        let after = snapshot(&q, f.pool, &ids);
        let mut without = snapshot_with(&before, fresh);
        without.views.insert(fresh, None);
        if after.views[&fresh].is_none() {
            assert_eq!(after, without, "absent enqueue, yet the state moved");
        } else {
            let mut with = without.clone();
            with.views.insert(fresh, after.views[&fresh].clone());
            *with.wakes.get_mut(&f.pool).expect("pool") += 1;
            assert_eq!(after, with, "present enqueue, but not exactly its effect");
        }
        // And it works.
        let r = q
            .reserve(f.pool, &ReserveFilter::any())
            .expect("reserve")
            .expect("work");
        let done = q
            .ack(f.pool, r.message.message_id, &r.reservation_token)
            .expect("ack");
        assert_eq!(done.status, OpStatus::Accepted);
        assert_clean(&q);
    }
}

/// A flush failure while several callers share one group commit: each caller gets `Ok`
/// (its write was covered by an earlier successful flush) or `Poisoned`; after a reopen
/// every `Ok` is present and the state is consistent.
#[test]
fn a_failed_group_flush_fails_its_waiters_and_keeps_every_returned_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let clock = ManualClock::new(START);
    let q = open(&path, &clock, Durability::Fsync);
    let pool = Uuid::new_v4();
    let threads = 6;
    let per_thread = 12;
    // The third round: group commit shares each flush among up to `threads` callers, so
    // 72 enqueues make at least 12 flushes.
    q.inject_flush_failure(3);
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let q = q.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut results = Vec::new();
                for i in 0..per_thread {
                    let id = Uuid::new_v4();
                    let r = q.enqueue(msg(pool, id, &format!("t{t}-{i}")));
                    results.push((id, r.map(drop)));
                }
                results
            })
        })
        .collect();
    let results: Vec<(Uuid, Result<(), Error>)> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("thread"))
        .collect();
    let ok: Vec<Uuid> = results
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(id, _)| *id)
        .collect();
    for (_, r) in &results {
        if let Err(e) = r {
            assert!(matches!(e, Error::Poisoned(_)), "{e:?}");
        }
    }
    assert!(
        ok.len() < results.len(),
        "the injected flush failure never happened"
    );
    assert!(!ok.is_empty(), "the flushes before the failure succeeded");
    drop(q);
    let q = open(&path, &clock, Durability::Fsync);
    assert_clean(&q);
    for id in &ok {
        assert!(
            q.read_message(pool, *id).expect("read").is_some(),
            "enqueue {id} returned Ok but is gone after the reopen"
        );
    }
    // The wakeup sequence counts exactly the enqueues that are present.
    let present = results
        .iter()
        .filter(|(id, _)| q.read_message(pool, *id).expect("read").is_some())
        .count() as u64;
    assert_eq!(q.read_wakeup_sequence(pool).expect("seq"), present);
}

/// A batch cut off after its journal and any number of its writes (a crash in the middle
/// of applying it) is completed on reopen: the operation is there in full, every index
/// agrees with the records, and the engine works on.
#[test]
fn a_batch_torn_after_its_journal_is_completed_on_reopen() {
    let mut torn = 0;
    for k in 0..8 {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let clock = ManualClock::new(START);
        let pool = Uuid::new_v4();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let q = open(&path, &clock, Durability::Fsync);
        q.enqueue(msg(pool, a, "a")).expect("enqueue");
        q.enqueue(msg(pool, b, "b")).expect("enqueue");
        let r = q
            .reserve(pool, &ReserveFilter::any())
            .expect("reserve")
            .expect("a visible message");
        assert_eq!(r.message.message_id, a);
        // The ack writes its record, drops the lease entry and adds a tombstone. The
        // earlier batches first reach the trees, so that the ack's is the one torn.
        q.wait_applied().expect("applied");
        q.inject_torn_apply(k);
        // In `Fsync` mode the ack is durable once logged and returns; its batch is applied
        // to the trees after it, on the applier thread, and a torn apply shows there.
        let acked = q.ack(pool, a, &r.reservation_token);
        match acked.and_then(|res| q.wait_applied().map(|()| res)) {
            Ok(res) => {
                assert_eq!(res.status, OpStatus::Accepted);
                assert!(
                    k >= 3,
                    "an ack has at least 3 writes, yet {k} did not tear it"
                );
                break;
            }
            Err(e) => {
                assert!(
                    matches!(&e, Error::Poisoned(why) if why.contains("injected torn apply")),
                    "{e:?}"
                );
                torn += 1;
            }
        }
        drop(q);
        let q = open(&path, &clock, Durability::Fsync);
        assert_clean(&q);
        assert_eq!(q.read_message(pool, a).expect("read"), None, "{k}: acked");
        assert_eq!(q.read_reservation(pool, a).expect("read"), None, "{k}");
        let next = q
            .reserve(pool, &ReserveFilter::any())
            .expect("reserve")
            .expect("b is still visible");
        assert_eq!(next.message.message_id, b, "{k}");
        assert_clean(&q);
    }
    assert!(torn >= 3, "only {torn} applies were torn");
}
