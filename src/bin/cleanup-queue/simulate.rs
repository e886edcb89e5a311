//! `simulate`: a production-shaped workload on an embedded database, then an audit.
//!
//! Per pool: C dispatcher threads block on the pool's wakeup sequence and reserve for idle
//! workers (first restricted to the worker's work queue without fallback, then with
//! fallback); W workers hold each lease for a random handling time, renew before it ends, and
//! then ack (~90 %), release with a reason (~5 %) or abandon the reservation (~5 %: the lease
//! lapses and the sweeper redelivers until the attempts run out and the message goes to the
//! DLQ). Producers enqueue in bursts, with ~10 % exact duplicates. When the producers are
//! done, workers drain the queue, and the audit checks that every message is accounted for
//! exactly once, that no message was ever reserved twice at the same time, that duplicates
//! were answered as duplicates, that the engine's counters agree, and that
//! `check_integrity()` is clean.
//!
//! With `--clock simulated` the engine reads a `ManualClock` that a driver thread advances
//! `--time-scale` times faster than real time, so hours of lease behaviour run in seconds.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use cleanup_queue::{
    CleanupKind, Counter, Durability, ManualClock, NewMessage, OpStatus, Queue, Reservation,
    ReserveFilter, Timestamp,
};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::report::{grouped, human_bytes, human_duration, Align, Latency, Table};
use crate::rng::SplitMix;
use crate::{emit, emit_json, parse_durability, parse_duration, progress_allowed, CliResult, Fail};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ClockKind {
    /// The real clock: leases last real seconds.
    System,
    /// A manual clock advanced by a driver thread `--time-scale` times faster than real time.
    Simulated,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// How long the producers run (real time; seconds, or 90s / 2m). Producers that fall
    /// behind get a quarter of it more, then stop short of --messages.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Work pools.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pools: u32,
    /// Distinct messages to enqueue over the duration (duplicates come on top).
    #[arg(long, default_value_t = 3000)]
    messages: u64,
    /// Workers per pool.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=1000))]
    workers: u32,
    /// Dispatcher threads per pool.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    dispatchers: u32,
    /// Work queues per pool (workers are spread over them; 20 % of messages have no queue).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    queues: u32,
    /// Producer threads.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100))]
    producers: u32,
    /// Seed for pool ids, payloads and every random decision (default: from the time).
    #[arg(long)]
    seed: Option<u64>,
    /// fsync (the default), flush, or buffered.
    #[arg(long, value_parser = parse_durability, default_value = "fsync")]
    durability: Durability,
    /// system, or simulated (hours of lease behaviour in seconds).
    #[arg(long, value_enum, default_value_t = ClockKind::System)]
    clock: ClockKind,
    /// Lease duration in engine time (default: 2s with the system clock, 30s simulated).
    #[arg(long, value_parser = parse_duration)]
    lease: Option<Duration>,
    /// Deliveries before a message goes to the dead-letter queue.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_attempts: u32,
    /// With --clock simulated: engine seconds per real second.
    #[arg(long, default_value_t = 300.0)]
    time_scale: f64,
    /// How long (real time) the workers may take to drain the queue after the producers stop.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    drain_timeout: Duration,
    /// Machine-readable report on standard output (no progress bar).
    #[arg(long)]
    json: bool,
}

// ---------------------------------------------------------------------------------------------
// Shared state

/// The operations whose latency is measured.
#[derive(Clone, Copy)]
enum Op {
    Enqueue,
    Reserve,
    ReserveEmpty,
    Ack,
    Release,
    Renew,
}

const OPS: [(Op, &str); 6] = [
    (Op::Enqueue, "enqueue"),
    (Op::Reserve, "reserve (hit)"),
    (Op::ReserveEmpty, "reserve (empty)"),
    (Op::Ack, "ack"),
    (Op::Release, "release"),
    (Op::Renew, "renew"),
];

/// Per-thread latency samples in microseconds, indexed by `Op as usize`.
#[derive(Default)]
struct Samples([Vec<u64>; 6]);

impl Samples {
    fn time<T>(&mut self, op: Op, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.0[op as usize].push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
        out
    }

    fn merge(&mut self, other: Samples) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            a.extend(b);
        }
    }
}

/// Simulator counters.
#[derive(Clone, Copy)]
enum C {
    Enqueued,
    Duplicates,
    Delivered,
    Acked,
    Released,
    ReleasedToDlq,
    Abandoned,
    Renewed,
    LostLease,
    WaitWoken,
    WaitTimedOut,
    ReservedFallback,
    BadDuplicate,
}
const N_COUNTERS: usize = 13;

/// A reservation the simulator believes is live: its token and until when (engine time).
struct Live {
    token: String,
    reserved_at: Timestamp,
    until: Timestamp,
}

#[derive(Clone)]
enum SimClock {
    System,
    Manual { clock: ManualClock, scale: f64 },
}

