//! Offline compaction (`QueueBuilder::compact`): the state comes back exactly, the database
//! shrinks, and a process killed at any moment of a compaction leaves a database that opens
//! with exactly the state it had.
//!
//! The kill test re-executes this test binary (`current_exe() --exact compact_child`) with
//! [`CHILD_ENV`] naming the database; in that mode `compact_child` compacts it, and the
//! parent kills it with SIGKILL after a random delay within the time a compaction takes.
//! `CLEANUP_QUEUE_COMPACT_KILLS=N` runs `N` kills (soak).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cleanup_queue::{
    CleanupKind, Durability, Error, ManualClock, NewMessage, OpStatus, Queue, QueueBuilder,
    RedriveTarget, ReserveFilter, Timestamp,
};
use serde_json::json;
use uuid::Uuid;

const CHILD_ENV: &str = "CLEANUP_QUEUE_COMPACT_CHILD";
/// Kills in CI.
const KILLS: u64 = 12;
const START: Timestamp = Timestamp::from_micros(1_796_399_700_000_000);

fn builder(path: &Path, clock: &ManualClock) -> QueueBuilder {
    Queue::builder(path)
        .clock(clock.clone())
        .sweep_interval(None)
        .max_delivery_attempts(1)
        .completed_retention(Some(Duration::from_secs(60)))
}

fn message(pool: Uuid, n: u128, payload: &str) -> NewMessage {
    NewMessage::new(
        pool,
        Uuid::from_u128(n),
        format!("key-{n}"),
        CleanupKind::CancellingTimeoutTeardown,
        json!({ "n": n as u64, "pad": payload }),
    )
}

fn export(q: &Queue) -> Vec<u8> {
    let mut out = Vec::new();
    q.export(&mut out).expect("export");
    out
}

/// A database that churned through `churn` messages (enqueued, acked, pruned), then holds
/// messages in every state, a redrive and wakeups in two pools. Returns the token of the
/// reservation still held.
fn populate(path: &Path, clock: &ManualClock, churn: u128) -> (Uuid, Uuid, String) {
    let pad = "x".repeat(900);
    let pool = Uuid::from_u128(0xa1);
    let other = Uuid::from_u128(0xb2);
    {
        // The churn in `Buffered` mode: only the state it leaves matters here.
        let q = builder(path, clock)
            .durability(Durability::Buffered {
                every: Duration::from_millis(50),
            })
            .open()
            .expect("open");
        for n in 0..churn {
            q.enqueue(message(other, 1_000_000 + n, &pad))
                .expect("enqueue");
            let r = q.reserve(other, &ReserveFilter::any()).expect("reserve");
            let r = r.expect("the message");
            q.ack(other, r.message.message_id, &r.reservation_token)
                .expect("ack");
        }
        clock.advance(Duration::from_secs(120));
        while q.prune_tombstones(10_000).expect("prune") > 0 {}
    }
    let q = builder(path, clock).open().expect("open");
    for n in 1..=6 {
        q.enqueue(message(pool, n, "p")).expect("enqueue");
    }
    // 1 dies and is redriven (to the back); 2 dies; 3 is acked; 4 stays reserved; 5 and 6 stay visible.
    let mut held = None;
    for n in 1..=4u128 {
        let r = q.reserve(pool, &ReserveFilter::any()).expect("reserve");
        let r = r.expect("a message");
        assert_eq!(r.message.message_id, Uuid::from_u128(n));
        let id = r.message.message_id;
        match n {
            1 | 2 => assert_eq!(
                q.release(pool, id, &r.reservation_token, "boom")
                    .expect("release")
                    .status,
                OpStatus::DeadLettered
            ),
            3 => assert_eq!(
                q.ack(pool, id, &r.reservation_token).expect("ack").status,
                OpStatus::Accepted
            ),
            _ => held = Some((pool, id, r.reservation_token)),
        }
        clock.advance(Duration::from_millis(1));
    }
    q.redrive(
        pool,
        RedriveTarget::Message(Uuid::from_u128(1)),
        "fixed",
        "test",
        true,
    )
    .expect("redrive");
    held.expect("a held reservation")
}

fn staging(path: &Path) -> PathBuf {
    let mut name = path.file_name().expect("name").to_os_string();
    name.push(".compacting");
    path.with_file_name(name)
}

#[test]
fn compaction_keeps_the_state_exactly_and_shrinks_a_churned_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let clock = ManualClock::new(START);
    let (pool, id, token) = populate(&path, &clock, 4_000);
    let (before, size_before) = {
        let q = builder(&path, &clock).open().expect("open");
        (export(&q), q.size_on_disk().expect("size"))
    };

    let done = builder(&path, &clock).compact().expect("compact");
    println!("{done:?}; size_on_disk at the last open before: {size_before}");
    assert!(
        done.bytes_after < done.bytes_before,
        "compaction did not shrink the database: {done:?}"
    );
    assert!(!staging(&path).exists(), "the old database is removed");

    let q = builder(&path, &clock)
        .open()
        .expect("open the compacted database");
    assert_eq!(export(&q), before, "the state is carried over exactly");
    assert_eq!(
        done.lines,
        before.iter().filter(|b| **b == b'\n').count() as u64
    );
    assert!(q.size_on_disk().expect("size") < size_before);
    assert_eq!(
        q.check_integrity().expect("integrity"),
        Vec::<String>::new()
    );
    // The reservation made before still answers to its token, and the queue works on.
    assert_eq!(
        q.ack(pool, id, &token).expect("ack").status,
        OpStatus::Accepted
    );
    let next = q.reserve(pool, &ReserveFilter::any()).expect("reserve");
    // FIFO order survives: 5 and 6, then 1 (redriven to the back).
    assert_eq!(
        next.expect("visible").message.message_id,
        Uuid::from_u128(5)
    );
}

