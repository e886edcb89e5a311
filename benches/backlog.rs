//! How the hot paths scale with what the database holds.
//!
//! - `reserve_ack_backlog/{fsync,buffered_1s}/{0,1000,10000,100000[,1000000]}`: reserve the
//!   head of a pool holding that many visible messages, then ack it (one message is enqueued
//!   untimed before each iteration, so the backlog stays constant). The backlog is built once
//!   per size with `Buffered` and 4 threads, then the database is reopened in the mode
//!   measured. The 1M case runs only with `CLEANUP_QUEUE_BENCH_FULL=1` (it also prints the
//!   RSS at 1M live messages and the disk use per message). Goal: latency at 1M ≤ 1.25× the
//!   latency at 0.
//! - `reserve_ack_nonmatching/{fsync,buffered_1s}/{by_kind,by_queue_no_fallback}`: the same
//!   cycle with 100k messages ahead that the filter excludes (another kind; another work queue,
//!   no fallback). Goal: ≤ 1.5× the latency at backlog 0.
//! - `empty_reserve/{any,kind,queue_no_fallback}`: a reserve that finds nothing (nothing
//!   visible, no lease due) in a pool with 100k acked tombstones and 10k dead letters, durable
//!   (`Fsync`) mode: the dispatcher's most frequent call. Goal: ≤ 5 µs.
//!   `empty_reserve/finds_nothing_check`: `Queue::reserve_finds_nothing` on the same pool
//!   (the lock-free check the Prefect plug-in makes before leaving the event loop).
//! - `empty_expire_leases/100`: the reconciler's `expire_leases(100, None)` when nothing is
//!   due, same database.
//! - `expire_leases/1000`: 1,000 due leases expired by one `expire_leases(1000, None)` call,
//!   durable (`Fsync`); a manual clock moves past the lease between iterations (the 1,000
//!   reservations are made untimed, from 4 threads). Goal: ≤ 5 ms.

mod common;

use std::time::{Duration, Instant};

use cleanup_queue::{CleanupKind, Durability, ManualClock, Queue, ReserveFilter};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use uuid::Uuid;

use common::{build_backlog, db_path, human_bytes, message, open, scaled, CpuAccount, BUFFERED};

const A: CleanupKind = CleanupKind::CancellingTimeoutTeardown;
const B: CleanupKind = CleanupKind::PendingClaimTeardown;

const MEASURED: [(&str, Durability); 2] = [("fsync", Durability::Fsync), ("buffered_1s", BUFFERED)];

/// Times `reserve(filter)` + `ack` after an untimed enqueue of `refill()`; accounts the
/// measured thread's CPU and run-queue time into `cpu`.
fn reserve_ack(
    b: &mut criterion::Bencher<'_>,
    q: &Queue,
    pool: Uuid,
    filter: &ReserveFilter,
    refill: impl Fn() -> cleanup_queue::NewMessage,
    cpu: &mut CpuAccount,
) {
    b.iter_custom(|iters| {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            q.enqueue(refill()).expect("enqueue");
            let s0 = common::thread_sched_ns();
            let t0 = Instant::now();
            let r = q
                .reserve(pool, filter)
                .expect("reserve")
                .expect("a matching message");
            q.ack(pool, r.message.message_id, &r.reservation_token)
                .expect("ack");
            let wall = t0.elapsed();
            cpu.add(s0, wall);
            total += wall;
        }
        total
    })
}

fn reserve_ack_backlog(c: &mut Criterion) {
    let mut g = c.benchmark_group("reserve_ack_backlog");
    for n in common::backlog_sizes() {
        let ids: Vec<String> = MEASURED
            .iter()
            .map(|(name, _)| format!("reserve_ack_backlog/{name}/{n}"))
            .collect();
        if !common::wants(&ids) {
            continue;
        }
        let pool = Uuid::new_v4();
        let dir = build_backlog(pool, n, A, None);
        let path = db_path(dir.path());
        for (name, mode) in MEASURED {
            let q = open(&path, mode);
            if n >= 1_000_000 && mode == Durability::Fsync {
                memory_report(&q, n);
            }
            let mut cpu = CpuAccount::default();
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                let refill = || message(pool, A, None);
                reserve_ack(b, &q, pool, &ReserveFilter::any(), refill, &mut cpu)
            });
            cpu.report(&format!("reserve_ack_backlog/{name}/{n}"));
        }
    }
    g.finish();
}

/// Prints RSS and disk use with `n` live messages.
fn memory_report(q: &Queue, n: usize) {
    let disk = q.size_on_disk().unwrap_or(0);
    eprintln!(
        "[memory] {n} live messages: VmRSS {} (peak {}), size_on_disk {} = {:.0} B/message",
        human_bytes(common::rss_bytes().unwrap_or(0)),
        human_bytes(common::peak_rss_bytes().unwrap_or(0)),
        human_bytes(disk),
        disk as f64 / n as f64
    );
}

