//! The public handle, [`Queue`]. Every mutating operation follows one path:
//!
//! 1. validate input (nothing touched on error);
//! 2. take the writer lock, read the clock once, read records;
//! 3. compute new records with `machine`;
//! 4. commit them (with their index changes, the `seq` counter and any wakeup bump) as one
//!    write set, which the store stages and applies atomically (`store.rs`);
//! 5. release the lock, wait until the transaction is durable (group commit), then publish
//!    the wakeups.
//!
//! Reads take no lock; they wait for the durability of whatever they observed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::iter::Peekable;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::codec;
use crate::compact::Compacted;
use crate::error::{Error, InputError, Result};
use crate::keys::{self, TreeId};
use crate::machine::{self, Record, State};
use crate::metrics::{Counter, Metrics};
use crate::model::{
    CleanupKind, DeadLetter, LeaseExpiryResult, Message, NewMessage, Operation, OperationResult,
    Reservation, ReserveFilter, Wakeup,
};
use crate::policy::Policy;
use crate::store::{CommitStats, Durability, Location, Store, StoreConfig, WriteSet};
use crate::sweeper::Sweeper;
use crate::wakeup::Wakeups;

/// Idempotency keys longer than this are refused.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 1024;
/// How many `seq` values one write of `meta/seq` reserves.
const SEQ_BLOCK: u64 = 4096;
/// How often in-memory counters ride along with a transaction.
const METRICS_EVERY: Duration = Duration::from_secs(1);
/// How many due leases `reserve` expires in its pool before looking for work.
const RESERVE_EXPIRY_LIMIT: usize = 100;
/// The longest a flush leader waits for writers in progress to join its flush.
const GATHER_MAX: Duration = Duration::from_micros(500);

/// Opens a [`Queue`]. Every setting has a production default.
#[derive(Clone, Debug)]
pub struct QueueBuilder {
    location: Option<PathBuf>,
    policy: Policy,
    sweep_interval: Option<Duration>,
    sweep_batch: usize,
    payload_limit: usize,
    clock: Arc<dyn Clock>,
    durability: Durability,
    cache_capacity: u64,
    wal_checkpoint_bytes: u64,
    background_apply_writes: usize,
}

impl QueueBuilder {
    /// A database in the directory `path` (created if missing).
    pub fn new(path: impl AsRef<Path>) -> QueueBuilder {
        QueueBuilder {
            location: Some(path.as_ref().to_path_buf()),
            ..QueueBuilder::temporary()
        }
    }

    /// A database in a temporary directory, removed when the queue is dropped.
    pub fn temporary() -> QueueBuilder {
        QueueBuilder {
            location: None,
            policy: Policy::default(),
            sweep_interval: Some(Duration::from_secs(1)),
            sweep_batch: 100,
            payload_limit: 64 * 1024,
            clock: Arc::new(SystemClock),
            durability: Durability::Fsync,
            cache_capacity: 64 << 20,
            wal_checkpoint_bytes: crate::wal::CHECKPOINT_BYTES,
            background_apply_writes: crate::store::BACKGROUND_WRITES,
        }
    }

    /// Lease duration (default 30 s).
    pub fn lease(mut self, lease: Duration) -> QueueBuilder {
        self.policy.lease = lease;
        self
    }

    /// Max delivery attempts (default 3).
    pub fn max_delivery_attempts(mut self, n: u32) -> QueueBuilder {
        self.policy.max_delivery_attempts = n;
        self
    }

    /// How long acked messages keep their idempotency key (default `None`: forever).
    pub fn completed_retention(mut self, retention: Option<Duration>) -> QueueBuilder {
        self.policy.completed_retention = retention;
        self
    }

    /// All three policy values at once.
    pub fn policy(mut self, policy: Policy) -> QueueBuilder {
        self.policy = policy;
        self
    }

    /// How often the sweeper runs (default 1 s); `None` switches it off.
    pub fn sweep_interval(mut self, every: Option<Duration>) -> QueueBuilder {
        self.sweep_interval = every;
        self
    }

    /// Leases expired (and tombstones pruned) per sweeper batch (default 100).
    pub fn sweep_batch(mut self, n: usize) -> QueueBuilder {
        self.sweep_batch = n;
        self
    }

    /// Largest `target` + `data` JSON, in bytes (default 64 KiB).
    pub fn payload_limit(mut self, bytes: usize) -> QueueBuilder {
        self.payload_limit = bytes;
        self
    }

    /// The clock (default: the system clock).
    pub fn clock(mut self, clock: impl Clock + 'static) -> QueueBuilder {
        self.clock = Arc::new(clock);
        self
    }

    /// The clock, shared.
    pub fn shared_clock(mut self, clock: Arc<dyn Clock>) -> QueueBuilder {
        self.clock = clock;
        self
    }

    /// What a returned mutating call promises (default [`Durability::Fsync`]).
    pub fn durability(mut self, durability: Durability) -> QueueBuilder {
        self.durability = durability;
        self
    }

    /// The storage library's page cache, in bytes (default 64 MiB).
    pub fn cache_capacity(mut self, bytes: u64) -> QueueBuilder {
        self.cache_capacity = bytes;
        self
    }

    /// How much the write-ahead log of [`Durability::Fsync`] holds before a checkpoint
    /// makes sled durable and starts it over (default 8 MiB, at least 4 KiB): larger means
    /// fewer sled flushes, smaller a shorter log to apply on open.
    pub fn wal_checkpoint_bytes(mut self, bytes: u64) -> QueueBuilder {
        self.wal_checkpoint_bytes = bytes;
        self
    }

    /// In [`Durability::Fsync`] mode on disk, durable (logged) writes wait in memory until
    /// more than this many distinct keys are written, then a background thread writes them
    /// into the storage trees as one merged batch (default 256); calls return once their
    /// writes are logged. 0 writes every logged batch at once. Mostly for tests.
    pub fn background_apply_writes(mut self, writes: usize) -> QueueBuilder {
        self.background_apply_writes = writes;
        self
    }

    /// Compacts the existing database at this builder's path, offline: rewrites its state
    /// into a fresh database in the sibling directory `<name>.compacting` (an export piped
    /// into an import, which reproduces the state exactly), swaps the two directories
    /// atomically (`renameat2(RENAME_EXCHANGE)` on Linux; macOS's equivalent) and removes
    /// the old one. sled never returns the space and memory of deleted data, so a database
    /// migrated in place or churned through many messages shrinks on disk and in memory. The database must not
    /// be open elsewhere (`Error::InUse`); it stays locked until the swap, and a crash
    /// leaves either the old or the compacted database in place (see `src/compact.rs`).
    pub fn compact(self) -> Result<Compacted> {
        let Some(path) = self.location.clone() else {
            return Err(Error::Config(
                "a temporary database cannot be compacted".into(),
            ));
        };
        crate::compact::run(&path, |p| QueueBuilder {
            location: Some(p.to_path_buf()),
            ..self.clone()
        })
    }

