//! Kill -9 harness (issue 4, item 2).
//!
//! The test binary re-executes itself (`current_exe() --exact crash_child`) with
//! [`CHILD_ENV`] set; in that mode `crash_child` runs a random multi-threaded workload on a
//! database (enqueue with duplicates and id conflicts, reserve with kind and queue filters,
//! ack / release / renew with good and bad tokens, expire_leases, wake_dispatchers, clock
//! advances on a shared manual clock) and, around every call, appends to a plain log file:
//! `B` (one write) before the call and `E` with the result after it returns, before its next
//! call. The parent SIGKILLs it at a random moment, reopens the database and checks, for
//! every message the log mentions:
//!
//! * an acknowledged enqueue (or any acknowledged sighting) exists in some state;
//! * an acknowledged ack is a tombstone (a same-id, same-key enqueue is a duplicate);
//! * an acknowledged dead letter is in the DLQ;
//! * the latest acknowledged reservation is still reserved with that token and at least the
//!   acknowledged lease, unless the log shows it ended (ack, release, expiry, a newer
//!   delivery) or an operation in flight at the kill could have ended it;
//! * a reservation never comes back after it ended, and delivery counts never go backwards;
//! * a state no acknowledged operation produced is explained by an operation in flight;
//! * one message per idempotency key, wakeup sequences not behind what `wake_dispatchers`
//!   returned, `check_integrity()` clean;
//! * the database keeps working: every lapsed lease expires (and wakes its pool), and a
//!   fresh enqueue / reserve / ack round succeeds.
//!
//! Databases are reused for a few cycles (a "lineage"), so recovery of a recovered database
//! is exercised too, and some kills land while the child is still opening it. In every
//! other cycle the child sends every logged batch through the background applier thread.
//!
//! CI runs [`CYCLES_PER_MODE`] cycles in each of `Fsync` and `Flush` (the modes that promise
//! process-crash safety). `CLEANUP_QUEUE_CRASH_CYCLES=N` runs N per mode (soak);
//! `CLEANUP_QUEUE_CRASH_SEED=S` fixes the base seed. Each test prints the cycles it ran,
//! and a failure prints its seed and keeps a copy of the database and the log.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cleanup_queue::{
    CleanupKind, Durability, Error, InputError, ManualClock, NewMessage, OpStatus, Operation,
    Queue, Reservation, ReserveFilter, Timestamp,
};
use serde_json::json;
use uuid::Uuid;

const CYCLES_PER_MODE: u64 = 20;
const CHILD_ENV: &str = "CLEANUP_QUEUE_CRASH_CHILD";
const START: Timestamp = Timestamp::from_micros(1_796_399_700_000_000);
const DAY: Duration = Duration::from_secs(86_400);
const LEASE: Duration = Duration::from_secs(10);
const MAX_ATTEMPTS: u32 = 3;
const THREADS: u64 = 3;
/// A cycle's child gives up (and fails the cycle) if nobody killed it by then.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Shared bits

/// splitmix64: deterministic, so a seed replays a workload (the kill moment still varies
/// with scheduling).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn uuid(&mut self) -> Uuid {
        Uuid::from_u64_pair(self.next(), self.next())
    }
}

fn mode_name(d: Durability) -> &'static str {
    match d {
        Durability::Fsync => "fsync",
        Durability::Flush => "flush",
        Durability::Buffered { .. } => "buffered",
    }
}

fn mode_from(name: &str) -> Durability {
    match name {
        "fsync" => Durability::Fsync,
        "flush" => Durability::Flush,
        "buffered" => Durability::Buffered {
            every: Duration::from_secs(600),
        },
        other => panic!("unknown durability {other}"),
    }
}

fn pools(lineage: u64) -> [Uuid; 2] {
    [
        Uuid::from_u64_pair(lineage, 0xa),
        Uuid::from_u64_pair(lineage, 0xb),
    ]
}

fn queues(lineage: u64) -> [Uuid; 2] {
    [
        Uuid::from_u64_pair(lineage, 0x1),
        Uuid::from_u64_pair(lineage, 0x2),
    ]
}

fn builder(
    path: &Path,
    clock: &ManualClock,
    durability: Durability,
) -> cleanup_queue::QueueBuilder {
    Queue::builder(path)
        .clock(clock.clone())
        .sweep_interval(None)
        .durability(durability)
        .lease(LEASE)
        .max_delivery_attempts(MAX_ATTEMPTS)
        .completed_retention(None)
        .cache_capacity(4 << 20)
        // Checkpoints every few hundred operations (default 8 MiB of log), so that kills
        // also land inside checkpoints and right after them.
        .wal_checkpoint_bytes(64 << 10)
}

