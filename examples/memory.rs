//! Memory and disk footprint at a large live backlog (issue goal: RSS ≤ 200 MiB at 1M live
//! messages with a sensible `cache_capacity`).
//!
//! `cargo run --release --example memory -- [messages] [cache_capacity_mib] [dir]`
//! (defaults: 1,000,000 messages, 64 MiB cache, a temporary directory). Builds the backlog
//! with `Buffered` from 4 threads, prints `VmRSS` / `VmHWM` and `size_on_disk / messages`,
//! then reopens the database in `Fsync` mode, runs 1,000 enqueue + reserve + ack cycles on
//! it and prints them again. With `dir`, the database is kept, and a `dir` that already
//! holds one is only reopened: run it twice to measure a fresh process opening a large
//! database (what a restarted server sees), without the build's freed-but-kept heap.

use std::time::{Duration, Instant};

use cleanup_queue::{CleanupKind, Durability, NewMessage, Queue, ReserveFilter};
use serde_json::json;
use uuid::Uuid;

fn main() -> Result<(), cleanup_queue::Error> {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let cache_mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let keep = args.next().map(std::path::PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("cleanup-queue-memory-{}", Uuid::new_v4()))
    });
    // Fixed, so that a second run on a kept database works on the built backlog.
    let pool = Uuid::from_u128(0x6d656d6f_7279_4000_8000_000000000001);
    report("start", None, 0);
    if !dir.exists() {
        build(&dir, n, cache_mib, pool)?;
    }

    let started = Instant::now();
    let queue = Queue::builder(&dir)
        .cache_capacity(cache_mib << 20)
        .open()?;
    println!("reopened (fsync) in {:.1?}", started.elapsed());
    report("after reopen", Some(&queue), n);
    for _ in 0..1_000 {
        queue.enqueue(message(pool))?;
        if let Some(r) = queue.reserve(pool, &ReserveFilter::any())? {
            queue.ack(pool, r.message.message_id, &r.reservation_token)?;
        }
    }
    report("after 1,000 enqueue + reserve + ack", Some(&queue), n);
    drop(queue);
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Enqueues `n` messages into a new database at `dir` from 4 threads.
fn build(
    dir: &std::path::Path,
    n: usize,
    cache_mib: u64,
    pool: Uuid,
) -> Result<(), cleanup_queue::Error> {
    let started = Instant::now();
    let queue = Queue::builder(dir)
        .durability(Durability::Buffered {
            every: Duration::from_secs(1),
        })
        .cache_capacity(cache_mib << 20)
        .open()?;
    std::thread::scope(|s| {
        for t in 0..4 {
            let queue = &queue;
            let share = n / 4 + usize::from(t < n % 4);
            s.spawn(move || -> Result<(), cleanup_queue::Error> {
                for _ in 0..share {
                    queue.enqueue(message(pool))?;
                }
                Ok(())
            });
        }
    });
    println!(
        "built {n} live messages in {:.1?} (cache_capacity {cache_mib} MiB)",
        started.elapsed()
    );
    report("after build", Some(&queue), n);
    Ok(())
}

fn message(pool: Uuid) -> NewMessage {
    let id = Uuid::new_v4();
    let run = Uuid::new_v4();
    NewMessage::new(
        pool,
        id,
        format!("prefect:cancelling_timeout_teardown.v1:{run}"),
        CleanupKind::CancellingTimeoutTeardown,
        json!({"flow_run_id": run.to_string(), "infrastructure_pid": format!("k8s:job-{run}")}),
    )
}

fn report(when: &str, queue: Option<&Queue>, n: usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0.0, |kib| kib as f64 / 1024.0)
    };
    print!(
        "[{when}] VmRSS {:.1} MiB, VmHWM {:.1} MiB",
        field("VmRSS:"),
        field("VmHWM:")
    );
    match queue.map(Queue::size_on_disk) {
        Some(Ok(bytes)) if n > 0 => println!(
            ", size_on_disk {:.1} MiB = {:.0} B/message",
            bytes as f64 / f64::from(1u32 << 20),
            bytes as f64 / n as f64
        ),
        _ => println!(),
    }
}