    /// Validates the settings and opens the database.
    pub fn open(self) -> Result<Queue> {
        self.policy.validate()?;
        if self.sweep_batch == 0 {
            return Err(Error::Config("sweep batch must be at least 1".into()));
        }
        if self.sweep_interval == Some(Duration::ZERO) {
            return Err(Error::Config(
                "sweep interval must be positive (use None to switch the sweeper off)".into(),
            ));
        }
        if self.payload_limit < 4 {
            return Err(Error::Config(
                "payload limit must hold at least `{}` twice (4 bytes)".into(),
            ));
        }
        if self.wal_checkpoint_bytes < 4096 {
            return Err(Error::Config(
                "the write-ahead log's checkpoint size must be at least 4 KiB".into(),
            ));
        }
        if let Durability::Buffered { every } = self.durability {
            if every.is_zero() {
                return Err(Error::Config(
                    "buffered flush interval must be positive".into(),
                ));
            }
        }
        let store = Store::open(StoreConfig {
            location: match self.location {
                Some(p) => Location::Path(p),
                None => Location::Temporary,
            },
            cache_capacity: self.cache_capacity,
            durability: self.durability,
            wal_checkpoint_bytes: self.wal_checkpoint_bytes,
            background_apply_writes: self.background_apply_writes,
            idle_drain: crate::store::IDLE_DRAIN,
        })?;
        let next_seq = store.get_u64(TreeId::Meta, keys::META_SEQ)?;
        let metrics = load_metrics(&store)?;
        let inner = Arc::new(Inner {
            store,
            writer: Mutex::new(Writer {
                next_seq,
                seq_limit: next_seq,
                wake: HashMap::new(),
                metrics,
                dirty: BTreeSet::new(),
                metrics_written: Instant::now(),
            }),
            writers: AtomicUsize::new(0),
            policy: RwLock::new(self.policy),
            clock: self.clock,
            wakeups: Wakeups::default(),
            poison: Mutex::new(None),
            payload_limit: self.payload_limit,
        });
        let sweeper = match self.sweep_interval {
            Some(every) => Some(Sweeper::spawn(inner.clone(), every, self.sweep_batch)?),
            None => None,
        };
        Ok(Queue {
            handle: Arc::new(Handle {
                inner,
                _sweeper: sweeper,
            }),
        })
    }
}

/// The durable worker cleanup queue. `Send + Sync`; clones share one engine, and the
/// sweeper stops when the last clone is dropped.
#[derive(Clone)]
pub struct Queue {
    handle: Arc<Handle>,
}

struct Handle {
    inner: Arc<Inner>,
    // Dropped (stopped and joined) with the last handle.
    _sweeper: Option<Sweeper>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("path", &self.handle.inner.store.path())
            .finish_non_exhaustive()
    }
}

/// What `enqueue` did.
#[derive(Clone, Debug, PartialEq)]
pub struct Enqueued {
    /// The stored message (for a duplicate: exactly as stored).
    pub message: Message,
    /// Whether an existing message was returned instead of storing a new one.
    pub duplicate: bool,
}

/// What `reserve` did, in full.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reserved {
    /// The reservation, if anything qualified.
    pub reservation: Option<Reservation>,
    /// What the pool's lease expiry before the scan did.
    pub expired: LeaseExpiryResult,
    /// Candidates moved to the DLQ during the scan because their attempts were used up.
    pub dead_lettered: Vec<DeadLetter>,
}

impl Queue {
    /// A builder for a database at `path`.
    pub fn builder(path: impl AsRef<Path>) -> QueueBuilder {
        QueueBuilder::new(path)
    }

    /// Opens (or creates) a database at `path` with the defaults.
    pub fn open(path: impl AsRef<Path>) -> Result<Queue> {
        QueueBuilder::new(path).open()
    }

    /// A builder for a temporary database (tests, examples).
    pub fn temporary() -> QueueBuilder {
        QueueBuilder::temporary()
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.handle.inner
    }

    /// Stores a new message, or returns the existing one for a duplicate (same `message_id`
    /// or same `idempotency_key` in the pool). Wakes the pool when the message is visible.
    pub fn enqueue(&self, message: NewMessage) -> Result<Message> {
        self.inner().enqueue(message).map(|e| e.message)
    }

    /// [`enqueue`](Queue::enqueue), also telling whether it was a duplicate.
    pub fn enqueue_detailed(&self, message: NewMessage) -> Result<Enqueued> {
        self.inner().enqueue(message)
    }

    /// Reserves the first qualifying visible message of the pool, after expiring the pool's
    /// due leases. `None` when nothing qualifies.
    pub fn reserve(
        &self,
        work_pool_id: Uuid,
        filter: &ReserveFilter,
    ) -> Result<Option<Reservation>> {
        self.inner()
            .reserve(work_pool_id, filter)
            .map(|r| r.reservation)
    }

    /// Whether [`reserve`](Queue::reserve) with these arguments, made now, would return
    /// nothing and change nothing: no lease of the pool is due and no visible message
    /// matches the filter. Read-only: takes no lock and never waits; it answers `false`
    /// whenever it cannot tell without waiting (something it read is not durable yet). A
    /// caller can answer the dispatcher's most frequent call, an empty reserve, without
    /// leaving its thread (the Prefect plug-in does).
    pub fn reserve_finds_nothing(
        &self,
        work_pool_id: Uuid,
        filter: &ReserveFilter,
    ) -> Result<bool> {
        self.inner().reserve_finds_nothing(work_pool_id, filter)
    }

    /// [`reserve`](Queue::reserve), also returning what its expiry and scan dead-lettered.
    pub fn reserve_detailed(&self, work_pool_id: Uuid, filter: &ReserveFilter) -> Result<Reserved> {
        self.inner().reserve(work_pool_id, filter)
    }

    /// Completes a reservation.
    pub fn ack(
        &self,
        work_pool_id: Uuid,
        message_id: Uuid,
        token: &str,
    ) -> Result<OperationResult> {
        self.inner()
            .lease_op(Operation::Ack, work_pool_id, message_id, token, None)
    }

    /// Gives a reservation back (or dead-letters it when attempts are used up).
    pub fn release(
        &self,
        work_pool_id: Uuid,
        message_id: Uuid,
        token: &str,
        reason: &str,
    ) -> Result<OperationResult> {
        self.inner().lease_op(
            Operation::Release,
            work_pool_id,
            message_id,
            token,
            Some(reason),
        )
    }

    /// Extends a reservation's lease to now + lease duration.
    pub fn renew(
        &self,
        work_pool_id: Uuid,
        message_id: Uuid,
        token: &str,
    ) -> Result<OperationResult> {
        self.inner()
            .lease_op(Operation::Renew, work_pool_id, message_id, token, None)
    }

    /// Expires up to `limit` due leases, most overdue first, of one pool or all.
    pub fn expire_leases(
        &self,
        limit: usize,
        work_pool_id: Option<Uuid>,
    ) -> Result<LeaseExpiryResult> {
        self.inner().expire_leases(limit, work_pool_id)
    }

