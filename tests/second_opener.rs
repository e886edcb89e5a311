//! Second opener (issue 4, item 5): a database is opened by one holder at a time. Another
//! process (or another open in the same process) gets `Error::InUse`, whose message says
//! "in use by another process", and the holder's data is untouched by the attempt.
//!
//! The cross-process cases re-execute this test binary (`current_exe() --exact
//! second_opener_child`) with [`CHILD_ENV`] set.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cleanup_queue::{CleanupKind, Error, NewMessage, Queue, ReserveFilter};
use serde_json::json;
use uuid::Uuid;

const CHILD_ENV: &str = "CLEANUP_QUEUE_SECOND_OPENER_CHILD";

fn open(path: &Path) -> Result<Queue, Error> {
    Queue::builder(path).sweep_interval(None).open()
}

fn assert_in_use(r: Result<Queue, Error>, path: &Path) {
    match r {
        Err(e @ Error::InUse { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("in use by another process"),
                "unclear message: {text}"
            );
            assert!(text.contains(&path.display().to_string()), "{text}");
        }
        Err(other) => panic!("expected Error::InUse, got {other:?} ({other})"),
        Ok(_) => panic!("a second opener got the database"),
    }
}

/// The child: `open <path> <result-file>` tries to open and writes what happened;
/// `hold <path> <ready-file>` opens, writes a message, signals, and waits to be killed.
#[test]
fn second_opener_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    match parts[..] {
        ["open", path, out] => {
            let text = match open(Path::new(path)) {
                Ok(_) => "OPENED".to_string(),
                Err(e @ Error::InUse { .. }) => format!("IN_USE {e}"),
                Err(e) => format!("OTHER {e:?}"),
            };
            fs::write(out, text).expect("write result");
        }
        ["hold", path, ready] => {
            let q = open(Path::new(path)).expect("the holder opens");
            let pool = Uuid::from_u128(1);
            q.enqueue(NewMessage::new(
                pool,
                Uuid::from_u128(2),
                "held",
                CleanupKind::PendingClaimTeardown,
                json!({}),
            ))
            .expect("enqueue");
            fs::write(ready, "READY").expect("ready");
            std::thread::sleep(Duration::from_secs(60));
            std::process::exit(3);
        }
        _ => panic!("bad spec {spec}"),
    }
}

