//! Raw limits of this machine, measured in the same `cargo bench` run as the engine benches,
//! so that every engine result can be stated as a ratio to what the disk and sled allow.
//!
//! - `limits/sled_txn/{none,flush,flush_fdatasync}`: one sled transaction over 3 trees (a
//!   ~300-byte record, an index entry, a counter) per operation, configured like the engine
//!   (HighThroughput, 8 MiB segments, 64 MiB cache), followed by nothing, by `Db::flush()`,
//!   or by `flush()` plus `fdatasync` of sled's `db` file. These are the ceilings for the
//!   engine's `Buffered`, `Flush` and `Fsync` modes (goal: single-thread durable operation
//!   ≥ 80 % of the matching rate).
//! - `limits/sled_txn_width/{3,9}`: the same 3 writes in a transaction opened over 3 or over
//!   9 trees (no flush): the per-transaction cost of the trees a write set does not touch.
//! - `limits/sled_writes/{txn,plain,journal}`: the same 3 writes as one transaction, as 3
//!   plain inserts, or journaled as the engine writes a batch (the writes as one `journal`
//!   value, then the 3 inserts, then the journal removed), printing the CPU time of the whole
//!   process per operation (`[proc-cpu]`): what sled's transactions cost beyond their writes
//!   (two log-buffer rolls each), and what the journal costs instead.
//! - `limits/sled_batch_flush_fdatasync/{1,8,32}`: that many transactions share one
//!   `flush()` + `fdatasync`: the ceiling for group commit with that many threads (goal:
//!   8 threads ≥ 50k durable operations/s).
//! - `limits/sled_journal_flush_fdatasync/{1,8,32}`: the same, with the writes of that many
//!   operations journaled as one batch (the engine's group commit since layout 3): the
//!   ceiling for the engine's group commit with that many threads.
//! - `limits/wal_fdatasync_then_sled/{1,8,32}`: the engine's `Fsync` write path since
//!   layout 4, without the engine: the writes of that many operations encoded as one record,
//!   `pwrite` into a preallocated log file + `fdatasync`, then applied to sled as plain
//!   inserts (no sled flush): the ceiling for the engine's group commit with that many
//!   threads.
//! - `limits/sled_1000_leases_flush_fdatasync/{txn,batch}`: the ~3,000 writes of
//!   `expire_leases(1000)` as one 3-tree transaction or as per-tree batches, then `flush()` +
//!   `fdatasync`: the ceiling for the expiry goal (≤ 5 ms).
//! - `limits/sled_fifo_backlog/{0,1000,10000,100000[,1000000]}`: sled alone, reserving and
//!   acking the head of a FIFO of that many messages (find the first index entry, remove it,
//!   read the record, write it twice; a message is added untimed before each): how sled's
//!   own cost grows with the backlog, the floor under the backlog goal (reserve+ack at 1M
//!   ≤ 1.25× backlog 0). The 1M case runs only with `CLEANUP_QUEUE_BENCH_FULL=1`.
//! - `limits/fdatasync_4k`: `pwrite` of 4 KiB into a preallocated file + `fdatasync`: what
//!   the disk gives one synchronous writer.
//! - `limits/condvar_wakeup`: a thread blocked on a `Condvar`; from `notify_one` to the
//!   thread running (p50 printed): the floor under the engine's wakeup latency (goal p50
//!   ≤ 20 µs).

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use sled::transaction::TransactionError;
use sled::Transactional;

struct RawSled {
    _dir: tempfile::TempDir,
    db: sled::Db,
    trees: [sled::Tree; 3],
    file: File,
    record: Vec<u8>,
    next: u64,
}

impl RawSled {
    fn open() -> RawSled {
        let dir = common::tempdir();
        let path = dir.path().join("raw");
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(64 << 20)
            .mode(sled::Mode::HighThroughput)
            .segment_size(8 << 20)
            .flush_every_ms(None)
            .open()
            .expect("open sled");
        let tree = |n: &str| db.open_tree(n).expect("open tree");
        let trees = [tree("records"), tree("index"), tree("meta")];
        let file = File::open(path.join("db")).expect("open sled db file");
        RawSled {
            _dir: dir,
            db,
            trees,
            file,
            record: vec![0x5a; 300],
            next: 0,
        }
    }