struct Shared {
    queue: Queue,
    clock: SimClock,
    lease: Duration,
    counters: [AtomicU64; N_COUNTERS],
    /// Every distinct message enqueued: (pool, id).
    ledger: Mutex<HashSet<(Uuid, Uuid)>>,
    /// Accepted acks per message.
    acks: Mutex<HashMap<(Uuid, Uuid), u32>>,
    /// The live-reservation map: (pool, id) -> the reservation believed live.
    live: Mutex<HashMap<(Uuid, Uuid), Live>>,
    reservations_checked: AtomicU64,
    violations: Mutex<Vec<String>>,
    violation_count: AtomicU64,
    errors: Mutex<Vec<String>>,
    stop_all: AtomicBool,
    abort: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn inc(&self, c: C) {
        self.counters[c as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self, c: C) -> u64 {
        self.counters[c as usize].load(Ordering::Relaxed)
    }

    fn violation(&self, v: String) {
        self.violation_count.fetch_add(1, Ordering::Relaxed);
        let mut all = lock(&self.violations);
        if all.len() < 50 {
            all.push(v);
        }
    }

    /// An engine call failed: record it and stop the run (a healthy engine never fails here).
    fn error(&self, what: &str, e: cleanup_queue::Error) {
        let mut all = lock(&self.errors);
        if all.len() < 50 {
            all.push(format!("{what}: {e}"));
        }
        self.abort.store(true, Ordering::SeqCst);
        self.stop_all.store(true, Ordering::SeqCst);
    }

    fn stopping(&self) -> bool {
        self.stop_all.load(Ordering::Relaxed)
    }

    fn now(&self) -> Timestamp {
        self.queue.now()
    }

    /// Sleeps until the engine clock reads `t` (or the run stops).
    fn sleep_until(&self, t: Timestamp) {
        loop {
            let now = self.now();
            if now >= t || self.stopping() {
                return;
            }
            let left = Duration::from_micros(
                u64::try_from(t.as_micros().saturating_sub(now.as_micros())).unwrap_or(0),
            );
            let real = match &self.clock {
                SimClock::System => {
                    left.clamp(Duration::from_micros(100), Duration::from_millis(20))
                }
                // The driver moves the clock once a millisecond: sleeping less only burns CPU.
                SimClock::Manual { scale, .. } => left
                    .div_f64(*scale)
                    .clamp(Duration::from_millis(1), Duration::from_millis(20)),
            };
            std::thread::sleep(real);
        }
    }

    /// Registers a reservation just granted. Two reservations of one message overlap when the
    /// earlier one was still live when the later one was granted: a violation. Registrations
    /// can arrive out of order (a dispatcher thread can be descheduled between `reserve`
    /// returning and this call), so the newer of the two is kept.
    fn reserved(&self, pool: Uuid, r: &Reservation) {
        self.reservations_checked.fetch_add(1, Ordering::Relaxed);
        let at = r.lease_expires_at.saturating_sub(self.lease);
        let key = (pool, r.message.message_id);
        let new = Live {
            token: r.reservation_token.clone(),
            reserved_at: at,
            until: r.lease_expires_at,
        };
        let mut live = lock(&self.live);
        let (overlap, keep_old) = match live.get(&key) {
            None => (None, false),
            Some(prev) if prev.reserved_at <= at => {
                (Some((prev.reserved_at, prev.until, at)), false)
            }
            Some(prev) => (Some((at, new.until, prev.reserved_at)), true),
        };
        if !keep_old {
            live.insert(key, new);
        }
        drop(live);
        if let Some((first, first_until, second)) = overlap {
            if first_until > second {
                self.violation(format!(
                    "message {} in pool {pool} reserved at {second} while the reservation from {first} was live until {first_until}",
                    r.message.message_id
                ));
            }
        }
    }

    /// Before an ack or release: the reservation ends no later than now.
    fn ending(&self, pool: Uuid, id: Uuid, token: &str) {
        let now = self.now();
        if let Some(l) = lock(&self.live).get_mut(&(pool, id)) {
            if l.token == token && l.until > now {
                l.until = now;
            }
        }
    }

    /// After the reservation is over (ack, release, lost lease): forget it if still ours.
    fn ended(&self, pool: Uuid, id: Uuid, token: &str) {
        let mut live = lock(&self.live);
        if live.get(&(pool, id)).is_some_and(|l| l.token == token) {
            live.remove(&(pool, id));
        }
    }

    /// After an accepted renew.
    fn renewed(&self, pool: Uuid, id: Uuid, token: &str, until: Timestamp) {
        let mut live = lock(&self.live);
        match live.get_mut(&(pool, id)) {
            Some(l) if l.token == token => l.until = until,
            Some(l) if l.reserved_at < until => {
                let v = format!(
                    "message {id} in pool {pool}: renew accepted up to {until} while another reservation from {} exists",
                    l.reserved_at
                );
                drop(live);
                self.violation(v);
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run

struct Topology {
    pools: Vec<Uuid>,
    /// Work queues per pool.
    queues: Vec<Vec<Uuid>>,
}

/// Removes the default temporary database directory when dropped (after the queue).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(db: Option<PathBuf>, args: SimulateArgs) -> CliResult {
    if !(args.time_scale.is_finite() && args.time_scale > 0.0) {
        return Err(Fail::error("--time-scale must be a positive number"));
    }
    if args.duration.is_zero() {
        return Err(Fail::error("--duration must be positive"));
    }
    let seed = args.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        SplitMix::new(t ^ u64::from(std::process::id())).next_u64() % 1_000_000
    });
    let lease = args.lease.unwrap_or(match args.clock {
        ClockKind::System => Duration::from_secs(2),
        ClockKind::Simulated => Duration::from_secs(30),
    });
    if lease.as_micros() == 0 {
        return Err(Fail::error("--lease must be positive"));
    }

    // The database: a fresh temporary directory, or --db (new or empty only).
    let (path, _temp) = match db {
        Some(p) => {
            if p.exists() && !p.is_dir() {
                return Err(Fail::error(format!(
                    "{} exists and is not a directory",
                    p.display()
                )));
            }
            let foreign = p.is_dir()
                && !p.join("db").is_file()
                && std::fs::read_dir(&p)
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(true);
            if foreign {
                return Err(Fail::error(format!(
                    "{} is a directory with other files in it; simulate needs a new or empty database",
                    p.display()
                )));
            }
            (p, None)
        }
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let p = std::env::temp_dir().join(format!(
                "cleanup-queue-simulate-{}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&p)
                .map_err(|e| Fail::error(format!("cannot create {}: {e}", p.display())))?;
            (p.clone(), Some(TempDir(p)))
        }
    };
    let keep = _temp.is_none();

    let clock = match args.clock {
        ClockKind::System => SimClock::System,
        ClockKind::Simulated => SimClock::Manual {
            clock: ManualClock::starting_now(),
            scale: args.time_scale,
        },
    };
    let mut builder = Queue::builder(&path)
        .lease(lease)
        .max_delivery_attempts(args.max_attempts)
        .durability(args.durability);
    builder = match &clock {
        SimClock::System => builder.sweep_interval(Some(Duration::from_millis(250))),
        SimClock::Manual { clock, scale } => builder.clock(clock.clone()).sweep_interval(Some(
            // About a tenth of a lease of engine time, but at least every 10 ms of real time.
            lease.div_f64(10.0 * scale).max(Duration::from_millis(10)),
        )),
    };
    let queue = builder.open()?;
    if !queue.pools()?.is_empty() {
        return Err(Fail::error(format!(
            "{} already holds a queue; simulate needs a new or empty database",
            path.display()
        )));
    }

    let mut rng = SplitMix::new(seed);
    let topo = Arc::new(Topology {
        pools: (0..args.pools).map(|_| rng.uuid()).collect(),
        queues: (0..args.pools)
            .map(|_| (0..args.queues).map(|_| rng.uuid()).collect())
            .collect(),
    });
    let shared = Arc::new(Shared {
        queue: queue.clone(),
        clock: clock.clone(),
        lease,
        counters: Default::default(),
        ledger: Mutex::new(HashSet::new()),
        acks: Mutex::new(HashMap::new()),
        live: Mutex::new(HashMap::new()),
        reservations_checked: AtomicU64::new(0),
        violations: Mutex::new(Vec::new()),
        violation_count: AtomicU64::new(0),
        errors: Mutex::new(Vec::new()),
        stop_all: AtomicBool::new(false),
        abort: AtomicBool::new(false),
    });

    // The clock driver.
    let driver_stop = Arc::new(AtomicBool::new(false));
    let driver = match &clock {
        SimClock::System => None,
        SimClock::Manual { clock, scale } => {
            let (clock, scale, stop) = (clock.clone(), *scale, driver_stop.clone());
            Some(spawn("sim-clock", move || {
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                    let now = Instant::now();
                    clock.advance((now - last).mul_f64(scale));
                    last = now;
                }
                Samples::default()
            })?)
        }
    };
    let engine_start = queue.now();
    let started = Instant::now();

    // Workers and dispatchers, per pool.
    let mut handles: Vec<JoinHandle<Samples>> = Vec::new();
    for (pi, &pool) in topo.pools.iter().enumerate() {
        let (idle_tx, idle_rx) = bounded::<usize>(args.workers as usize);
        let mut job_txs = Vec::new();
        for w in 0..args.workers as usize {
            let (job_tx, job_rx) = bounded::<Reservation>(1);
            job_txs.push(job_tx);
            let sh = shared.clone();
            let idle = idle_tx.clone();
            let rng = SplitMix::fork(seed, 1_000_000 + (pi * 10_000 + w) as u64);
            handles.push(spawn(&format!("worker-{pi}-{w}"), move || {
                worker(&sh, pool, w, idle, job_rx, rng)
            })?);
        }
        let job_txs = Arc::new(job_txs);
        for d in 0..args.dispatchers {
            let sh = shared.clone();
            let (idle_rx, job_txs) = (idle_rx.clone(), job_txs.clone());
            let worker_queues: Vec<Uuid> = (0..args.workers as usize)
                .map(|w| topo.queues[pi][w % topo.queues[pi].len()])
                .collect();
            handles.push(spawn(&format!("dispatcher-{pi}-{d}"), move || {
                dispatcher(&sh, pool, &worker_queues, idle_rx, &job_txs)
            })?);
        }
    }

    // Producers.
    let producing = Arc::new(AtomicUsize::new(args.producers as usize));
    let mut producers = Vec::new();
    for p in 0..args.producers as u64 {
        let share = args.messages / u64::from(args.producers)
            + u64::from(p < args.messages % u64::from(args.producers));
        let (sh, topo, producing) = (shared.clone(), topo.clone(), producing.clone());
        let rng = SplitMix::fork(seed, 2_000_000 + p);
        let duration = args.duration;
        producers.push(spawn(&format!("producer-{p}"), move || {
            let s = producer(&sh, &topo, share, duration, rng);
            producing.fetch_sub(1, Ordering::SeqCst);
            s
        })?);
    }

    // Progress.
    let pb = if args.json || !progress_allowed() {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(args.messages), ProgressDrawTarget::stderr())
    };
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} {prefix} {elapsed_precise} [{bar:25}] {pos}/{len} enqueued  {wide_msg}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix("producing");
    let status = |sh: &Shared| {
        format!(
            "delivered {}  acked {}  released {}  abandoned {}",
            sh.get(C::Delivered),
            sh.get(C::Acked),
            sh.get(C::Released),
            sh.get(C::Abandoned)
        )
    };
    while producing.load(Ordering::SeqCst) > 0 && !shared.abort.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        pb.set_position(shared.get(C::Enqueued));
        pb.set_message(status(&shared));
    }
    let mut samples = Samples::default();
    for h in producers {
        samples.merge(join(h)?);
    }
    let produced_for = started.elapsed();

    // Drain: wait until nothing is visible or reserved.
    pb.set_prefix("draining");
    let drain_started = Instant::now();
    let mut remaining = u64::MAX;
    while !shared.abort.load(Ordering::SeqCst) {
        remaining = 0;
        for &pool in &topo.pools {
            match queue.pool_stats(pool) {
                Ok(s) => remaining += s.visible + s.reserved,
                Err(e) => {
                    shared.error("pool_stats", e);
                    break;
                }
            }
        }
        pb.set_position(shared.get(C::Enqueued));
        pb.set_message(format!("{remaining} active  {}", status(&shared)));
        if remaining == 0 || drain_started.elapsed() >= args.drain_timeout {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let drained_in = drain_started.elapsed();
    shared.stop_all.store(true, Ordering::SeqCst);
    // Wake the dispatchers blocked on their pools so they see the stop at once.
    for &pool in &topo.pools {
        let _ = queue.wake_dispatchers(pool);
    }
    for h in handles {
        samples.merge(join(h)?);
    }
    let wall = started.elapsed();
    let engine_elapsed = crate::report::since(engine_start, queue.now());
    driver_stop.store(true, Ordering::SeqCst);
    if let Some(d) = driver {
        join(d)?;
    }
    pb.finish_and_clear();

    // The audit.
    let audit = audit(&shared, &queue, remaining)?;
    let size = queue.size_on_disk().unwrap_or(0);

    let settings = Settings {
        args: &args,
        seed,
        lease,
        path: &path,
        keep,
    };
    let timing = Timing {
        produced_for,
        drained_in,
        wall,
        engine_elapsed,
    };
    let passed = audit.passed();
    if args.json {
        emit_json(&json_report(
            &settings,
            &timing,
            &shared,
            &queue,
            &mut samples,
            &audit,
            size,
        ))?;
    } else {
        emit(&text_report(
            &settings,
            &timing,
            &shared,
            &queue,
            &mut samples,
            &audit,
            size,
        ))?;
    }
    drop(shared);
    drop(queue);
    if passed {
        Ok(())
    } else {
        Err(Fail::Check(Some("the audit failed".into())))
    }
}

fn spawn(
    name: &str,
    f: impl FnOnce() -> Samples + Send + 'static,
) -> CliResult<JoinHandle<Samples>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Fail::error(format!("cannot start a thread: {e}")))
}

