//! A small producer / dispatcher / worker round on a temporary database.
//!
//! `cargo run --release --example quickstart`

use std::time::{Duration, Instant};

use cleanup_queue::{CleanupKind, NewMessage, OpStatus, Queue, ReserveFilter};
use serde_json::json;
use uuid::Uuid;

const MESSAGES: usize = 200;

fn main() -> Result<(), cleanup_queue::Error> {
    let dir = tempdir();
    let queue = Queue::builder(&dir).open()?;
    println!("database: {} (durability: fsync)", dir.display());
    let pool = Uuid::new_v4();
    let started = Instant::now();

    // The dispatcher blocks on the pool's wakeup sequence instead of polling, reserves what
    // is visible, and plays the worker: every tenth message is released once, then acked.
    let dispatcher = {
        let queue = queue.clone();
        std::thread::spawn(
            move || -> Result<(usize, usize, usize), cleanup_queue::Error> {
                let (mut acked, mut released, mut wakeups, mut seen) = (0, 0, 0, 0);
                while acked < MESSAGES {
                    match queue.wait_for_wakeup(pool, seen, Some(Duration::from_secs(5)))? {
                        Some(w) => {
                            seen = w.sequence;
                            wakeups += 1;
                        }
                        None => break,
                    }
                    while let Some(r) = queue.reserve(pool, &ReserveFilter::any())? {
                        let id = r.message.message_id;
                        let redeliver = r.message.delivery_count == 1
                            && r.message.data["n"].as_u64().is_some_and(|n| n % 10 == 0);
                        let result = if redeliver {
                            released += 1;
                            queue.release(pool, id, &r.reservation_token, "worker_busy")?
                        } else {
                            acked += 1;
                            queue.ack(pool, id, &r.reservation_token)?
                        };
                        assert_eq!(result.status, OpStatus::Accepted);
                    }
                }
                Ok((acked, released, wakeups))
            },
        )
    };

    let mut duplicates = 0;
    for n in 0..MESSAGES {
        let m = NewMessage::new(
            pool,
            Uuid::new_v4(),
            format!("prefect:cancelling_timeout_teardown.v1:run-{n}"),
            CleanupKind::CancellingTimeoutTeardown,
            json!({"flow_run_id": Uuid::new_v4().to_string(), "infrastructure_pid": format!("k8s:job-{n}")}),
        )
        .data(json!({ "n": n }));
        queue.enqueue(m.clone())?;
        // Producers retry; an exact duplicate is answered with the stored message.
        if n % 10 == 0 && queue.enqueue_detailed(m)?.duplicate {
            duplicates += 1;
        }
    }
    let (acked, released, wakeups) = dispatcher.join().expect("dispatcher thread")?;
    let elapsed = started.elapsed();
    let ops = MESSAGES + duplicates + 2 * acked + 2 * released;

    println!(
        "enqueued {MESSAGES} messages; {duplicates} retried enqueues were answered as duplicates"
    );
    println!(
        "dispatcher woke {wakeups} times (wakeup sequence {})",
        queue.read_wakeup_sequence(pool)?
    );
    println!("acked {acked}; released {released} once and redelivered them");
    println!("integrity violations: {}", queue.check_integrity()?.len());
    println!(
        "{ops} durable operations in {elapsed:.2?} ({:.0}/s, each on disk before it returned)",
        ops as f64 / elapsed.as_secs_f64()
    );
    drop(queue);
    let _ = std::fs::remove_dir_all(&dir);
    if acked != MESSAGES {
        eprintln!("not every message was acked");
        std::process::exit(1);
    }
    Ok(())
}

fn tempdir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cleanup-queue-quickstart-{}", Uuid::new_v4()))
}