    /// The next operation's number, record key and index key (engine-sized).
    fn next_keys(&mut self) -> (u64, [u8; 32], [u8; 57]) {
        let i = self.next;
        self.next += 1;
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(&RawSled::record_prefix());
        key[24..].copy_from_slice(&i.to_be_bytes());
        let mut index = [0u8; 57];
        index[..16].copy_from_slice(&key[..16]);
        index[41..49].copy_from_slice(&i.to_be_bytes());
        (i, key, index)
    }

    /// One 3-tree transaction with engine-sized keys and values.
    fn txn(&mut self) {
        let (i, key, index) = self.next_keys();
        let (a, b, c) = (&self.trees[0], &self.trees[1], &self.trees[2]);
        let record = &self.record;
        let r: Result<(), TransactionError<()>> = (a, b, c).transaction(|(a, b, c)| {
            a.insert(&key[..], record.as_slice())?;
            b.insert(&index[..], &key[16..])?;
            c.insert(b"seq".as_slice(), &i.to_be_bytes())?;
            Ok(())
        });
        r.expect("sled transaction");
    }

    /// Adds a message at the tail of the FIFO: its record and its index entry (the index
    /// key ends in the message's number, so the index is in enqueue order).
    fn push(&mut self) {
        let (_, key, index) = self.next_keys();
        self.trees[0]
            .insert(&key[..], self.record.as_slice())
            .expect("insert");
        self.trees[1]
            .insert(&index[..], &key[16..])
            .expect("insert");
    }

    /// The sled work of reserving and acking the head of the FIFO: find the first index
    /// entry, remove it, read its record, write the record twice (reserved, then acked).
    fn pop(&mut self) {
        let [records, index, _] = &self.trees;
        let (entry, suffix) = index
            .scan_prefix(&RawSled::record_prefix()[..])
            .next()
            .expect("a message")
            .expect("scan");
        index.remove(&entry).expect("remove");
        let mut key = RawSled::record_prefix().to_vec();
        key.extend_from_slice(&suffix);
        let mut record = records.get(&key).expect("get").expect("record").to_vec();
        for state in [1u8, 2] {
            record[0] = state;
            records.insert(&key[..], record.as_slice()).expect("insert");
        }
    }

    /// The first 16 bytes of every record key (and of every index key): the pool.
    fn record_prefix() -> [u8; 16] {
        let mut p = [0u8; 16];
        p[..8].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_be_bytes());
        p
    }

    /// The writes of [`RawSled::txn`] as three plain (individually atomic) inserts.
    fn plain(&mut self) {
        let (i, key, index) = self.next_keys();
        let [a, b, c] = &self.trees;
        a.insert(&key[..], self.record.as_slice()).expect("insert");
        b.insert(&index[..], &key[16..]).expect("insert");
        c.insert(b"seq", &i.to_be_bytes()).expect("insert");
    }

    /// The writes of `ops` operations ([`RawSled::plain`]) as one journaled batch: the
    /// writes encoded as one `journal` value, then applied, then the journal removed.
    fn journaled(&mut self, ops: u64) {
        let (journal, batch) = self.encoded(ops);
        self.trees[2].insert(b"journal", journal).expect("insert");
        self.apply(batch);
        self.trees[2].remove(b"journal").expect("remove");
    }

    /// The writes of `ops` operations as one record in `log` (synced), then applied to sled
    /// as plain inserts: the engine's `Fsync` path.
    fn logged(&mut self, ops: u64, log: &mut RawLog) {
        let (record, batch) = self.encoded(ops);
        log.append(&record);
        self.apply(batch);
    }

    fn apply(&self, batch: Vec<(u64, [u8; 32], [u8; 57])>) {
        let [a, b, c] = &self.trees;
        for (i, key, index) in batch {
            a.insert(&key[..], self.record.as_slice()).expect("insert");
            b.insert(&index[..], &key[16..]).expect("insert");
            c.insert(b"seq", &i.to_be_bytes()).expect("insert");
        }
    }

    /// The next `ops` operations' writes, encoded as one batch value, and their keys.
    #[allow(clippy::type_complexity)]
    fn encoded(&mut self, ops: u64) -> (Vec<u8>, Vec<(u64, [u8; 32], [u8; 57])>) {
        let mut batch = Vec::new();
        let mut journal = Vec::new();
        for _ in 0..ops {
            let (i, key, index) = self.next_keys();
            for part in [
                &key[..],
                &self.record,
                &index[..],
                &key[16..],
                &i.to_be_bytes(),
            ] {
                journal.extend_from_slice(&(part.len() as u32).to_be_bytes());
                journal.extend_from_slice(part);
            }
            batch.push((i, key, index));
        }
        (journal, batch)
    }

    fn flush(&self) {
        self.db.flush().expect("flush");
    }

    fn fdatasync(&self) {
        self.file.sync_data().expect("fdatasync");
    }
}