    /// Runs `op`, in which this thread's mutating calls on this queue return without waiting
    /// for durability: their results are computed and their writes committed (every later
    /// operation sees them), but the wait for the flush that makes them durable, and the
    /// wakeups they publish after it, are left in the returned [`Pending`]. The caller must
    /// not act on the results until [`Queue::complete`] returned `Ok` for it, whether `op`
    /// succeeded or not (a failed `reserve` may already have committed its lease expiry).
    ///
    /// This lets a caller on an event loop run operations inline and wait for many of them
    /// with one blocking call elsewhere (the Prefect plug-in does). Reads inside `op` still
    /// wait for durability themselves. Calls on other threads, or on other queues, are not
    /// affected.
    pub fn deferred<T>(&self, op: impl FnOnce() -> T) -> (T, Pending) {
        let owner = self.inner() as *const Inner as usize;
        let previous = DEFERRED.with(|d| d.borrow_mut().replace((owner, Pending::default())));
        let scope = DeferScope(previous);
        let out = op();
        let pending = DEFERRED.with(|d| d.borrow_mut().take()).map(|(_, p)| p);
        drop(scope);
        (out, pending.unwrap_or_default())
    }

    /// Whether `pending`'s writes are already as durable as the mode promises (never waits;
    /// [`complete`](Queue::complete) then returns at once).
    pub fn is_durable(&self, pending: &Pending) -> bool {
        self.inner().store.is_durable(pending.ticket)
    }

    /// Waits until `pending`'s writes are durable (sharing flushes with every concurrent
    /// caller), then publishes its wakeups.
    pub fn complete(&self, pending: Pending) -> Result<()> {
        self.inner().finish_now(pending)
    }

    /// Waits until `pending`'s writes are durable without completing it (a caller waiting
    /// once for many pending records completes each afterwards, at once).
    pub fn wait_durable(&self, pending: &Pending) -> Result<()> {
        let inner = self.inner();
        inner
            .store
            .wait_durable_gathering(pending.ticket, || inner.gather())
    }

    /// [`wait_durable`](Queue::wait_durable) without group commit's gathering: should this
    /// caller lead the flush round, it takes what is staged at once. `durable` runs as soon
    /// as `pending`'s writes are durable (never if they failed to become durable; a failure
    /// of a later round does not take it back): should this caller lead
    /// the round, before it waits for the drain into the storage trees (only when that is
    /// far behind), which durability does not need. For a thread that flushes on behalf of
    /// callers it counts itself (the Prefect plug-in's notifier gathers the calls of its
    /// event loop without spinning, and tells the loop before any such wait).
    pub fn wait_durable_now(&self, pending: &Pending, durable: impl FnOnce()) -> Result<()> {
        self.inner()
            .store
            .wait_durable_then(pending.ticket, durable)
    }

    /// The active (visible or reserved) message, only from its own pool.
    pub fn read_message(&self, work_pool_id: Uuid, message_id: Uuid) -> Result<Option<Message>> {
        self.inner().read(work_pool_id, message_id, |r| {
            if r.is_active() {
                r.message().map(Some)
            } else {
                Ok(None)
            }
        })
    }

    /// The dead letter, only from its own pool.
    pub fn read_dead_letter(
        &self,
        work_pool_id: Uuid,
        message_id: Uuid,
    ) -> Result<Option<DeadLetter>> {
        self.inner()
            .read(work_pool_id, message_id, Record::dead_letter)
    }

    /// The reservation currently held on a message, if any (an inspection helper).
    pub fn read_reservation(
        &self,
        work_pool_id: Uuid,
        message_id: Uuid,
    ) -> Result<Option<Reservation>> {
        self.inner()
            .read(work_pool_id, message_id, Record::reservation)
    }

    /// Bumps the pool's wakeup sequence and wakes its waiters.
    pub fn wake_dispatchers(&self, work_pool_id: Uuid) -> Result<Wakeup> {
        self.inner().wake_dispatchers(work_pool_id)
    }

    /// The pool's latest wakeup sequence (0 before the first wake).
    pub fn read_wakeup_sequence(&self, work_pool_id: Uuid) -> Result<u64> {
        let inner = self.inner();
        inner.check()?;
        // The stored value may be ahead of the published one for the moment between a
        // writer's flush and its publish; once durable it may be published by anyone, so
        // a reader never sees a sequence older than the state it can read.
        let stored = inner.durable_wakeup(work_pool_id)?;
        inner.wakeups.publish(work_pool_id, stored, || Ok(stored))?;
        inner
            .wakeups
            .current(work_pool_id, || inner.stored_wakeup(work_pool_id))
    }

    /// Waits until the pool's sequence exceeds `after` and returns the current one; `None`
    /// when `timeout` elapses first. Zero timeout: check only. No timeout: wait for ever.
    pub fn wait_for_wakeup(
        &self,
        work_pool_id: Uuid,
        after: u64,
        timeout: Option<Duration>,
    ) -> Result<Option<Wakeup>> {
        let inner = self.inner();
        inner.check()?;
        let seq = inner.wakeups.wait(work_pool_id, after, timeout, || {
            inner.durable_wakeup(work_pool_id)
        })?;
        Ok(seq.map(|sequence| Wakeup {
            work_pool_id,
            sequence,
        }))
    }

    /// Removes up to `limit` acked tombstones whose retention has run out under the current
    /// policy; returns how many. (The sweeper does this on its own.)
    pub fn prune_tombstones(&self, limit: usize) -> Result<usize> {
        self.inner().prune_tombstones(limit)
    }

    /// Removes up to `limit` acked tombstones completed at least `retention` ago.
    pub fn prune_tombstones_older_than(&self, retention: Duration, limit: usize) -> Result<usize> {
        self.inner().prune(retention, limit)
    }

    /// The current policy.
    pub fn policy(&self) -> Policy {
        self.inner().policy()
    }

    /// Replaces the policy; takes effect at the next operation.
    pub fn set_policy(&self, policy: Policy) -> Result<()> {
        policy.validate()?;
        *self
            .inner()
            .policy
            .write()
            .unwrap_or_else(|p| p.into_inner()) = policy;
        Ok(())
    }

    /// The engine's current time (one clock reading).
    pub fn now(&self) -> Timestamp {
        self.inner().clock.now()
    }

    /// The database directory (`None` for a temporary database).
    pub fn path(&self) -> Option<&Path> {
        self.inner().store.path()
    }

    /// Every counter since the database was created (Prefect's metric names and labels).
    pub fn metrics(&self) -> Metrics {
        Metrics {
            counters: self.inner().lock_writer().metrics.clone(),
        }
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        self.inner().store.size_on_disk()
    }

    /// Transactions committed and durability flushes done since this engine was opened:
    /// how well group commit shares flushes (`transactions / flushes` operations per flush).
    pub fn commit_stats(&self) -> CommitStats {
        self.inner().store.commit_stats()
    }

    /// Returns once every write of a returned call is also in the storage trees, not only
    /// in the write-ahead log (`Fsync` mode on disk applies logged batches on a background
    /// thread; other modes return at once). Nothing needs this for correctness: reads see
    /// logged writes either way. It lets a test observe a failed apply, and a benchmark
    /// start from a settled store. Returns [`Error::Poisoned`] if an apply failed.
    pub fn wait_applied(&self) -> Result<()> {
        self.inner().store.wait_applied()
    }