fn join(h: JoinHandle<Samples>) -> CliResult<Samples> {
    h.join()
        .map_err(|_| Fail::error("a simulator thread panicked"))
}

// ---------------------------------------------------------------------------------------------
// Threads

const RELEASE_REASONS: [&str; 4] = [
    "infrastructure API returned 503",
    "worker shutting down",
    "pod still terminating; retry later",
    "rate limited by the cluster",
];

fn producer(
    sh: &Shared,
    topo: &Topology,
    share: u64,
    duration: Duration,
    mut rng: SplitMix,
) -> Samples {
    let mut samples = Samples::default();
    let mut recent: Vec<NewMessage> = Vec::new();
    let start = Instant::now();
    // Spread over 95 % of the duration, so that a little lag does not cut the last burst.
    let per_message = duration.mul_f64(0.95).div_f64(share.max(1) as f64);
    // Messages are paced over the duration; a producer that falls behind (an overloaded
    // machine) gets a quarter of the duration more, then stops short.
    let deadline = duration.mul_f64(1.25);
    let mut made = 0u64;
    while made < share && !sh.stopping() && start.elapsed() < deadline {
        let burst = rng.range(1, 25).min(share - made);
        for _ in 0..burst {
            // About 10 % of enqueues are exact retries of an earlier one (1 in 9 new ones).
            if !recent.is_empty() && rng.chance(0.11) {
                let i = rng.range(0, recent.len() as u64 - 1) as usize;
                let m = recent[i].clone();
                let want = m.message_id;
                match samples.time(Op::Enqueue, || sh.queue.enqueue_detailed(m)) {
                    Ok(e) if e.duplicate && e.message.message_id == want => sh.inc(C::Duplicates),
                    Ok(e) => {
                        sh.inc(C::BadDuplicate);
                        sh.violation(format!(
                            "an exact retry of message {want} was answered with duplicate={} message {}",
                            e.duplicate, e.message.message_id
                        ))
                    }
                    Err(e) => return fail(sh, "enqueue (duplicate)", e, samples),
                }
            }
            let p = rng.range(0, topo.pools.len() as u64 - 1) as usize;
            let pool = topo.pools[p];
            let id = rng.uuid();
            let kind = if rng.chance(0.7) {
                CleanupKind::CancellingTimeoutTeardown
            } else {
                CleanupKind::PendingClaimTeardown
            };
            let flow_run = rng.uuid();
            let mut m = NewMessage::new(
                pool,
                id,
                format!("{flow_run}:{}", kind.as_str()),
                kind,
                json!({
                    "flow_run_id": flow_run,
                    "infrastructure_pid": format!("k8s:job-{}", rng.range(1, 1_000_000)),
                }),
            )
            .data(json!({"stuck_for_seconds": rng.range(60, 900)}));
            if rng.chance(0.8) {
                let qs = &topo.queues[p];
                m = m.work_queue(qs[rng.range(0, qs.len() as u64 - 1) as usize]);
            }
            lock(&sh.ledger).insert((pool, id));
            match samples.time(Op::Enqueue, || sh.queue.enqueue_detailed(m.clone())) {
                Ok(e) if !e.duplicate => sh.inc(C::Enqueued),
                Ok(_) => {
                    sh.inc(C::BadDuplicate);
                    sh.violation(format!(
                        "new message {id} in pool {pool} was answered as a duplicate"
                    ))
                }
                Err(e) => return fail(sh, "enqueue", e, samples),
            }
            if recent.len() < 512 {
                recent.push(m);
            } else {
                let i = rng.range(0, 511) as usize;
                recent[i] = m;
            }
            made += 1;
        }
        // Pace the bursts so the messages spread over the duration.
        let due = per_message.mul_f64(made as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait.min(deadline.saturating_sub(start.elapsed())));
        }
    }
    samples
}