fn sled_txn(c: &mut Criterion) {
    let mut g = c.benchmark_group("limits/sled_txn");
    g.throughput(Throughput::Elements(1));
    for what in ["none", "flush", "flush_fdatasync"] {
        let mut raw = RawSled::open();
        let mut cpu = common::CpuAccount::default();
        g.bench_function(what, |b| {
            b.iter(|| {
                let (s0, t0) = (common::thread_sched_ns(), Instant::now());
                raw.txn();
                if what != "none" {
                    raw.flush();
                }
                if what == "flush_fdatasync" {
                    raw.fdatasync();
                }
                cpu.add(s0, t0.elapsed());
            })
        });
        cpu.report(&format!("limits/sled_txn/{what}"));
    }
    g.finish();
}

/// The same 3 writes as `limits/sled_txn/none`, in a transaction opened over a slice of 3
/// or of 9 trees (the engine opens every transaction over all 9 of its trees).
fn sled_txn_width(c: &mut Criterion) {
    let mut g = c.benchmark_group("limits/sled_txn_width");
    g.throughput(Throughput::Elements(1));
    for width in [3usize, 9] {
        let mut raw = RawSled::open();
        let mut trees: Vec<sled::Tree> = raw.trees.to_vec();
        for i in 3..width {
            trees.push(raw.db.open_tree(format!("extra{i}")).expect("tree"));
        }
        let mut cpu = common::CpuAccount::default();
        g.bench_with_input(BenchmarkId::from_parameter(width), &width, |b, _| {
            b.iter(|| {
                let (s0, t0) = (common::thread_sched_ns(), Instant::now());
                let i = raw.next;
                raw.next += 1;
                let mut key = [0u8; 32];
                key[24..].copy_from_slice(&i.to_be_bytes());
                let mut index = [0u8; 57];
                index[41..49].copy_from_slice(&i.to_be_bytes());
                let record = &raw.record;
                let r: Result<(), TransactionError<()>> = trees[..].transaction(|v| {
                    v[0].insert(&key[..], record.as_slice())?;
                    v[1].insert(&index[..], &key[16..])?;
                    v[2].insert(b"seq".as_slice(), &i.to_be_bytes())?;
                    Ok(())
                });
                r.expect("sled transaction");
                cpu.add(s0, t0.elapsed());
            })
        });
        cpu.report(&format!("limits/sled_txn_width/{width}"));
    }
    g.finish();
}

/// The same 3 writes as `limits/sled_txn/none`, as one transaction or as 3 plain inserts
/// (no flush). Prints the CPU time of the whole process per operation: sled rolls its log
/// buffer before and after every transaction (`PageCache::pin_log`), and each roll is a
/// `pwrite` + `sync_file_range` on its IO threads, which the measuring thread does not see.
fn sled_writes(c: &mut Criterion) {
    let mut g = c.benchmark_group("limits/sled_writes");
    g.throughput(Throughput::Elements(1));
    for how in ["txn", "plain", "journal"] {
        let mut raw = RawSled::open();
        let (mut ops, mut process_ns) = (0u64, 0u64);
        g.bench_function(how, |b| {
            b.iter_custom(|iters| {
                let (p0, t0) = (common::process_cpu_ns(), Instant::now());
                for _ in 0..iters {
                    match how {
                        "txn" => raw.txn(),
                        "plain" => raw.plain(),
                        _ => raw.journaled(1),
                    }
                }
                let wall = t0.elapsed();
                ops += iters;
                process_ns += common::process_cpu_ns().saturating_sub(p0);
                wall
            })
        });
        if let Some(per) = process_ns.checked_div(ops) {
            eprintln!(
                "[proc-cpu] limits/sled_writes/{how}: {:.1?}/op of CPU over all threads (n={ops})",
                Duration::from_nanos(per)
            );
        }
    }
    g.finish();
}

/// A preallocated (zero-written) log file overwritten in place, as `src/wal.rs` does.
struct RawLog {
    _dir: tempfile::TempDir,
    file: File,
    offset: u64,
}