    /// Checks every record and index against each other and the invariants. Returns the
    /// violations found (empty when healthy); reads the database once.
    pub fn check_integrity(&self) -> Result<Vec<String>> {
        crate::integrity::check(&self.inner().store)
    }

    /// Test hook: makes the `n`th storage transaction from now fail.
    #[doc(hidden)]
    pub fn inject_write_failure(&self, n: u64) {
        self.inner().store.faults.fail_write_in(n);
    }

    /// Test hook: the next batch written to disk stops after its journal and `writes` of
    /// its writes and fails, as a crash at that point would leave it.
    #[doc(hidden)]
    pub fn inject_torn_apply(&self, writes: u64) {
        self.inner().store.faults.tear_apply_after(writes);
    }

    /// Test hook: makes the `n`th durability flush from now fail.
    #[doc(hidden)]
    pub fn inject_flush_failure(&self, n: u64) {
        self.inner().store.faults.fail_flush_in(n);
    }

    /// Test hook: makes the next durability flush panic (the round's callers must learn
    /// that the engine is poisoned, never wait for ever).
    #[doc(hidden)]
    pub fn inject_flush_panic(&self) {
        self.inner().store.faults.panic_next_flush();
    }
}

/// State only the writer-lock holder touches.
pub(crate) struct Writer {
    /// The next `seq` to hand out (persisted in `meta/seq` by every transaction that uses it).
    pub(crate) next_seq: u64,
    /// The `seq` high-water mark on disk: every `seq` handed out is below it. Raised in blocks
    /// of `SEQ_BLOCK`, so most transactions do not write `meta/seq`.
    pub(crate) seq_limit: u64,
    /// Applied wakeup sequences (may be ahead of the published ones until durable).
    pub(crate) wake: HashMap<Uuid, u64>,
    /// Every counter's value; `dirty` ones are ahead of the `metrics` tree.
    pub(crate) metrics: BTreeMap<Counter, u64>,
    pub(crate) dirty: BTreeSet<Counter>,
    /// When dirty counters were last written.
    pub(crate) metrics_written: Instant,
}

/// The writer lock, counted (see `Inner::gather`). Fields drop in order: the lock is
/// released before the count goes down.
pub(crate) struct WriterGuard<'a> {
    guard: MutexGuard<'a, Writer>,
    _counted: Counted<'a>,
}

/// One thread holding or queued for the writer lock.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(writers: &'a AtomicUsize) -> Counted<'a> {
        writers.fetch_add(1, Ordering::SeqCst);
        Counted(writers)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::ops::Deref for WriterGuard<'_> {
    type Target = Writer;
    fn deref(&self) -> &Writer {
        &self.guard
    }
}

impl std::ops::DerefMut for WriterGuard<'_> {
    fn deref_mut(&mut self) -> &mut Writer {
        &mut self.guard
    }
}

thread_local! {
    /// The engine (by address) whose operations on this thread defer their durability wait
    /// into the pending record ([`Queue::deferred`]).
    static DEFERRED: std::cell::RefCell<Option<(usize, Pending)>> =
        const { std::cell::RefCell::new(None) };
}

/// What committed operations have left to do: wait until their writes are durable (the
/// ticket), then publish their wakeups. Every mutating step finishes its own at once;
/// [`Queue::deferred`] hands the merged record of its operations to the caller, who passes
/// it to [`Queue::complete`].
#[must_use = "a pending completion must be passed to Queue::complete"]
#[derive(Debug, Default)]
pub struct Pending {
    pub(crate) ticket: u64,
    wakes: Vec<(Uuid, u64)>,
}

impl Pending {
    /// A record that waits for the same writes to be durable and publishes nothing: for a
    /// thread that waits ([`Queue::wait_durable`], [`Queue::is_durable`]) while another
    /// may complete this one, so that neither ever waits for the other.
    pub fn durability_only(&self) -> Pending {
        Pending {
            ticket: self.ticket,
            wakes: Vec::new(),
        }
    }
}

/// Restores the previous deferral of this thread, even when unwinding.
struct DeferScope(Option<(usize, Pending)>);

impl Drop for DeferScope {
    fn drop(&mut self) {
        let previous = self.0.take();
        DEFERRED.with(|d| *d.borrow_mut() = previous);
    }
}

/// The engine shared by all handles and the sweeper.
pub(crate) struct Inner {
    pub(crate) store: Store,
    writer: Mutex<Writer>,
    /// Threads holding or queued for the writer lock.
    writers: AtomicUsize,
    policy: RwLock<Policy>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) wakeups: Wakeups,
    poison: Mutex<Option<String>>,
    payload_limit: usize,
}

/// One atomic step in the making: the writes, the `seq` counter and the wakeup bumps.
pub(crate) struct Txn<'a> {
    store: &'a Store,
    writer: &'a mut Writer,
    ws: WriteSet,
    next_seq: u64,
    wakes: Vec<(Uuid, u64)>,
    counts: Vec<Counter>,
}

impl<'a> Txn<'a> {
    pub(crate) fn new(store: &'a Store, writer: &'a mut Writer) -> Txn<'a> {
        let next_seq = writer.next_seq;
        Txn {
            store,
            writer,
            ws: WriteSet::default(),
            next_seq,
            wakes: Vec::new(),
            counts: Vec::new(),
        }
    }

    /// Writes one raw key (import, audit records).
    pub(crate) fn put_raw(
        &mut self,
        tree: TreeId,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) {
        self.ws.put(tree, key, value);
    }

    /// Counts one event in this step.
    pub(crate) fn count(&mut self, c: Counter) {
        self.counts.push(c);
    }

    /// Counts a move to the DLQ.
    pub(crate) fn count_dead(&mut self, rec: &Record) {
        if let State::Dead { reason, .. } = &rec.state {
            self.count(Counter::DeadLetter {
                kind: rec.kind.as_str().to_string(),
                reason: reason.clone(),
            });
        }
    }

    pub(crate) fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    pub(crate) fn put(&mut self, old: Option<&Record>, new: Option<&Record>) -> Result<()> {
        self.ws.record(old, new)
    }

    /// Bumps `pool`'s wakeup sequence once in this step; returns the new value.
    pub(crate) fn wake(&mut self, pool: Uuid) -> Result<u64> {
        if let Some((_, v)) = self.wakes.iter().find(|(p, _)| *p == pool) {
            return Ok(*v);
        }
        let current = match self.writer.wake.get(&pool) {
            Some(v) => *v,
            None => self.store.get_u64(TreeId::Wakeups, &keys::wakeup(pool))?,
        };
        let next = current + 1;
        self.wakes.push((pool, next));
        Ok(next)
    }

    pub(crate) fn commit(mut self) -> Result<Pending> {
        if self.ws.is_empty() && self.wakes.is_empty() {
            // Nothing to write: the counts wait in memory for a later transaction.
            self.writer.add_counts(self.counts, false);
            return Ok(Pending {
                ticket: self.store.last_ticket(),
                wakes: Vec::new(),
            });
        }
        let seq_limit = if self.next_seq > self.writer.seq_limit {
            let limit = self.next_seq.saturating_add(SEQ_BLOCK);
            self.ws
                .put(TreeId::Meta, keys::META_SEQ, codec::encode_u64(limit));
            limit
        } else {
            self.writer.seq_limit
        };
        for (pool, v) in &self.wakes {
            self.ws
                .put(TreeId::Wakeups, keys::wakeup(*pool), codec::encode_u64(*v));
        }
        // Counters ride along with a transaction at most once per METRICS_EVERY (and at a
        // clean close), not in every one: a crash may lose the counts of that interval.
        let write_metrics = !(self.counts.is_empty() && self.writer.dirty.is_empty())
            && self.writer.metrics_written.elapsed() >= METRICS_EVERY;
        if write_metrics {
            for (c, v) in self.writer.counted(&self.counts) {
                self.ws
                    .put(TreeId::Metrics, keys::metric(&c), codec::encode_u64(v));
            }
        }
        let ticket = self.store.commit(std::mem::take(&mut self.ws))?;
        self.writer.add_counts(self.counts, write_metrics);
        self.writer.next_seq = self.next_seq;
        self.writer.seq_limit = seq_limit;
        for (pool, v) in &self.wakes {
            self.writer.wake.insert(*pool, *v);
        }
        Ok(Pending {
            ticket,
            wakes: self.wakes,
        })
    }
}