/// `pool/id/key/count` entries, `,`-joined; `-` when empty.
fn entries<'a>(items: impl Iterator<Item = (Uuid, Uuid, &'a str, u32)>) -> String {
    let v: Vec<String> = items
        .map(|(p, i, k, c)| format!("{p}/{i}/{k}/{c}"))
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

// ---------------------------------------------------------------------------------------
// The child

struct Log(Mutex<File>);

impl Log {
    /// One `write` per line; no fsync: only the process dies, not the kernel.
    fn line(&self, s: &str) {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut buf = String::with_capacity(s.len() + 1);
        buf.push_str(s);
        buf.push('\n');
        if f.write_all(buf.as_bytes())
            .and_then(|()| f.flush())
            .is_err()
        {
            std::process::exit(4);
        }
    }
}

/// The child's entry point: a no-op unless [`CHILD_ENV`] is set.
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let [db, log, seed, mode, cycle, lineage] = parts[..] else {
        panic!("bad child spec {spec}");
    };
    let seed = u64::from_str(seed).expect("seed");
    let cycle = u64::from_str(cycle).expect("cycle");
    let lineage = u64::from_str(lineage).expect("lineage");
    let log = Arc::new(Log(Mutex::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open log"),
    )));
    let clock = ManualClock::new(START.saturating_add(DAY * cycle as u32));
    // Every other cycle, every logged batch is drained into sled at once (by default logged
    // writes wait until more than 256 do), so that kills land at both stages.
    let builder = builder(Path::new(db), &clock, mode_from(mode));
    let builder = match cycle % 2 {
        0 => builder.background_apply_writes(0),
        _ => builder,
    };
    let q = match builder.open() {
        Ok(q) => q,
        Err(e) => {
            log.line(&format!("FAIL open: {e}"));
            std::process::exit(2);
        }
    };
    log.line(&format!("READY {}", clock.now().as_micros()));
    let known = Arc::new(Mutex::new(Vec::<(Uuid, Uuid, String)>::new()));
    for tid in 0..THREADS {
        let (q, clock, log, known) = (q.clone(), clock.clone(), log.clone(), known.clone());
        std::thread::spawn(move || {
            let mut w = Worker {
                tid,
                rng: Rng(seed ^ (tid + 1).wrapping_mul(0x1234_5678_9abc_def1)),
                q,
                clock,
                log,
                known,
                held: Vec::new(),
                pools: pools(lineage),
                queues: queues(lineage),
                cycle,
                n: 0,
            };
            loop {
                if let Err(e) = w.step() {
                    w.log.line(&format!("FAIL t{tid}: {e}"));
                    std::process::exit(2);
                }
            }
        });
    }
    std::thread::sleep(CHILD_LIFETIME);
    log.line("FAIL nobody killed the child");
    std::process::exit(3);
}

struct Worker {
    tid: u64,
    rng: Rng,
    q: Queue,
    clock: ManualClock,
    log: Arc<Log>,
    known: Arc<Mutex<Vec<(Uuid, Uuid, String)>>>,
    held: Vec<Reservation>,
    pools: [Uuid; 2],
    queues: [Uuid; 2],
    cycle: u64,
    n: u64,
}

impl Worker {
    fn begin(&self, op: &str, pool: Option<Uuid>, id: Option<Uuid>) {
        let pool = pool.map_or("-".into(), |p| p.to_string());
        let id = id.map_or("-".into(), |p| p.to_string());
        self.log.line(&format!("B {} {op} {pool} {id}", self.tid));
    }

    fn end(&self, rest: &str) {
        self.log.line(&format!("E {} {rest}", self.tid));
    }

    fn pick_pool(&mut self) -> Uuid {
        self.pools[self.rng.below(2) as usize]
    }

    fn step(&mut self) -> Result<(), Error> {
        let roll = self.rng.below(100);
        match roll {
            0..30 => self.enqueue(),
            30..55 => self.reserve(),
            55..85 if !self.held.is_empty() => self.lease_op(),
            55..85 => self.reserve(),
            85..91 => self.expire(),
            91..96 => {
                self.begin("adv", None, None);
                self.clock
                    .advance(Duration::from_millis(500 + self.rng.below(4500)));
                self.end(&format!("adv {}", self.clock.now().as_micros()));
                Ok(())
            }
            _ => {
                let pool = self.pick_pool();
                self.begin("wake", Some(pool), None);
                let w = self.q.wake_dispatchers(pool)?;
                self.end(&format!("wake {pool} {}", w.sequence));
                Ok(())
            }
        }
    }

