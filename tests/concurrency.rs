//! Many threads on one queue: every message delivered exactly once, no token accepted
//! twice, nothing lost; racing enqueues of one key store one message; racing reserves of
//! one message hand out one reservation; racing acks with one token accept once.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use cleanup_queue::{Durability, OpStatus, Queue, ReserveFilter};
use common::*;
use uuid::Uuid;

/// Enqueues `n` messages, then `threads` workers reserve and ack until all are done.
/// Returns what each worker got: (message id, token).
fn reserve_and_ack_all(q: &Queue, pool: Uuid, n: usize, threads: usize) {
    let ids: Vec<Uuid> = (0..n)
        .map(|i| enqueue_new(q, pool, &format!("k{i}")))
        .collect();
    let done = Arc::new(AtomicUsize::new(0));
    let got = Arc::new(Mutex::new(Vec::<(Uuid, String, u32)>::new()));
    let start = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (q, done, got, start) = (q.clone(), done.clone(), got.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let mut mine = Vec::new();
                while done.load(Ordering::SeqCst) < n {
                    match q.reserve(pool, &ReserveFilter::any()).unwrap() {
                        Some(r) => {
                            let id = r.message.message_id;
                            let res = q.ack(pool, id, &r.reservation_token).unwrap();
                            assert_eq!(res.status, OpStatus::Accepted, "{res:?}");
                            // The same token never works twice.
                            let again = q.ack(pool, id, &r.reservation_token).unwrap();
                            assert_eq!(again.status, OpStatus::NotFound);
                            mine.push((id, r.reservation_token, r.message.delivery_count));
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                        None => std::thread::yield_now(),
                    }
                }
                got.lock().unwrap().extend(mine);
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let got = got.lock().unwrap();
    assert_eq!(got.len(), n, "each message delivered exactly once");
    let delivered: HashSet<Uuid> = got.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(delivered.len(), n, "no message delivered twice");
    assert_eq!(delivered, ids.iter().copied().collect::<HashSet<_>>());
    let tokens: HashSet<&str> = got.iter().map(|(_, t, _)| t.as_str()).collect();
    assert_eq!(tokens.len(), n, "tokens are unique");
    assert!(got.iter().all(|(_, _, c)| *c == 1));
    for (id, token, _) in got.iter() {
        assert!(q.read_message(pool, *id).unwrap().is_none());
        assert_eq!(
            q.release(pool, *id, token, "late").unwrap().status,
            OpStatus::NotFound
        );
    }
    assert!(q.reserve(pool, &ReserveFilter::any()).unwrap().is_none());
    assert_clean(q);
}

#[test]
fn eight_threads_deliver_two_thousand_messages_exactly_once() {
    let c = clock();
    let q = temp_builder(&c)
        .durability(Durability::Buffered {
            every: Duration::from_millis(50),
        })
        .open()
        .unwrap();
    reserve_and_ack_all(&q, uuid(), 2000, 8);
}

#[test]
fn flush_durability_delivers_exactly_once() {
    let c = clock();
    let q = temp_builder(&c)
        .durability(Durability::Flush)
        .open()
        .unwrap();
    reserve_and_ack_all(&q, uuid(), 500, 8);
}

#[test]
fn fsync_durability_on_disk_delivers_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let c = clock();
    let q = path_builder(dir.path(), &c)
        .durability(Durability::Fsync)
        .open()
        .unwrap();
    reserve_and_ack_all(&q, uuid(), 120, 4);
    drop(q);
    let q = path_builder(dir.path(), &c).open().unwrap();
    assert!(q.reserve(uuid(), &ReserveFilter::any()).unwrap().is_none());
    assert_clean(&q);
}

#[test]
fn concurrent_enqueues_of_one_key_store_one_message() {
    let (q, _clock) = queue();
    let pool = uuid();
    let threads = 16;
    let start = Arc::new(Barrier::new(threads));
    let results: Vec<_> = (0..threads)
        .map(|_| {
            let (q, start) = (q.clone(), start.clone());
            std::thread::spawn(move || {
                let id = Uuid::new_v4();
                start.wait();
                (id, q.enqueue_detailed(msg(pool, id, "the-key")).unwrap())
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let winners: Vec<_> = results.iter().filter(|(_, e)| !e.duplicate).collect();
    assert_eq!(winners.len(), 1);
    let (winner_id, winner) = winners[0];
    assert_eq!(winner.message.message_id, *winner_id);
    for (id, e) in &results {
        assert_eq!(e.message, winner.message);
        if id != winner_id {
            assert!(q.read_message(pool, *id).unwrap().is_none());
        }
    }
    // One new message plus 15 duplicates of a visible message: 16 wakes.
    assert_eq!(q.read_wakeup_sequence(pool).unwrap(), threads as u64);
    assert_eq!(reserve_one(&q, pool).message.message_id, *winner_id);
    assert!(q.reserve(pool, &ReserveFilter::any()).unwrap().is_none());
    assert_clean(&q);
}

#[test]
fn concurrent_reserves_of_one_message_yield_one_reservation() {
    for _round in 0..5 {
        let (q, _clock) = queue();
        let pool = uuid();
        let id = enqueue_new(&q, pool, "k");
        let threads = 10;
        let start = Arc::new(Barrier::new(threads));
        let got: Vec<_> = (0..threads)
            .map(|_| {
                let (q, start) = (q.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    q.reserve(pool, &ReserveFilter::any()).unwrap()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let some: Vec<_> = got.into_iter().flatten().collect();
        assert_eq!(some.len(), 1);
        assert_eq!(some[0].message.message_id, id);
        assert_eq!(some[0].message.delivery_count, 1);
        assert_eq!(q.read_reservation(pool, id).unwrap(), Some(some[0].clone()));
        assert_clean(&q);
    }
}

#[test]
fn concurrent_acks_with_one_token_accept_once() {
    let (q, _clock) = queue();
    let pool = uuid();
    let id = enqueue_new(&q, pool, "k");
    let r = reserve_one(&q, pool);
    let threads = 10;
    let start = Arc::new(Barrier::new(threads));
    let statuses: Vec<OpStatus> = (0..threads)
        .map(|i| {
            let (q, start, token) = (q.clone(), start.clone(), r.reservation_token.clone());
            std::thread::spawn(move || {
                start.wait();
                match i % 3 {
                    0 => q.ack(pool, id, &token),
                    1 => q.release(pool, id, &token, "race"),
                    _ => q.renew(pool, id, &token),
                }
                .unwrap()
                .status
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    // Renews may all be accepted while the reservation lives; at most one ack or release
    // ends it, and after that every op is not_found (acked) or not_current (released).
    let enders = statuses
        .iter()
        .enumerate()
        .filter(|(i, s)| i % 3 != 2 && **s == OpStatus::Accepted)
        .count();
    assert_eq!(enders, 1, "{statuses:?}");
    for s in &statuses {
        assert!(
            matches!(
                s,
                OpStatus::Accepted | OpStatus::NotFound | OpStatus::NotCurrent
            ),
            "{statuses:?}"
        );
    }
    assert!(q.read_reservation(pool, id).unwrap().is_none());
    assert_clean(&q);
}

#[test]
fn pools_do_not_interfere_under_concurrency() {
    let (q, _clock) = queue();
    let pools = uuids(4);
    let per_pool = 50;
    let workers: Vec<_> = pools
        .iter()
        .map(|&pool| {
            let q = q.clone();
            std::thread::spawn(move || {
                let ids: HashSet<Uuid> = (0..per_pool)
                    .map(|i| enqueue_new(&q, pool, &format!("k{i}")))
                    .collect();
                let mut got = HashSet::new();
                while let Some(r) = q.reserve(pool, &ReserveFilter::any()).unwrap() {
                    assert_eq!(r.message.work_pool_id, pool);
                    q.ack(pool, r.message.message_id, &r.reservation_token)
                        .unwrap();
                    assert!(got.insert(r.message.message_id));
                }
                assert_eq!(got, ids);
                q.read_wakeup_sequence(pool).unwrap()
            })
        })
        .collect();
    for w in workers {
        assert_eq!(w.join().unwrap(), per_pool as u64);
    }
    assert_clean(&q);
}

/// Group commit: a lone caller flushes once per operation (nothing to wait for), concurrent
/// callers share flushes, and `Buffered` mode never flushes in the foreground. Every
/// returned enqueue is readable afterwards either way.
#[test]
fn concurrent_durable_callers_share_flushes_and_a_lone_caller_flushes_once_per_operation() {
    let clock = clock();
    for durability in [Durability::Flush, Durability::Fsync] {
        let dir = tempfile::tempdir().unwrap();
        let q = path_builder(&dir.path().join("db"), &clock)
            .durability(durability)
            .open()
            .unwrap();
        let pool = uuid();
        let before = q.commit_stats();
        for i in 0..20 {
            enqueue_new(&q, pool, &format!("lone{i}"));
        }
        let lone = q.commit_stats();
        assert_eq!(
            lone.transactions - before.transactions,
            20,
            "{durability:?}"
        );
        assert_eq!(lone.flushes - before.flushes, 20, "{durability:?}");

        let threads = 8;
        let per = 50;
        let start = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (q, start) = (q.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    (0..per)
                        .map(|i| enqueue_new(&q, pool, &format!("t{t}-{i}")))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let ids: Vec<Uuid> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let after = q.commit_stats();
        let transactions = after.transactions - lone.transactions;
        let flushes = after.flushes - lone.flushes;
        assert_eq!(transactions, (threads * per) as u64, "{durability:?}");
        assert!(
            flushes < transactions,
            "{durability:?}: {flushes} flushes for {transactions} concurrent transactions"
        );
        for id in ids {
            assert!(q.read_message(pool, id).unwrap().is_some());
        }
    }
    let q = temp_builder(&clock)
        .durability(Durability::Buffered {
            every: Duration::from_millis(50),
        })
        .open()
        .unwrap();
    enqueue_new(&q, uuid(), "k");
    assert_eq!(q.commit_stats().flushes, 0);
}

/// Readers take no lock, and a lookup by id is two reads (`message_ids`, then the record):
/// while one thread keeps re-enqueueing one id whose tombstone has already lapsed (each
/// time a new record at a new position, the old one deleted), reads of that id see the
/// message or nothing, never a corruption error.
#[test]
fn reads_by_id_racing_replacements_of_that_id_see_a_message_or_nothing() {
    let (q, _clock) = queue();
    q.set_policy(with_retention(Duration::ZERO)).unwrap();
    let pool = uuid();
    let id = uuid();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (q, stop) = (q.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rounds = 0u32;
            while !stop.load(Ordering::SeqCst) || rounds < 200 {
                q.enqueue(msg(pool, id, &format!("k{rounds}"))).unwrap();
                let r = q.reserve(pool, &ReserveFilter::any()).unwrap().unwrap();
                assert_eq!(
                    q.ack(pool, id, &r.reservation_token).unwrap().status,
                    OpStatus::Accepted
                );
                rounds += 1;
            }
            rounds
        })
    };
    let mut seen = 0;
    for _ in 0..20_000 {
        if q.read_message(pool, id).unwrap().is_some() {
            seen += 1;
        }
        q.read_dead_letter(pool, id).unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let rounds = writer.join().unwrap();
    assert!(rounds >= 200 && seen > 0, "rounds {rounds}, seen {seen}");
}