impl Writer {
    /// The values of every dirty counter and of `counts` once `counts` are added.
    fn counted(&self, counts: &[Counter]) -> BTreeMap<Counter, u64> {
        let mut out: BTreeMap<Counter, u64> = self
            .dirty
            .iter()
            .map(|c| (c.clone(), self.metrics.get(c).copied().unwrap_or(0)))
            .collect();
        for c in counts {
            let base = self.metrics.get(c).copied().unwrap_or(0);
            *out.entry(c.clone()).or_insert(base) += 1;
        }
        out
    }

    /// Adds `counts`; `written` says the transaction just committed carried every dirty
    /// counter to disk.
    fn add_counts(&mut self, counts: Vec<Counter>, written: bool) {
        for c in counts {
            *self.metrics.entry(c.clone()).or_insert(0) += 1;
            if !written {
                self.dirty.insert(c);
            }
        }
        if written {
            self.dirty.clear();
            self.metrics_written = Instant::now();
        }
    }

    /// A write set carrying every dirty counter (for a clean close).
    fn dirty_metrics(&self) -> WriteSet {
        let mut ws = WriteSet::default();
        for (c, v) in self.counted(&[]) {
            ws.put(TreeId::Metrics, keys::metric(&c), codec::encode_u64(v));
        }
        ws
    }
}

impl Drop for Inner {
    /// A clean close writes the counters still only in memory.
    fn drop(&mut self) {
        let writer = self.writer.get_mut().unwrap_or_else(|p| p.into_inner());
        if self.store.failure().is_some() {
            return;
        }
        if !writer.dirty.is_empty() {
            let _ = self.store.commit(writer.dirty_metrics());
        }
        // Also applies anything still staged (every caller waits for its own commit, so
        // normally nothing is).
        let _ = self.store.wait_durable(self.store.last_ticket());
    }
}

pub(crate) fn corrupt_view(rec: &Record, detail: String) -> Error {
    Error::corrupted(
        "messages",
        &keys::message(rec.work_pool_id, rec.born),
        detail,
    )
}

/// A fencing token for the record at `born`: `born` as 16 hex digits (where to find the
/// record, not a secret), then 32 bytes from the OS, URL-safe base64 without padding (59
/// characters in all).
fn new_token(born: u64) -> Result<String> {
    let bytes: [u8; 32] = crate::os_random()?;
    Ok(format!("{born:016x}{}", base64url(&bytes)))
}

