//! The `cleanup-queue` command-line tool, through the real binary: every subcommand, its
//! errors (missing, foreign and busy databases, bad UUIDs, unknown kinds, unreadable files),
//! a short simulated-clock `simulate` with a clean audit, export -> import -> export, redrive.
#![cfg(feature = "cli")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use cleanup_queue::{CleanupKind, NewMessage, OpStatus, Queue, ReserveFilter};
use serde_json::{json, Value};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_cleanup-queue");

fn cli(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run the binary")
}

fn with_db(db: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--db", db.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    cli(&all)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

fn json_out(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", stdout(o), stderr(o)))
}

/// An error: exit 2, one line on stderr, nothing that looks like a panic.
fn assert_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(code(o), 2, "stdout: {}\nstderr: {err}", stdout(o));
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

/// A database with one pool holding: a visible message (with a work queue), a reserved one,
/// a dead letter (released on its only attempt) and an acked tombstone.
struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    pool: Uuid,
    visible: Uuid,
    reserved: Uuid,
    token: String,
    dead: Uuid,
    acked: Uuid,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let q = Queue::builder(&path)
        .max_delivery_attempts(1)
        .sweep_interval(None)
        .open()
        .expect("open");
    let pool = Uuid::new_v4();
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let target = json!({"flow_run_id": "42", "infrastructure_pid": "k8s:job-42"});
    let (dead, acked, reserved, visible) = (ids[0], ids[1], ids[2], ids[3]);
    let add = |id: Uuid, key: &str, kind: CleanupKind| {
        q.enqueue(NewMessage::new(pool, id, key, kind, target.clone()))
            .expect("enqueue");
    };
    add(dead, "k-dead", CleanupKind::PendingClaimTeardown);
    let r = q
        .reserve(pool, &ReserveFilter::any())
        .expect("reserve")
        .expect("one");
    assert_eq!(r.message.message_id, dead);
    let out = q
        .release(pool, dead, &r.reservation_token, "pod still terminating")
        .expect("release");
    assert_eq!(out.status, OpStatus::DeadLettered);

    add(acked, "k-acked", CleanupKind::CancellingTimeoutTeardown);
    let r = q
        .reserve(pool, &ReserveFilter::any())
        .expect("reserve")
        .expect("one");
    assert_eq!(r.message.message_id, acked);
    let out = q.ack(pool, acked, &r.reservation_token).expect("ack");
    assert_eq!(out.status, OpStatus::Accepted);

    add(
        reserved,
        "k-reserved",
        CleanupKind::CancellingTimeoutTeardown,
    );
    let r = q
        .reserve(pool, &ReserveFilter::any())
        .expect("reserve")
        .expect("one");
    assert_eq!(r.message.message_id, reserved);
    let token = r.reservation_token;

    q.enqueue(
        NewMessage::new(
            pool,
            visible,
            "k-visible",
            CleanupKind::CancellingTimeoutTeardown,
            target,
        )
        .work_queue(Uuid::new_v4()),
    )
    .expect("enqueue");
    drop(q);
    Fixture {
        _dir: dir,
        path,
        pool,
        visible,
        reserved,
        token,
        dead,
        acked,
    }
}

/// The whole logical state (records, wakeup sequences, counters, redrive records) as the
/// deterministic export. (sled itself rewrites its snapshot file the first time a database
/// is reopened, so file bytes are not the measure of "changed nothing".)
fn state(db: &Path) -> Vec<u8> {
    let o = with_db(db, &["export"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    o.stdout
}

// -------------------------------------------------------------------------------------------
// Errors

#[test]
fn read_only_commands_never_create_a_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nothing-here");
    let m = missing.to_str().expect("utf-8");
    let id = Uuid::new_v4().to_string();
    for args in [
        vec!["stats"],
        vec!["stats", "--json"],
        vec!["stats", "--prometheus"],
        vec!["verify"],
        vec!["message", "show", &id, &id],
        vec!["dlq", "list"],
        vec!["dlq", "show", &id, &id],
        vec!["dlq", "redrive", "--pool", &id, "--all", "--reason", "x"],
        vec!["prune", "--retention", "60"],
        vec!["export"],
    ] {
        let mut full = vec!["--db", m];
        full.extend(args.iter().copied());
        let o = cli(&full);
        assert_error(&o, "does not exist");
        assert!(stderr(&o).contains(m), "names the path: {}", stderr(&o));
        assert!(!missing.exists(), "{args:?} created {m}");
    }
    // A directory that is not a database is refused, and left as it was.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    for args in [vec!["stats"], vec!["verify"], vec!["dlq", "list"]] {
        assert_error(&with_db(&empty, &args), "not a cleanup-queue database");
    }
    assert_eq!(std::fs::read_dir(&empty).expect("read_dir").count(), 0);
}