fn fail(sh: &Shared, what: &str, e: cleanup_queue::Error, samples: Samples) -> Samples {
    sh.error(what, e);
    samples
}

fn dispatcher(
    sh: &Shared,
    pool: Uuid,
    worker_queues: &[Uuid],
    idle: Receiver<usize>,
    jobs: &[Sender<Reservation>],
) -> Samples {
    let mut samples = Samples::default();
    'idle: while !sh.stopping() {
        let w = match idle.recv_timeout(Duration::from_millis(100)) {
            Ok(w) => w,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let own = ReserveFilter::any().queues([worker_queues[w]], false);
        let any = ReserveFilter::any().queues([worker_queues[w]], true);
        loop {
            if sh.stopping() {
                break 'idle;
            }
            let seen = match sh.queue.read_wakeup_sequence(pool) {
                Ok(s) => s,
                Err(e) => return fail(sh, "read_wakeup_sequence", e, samples),
            };
            let mut got = None;
            for (filter, fallback) in [(&own, false), (&any, true)] {
                let t = Instant::now();
                let r = sh.queue.reserve(pool, filter);
                let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                match r {
                    Ok(Some(r)) => {
                        samples.0[Op::Reserve as usize].push(us);
                        if fallback {
                            sh.inc(C::ReservedFallback);
                        }
                        got = Some(r);
                        break;
                    }
                    Ok(None) => samples.0[Op::ReserveEmpty as usize].push(us),
                    Err(e) => return fail(sh, "reserve", e, samples),
                }
            }
            match got {
                Some(r) => {
                    sh.inc(C::Delivered);
                    sh.reserved(pool, &r);
                    if jobs[w].send(r).is_err() {
                        break 'idle;
                    }
                    continue 'idle;
                }
                None => match sh
                    .queue
                    .wait_for_wakeup(pool, seen, Some(Duration::from_secs(1)))
                {
                    Ok(Some(_)) => sh.inc(C::WaitWoken),
                    Ok(None) => sh.inc(C::WaitTimedOut),
                    Err(e) => return fail(sh, "wait_for_wakeup", e, samples),
                },
            }
        }
    }
    samples
}