#[test]
fn a_database_open_elsewhere_is_not_compacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let clock = ManualClock::new(START);
    populate(&path, &clock, 0);
    let q = builder(&path, &clock).open().expect("open");
    let before = export(&q);
    match builder(&path, &clock).compact() {
        Err(Error::InUse { .. }) => {}
        other => panic!("compacting an open database: {other:?}"),
    }
    assert!(!staging(&path).exists());
    assert_eq!(export(&q), before);
}

#[test]
fn a_left_over_staging_directory_is_removed_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let clock = ManualClock::new(START);
    populate(&path, &clock, 0);
    let before = export(&builder(&path, &clock).open().expect("open"));
    std::fs::create_dir_all(staging(&path).join("blobs")).expect("mkdir");
    std::fs::write(staging(&path).join("db"), b"a torn copy").expect("write");
    builder(&path, &clock).compact().expect("compact");
    assert!(!staging(&path).exists());
    assert_eq!(
        export(&builder(&path, &clock).open().expect("open")),
        before
    );
    // What a crash right after the exchange leaves: a whole database there (the old one).
    copy_dir(&path, &staging(&path));
    builder(&path, &clock).compact().expect("compact");
    assert!(!staging(&path).exists());
    assert_eq!(
        export(&builder(&path, &clock).open().expect("open")),
        before
    );
}

#[test]
fn only_an_existing_database_is_compacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(START);
    let missing = dir.path().join("missing");
    assert!(matches!(
        builder(&missing, &clock).compact(),
        Err(Error::Config(_))
    ));
    assert!(!missing.exists(), "nothing is created");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    assert!(matches!(
        builder(&empty, &clock).compact(),
        Err(Error::Config(_))
    ));
    assert_eq!(std::fs::read_dir(&empty).expect("read").count(), 0);
    assert!(matches!(
        Queue::temporary().compact(),
        Err(Error::Config(_))
    ));
}

/// The child mode of the kill test: compacts the database named by [`CHILD_ENV`].
#[test]
fn compact_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let clock = ManualClock::new(START);
    builder(Path::new(&path), &clock)
        .compact()
        .expect("compact");
}

fn spawn_child(path: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().expect("current exe"))
        .args([
            "compact_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the child")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// splitmix64, so that a failing kill delay is printed and can be reasoned about.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn a_compaction_killed_at_any_moment_leaves_the_state_it_had() {
    let dir = tempfile::tempdir().expect("tempdir");
    let original = dir.path().join("original");
    let clock = ManualClock::new(START);
    populate(&original, &clock, 1_500);
    let before = export(&builder(&original, &clock).open().expect("open"));

    // How long one whole compaction takes in a child process (spawn and open included).
    let timed = dir.path().join("timed");
    copy_dir(&original, &timed);
    let t0 = Instant::now();
    let status = spawn_child(&timed).wait().expect("wait");
    let whole = t0.elapsed();
    assert!(status.success(), "an uninterrupted compaction failed");
    assert_eq!(
        export(&builder(&timed, &clock).open().expect("open")),
        before
    );

    let kills = std::env::var("CLEANUP_QUEUE_COMPACT_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(KILLS);
    let seed = START.as_micros() as u64;
    // Kills before the exchange, after it (the directory at `work` is another one), and
    // compactions that finished first.
    let (mut before_swap, mut after_swap, mut finished) = (0, 0, 0);
    for kill in 0..kills {
        let work = dir.path().join(format!("kill-{kill}"));
        copy_dir(&original, &work);
        let inode = std::fs::metadata(&work).expect("stat").ino();
        let delay = whole.mul_f64((mix(seed + kill) % 1000) as f64 / 1000.0);
        let mut child = spawn_child(&work);
        std::thread::sleep(delay);
        let _ = child.kill();
        let status = child.wait().expect("wait");
        if status.success() {
            finished += 1;
        } else if std::fs::metadata(&work).expect("stat").ino() == inode {
            before_swap += 1;
        } else {
            after_swap += 1;
        }
        // Whatever the moment: the database opens with exactly its state.
        let q = builder(&work, &clock)
            .open()
            .unwrap_or_else(|e| panic!("kill {kill} after {delay:?}: {e}"));
        assert_eq!(export(&q), before, "kill {kill} after {delay:?}");
        drop(q);
        // And a compaction after it completes, removing what the killed one left.
        builder(&work, &clock)
            .compact()
            .unwrap_or_else(|e| panic!("compacting after kill {kill}: {e}"));
        assert!(!staging(&work).exists());
        assert_eq!(
            export(&builder(&work, &clock).open().expect("open")),
            before,
            "kill {kill}: after a second compaction"
        );
        let _ = std::fs::remove_dir_all(&work);
    }
    println!(
        "compaction kills: {kills} within {whole:?}: {before_swap} before the exchange, \
         {after_swap} after it, {finished} finished first"
    );
}
