//! The only module that touches sled: opening the trees, reading, committing write sets
//! atomically, and group commit (many callers share one sled transaction and one flush).
//!
//! A committed write set is first *staged*: merged into an in-memory overlay that every read
//! of this module consults before sled, so the next operation already sees it. In `Buffered`
//! mode it is applied to sled at once; in the durable modes the next flush leader makes it
//! durable. Group commit works without a thread of its own: a caller whose write is not yet
//! durable either becomes the flush leader, or waits on a condvar for the leader in
//! progress. The leader takes everything staged so far as **one** atomic batch, makes it
//! durable with one flush (`Flush`: applied to sled, then sled flushed; `Fsync`: one log
//! record, below), and publishes the last ticket it covered as durable. Meanwhile other callers keep staging,
//! so a crowd shares one transaction and one flush per round, and a lone caller does
//! exactly one of each.
//!
//! A batch is made atomic by a redo journal rather than a sled transaction (which costs
//! about three times its writes and two extra synchronous log writes: `BENCHMARKS.md`):
//! the whole batch is written as one value, `meta/journal`, then every write as a plain
//! sled insert or remove, then the journal is removed. sled recovers a prefix of its log,
//! so after a crash either the journal is gone (the batch, and everything before it, is
//! complete) or it is present and every write after it belongs to that batch: `Store::open`
//! replays it (its values are final, so replaying is idempotent). A one-key batch is atomic
//! on its own; a batch too large for one log entry is a sled transaction.
//!
//! In `Fsync` mode on disk, a round does not flush sled at all. It writes the batch as one
//! record to a write-ahead log of its own (`wal`), `fdatasync`s that file, merges the batch
//! into the overlay's `logged` writes (a key's last value wins) and releases its waiters.
//! The `Drainer` thread writes the logged writes into sled as plain writes once more than
//! `BACKGROUND_WRITES` keys wait, all of them as one merged batch, one drain at a time. A
//! message enqueued, reserved and acked within one drain is written to sled once, and its
//! visible and lease index entries not at all (`Overlay::merge_cancelling`); a leader waits
//! only if the drain falls far behind. sled's flush (its log
//! buffer, `pwrite`, `sync_file_range`, then the `fdatasync` the promise needs) costs about
//! 2.5 times a bare `fdatasync` of the log here, and nothing of it is needed while the log
//! holds the batch. Once the log holds its checkpoint size (`wal::CHECKPOINT_BYTES` by
//! default), the next round *checkpoints*: once every logged batch is in sled (it drains
//! what waits itself), it records a new generation id (random) in `meta/wal`, flushes and
//! `fdatasync`s sled, and starts the log over with that id. On open, the log's records of
//! the generation in `meta/wal` are applied to sled in order, then (in `Fsync` mode, or if
//! any were applied) a checkpoint follows. That is correct whatever part of its writes
//! sled kept: each record holds final values and every key a drain writes was written by a
//! record of the generation, so applying all of them in order gives the same state from
//! any such part. A record reaches the log before any of its writes reach sled, and is on
//! disk before the next record is written. After a failed write nothing more is logged,
//! drained or checkpointed. `Flush` mode keeps flushing sled (its log would not be synced,
//! so after a power loss a record could be missing before a later one).

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::iter::Peekable;
use std::ops::{Bound, RangeBounds};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use sled::transaction::{TransactionError, Transactional};
use uuid::Uuid;

use crate::codec;
use crate::error::{Error, Result};
use crate::fault::Faults;
use crate::keys::{self, TreeId};
use crate::machine::Record;
use crate::wal::{self, Wal};

/// What "returned" means for a mutating call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Flush the log and `fdatasync` the data file before returning: survives process crash,
    /// kernel crash and power loss (on a disk that honours flushes). The default.
    Fsync,
    /// Flush the log to the OS (`pwrite` + `sync_file_range`) before returning: survives a
    /// process crash; a power loss may lose recent operations.
    Flush,
    /// Return at once; the storage library flushes and fsyncs in the background every
    /// `every`. A crash of any kind may lose the operations of the last interval.
    Buffered {
        /// The background flush interval (rounded up to whole milliseconds).
        every: Duration,
    },
}

/// Commit counts since a [`Queue`](crate::Queue) was opened
/// ([`Queue::commit_stats`](crate::Queue::commit_stats)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Atomic write steps committed: one per mutating step (a rejected operation writes
    /// none), the layout write of a new database included.
    pub transactions: u64,
    /// Storage commits that applied them: one per transaction in `Buffered` mode; in the
    /// durable modes one per flush round, covering every transaction staged before it.
    pub storage_commits: u64,
    /// Durability flushes attempted: sled flushes in `Flush` mode, write-ahead log syncs in
    /// `Fsync` mode on disk (checkpoints not counted); always 0 in `Buffered` mode, where the
    /// storage library flushes in the background.
    pub flushes: u64,
}

/// Where the database lives.
pub(crate) enum Location {
    Path(PathBuf),
    Temporary,
}

/// Store settings from the builder.
pub(crate) struct StoreConfig {
    pub location: Location,
    pub cache_capacity: u64,
    pub durability: Durability,
    /// `Wal::open`'s checkpoint size.
    pub wal_checkpoint_bytes: u64,
    /// Logged writes are drained into sled once more than this many wait.
    pub background_apply_writes: usize,
    /// Fewer are drained once no batch was logged for this long.
    pub idle_drain: Duration,
}

/// A set of puts and deletes applied as one atomic transaction.
#[derive(Default, Debug)]
pub(crate) struct WriteSet {
    ops: Vec<(TreeId, Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteSet {
    pub fn put(&mut self, tree: TreeId, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((tree, key.into(), Some(value.into())));
    }

    pub fn delete(&mut self, tree: TreeId, key: impl Into<Vec<u8>>) {
        self.ops.push((tree, key.into(), None));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Replaces record `old` by `new` (either may be absent), with exactly the index changes
    /// that `keys::index_entries` implies.
    pub fn record(&mut self, old: Option<&Record>, new: Option<&Record>) -> Result<()> {
        let old_entries = old.map(keys::index_entries).unwrap_or_default();
        let new_entries = new.map(keys::index_entries).unwrap_or_default();
        for (tree, key, _) in &old_entries {
            if !new_entries.iter().any(|(t, k, _)| t == tree && k == key) {
                self.delete(*tree, key.clone());
            }
        }
        for entry in new_entries {
            if !old_entries.contains(&entry) {
                self.ops.push((entry.0, entry.1, Some(entry.2)));
            }
        }
        match (old, new) {
            (_, Some(n)) => {
                let bytes = codec::encode_record(n).map_err(Error::Storage)?;
                self.put(
                    TreeId::Messages,
                    keys::message(n.work_pool_id, n.born),
                    bytes,
                );
            }
            (Some(o), None) => self.delete(TreeId::Messages, keys::message(o.work_pool_id, o.born)),
            (None, None) => {}
        }
        Ok(())
    }
}

/// One write: tree, key, new value (`None`: delete).
pub(crate) type Write<'a> = (TreeId, &'a [u8], Option<&'a [u8]>);
/// A staged key and its new value (`None`: deleted).
type Entry = (Vec<u8>, Option<Vec<u8>>);

/// Per tree: key → new value (`None`: deleted). The last write of a key wins.
#[derive(Default)]
struct Overlay {
    trees: [BTreeMap<Vec<u8>, Option<Vec<u8>>>; TreeId::ALL.len()],
}

impl Overlay {
    fn insert(&mut self, tree: TreeId, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.trees[tree as usize].insert(key, value);
    }

    fn is_empty(&self) -> bool {
        self.trees.iter().all(BTreeMap::is_empty)
    }

    /// The overlay of `ops`, built without a lock held: sorted per tree, the last write of
    /// a key winning.
    fn from_ops(ops: Vec<(TreeId, Vec<u8>, Option<Vec<u8>>)>) -> Overlay {
        let mut per_tree: [Vec<Entry>; TreeId::ALL.len()] = Default::default();
        // Newest first, so that the stable sort keeps each key's last write first.
        for (tree, key, value) in ops.into_iter().rev() {
            per_tree[tree as usize].push((key, value));
        }
        let mut out = Overlay::default();
        for (map, mut entries) in out.trees.iter_mut().zip(per_tree) {
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            entries.dedup_by(|later, first| later.0 == first.0);
            *map = entries.into_iter().collect();
        }
        out
    }

    /// Adds `newer`'s writes, which replace this overlay's writes of the same keys. The
    /// smaller map of each tree is inserted into the larger (a large write set costs few
    /// inserts under the staging lock).
    fn merge(&mut self, newer: Overlay) {
        for (map, mut add) in self.trees.iter_mut().zip(newer.trees) {
            if add.len() > map.len() {
                std::mem::swap(map, &mut add);
                // `add` holds the older writes now: they fill in only keys `newer` lacks.
                for (key, value) in add {
                    map.entry(key).or_insert(value);
                }
            } else {
                map.extend(add);
            }
        }
    }

    /// [`merge`](Overlay::merge) for the logged writes: in the trees of
    /// [`TreeId::CREATED_ONCE`], a delete of a key that this overlay puts removes the key
    /// instead. The put created it, so neither sled nor an older overlay holds it (a
    /// message reserved and acked before its drain leaves no index entry to write).
    fn merge_cancelling(&mut self, mut newer: Overlay) {
        for t in TreeId::CREATED_ONCE {
            let map = &mut self.trees[t as usize];
            debug_assert!(
                newer.trees[t as usize]
                    .iter()
                    .all(|(key, value)| value.is_none() || !map.contains_key(key)),
                "a key of {} was put twice",
                t.name()
            );
            newer.trees[t as usize].retain(|key, value| {
                let cancels = value.is_none() && matches!(map.get(key), Some(Some(_)));
                if cancels {
                    map.remove(key);
                }
                !cancels
            });
        }
        self.merge(newer);
    }

    /// How many writes the batch holds.
    fn len(&self) -> usize {
        self.trees.iter().map(BTreeMap::len).sum()
    }

    fn writes(&self) -> Vec<Write<'_>> {
        TreeId::ALL
            .iter()
            .flat_map(|t| {
                self.trees[*t as usize]
                    .iter()
                    .map(move |(k, v)| (*t, k.as_slice(), v.as_deref()))
            })
            .collect()
    }
}

/// Ends a flush leader's round that unwinds (a panic) before it recorded its result: the
/// engine is poisoned, and the callers waiting for the round are woken to learn it (they
/// would otherwise wait for a leader that is gone).
struct RoundGuard<'a> {
    store: &'a Store,
    done: bool,
}

impl Drop for RoundGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut st = lock(&self.store.flush);
            st.flushing = false;
            st.failed.get_or_insert("a flush round panicked".into());
            self.store.flushed.notify_all();
        }
    }
}

