//! Single operations, the durability modes, group commit and wakeups.
//!
//! - `enqueue/{fsync,flush,buffered_1s}`: one new message per iteration, one thread. Goal:
//!   durable (fsync / flush) rate ≥ 80 % of `limits/sled_txn/flush_fdatasync` /
//!   `limits/sled_txn/flush` measured in the same run.
//! - `cycle/{fsync,flush,buffered_1s}`: enqueue → reserve → ack of one message, one thread
//!   (Prefect's in-memory backend: ≈8k cycles/s; prefect-redis ≈500/s). Three durable calls.
//! - `group_commit_enqueue/{fsync,flush}/{1,2,8,32}`: that many threads enqueueing into one
//!   queue, reported as operations/s. Goal: 8 threads ≥ 50k durable operations/s; the
//!   ceiling is `limits/sled_batch_flush_fdatasync/8`.
//! - `group_commit_cycle/fsync/{1,2,8,32}`: that many threads each running enqueue → reserve →
//!   ack cycles in their own pool, reported as durable operations/s (3 per cycle).
//! - `wakeup/{buffered_1s,fsync}`: a dispatcher thread blocked in `wait_for_wakeup`; from the
//!   `wake_dispatchers` call to the waiter running (p50 of all samples printed as
//!   `[latency]`). Buffered isolates bump → publish → wake; fsync adds the flush the bump
//!   waits for. Goal: p50 ≤ 20 µs; the floor is `limits/condvar_wakeup`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleanup_queue::{CleanupKind, Durability, Queue, ReserveFilter};
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use uuid::Uuid;

use common::{db_path, message, open, tempdir, MODES};

const KIND: CleanupKind = CleanupKind::CancellingTimeoutTeardown;

fn enqueue(c: &mut Criterion) {
    let mut g = c.benchmark_group("enqueue");
    g.throughput(Throughput::Elements(1));
    for (name, mode) in MODES {
        let dir = tempdir();
        let q = open(&db_path(dir.path()), mode);
        let pool = Uuid::new_v4();
        let mut cpu = common::CpuAccount::default();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let m = message(pool, KIND, None);
                    let (s0, t0) = (common::thread_sched_ns(), Instant::now());
                    q.enqueue(m).expect("enqueue");
                    let wall = t0.elapsed();
                    cpu.add(s0, wall);
                    total += wall;
                }
                total
            })
        });
        cpu.report(&format!("enqueue/{name}"));
    }
    g.finish();
}

/// One enqueue → reserve → ack.
fn one_cycle(q: &Queue, pool: Uuid) {
    q.enqueue(message(pool, KIND, None)).expect("enqueue");
    let r = q
        .reserve(pool, &ReserveFilter::any())
        .expect("reserve")
        .expect("a visible message");
    q.ack(pool, r.message.message_id, &r.reservation_token)
        .expect("ack");
}

fn cycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("cycle");
    g.throughput(Throughput::Elements(1));
    for (name, mode) in MODES {
        let dir = tempdir();
        let q = open(&db_path(dir.path()), mode);
        let pool = Uuid::new_v4();
        g.bench_function(name, |b| b.iter(|| one_cycle(&q, pool)));
    }
    g.finish();
}

/// `threads` threads share `iters` operations; returns the wall time.
fn run_threads(iters: u64, threads: u64, op: impl Fn(usize) + Sync) -> Duration {
    let per = iters.div_ceil(threads);
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let op = &op;
            s.spawn(move || {
                for _ in 0..per {
                    op(t as usize);
                }
            });
        }
    });
    // Scale to exactly `iters` operations.
    started
        .elapsed()
        .mul_f64(iters as f64 / (per * threads) as f64)
}

const THREADS: [u64; 4] = [1, 2, 8, 32];

/// Prints how many transactions shared each flush over the whole bench (warm-up included).
fn report_batching(id: &str, q: &Queue) {
    let s = q.commit_stats();
    println!(
        "[batch] {id}: {} transactions, {} flushes, {:.2} per flush",
        s.transactions,
        s.flushes,
        s.transactions as f64 / s.flushes.max(1) as f64
    );
}