/// How a worker ends a delivery.
enum Outcome {
    Ack,
    Release(&'static str),
    Abandon,
}

fn worker(
    sh: &Shared,
    pool: Uuid,
    me: usize,
    idle: Sender<usize>,
    jobs: Receiver<Reservation>,
    mut rng: SplitMix,
) -> Samples {
    let mut samples = Samples::default();
    if idle.send(me).is_err() {
        return samples;
    }
    loop {
        let r = match jobs.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) if sh.stopping() => break,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if let Err(e) = handle(sh, pool, r, &mut rng, &mut samples) {
            return fail(sh, "worker", e, samples);
        }
        if sh.stopping() || idle.send(me).is_err() {
            break;
        }
    }
    samples
}

fn handle(
    sh: &Shared,
    pool: Uuid,
    r: Reservation,
    rng: &mut SplitMix,
    samples: &mut Samples,
) -> cleanup_queue::Result<()> {
    let id = r.message.message_id;
    let token = r.reservation_token.as_str();
    let lease = sh.lease;
    let u = rng.unit();
    let outcome = if u < 0.90 {
        Outcome::Ack
    } else if u < 0.95 {
        Outcome::Release(RELEASE_REASONS[rng.range(0, 3) as usize])
    } else {
        Outcome::Abandon
    };
    // Most teardowns are quick; a few take longer than a lease and need renewing.
    let handling = if rng.chance(0.97) {
        lease.mul_f64(0.002 + 0.048 * rng.unit())
    } else {
        lease.mul_f64(0.5 + 1.1 * rng.unit())
    };
    let began = r.lease_expires_at.saturating_sub(lease);
    let done_at = began.saturating_add(handling);
    let mut lease_end = r.lease_expires_at;
    loop {
        let renew_at = lease_end.saturating_sub(lease / 3);
        let now = sh.now();
        if now >= done_at {
            break;
        }
        if now >= renew_at {
            let res = samples.time(Op::Renew, || sh.queue.renew(pool, id, token))?;
            if res.status == OpStatus::Accepted {
                sh.inc(C::Renewed);
                if let Some(until) = res.lease_expires_at {
                    lease_end = until;
                    sh.renewed(pool, id, token, until);
                }
            } else {
                // Renewed too late: the lease lapsed and the message went back (or to the DLQ).
                sh.inc(C::LostLease);
                sh.ended(pool, id, token);
                return Ok(());
            }
            continue;
        }
        sh.sleep_until(done_at.min(renew_at));
        if sh.stopping() {
            break;
        }
    }
    match outcome {
        Outcome::Abandon => {
            // The worker vanishes: the lease lapses, the sweeper redelivers.
            sh.inc(C::Abandoned);
        }
        Outcome::Ack => {
            sh.ending(pool, id, token);
            let res = samples.time(Op::Ack, || sh.queue.ack(pool, id, token))?;
            if res.status == OpStatus::Accepted {
                sh.inc(C::Acked);
                let n = {
                    let mut acks = lock(&sh.acks);
                    let n = acks.entry((pool, id)).or_insert(0);
                    *n += 1;
                    *n
                };
                if n > 1 {
                    sh.violation(format!("message {id} in pool {pool} was acked {n} times"));
                }
                let other = lock(&sh.live)
                    .get(&(pool, id))
                    .filter(|l| l.token != token)
                    .map(|l| l.reserved_at);
                if let Some(at) = other {
                    sh.violation(format!(
                        "message {id} in pool {pool}: ack accepted although another reservation from {at} exists"
                    ));
                }
            } else {
                sh.inc(C::LostLease);
            }
            sh.ended(pool, id, token);
        }
        Outcome::Release(reason) => {
            sh.ending(pool, id, token);
            let res = samples.time(Op::Release, || sh.queue.release(pool, id, token, reason))?;
            match res.status {
                OpStatus::Accepted => sh.inc(C::Released),
                // The last attempt: the release itself moved the message to the DLQ.
                OpStatus::DeadLettered
                    if res
                        .dead_letter
                        .as_ref()
                        .is_some_and(|d| d.release_reason.is_some()) =>
                {
                    sh.inc(C::ReleasedToDlq)
                }
                _ => sh.inc(C::LostLease),
            }
            sh.ended(pool, id, token);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Audit and report

struct Check {
    name: String,
    ok: bool,
    detail: String,
}

struct Audit {
    checks: Vec<Check>,
    problems: Vec<String>,
    acked: u64,
    dead: u64,
    active: u64,
}

impl Audit {
    fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

fn metric(queue: &Queue, c: Counter) -> u64 {
    queue.metrics().get(&c)
}

fn metric_sum(queue: &Queue, pred: impl Fn(&Counter) -> bool) -> u64 {
    queue
        .metrics()
        .counters
        .iter()
        .filter(|(c, _)| pred(c))
        .map(|(_, v)| v)
        .sum()
}

fn audit(sh: &Shared, queue: &Queue, remaining: u64) -> CliResult<Audit> {
    let mut checks = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let ledger = lock(&sh.ledger).clone();
    let acks = lock(&sh.acks).clone();

    // 1. Every enqueued message is in exactly one final state.
    let (mut acked, mut dead, mut active, mut bad) = (0u64, 0u64, 0u64, 0u64);
    for &(pool, id) in &ledger {
        let a = acks.get(&(pool, id)).copied().unwrap_or(0) > 0;
        let d = queue.read_dead_letter(pool, id)?.is_some();
        let m = queue.read_message(pool, id)?.is_some();
        match (a, d, m) {
            (true, false, false) => acked += 1,
            (false, true, false) => dead += 1,
            (false, false, true) => active += 1,
            _ => {
                bad += 1;
                if problems.len() < 20 {
                    problems.push(format!(
                        "message {id} in pool {pool}: acked={a} dead-lettered={d} active={m}"
                    ));
                }
            }
        }
    }
    let dlq_total = queue.dead_letters(None, None, usize::MAX)?.len() as u64;
    let strays =
        acks.keys().filter(|k| !ledger.contains(k)).count() as u64 + dlq_total.saturating_sub(dead);
    if strays > 0 {
        problems.push(format!(
            "{strays} acked or dead-lettered messages were never enqueued"
        ));
    }
    checks.push(Check {
        name: "every enqueued message accounted for exactly once".into(),
        ok: bad == 0 && strays == 0 && acked + dead + active == ledger.len() as u64,
        detail: format!(
            "{} acked + {} dead-lettered + {} active = {} enqueued",
            grouped(acked),
            grouped(dead),
            grouped(active),
            grouped(ledger.len() as u64)
        ),
    });

    // 2. Exactly one live reservation at a time (and at most one accepted ack).
    let bad_duplicates = sh.get(C::BadDuplicate);
    let violations = sh.violation_count.load(Ordering::Relaxed) - bad_duplicates;
    problems.extend(lock(&sh.violations).iter().take(20).cloned());
    checks.push(Check {
        name: "no message reserved twice at the same time, none acked twice".into(),
        ok: violations == 0,
        detail: format!(
            "{} reservations checked, {violations} violations",
            grouped(sh.reservations_checked.load(Ordering::Relaxed))
        ),
    });

    // 3. Duplicates answered as duplicates (counted as violations above when not).
    checks.push(Check {
        name: "duplicates answered as duplicates, new messages as new".into(),
        ok: bad_duplicates == 0,
        detail: format!(
            "{} exact retries, {bad_duplicates} wrong answers",
            grouped(sh.get(C::Duplicates))
        ),
    });

    // 4. The engine's own counters agree with what the simulator saw.
    let pairs = [
        (
            "enqueue accepted",
            metric(queue, Counter::op("enqueue", "accepted")),
            sh.get(C::Enqueued),
        ),
        (
            "enqueue duplicate",
            metric(queue, Counter::op("enqueue", "duplicate")),
            sh.get(C::Duplicates),
        ),
        (
            "reserve accepted",
            metric(queue, Counter::op("reserve", "accepted")),
            sh.get(C::Delivered),
        ),
        (
            "ack accepted",
            metric(queue, Counter::op("ack", "accepted")),
            sh.get(C::Acked),
        ),
        (
            "release accepted",
            metric(queue, Counter::op("release", "accepted")),
            sh.get(C::Released),
        ),
        (
            "renew accepted",
            metric(queue, Counter::op("renew", "accepted")),
            sh.get(C::Renewed),
        ),
        (
            "dead letters",
            metric_sum(queue, |c| matches!(c, Counter::DeadLetter { .. })),
            dlq_total,
        ),
    ];
    let mismatches: Vec<String> = pairs
        .iter()
        .filter(|(_, engine, sim)| engine != sim)
        .map(|(n, engine, sim)| format!("{n}: engine {engine}, simulator {sim}"))
        .collect();
    problems.extend(mismatches.iter().cloned());
    checks.push(Check {
        name: "engine counters agree with the simulator".into(),
        ok: mismatches.is_empty(),
        detail: format!("{} counters compared", pairs.len()),
    });

    // 5. Integrity.
    let integrity = queue.check_integrity()?;
    problems.extend(integrity.iter().take(20).cloned());
    checks.push(Check {
        name: "check_integrity() clean".into(),
        ok: integrity.is_empty(),
        detail: format!("{} violations", integrity.len()),
    });

    // 6. Drained, and no engine errors.
    checks.push(Check {
        name: "drained: nothing left visible or reserved".into(),
        ok: remaining == 0 && active == 0,
        detail: format!("{active} active"),
    });
    let errors = lock(&sh.errors).clone();
    problems.extend(errors.iter().cloned());
    checks.push(Check {
        name: "no engine errors".into(),
        ok: errors.is_empty(),
        detail: format!("{} errors", errors.len()),
    });
    Ok(Audit {
        checks,
        problems,
        acked,
        dead,
        active,
    })
}

struct Settings<'a> {
    args: &'a SimulateArgs,
    seed: u64,
    lease: Duration,
    path: &'a std::path::Path,
    keep: bool,
}

struct Timing {
    produced_for: Duration,
    drained_in: Duration,
    wall: Duration,
    engine_elapsed: Duration,
}

fn durability_name(d: Durability) -> &'static str {
    match d {
        Durability::Fsync => "fsync",
        Durability::Flush => "flush",
        _ => "buffered",
    }
}

fn latencies(samples: &mut Samples, wall: Duration) -> Vec<(&'static str, Latency, f64)> {
    OPS.iter()
        .map(|(op, name)| {
            let l = Latency::of(&mut samples.0[*op as usize]);
            (*name, l, l.count as f64 / wall.as_secs_f64().max(1e-9))
        })
        .collect()
}

struct Counts {
    rows: Vec<(&'static str, u64, String)>,
}

fn counts(sh: &Shared, queue: &Queue, audit: &Audit) -> Counts {
    let redelivered = metric(
        queue,
        Counter::LeaseExpiration {
            result: "redelivered".into(),
        },
    );
    let expired_dead = metric(
        queue,
        Counter::LeaseExpiration {
            result: "dead_lettered".into(),
        },
    );
    let enq = sh.get(C::Enqueued);
    Counts {
        rows: vec![
            ("enqueued", enq, "distinct messages".into()),
            (
                "duplicates",
                sh.get(C::Duplicates),
                "exact retries, answered with the stored message".into(),
            ),
            (
                "delivered",
                sh.get(C::Delivered),
                format!(
                    "reservations ({:.2} per message, {} by fallback to any queue)",
                    sh.get(C::Delivered) as f64 / enq.max(1) as f64,
                    grouped(sh.get(C::ReservedFallback))
                ),
            ),
            ("acked", sh.get(C::Acked), "accepted acks".into()),
            (
                "released",
                sh.get(C::Released),
                format!(
                    "accepted releases (+{} that dead-lettered on the last attempt)",
                    sh.get(C::ReleasedToDlq)
                ),
            ),
            ("renewed", sh.get(C::Renewed), "accepted renews".into()),
            (
                "abandoned",
                sh.get(C::Abandoned),
                "reservations left to lapse".into(),
            ),
            (
                "expired",
                redelivered + expired_dead,
                format!(
                    "lease expirations: {redelivered} redelivered, {expired_dead} dead-lettered"
                ),
            ),
            ("dead-lettered", audit.dead, "in the DLQ at the end".into()),
            (
                "lost leases",
                sh.get(C::LostLease),
                "ack/release/renew answered expired (the worker was too late)".into(),
            ),
            (
                "wakeups",
                sh.get(C::WaitWoken),
                format!(
                    "dispatcher waits woken ({} timed out after 1s)",
                    grouped(sh.get(C::WaitTimedOut))
                ),
            ),
        ],
    }
}

fn text_report(
    s: &Settings,
    t: &Timing,
    sh: &Shared,
    queue: &Queue,
    samples: &mut Samples,
    audit: &Audit,
    size: u64,
) -> String {
    let a = s.args;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cleanup-queue simulate: {} pools x ({} dispatchers, {} workers, {} work queues), {} producers, seed {}",
        a.pools, a.dispatchers, a.workers, a.queues, a.producers, s.seed
    );
    let clock = match a.clock {
        ClockKind::System => "system".to_string(),
        ClockKind::Simulated => format!("simulated x{}", a.time_scale),
    };
    let _ = writeln!(
        out,
        "clock {clock}, lease {}, max attempts {}, durability {}",
        human_duration(s.lease),
        a.max_attempts,
        durability_name(a.durability)
    );
    let _ = writeln!(
        out,
        "database {} ({}, {})",
        s.path.display(),
        human_bytes(size),
        if s.keep { "kept" } else { "removed at exit" }
    );
    let _ = writeln!(
        out,
        "\nran {} producing + {} draining = {} wall; {} of engine time\n",
        human_duration(t.produced_for),
        human_duration(t.drained_in),
        human_duration(t.wall),
        human_duration(t.engine_elapsed)
    );
    let mut table = Table::new(&[
        ("OPERATION", Align::Left),
        ("COUNT", Align::Right),
        ("OPS/S", Align::Right),
        ("P50", Align::Right),
        ("P99", Align::Right),
        ("MAX", Align::Right),
    ]);
    let us = |v: u64| human_duration(Duration::from_micros(v));
    let mut total = 0;
    for (name, l, rate) in latencies(samples, t.wall) {
        total += l.count;
        table.row(vec![
            name.into(),
            grouped(l.count),
            format!("{rate:.0}"),
            us(l.p50_us),
            us(l.p99_us),
            us(l.max_us),
        ]);
    }
    table.row(vec![
        "all".into(),
        grouped(total),
        format!("{:.0}", total as f64 / t.wall.as_secs_f64().max(1e-9)),
        String::new(),
        String::new(),
        String::new(),
    ]);
    out.push_str(&table.render());
    out.push('\n');
    let mut ct = Table::new(&[
        ("COUNT", Align::Left),
        ("", Align::Right),
        ("", Align::Left),
    ]);
    for (name, n, note) in counts(sh, queue, audit).rows {
        ct.row(vec![name.into(), grouped(n), note]);
    }
    out.push_str(&ct.render());
    let _ = writeln!(
        out,
        "\naudit: {}",
        if audit.passed() { "PASS" } else { "FAIL" }
    );
    for c in &audit.checks {
        let _ = writeln!(
            out,
            "  [{}] {} ({})",
            if c.ok { "ok" } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    for p in &audit.problems {
        let _ = writeln!(out, "  problem: {p}");
    }
    out
}

fn json_report(
    s: &Settings,
    t: &Timing,
    sh: &Shared,
    queue: &Queue,
    samples: &mut Samples,
    audit: &Audit,
    size: u64,
) -> Value {
    let a = s.args;
    let ops: serde_json::Map<String, Value> = latencies(samples, t.wall)
        .into_iter()
        .map(|(name, l, rate)| {
            (
                name.replace(" (", "_").replace(')', ""),
                json!({
                    "count": l.count,
                    "ops_per_second": rate,
                    "p50_us": l.p50_us,
                    "p99_us": l.p99_us,
                    "max_us": l.max_us,
                }),
            )
        })
        .collect();
    let counts: serde_json::Map<String, Value> = counts(sh, queue, audit)
        .rows
        .into_iter()
        .map(|(name, n, _)| (name.replace([' ', '-'], "_"), Value::from(n)))
        .collect();
    json!({
        "settings": {
            "pools": a.pools,
            "workers_per_pool": a.workers,
            "dispatchers_per_pool": a.dispatchers,
            "queues_per_pool": a.queues,
            "producers": a.producers,
            "messages": a.messages,
            "seed": s.seed,
            "clock": match a.clock { ClockKind::System => "system", ClockKind::Simulated => "simulated" },
            "time_scale": match a.clock { ClockKind::System => 1.0, ClockKind::Simulated => a.time_scale },
            "lease_seconds": s.lease.as_secs_f64(),
            "max_attempts": a.max_attempts,
            "durability": durability_name(a.durability),
            "database": s.path,
            "database_kept": s.keep,
            "size_on_disk_bytes": size,
        },
        "timing": {
            "producing_seconds": t.produced_for.as_secs_f64(),
            "draining_seconds": t.drained_in.as_secs_f64(),
            "wall_seconds": t.wall.as_secs_f64(),
            "engine_seconds": t.engine_elapsed.as_secs_f64(),
        },
        "operations": ops,
        "counts": counts,
        "final_states": {"acked": audit.acked, "dead_lettered": audit.dead, "active": audit.active},
        "audit": {
            "passed": audit.passed(),
            "checks": audit.checks.iter().map(|c| json!({"name": c.name, "ok": c.ok, "detail": c.detail})).collect::<Vec<_>>(),
            "problems": audit.problems,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            queue: Queue::temporary()
                .sweep_interval(None)
                .open()
                .expect("open"),
            clock: SimClock::System,
            lease: Duration::from_secs(30),
            counters: Default::default(),
            ledger: Mutex::new(HashSet::new()),
            acks: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            reservations_checked: AtomicU64::new(0),
            violations: Mutex::new(Vec::new()),
            violation_count: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            stop_all: AtomicBool::new(false),
            abort: AtomicBool::new(false),
        }
    }

    fn reservation(pool: Uuid, id: Uuid, token: &str, at_secs: i64) -> Reservation {
        let at = Timestamp::from_micros(at_secs * 1_000_000);
        Reservation {
            message: cleanup_queue::Message {
                message_id: id,
                idempotency_key: "k".into(),
                work_pool_id: pool,
                work_queue_id: None,
                kind: CleanupKind::CancellingTimeoutTeardown,
                target: Default::default(),
                data: Default::default(),
                created_at: at,
                updated_at: at,
                delivery_count: 1,
            },
            reservation_token: token.into(),
            lease_expires_at: at.saturating_add(Duration::from_secs(30)),
        }
    }

    fn violations(sh: &Shared) -> u64 {
        sh.violation_count.load(Ordering::Relaxed)
    }

    #[test]
    fn overlapping_reservations_are_violations_in_either_order() {
        let (pool, id) = (Uuid::new_v4(), Uuid::new_v4());
        let sh = shared();
        sh.reserved(pool, &reservation(pool, id, "a", 100));
        sh.reserved(pool, &reservation(pool, id, "b", 110)); // a is live until 130
        assert_eq!(violations(&sh), 1);

        let sh = shared();
        sh.reserved(pool, &reservation(pool, id, "b", 110));
        sh.reserved(pool, &reservation(pool, id, "a", 100)); // registered late
        assert_eq!(violations(&sh), 1);
    }

    #[test]
    fn lapsed_leases_and_late_registrations_are_not_violations() {
        let (pool, id) = (Uuid::new_v4(), Uuid::new_v4());
        let sh = shared();
        sh.reserved(pool, &reservation(pool, id, "a", 100));
        sh.reserved(pool, &reservation(pool, id, "b", 130)); // the boundary counts as expired
        sh.reserved(pool, &reservation(pool, id, "c", 100 - 31)); // older, registered late
        assert_eq!(violations(&sh), 0);
        assert_eq!(lock(&sh.live)[&(pool, id)].token, "b");
    }

    #[test]
    fn a_renew_that_overlaps_another_reservation_is_a_violation() {
        let (pool, id) = (Uuid::new_v4(), Uuid::new_v4());
        let sh = shared();
        sh.reserved(pool, &reservation(pool, id, "a", 100));
        sh.reserved(pool, &reservation(pool, id, "b", 140));
        sh.renewed(pool, id, "a", Timestamp::from_micros(150 * 1_000_000));
        assert_eq!(violations(&sh), 1);
    }
}