/// Durable-mode write sets not yet in sled (see the module comment). Reads consult them
/// newest first: `current`, `applying` (newest first), `logged`, `draining`.
#[derive(Default)]
struct Staged {
    /// Staged since the current leader took its batch.
    current: Overlay,
    /// Batches taken by flush leaders and not yet logged (or, without a log, not yet wholly
    /// in sled), oldest first.
    applying: VecDeque<Arc<Overlay>>,
    /// Logged batches not yet taken by a drain, merged (`Fsync` mode on disk).
    logged: Overlay,
    /// Logged writes being written into sled by a drain.
    draining: Option<Arc<Overlay>>,
    /// Batches merged into `logged` so far (the drain thread tells idleness by it).
    logged_batches: u64,
    /// A drain failed: `draining` never reaches sled in this process.
    drain_failed: bool,
    /// The store is closing: the drain thread drains what is left and ends.
    closing: bool,
}

impl Staged {
    /// The maps of `tree` that reads consult, oldest first.
    fn maps(
        &self,
        t: usize,
    ) -> impl DoubleEndedIterator<Item = &BTreeMap<Vec<u8>, Option<Vec<u8>>>> + Clone {
        self.draining
            .iter()
            .map(move |d| &d.trees[t])
            .chain([&self.logged.trees[t]])
            .chain(self.applying.iter().map(move |a| &a.trees[t]))
            .chain([&self.current.trees[t]])
    }

    /// The staged value of `key`: `Some(None)` when staged as deleted, `None` when not staged.
    fn get(&self, tree: TreeId, key: &[u8]) -> Option<Option<&[u8]>> {
        self.maps(tree as usize)
            .rev()
            .find_map(|m| m.get(key))
            .map(|v| v.as_deref())
    }

    /// Every staged entry of `tree` within `bounds`, in key order.
    fn range(&self, tree: TreeId, bounds: &KeyBounds) -> Vec<Entry> {
        let maps = self.maps(tree as usize).filter(|m| !m.is_empty());
        if is_empty(bounds) || maps.clone().next().is_none() {
            return Vec::new();
        }
        let mut out: BTreeMap<&Vec<u8>, &Option<Vec<u8>>> = BTreeMap::new();
        // Oldest first: a later batch's value of a key replaces an earlier one's.
        for map in maps {
            out.extend(map.range::<Vec<u8>, _>(bounds.clone()));
        }
        out.into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

type KeyBounds = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// Whether no key lies within `bounds` (`BTreeMap::range` panics on such bounds; sled
/// returns nothing).
fn is_empty(bounds: &KeyBounds) -> bool {
    match bounds {
        (Bound::Included(a), Bound::Included(b)) => a > b,
        (Bound::Included(a) | Bound::Excluded(a), Bound::Excluded(b))
        | (Bound::Excluded(a), Bound::Included(b)) => a >= b,
        _ => false,
    }
}

/// Entries of one tree in key order: sled's, overlaid by the staged ones taken when the
/// iterator was made. For the writer-lock holder this is exact: nothing else stages while it
/// holds the lock, and a drain or a leader writing into sled meanwhile writes exactly the
/// staged entries it already sees. A lock-free reader iterating while writers commit may see keys from
/// different moments, as a plain sled iterator always could.
pub(crate) struct Entries {
    sled: Peekable<sled::Iter>,
    staged: Peekable<std::vec::IntoIter<Entry>>,
}

impl Iterator for Entries {
    type Item = Result<(sled::IVec, sled::IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let staged_first = match (self.sled.peek(), self.staged.peek()) {
                (_, None) | (Some(Err(_)), _) => false,
                (None, Some(_)) => true,
                (Some(Ok((k, _))), Some((sk, _))) => sk.as_slice() <= k.as_ref(),
            };
            if !staged_first {
                return self.sled.next().map(|r| r.map_err(Error::from));
            }
            let (key, value) = self.staged.next()?;
            if let Some(Ok((k, _))) = self.sled.peek() {
                if k.as_ref() == key.as_slice() {
                    self.sled.next();
                }
            }
            if let Some(v) = value {
                return Some(Ok((key.into(), v.into())));
            }
        }
    }
}

fn write_one(tree: &sled::Tree, key: &[u8], value: Option<&[u8]>) -> Result<()> {
    match value {
        Some(v) => tree.insert(key, v)?,
        None => tree.remove(key)?,
    };
    Ok(())
}

/// The sled tree that a journal or log record's tree index names, in the layout being
/// replayed (`None`: that layout has no such tree).
pub(crate) type TreeOf<'a> = dyn Fn(TreeId) -> Result<Option<sled::Tree>> + 'a;

/// Applies replayed `writes` to the trees `trees` names; every tree is found first, so a
/// write to a tree the layout does not have (`damaged`) changes nothing.
fn apply_replayed(
    writes: &[codec::JournalWrite],
    trees: &TreeOf<'_>,
    damaged: impl Fn(String) -> Error,
) -> Result<()> {
    let mut targets = Vec::with_capacity(writes.len());
    for (tree, _, _) in writes {
        match trees(*tree)? {
            Some(t) => targets.push(t),
            None => {
                return Err(damaged(format!(
                    "a write to tree {}, which this database's layout does not have",
                    *tree as usize
                )))
            }
        }
    }
    for ((_, key, value), tree) in writes.iter().zip(&targets) {
        write_one(tree, key, value.as_deref())?;
    }
    Ok(())
}

/// The keys starting with `prefix`.
fn prefix_bounds(prefix: &[u8]) -> KeyBounds {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return (Bound::Included(prefix.to_vec()), Bound::Excluded(end));
        }
    }
    (Bound::Included(prefix.to_vec()), Bound::Unbounded)
}