    fn enqueue(&mut self) -> Result<(), Error> {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let pick =
            (!known.is_empty()).then(|| known[self.rng.below(known.len() as u64) as usize].clone());
        let roll = self.rng.below(100);
        self.n += 1;
        let fresh_key = format!("c{}-t{}-{}", self.cycle, self.tid, self.n);
        let (pool, id, key) = match (roll, pick) {
            (0..15, Some((p, i, k))) => (p, i, k), // duplicate by id
            (15..25, Some((p, _, k))) => (p, self.rng.uuid(), k), // duplicate by key
            (25..30, Some((p, i, _))) => (p, i, fresh_key), // id conflict
            _ => (self.pick_pool(), self.rng.uuid(), fresh_key),
        };
        let kind = if self.rng.below(2) == 0 {
            CleanupKind::CancellingTimeoutTeardown
        } else {
            CleanupKind::PendingClaimTeardown
        };
        let mut m = NewMessage::new(pool, id, key.clone(), kind, json!({"flow_run_id": key}));
        if self.rng.below(3) > 0 {
            m = m.work_queue(self.queues[self.rng.below(2) as usize]);
        }
        if self.rng.below(2) == 0 {
            m = m.data(json!({"n": self.n}));
        }
        self.begin("enq", Some(pool), Some(id));
        match self.q.enqueue_detailed(m) {
            Ok(e) => {
                let s = &e.message;
                self.end(&format!(
                    "enq {pool} {id} {} {} {} {}",
                    s.idempotency_key,
                    s.message_id,
                    u8::from(e.duplicate),
                    s.delivery_count
                ));
                if !e.duplicate {
                    self.known
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((pool, id, key));
                }
                Ok(())
            }
            Err(Error::InvalidInput(InputError::MessageIdConflict)) => {
                self.end(&format!("enqerr {pool} {id}"));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn filter(&mut self) -> ReserveFilter {
        let mut f = ReserveFilter::any();
        match self.rng.below(10) {
            0..=5 => {}
            6 => f = f.kinds([CleanupKind::PendingClaimTeardown]),
            7 => f = f.queues([self.queues[0]], true),
            8 => f = f.queues([self.queues[1]], false),
            _ => {
                f = f
                    .kinds([CleanupKind::CancellingTimeoutTeardown])
                    .queues(self.queues, self.rng.below(2) == 0)
            }
        }
        f
    }

    fn reserve(&mut self) -> Result<(), Error> {
        let pool = self.pick_pool();
        let filter = self.filter();
        self.begin("res", Some(pool), None);
        let r = self.q.reserve_detailed(pool, &filter)?;
        let x = entries(r.expired.redelivered.iter().map(|m| {
            (
                m.work_pool_id,
                m.message_id,
                m.idempotency_key.as_str(),
                m.delivery_count,
            )
        }));
        let d = entries(
            r.expired
                .dead_lettered
                .iter()
                .chain(&r.dead_lettered)
                .map(|dl| {
                    let m = &dl.message;
                    (
                        m.work_pool_id,
                        m.message_id,
                        m.idempotency_key.as_str(),
                        dl.final_delivery_count,
                    )
                }),
        );
        match r.reservation {
            Some(res) => {
                let m = &res.message;
                self.end(&format!(
                    "res {pool} {} {} {} {} {} {x} {d}",
                    m.message_id,
                    m.idempotency_key,
                    res.reservation_token,
                    m.delivery_count,
                    res.lease_expires_at.as_micros()
                ));
                self.held.push(res);
            }
            None => self.end(&format!("res {pool} - - - 0 0 {x} {d}")),
        }
        Ok(())
    }

    fn lease_op(&mut self) -> Result<(), Error> {
        let i = self.rng.below(self.held.len() as u64) as usize;
        let r = self.held[i].clone();
        let pool = r.message.work_pool_id;
        let id = r.message.message_id;
        let token = if self.rng.below(12) == 0 {
            "not-the-token-0000000000000000000000000000".to_string()
        } else {
            r.reservation_token.clone()
        };
        let roll = self.rng.below(100);
        self.begin("lease", Some(pool), Some(id));
        let (op, res) = match roll {
            0..45 => ("ack", self.q.ack(pool, id, &token)?),
            45..70 => (
                "release",
                self.q.release(pool, id, &token, "worker gave up")?,
            ),
            _ => ("renew", self.q.renew(pool, id, &token)?),
        };
        self.end(&format!(
            "lease {op} {pool} {id} {token} {} {}",
            res.status.as_str(),
            res.lease_expires_at.map_or(0, |t| t.as_micros()),
        ));
        let keep = match res.status {
            OpStatus::Accepted => res.operation == Operation::Renew,
            OpStatus::InvalidToken => true,
            _ => false,
        };
        if keep {
            if let Some(t) = res.lease_expires_at {
                self.held[i].lease_expires_at = t;
            }
        } else {
            self.held.swap_remove(i);
        }
        Ok(())
    }

    fn expire(&mut self) -> Result<(), Error> {
        let pool = (self.rng.below(2) == 0).then(|| self.pick_pool());
        let limit = 1 + self.rng.below(5) as usize;
        self.begin("exp", pool, None);
        let r = self.q.expire_leases(limit, pool)?;
        let x = entries(r.redelivered.iter().map(|m| {
            (
                m.work_pool_id,
                m.message_id,
                m.idempotency_key.as_str(),
                m.delivery_count,
            )
        }));
        let d = entries(r.dead_lettered.iter().map(|dl| {
            let m = &dl.message;
            (
                m.work_pool_id,
                m.message_id,
                m.idempotency_key.as_str(),
                dl.final_delivery_count,
            )
        }));
        let pool = pool.map_or("-".into(), |p| p.to_string());
        self.end(&format!("exp {pool} {x} {d}"));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The parent: parsing the log

/// What the log says about one message.
#[derive(Debug, Default)]
struct Facts {
    pool: Uuid,
    key: String,
    /// Highest delivery count any acknowledged result showed.
    max_count: u32,
    /// Acknowledged reservations: count -> (token, latest acknowledged lease).
    reservations: BTreeMap<u32, (String, i64)>,
    /// Reservation counts known to have ended.
    ended: BTreeSet<u32>,
    acked: bool,
    dead: bool,
}

/// An operation that began but whose `E` line is missing: it may or may not have happened.
#[derive(Debug, Clone)]
struct InFlight {
    op: String,
    pool: Option<Uuid>,
    id: Option<Uuid>,
}

#[derive(Debug, Default)]
struct Parsed {
    ready: bool,
    facts: BTreeMap<(Uuid, Uuid), Facts>,
    in_flight: Vec<InFlight>,
    /// (pool, key) -> the message ids acknowledged for it.
    keys: BTreeMap<(Uuid, String), BTreeSet<Uuid>>,
    wakes: BTreeMap<Uuid, u64>,
    completed: usize,
    failure: Option<String>,
}

fn uuid(s: &str) -> Result<Uuid, String> {
    Uuid::parse_str(s).map_err(|e| format!("bad uuid {s:?}: {e}"))
}

fn num<T: FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("bad number {s:?}"))
}

impl Parsed {
    fn fact(&mut self, pool: Uuid, id: Uuid, key: &str) -> &mut Facts {
        let f = self.facts.entry((pool, id)).or_default();
        f.pool = pool;
        if f.key.is_empty() {
            f.key = key.to_string();
        }
        f
    }

    fn sighting(&mut self, pool: Uuid, id: Uuid, key: &str, count: u32) {
        let f = self.fact(pool, id, key);
        f.max_count = f.max_count.max(count);
    }

    /// `pool/id/key/count,...` of messages whose reservation ended by expiry.
    fn expired_list(&mut self, s: &str, dead: bool) -> Result<(), String> {
        if s == "-" {
            return Ok(());
        }
        for e in s.split(',') {
            let p: Vec<&str> = e.split('/').collect();
            let [pool, id, key, count] = p[..] else {
                return Err(format!("bad entry {e}"));
            };
            let (pool, id, count) = (uuid(pool)?, uuid(id)?, num::<u32>(count)?);
            self.sighting(pool, id, key, count);
            let f = self.fact(pool, id, key);
            f.ended.insert(count);
            if dead {
                f.dead = true;
            }
        }
        Ok(())
    }

    fn end_line(&mut self, w: &[&str]) -> Result<(), String> {
        match w {
            ["enq", pool, _id, key, stored, _dup, count] => {
                let (pool, stored) = (uuid(pool)?, uuid(stored)?);
                self.sighting(pool, stored, key, num(count)?);
                self.keys
                    .entry((pool, key.to_string()))
                    .or_default()
                    .insert(stored);
            }
            ["enqerr", _, _] => {}
            ["res", pool, id, key, token, count, lease, x, d] => {
                self.expired_list(x, false)?;
                self.expired_list(d, true)?;
                if *id != "-" {
                    let (pool, id, count) = (uuid(pool)?, uuid(id)?, num::<u32>(count)?);
                    self.sighting(pool, id, key, count);
                    let f = self.fact(pool, id, key);
                    f.reservations
                        .insert(count, (token.to_string(), num(lease)?));
                }
            }
            ["lease", op, pool, id, token, status, lease] => {
                let (pool, id) = (uuid(pool)?, uuid(id)?);
                let f = self
                    .facts
                    .get_mut(&(pool, id))
                    .ok_or_else(|| format!("lease op on {id} that was never reserved"))?;
                let count = f
                    .reservations
                    .iter()
                    .find(|(_, (t, _))| t == token)
                    .map(|(c, _)| *c);
                let Some(count) = count else {
                    // A bogus token: nothing can have changed.
                    if *status != "invalid_token"
                        && *status != "not_current"
                        && *status != "not_found"
                    {
                        return Err(format!("a bogus token got {status}"));
                    }
                    return Ok(());
                };
                match (*op, *status) {
                    ("ack", "accepted") => {
                        f.acked = true;
                        f.ended.insert(count);
                    }
                    ("renew", "accepted") => {
                        let l: i64 = num(lease)?;
                        if let Some(r) = f.reservations.get_mut(&count) {
                            r.1 = r.1.max(l);
                        }
                    }
                    (_, "accepted") | (_, "expired") => {
                        f.ended.insert(count);
                    }
                    (_, "dead_lettered") => {
                        f.ended.insert(count);
                        f.dead = true;
                    }
                    _ => {}
                }
            }
            ["exp", _pool, x, d] => {
                self.expired_list(x, false)?;
                self.expired_list(d, true)?;
            }
            ["wake", pool, seq] => {
                let e = self.wakes.entry(uuid(pool)?).or_default();
                *e = (*e).max(num(seq)?);
            }
            ["adv", _] => {}
            other => return Err(format!("unknown end line {other:?}")),
        }
        Ok(())
    }
}

fn parse(log: &str) -> Result<Parsed, String> {
    let mut p = Parsed::default();
    let mut open: HashMap<String, InFlight> = HashMap::new();
    // Only complete lines count: the last one may have been cut by the kill.
    let complete = match log.rfind('\n') {
        Some(i) => &log[..=i],
        None => "",
    };
    for line in complete.lines() {
        let w: Vec<&str> = line.split(' ').collect();
        match w[..] {
            ["READY", _] => p.ready = true,
            ["FAIL", ..] => p.failure = Some(line.to_string()),
            ["B", tid, op, pool, id] => {
                let f = InFlight {
                    op: op.to_string(),
                    pool: (pool != "-").then(|| uuid(pool)).transpose()?,
                    id: (id != "-").then(|| uuid(id)).transpose()?,
                };
                open.insert(tid.to_string(), f);
            }
            ["E", tid, ..] => {
                open.remove(tid);
                p.end_line(&w[2..])
                    .map_err(|e| format!("{e} in line {line:?}"))?;
                p.completed += 1;
            }
            _ => return Err(format!("unparsable log line {line:?}")),
        }
    }
    p.in_flight = open.into_values().collect();
    Ok(p)
}

// ---------------------------------------------------------------------------------------
// The parent: checking the reopened database

#[derive(Debug, PartialEq)]
enum Observed {
    Reserved {
        token: String,
        count: u32,
        lease: i64,
    },
    Visible {
        count: u32,
    },
    Dead {
        count: u32,
    },
    Tombstone {
        count: u32,
    },
    Missing,
}

impl Observed {
    fn count(&self) -> Option<u32> {
        match self {
            Observed::Reserved { count, .. }
            | Observed::Visible { count }
            | Observed::Dead { count }
            | Observed::Tombstone { count } => Some(*count),
            Observed::Missing => None,
        }
    }
}

fn observe(q: &Queue, pool: Uuid, id: Uuid) -> Result<Observed, Error> {
    if let Some(r) = q.read_reservation(pool, id)? {
        return Ok(Observed::Reserved {
            token: r.reservation_token,
            count: r.message.delivery_count,
            lease: r.lease_expires_at.as_micros(),
        });
    }
    if let Some(m) = q.read_message(pool, id)? {
        return Ok(Observed::Visible {
            count: m.delivery_count,
        });
    }
    if let Some(d) = q.read_dead_letter(pool, id)? {
        return Ok(Observed::Dead {
            count: d.final_delivery_count,
        });
    }
    Ok(Observed::Missing)
}

/// Whether an operation in flight at the kill could have changed this message.
fn touchable(in_flight: &[InFlight], pool: Uuid, id: Uuid) -> bool {
    in_flight.iter().any(|f| match f.op.as_str() {
        "res" => f.pool == Some(pool),
        "exp" => f.pool.is_none() || f.pool == Some(pool),
        "lease" => f.id == Some(id),
        _ => false,
    })
}

/// Runs every check; returns the violations.
fn verify(q: &Queue, p: &Parsed) -> Result<Vec<String>, Error> {
    let mut bad = Vec::new();
    let mut observed = BTreeMap::new();
    // Reads first (they change nothing), then the probes (which may bump wakeups).
    for ((pool, id), f) in &p.facts {
        let o = observe(q, *pool, *id)?;
        let touch = touchable(&p.in_flight, *pool, *id);
        let at = format!("message {id} (pool {pool}, key {})", f.key);
        if let Some(c) = o.count() {
            if c < f.max_count {
                bad.push(format!(
                    "{at}: delivery count went back from {} to {c} ({o:?})",
                    f.max_count
                ));
            }
        }
        if f.dead && !matches!(o, Observed::Dead { .. }) {
            bad.push(format!("{at}: acknowledged dead letter is {o:?}"));
        }
        if matches!(o, Observed::Dead { .. }) && !f.dead && !touch {
            bad.push(format!(
                "{at}: dead letter no acknowledged or in-flight operation made"
            ));
        }
        if let Observed::Reserved {
            token,
            count,
            lease,
        } = &o
        {
            match f.reservations.get(count) {
                Some((t, l)) => {
                    if t != token {
                        bad.push(format!("{at}: delivery {count} holds another token"));
                    }
                    if f.ended.contains(count) {
                        bad.push(format!(
                            "{at}: reservation {count} came back after it ended"
                        ));
                    }
                    if lease < l {
                        bad.push(format!(
                            "{at}: lease {lease} is behind the acknowledged {l} (lost renew)"
                        ));
                    }
                }
                None => {
                    // Only a reserve in flight at the kill can have made a reservation no
                    // acknowledged reserve returned. Its delivery may already have been
                    // seen by another thread's acknowledged call (a duplicate enqueue
                    // returns the stored count) before the reserve logged its own return,
                    // so a count equal to the highest seen is fine unless that delivery
                    // is known to have ended; a lower one is caught above.
                    let reserving = p
                        .in_flight
                        .iter()
                        .any(|i| i.op == "res" && i.pool == Some(*pool));
                    if !reserving || *count < f.max_count || f.ended.contains(count) {
                        bad.push(format!(
                            "{at}: reserved (delivery {count}) by no acknowledged or in-flight reserve"
                        ));
                    }
                }
            }
        }
        // The latest acknowledged reservation must still be held unless something ended it.
        if let Some((count, (token, lease))) = f.reservations.iter().next_back() {
            let open = !f.ended.contains(count) && *count == f.max_count && !f.acked && !f.dead;
            if open && !touch {
                let want = matches!(&o, Observed::Reserved { token: t, count: c, lease: l }
                    if t == token && c == count && l >= lease);
                if !want {
                    bad.push(format!(
                        "{at}: acknowledged reservation {count} (nothing ended it, nothing in flight) is {o:?}"
                    ));
                }
            }
        }
        observed.insert((*pool, *id), o);
    }
    for (pool, seq) in &p.wakes {
        let now = q.read_wakeup_sequence(*pool)?;
        if now < *seq {
            bad.push(format!(
                "pool {pool}: wakeup sequence {now} is behind the acknowledged {seq}"
            ));
        }
    }
    // Tombstones: a same-id, same-key enqueue of an acked message is a duplicate.
    for ((pool, id), f) in &p.facts {
        let o = &observed[&(*pool, *id)];
        let at = format!("message {id} (pool {pool}, key {})", f.key);
        let o = match o {
            Observed::Missing => {
                let e = q.enqueue_detailed(NewMessage::new(
                    *pool,
                    *id,
                    f.key.clone(),
                    CleanupKind::CancellingTimeoutTeardown,
                    json!({"probe": true}),
                ))?;
                if e.duplicate {
                    Observed::Tombstone {
                        count: e.message.delivery_count,
                    }
                } else {
                    bad.push(format!("{at}: acknowledged message is gone"));
                    continue;
                }
            }
            other => {
                if f.acked {
                    bad.push(format!(
                        "{at}: acknowledged ack, but the message is {other:?}"
                    ));
                }
                continue;
            }
        };
        if let Some(c) = o.count() {
            if c < f.max_count {
                bad.push(format!(
                    "{at}: tombstone's delivery count {c} < {}",
                    f.max_count
                ));
            }
        }
        if !f.acked && !touch_ack(&p.in_flight, *id) {
            bad.push(format!(
                "{at}: tombstone no acknowledged or in-flight ack made"
            ));
        }
    }
    // One message per idempotency key: an enqueue under a fresh id is a duplicate of it.
    for ((pool, key), ids) in &p.keys {
        if ids.len() != 1 {
            bad.push(format!(
                "pool {pool} key {key}: acknowledged as several ids {ids:?}"
            ));
            continue;
        }
        let e = q.enqueue_detailed(NewMessage::new(
            *pool,
            Uuid::new_v4(),
            key.clone(),
            CleanupKind::PendingClaimTeardown,
            json!({"probe": true}),
        ))?;
        if !e.duplicate || !ids.contains(&e.message.message_id) {
            bad.push(format!(
                "pool {pool} key {key}: a fresh-id enqueue gave {} (duplicate {}), expected {ids:?}",
                e.message.message_id, e.duplicate
            ));
        }
    }
    Ok(bad)
}

fn touch_ack(in_flight: &[InFlight], id: Uuid) -> bool {
    in_flight
        .iter()
        .any(|f| f.op == "lease" && f.id == Some(id))
}

/// After the checks: every lapsed lease expires (waking its pool), and a fresh round works.
fn keeps_working(q: &Queue, clock: &ManualClock, lineage: u64) -> Result<Vec<String>, Error> {
    let mut bad = Vec::new();
    clock.advance(DAY / 2);
    let before: Vec<u64> = pools(lineage)
        .iter()
        .map(|p| q.read_wakeup_sequence(*p))
        .collect::<Result<_, _>>()?;
    let mut expired = cleanup_queue::LeaseExpiryResult::default();
    loop {
        let r = q.expire_leases(100, None)?;
        if r.is_empty() {
            break;
        }
        expired.redelivered.extend(r.redelivered);
        expired.dead_lettered.extend(r.dead_lettered);
    }
    for (i, pool) in pools(lineage).iter().enumerate() {
        let after = q.read_wakeup_sequence(*pool)?;
        let redelivered = expired.redelivered.iter().any(|m| m.work_pool_id == *pool);
        if redelivered && after <= before[i] {
            bad.push(format!(
                "pool {pool}: leases lapsed across the crash were redelivered without a wake"
            ));
        }
    }
    let pool = Uuid::new_v4();
    let id = Uuid::new_v4();
    q.enqueue(NewMessage::new(
        pool,
        id,
        "after-the-crash",
        CleanupKind::PendingClaimTeardown,
        json!({}),
    ))?;
    match q.reserve(pool, &ReserveFilter::any())? {
        Some(r) if r.message.message_id == id => {
            let done = q.ack(pool, id, &r.reservation_token)?;
            if done.status != OpStatus::Accepted {
                bad.push(format!("fresh ack after the crash: {done:?}"));
            }
        }
        other => bad.push(format!("fresh reserve after the crash: {other:?}")),
    }
    for pool in pools(lineage) {
        while let Some(r) = q.reserve(pool, &ReserveFilter::any())? {
            q.ack(pool, r.message.message_id, &r.reservation_token)?;
        }
    }
    Ok(bad)
}

// ---------------------------------------------------------------------------------------
// The parent: cycles

struct CycleReport {
    completed_ops: usize,
    in_flight: usize,
    messages: usize,
}

/// When the parent kills the child.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// Random: one kill in six during start-up, the others a random time into the workload.
    Random,
    /// Once the log holds at least this many acknowledged operations.
    AfterOps(usize),
}

fn run_cycle(
    durability: Durability,
    db: &Path,
    log_path: &Path,
    seed: u64,
    cycle: u64,
    lineage: u64,
    kill: Kill,
) -> Result<CycleReport, String> {
    let mut rng = Rng(seed);
    let _ = fs::remove_file(log_path);
    File::create(log_path).map_err(|e| e.to_string())?;
    let spec = format!(
        "{}|{}|{seed}|{}|{cycle}|{lineage}",
        db.display(),
        log_path.display(),
        mode_name(durability)
    );
    let stderr_path = log_path.with_extension("stderr");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, spec)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&stderr_path).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("spawn child: {e}"))?;
    let spawned = Instant::now();
    // One kill in six lands at a random instant of the start-up (maybe during the open);
    // the rest land a random time into the workload.
    let early = matches!(kill, Kill::Random) && rng.below(6) == 0;
    let min_ops = match kill {
        Kill::AfterOps(n) => n,
        Kill::Random => 0,
    };
    let delay = if let Kill::AfterOps(_) = kill {
        Duration::ZERO
    } else if early {
        Duration::from_millis(rng.below(150))
    } else {
        Duration::from_millis(30 + rng.below(400))
    };
    if !early {
        loop {
            let text = fs::read_to_string(log_path).unwrap_or_default();
            let ops = text.lines().filter(|l| l.starts_with("E ")).count();
            if (text.contains("READY") && ops >= min_ops) || text.contains("FAIL") {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let err = fs::read_to_string(&stderr_path).unwrap_or_default();
                return Err(format!("child exited early ({status}): {err}"));
            }
            if spawned.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                return Err("child never became ready".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    std::thread::sleep(delay);
    if let Ok(Some(status)) = child.try_wait() {
        let log = fs::read_to_string(log_path).unwrap_or_default();
        let err = fs::read_to_string(&stderr_path).unwrap_or_default();
        let fail: Vec<&str> = log.lines().filter(|l| l.starts_with("FAIL")).collect();
        return Err(format!(
            "child exited on its own ({status}): {fail:?} {err}"
        ));
    }
    child.kill().map_err(|e| format!("kill: {e}"))?; // SIGKILL
    child.wait().map_err(|e| format!("wait: {e}"))?;

    let text = fs::read_to_string(log_path).map_err(|e| e.to_string())?;
    let parsed = parse(&text)?;
    if let Some(f) = &parsed.failure {
        return Err(format!("the child failed: {f}"));
    }
    if !early && !parsed.ready {
        return Err("killed after READY, but the log has no READY".into());
    }
    let clock = ManualClock::new(START.saturating_add(DAY * cycle as u32));
    let q = builder(db, &clock, durability)
        .open()
        .map_err(|e| format!("reopen after the kill: {e}"))?;
    let mut bad = q
        .check_integrity()
        .map_err(|e| format!("check_integrity: {e}"))?;
    bad.extend(verify(&q, &parsed).map_err(|e| format!("verify: {e}"))?);
    bad.extend(keeps_working(&q, &clock, lineage).map_err(|e| format!("afterwards: {e}"))?);
    bad.extend(
        q.check_integrity()
            .map_err(|e| format!("check_integrity afterwards: {e}"))?,
    );
    drop(q);
    if !bad.is_empty() {
        let mut s = String::new();
        for b in bad.iter().take(20) {
            let _ = writeln!(s, "  {b}");
        }
        let _ = writeln!(s, "  in flight at the kill: {:?}", parsed.in_flight);
        return Err(s);
    }
    Ok(CycleReport {
        completed_ops: parsed.completed,
        in_flight: parsed.in_flight.len(),
        messages: parsed.facts.len(),
    })
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn keep_for_postmortem(dir: &Path, seed: u64) -> PathBuf {
    let to = std::env::temp_dir().join(format!("cleanup-queue-crash-{seed:x}"));
    let _ = fs::remove_dir_all(&to);
    let _ = copy_dir(dir, &to);
    to
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn crash_cycles(durability: Durability) {
    let cycles = env_u64("CLEANUP_QUEUE_CRASH_CYCLES").unwrap_or(CYCLES_PER_MODE);
    let base = env_u64("CLEANUP_QUEUE_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let started = Instant::now();
    let mut lineage_dir = None;
    let mut lineage = 0;
    let (mut ops, mut in_flight, mut messages) = (0, 0, 0);
    for cycle in 0..cycles {
        let seed = base.wrapping_add(cycle).wrapping_mul(0x2545_f491_4f6c_dd1d) ^ cycle;
        // A new database every fourth cycle; the others reopen the last one.
        if cycle % 4 == 0 || lineage_dir.is_none() {
            lineage = seed;
            lineage_dir = Some(tempfile::tempdir().expect("tempdir"));
        }
        let dir = lineage_dir.as_ref().expect("dir").path();
        let db = dir.join("db");
        let log = dir.join("ops.log");
        match run_cycle(durability, &db, &log, seed, cycle, lineage, Kill::Random) {
            Ok(r) => {
                ops += r.completed_ops;
                in_flight += r.in_flight;
                messages += r.messages;
            }
            Err(e) => {
                let kept = keep_for_postmortem(dir, seed);
                // Beside the database too: a filtered or lost test log must not lose it.
                let _ = fs::write(kept.join("failure.txt"), format!("cycle {cycle}: {e}\n"));
                panic!(
                    "crash cycle {cycle} ({} mode) failed; base seed {base}, cycle seed {seed}, \
                     database and log kept at {}:\n{e}",
                    mode_name(durability),
                    kept.display()
                );
            }
        }
    }
    println!(
        "crash recovery ({}): {cycles} kill cycles in {:?}, base seed {base}; {ops} acknowledged \
         operations, {in_flight} in flight at the kills, {messages} messages checked",
        mode_name(durability),
        started.elapsed()
    );
}

#[test]
fn kill_9_loses_nothing_acknowledged_fsync() {
    crash_cycles(Durability::Fsync);
}

#[test]
fn kill_9_loses_nothing_acknowledged_flush() {
    crash_cycles(Durability::Flush);
}

/// The harness is not vacuous: in `Buffered` mode with a long flush interval, a kill loses
/// acknowledged operations, and the checks must say so.
///
/// Postmortem (flaky at 1 run in 4 in its first form): whether a kill in buffered mode loses
/// anything depends on whether sled's IO threads happened to write the sealed log buffer
/// before the kill, so one cycle cannot be required to lose data. The test now runs up to
/// ten cycles and requires that at least one loses acknowledged operations and is caught;
/// every cycle, lossy or not, must recover a consistent state. Its first form also accepted
/// only three of the five ways the checks report a lost acknowledged operation.
#[test]
fn the_harness_catches_lost_acknowledged_operations_in_buffered_mode() {
    let durability = Durability::Buffered {
        every: Duration::from_secs(600),
    };
    let mut lossless = Vec::new();
    for seed in 42..52 {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = run_cycle(
            durability,
            &dir.path().join("db"),
            &dir.path().join("ops.log"),
            seed,
            0,
            seed,
            Kill::AfterOps(40),
        );
        // What buffered mode does promise: the state it recovers is consistent.
        let clock = ManualClock::new(START);
        let q = builder(&dir.path().join("db"), &clock, durability)
            .open()
            .expect("reopen");
        assert_eq!(
            q.check_integrity().expect("integrity"),
            Vec::<String>::new()
        );
        match r {
            Err(e) => {
                // Every way a lost acknowledged operation shows: a message gone, a
                // reservation or wake behind, an ended reservation back, a count going back.
                let lost = [
                    "is gone",
                    "is Missing",
                    "behind",
                    "came back after it ended",
                    "went back",
                ];
                assert!(lost.iter().any(|l| e.contains(l)), "{e}");
                return;
            }
            Ok(r) => lossless.push(r.completed_ops),
        }
    }
    panic!(
        "ten buffered-mode kills lost nothing the harness noticed (acknowledged operations per cycle: {lossless:?})"
    );
}

#[test]
fn the_log_parser_tracks_in_flight_operations_and_cut_lines() {
    let pool = Uuid::from_u128(1);
    let id = Uuid::from_u128(2);
    let log = format!(
        "READY 0\nB 0 res {pool} -\nE 0 res {pool} {id} k tok 1 5 - -\nB 0 lease {pool} {id}\n\
         B 1 exp - -\nE 1 exp - - -\nB 2 wake {pool} -\nE 2 wake {pool} 4\nB 2 enq {pool} {id}\nE 2 en"
    );
    let p = parse(&log).expect("parse");
    assert!(p.ready);
    assert_eq!(p.completed, 3);
    assert_eq!(p.in_flight.len(), 2, "{:?}", p.in_flight);
    let f = &p.facts[&(pool, id)];
    assert_eq!(f.reservations[&1], ("tok".to_string(), 5));
    assert_eq!(p.wakes[&pool], 4);
    assert!(touchable(&p.in_flight, pool, id));
}