impl RawLog {
    const SIZE: u64 = 8 << 20;

    fn open() -> RawLog {
        let dir = common::tempdir();
        let file = preallocated(&dir.path().join("log"), RawLog::SIZE);
        RawLog {
            _dir: dir,
            file,
            offset: 0,
        }
    }

    /// `pwrite` of a 16-byte header and `record`, then `fdatasync`.
    fn append(&mut self, record: &[u8]) {
        let mut bytes = Vec::with_capacity(16 + record.len());
        bytes.extend_from_slice(&(record.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&[0xc5; 12]);
        bytes.extend_from_slice(record);
        if self.offset + bytes.len() as u64 > RawLog::SIZE {
            self.offset = 0;
        }
        self.file.write_all_at(&bytes, self.offset).expect("pwrite");
        self.file.sync_data().expect("fdatasync");
        self.offset += bytes.len() as u64;
    }
}

/// A file of `len` zero bytes, written and synced.
fn preallocated(path: &std::path::Path, len: u64) -> File {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .expect("open file");
    file.write_all_at(&vec![0u8; len as usize], 0)
        .expect("fill");
    file.sync_all().expect("sync");
    file
}

fn wal_batch(c: &mut Criterion) {
    let mut g = c.benchmark_group("limits/wal_fdatasync_then_sled");
    for batch in [1u64, 8, 32] {
        let mut raw = RawSled::open();
        let mut log = RawLog::open();
        g.throughput(Throughput::Elements(batch));
        g.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.iter(|| raw.logged(batch, &mut log))
        });
    }
    g.finish();
}

fn sled_batch(c: &mut Criterion) {
    for journal in [false, true] {
        let mut g = c.benchmark_group(if journal {
            "limits/sled_journal_flush_fdatasync"
        } else {
            "limits/sled_batch_flush_fdatasync"
        });
        for batch in [1u64, 8, 32] {
            let mut raw = RawSled::open();
            g.throughput(Throughput::Elements(batch));
            g.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
                b.iter(|| {
                    if journal {
                        raw.journaled(batch);
                    } else {
                        for _ in 0..batch {
                            raw.txn();
                        }
                    }
                    raw.flush();
                    raw.fdatasync();
                })
            });
        }
        g.finish();
    }
}

/// The writes of `expire_leases(1000)`: per lease a record put, a lease-index delete and a
/// visible-index put, over 3 trees; either as one sled transaction or as one
/// `apply_batch` per tree (atomic per tree only), then `flush()` + `fdatasync`.
fn sled_bulk(c: &mut Criterion) {
    const LEASES: u64 = 1_000;
    let mut g = c.benchmark_group("limits/sled_1000_leases_flush_fdatasync");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    for how in ["txn", "batch"] {
        let raw = RawSled::open();
        let t3 = raw.db.open_tree("leases").expect("tree");
        let mut round = 0u64;
        let mut cpu = common::CpuAccount::default();
        g.bench_function(how, |b| {
            b.iter(|| {
                let (s0, t0) = (common::thread_sched_ns(), Instant::now());
                round += 1;
                let key = |i: u64, len: usize| {
                    let mut k = vec![0u8; len];
                    k[len - 16..len - 8].copy_from_slice(&round.to_be_bytes());
                    k[len - 8..].copy_from_slice(&i.to_be_bytes());
                    k
                };
                let (a, bt, c3) = (&raw.trees[0], &raw.trees[1], &raw.trees[2]);
                if how == "txn" {
                    let r: Result<(), TransactionError<()>> =
                        (a, bt, c3, &t3).transaction(|(a, bt, _c3, t3)| {
                            for i in 0..LEASES {
                                a.insert(key(i, 32), raw.record.as_slice())?;
                                bt.insert(key(i, 57), &[1u8; 16][..])?;
                                t3.remove(key(i, 48))?;
                            }
                            Ok(())
                        });
                    r.expect("transaction");
                } else {
                    let (mut ba, mut bb, mut bd) = Default::default();
                    for i in 0..LEASES {
                        sled::Batch::insert(&mut ba, key(i, 32), raw.record.as_slice());
                        sled::Batch::insert(&mut bb, key(i, 57), &[1u8; 16][..]);
                        sled::Batch::remove(&mut bd, key(i, 48));
                    }
                    a.apply_batch(ba).expect("batch");
                    bt.apply_batch(bb).expect("batch");
                    t3.apply_batch(bd).expect("batch");
                }
                raw.flush();
                raw.fdatasync();
                cpu.add(s0, t0.elapsed());
            })
        });
        cpu.report(&format!("limits/sled_1000_leases_flush_fdatasync/{how}"));
    }
    g.finish();
}