/// `writes` as plain sled writes, in order (atomic only through a journal or the log).
fn write_each(trees: &[sled::Tree], faults: &Faults, writes: &[Write<'_>]) -> Result<()> {
    for (i, (tree, key, value)) in writes.iter().enumerate() {
        faults.before_applied_write(i as u64)?;
        write_one(&trees[*tree as usize], key, *value)?;
    }
    Ok(())
}

/// `batch` is in sled now: reads stop consulting it.
fn applied(staged: &Mutex<Staged>, batch: &Arc<Overlay>) {
    lock(staged).applying.retain(|b| !Arc::ptr_eq(b, batch));
}

/// Records the first failure: the engine is poisoned.
fn fail(flush: &Mutex<FlushState>, why: String) {
    lock(flush).failed.get_or_insert(why);
}

/// By default, logged writes wait in the overlay until more than this many (each key counted
/// once) are there, then the drain thread writes them into sled as one merged batch; a key
/// written by several of them (a message enqueued, reserved and acked, a pool's wakeup
/// counter) reaches sled once, and an index entry put and deleted again costs sled no write.
/// `QueueBuilder::background_apply_writes` sets another; 0 drains every batch at once.
pub(crate) const BACKGROUND_WRITES: usize = 256;

/// Logged writes below the threshold are drained once no batch was logged for this long,
/// so that the overlay empties after a burst (an empty reserve copies the overlay's entries
/// of the range it scans).
pub(crate) const IDLE_DRAIN: Duration = Duration::from_millis(5);

/// A write set of more writes than this is sorted into maps before it is staged.
const SMALL_WRITE_SET: usize = 32;

/// Logged writes beyond the drain threshold that may wait while a drain is in progress: a
/// flush leader over it waits for that drain to end. With the idle drain and checkpoints,
/// this bounds the overlay that reads look through, and its memory, to about the
/// threshold plus this plus one round's batch and the batch being drained.
const MAX_UNDRAINED: usize = 4 * BACKGROUND_WRITES;

/// Writes logged batches into sled (`Fsync` mode on disk), merged, off their callers' path
/// (see the module comment). Shared by the store and the drain thread.
struct DrainWork {
    trees: Vec<sled::Tree>,
    staged: Arc<Mutex<Staged>>,
    flush: Arc<Mutex<FlushState>>,
    faults: Arc<Faults>,
    /// Drain when more logged writes than this wait.
    threshold: usize,
    /// Drain any once no batch was logged for this long.
    idle: Duration,
    /// The thread waits here for writes to drain, or for the store to close.
    work: Condvar,
    /// A drain ended: leaders over the bound and `wait_applied` wait here.
    progress: Condvar,
}

impl DrainWork {
    /// Takes the logged writes as the next drain: when no drain is in progress, none failed,
    /// and there are more than the threshold (any, with `all`).
    fn take(&self, st: &mut Staged, all: bool) -> Option<Arc<Overlay>> {
        let due = if all {
            !st.logged.is_empty()
        } else {
            st.logged.len() > self.threshold
        };
        if st.draining.is_some() || st.drain_failed || !due {
            return None;
        }
        let batch = Arc::new(std::mem::take(&mut st.logged));
        st.draining = Some(batch.clone());
        Some(batch)
    }

    /// Writes `batch` (taken by `take`) into sled as plain writes: the log holds every
    /// batch in it, so a crash part way is completed on open. After a failure nothing more
    /// is written, and a batch that failed (or panicked) stays in the overlay: it is
    /// durable, the next open completes it, and sled without it is never read as state.
    fn drain(&self, batch: &Arc<Overlay>) {
        let result = if lock(&self.flush).failed.is_some() {
            Ok(Err(Error::Poisoned("an earlier write failed".into())))
        } else {
            catch_unwind(AssertUnwindSafe(|| {
                write_each(&self.trees, &self.faults, &batch.writes())
            }))
        };
        let failed = match result {
            Ok(Ok(())) => false,
            Ok(Err(e)) => {
                fail(&self.flush, e.to_string());
                true
            }
            Err(_) => {
                fail(
                    &self.flush,
                    "writing logged batches into sled panicked".into(),
                );
                true
            }
        };
        let mut st = lock(&self.staged);
        if failed {
            st.drain_failed = true;
        } else {
            st.draining = None;
            if !st.logged.is_empty() {
                // More was logged while this drain ran (perhaps on a caller's thread).
                self.work.notify_one();
            }
        }
        self.progress.notify_all();
    }

    /// The thread: drains whenever enough logged writes wait, or any once no batch was
    /// logged for `idle`; once the store closes, drains what is left and ends.
    fn run(&self) {
        let mut st = lock(&self.staged);
        let mut idle = false;
        loop {
            let closing = st.closing;
            if let Some(batch) = self.take(&mut st, closing || idle) {
                drop(st);
                self.drain(&batch);
                st = lock(&self.staged);
                idle = false;
                continue;
            }
            if closing {
                return;
            }
            if st.logged.is_empty() || st.draining.is_some() || st.drain_failed {
                idle = false;
                st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
            } else {
                let seen = st.logged_batches;
                let (guard, waited) = self
                    .work
                    .wait_timeout(st, self.idle)
                    .unwrap_or_else(|p| p.into_inner());
                st = guard;
                idle = waited.timed_out() && st.logged_batches == seen;
            }
        }
    }

    /// Returns once every write logged so far is in sled, draining them on this thread if
    /// the drain thread is not already at it; or once a drain failed.
    fn drain_all(&self) {
        let mut st = lock(&self.staged);
        loop {
            if let Some(batch) = self.take(&mut st, true) {
                drop(st);
                self.drain(&batch);
                st = lock(&self.staged);
                continue;
            }
            if st.draining.is_none() || st.drain_failed {
                return;
            }
            st = self.progress.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// A flush leader's part once its waiters are released: should a drain be in progress
    /// with more than `MAX_UNDRAINED` writes waiting beyond the threshold, wait for it to end.
    fn bound(&self) {
        let st = lock(&self.staged);
        let limit = self.threshold.saturating_add(MAX_UNDRAINED);
        let _st = self
            .progress
            .wait_while(st, |st| {
                st.draining.is_some() && !st.drain_failed && st.logged.len() > limit
            })
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// The drain thread. Dropped, it drains what was logged, then ends.
struct Drainer {
    work: Arc<DrainWork>,
    thread: Option<JoinHandle<()>>,
}

impl Drainer {
    fn spawn(work: DrainWork) -> Result<Drainer> {
        let work = Arc::new(work);
        let w = work.clone();
        let thread = std::thread::Builder::new()
            .name("cleanup-queue-drain".into())
            .spawn(move || w.run())?;
        Ok(Drainer {
            work,
            thread: Some(thread),
        })
    }
}

impl Drop for Drainer {
    fn drop(&mut self) {
        lock(&self.work.staged).closing = true;
        self.work.work.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct FlushState {
    /// Every transaction with a ticket `<= durable` is on disk.
    durable: u64,
    /// A leader is flushing right now.
    flushing: bool,
    /// A flush failed: the disk may be behind memory for good.
    failed: Option<String>,
}

pub(crate) struct Store {
    /// Drains logged batches into sled (`Fsync` mode on disk only). First, so that a
    /// dropped store joins it before anything else goes.
    drainer: Option<Drainer>,
    db: sled::Db,
    trees: Vec<sled::Tree>,
    durability: Durability,
    /// sled's data file, `fdatasync`ed by checkpoints (on disk only).
    sync_file: Option<File>,
    /// The write-ahead log (`Fsync` mode on disk only; see the module comment).
    wal: Option<Mutex<Wal>>,
    staged: Arc<Mutex<Staged>>,
    /// Tickets handed out: one per committed transaction, in commit order.
    issued: AtomicU64,
    /// The last ticket a flush leader took into its batch (durable modes).
    taken: AtomicU64,
    /// How many transactions the last batch held.
    last_batch: AtomicU64,
    /// sled transactions (or one-key writes) done.
    storage_commits: AtomicU64,
    /// Durability flushes done.
    flushes: AtomicU64,
    flush: Arc<Mutex<FlushState>>,
    flushed: Condvar,
    path: Option<PathBuf>,
    /// A staged batch of more writes is large: not worth gathering company for
    /// (`StoreConfig::background_apply_writes`, also the drain threshold).
    background_writes: usize,
    /// Test-only failure injection.
    pub(crate) faults: Arc<Faults>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long `Store::open` keeps retrying a database whose lock is held before it reports
/// `Error::InUse`.
const LOCK_RETRY: Duration = Duration::from_secs(1);

/// Segments large enough that no record is ever written as a separate blob file (sled
/// writes a node larger than a quarter segment as a blob, and does not fsync blobs).
const SEGMENT_SIZE: usize = 8 << 20;

/// Larger journals are not written: their batch is applied as one sled transaction instead.
/// sled writes a log entry over a quarter segment (2 MiB) as a blob file, and the `meta`
/// node holding the journal must stay below that too. (`expire_leases(1000)` writes about
/// 0.5 MiB.)
const JOURNAL_MAX: usize = 1 << 20;

impl Store {
    pub fn open(config: StoreConfig) -> Result<Store> {
        let mut sled_config = sled::Config::new()
            .cache_capacity(config.cache_capacity)
            .mode(sled::Mode::HighThroughput)
            .segment_size(SEGMENT_SIZE)
            .flush_every_ms(match config.durability {
                Durability::Buffered { every } => {
                    Some(u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1))
                }
                _ => None,
            });
        let path = match &config.location {
            Location::Path(p) => {
                sled_config = sled_config.path(p);
                Some(p.clone())
            }
            Location::Temporary => {
                sled_config = sled_config.temporary(true);
                None
            }
        };
        // sled releases its file lock from a background IO thread shortly after the last
        // handle of a database is dropped (a pending log write or segment truncation owns
        // the file until it finishes), so a lock refusal right after a close in this or
        // another process is retried for a while before it counts as a second opener
        // (tests/second_opener.rs, reopening_right_after_drop_never_sees_in_use).
        let started = std::time::Instant::now();
        let db = loop {
            match sled_config.open() {
                Ok(db) => break db,
                Err(e) => match open_error(e, path.as_deref()) {
                    Error::InUse { .. } if started.elapsed() < LOCK_RETRY => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    other => return Err(other),
                },
            }
        };
        let trees = TreeId::ALL
            .iter()
            .map(|t| db.open_tree(t.sled_name()))
            .collect::<sled::Result<Vec<_>>>()?;
        let sync_file = match &path {
            Some(p) => Some(File::open(p.join("db"))?),
            None => None,
        };
        let checkpoint_bytes = config.wal_checkpoint_bytes;
        let mut store = Store {
            drainer: None,
            db,
            trees,
            durability: config.durability,
            sync_file,
            wal: None,
            staged: Arc::default(),
            issued: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            last_batch: AtomicU64::new(0),
            storage_commits: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            flush: Arc::new(Mutex::new(FlushState {
                durable: 0,
                flushing: false,
                failed: None,
            })),
            flushed: Condvar::new(),
            path,
            background_writes: config.background_apply_writes,
            faults: Arc::default(),
        };
        if let Some(dir) = &store.path {
            // Before anything is written: a sled that lost checkpointed writes is refused.
            crate::mark::check(dir, store.get_u64(TreeId::Meta, keys::META_CHECKPOINT)?)?;
        }
        store.check_format()?;
        store.wal = store.recover_wal(checkpoint_bytes)?.map(Mutex::new);
        if store.wal.is_some() {
            let work = DrainWork {
                trees: store.trees.clone(),
                staged: store.staged.clone(),
                flush: store.flush.clone(),
                faults: store.faults.clone(),
                threshold: config.background_apply_writes,
                idle: config.idle_drain,
                work: Condvar::new(),
                progress: Condvar::new(),
            };
            store.drainer = Some(Drainer::spawn(work)?);
        }
        Ok(store)
    }

    /// Writes the layout byte into a new database, finishes a batch that a crash interrupted
    /// and migrates layouts 1 to 4 (`crate::migrate`); refuses any other.
    fn check_format(&self) -> Result<()> {
        match self.tree(TreeId::Meta).get(keys::META_FORMAT)? {
            Some(v) if v.as_ref() == [keys::LAYOUT] => {
                self.replay_journal(&|t| Ok(Some(self.tree(t).clone())))?;
                crate::migrate::drop_old_trees(&self.db)
            }
            Some(v)
                if matches!(
                    v.as_ref(),
                    [keys::LAYOUT_V4] | [keys::LAYOUT_V3] | [keys::LAYOUT_V2] | [keys::LAYOUT_V1]
                ) =>
            {
                // First complete what the old layout left to do, in its own trees: a batch
                // journal (layouts 3 and 4) and the write-ahead log (layout 4), which is
                // then retired so that it is never applied to the new trees.
                let old = |t: TreeId| crate::migrate::old_tree(&self.db, t);
                self.replay_journal(&old)?;
                let (generation, applied) = self.replay_wal(&old)?;
                if applied > 0 {
                    self.advance_generation(generation)?;
                }
                crate::migrate::to_current_layout(self)?;
                self.write_layout()?;
                crate::migrate::drop_old_trees(&self.db)
            }
            Some(v) => Err(Error::corrupted(
                "meta",
                keys::META_FORMAT,
                format!("unsupported database format {:?}", v.as_ref()),
            )),
            None => self.write_layout(),
        }
    }

    /// Completes the batch whose journal a crash left behind (see the module comment),
    /// writing into the trees `trees` names.
    fn replay_journal(&self, trees: &TreeOf<'_>) -> Result<()> {
        let meta = self.tree(TreeId::Meta);
        let Some(bytes) = meta.get(keys::META_JOURNAL)? else {
            return Ok(());
        };
        let damaged = |d: String| Error::corrupted("meta", keys::META_JOURNAL, d);
        let writes = codec::decode_journal(&bytes).map_err(damaged)?;
        apply_replayed(&writes, trees, damaged)?;
        meta.remove(keys::META_JOURNAL)?;
        Ok(())
    }

    /// Applies the write-ahead log's records of the current generation to the trees `trees`
    /// names; returns the generation and how many records there were.
    fn replay_wal(&self, trees: &TreeOf<'_>) -> Result<(u64, usize)> {
        let Some(dir) = &self.path else {
            return Ok((0, 0));
        };
        let generation = self.get_u64(TreeId::Meta, keys::META_WAL)?;
        let damaged = |detail: String| Error::Corrupted {
            tree: "(write-ahead log)",
            key: wal::FILE_NAME.into(),
            detail,
        };
        // Id 0: no generation yet, so nothing logged.
        let bytes = if generation == 0 {
            Vec::new()
        } else {
            wal::read(dir)?
        };
        let records = codec::decode_wal(&bytes, generation).map_err(damaged)?;
        let batches = records
            .iter()
            .enumerate()
            .map(|(i, record)| {
                codec::decode_journal(record)
                    .map_err(|d| damaged(format!("record {i} of generation {generation}: {d}")))
            })
            .collect::<Result<Vec<_>>>()?;
        for (i, writes) in batches.iter().enumerate() {
            apply_replayed(writes, trees, |d| {
                damaged(format!("record {i} of generation {generation}: {d}"))
            })?;
        }
        Ok((generation, records.len()))
    }

    /// Applies the write-ahead log's records of the current generation to sled (a crash may
    /// have kept only part of them there), then checkpoints so that none is applied again;
    /// returns the log to write in `Fsync` mode (see the module comment).
    fn recover_wal(&self, checkpoint_bytes: u64) -> Result<Option<Wal>> {
        let Some(dir) = &self.path else {
            return Ok(None);
        };
        let (generation, applied) = self.replay_wal(&|t| Ok(Some(self.tree(t).clone())))?;
        if self.durability != Durability::Fsync {
            if applied > 0 {
                self.advance_generation(generation)?;
            }
            return Ok(None);
        }
        // Always a checkpoint: the first record must not be logged on top of a sled state
        // that an earlier session in another mode left unsynced.
        let mut log = Wal::open(dir, generation, checkpoint_bytes)?;
        self.checkpoint(&mut log)?;
        Ok(Some(log))
    }

    /// Makes sled durable and starts the log over with a new generation.
    fn checkpoint(&self, log: &mut Wal) -> Result<()> {
        let next = self.advance_generation(log.generation())?;
        log.restart(next);
        Ok(())
    }

    /// Records a new generation id (random, never 0, never `current`) as the log's current
    /// one and makes sled durable: every record logged so far is in sled now, and none will
    /// be applied again. Counts the checkpoint in sled, then, once sled is durable, in the
    /// checkpoint mark (`crate::mark`). Refused once a write failed (a failed batch may be
    /// half in sled, and only its record, which this would retire, can complete it). Returns
    /// the id.
    fn advance_generation(&self, current: u64) -> Result<u64> {
        if let Some(e) = self.failure() {
            return Err(Error::Poisoned(format!("writing to disk failed: {e}")));
        }
        let mut next = current;
        while next == 0 || next == current {
            next = u64::from_be_bytes(crate::os_random()?);
        }
        let count = self
            .get_u64(TreeId::Meta, keys::META_CHECKPOINT)?
            .saturating_add(1);
        let meta = self.tree(TreeId::Meta);
        meta.insert(keys::META_WAL, &next.to_be_bytes())?;
        meta.insert(keys::META_CHECKPOINT, &codec::encode_u64(count))?;
        self.sync_sled()?;
        if let Some(dir) = &self.path {
            crate::mark::write(dir, count)?;
        }
        Ok(next)
    }

    fn write_layout(&self) -> Result<()> {
        let mut ws = WriteSet::default();
        ws.put(TreeId::Meta, keys::META_FORMAT, vec![keys::LAYOUT]);
        let ticket = self.commit(ws)?;
        if let Durability::Buffered { .. } = self.durability {
            // On disk in every mode: a layout change must never be lost.
            self.db.flush()?;
        }
        self.wait_durable(ticket)
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The sled database (for `crate::migrate`).
    pub(crate) fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Makes everything written to sled so far durable, as a checkpoint does.
    pub(crate) fn sync_sled(&self) -> Result<()> {
        self.db.flush()?;
        if let Some(f) = &self.sync_file {
            f.sync_data()?;
        }
        Ok(())
    }

    pub fn tree(&self, t: TreeId) -> &sled::Tree {
        &self.trees[t as usize]
    }

    /// The value of `key`: staged, else in sled.
    pub fn get(&self, t: TreeId, key: &[u8]) -> Result<Option<sled::IVec>> {
        if let Some(v) = lock(&self.staged).get(t, key) {
            return Ok(v.map(sled::IVec::from));
        }
        Ok(self.tree(t).get(key)?)
    }

    /// The message `id` of `pool`, decoded.
    ///
    /// Two reads, `message_ids` then `messages`, and readers take no lock: a commit in
    /// between may delete the message (a pruned or replaced tombstone) or move the id to a
    /// new record. A write set becomes visible whole, so the entry is read again: changed,
    /// follow it; unchanged, the index really points nowhere.
    pub fn get_record(&self, pool: Uuid, id: Uuid) -> Result<Option<Record>> {
        let key = keys::message_id(pool, id);
        let born_of = || -> Result<Option<u64>> {
            match self.get(TreeId::MessageIds, &key)? {
                None => Ok(None),
                Some(v) => codec::decode_u64(&v)
                    .map(Some)
                    .map_err(|d| Error::corrupted("message_ids", &key, d)),
            }
        };
        let mut born = born_of()?;
        while let Some(b) = born {
            if let Some(rec) = self.get_record_at(pool, b)? {
                if rec.message_id == id {
                    return Ok(Some(rec));
                }
            }
            let again = born_of()?;
            if again == born {
                return Err(Error::corrupted(
                    "message_ids",
                    &key,
                    "points at a missing or another message",
                ));
            }
            born = again;
        }
        Ok(None)
    }

    /// The record at `(pool, born)`, decoded.
    pub fn get_record_at(&self, pool: Uuid, born: u64) -> Result<Option<Record>> {
        let key = keys::message(pool, born);
        match self.get(TreeId::Messages, &key)? {
            None => Ok(None),
            Some(bytes) => decode_record_at(&key, &bytes).map(Some),
        }
    }

    /// A counter (`wakeups`, `meta/seq`), 0 when absent.
    pub fn get_u64(&self, t: TreeId, key: &[u8]) -> Result<u64> {
        match self.get(t, key)? {
            None => Ok(0),
            Some(v) => codec::decode_u64(&v).map_err(|d| Error::corrupted(t.name(), key, d)),
        }
    }

    /// The entries of `t` within `range`, in key order, staged ones included.
    pub fn range<R: RangeBounds<Vec<u8>>>(&self, t: TreeId, range: R) -> Entries {
        let bounds: KeyBounds = (range.start_bound().cloned(), range.end_bound().cloned());
        let staged = lock(&self.staged).range(t, &bounds);
        Entries {
            sled: self.tree(t).range(bounds).peekable(),
            staged: staged.into_iter().peekable(),
        }
    }

    /// The entries of `t` whose keys start with `prefix`, in key order.
    pub fn scan_prefix(&self, t: TreeId, prefix: &[u8]) -> Entries {
        self.range(t, prefix_bounds(prefix))
    }

    /// Commits `ws` atomically and returns its durability ticket: stages it, then applies it
    /// to sled at once in `Buffered` mode; otherwise the next flush leader does. Callers
    /// serialise commits (the engine's writer lock), so tickets follow commit order.
    pub fn commit(&self, mut ws: WriteSet) -> Result<u64> {
        self.faults.before_write()?;
        // A large write set is sorted into maps before the staging lock is taken (readers
        // wait on that lock); a small one is inserted under it, cheaper than building maps.
        let built = (ws.ops.len() > SMALL_WRITE_SET)
            .then(|| Overlay::from_ops(std::mem::take(&mut ws.ops)));
        let ticket = {
            let mut st = lock(&self.staged);
            match built {
                Some(built) => st.current.merge(built),
                None => {
                    for (tree, key, value) in ws.ops {
                        st.current.insert(tree, key, value);
                    }
                }
            }
            // Issued under the staging lock: a leader taking the batch covers exactly the
            // tickets issued so far.
            self.issued.fetch_add(1, Ordering::SeqCst) + 1
        };
        if let Durability::Buffered { .. } = self.durability {
            // A failure poisons the engine (`apply_staged`): part of the batch may be in
            // sled, and nothing may be written after it.
            self.apply_staged(|writes| self.apply(writes))?;
        }
        Ok(ticket)
    }

    /// Writes `writes` to sled atomically (see the module comment).
    fn apply(&self, writes: &[Write<'_>]) -> Result<()> {
        self.storage_commits.fetch_add(1, Ordering::Relaxed);
        if let [(tree, key, value)] = writes {
            // One key is atomic on its own.
            return write_one(self.tree(*tree), key, *value);
        }
        let journal = codec::encode_journal(writes.iter().copied()).map_err(Error::Storage)?;
        if journal.len() > JOURNAL_MAX {
            return self.apply_transaction(writes);
        }
        let meta = self.tree(TreeId::Meta);
        meta.insert(keys::META_JOURNAL, journal)?;
        write_each(&self.trees, &self.faults, writes)?;
        meta.remove(keys::META_JOURNAL)?;
        Ok(())
    }

    /// Writes `writes` as one sled transaction.
    fn apply_transaction(&self, writes: &[Write<'_>]) -> Result<()> {
        let result: std::result::Result<(), TransactionError<()>> =
            self.trees[..].transaction(|views| {
                for (tree, key, value) in writes {
                    let view = &views[*tree as usize];
                    match value {
                        Some(v) => view.insert(*key, *v)?,
                        None => view.remove(*key)?,
                    };
                }
                Ok(())
            });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(e.into()),
            Err(TransactionError::Abort(())) => Err(Error::Storage("transaction aborted".into())),
        }
    }

    /// Takes everything staged as the next batch: the last ticket it covers, and the batch
    /// unless it is empty. Reads keep seeing the batch (as `applying`) until
    /// [`applied`](Store::applied).
    fn take_batch(&self) -> Result<(u64, Option<Arc<Overlay>>)> {
        if let Some(e) = self.failure() {
            // A failed batch may be half in sled with its journal or log record: writing
            // anything after it (a writer that passed its check before the failure) could
            // overwrite that journal or be overwritten by its replay.
            return Err(Error::Poisoned(format!("writing to disk failed: {e}")));
        }
        let mut st = lock(&self.staged);
        let target = self.issued.load(Ordering::SeqCst);
        let taken = self.taken.swap(target, Ordering::SeqCst);
        if st.current.is_empty() {
            return Ok((target, None));
        }
        self.last_batch.store(target - taken, Ordering::SeqCst);
        let batch = Arc::new(std::mem::take(&mut st.current));
        st.applying.push_back(batch.clone());
        Ok((target, Some(batch)))
    }

    /// `batch` is in sled now; or, after a failure, never will be: the engine is poisoned
    /// (every later call is refused), so what sled shows without it is never read as state.
    fn applied(&self, batch: &Arc<Overlay>) {
        applied(&self.staged, batch);
    }

    /// Writes everything staged as one batch with `write` and returns the last ticket it
    /// covers (a flush leader's round without a log; in `Buffered` mode, each commit's).
    /// On failure the engine is poisoned first, and the batch stays in the overlay, so that
    /// sled with part of it is never read as state (its journal completes it on reopen).
    fn apply_staged(&self, write: impl FnOnce(&[Write<'_>]) -> Result<()>) -> Result<u64> {
        let (target, batch) = self.take_batch()?;
        let Some(batch) = batch else {
            return Ok(target);
        };
        match write(&batch.writes()) {
            Ok(()) => {
                self.applied(&batch);
                Ok(target)
            }
            Err(e) => {
                self.fail(e.to_string());
                Err(e)
            }
        }
    }

    /// A flush leader's round with a log: takes the batch, logs it and hands it to the
    /// drain (see the module comment). Returns the last ticket it covers, and whether it
    /// logged a batch.
    fn log_staged(&self, log: &Mutex<Wal>) -> Result<(u64, bool)> {
        // `open` starts the drain with the log: never missing here.
        let drainer = self
            .drainer
            .as_ref()
            .ok_or_else(|| Error::Storage("a write-ahead log without its drain".into()))?;
        let (target, batch) = self.take_batch()?;
        let Some(batch) = batch else {
            return Ok((target, false));
        };
        let mut log = lock(log);
        match self.log_batch(&mut log, &batch) {
            Ok(()) => {
                // Still under the log: batches join `logged` in log order.
                self.logged(drainer, batch);
                Ok((target, true))
            }
            Err(e) => {
                self.applied(&batch);
                Err(e)
            }
        }
    }

    /// Writes `batch` to the log and syncs it, checkpointing first when the log is full.
    /// Refused once a write failed: before it logs (an earlier round failed after this one
    /// took its batch; should one fail while this one logs, both records replay in order),
    /// and before it checkpoints.
    fn log_batch(&self, log: &mut Wal, batch: &Overlay) -> Result<()> {
        let record = codec::encode_journal(batch.writes()).map_err(Error::Storage)?;
        if let Some(e) = self.failure() {
            // An earlier round failed after this one took its batch.
            return Err(Error::Poisoned(format!("writing to disk failed: {e}")));
        }
        if log.is_full() {
            self.wait_applied()?;
            self.checkpoint(log)?;
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.faults.before_flush()?;
        log.append(&record)?;
        log.sync()?;
        self.storage_commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// `batch`, the oldest taken, is logged: it moves from `applying` into `logged`, merged
    /// (the caller holds the log, so batches arrive in log order), and the drain thread is
    /// woken once enough waits.
    fn logged(&self, drainer: &Drainer, batch: Arc<Overlay>) {
        let mut st = lock(&self.staged);
        st.applying.retain(|b| !Arc::ptr_eq(b, &batch));
        // No other reference is left (reads borrow under the lock, and `applying` let go of
        // it just now); should one be, copy.
        let batch = Arc::try_unwrap(batch).unwrap_or_else(|shared| Overlay {
            trees: shared.trees.clone(),
        });
        let was_empty = st.logged.is_empty();
        st.logged.merge_cancelling(batch);
        st.logged_batches += 1;
        // Wake the thread to drain, or to start timing the idle drain.
        if (was_empty || st.logged.len() > drainer.work.threshold) && st.draining.is_none() {
            drainer.work.work.notify_one();
        }
    }

    /// Returns once every logged batch is in sled; refused if one failed to get there
    /// (nothing may be written to sled after it, nor a checkpoint retire its record).
    pub fn wait_applied(&self) -> Result<()> {
        if let Some(drainer) = &self.drainer {
            drainer.work.drain_all();
        }
        match self.failure() {
            Some(e) => Err(Error::Poisoned(format!("writing to disk failed: {e}"))),
            None => Ok(()),
        }
    }

    fn fail(&self, why: String) {
        fail(&self.flush, why);
    }

    /// The ticket of the last committed transaction: waiting for it makes everything a
    /// reader has seen durable.
    pub fn last_ticket(&self) -> u64 {
        self.issued.load(Ordering::SeqCst)
    }

    pub fn commit_stats(&self) -> CommitStats {
        CommitStats {
            transactions: self.issued.load(Ordering::SeqCst),
            storage_commits: self.storage_commits.load(Ordering::SeqCst),
            flushes: self.flushes.load(Ordering::SeqCst),
        }
    }

    /// Whether transaction `ticket` is already as durable as the mode promises (no waiting).
    pub fn is_durable(&self, ticket: u64) -> bool {
        match self.durability {
            Durability::Buffered { .. } => true,
            _ => lock(&self.flush).durable >= ticket,
        }
    }

    /// The failure of an earlier flush, if any.
    pub fn failure(&self) -> Option<String> {
        lock(&self.flush).failed.clone()
    }

    /// Transactions staged and not yet taken by a flush leader, and how many the last
    /// leader took: a leader about to take its batch may wait for the crowd it served last
    /// time to come back (`Inner::gather`).
    pub fn staging_counts(&self) -> (u64, u64) {
        let issued = self.issued.load(Ordering::SeqCst);
        let taken = self.taken.load(Ordering::SeqCst);
        (
            issued.saturating_sub(taken),
            self.last_batch.load(Ordering::SeqCst),
        )
    }

    /// Whether the writes staged for the next round are more than the drain threshold
    /// (`background_apply_writes`): such a round is not worth waiting for company.
    pub fn staged_is_large(&self) -> bool {
        lock(&self.staged).current.len() > self.background_writes
    }

    /// Returns once transaction `ticket` is as durable as the mode promises.
    pub fn wait_durable(&self, ticket: u64) -> Result<()> {
        self.wait_round(ticket, || {}, || {})
    }

    /// [`wait_durable`](Store::wait_durable); should this caller lead the flush, it first
    /// runs `gather` (which lets concurrent writers stage into the batch).
    pub fn wait_durable_gathering(&self, ticket: u64, gather: impl Fn()) -> Result<()> {
        self.wait_round(ticket, gather, || {})
    }

    /// [`wait_durable`](Store::wait_durable), running `durable` as soon as the ticket is
    /// durable: should this caller lead the round, that is before it waits for the drain
    /// (only if the drain is far behind; the ticket's durability does not need it), if the
    /// batch is
    /// small enough to be the leader's to apply.
    pub fn wait_durable_then(&self, ticket: u64, durable: impl FnOnce()) -> Result<()> {
        self.wait_round(ticket, || {}, durable)
    }

    fn wait_round(&self, ticket: u64, gather: impl Fn(), durable: impl FnOnce()) -> Result<()> {
        if let Durability::Buffered { .. } = self.durability {
            durable();
            return Ok(());
        }
        let mut durable = Some(durable);
        let mut st = lock(&self.flush);
        loop {
            // Durable first: a failure after the round that covered `ticket` (a drain's, or a
            // later round's) takes nothing from it.
            if st.durable >= ticket {
                drop(st);
                if let Some(durable) = durable.take() {
                    durable();
                }
                return Ok(());
            }
            if let Some(e) = &st.failed {
                return Err(Error::Poisoned(format!("writing to disk failed: {e}")));
            }
            if st.flushing {
                st = self.flushed.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st.flushing = true;
            drop(st);
            let mut round = RoundGuard {
                store: self,
                done: false,
            };
            gather();
            let (r, logged) = match &self.wal {
                Some(log) => match self.log_staged(log) {
                    Ok((target, logged)) => (Ok(target), logged),
                    Err(e) => (Err(e), false),
                },
                None => {
                    let r = self.apply_staged(|writes| self.apply(writes));
                    (
                        r.and_then(|target| self.flush_now().map(|()| target)),
                        false,
                    )
                }
            };
            st = lock(&self.flush);
            st.flushing = false;
            round.done = true;
            match r {
                Ok(target) => st.durable = st.durable.max(target),
                Err(e) => {
                    st.failed.get_or_insert(e.to_string());
                }
            }
            self.flushed.notify_all();
            if let (true, Some(drainer)) = (logged, &self.drainer) {
                // Durable already: the waiters go on (and the next round may log its batch)
                // while the drain thread writes logged batches into sled. Should it fall
                // behind, the leader waits for it: this bounds what reads look through.
                let covered = st.failed.is_none() && st.durable >= ticket;
                drop(st);
                if covered {
                    if let Some(durable) = durable.take() {
                        durable();
                    }
                }
                drainer.work.bound();
                st = lock(&self.flush);
            }
        }
    }

    /// Flushes sled (durable modes without a write-ahead log).
    fn flush_now(&self) -> Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.faults.before_flush()?;
        self.db.flush()?;
        Ok(())
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        let log = self.wal.as_ref().map_or(0, |log| lock(log).len());
        Ok(self.db.size_on_disk()? + log)
    }
}

/// Decodes the record stored at `messages/key`, naming the key when the bytes are bad.
pub(crate) fn decode_record_at(key: &[u8], bytes: &[u8]) -> Result<Record> {
    let rec = codec::decode_record(bytes).map_err(|d| Error::corrupted("messages", key, d))?;
    if keys::message(rec.work_pool_id, rec.born) != key {
        return Err(Error::corrupted(
            "messages",
            key,
            "the record's pool and sequence do not match its key",
        ));
    }
    Ok(rec)
}

fn open_error(e: sled::Error, path: Option<&Path>) -> Error {
    match (&e, path) {
        (sled::Error::Io(io), Some(p)) if io.to_string().contains("could not acquire lock") => {
            Error::InUse {
                path: p.to_path_buf(),
            }
        }
        _ => Error::from(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temporary(durability: Durability) -> Store {
        Store::open(StoreConfig {
            location: Location::Temporary,
            cache_capacity: 1 << 20,
            durability,
            wal_checkpoint_bytes: wal::CHECKPOINT_BYTES,
            background_apply_writes: BACKGROUND_WRITES,
            idle_drain: IDLE_DRAIN,
        })
        .expect("open")
    }

    fn try_on_disk(dir: &Path) -> Result<Store> {
        open_idle(dir, IDLE_DRAIN)
    }

    /// An `Fsync` store on disk whose drain writes what waits after `idle` without logs.
    fn open_idle(dir: &Path, idle: Duration) -> Result<Store> {
        Store::open(StoreConfig {
            location: Location::Path(dir.to_path_buf()),
            cache_capacity: 1 << 20,
            durability: Durability::Fsync,
            wal_checkpoint_bytes: wal::CHECKPOINT_BYTES,
            background_apply_writes: BACKGROUND_WRITES,
            idle_drain: idle,
        })
    }

    fn on_disk(dir: &Path) -> Store {
        try_on_disk(dir).expect("open")
    }

    /// Commits one put and waits until it is durable.
    fn put(store: &Store, key: &[u8], value: &[u8]) {
        let mut ws = WriteSet::default();
        ws.put(TreeId::Redrives, key, value.to_vec());
        let ticket = store.commit(ws).expect("commit");
        store.wait_durable(ticket).expect("durable");
    }

    fn value(store: &Store, key: &[u8]) -> Option<Vec<u8>> {
        let v = store.get(TreeId::Redrives, key).expect("get");
        v.map(|v| v.to_vec())
    }

    fn generation(store: &Store) -> u64 {
        store
            .get_u64(TreeId::Meta, keys::META_WAL)
            .expect("generation")
    }

    /// In `Fsync` mode a batch is durable once its log record is: a batch logged but not
    /// (or not wholly) applied to sled, as a crash right after the log's `fdatasync` leaves
    /// it, is applied on open, and the log starts over with a new generation.
    #[test]
    fn a_logged_batch_missing_from_sled_is_applied_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        for applied in [0, 1] {
            let path = dir.path().join(format!("db{applied}"));
            let before = {
                let store = on_disk(&path);
                put(&store, b"a", b"1");
                store.wait_applied().expect("applied");
                store.faults.tear_apply_after(applied);
                let mut ws = WriteSet::default();
                ws.put(TreeId::Redrives, &b"b"[..], b"2".to_vec());
                ws.delete(TreeId::Redrives, &b"a"[..]);
                let ticket = store.commit(ws).expect("commit");
                // Durable once logged: the apply tears afterwards, off the caller's path.
                store.wait_durable(ticket).expect("durable");
                let e = store.wait_applied().expect_err("torn");
                assert!(e.to_string().contains("injected torn apply"), "{e}");
                let b = store.tree(TreeId::Redrives).get(b"b").expect("get");
                assert!(b.is_none(), "the put never reached sled");
                generation(&store)
            };
            let store = on_disk(&path);
            assert_eq!(value(&store, b"b"), Some(b"2".to_vec()), "{applied}");
            assert_eq!(value(&store, b"a"), None, "{applied}");
            assert_ne!(generation(&store), before, "replayed, then checkpointed");
        }
    }

    /// A logged batch larger than `BACKGROUND_WRITES` reaches sled through the drain
    /// thread: its caller returns once it is durable, a read sees it at once, and a drain
    /// that fails leaves the caller's result standing, refuses later writes, stays readable
    /// whole and is completed by the next open. A dropped store first drains what waits.
    #[test]
    fn a_large_batch_is_drained_by_the_drain_thread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let large = |tag: &str| {
            let mut ws = WriteSet::default();
            for i in 0..=BACKGROUND_WRITES {
                ws.put(TreeId::Redrives, format!("{tag}{i:04}"), b"v".to_vec());
            }
            ws
        };
        {
            let store = on_disk(&path);
            let ticket = store.commit(large("a")).expect("commit");
            store.wait_durable(ticket).expect("durable");
            assert_eq!(value(&store, b"a0256"), Some(b"v".to_vec()), "read at once");
            store.wait_applied().expect("applied");
            let t = store.tree(TreeId::Redrives);
            assert_eq!(t.len(), BACKGROUND_WRITES + 1, "all in sled");
            // Dropped right after a large batch: the next open has it (applied by the
            // drain before it ends, or else replayed from the log).
            let ticket = store.commit(large("b")).expect("commit");
            store.wait_durable(ticket).expect("durable");
        }
        {
            let store = on_disk(&path);
            assert_eq!(
                store.tree(TreeId::Redrives).len(),
                2 * (BACKGROUND_WRITES + 1)
            );
            store.faults.tear_apply_after(7);
            let ticket = store.commit(large("c")).expect("commit");
            store.wait_durable(ticket).expect("durable once logged");
            let e = store.wait_applied().expect_err("torn in the drain");
            assert!(e.to_string().contains("injected torn apply"), "{e}");
            assert_eq!(value(&store, b"c0200"), Some(b"v".to_vec()), "read whole");
            let mut ws = WriteSet::default();
            ws.put(TreeId::Redrives, &b"late"[..], b"v".to_vec());
            let r = store.commit(ws).and_then(|t| store.wait_durable(t));
            assert!(matches!(r, Err(Error::Poisoned(_))), "{r:?}");
        }
        let store = on_disk(&path);
        assert_eq!(
            value(&store, b"c0200"),
            Some(b"v".to_vec()),
            "completed on open"
        );
        assert_eq!(
            store.tree(TreeId::Redrives).len(),
            3 * (BACKGROUND_WRITES + 1)
        );
    }

    /// A log opened with a checkpoint size too large to allocate (checkpoints switched off
    /// in all but name, or `u64::MAX`) is zero-filled only up to a bound, and nothing
    /// overflows.
    #[test]
    fn a_huge_checkpoint_size_allocates_a_bounded_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Wal::open(dir.path(), 1, u64::MAX).expect("open");
        assert_eq!(log.len(), wal::PREALLOCATE_MAX);
        assert!(!log.is_full());
        let small = tempfile::tempdir().expect("tempdir");
        let log = Wal::open(small.path(), 1, 64 << 10).expect("open");
        assert_eq!(log.len(), 1 << 20, "one growth step covers 64 KiB");
    }

    /// A leader that unwinds after logging its batch (its `durable` callback panics) leaves
    /// nothing behind: the batch still reaches sled, and later batches are not held up.
    #[test]
    fn a_batch_whose_leader_unwinds_is_drained_all_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = on_disk(&dir.path().join("db"));
        let mut ws = WriteSet::default();
        ws.put(TreeId::Redrives, &b"k"[..], b"v".to_vec());
        let ticket = store.commit(ws).expect("commit");
        let unwound = std::panic::catch_unwind(AssertUnwindSafe(|| {
            store.wait_durable_then(ticket, || panic!("injected panic in a callback"))
        }));
        assert!(unwound.is_err(), "the callback panicked");
        store.wait_applied().expect("applied");
        let k = store.tree(TreeId::Redrives).get(b"k").expect("get");
        assert_eq!(k.as_deref(), Some(&b"v"[..]));
        put(&store, b"next", b"v");
        store.wait_applied().expect("applied");
        assert!(store
            .tree(TreeId::Redrives)
            .get(b"next")
            .expect("get")
            .is_some());
    }

    /// Once the log is full the next round checkpoints: the generation advances and the log
    /// starts over from the start of its file. Records of the earlier generation that remain after
    /// the new end are never applied again (here one would take `y` back to an old value).
    #[test]
    fn a_checkpoint_starts_the_log_over_and_stale_records_stay_dead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let first = {
            let store = on_disk(&path);
            let first = generation(&store);
            put(&store, b"x", b"a");
            put(&store, b"y", b"old");
            let mut ws = WriteSet::default();
            ws.put(TreeId::Redrives, &b"y"[..], b"newer".to_vec());
            ws.put(
                TreeId::Redrives,
                &b"pad"[..],
                vec![7; wal::CHECKPOINT_BYTES as usize],
            );
            let ticket = store.commit(ws).expect("commit");
            store.wait_durable(ticket).expect("durable");
            assert_eq!(
                generation(&store),
                first,
                "full, and checkpointed by the next round"
            );
            // The same length as the first record: the old second record follows it.
            put(&store, b"x", b"b");
            assert_ne!(generation(&store), first, "checkpointed");
            first
        };
        let bytes = wal::read(&path).expect("read");
        let g = u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let records = codec::decode_wal(&bytes, g).expect("decode");
        assert_eq!(records.len(), 1, "the log started over");
        let stale = codec::decode_wal(&bytes[records[0].len() + codec::WAL_HEADER..], first);
        assert_eq!(
            stale.expect("stale").len(),
            2,
            "the old 2nd and 3rd records follow"
        );
        let store = on_disk(&path);
        assert_eq!(value(&store, b"x"), Some(b"b".to_vec()));
        assert_eq!(value(&store, b"y"), Some(b"newer".to_vec()));
    }

    /// A torn last record (a crash while it was written) is dropped; damage with valid
    /// records after it is refused with a typed error naming the log, and nothing is
    /// written.
    #[test]
    fn a_torn_log_tail_is_dropped_and_damage_inside_it_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let log_path = path.join(wal::FILE_NAME);
        let write = |records: &[u8]| {
            let mut bytes = records.to_vec();
            bytes.resize(4096, 0);
            std::fs::write(&log_path, bytes).expect("write")
        };
        let g = {
            let store = on_disk(&path);
            generation(&store)
        };
        let (mut first, mut second) = (Vec::new(), Vec::new());
        let one = codec::encode_journal([(TreeId::Redrives, &b"k"[..], Some(&b"1"[..]))]);
        let two = codec::encode_journal([(TreeId::Redrives, &b"k"[..], Some(&b"2"[..]))]);
        codec::encode_wal_record(g, &one.expect("one"), &mut first).expect("record");
        codec::encode_wal_record(g, &two.expect("two"), &mut second).expect("record");
        let mut both = [first.as_slice(), &second].concat();
        // Torn: the second record's last byte never made it.
        *both.last_mut().expect("bytes") ^= 0xff;
        write(&both);
        {
            let store = on_disk(&path);
            assert_eq!(value(&store, b"k"), Some(b"1".to_vec()));
        }
        // Damaged inside: the first record fails its checksum, the second is valid.
        let g = generation(&on_disk(&path));
        let (mut first, mut second) = (Vec::new(), Vec::new());
        let three = codec::encode_journal([(TreeId::Redrives, &b"k"[..], Some(&b"3"[..]))]);
        let three = three.expect("three");
        codec::encode_wal_record(g, &three, &mut first).expect("record");
        codec::encode_wal_record(g, &three, &mut second).expect("record");
        first[codec::WAL_HEADER] ^= 1;
        write(&[first.as_slice(), &second].concat());
        for _ in 0..2 {
            let e = try_on_disk(&path).err().expect("refused");
            assert!(
                matches!(
                    &e,
                    Error::Corrupted {
                        tree: "(write-ahead log)",
                        ..
                    }
                ),
                "{e:?}"
            );
            assert!(e.to_string().contains("yet a valid one at offset"), "{e}");
        }
    }

    /// Once a write failed, a round that passed its own check before the failure neither
    /// checkpoints (which would retire the failed batch's record, its only way back) nor
    /// logs or applies anything after it.
    #[test]
    fn after_a_failure_no_round_checkpoints_logs_or_applies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let store = on_disk(&path);
        let mut ws = WriteSet::default();
        let pad = vec![7; wal::CHECKPOINT_BYTES as usize];
        ws.put(TreeId::Redrives, &b"pad"[..], pad);
        let ticket = store.commit(ws).expect("commit");
        store.wait_durable(ticket).expect("durable");
        let before = generation(&store);
        let log_before = wal::read(&path).expect("read");
        store.fail("injected: an earlier batch failed".into());
        let mut batch = Overlay::default();
        batch.insert(TreeId::Redrives, b"late".to_vec(), Some(b"v".to_vec()));
        let log = store.wal.as_ref().expect("a log in Fsync mode");
        assert!(lock(log).is_full());
        for full in [true, false] {
            if !full {
                lock(log).restart(before);
            }
            let r = store.log_batch(&mut lock(log), &batch);
            assert!(matches!(r, Err(Error::Poisoned(_))), "{full}");
        }
        assert_eq!(generation(&store), before, "no checkpoint");
        assert_eq!(
            store.tree(TreeId::Redrives).get(b"late").expect("get"),
            None
        );
        drop(store);
        assert_eq!(wal::read(&path).expect("read")[..32], log_before[..32]);
    }

    /// A batch whose apply failed part-way stays visible whole: the failure is recorded
    /// first and the overlay keeps the batch, so no reader ever sees sled's half of it.
    #[test]
    fn a_torn_apply_is_never_read_half_applied() {
        for durability in [
            Durability::Flush,
            Durability::Buffered {
                every: Duration::from_secs(60),
            },
        ] {
            let store = temporary(durability);
            let t = TreeId::Redrives;
            let mut ws = WriteSet::default();
            ws.put(t, &b"a1"[..], b"v".to_vec());
            ws.put(t, &b"a2"[..], b"v".to_vec());
            store.faults.tear_apply_after(1);
            let r = store
                .commit(ws)
                .and_then(|ticket| store.wait_durable(ticket));
            assert!(r.is_err(), "{durability:?}");
            assert!(store.failure().is_some(), "{durability:?}");
            let in_sled = store.tree(t).get(b"a2").expect("get");
            assert_eq!(in_sled, None, "{durability:?}: torn in sled");
            let read = store.get(t, b"a2").expect("get").map(|v| v.to_vec());
            assert_eq!(read, Some(b"v".to_vec()), "{durability:?}: read whole");
        }
    }

    /// A leader that panics in its round poisons the engine and wakes the callers waiting
    /// for it, instead of leaving them waiting for a round that never ends.
    #[test]
    fn a_panicking_round_poisons_instead_of_hanging() {
        let store = temporary(Durability::Flush);
        let mut ws = WriteSet::default();
        ws.put(TreeId::Redrives, &b"k"[..], b"v".to_vec());
        let ticket = store.commit(ws).expect("commit");
        let waited = std::thread::scope(|s| {
            let leader = s.spawn(|| {
                store.wait_durable_gathering(ticket, || {
                    std::thread::sleep(Duration::from_millis(50));
                    panic!("injected panic in a round");
                })
            });
            std::thread::sleep(Duration::from_millis(10));
            let waiter = s.spawn(|| store.wait_durable(ticket));
            assert!(leader.join().is_err(), "the leader panicked");
            waiter.join().expect("join")
        });
        match waited {
            Err(Error::Poisoned(why)) => assert!(why.contains("panicked"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(store.wait_durable(ticket).is_err());
    }

    fn keys_in(store: &Store, t: TreeId, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        store
            .scan_prefix(t, prefix)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).expect("entry"))
            .collect()
    }

    fn pair(k: &[u8], v: &[u8]) -> (Vec<u8>, Vec<u8>) {
        (k.to_vec(), v.to_vec())
    }

    /// Logged batches wait in the overlay, merged, until more than the threshold of keys
    /// do: reads see the newest value of each key meanwhile (by key and in ranges), and a
    /// drain writes each key once, with its last value; a key put and deleted again never
    /// reaches sled.
    #[test]
    fn logged_batches_are_merged_and_drained_with_their_last_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        // No idle drain during the test.
        let store = open_idle(&dir.path().join("db"), Duration::from_secs(3600)).expect("open");
        let t = TreeId::Redrives;
        let commit = |ops: &[(&[u8], Option<&[u8]>)]| {
            let mut ws = WriteSet::default();
            for (k, v) in ops {
                match v {
                    Some(v) => ws.put(t, *k, v.to_vec()),
                    None => ws.delete(t, *k),
                }
            }
            let ticket = store.commit(ws).expect("commit");
            store.wait_durable(ticket).expect("durable");
        };
        commit(&[(b"k", Some(b"1")), (b"gone", Some(b"x"))]);
        commit(&[(b"k", Some(b"2")), (b"j", Some(b"1"))]);
        commit(&[(b"gone", None), (b"k", Some(b"3"))]);
        assert_eq!(
            store.tree(t).len(),
            0,
            "below the threshold: nothing drained"
        );
        assert_eq!(value(&store, b"k"), Some(b"3".to_vec()));
        assert_eq!(value(&store, b"gone"), None);
        let all: Vec<_> = store
            .range(t, ..)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect::<Result<_>>()
            .expect("range");
        assert_eq!(all, vec![pair(b"j", b"1"), pair(b"k", b"3")]);
        assert_eq!(lock(&store.staged).logged.len(), 3, "one entry per key");

        // Over the threshold, the drain thread writes everything waiting.
        let mut ws = WriteSet::default();
        for i in 0..BACKGROUND_WRITES {
            ws.put(t, format!("n{i:04}"), b"v".to_vec());
        }
        let ticket = store.commit(ws).expect("commit");
        store.wait_durable(ticket).expect("durable");
        let drainer = store.drainer.as_ref().expect("a drain in Fsync mode");
        {
            let st = lock(&store.staged);
            let _st = drainer
                .work
                .progress
                .wait_while(st, |st| !st.logged.is_empty() || st.draining.is_some())
                .expect("wait");
        }
        let sled = store.tree(t);
        assert_eq!(sled.len(), BACKGROUND_WRITES + 2);
        assert_eq!(sled.get(b"k").expect("get").as_deref(), Some(&b"3"[..]));
        assert_eq!(sled.get(b"gone").expect("get"), None);
        assert_eq!(value(&store, b"n0000"), Some(b"v".to_vec()));
    }

    /// Logged writes below the threshold reach sled once no batch was logged for the idle
    /// interval, so the overlay empties after a burst.
    #[test]
    fn logged_writes_below_the_threshold_are_drained_when_idle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = on_disk(&dir.path().join("db"));
        put(&store, b"a", b"1");
        put(&store, b"b", b"2");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let st = lock(&store.staged);
            if st.logged.is_empty() && st.draining.is_none() {
                break;
            }
            drop(st);
            assert!(std::time::Instant::now() < deadline, "never drained");
            std::thread::sleep(Duration::from_millis(1));
        }
        let sled = store.tree(TreeId::Redrives);
        assert_eq!(sled.get(b"a").expect("get").as_deref(), Some(&b"1"[..]));
        assert_eq!(sled.get(b"b").expect("get").as_deref(), Some(&b"2"[..]));
    }

    /// In the index trees whose keys are created once, a logged delete of a key put by a
    /// logged batch not yet drained removes both; elsewhere the delete stays (sled may hold
    /// an older value of the key).
    #[test]
    fn a_logged_delete_cancels_a_created_once_put_not_yet_drained() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open_idle(&dir.path().join("db"), Duration::from_secs(3600)).expect("open");
        let commit = |ops: &[(TreeId, Option<&[u8]>)]| {
            let mut ws = WriteSet::default();
            for (t, v) in ops {
                match v {
                    Some(v) => ws.put(*t, &b"k"[..], v.to_vec()),
                    None => ws.delete(*t, &b"k"[..]),
                }
            }
            let ticket = store.commit(ws).expect("commit");
            store.wait_durable(ticket).expect("durable");
        };
        let (index, other) = (TreeId::VisibleByKind, TreeId::Redrives);
        commit(&[(index, Some(b"1")), (other, Some(b"1"))]);
        commit(&[(index, None), (other, None)]);
        {
            let st = lock(&store.staged);
            assert_eq!(st.logged.trees[index as usize].len(), 0, "cancelled");
            assert_eq!(
                st.logged.trees[other as usize].get(&b"k"[..]),
                Some(&None),
                "the delete stays"
            );
        }
        assert_eq!(store.get(index, b"k").expect("get"), None);
        assert_eq!(store.get(other, b"k").expect("get"), None);
        store.wait_applied().expect("applied");
        assert_eq!(store.tree(index).get(b"k").expect("get"), None);
        assert_eq!(store.tree(other).get(b"k").expect("get"), None);
        // A delete of a key already drained is kept and reaches sled.
        commit(&[(index, Some(b"2"))]);
        store.wait_applied().expect("applied");
        assert!(store.tree(index).get(b"k").expect("get").is_some());
        commit(&[(index, None)]);
        assert_eq!(
            store.get(index, b"k").expect("get"),
            None,
            "hidden by the delete"
        );
        store.wait_applied().expect("applied");
        assert_eq!(store.tree(index).get(b"k").expect("get"), None);
    }

    /// Merging keeps the newer write of a key whichever side is larger (the smaller map is
    /// inserted into the larger one).
    #[test]
    fn merging_overlays_keeps_the_newer_write() {
        let t = TreeId::Redrives;
        for (older_len, newer_len) in [(1, 5), (5, 1), (3, 3), (0, 2), (2, 0)] {
            let mut older = Overlay::default();
            for i in 0..older_len {
                older.insert(t, vec![i], Some(b"old".to_vec()));
            }
            let mut newer = Overlay::default();
            for i in 0..newer_len {
                newer.insert(
                    t,
                    vec![i],
                    if i % 2 == 0 {
                        Some(b"new".to_vec())
                    } else {
                        None
                    },
                );
            }
            older.merge(newer);
            let map = &older.trees[t as usize];
            assert_eq!(map.len(), older_len.max(newer_len) as usize);
            for i in 0..older_len.max(newer_len) {
                let expected = if i >= newer_len {
                    Some(b"old".to_vec())
                } else if i % 2 == 0 {
                    Some(b"new".to_vec())
                } else {
                    None
                };
                assert_eq!(
                    map.get(&vec![i]),
                    Some(&expected),
                    "{older_len} {newer_len} {i}"
                );
            }
        }
    }

    /// In a durable mode a committed write set is staged: every read sees it at once, sled
    /// only once a flush leader applied it, and staged deletes hide sled's keys.
    #[test]
    fn staged_writes_are_read_before_they_reach_sled() {
        let store = temporary(Durability::Flush);
        let t = TreeId::Redrives;
        let mut ws = WriteSet::default();
        for k in [&b"a1"[..], b"a3", b"a5", b"b1"] {
            ws.put(t, k, b"old".to_vec());
        }
        let first = store.commit(ws).expect("commit");
        store.wait_durable(first).expect("durable");
        assert_eq!(store.tree(t).len(), 4, "applied by the flush leader");

        let mut ws = WriteSet::default();
        ws.put(t, &b"a2"[..], b"new".to_vec());
        ws.delete(t, &b"a3"[..]);
        ws.put(t, &b"a5"[..], b"new".to_vec());
        ws.put(t, &b"a9"[..], b"x".to_vec());
        ws.delete(t, &b"a9"[..]);
        let second = store.commit(ws).expect("commit");
        assert_eq!(second, first + 1);
        assert!(!store.is_durable(second));
        assert_eq!(
            store.tree(t).get(b"a2").expect("get"),
            None,
            "not in sled yet"
        );
        assert_eq!(
            store.get(t, b"a2").expect("get").as_deref(),
            Some(&b"new"[..])
        );
        assert_eq!(
            store.get(t, b"a3").expect("get"),
            None,
            "deleted while staged"
        );
        assert_eq!(
            store.get(t, b"a9").expect("get"),
            None,
            "the last write wins"
        );
        let expected = vec![
            pair(b"a1", b"old"),
            pair(b"a2", b"new"),
            pair(b"a5", b"new"),
        ];
        assert_eq!(keys_in(&store, t, b"a"), expected);
        let from_a2: Vec<_> = store
            .range(t, b"a2".to_vec()..)
            .map(|r| r.expect("entry").0.to_vec())
            .collect();
        assert_eq!(
            from_a2,
            vec![b"a2".to_vec(), b"a5".to_vec(), b"b1".to_vec()]
        );

        store.wait_durable(second).expect("durable");
        assert_eq!(
            store.commit_stats().storage_commits,
            3,
            "layout, then one per round"
        );
        assert_eq!(keys_in(&store, t, b"a"), expected);
        assert_eq!(store.tree(t).get(b"a3").expect("get"), None, "applied");
        let journal = store.tree(TreeId::Meta).get(keys::META_JOURNAL);
        assert_eq!(
            journal.expect("get"),
            None,
            "removed once the batch is applied"
        );
    }

    /// A batch whose journal would be too large is applied as one sled transaction.
    #[test]
    fn a_batch_too_large_for_a_journal_is_applied_whole() {
        let store = temporary(Durability::Flush);
        let t = TreeId::Redrives;
        let mut ws = WriteSet::default();
        ws.put(t, &b"big"[..], vec![7u8; JOURNAL_MAX]);
        ws.put(t, &b"small"[..], b"v".to_vec());
        // Would fail a journaled apply right after its journal.
        store.faults.tear_apply_after(0);
        let ticket = store.commit(ws).expect("commit");
        store.wait_durable(ticket).expect("durable");
        let big = store.tree(t).get(b"big").expect("get");
        assert_eq!(big.map(|v| v.len()), Some(JOURNAL_MAX));
        assert!(store.tree(t).get(b"small").expect("get").is_some());
        let journal = store.tree(TreeId::Meta).get(keys::META_JOURNAL);
        assert_eq!(journal.expect("get"), None);
    }

    /// In `Buffered` mode nothing stays staged: sled has every committed write at once.
    #[test]
    fn buffered_commits_reach_sled_at_once() {
        let store = temporary(Durability::Buffered {
            every: Duration::from_secs(60),
        });
        let mut ws = WriteSet::default();
        ws.put(TreeId::Redrives, &b"k1"[..], b"v".to_vec());
        ws.put(TreeId::Redrives, &b"k2"[..], b"v".to_vec());
        store.commit(ws).expect("commit");
        assert_eq!(store.tree(TreeId::Redrives).len(), 2);
    }

    /// After a failed batch nothing more reaches sled, in `Buffered` mode too (where no
    /// flush leader would stop it): the torn batch's journal stays for the replay.
    #[test]
    fn nothing_is_applied_after_a_failed_batch() {
        let store = temporary(Durability::Buffered {
            every: Duration::from_secs(60),
        });
        let t = TreeId::Redrives;
        let batch = |k: &[u8]| {
            let mut ws = WriteSet::default();
            ws.put(t, [k, b"1"].concat(), b"v".to_vec());
            ws.put(t, [k, b"2"].concat(), b"v".to_vec());
            ws
        };
        store.faults.tear_apply_after(1);
        let e = store.commit(batch(b"a")).expect_err("torn");
        assert!(e.to_string().contains("injected torn apply"), "{e}");
        assert!(store.failure().is_some());
        let journal = store.tree(TreeId::Meta).get(keys::META_JOURNAL);
        let journal = journal.expect("get").expect("left for the replay");
        for ws in [batch(b"b"), {
            let mut one = WriteSet::default();
            one.put(t, &b"c"[..], b"v".to_vec());
            one
        }] {
            let e = store.commit(ws).expect_err("poisoned");
            assert!(matches!(e, Error::Poisoned(_)), "{e:?}");
        }
        let keys: Vec<_> = store
            .tree(t)
            .iter()
            .keys()
            .map(|k| k.expect("key"))
            .collect();
        assert_eq!(keys, vec![sled::IVec::from(&b"a1"[..])]);
        let again = store.tree(TreeId::Meta).get(keys::META_JOURNAL);
        assert_eq!(
            again.expect("get"),
            Some(journal),
            "the journal is untouched"
        );
    }

    #[test]
    fn empty_bounds_give_nothing() {
        let store = temporary(Durability::Flush);
        let mut ws = WriteSet::default();
        ws.put(TreeId::Redrives, &b"k"[..], b"v".to_vec());
        let _staged = store.commit(ws).expect("commit");
        let k = || b"k".to_vec();
        let ranges: [KeyBounds; 3] = [
            (Bound::Excluded(k()), Bound::Excluded(k())),
            (Bound::Included(k()), Bound::Excluded(k())),
            (Bound::Included(b"z".to_vec()), Bound::Included(k())),
        ];
        for r in ranges {
            assert_eq!(store.range(TreeId::Redrives, r.clone()).count(), 0, "{r:?}");
        }
        let r = store.range(
            TreeId::Redrives,
            (Bound::Included(k()), Bound::Included(k())),
        );
        assert_eq!(r.count(), 1);
    }

    #[test]
    fn prefix_bounds_end_after_the_last_key_with_the_prefix() {
        let b = |x: &[u8]| Bound::Excluded(x.to_vec());
        assert_eq!(prefix_bounds(b"ab").1, b(b"ac"));
        assert_eq!(prefix_bounds(&[1, 0xff]).1, b(&[2]));
        assert_eq!(prefix_bounds(&[0xff, 0xff]).1, Bound::Unbounded);
        assert_eq!(prefix_bounds(b"").1, Bound::Unbounded);
    }

    /// A visible record of `id` in `pool`, enqueued at `seq`.
    fn visible(pool: Uuid, id: Uuid, seq: u64) -> Record {
        Record::new_visible(
            pool,
            id,
            "k".into(),
            crate::model::CleanupKind::PendingClaimTeardown,
            None,
            "{}".into(),
            "{}".into(),
            crate::clock::Timestamp::from_micros(0),
            seq,
        )
    }

    /// A `message_ids` entry that points at no record, or at another message's record, is
    /// corruption naming `message_ids` (after the entry is read again and found unchanged);
    /// one that does not decode names it too; no entry is no message.
    #[test]
    fn message_ids_pointing_nowhere_or_elsewhere_are_corruption() {
        let store = temporary(Durability::Buffered {
            every: Duration::from_secs(1),
        });
        let pool = Uuid::from_u128(1);
        let other = visible(pool, Uuid::from_u128(3), 8);
        let mut ws = WriteSet::default();
        ws.record(None, Some(&other)).unwrap();
        ws.put(
            TreeId::MessageIds,
            keys::message_id(pool, Uuid::from_u128(4)),
            7u64.to_be_bytes(),
        );
        ws.put(
            TreeId::MessageIds,
            keys::message_id(pool, Uuid::from_u128(5)),
            8u64.to_be_bytes(),
        );
        ws.put(
            TreeId::MessageIds,
            keys::message_id(pool, Uuid::from_u128(6)),
            vec![1, 2],
        );
        store.wait_durable(store.commit(ws).unwrap()).unwrap();
        assert_eq!(
            store.get_record(pool, Uuid::from_u128(3)).unwrap(),
            Some(other)
        );
        assert_eq!(store.get_record(pool, Uuid::from_u128(9)).unwrap(), None);
        for id in [4, 5, 6] {
            match store.get_record(pool, Uuid::from_u128(id)) {
                Err(Error::Corrupted { tree, .. }) => assert_eq!(tree, "message_ids"),
                other => panic!("id {id}: {other:?}"),
            }
        }
    }

    /// Bytes in the `messages` tree that do not decode (or decode to another key's record)
    /// surface as `Error::Corrupted` naming the tree and the key. (Through the file they
    /// cannot be produced: sled's checksums drop a damaged log entry first; see
    /// tests/corruption.rs.)
    #[test]
    fn undecodable_records_are_corrupted_errors_naming_tree_and_key() {
        let key = keys::message(Uuid::from_u128(1), 2);
        for bytes in [
            &b""[..],
            &[codec::FORMAT_V2, 0xff, 0x00][..],
            &[codec::FORMAT_V2, 0, 0, 0, 0, 0, 0, 0, 2, 0xff][..],
            &[codec::FORMAT_V1, 0xff, 0x00][..],
            &[9, 1, 2, 3][..],
        ] {
            match decode_record_at(&key, bytes) {
                Err(Error::Corrupted {
                    tree,
                    key: k,
                    detail,
                }) => {
                    assert_eq!(tree, "messages");
                    assert_eq!(k, crate::error::hex(&key));
                    assert!(!detail.is_empty());
                }
                other => panic!("{bytes:?} decoded as {other:?}"),
            }
        }
        let rec = visible(Uuid::from_u128(1), Uuid::from_u128(3), 3);
        let bytes = codec::encode_record(&rec).expect("encode");
        let e = decode_record_at(&key, &bytes).expect_err("stored under another key");
        assert!(e.to_string().contains("do not match its key"), "{e}");
        assert!(e.to_string().contains("`messages`"), "{e}");
    }
}
