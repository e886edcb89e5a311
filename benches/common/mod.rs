//! Helpers shared by the bench binaries: the criterion configuration, run-size switches,
//! realistic messages, fast backlog construction and small statistics.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cleanup_queue::{CleanupKind, Durability, ManualClock, NewMessage, Queue, QueueBuilder};
use criterion::Criterion;
use serde_json::json;
use uuid::Uuid;

/// Short warm-up and measurement so that the whole `cargo bench` takes minutes on 2 cores.
pub fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(1000))
        .measurement_time(Duration::from_millis(2500))
        .sample_size(15)
}

/// `cargo test --benches` (or `cargo bench -- --test`): criterion runs every routine once.
/// The setup outside the routines (backlogs) shrinks to stay fast.
pub fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

/// `cargo bench -- --quick`: criterion's own quick mode, and smaller backlogs (≤ 10k).
pub fn quick_mode() -> bool {
    std::env::args().any(|a| a == "--quick")
        || std::env::var("CLEANUP_QUEUE_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// `CLEANUP_QUEUE_BENCH_FULL=1`: also the 1M backlog.
pub fn full_mode() -> bool {
    std::env::var("CLEANUP_QUEUE_BENCH_FULL").is_ok_and(|v| v == "1")
}

/// Whether criterion's name filter (the positional arguments of `cargo bench -- FILTER`)
/// selects one of the benchmark ids `ids`, so that an expensive setup is skipped when it
/// cannot. A filter is treated as a plain substring of the id (criterion takes a regex;
/// plain names and name fragments behave the same in both).
pub fn wants<S: AsRef<str>>(ids: &[S]) -> bool {
    const WITH_VALUE: [&str; 15] = [
        "--save-baseline",
        "--baseline",
        "--load-baseline",
        "--sample-size",
        "--warm-up-time",
        "--measurement-time",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--profile-time",
        "--color",
        "--format",
        "--output-format",
        "--plotting-backend",
    ];
    let mut filters = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if WITH_VALUE.contains(&a.as_str()) {
            args.next();
        } else if !a.starts_with('-') {
            filters.push(a);
        }
    }
    filters.is_empty()
        || ids
            .iter()
            .any(|id| filters.iter().any(|f| id.as_ref().contains(f.as_str())))
}

/// Caps a backlog size for the quick and test paths.
pub fn scaled(n: usize) -> usize {
    if test_mode() {
        n.min(1_000)
    } else if quick_mode() {
        n.min(10_000)
    } else {
        n
    }
}

/// The backlog sizes of `reserve_ack_backlog` and `limits/sled_fifo_backlog`: 0, 1k, 10k,
/// 100k, and 1M with `CLEANUP_QUEUE_BENCH_FULL=1` (capped by `scaled`).
pub fn backlog_sizes() -> Vec<usize> {
    let mut sizes = vec![0, 1_000, 10_000, 100_000];
    if full_mode() {
        sizes.push(1_000_000);
    }
    let mut out: Vec<usize> = sizes.into_iter().map(scaled).collect();
    out.dedup();
    out
}

/// The three durability modes, with the names used in benchmark ids.
pub const MODES: [(&str, Durability); 3] = [
    ("fsync", Durability::Fsync),
    ("flush", Durability::Flush),
    (
        "buffered_1s",
        Durability::Buffered {
            every: Duration::from_secs(1),
        },
    ),
];

pub const BUFFERED: Durability = Durability::Buffered {
    every: Duration::from_secs(1),
};

/// A fresh directory under the system temp dir (on the same disk as the raw limits).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("cleanup-queue-bench-")
        .tempdir()
        .expect("temp dir")
}

/// The database directory inside a temp dir.
pub fn db_path(dir: &Path) -> PathBuf {
    dir.join("db")
}

/// A builder at `path` with the production defaults except durability (and no sweeper when
/// a manual clock drives the test).
/// `CLEANUP_QUEUE_BENCH_CACHE_MIB` overrides the page cache size (default: the engine's).
pub fn builder(path: &Path, durability: Durability) -> QueueBuilder {
    let q = Queue::builder(path).durability(durability);
    match std::env::var("CLEANUP_QUEUE_BENCH_CACHE_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(mib) => q.cache_capacity(mib << 20),
        None => q,
    }
}

pub fn open(path: &Path, durability: Durability) -> Queue {
    builder(path, durability).open().expect("open queue")
}

pub fn open_manual(path: &Path, durability: Durability, clock: &ManualClock) -> Queue {
    builder(path, durability)
        .clock(clock.clone())
        .sweep_interval(None)
        .max_delivery_attempts(1_000_000)
        .open()
        .expect("open queue")
}