/// The bare sled work of a reserve + ack at the head of a FIFO that holds `n` messages
/// (`RawSled::pop`; one message is added untimed before each, so `n` stays constant). The
/// backlog is built by single inserts, as the engine's enqueues build it.
fn sled_fifo_backlog(c: &mut Criterion) {
    let mut g = c.benchmark_group("limits");
    for n in common::backlog_sizes() {
        if !common::wants(&[format!("limits/sled_fifo_backlog/{n}")]) {
            continue;
        }
        let mut raw = RawSled::open();
        for _ in 0..n {
            raw.push();
        }
        g.bench_with_input(BenchmarkId::new("sled_fifo_backlog", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    raw.push();
                    let t0 = Instant::now();
                    raw.pop();
                    total += t0.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

fn fdatasync_4k(c: &mut Criterion) {
    let dir = common::tempdir();
    const SLOTS: u64 = 256;
    let file = preallocated(&dir.path().join("sync"), SLOTS * 4096);
    let page = vec![0xa5u8; 4096];
    let mut i = 0u64;
    let mut g = c.benchmark_group("limits");
    g.throughput(Throughput::Elements(1));
    g.bench_function("fdatasync_4k", |b| {
        b.iter(|| {
            file.write_all_at(&page, (i % SLOTS) * 4096)
                .expect("pwrite");
            file.sync_data().expect("fdatasync");
            i += 1;
        })
    });
    g.finish();
}

fn condvar_wakeup(c: &mut Criterion) {
    struct Shared {
        seq: Mutex<u64>,
        changed: Condvar,
        observed_seq: AtomicU64,
        observed_at: AtomicU64,
    }
    let base = Instant::now();
    let shared = Arc::new(Shared {
        seq: Mutex::new(0),
        changed: Condvar::new(),
        observed_seq: AtomicU64::new(0),
        observed_at: AtomicU64::new(0),
    });
    let waiter = {
        let s = shared.clone();
        std::thread::spawn(move || {
            let mut seen = 0;
            loop {
                let mut g = s.seq.lock().expect("lock");
                while *g == seen {
                    g = s.changed.wait(g).expect("wait");
                }
                seen = *g;
                drop(g);
                s.observed_at
                    .store(base.elapsed().as_nanos() as u64, Ordering::SeqCst);
                s.observed_seq.store(seen, Ordering::SeqCst);
                if seen == u64::MAX {
                    return;
                }
            }
        })
    };
    let mut samples = Vec::new();
    let mut next = 0u64;
    let mut g = c.benchmark_group("limits");
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(200));
    g.measurement_time(Duration::from_millis(500));
    g.bench_function("condvar_wakeup", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                next += 1;
                let t0 = base.elapsed().as_nanos() as u64;
                *shared.seq.lock().expect("lock") = next;
                shared.changed.notify_one();
                wait_until(&shared.observed_seq, next);
                let lat = Duration::from_nanos(
                    shared.observed_at.load(Ordering::SeqCst).saturating_sub(t0),
                );
                samples.push(lat);
                total += lat;
                // Let the waiter block again before the next notify (not counted).
                std::thread::sleep(Duration::from_micros(100));
            }
            total
        })
    });
    g.finish();
    *shared.seq.lock().expect("lock") = u64::MAX;
    shared.changed.notify_one();
    waiter.join().expect("waiter");
    common::report_percentiles(
        "limits/condvar_wakeup (notify -> waiter running)",
        &mut samples,
    );
}

/// Spins (yielding) until `a` reaches `v`.
fn wait_until(a: &AtomicU64, v: u64) {
    let mut spins = 0u32;
    while a.load(Ordering::SeqCst) < v {
        spins += 1;
        if spins < 200 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

fn load(_: &mut Criterion) {
    common::print_load("limits");
}

criterion_group! {
    name = limits;
    config = common::config();
    targets = load, sled_txn, sled_txn_width, sled_writes, sled_batch, wal_batch, sled_bulk, sled_fifo_backlog, fdatasync_4k, condvar_wakeup, load
}
criterion_main!(limits);