fn spawn_child(spec: String) -> Child {
    Command::new(std::env::current_exe().expect("exe"))
        .args([
            "second_opener_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, spec)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child")
}

fn wait_for_file(p: &PathBuf, child: &mut Child) -> String {
    let start = Instant::now();
    loop {
        if let Ok(s) = fs::read_to_string(p) {
            if !s.is_empty() {
                return s;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            if let Ok(s) = fs::read_to_string(p) {
                return s;
            }
            panic!("child exited ({status}) without writing {}", p.display());
        }
        assert!(start.elapsed() < Duration::from_secs(30), "child timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn enqueue_one(q: &Queue, pool: Uuid, id: Uuid) {
    q.enqueue(NewMessage::new(
        pool,
        id,
        format!("key-{id}"),
        CleanupKind::CancellingTimeoutTeardown,
        json!({"id": id.to_string()}),
    ))
    .expect("enqueue");
}

#[test]
fn another_process_gets_in_use_while_we_hold_the_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let q = open(&path).expect("open");
    let pool = Uuid::new_v4();
    let id = Uuid::new_v4();
    enqueue_one(&q, pool, id);

    let out = dir.path().join("result");
    let mut child = spawn_child(format!("open|{}|{}", path.display(), out.display()));
    let status = child.wait().expect("wait");
    let text = fs::read_to_string(&out).expect("the child wrote its result");
    assert!(status.success(), "child failed: {status}");
    assert!(
        text.starts_with("IN_USE ") && text.contains("in use by another process"),
        "the other process got: {text}"
    );

    // The attempt changed nothing for the holder.
    assert!(q.read_message(pool, id).expect("read").is_some());
    enqueue_one(&q, pool, Uuid::new_v4());
    assert!(q.check_integrity().expect("integrity").is_empty());
    drop(q);

    // Once we let go, another process can open it.
    let out2 = dir.path().join("result2");
    let mut child = spawn_child(format!("open|{}|{}", path.display(), out2.display()));
    child.wait().expect("wait");
    assert_eq!(fs::read_to_string(&out2).expect("result"), "OPENED");
}

#[test]
fn we_get_in_use_while_another_process_holds_it_and_the_lock_dies_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let ready = dir.path().join("ready");
    let mut child = spawn_child(format!("hold|{}|{}", path.display(), ready.display()));
    assert_eq!(wait_for_file(&ready, &mut child), "READY");

    assert_in_use(open(&path), &path);
    // Still refused on a retry: the failed attempt left nothing behind that breaks it.
    assert_in_use(open(&path), &path);

    // A SIGKILLed holder releases the lock with its process.
    child.kill().expect("kill");
    child.wait().expect("wait");
    let q = open(&path).expect("open after the holder died");
    let pool = Uuid::from_u128(1);
    assert!(q
        .read_message(pool, Uuid::from_u128(2))
        .expect("read")
        .is_some());
    assert!(q.check_integrity().expect("integrity").is_empty());
}

/// sled's lock is an `flock` on the open file description, so a second open inside the
/// same process is refused the same way.
#[test]
fn a_second_open_in_the_same_process_gets_in_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let q = open(&path).expect("open");
    let pool = Uuid::new_v4();
    let id = Uuid::new_v4();
    enqueue_one(&q, pool, id);

    assert_in_use(open(&path), &path);
    // Also with other settings (durability, sweeper on): the lock is what decides.
    assert_in_use(
        Queue::builder(&path)
            .durability(cleanup_queue::Durability::Flush)
            .open(),
        &path,
    );

    // The holder is unaffected.
    let r = q
        .reserve(pool, &ReserveFilter::any())
        .expect("reserve")
        .expect("work");
    q.ack(pool, id, &r.reservation_token).expect("ack");
    assert!(q.check_integrity().expect("integrity").is_empty());

    // A clone is the same engine, not a second opener; dropping the last handle frees it.
    let clone = q.clone();
    drop(q);
    assert_in_use(open(&path), &path);
    drop(clone);
    let q = open(&path).expect("reopen after the last handle is gone");
    assert!(q.read_message(pool, id).expect("read").is_none());
    assert!(q.check_integrity().expect("integrity").is_empty());
}

/// Closing (dropping the last handle) and reopening at once, in the same process, must not
/// be mistaken for a second opener.
///
/// Postmortem: a 300-cycle soak of the kill -9 harness failed at fsync cycle 19 with
/// "in use by another process" when a child opened the database its parent had just
/// dropped. sled 0.34 runs log writes and segment truncations (`set_len` + `sync_all`) on
/// its `sled-io` thread pool; the task owns a clone of the config `Arc` (and so the locked
/// file) until it finishes, so the `flock` can outlive `drop(Queue)` by the length of an
/// fsync. Fixed in `Store::open`: a lock refusal is retried for up to `LOCK_RETRY` (1 s)
/// before it becomes `Error::InUse`; the 500-cycle soak after the fix was clean. This loop
/// is a guard, not a reliable reproducer (the window needs a pending truncation); the
/// harness's lineages (a parent drop followed at once by a child open) are the real one.
#[test]
fn reopening_right_after_drop_never_sees_in_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let pool = Uuid::new_v4();
    for i in 0..40u128 {
        let q = match open(&path) {
            Ok(q) => q,
            Err(e) => panic!("reopen {i} right after a drop: {e}"),
        };
        // Enough writes that sled has sealed buffers in flight at the drop.
        for j in 0..3u128 {
            enqueue_one(&q, pool, Uuid::from_u128(i * 10 + j + 1));
        }
        drop(q);
    }
}