/// A message shaped like Prefect's: a UUID id, a `prefect:<kind>:<run>` idempotency key
/// and a two-field target.
pub fn message(pool: Uuid, kind: CleanupKind, queue: Option<Uuid>) -> NewMessage {
    let id = Uuid::new_v4();
    let run = Uuid::new_v4();
    let m = NewMessage::new(
        pool,
        id,
        format!("prefect:{}:{run}", kind.as_str()),
        kind,
        json!({"flow_run_id": run.to_string(), "infrastructure_pid": format!("k8s:job-{run}")}),
    );
    match queue {
        Some(q) => m.work_queue(q),
        None => m,
    }
}

/// Enqueues `n` messages from 4 threads (the writer lock serialises the transactions; the
/// threads overlap validation, encoding and, in durable modes, group commit).
pub fn fill(queue: &Queue, pool: Uuid, n: usize, kind: CleanupKind, work_queue: Option<Uuid>) {
    const THREADS: usize = 4;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let share = n / THREADS + usize::from(t < n % THREADS);
            s.spawn(move || {
                for _ in 0..share {
                    queue
                        .enqueue(message(pool, kind, work_queue))
                        .expect("enqueue");
                }
            });
        }
    });
}

/// Builds a database of `n` visible messages in `pool` with `Durability::Buffered` (fast),
/// closes it (sled flushes on drop) and returns the directory for reopening in any mode.
pub fn build_backlog(
    pool: Uuid,
    n: usize,
    kind: CleanupKind,
    work_queue: Option<Uuid>,
) -> tempfile::TempDir {
    let dir = tempdir();
    let q = builder(&db_path(dir.path()), BUFFERED)
        .sweep_interval(None)
        .open()
        .expect("open queue");
    let started = std::time::Instant::now();
    fill(&q, pool, n, kind, work_queue);
    eprintln!(
        "[setup] backlog of {n} built in {:.1?} ({} on disk)",
        started.elapsed(),
        human_bytes(q.size_on_disk().unwrap_or(0))
    );
    drop(q);
    dir
}

/// The resident set size of this process, from `/proc/self/status` (`VmRSS`), in bytes.
pub fn rss_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

/// The peak resident set size (`VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn human_bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20))
    } else if b >= 1 << 10 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// Percentiles of latency samples, printed as one line.
pub fn report_percentiles(name: &str, samples: &mut [Duration]) {
    if samples.is_empty() {
        return;
    }
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    eprintln!(
        "[latency] {name}: n={} p50={:.1?} p90={:.1?} p99={:.1?} max={:.1?}",
        samples.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        samples[samples.len() - 1]
    );
}

/// This thread's time on a CPU and time runnable but waiting for one, in nanoseconds
/// (`/proc/thread-self/schedstat`). On-CPU time is what an operation costs regardless of how
/// busy the machine is; the run-queue wait is what the load added to the wall time.
pub fn thread_sched_ns() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let mut f = s.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
    (f.next().unwrap_or(0), f.next().unwrap_or(0))
}

/// CPU time of the whole process (every thread, the storage library's IO threads too) in
/// nanoseconds, from `/proc/self/stat` (`utime + stime`, 10 ms ticks: use over many
/// operations).
pub fn process_cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit_once(')').map_or("", |(_, rest)| rest);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks * 10_000_000
}

/// Accumulates on-CPU and run-queue time of the measured thread over many operations.
#[derive(Default)]
pub struct CpuAccount {
    ops: u64,
    oncpu: u64,
    runq: u64,
    wall: Duration,
}

impl CpuAccount {
    /// Adds one measured span that started at `start` (from [`thread_sched_ns`]).
    pub fn add(&mut self, start: (u64, u64), wall: Duration) {
        let end = thread_sched_ns();
        self.ops += 1;
        self.oncpu += end.0.saturating_sub(start.0);
        self.runq += end.1.saturating_sub(start.1);
        self.wall += wall;
    }

    /// Prints the averages per operation.
    pub fn report(&self, name: &str) {
        if self.ops == 0 {
            return;
        }
        let per = |ns: u64| Duration::from_nanos(ns / self.ops);
        eprintln!(
            "[cpu] {name}: n={} wall {:.1?}/op = on-cpu {:.1?} + run-queue wait {:.1?} + blocked (I/O, locks) {:.1?}",
            self.ops,
            self.wall / self.ops as u32,
            per(self.oncpu),
            per(self.runq),
            (self.wall / self.ops as u32)
                .saturating_sub(per(self.oncpu))
                .saturating_sub(per(self.runq)),
        );
    }
}

/// The machine load, to print next to the numbers.
pub fn print_load(what: &str) {
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        eprintln!("[load] {what}: loadavg {}", l.trim());
    }
}