fn group_commit(c: &mut Criterion) {
    let mut g = c.benchmark_group("group_commit_enqueue");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(1));
    for (name, mode) in [MODES[0], MODES[1]] {
        for threads in THREADS {
            let dir = tempdir();
            let q = open(&db_path(dir.path()), mode);
            let pool = Uuid::new_v4();
            g.bench_with_input(BenchmarkId::new(name, threads), &threads, |b, &threads| {
                b.iter_custom(|iters| {
                    run_threads(iters, threads, |_| {
                        q.enqueue(message(pool, KIND, None)).expect("enqueue");
                    })
                })
            });
            report_batching(&format!("group_commit_enqueue/{name}/{threads}"), &q);
        }
    }
    g.finish();

    let mut g = c.benchmark_group("group_commit_cycle");
    g.sampling_mode(SamplingMode::Flat);
    // One cycle = three durable calls.
    g.throughput(Throughput::Elements(3));
    for threads in THREADS {
        let dir = tempdir();
        let q = open(&db_path(dir.path()), Durability::Fsync);
        let pools: Vec<Uuid> = (0..threads).map(|_| Uuid::new_v4()).collect();
        g.bench_with_input(
            BenchmarkId::new("fsync", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| run_threads(iters, threads, |t| one_cycle(&q, pools[t])))
            },
        );
        report_batching(&format!("group_commit_cycle/fsync/{threads}"), &q);
    }
    g.finish();
}

/// Pause between wakeup samples so that the waiter is blocked again (not counted).
const SETTLE: Duration = Duration::from_micros(100);

fn wakeup(c: &mut Criterion) {
    let mut g = c.benchmark_group("wakeup");
    // Only the latency counts towards the measured time, the pause does not: keep it short.
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(200));
    g.measurement_time(Duration::from_millis(500));
    for (name, mode) in [MODES[2], MODES[0]] {
        let dir = tempdir();
        let q = open(&db_path(dir.path()), mode);
        let pool = Uuid::new_v4();
        let base = Instant::now();
        let observed_seq = Arc::new(AtomicU64::new(0));
        let observed_at = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        // Read before the first bump, so the waiter cannot start after it and miss it.
        let initial = q.read_wakeup_sequence(pool).expect("read");
        let waiter = {
            let (q, seq, at, stop) = (
                q.clone(),
                observed_seq.clone(),
                observed_at.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let mut after = initial;
                while !stop.load(Ordering::SeqCst) {
                    if let Some(w) = q
                        .wait_for_wakeup(pool, after, Some(Duration::from_millis(200)))
                        .expect("wait")
                    {
                        at.store(base.elapsed().as_nanos() as u64, Ordering::SeqCst);
                        seq.store(w.sequence, Ordering::SeqCst);
                        after = w.sequence;
                    }
                }
            })
        };
        let (mut samples, mut call_samples) = (Vec::new(), Vec::new());
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t0 = base.elapsed().as_nanos() as u64;
                    let w = q.wake_dispatchers(pool).expect("wake");
                    let returned = base.elapsed().as_nanos() as u64;
                    call_samples.push(Duration::from_nanos(returned.saturating_sub(t0)));
                    let mut spins = 0u32;
                    while observed_seq.load(Ordering::SeqCst) < w.sequence {
                        spins += 1;
                        if spins < 200 {
                            std::hint::spin_loop();
                        } else {
                            std::thread::yield_now();
                        }
                    }
                    let lat =
                        Duration::from_nanos(observed_at.load(Ordering::SeqCst).saturating_sub(t0));
                    samples.push(lat);
                    total += lat;
                    // Let the waiter block again before the next bump.
                    std::thread::sleep(SETTLE);
                }
                total
            })
        });
        stop.store(true, Ordering::SeqCst);
        waiter.join().expect("waiter");
        common::report_percentiles(
            &format!("wakeup/{name} (wake_dispatchers call -> waiter running)"),
            &mut samples,
        );
        common::report_percentiles(
            &format!("wakeup/{name} (wake_dispatchers call -> call returned)"),
            &mut call_samples,
        );
    }
    g.finish();
}

fn load(_: &mut Criterion) {
    common::print_load("operations");
}

criterion_group! {
    name = operations;
    config = common::config();
    targets = load, enqueue, cycle, group_commit, wakeup, load
}
criterion_main!(operations);