/// The record position a token of [`new_token`] starts with (tokens of layout 4 and older,
/// and any other string, have none).
fn token_born(token: &str) -> Option<u64> {
    let hex = token.get(..16)?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// The index ranges a reserve scans, pass by pass: the tree and one prefix per (queue and)
/// kind, each in FIFO order. No preference: one pass over the pool; a preference with
/// fallback: the preferred queues, then the pool; without fallback: only the queues. An
/// empty kind filter or preference gives passes without prefixes (they match nothing).
fn reserve_passes(pool: Uuid, filter: &ReserveFilter) -> Vec<(TreeId, Vec<Vec<u8>>)> {
    let kinds: Vec<CleanupKind> = match &filter.cleanup_kinds {
        None => CleanupKind::ALL.to_vec(),
        Some(ks) => CleanupKind::ALL
            .into_iter()
            .filter(|k| ks.contains(k))
            .collect(),
    };
    let passes: Vec<Option<&[Uuid]>> = match &filter.preferred_work_queue_ids {
        None => vec![None],
        Some(qs) if filter.allow_fallback_to_any_queue => vec![Some(qs), None],
        Some(qs) => vec![Some(qs)],
    };
    passes
        .into_iter()
        .map(|pass| match pass {
            None => (
                TreeId::VisibleByKind,
                kinds
                    .iter()
                    .map(|k| keys::visible_by_kind_prefix(pool, *k).to_vec())
                    .collect(),
            ),
            Some(queues) => {
                let mut qs = queues.to_vec();
                qs.sort();
                qs.dedup();
                (
                    TreeId::VisibleByQueue,
                    qs.iter()
                        .flat_map(|q| {
                            kinds
                                .iter()
                                .map(move |k| keys::visible_by_queue_prefix(pool, *q, *k).to_vec())
                        })
                        .collect(),
                )
            }
        })
        .collect()
}

type IndexIter = Peekable<Box<dyn Iterator<Item = Result<(sled::IVec, sled::IVec)>>>>;

impl Inner {
    /// The writer lock. Holders (and threads queued for it) are counted in `writers`.
    pub(crate) fn lock_writer(&self) -> WriterGuard<'_> {
        // Counted before waiting for the lock, uncounted by `Drop` even on unwinding.
        let counted = Counted::new(&self.writers);
        WriterGuard {
            guard: self.writer.lock().unwrap_or_else(|p| p.into_inner()),
            _counted: counted,
        }
    }

    /// Group commit, before a flush leader takes its batch: staging an operation costs tens
    /// of microseconds, a flush round hundreds, so waiting briefly for concurrent writers to
    /// stage lets one round cover them all. The leader yields while a writer holds or
    /// queues for the writer lock, and while fewer transactions are staged than the last
    /// round took (the callers that round released usually come straight back; on a small
    /// machine they are still waiting for a CPU). A lone caller finds neither and flushes at
    /// once; the wait is bounded by `GATHER_MAX` and never blocks on the lock itself (a long
    /// holder, such as an export, must not hold committed callers past the bound). A batch
    /// already large (`Store::staged_is_large`, as `expire_leases` of hundreds of leases
    /// stages) costs milliseconds on its own: it goes at once.
    fn gather(&self) {
        if self.store.staged_is_large() {
            return;
        }
        let started = Instant::now();
        while started.elapsed() < GATHER_MAX {
            let (staged, last) = self.store.staging_counts();
            if self.writers.load(Ordering::SeqCst) == 0 && staged >= last {
                break;
            }
            std::thread::yield_now();
        }
    }

    fn policy(&self) -> Policy {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Refuses work once poisoned.
    pub(crate) fn check(&self) -> Result<()> {
        if let Some(why) = self
            .poison
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Err(Error::Poisoned(why.clone()));
        }
        match self.store.failure() {
            Some(e) => Err(Error::Poisoned(format!("writing to disk failed: {e}"))),
            None => Ok(()),
        }
    }

    pub(crate) fn poison(&self, why: String) {
        let mut p = self.poison.lock().unwrap_or_else(|p| p.into_inner());
        p.get_or_insert(why);
    }

    pub(crate) fn stored_wakeup(&self, pool: Uuid) -> Result<u64> {
        self.store.get_u64(TreeId::Wakeups, &keys::wakeup(pool))
    }

    /// The stored sequence once it is durable (a reader never sees what a crash could take
    /// back; a staged bump is published by its own operation after its flush).
    fn durable_wakeup(&self, pool: Uuid) -> Result<u64> {
        let stored = self.stored_wakeup(pool)?;
        self.store.wait_durable(self.store.last_ticket())?;
        Ok(stored)
    }

    /// After the writer lock is released: durability, then wakeups.
    pub(crate) fn finish(&self, c: Pending) -> Result<()> {
        let deferred = DEFERRED.with(|d| match d.borrow_mut().as_mut() {
            Some((owner, pending)) if *owner == self as *const Inner as usize => {
                pending.ticket = pending.ticket.max(c.ticket);
                pending.wakes.extend(c.wakes.iter().copied());
                true
            }
            _ => false,
        });
        if deferred {
            return Ok(());
        }
        self.finish_now(c)
    }

    /// [`finish`](Inner::finish), never deferred.
    fn finish_now(&self, c: Pending) -> Result<()> {
        self.store
            .wait_durable_gathering(c.ticket, || self.gather())?;
        for (pool, v) in c.wakes {
            // Durable now; the stored value may already hold a later, not yet durable bump.
            self.wakeups.publish(pool, v, || Ok(v))?;
        }
        Ok(())
    }

    fn validate(&self, m: &NewMessage) -> Result<(String, String)> {
        if m.idempotency_key.is_empty() {
            return Err(InputError::EmptyIdempotencyKey.into());
        }
        if m.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(InputError::IdempotencyKeyTooLong {
                len: m.idempotency_key.len(),
                max: MAX_IDEMPOTENCY_KEY_BYTES,
            }
            .into());
        }
        let target = match &m.target {
            serde_json::Value::Object(o) => serde_json::to_string(o),
            _ => return Err(InputError::NotAnObject { field: "target" }.into()),
        };
        let data = match &m.data {
            None => Ok("{}".to_string()),
            Some(serde_json::Value::Object(o)) => serde_json::to_string(o),
            Some(_) => return Err(InputError::NotAnObject { field: "data" }.into()),
        };
        let (target, data) = match (target, data) {
            (Ok(t), Ok(d)) => (t, d),
            (Err(e), _) | (_, Err(e)) => {
                return Err(Error::Storage(format!("cannot encode JSON: {e}")))
            }
        };
        let size = target.len() + data.len();
        if size > self.payload_limit {
            return Err(InputError::PayloadTooLarge {
                size,
                limit: self.payload_limit,
            }
            .into());
        }
        Ok((target, data))
    }

    fn enqueue(&self, m: NewMessage) -> Result<Enqueued> {
        self.check()?;
        let (target, data) = self.validate(&m)?;
        let policy = self.policy();
        let pool = m.work_pool_id;
        let mut writer = self.lock_writer();
        let now = self.clock.now();
        let mut txn = Txn::new(&self.store, &mut writer);
        let mut stale = Vec::new();

        let mut existing = None;
        if let Some(rec) = self.store.get_record(pool, m.message_id)? {
            if !rec.is_live(now, &policy) {
                stale.push(rec);
            } else if rec.idempotency_key != m.idempotency_key {
                return Err(InputError::MessageIdConflict.into());
            } else {
                existing = Some(rec);
            }
        }
        if existing.is_none() {
            let key = keys::idempotency(pool, &m.idempotency_key);
            if let Some(v) = self.store.get(TreeId::Idempotency, &key)? {
                let id =
                    codec::decode_id(&v).map_err(|d| Error::corrupted("idempotency", &key, d))?;
                let rec = self.store.get_record(pool, id)?.ok_or_else(|| {
                    Error::corrupted("idempotency", &key, "points at a missing message")
                })?;
                if rec.is_live(now, &policy) {
                    existing = Some(rec);
                } else if !stale.iter().any(|s| s.message_id == rec.message_id) {
                    stale.push(rec);
                }
            }
        }

        let (rec, duplicate) = match existing {
            Some(rec) => {
                if rec.state == State::Visible {
                    txn.wake(pool)?;
                }
                (rec, true)
            }
            None => {
                for s in &stale {
                    txn.put(Some(s), None)?;
                }
                let seq = txn.seq();
                let rec = Record::new_visible(
                    pool,
                    m.message_id,
                    m.idempotency_key,
                    m.kind,
                    m.work_queue_id,
                    target,
                    data,
                    now,
                    seq,
                );
                txn.put(None, Some(&rec))?;
                txn.wake(pool)?;
                (rec, false)
            }
        };
        let message = rec.message().map_err(|d| corrupt_view(&rec, d))?;
        txn.count(Counter::op(
            "enqueue",
            if duplicate { "duplicate" } else { "accepted" },
        ));
        let committed = txn.commit()?;
        drop(writer);
        self.finish(committed)?;
        Ok(Enqueued { message, duplicate })
    }

    fn reserve(&self, pool: Uuid, filter: &ReserveFilter) -> Result<Reserved> {
        self.check()?;
        let policy = self.policy();
        let mut writer = self.lock_writer();
        let now = self.clock.now();

        let mut txn = Txn::new(&self.store, &mut writer);
        let expired = self.expire_into(&mut txn, RESERVE_EXPIRY_LIMIT, Some(pool), now, &policy)?;
        let first = txn.commit()?;

        let mut out = Reserved {
            expired,
            ..Reserved::default()
        };
        // The expiry step is committed on its own: make it durable and publish its wakeups
        // even when the scan fails (tests/faults.rs,
        // reserve_whose_reservation_write_fails_still_publishes_its_expiry_wakeup).
        let second = self.reserve_scan(
            Txn::new(&self.store, &mut writer),
            pool,
            filter,
            now,
            &policy,
            &mut out,
        );
        drop(writer);
        self.finish(first)?;
        self.finish(second?)?;
        Ok(out)
    }

    /// The scan of `reserve`: passes over the visible indexes in FIFO order, dead-lettering
    /// candidates whose attempts are used up, reserving the first other one.
    fn reserve_scan(
        &self,
        mut txn: Txn<'_>,
        pool: Uuid,
        filter: &ReserveFilter,
        now: Timestamp,
        policy: &Policy,
        out: &mut Reserved,
    ) -> Result<Pending> {
        let mut handled = HashSet::new();
        'passes: for (tree, prefixes) in reserve_passes(pool, filter) {
            let mut heads: Vec<IndexIter> = prefixes
                .iter()
                .map(|p| {
                    let it: Box<dyn Iterator<Item = _>> = Box::new(self.store.scan_prefix(tree, p));
                    it.peekable()
                })
                .collect();
            while let Some((key, value)) = next_in_fifo_order(&mut heads)? {
                let born = codec::decode_u64(&value)
                    .map_err(|d| Error::corrupted(tree.name(), &key, d))?;
                if !handled.insert(born) {
                    continue;
                }
                let rec = match self.store.get_record_at(pool, born)? {
                    Some(r) if r.state == State::Visible => r,
                    _ => {
                        return Err(Error::corrupted(
                            tree.name(),
                            &key,
                            "visible index points at a message that is not visible",
                        ))
                    }
                };
                if rec.delivery_count >= policy.max_delivery_attempts {
                    let dead = machine::dead_letter(&rec, now, None);
                    txn.put(Some(&rec), Some(&dead))?;
                    txn.count_dead(&dead);
                    if let Some(dl) = dead.dead_letter().map_err(|d| corrupt_view(&dead, d))? {
                        out.dead_lettered.push(dl);
                    }
                    continue;
                }
                let seq = txn.seq();
                let reserved = machine::reserve(&rec, now, policy, new_token(rec.born)?, seq);
                txn.put(Some(&rec), Some(&reserved))?;
                txn.count(Counter::op("reserve", "accepted"));
                out.reservation = reserved
                    .reservation()
                    .map_err(|d| corrupt_view(&reserved, d))?;
                break 'passes;
            }
        }
        txn.commit()
    }

    /// See [`Queue::reserve_finds_nothing`].
    fn reserve_finds_nothing(&self, pool: Uuid, filter: &ReserveFilter) -> Result<bool> {
        self.check()?;
        let now = self.clock.now();
        let lo = keys::pool_prefix(pool).to_vec();
        let hi = keys::lease_by_pool_due_bound(pool, now).to_vec();
        if self
            .store
            .range(TreeId::LeasesByPool, lo..=hi)
            .next()
            .is_some()
        {
            return Ok(false);
        }
        for (tree, prefixes) in reserve_passes(pool, filter) {
            for p in &prefixes {
                if self.store.scan_prefix(tree, p).next().is_some() {
                    return Ok(false);
                }
            }
        }
        // An absence read from state that a crash could still take back is no answer (an
        // ack not yet durable may have removed the last candidate): only when everything
        // applied so far is durable.
        Ok(self.store.is_durable(self.store.last_ticket()))
    }

    fn lease_op(
        &self,
        op: Operation,
        pool: Uuid,
        id: Uuid,
        token: &str,
        release_reason: Option<&str>,
    ) -> Result<OperationResult> {
        if release_reason == Some("") {
            return Err(InputError::EmptyReleaseReason.into());
        }
        self.check()?;
        let policy = self.policy();
        let mut writer = self.lock_writer();
        let now = self.clock.now();
        let mut txn = Txn::new(&self.store, &mut writer);
        let rec = self.record_for_token(pool, id, token)?;
        let seq = txn.seq();
        let outcome = machine::lease_op(op, rec.as_ref(), token, release_reason, now, &policy, seq);
        let mut dead_letter = None;
        if let Some(new) = &outcome.new {
            txn.put(rec.as_ref(), Some(new))?;
            if outcome.made_visible() {
                txn.wake(pool)?;
            }
            dead_letter = new.dead_letter().map_err(|d| corrupt_view(new, d))?;
            txn.count_dead(new);
        }
        txn.count(Counter::op(op.as_str(), outcome.status.as_str()));
        let committed = txn.commit()?;
        drop(writer);
        self.finish(committed)?;
        Ok(OperationResult {
            message_id: id,
            operation: op,
            status: outcome.status,
            lease_expires_at: outcome.lease_expires_at,
            reason: outcome.reason.map(str::to_string),
            dead_letter,
        })
    }

    pub(crate) fn expire_leases(
        &self,
        limit: usize,
        pool: Option<Uuid>,
    ) -> Result<LeaseExpiryResult> {
        if limit == 0 {
            return Err(InputError::LimitTooSmall.into());
        }
        self.check()?;
        let policy = self.policy();
        let mut writer = self.lock_writer();
        let now = self.clock.now();
        let mut txn = Txn::new(&self.store, &mut writer);
        let result = self.expire_into(&mut txn, limit, pool, now, &policy)?;
        let committed = txn.commit()?;
        drop(writer);
        self.finish(committed)?;
        Ok(result)
    }

    /// The expiry transition for up to `limit` due leases, most overdue first, into `txn`.
    /// For one pool, when nothing is due, this is a single index seek; across pools, one
    /// seek per pool that holds leases.
    fn expire_into(
        &self,
        txn: &mut Txn<'_>,
        limit: usize,
        pool: Option<Uuid>,
        now: Timestamp,
        policy: &Policy,
    ) -> Result<LeaseExpiryResult> {
        let mut due = Vec::new();
        match pool {
            Some(p) => self.due_leases(p, now, limit, &mut due)?,
            None => {
                // A merge of the pools' due leases by position: one seek per pool that holds
                // leases finds its most overdue one (its first key), then every lease taken
                // costs one seek for the next of its pool. O((p + k) log n) for p pools.
                let head = |p: Uuid, k: sled::IVec, v: sled::IVec, hi: Vec<u8>| {
                    Reverse((
                        keys::fifo_suffix(&k).unwrap_or_default().to_vec(),
                        p,
                        k,
                        v,
                        hi,
                    ))
                };
                let mut heads = BinaryHeap::new();
                let mut from = Vec::new();
                while let Some(item) = self.store.range(TreeId::LeasesByPool, from..).next() {
                    let (k, v) = item?;
                    let p = keys::uuid_at(&k, 0).ok_or_else(|| {
                        Error::corrupted("leases_by_pool", &k, "key is not a pool, lease and seq")
                    })?;
                    let hi = keys::lease_by_pool_due_bound(p, now).to_vec();
                    if k.as_ref() <= hi.as_slice() {
                        heads.push(head(p, k, v, hi));
                    }
                    match keys::next_pool(p) {
                        Some(next) => from = next.to_vec(),
                        None => break,
                    }
                }
                while due.len() < limit {
                    let Some(Reverse((_, p, k, v, hi))) = heads.pop() else {
                        break;
                    };
                    let born = codec::decode_u64(&v)
                        .map_err(|d| Error::corrupted("leases_by_pool", &k, d))?;
                    let after = (Bound::Excluded(k.to_vec()), Bound::Included(hi.clone()));
                    if let Some(item) = self.store.range(TreeId::LeasesByPool, after).next() {
                        let (nk, nv) = item?;
                        heads.push(head(p, nk, nv, hi));
                    }
                    due.push((p, born, k));
                }
            }
        }
        // The records are read in key order (neighbours share storage pages), then expired
        // in due order.
        let mut order: Vec<usize> = (0..due.len()).collect();
        order.sort_by_key(|&i| (due[i].0, due[i].1));
        let mut records = vec![None; due.len()];
        for i in order {
            records[i] = self.store.get_record_at(due[i].0, due[i].1)?;
        }
        let mut result = LeaseExpiryResult::default();
        for ((p, _, k), rec) in due.into_iter().zip(records) {
            let rec = match rec {
                Some(r) if matches!(r.state, State::Reserved { .. }) => r,
                _ => {
                    return Err(Error::corrupted(
                        "leases_by_pool",
                        &k,
                        "lease index points at a message that is not reserved",
                    ))
                }
            };
            let seq = txn.seq();
            let new = machine::expire(&rec, now, policy, seq);
            txn.put(Some(&rec), Some(&new))?;
            txn.count(Counter::LeaseExpiration {
                result: if new.state == State::Visible {
                    "redelivered"
                } else {
                    "dead_lettered"
                }
                .into(),
            });
            txn.count_dead(&new);
            if new.state == State::Visible {
                txn.wake(p)?;
                result
                    .redelivered
                    .push(new.message().map_err(|d| corrupt_view(&new, d))?);
            } else if let Some(dl) = new.dead_letter().map_err(|d| corrupt_view(&new, d))? {
                result.dead_lettered.push(dl);
            }
        }
        Ok(result)
    }

    /// Up to `limit` due leases of `pool`, most overdue first, appended to `due`.
    fn due_leases(
        &self,
        pool: Uuid,
        now: Timestamp,
        limit: usize,
        due: &mut Vec<(Uuid, u64, sled::IVec)>,
    ) -> Result<()> {
        let lo = keys::pool_prefix(pool).to_vec();
        let hi = keys::lease_by_pool_due_bound(pool, now).to_vec();
        for item in self.store.range(TreeId::LeasesByPool, lo..=hi).take(limit) {
            let (k, v) = item?;
            let born =
                codec::decode_u64(&v).map_err(|d| Error::corrupted("leases_by_pool", &k, d))?;
            due.push((pool, born, k));
        }
        Ok(())
    }

    pub(crate) fn prune_tombstones(&self, limit: usize) -> Result<usize> {
        match self.policy().completed_retention {
            Some(retention) => self.prune(retention, limit),
            None => Ok(0),
        }
    }

    fn prune(&self, retention: Duration, limit: usize) -> Result<usize> {
        self.check()?;
        let mut writer = self.lock_writer();
        let now = self.clock.now();
        let mut txn = Txn::new(&self.store, &mut writer);
        let hi = keys::tombstone_bound(now.saturating_sub(retention)).to_vec();
        let mut n = 0;
        for item in self.store.range(TreeId::Tombstones, ..=hi).take(limit) {
            let (k, _) = item?;
            let (p, born) = keys::parse_pool_born(&k, 8).ok_or_else(|| {
                Error::corrupted("tombstones", &k, "key is not time, pool and sequence")
            })?;
            match self.store.get_record_at(p, born)? {
                Some(rec) if matches!(rec.state, State::Acked { .. }) => {
                    txn.put(Some(&rec), None)?
                }
                _ => {
                    return Err(Error::corrupted(
                        "tombstones",
                        &k,
                        "tombstone index points at a message that is not acked",
                    ))
                }
            }
            n += 1;
        }
        let committed = txn.commit()?;
        drop(writer);
        self.finish(committed)?;
        Ok(n)
    }

    fn wake_dispatchers(&self, pool: Uuid) -> Result<Wakeup> {
        self.check()?;
        let mut writer = self.lock_writer();
        let mut txn = Txn::new(&self.store, &mut writer);
        let sequence = txn.wake(pool)?;
        let committed = txn.commit()?;
        drop(writer);
        self.finish(committed)?;
        Ok(Wakeup {
            work_pool_id: pool,
            sequence,
        })
    }

    /// The message `id` of `pool`: first where `token` says it is (one read of neighbouring
    /// keys right after its reserve), else through `message_ids`. Any token works: a
    /// position that holds nothing or another message, or does not decode, only falls back.
    fn record_for_token(&self, pool: Uuid, id: Uuid, token: &str) -> Result<Option<Record>> {
        if let Some(born) = token_born(token) {
            if let Ok(Some(rec)) = self.store.get_record_at(pool, born) {
                if rec.message_id == id {
                    return Ok(Some(rec));
                }
            }
        }
        self.store.get_record(pool, id)
    }

    /// Reads one record of the pool and views it with `view`; waits until what it saw is
    /// durable.
    fn read<T>(
        &self,
        pool: Uuid,
        id: Uuid,
        view: impl FnOnce(&Record) -> std::result::Result<Option<T>, String>,
    ) -> Result<Option<T>> {
        self.check()?;
        let out = match self.store.get_record(pool, id)? {
            Some(rec) => view(&rec).map_err(|d| corrupt_view(&rec, d))?,
            None => None,
        };
        self.store.wait_durable(self.store.last_ticket())?;
        Ok(out)
    }
}

