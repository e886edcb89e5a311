//! The operator's commands: stats, message / dead-letter inspection, redrive, verify, prune,
//! export and import. Each one calls the library and prints; none holds queue logic.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cleanup_queue::{CleanupKind, DeadLetter, Message, Queue, RedriveTarget, Timestamp};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::report::{
    grouped, human_bytes, human_duration, mask_token, relative, secs_between, since, Align, Table,
};
use crate::{emit, emit_json, progress_allowed, CliResult, Fail};

/// One pool's numbers, in the CLI's own shape.
struct PoolRow {
    pool: Uuid,
    visible: u64,
    reserved: u64,
    dead_lettered: u64,
    tombstones: u64,
    oldest_visible_at: Option<Timestamp>,
    next_lease_expires_at: Option<Timestamp>,
    wakeup_sequence: u64,
}

fn pool_rows(queue: &Queue) -> CliResult<Vec<PoolRow>> {
    let mut rows = Vec::new();
    for pool in queue.pools()? {
        let s = queue.pool_stats(pool)?;
        rows.push(PoolRow {
            pool,
            visible: s.visible,
            reserved: s.reserved,
            dead_lettered: s.dead_lettered,
            tombstones: s.tombstones,
            oldest_visible_at: s.oldest_visible_at,
            next_lease_expires_at: s.next_lease_expires_at,
            wakeup_sequence: s.wakeup_sequence,
        });
    }
    Ok(rows)
}

pub fn stats(queue: &Queue, as_json: bool, prometheus: bool) -> CliResult {
    let rows = pool_rows(queue)?;
    let now = queue.now();
    let size = queue.size_on_disk()?;
    let age = |r: &PoolRow| r.oldest_visible_at.map(|t| secs_between(t, now).max(0.0));
    if prometheus {
        let mut out = queue.metrics().prometheus_text();
        let depth = "prefect_worker_cleanup_queue_depth";
        let _ = writeln!(out, "# HELP {depth} Messages in the queue by state.");
        let _ = writeln!(out, "# TYPE {depth} gauge");
        for r in &rows {
            for (state, n) in [
                ("visible", r.visible),
                ("reserved", r.reserved),
                ("dead_lettered", r.dead_lettered),
                ("tombstone", r.tombstones),
            ] {
                let _ = writeln!(
                    out,
                    "{depth}{{work_pool_id=\"{}\",state=\"{state}\"}} {n}",
                    r.pool
                );
            }
        }
        let oldest = "prefect_worker_cleanup_queue_oldest_visible_age_seconds";
        let _ = writeln!(
            out,
            "# HELP {oldest} Age of the longest-waiting visible message (0 when none)."
        );
        let _ = writeln!(out, "# TYPE {oldest} gauge");
        for r in &rows {
            let _ = writeln!(
                out,
                "{oldest}{{work_pool_id=\"{}\"}} {}",
                r.pool,
                age(r).unwrap_or(0.0)
            );
        }
        let bytes = "prefect_worker_cleanup_queue_database_size_bytes";
        let _ = writeln!(out, "# HELP {bytes} Bytes the database occupies on disk.");
        let _ = writeln!(out, "# TYPE {bytes} gauge");
        let _ = writeln!(out, "{bytes} {size}");
        return emit(&out);
    }
    if as_json {
        let pools: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({
                    "work_pool_id": r.pool,
                    "visible": r.visible,
                    "reserved": r.reserved,
                    "dead_lettered": r.dead_lettered,
                    "tombstones": r.tombstones,
                    "oldest_visible_at": r.oldest_visible_at.map(|t| t.to_string()),
                    "oldest_visible_age_seconds": age(r),
                    "next_lease_expires_at": r.next_lease_expires_at.map(|t| t.to_string()),
                    "wakeup_sequence": r.wakeup_sequence,
                })
            })
            .collect();
        let metrics: Vec<Value> = queue
            .metrics()
            .counters
            .iter()
            .map(|(c, v)| {
                let labels: serde_json::Map<String, Value> = c
                    .labels()
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), Value::from(v)))
                    .collect();
                json!({"name": c.name(), "labels": labels, "value": v})
            })
            .collect();
        return emit_json(&json!({
            "path": queue.path(),
            "now": now.to_string(),
            "size_on_disk_bytes": size,
            "pools": pools,
            "totals": {
                "visible": rows.iter().map(|r| r.visible).sum::<u64>(),
                "reserved": rows.iter().map(|r| r.reserved).sum::<u64>(),
                "dead_lettered": rows.iter().map(|r| r.dead_lettered).sum::<u64>(),
                "tombstones": rows.iter().map(|r| r.tombstones).sum::<u64>(),
            },
            "metrics": metrics,
        }));
    }
    let mut t = Table::new(&[
        ("POOL", Align::Left),
        ("VISIBLE", Align::Right),
        ("RESERVED", Align::Right),
        ("DEAD", Align::Right),
        ("TOMBSTONES", Align::Right),
        ("OLDEST VISIBLE", Align::Right),
        ("NEXT LEASE EXPIRY", Align::Right),
        ("WAKE SEQ", Align::Right),
    ]);
    for r in &rows {
        t.row(vec![
            r.pool.to_string(),
            grouped(r.visible),
            grouped(r.reserved),
            grouped(r.dead_lettered),
            grouped(r.tombstones),
            r.oldest_visible_at
                .map(|o| human_duration(since(o, now)))
                .unwrap_or_else(|| "-".into()),
            r.next_lease_expires_at
                .map(|l| relative(now, l))
                .unwrap_or_else(|| "-".into()),
            r.wakeup_sequence.to_string(),
        ]);
    }
    let total = |f: fn(&PoolRow) -> u64| grouped(rows.iter().map(f).sum());
    t.row(vec![
        format!("total ({} pools)", rows.len()),
        total(|r| r.visible),
        total(|r| r.reserved),
        total(|r| r.dead_lettered),
        total(|r| r.tombstones),
        String::new(),
        String::new(),
        String::new(),
    ]);
    let mut out = t.render();
    let _ = writeln!(
        out,
        "\ndatabase: {} ({} on disk)",
        path_text(queue),
        human_bytes(size)
    );
    emit(&out)
}