#[test]
fn commands_that_need_a_database_say_so() {
    assert_error(&cli(&["stats"]), "needs --db");
    assert_error(&cli(&["verify"]), "needs --db");
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let f = fixture();
    let pool = f.pool.to_string();
    let id = f.visible.to_string();
    assert_error(
        &with_db(&f.path, &["message", "show", "not-a-uuid", &id]),
        "not a UUID",
    );
    assert_error(
        &with_db(&f.path, &["dlq", "show", &pool, "1234"]),
        "not a UUID",
    );
    assert_error(
        &with_db(&f.path, &["dlq", "list", "--kind", "teardown.v9"]),
        "unknown cleanup kind",
    );
    assert_error(
        &with_db(
            &f.path,
            &["dlq", "redrive", "--pool", &pool, "--reason", "x"],
        ),
        "--all",
    );
    assert_error(
        &with_db(&f.path, &["prune", "--retention", "soon"]),
        "not a duration",
    );
    assert_error(
        &cli(&["simulate", "--durability", "paper"]),
        "unknown durability",
    );
    assert_error(&with_db(&f.path, &["frobnicate"]), "frobnicate");
}

#[test]
fn a_database_in_use_is_reported_with_its_path() {
    let f = fixture();
    let held = Queue::builder(&f.path)
        .sweep_interval(None)
        .open()
        .expect("hold the database open");
    for args in [vec!["stats"], vec!["verify"], vec!["dlq", "list"]] {
        let o = with_db(&f.path, &args);
        assert_error(&o, "in use by another process");
        assert!(stderr(&o).contains(f.path.to_str().expect("utf-8")));
    }
    drop(held);
    // Once released, the same command works.
    let o = with_db(&f.path, &["verify"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

// -------------------------------------------------------------------------------------------
// Inspection

#[test]
fn stats_table_json_and_prometheus() {
    let f = fixture();
    let before = state(&f.path);

    let o = with_db(&f.path, &["stats"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    for needle in [
        "POOL",
        "VISIBLE",
        "RESERVED",
        "DEAD",
        "TOMBSTONES",
        "WAKE SEQ",
        &f.pool.to_string(),
        "database:",
    ] {
        assert!(text.contains(needle), "{needle:?} in\n{text}");
    }

    let v = json_out(&with_db(&f.path, &["stats", "--json"]));
    let pools = v["pools"].as_array().expect("pools");
    assert_eq!(pools.len(), 1);
    let p = &pools[0];
    assert_eq!(p["work_pool_id"], f.pool.to_string());
    assert_eq!(p["visible"], 1);
    assert_eq!(p["reserved"], 1);
    assert_eq!(p["dead_lettered"], 1);
    assert_eq!(p["tombstones"], 1);
    assert_eq!(p["wakeup_sequence"], 4);
    assert!(p["oldest_visible_age_seconds"].as_f64().expect("age") >= 0.0);
    assert!(p["next_lease_expires_at"].is_string());
    assert!(v["size_on_disk_bytes"].as_u64().expect("size") > 0);

    let o = with_db(&f.path, &["stats", "--prometheus"]);
    assert_eq!(code(&o), 0);
    let prom = stdout(&o);
    for needle in [
        "# TYPE prefect_worker_cleanup_queue_operations_total counter",
        "prefect_worker_cleanup_queue_operations_total{operation=\"enqueue\",status=\"accepted\"} 4",
        "prefect_worker_cleanup_queue_operations_total{operation=\"ack\",status=\"accepted\"} 1",
        "prefect_worker_cleanup_queue_dead_letters_total{kind=\"pending_claim_teardown.v1\",reason=\"max_delivery_attempts_reached\"} 1",
        "# TYPE prefect_worker_cleanup_queue_depth gauge",
        &format!(
            "prefect_worker_cleanup_queue_depth{{work_pool_id=\"{}\",state=\"visible\"}} 1",
            f.pool
        ),
        &format!(
            "prefect_worker_cleanup_queue_depth{{work_pool_id=\"{}\",state=\"dead_lettered\"}} 1",
            f.pool
        ),
        &format!(
            "prefect_worker_cleanup_queue_oldest_visible_age_seconds{{work_pool_id=\"{}\"}}",
            f.pool
        ),
    ] {
        assert!(prom.contains(needle), "{needle:?} in\n{prom}");
    }

    // Looking changes nothing.
    assert!(state(&f.path) == before, "stats changed the database");
}

#[test]
fn message_show_visible_reserved_dead_and_missing() {
    let f = fixture();
    let pool = f.pool.to_string();

    let o = with_db(&f.path, &["message", "show", &pool, &f.visible.to_string()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("VISIBLE") && stdout(&o).contains("k-visible"));

    let o = with_db(
        &f.path,
        &["message", "show", &pool, &f.reserved.to_string()],
    );
    assert_eq!(code(&o), 0);
    let text = stdout(&o);
    assert!(text.contains("RESERVED") && text.contains("lease_expires_at"));
    assert!(!text.contains(&f.token), "the human view masks the token");

    let v = json_out(&with_db(
        &f.path,
        &["message", "show", &pool, &f.reserved.to_string(), "--json"],
    ));
    assert_eq!(v["state"], "reserved");
    assert_eq!(v["reservation"]["reservation_token"], f.token.as_str());
    assert_eq!(v["message"]["delivery_count"], 1);
    assert_eq!(v["message"]["kind"], "cancelling_timeout_teardown.v1");

    let v = json_out(&with_db(
        &f.path,
        &["message", "show", &pool, &f.dead.to_string(), "--json"],
    ));
    assert_eq!(v["state"], "dead_lettered");

    // Acked (a tombstone) and unknown messages: exit 1, one line.
    for id in [f.acked, Uuid::new_v4()] {
        let o = with_db(&f.path, &["message", "show", &pool, &id.to_string()]);
        assert_eq!(code(&o), 1, "{}", stderr(&o));
        assert!(stderr(&o).contains("no active or dead-lettered message"));
    }
    // The right id in another pool is not found either.
    let o = with_db(
        &f.path,
        &[
            "message",
            "show",
            &Uuid::new_v4().to_string(),
            &f.visible.to_string(),
        ],
    );
    assert_eq!(code(&o), 1);
}

#[test]
fn dlq_list_and_show() {
    let f = fixture();
    let pool = f.pool.to_string();

    let o = with_db(&f.path, &["dlq", "list"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains(&f.dead.to_string()) && text.contains("pod still terminating"));
    assert!(text.contains("1 dead letter"));

    let v = json_out(&with_db(&f.path, &["dlq", "list", "--json"]));
    assert_eq!(v["count"], 1);
    let dl = &v["dead_letters"][0];
    assert_eq!(dl["message"]["message_id"], f.dead.to_string());
    assert_eq!(dl["reason"], "max_delivery_attempts_reached");
    assert_eq!(dl["release_reason"], "pod still terminating");
    assert_eq!(dl["final_delivery_count"], 1);

    for (args, n) in [
        (vec!["--pool", &pool], 1),
        (vec!["--kind", "pending_claim_teardown.v1"], 1),
        (vec!["--kind", "cancelling_timeout_teardown.v1"], 0),
        (vec!["--limit", "0"], 0),
    ] {
        let mut full = vec!["dlq", "list", "--json"];
        full.extend(args.iter().copied());
        assert_eq!(json_out(&with_db(&f.path, &full))["count"], n, "{args:?}");
    }
    let other = Uuid::new_v4().to_string();
    let v = json_out(&with_db(
        &f.path,
        &["dlq", "list", "--pool", &other, "--json"],
    ));
    assert_eq!(v["count"], 0);

    let o = with_db(&f.path, &["dlq", "show", &pool, &f.dead.to_string()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("max_delivery_attempts_reached"));
    assert!(text.contains("redrive history: none"));

    // Not a dead letter: exit 1, and the message says where it is.
    let o = with_db(&f.path, &["dlq", "show", &pool, &f.visible.to_string()]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("is active"), "{}", stderr(&o));
}

// -------------------------------------------------------------------------------------------
// Repair

#[test]
fn redrive_one_message_keeps_an_audit_trail() {
    let f = fixture();
    let pool = f.pool.to_string();
    let dead = f.dead.to_string();
    let seq_before = json_out(&with_db(&f.path, &["stats", "--json"]))["pools"][0]
        ["wakeup_sequence"]
        .as_u64()
        .expect("seq");

    let o = with_db(
        &f.path,
        &[
            "dlq",
            "redrive",
            "--pool",
            &pool,
            "--message",
            &dead,
            "--reason",
            "cluster API is back",
            "--actor",
            "oncall@example",
            "--reset-count",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("redrove 1 message"), "{}", stdout(&o));

    // It is visible again, count reset, with the audit record; the pool was woken.
    let v = json_out(&with_db(
        &f.path,
        &["message", "show", &pool, &dead, "--json"],
    ));
    assert_eq!(v["state"], "visible");
    assert_eq!(v["message"]["delivery_count"], 0);
    let h = &v["redrive_history"][0];
    assert_eq!(h["actor"], "oncall@example");
    assert_eq!(h["reason"], "cluster API is back");
    assert_eq!(h["reset_count"], true);
    assert_eq!(h["dead_letter"]["release_reason"], "pod still terminating");
    let stats = json_out(&with_db(&f.path, &["stats", "--json"]));
    assert_eq!(stats["pools"][0]["dead_lettered"], 0);
    assert_eq!(stats["pools"][0]["visible"], 2);
    assert_eq!(
        stats["pools"][0]["wakeup_sequence"].as_u64(),
        Some(seq_before + 1)
    );
    let o = with_db(&f.path, &["stats", "--prometheus"]);
    assert!(stdout(&o).contains(
        "prefect_worker_cleanup_queue_operations_total{operation=\"redrive\",status=\"accepted\"} 1"
    ));

    // Not dead any more: `dlq show` and a second redrive exit 1.
    assert_eq!(code(&with_db(&f.path, &["dlq", "show", &pool, &dead])), 1);
    let o = with_db(
        &f.path,
        &[
            "dlq",
            "redrive",
            "--pool",
            &pool,
            "--message",
            &dead,
            "--reason",
            "again",
        ],
    );
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("not in the dead-letter queue"));

    // --all with an empty DLQ is fine and says so.
    let o = with_db(
        &f.path,
        &[
            "dlq", "redrive", "--pool", &pool, "--all", "--reason", "sweep",
        ],
    );
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("nothing to redrive"));

    // An empty reason is refused before anything happens.
    let o = with_db(
        &f.path,
        &["dlq", "redrive", "--pool", &pool, "--all", "--reason", ""],
    );
    assert_error(&o, "reason");

    let o = with_db(&f.path, &["verify"]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
}

#[test]
fn redrive_all_with_json_and_default_actor() {
    let f = fixture();
    let pool = f.pool.to_string();
    let o = with_db(
        &f.path,
        &[
            "dlq", "redrive", "--pool", &pool, "--all", "--reason", "bulk", "--json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v = json_out(&o);
    assert_eq!(v["count"], 1);
    assert_eq!(v["redriven"][0]["message_id"], f.dead.to_string());
    // Without --reset-count the delivery count is kept.
    assert_eq!(v["redriven"][0]["delivery_count"], 1);
    assert!(!v["actor"].as_str().expect("actor").is_empty());
}

#[test]
fn verify_reports_clean_and_broken_databases() {
    let f = fixture();
    let before = state(&f.path);
    let o = with_db(&f.path, &["verify"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("0 violations"));
    let v = json_out(&with_db(&f.path, &["verify", "--json"]));
    assert_eq!(v["ok"], true);
    assert_eq!(v["violations"], json!([]));
    for args in [
        vec!["dlq", "list"],
        vec![
            "message",
            "show",
            &f.pool.to_string(),
            &f.reserved.to_string(),
        ],
    ] {
        assert_eq!(code(&with_db(&f.path, &args)), 0);
    }
    assert!(
        state(&f.path) == before,
        "verify or an inspection changed the database"
    );

    // A state whose `next_seq` is behind its records fails verification: exit 1 and the
    // violations on stdout. The library's import refuses such a file but, as documented,
    // leaves what it wrote in place (the CLI's import removes it), which makes a broken
    // database to verify.
    let dir = tempfile::tempdir().expect("tempdir");
    let export = dir.path().join("e.jsonl");
    let o = with_db(
        &f.path,
        &["export", "--output", export.to_str().expect("utf-8")],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = std::fs::read_to_string(&export).expect("read");
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mut meta: Value = serde_json::from_str(&lines[0]).expect("meta line");
    assert_eq!(meta["type"], "meta");
    meta["next_seq"] = json!(0);
    lines[0] = meta.to_string();
    let broken = dir.path().join("broken");
    let q = Queue::builder(&broken)
        .sweep_interval(None)
        .open()
        .expect("open");
    let joined = lines.join("\n") + "\n";
    let err = q
        .import(&mut joined.as_bytes())
        .expect_err("an inconsistent import is refused");
    assert!(err.to_string().contains("next seq"), "{err}");
    drop(q);
    let o = with_db(&broken, &["verify"]);
    assert_eq!(code(&o), 1, "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("violation:"), "{}", stdout(&o));
    let o = with_db(&broken, &["verify", "--json"]);
    assert_eq!(code(&o), 1);
    assert_eq!(json_out(&o)["ok"], false);
}

#[test]
fn prune_removes_old_tombstones_only() {
    let f = fixture();
    let v = json_out(&with_db(&f.path, &["prune", "--retention", "1h", "--json"]));
    assert_eq!(v["pruned"], 0);
    let o = with_db(&f.path, &["prune", "--retention", "0"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("pruned 1 tombstone"), "{}", stdout(&o));
    let stats = json_out(&with_db(&f.path, &["stats", "--json"]));
    assert_eq!(stats["pools"][0]["tombstones"], 0);
    assert_eq!(stats["pools"][0]["visible"], 1);
    assert_eq!(stats["pools"][0]["dead_lettered"], 1);
}

// -------------------------------------------------------------------------------------------
// Backup

#[test]
fn export_import_export_is_identical() {
    let f = fixture();
    // Give it a redrive record too, so every kind of export line is present.
    let o = with_db(
        &f.path,
        &[
            "dlq",
            "redrive",
            "--pool",
            &f.pool.to_string(),
            "--all",
            "--reason",
            "for the export",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let dir = tempfile::tempdir().expect("tempdir");
    let first = dir.path().join("first.jsonl");
    let second = dir.path().join("second.jsonl");
    let copy = dir.path().join("copy");

    let o = with_db(
        &f.path,
        &["export", "--output", first.to_str().expect("utf-8")],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(!dir.path().join("first.jsonl.partial").exists());
    let o = with_db(
        &copy,
        &["import", "--input", first.to_str().expect("utf-8")],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("imported"));
    let o = with_db(
        &copy,
        &["export", "--output", second.to_str().expect("utf-8")],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let (a, b) = (
        std::fs::read(&first).expect("first"),
        std::fs::read(&second).expect("second"),
    );
    assert!(!a.is_empty());
    assert!(a == b, "the round trip changed the export");

    // To standard output, the same bytes.
    let o = with_db(&copy, &["export"]);
    assert_eq!(code(&o), 0);
    assert!(o.stdout == a);

    // The copy answers like the original.
    let v = json_out(&with_db(&copy, &["stats", "--json"]));
    assert_eq!(v["pools"][0]["visible"], 2);
    assert_eq!(v["pools"][0]["tombstones"], 1);
    assert_eq!(code(&with_db(&copy, &["verify"])), 0);

    // Importing into a database that holds state is refused.
    let o = with_db(
        &copy,
        &["import", "--input", first.to_str().expect("utf-8")],
    );
    assert_error(&o, "empty database");
}

#[test]
fn compact_keeps_the_export_and_refuses_a_missing_database() {
    let f = fixture();
    let before = with_db(&f.path, &["export"]);
    assert_eq!(code(&before), 0, "{}", stderr(&before));
    let v = json_out(&with_db(&f.path, &["compact", "--json"]));
    assert_eq!(
        v["lines"].as_u64(),
        Some(before.stdout.iter().filter(|b| **b == b'\n').count() as u64)
    );
    assert!(v["bytes_after"].as_u64().is_some_and(|n| n > 0));
    let after = with_db(&f.path, &["export"]);
    assert!(
        after.stdout == before.stdout,
        "compaction changed the export"
    );
    let o = with_db(&f.path, &["compact"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).starts_with("compacted "), "{}", stdout(&o));
    assert_eq!(code(&with_db(&f.path, &["verify"])), 0);

    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing");
    assert_error(&with_db(&missing, &["compact"]), "does not exist");
    assert!(!missing.exists());
}

#[test]
fn import_errors_leave_no_database_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("new-db");

    // Unreadable input: nothing is created.
    let missing = dir.path().join("missing.jsonl");
    let o = with_db(
        &target,
        &["import", "--input", missing.to_str().expect("utf-8")],
    );
    assert_error(&o, "cannot read");
    assert!(!target.exists());

    // A bad line: the partial database is removed, the error names the line.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"type\":\"meta\",\"format\":1,\"next_seq\":0}\nnot json\n",
    )
    .expect("write");
    let o = with_db(
        &target,
        &["import", "--input", bad.to_str().expect("utf-8")],
    );
    assert_error(&o, "line 2");
    assert!(!target.exists());
}

// -------------------------------------------------------------------------------------------
// The main job

#[test]
fn simulate_with_a_simulated_clock_passes_its_audit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("sim");
    let started = std::time::Instant::now();
    let o = Command::new(BIN)
        .args([
            "simulate",
            "--db",
            db.to_str().expect("utf-8"),
            "--clock",
            "simulated",
            "--seed",
            "7",
            "--duration",
            "2s",
            "--messages",
            "300",
            "--pools",
            "3",
            "--workers",
            "3",
            "--producers",
            "2",
            "--json",
        ])
        .output()
        .expect("run");
    let took = started.elapsed();
    assert_eq!(code(&o), 0, "{}\n{}", stdout(&o), stderr(&o));
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let v = json_out(&o);
    assert_eq!(v["audit"]["passed"], true, "{v:#}");
    assert_eq!(v["settings"]["seed"], 7);
    assert_eq!(v["settings"]["clock"], "simulated");
    let counts = &v["counts"];
    let enqueued = counts["enqueued"].as_u64().expect("enqueued");
    assert!(enqueued > 0 && enqueued <= 300);
    let finals = &v["final_states"];
    assert_eq!(finals["active"], 0);
    assert_eq!(
        finals["acked"].as_u64().expect("acked") + finals["dead_lettered"].as_u64().expect("dl"),
        enqueued
    );
    assert!(counts["delivered"].as_u64().expect("delivered") >= enqueued);
    for op in ["enqueue", "reserve_hit", "ack"] {
        assert!(
            v["operations"][op]["count"].as_u64().expect("count") > 0,
            "{op}"
        );
        assert!(v["operations"][op]["p99_us"].as_u64().is_some(), "{op}");
    }
    // Hours of lease behaviour in seconds: engine time ran far ahead of real time.
    let engine = v["timing"]["engine_seconds"].as_f64().expect("engine");
    let wall = v["timing"]["wall_seconds"].as_f64().expect("wall");
    assert!(engine > 10.0 * wall, "engine {engine}s, wall {wall}s");

    // The database was kept (--db) and is consistent.
    let o = with_db(&db, &["verify"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    let stats = json_out(&with_db(&db, &["stats", "--json"]));
    assert_eq!(stats["pools"].as_array().expect("pools").len(), 3);

    // Simulate refuses a database that already holds a queue.
    let o = Command::new(BIN)
        .args([
            "simulate",
            "--db",
            db.to_str().expect("utf-8"),
            "--duration",
            "1",
        ])
        .output()
        .expect("run");
    assert_error(&o, "new or empty database");
}

#[test]
fn simulate_without_db_cleans_up_its_temporary_directory() {
    let o = cli(&[
        "simulate",
        "--clock",
        "simulated",
        "--seed",
        "3",
        "--duration",
        "1",
        "--messages",
        "50",
        "--pools",
        "2",
        "--workers",
        "2",
        "--durability",
        "flush",
    ]);
    assert_eq!(code(&o), 0, "{}\n{}", stdout(&o), stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("audit: PASS"), "{text}");
    assert!(text.contains("OPERATION") && text.contains("p99") || text.contains("P99"));
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("database "))
        .and_then(|l| l.split(" (").next())
        .expect("the report names the database");
    assert!(text.contains("removed at exit"));
    assert!(!Path::new(path).exists(), "{path} was left behind");
}