pub(crate) fn load_metrics(store: &Store) -> Result<BTreeMap<Counter, u64>> {
    let mut out = BTreeMap::new();
    for item in store.range::<std::ops::RangeFull>(TreeId::Metrics, ..) {
        let (k, v) = item?;
        let c = keys::parse_metric(&k)
            .ok_or_else(|| Error::corrupted("metrics", &k, "not a counter name"))?;
        let v = codec::decode_u64(&v).map_err(|d| Error::corrupted("metrics", &k, d))?;
        out.insert(c, v);
    }
    Ok(out)
}

/// Takes the entry with the smallest FIFO position (`visible_at`, `seq`) among the heads.
fn next_in_fifo_order(heads: &mut [IndexIter]) -> Result<Option<(sled::IVec, sled::IVec)>> {
    let mut best: Option<(usize, Vec<u8>)> = None;
    for (i, head) in heads.iter_mut().enumerate() {
        let suffix = match head.peek() {
            None => continue,
            Some(Err(_)) => return head.next().transpose().map(|_| None),
            Some(Ok((k, _))) => keys::fifo_suffix(k).unwrap_or_default().to_vec(),
        };
        if best.as_ref().is_none_or(|(_, b)| suffix < *b) {
            best = Some((i, suffix));
        }
    }
    match best {
        Some((i, _)) => heads[i].next().transpose(),
        None => Ok(None),
    }
}

/// `Queue` is shared across threads; this fails to compile if it ever stops being so.
const _: () = {
    const fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Queue>()
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_matches_python_token_urlsafe_shape() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn tokens_lead_with_their_record_position_and_carry_32_random_bytes() {
        let t = new_token(0x00ab_cdef_0123_4567).unwrap();
        assert_eq!(t.len(), 16 + 43);
        assert!(t.starts_with("00abcdef01234567"), "{t}");
        assert_ne!(t, new_token(0x00ab_cdef_0123_4567).unwrap());
        assert_eq!(token_born(&t), Some(0x00ab_cdef_0123_4567));
        assert_eq!(token_born(&new_token(u64::MAX).unwrap()), Some(u64::MAX));
        // Layout-4 tokens, short strings, signs and non-ASCII have no position.
        assert_eq!(token_born(&base64url(&[7; 32])), None);
        assert_eq!(token_born("0123"), None);
        assert_eq!(token_born("+123456789abcdef-rest"), None);
        assert_eq!(token_born("0123456789abcdeé"), None);
    }
}