fn path_text(queue: &Queue) -> String {
    queue
        .path()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(temporary)".into())
}

fn message_json(m: &Message) -> Value {
    json!({
        "message_id": m.message_id,
        "idempotency_key": m.idempotency_key,
        "work_pool_id": m.work_pool_id,
        "work_queue_id": m.work_queue_id,
        "kind": m.kind.as_str(),
        "target": m.target,
        "data": m.data,
        "created_at": m.created_at.to_string(),
        "updated_at": m.updated_at.to_string(),
        "delivery_count": m.delivery_count,
    })
}

fn dead_letter_json(d: &DeadLetter) -> Value {
    json!({
        "message": message_json(&d.message),
        "reason": d.reason,
        "final_delivery_count": d.final_delivery_count,
        "moved_at": d.moved_at.to_string(),
        "reservation_token": d.reservation_token,
        "lease_expires_at": d.lease_expires_at.map(|t| t.to_string()),
        "release_reason": d.release_reason,
    })
}

/// `key: value` lines, keys padded.
fn fields(out: &mut String, rows: &[(&str, String)]) {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        let _ = writeln!(out, "{k:<w$}  {v}");
    }
}

fn message_fields(m: &Message) -> Vec<(&'static str, String)> {
    vec![
        ("message_id", m.message_id.to_string()),
        ("work_pool_id", m.work_pool_id.to_string()),
        (
            "work_queue_id",
            m.work_queue_id
                .map(|q| q.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("idempotency_key", m.idempotency_key.clone()),
        ("kind", m.kind.to_string()),
        ("delivery_count", m.delivery_count.to_string()),
        ("created_at", m.created_at.to_string()),
        ("updated_at", m.updated_at.to_string()),
        ("target", Value::Object(m.target.clone()).to_string()),
        ("data", Value::Object(m.data.clone()).to_string()),
    ]
}

fn history_json(queue: &Queue, pool: Uuid, id: Uuid) -> CliResult<Vec<Value>> {
    Ok(queue
        .redrive_history(pool, id)?
        .iter()
        .map(|h| {
            json!({
                "redriven_at": h.redriven_at.to_string(),
                "actor": h.actor,
                "reason": h.reason,
                "reset_count": h.reset_count,
                "dead_letter": dead_letter_json(&h.dead_letter),
            })
        })
        .collect())
}

fn history_text(queue: &Queue, pool: Uuid, id: Uuid) -> CliResult<String> {
    let history = queue.redrive_history(pool, id)?;
    let mut out = String::new();
    if history.is_empty() {
        out.push_str("\nredrive history: none\n");
        return Ok(out);
    }
    out.push_str("\nredrive history:\n");
    let mut t = Table::new(&[
        ("REDRIVEN AT", Align::Left),
        ("ACTOR", Align::Left),
        ("REASON", Align::Left),
        ("RESET COUNT", Align::Left),
        ("WAS DEAD SINCE", Align::Left),
        ("DELIVERIES", Align::Right),
    ]);
    for h in &history {
        t.row(vec![
            h.redriven_at.to_string(),
            h.actor.clone(),
            h.reason.clone(),
            if h.reset_count { "yes" } else { "no" }.into(),
            h.dead_letter.moved_at.to_string(),
            h.dead_letter.final_delivery_count.to_string(),
        ]);
    }
    out.push_str(&t.render());
    Ok(out)
}

pub fn message_show(queue: &Queue, pool: Uuid, id: Uuid, as_json: bool) -> CliResult {
    let now = queue.now();
    if let Some(m) = queue.read_message(pool, id)? {
        let reservation = queue.read_reservation(pool, id)?;
        if as_json {
            return emit_json(&json!({
                "state": if reservation.is_some() { "reserved" } else { "visible" },
                "message": message_json(&m),
                "reservation": reservation.as_ref().map(|r| json!({
                    "reservation_token": r.reservation_token,
                    "lease_expires_at": r.lease_expires_at.to_string(),
                })),
                "redrive_history": history_json(queue, pool, id)?,
            }));
        }
        let mut rows = vec![(
            "state",
            if reservation.is_some() {
                "RESERVED"
            } else {
                "VISIBLE"
            }
            .to_string(),
        )];
        rows.extend(message_fields(&m));
        if let Some(r) = &reservation {
            rows.push(("reservation", mask_token(&r.reservation_token)));
            rows.push((
                "lease_expires_at",
                format!(
                    "{} ({})",
                    r.lease_expires_at,
                    relative(now, r.lease_expires_at)
                ),
            ));
        }
        let mut out = String::new();
        fields(&mut out, &rows);
        out.push_str(&history_text(queue, pool, id)?);
        return emit(&out);
    }
    if let Some(d) = queue.read_dead_letter(pool, id)? {
        return show_dead_letter(queue, &d, as_json);
    }
    Err(Fail::Check(Some(format!(
        "no active or dead-lettered message {id} in pool {pool} (it was acked, or never existed)"
    ))))
}

fn show_dead_letter(queue: &Queue, d: &DeadLetter, as_json: bool) -> CliResult {
    let (pool, id) = (d.message.work_pool_id, d.message.message_id);
    if as_json {
        return emit_json(&json!({
            "state": "dead_lettered",
            "dead_letter": dead_letter_json(d),
            "redrive_history": history_json(queue, pool, id)?,
        }));
    }
    let mut rows = vec![("state", "DEAD (in the dead-letter queue)".to_string())];
    rows.extend(message_fields(&d.message));
    rows.push(("reason", d.reason.clone()));
    rows.push(("final_delivery_count", d.final_delivery_count.to_string()));
    rows.push(("moved_at", d.moved_at.to_string()));
    rows.push((
        "release_reason",
        d.release_reason.clone().unwrap_or_else(|| "-".into()),
    ));
    rows.push((
        "last_reservation",
        d.reservation_token
            .as_deref()
            .map(mask_token)
            .unwrap_or_else(|| "-".into()),
    ));
    rows.push((
        "last_lease_expired_at",
        d.lease_expires_at
            .map(|t| t.to_string())
            .unwrap_or_else(|| "-".into()),
    ));
    let mut out = String::new();
    fields(&mut out, &rows);
    out.push_str(&history_text(queue, pool, id)?);
    emit(&out)
}

pub fn dlq_list(
    queue: &Queue,
    pool: Option<Uuid>,
    kind: Option<CleanupKind>,
    limit: usize,
    as_json: bool,
) -> CliResult {
    let mut letters = queue.dead_letters(pool, kind, limit)?;
    // The library returns one record for a limit of 0.
    letters.truncate(limit);
    if as_json {
        return emit_json(&json!({
            "dead_letters": letters.iter().map(dead_letter_json).collect::<Vec<_>>(),
            "count": letters.len(),
            "limit": limit,
            "truncated": letters.len() >= limit && limit > 0,
        }));
    }
    let mut t = Table::new(&[
        ("POOL", Align::Left),
        ("MESSAGE", Align::Left),
        ("KIND", Align::Left),
        ("DELIVERIES", Align::Right),
        ("MOVED AT", Align::Left),
        ("REASON", Align::Left),
        ("RELEASE REASON", Align::Left),
    ]);
    for d in &letters {
        t.row(vec![
            d.message.work_pool_id.to_string(),
            d.message.message_id.to_string(),
            d.message.kind.to_string(),
            d.final_delivery_count.to_string(),
            d.moved_at.to_string(),
            d.reason.clone(),
            d.release_reason.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut out = if t.is_empty() {
        String::new()
    } else {
        t.render()
    };
    let _ = writeln!(
        out,
        "{} dead letter{}{}",
        letters.len(),
        if letters.len() == 1 { "" } else { "s" },
        if letters.len() >= limit && limit > 0 {
            format!(" (limit {limit} reached; raise --limit to see more)")
        } else {
            String::new()
        }
    );
    emit(&out)
}

pub fn dlq_show(queue: &Queue, pool: Uuid, id: Uuid, as_json: bool) -> CliResult {
    match queue.read_dead_letter(pool, id)? {
        Some(d) => show_dead_letter(queue, &d, as_json),
        None => {
            let what = match queue.read_message(pool, id)? {
                Some(_) => "it is active (visible or reserved); see `message show`",
                None => "no such message in this pool, or it was acked",
            };
            Err(Fail::Check(Some(format!(
                "message {id} in pool {pool} is not in the dead-letter queue: {what}"
            ))))
        }
    }
}

pub fn redrive(
    queue: &Queue,
    pool: Uuid,
    target: RedriveTarget,
    reason: &str,
    actor: &str,
    reset_count: bool,
    as_json: bool,
) -> CliResult {
    let moved = queue.redrive(pool, target, reason, actor, reset_count)?;
    if let (RedriveTarget::Message(id), true) = (target, moved.is_empty()) {
        let what = match queue.read_message(pool, id)? {
            Some(_) => "it is already active (visible or reserved)",
            None => "no such message in this pool, or it was acked",
        };
        return Err(Fail::Check(Some(format!(
            "message {id} in pool {pool} is not in the dead-letter queue: {what}; nothing redriven"
        ))));
    }
    if as_json {
        return emit_json(&json!({
            "work_pool_id": pool,
            "actor": actor,
            "reason": reason,
            "reset_count": reset_count,
            "redriven": moved.iter().map(message_json).collect::<Vec<_>>(),
            "count": moved.len(),
        }));
    }
    let mut out = String::new();
    if moved.is_empty() {
        let _ = writeln!(out, "nothing to redrive: pool {pool} has no dead letters");
        return emit(&out);
    }
    let mut t = Table::new(&[
        ("MESSAGE", Align::Left),
        ("KIND", Align::Left),
        ("DELIVERY COUNT", Align::Right),
    ]);
    for m in &moved {
        t.row(vec![
            m.message_id.to_string(),
            m.kind.to_string(),
            m.delivery_count.to_string(),
        ]);
    }
    out.push_str(&t.render());
    let _ = writeln!(
        out,
        "redrove {} message{} of pool {pool} back to the queue (actor {actor:?}, reason {reason:?}{}); the pool was woken",
        moved.len(),
        if moved.len() == 1 { "" } else { "s" },
        if reset_count { ", delivery counts reset" } else { "" }
    );
    emit(&out)
}

pub fn verify(queue: &Queue, as_json: bool) -> CliResult {
    let violations = queue.check_integrity()?;
    if as_json {
        emit_json(&json!({
            "path": queue.path(),
            "ok": violations.is_empty(),
            "violations": violations,
        }))?;
    } else {
        let mut out = String::new();
        for v in &violations {
            let _ = writeln!(out, "violation: {v}");
        }
        let _ = writeln!(
            out,
            "{}: {} violation{}",
            path_text(queue),
            violations.len(),
            if violations.len() == 1 { "" } else { "s" }
        );
        emit(&out)?;
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(Fail::Check(None))
    }
}

pub fn prune(queue: &Queue, retention: Duration, as_json: bool) -> CliResult {
    const BATCH: usize = 1000;
    let mut total = 0;
    loop {
        let n = queue.prune_tombstones_older_than(retention, BATCH)?;
        total += n;
        if n < BATCH {
            break;
        }
    }
    if as_json {
        return emit_json(&json!({
            "pruned": total,
            "retention_seconds": retention.as_secs_f64(),
        }));
    }
    emit(&format!(
        "pruned {total} tombstone{} completed at least {}s ago\n",
        if total == 1 { "" } else { "s" },
        retention.as_secs_f64()
    ))
}

pub fn compact(db: &Path, as_json: bool) -> CliResult {
    let done = Queue::builder(db).sweep_interval(None).compact()?;
    if as_json {
        return emit_json(&json!({
            "lines": done.lines,
            "bytes_before": done.bytes_before,
            "bytes_after": done.bytes_after,
            "seconds": done.elapsed.as_secs_f64(),
        }));
    }
    emit(&format!(
        "compacted {}: {} -> {} ({} export lines carried over) in {}\n",
        db.display(),
        human_bytes(done.bytes_before),
        human_bytes(done.bytes_after),
        done.lines,
        human_duration(done.elapsed)
    ))
}

fn bytes_bar(len: Option<u64>, verb: &str) -> ProgressBar {
    if !progress_allowed() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
    let template = if len.is_some() {
        format!("{verb} [{{bar:40}}] {{bytes}}/{{total_bytes}} ({{bytes_per_sec}}, {{eta}} left)")
    } else {
        format!("{{spinner}} {verb} {{bytes}} ({{bytes_per_sec}})")
    };
    if let Ok(style) = ProgressStyle::with_template(&template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

pub fn export(queue: &Queue, output: Option<PathBuf>) -> CliResult {
    let pb = bytes_bar(None, "exporting");
    match output {
        None => {
            let stdout = std::io::stdout();
            let mut w = pb.wrap_write(BufWriter::new(stdout.lock()));
            match queue.export(&mut w) {
                Ok(lines) => {
                    pb.finish_and_clear();
                    eprintln!("exported {lines} lines");
                    Ok(())
                }
                Err(cleanup_queue::Error::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    pb.finish_and_clear();
                    Ok(())
                }
                Err(e) => {
                    pb.finish_and_clear();
                    Err(e.into())
                }
            }
        }
        Some(path) => {
            // Write beside the target and rename, so a failed export never leaves a file
            // that looks like a complete backup.
            let tmp = tmp_path(&path);
            let file = File::create(&tmp)
                .map_err(|e| Fail::error(format!("cannot create {}: {e}", tmp.display())))?;
            let result = {
                let mut w = BufWriter::new(pb.wrap_write(&file));
                queue.export(&mut w)
            }
            .map_err(Fail::from)
            .and_then(|lines| {
                file.sync_all()
                    .map_err(|e| Fail::error(format!("cannot write {}: {e}", tmp.display())))?;
                Ok(lines)
            });
            pb.finish_and_clear();
            match result {
                Ok(lines) => {
                    std::fs::rename(&tmp, &path).map_err(|e| {
                        Fail::error(format!("cannot move the export to {}: {e}", path.display()))
                    })?;
                    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    eprintln!(
                        "exported {lines} lines ({}) to {}",
                        human_bytes(size),
                        path.display()
                    );
                    Ok(())
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    Err(e)
                }
            }
        }
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "export".into());
    name.push(".partial");
    path.with_file_name(name)
}

pub fn import(db: &Path, input: &Path) -> CliResult {
    // The input first: an unreadable file must not leave a new, empty database behind.
    let file = File::open(input)
        .map_err(|e| Fail::error(format!("cannot read {}: {e}", input.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| Fail::error(format!("cannot read {}: {e}", input.display())))?;
    if meta.is_dir() {
        return Err(Fail::error(format!("{} is a directory", input.display())));
    }
    if db.exists() && !db.is_dir() {
        return Err(Fail::error(format!(
            "{} exists and is not a directory",
            db.display()
        )));
    }
    let existed = db.exists();
    let was_empty = !existed
        || std::fs::read_dir(db)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
    let outcome = (|| -> CliResult<u64> {
        let queue = Queue::builder(db).sweep_interval(None).open()?;
        let pb = bytes_bar(Some(meta.len()), "importing");
        let mut reader = pb.wrap_read(BufReader::new(file));
        let lines = queue.import(&mut reader);
        pb.finish_and_clear();
        let lines = lines?;
        let violations = queue.check_integrity()?;
        if !violations.is_empty() {
            return Err(Fail::error(format!(
                "the imported state fails verification: {}",
                violations.join("; ")
            )));
        }
        Ok(lines)
    })();
    match outcome {
        Ok(lines) => emit(&format!(
            "imported {lines} lines from {} into {}\n",
            input.display(),
            db.display()
        )),
        Err(e) => {
            // The engine wrote part of the file before failing; a partial database is worse
            // than none. Only what this command created is removed.
            if !existed {
                let _ = std::fs::remove_dir_all(db);
            } else if was_empty {
                if let Ok(entries) = std::fs::read_dir(db) {
                    for entry in entries.flatten() {
                        let p = entry.path();
                        let _ = if p.is_dir() {
                            std::fs::remove_dir_all(&p)
                        } else {
                            std::fs::remove_file(&p)
                        };
                    }
                }
            }
            Err(e)
        }
    }
}