fn reserve_ack_nonmatching(c: &mut Criterion) {
    let ids: Vec<String> = MEASURED
        .iter()
        .flat_map(|(name, _)| {
            ["by_kind", "by_queue_no_fallback"]
                .map(|f| format!("reserve_ack_nonmatching/{name}/{f}"))
        })
        .collect();
    if !common::wants(&ids) {
        return;
    }
    let n = scaled(100_000);
    let pool = Uuid::new_v4();
    let q1 = Uuid::new_v4();
    let q2 = Uuid::new_v4();
    // n messages of kind A in queue Q1, all ahead of what each reserve below may take.
    let dir = build_backlog(pool, n, A, Some(q1));
    let path = db_path(dir.path());
    let mut g = c.benchmark_group("reserve_ack_nonmatching");
    for (name, mode) in MEASURED {
        let q = open(&path, mode);
        let mut cpu = CpuAccount::default();
        g.bench_function(BenchmarkId::new(name, "by_kind"), |b| {
            let filter = ReserveFilter::any().kinds([B]);
            reserve_ack(
                b,
                &q,
                pool,
                &filter,
                || message(pool, B, Some(q1)),
                &mut cpu,
            )
        });
        cpu.report(&format!("reserve_ack_nonmatching/{name}/by_kind"));
        let mut cpu = CpuAccount::default();
        g.bench_function(BenchmarkId::new(name, "by_queue_no_fallback"), |b| {
            let filter = ReserveFilter::any().queues([q2], false);
            reserve_ack(
                b,
                &q,
                pool,
                &filter,
                || message(pool, A, Some(q2)),
                &mut cpu,
            )
        });
        cpu.report(&format!(
            "reserve_ack_nonmatching/{name}/by_queue_no_fallback"
        ));
    }
    g.finish();
}

/// A pool with `tombstones` acked messages and `dead` dead letters, nothing visible or
/// reserved; built with `Buffered`.
fn build_graveyard(pool: Uuid, tombstones: usize, dead: usize) -> tempfile::TempDir {
    let dir = common::tempdir();
    let path = db_path(dir.path());
    let started = Instant::now();
    let q = common::builder(&path, BUFFERED)
        .sweep_interval(None)
        .max_delivery_attempts(1)
        .open()
        .expect("open");
    common::fill(&q, pool, tombstones + dead, A, None);
    std::thread::scope(|s| {
        for t in 0..4 {
            let q = &q;
            let share = (tombstones + dead) / 4 + usize::from(t < (tombstones + dead) % 4);
            s.spawn(move || {
                for i in 0..share {
                    let r = q
                        .reserve(pool, &ReserveFilter::any())
                        .expect("reserve")
                        .expect("visible");
                    let id = r.message.message_id;
                    if i * 4 + t < dead {
                        // max_delivery_attempts = 1: a release dead-letters it.
                        q.release(pool, id, &r.reservation_token, "bench")
                            .expect("release");
                    } else {
                        q.ack(pool, id, &r.reservation_token).expect("ack");
                    }
                }
            });
        }
    });
    eprintln!(
        "[setup] {tombstones} tombstones + {dead} dead letters built in {:.1?}",
        started.elapsed()
    );
    drop(q);
    dir
}

fn empty_reserve(c: &mut Criterion) {
    if !common::wants(&[
        "empty_reserve/any",
        "empty_reserve/kind",
        "empty_reserve/queue_no_fallback",
        "empty_reserve/finds_nothing_check",
        "empty_expire_leases/100",
    ]) {
        return;
    }
    let pool = Uuid::new_v4();
    let dir = build_graveyard(pool, scaled(100_000), scaled(10_000));
    let q = open(&db_path(dir.path()), Durability::Fsync);
    let queue = Uuid::new_v4();
    let mut g = c.benchmark_group("empty_reserve");
    for (name, filter) in [
        ("any", ReserveFilter::any()),
        ("kind", ReserveFilter::any().kinds([B])),
        (
            "queue_no_fallback",
            ReserveFilter::any().queues([queue], false),
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| assert!(q.reserve(pool, &filter).expect("reserve").is_none()))
        });
    }
    // The lock-free check a caller can make first (the Prefect plug-in does).
    g.bench_function("finds_nothing_check", |b| {
        b.iter(|| {
            assert!(q
                .reserve_finds_nothing(pool, &ReserveFilter::any())
                .expect("check"))
        })
    });
    g.finish();
    let mut g = c.benchmark_group("empty_expire_leases");
    g.bench_function("100", |b| {
        b.iter(|| assert!(q.expire_leases(100, None).expect("expire").is_empty()))
    });
    g.finish();
}

fn expire_leases(c: &mut Criterion) {
    if !common::wants(&["expire_leases/fsync/1000"]) {
        return;
    }
    const K: usize = 1_000;
    let dir = common::tempdir();
    let clock = ManualClock::starting_now();
    let q = common::open_manual(&db_path(dir.path()), Durability::Fsync, &clock);
    let pool = Uuid::new_v4();
    common::fill(&q, pool, K, A, None);
    let mut g = c.benchmark_group("expire_leases");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(100));
    g.measurement_time(Duration::from_millis(200));
    let mut cpu = CpuAccount::default();
    g.bench_function(BenchmarkId::new("fsync", K), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Untimed: reserve all K (group commit from 4 threads), then pass the lease.
                std::thread::scope(|s| {
                    for _ in 0..4 {
                        s.spawn(|| {
                            while q
                                .reserve(pool, &ReserveFilter::any())
                                .expect("reserve")
                                .is_some()
                            {}
                        });
                    }
                });
                clock.advance(q.policy().lease + Duration::from_secs(1));
                // Untimed: the setup's batches (and the last expiry's) reach the trees.
                q.wait_applied().expect("applied");
                let s0 = common::thread_sched_ns();
                let t0 = Instant::now();
                let expired = q.expire_leases(K, None).expect("expire");
                let wall = t0.elapsed();
                cpu.add(s0, wall);
                total += wall;
                assert_eq!(expired.len(), K);
            }
            total
        })
    });
    g.finish();
    cpu.report("expire_leases/fsync/1000");
}

fn load(_: &mut Criterion) {
    common::print_load("backlog");
}

criterion_group! {
    name = backlog;
    config = common::config();
    targets = load, empty_reserve, expire_leases, reserve_ack_nonmatching, reserve_ack_backlog, load
}
criterion_main!(backlog);
