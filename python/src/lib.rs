//! `cleanup_queue._native`: a thin PyO3 layer over the Rust engine.
//!
//! Every call releases the GIL while the engine works. Arguments cross the boundary as
//! strings (ids as UUID text, payloads as JSON text); results come back as tuples of plain
//! values in the field order of Prefect's `CleanupQueue*` models (see `message` below),
//! which the Python side builds without parsing text.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use cleanup_queue::{
    CleanupKind, DeadLetter, Durability, Error, LeaseExpiryResult, ManualClock, Message,
    NewMessage, OperationResult, Policy, Queue, Reservation, ReserveFilter, Timestamp,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyString};
use serde_json::Value;
use uuid::Uuid;

create_exception!(
    _native,
    CleanupQueueError,
    PyException,
    "A storage failure of the cleanup queue engine (or its database is in use by another process)."
);

fn to_py(e: Error) -> PyErr {
    match e {
        Error::InvalidInput(input) => PyValueError::new_err(input.to_string()),
        other => CleanupQueueError::new_err(other.to_string()),
    }
}

fn uuid(s: &str) -> PyResult<Uuid> {
    Uuid::parse_str(s).map_err(|e| PyValueError::new_err(format!("invalid UUID {s:?}: {e}")))
}

fn opt_uuid(s: Option<&str>) -> PyResult<Option<Uuid>> {
    s.map(uuid).transpose()
}

fn json_arg(field: &str, text: &str) -> PyResult<Value> {
    serde_json::from_str(text)
        .map_err(|e| PyValueError::new_err(format!("{field} is not valid JSON: {e}")))
}

/// A JSON value as the Python value `json.loads` gives for it.
fn json_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_pyobject(py)?.into_any(),
            (None, Some(u)) => u.into_pyobject(py)?.into_any(),
            // serde_json holds every other number as a finite f64.
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => PyList::new(
            py,
            items
                .iter()
                .map(|x| json_py(py, x))
                .collect::<PyResult<Vec<_>>>()?,
        )?
        .into_any(),
        Value::Object(map) => json_object(py, map)?.into_any(),
    })
}

fn json_object<'py>(
    py: Python<'py>,
    map: &serde_json::Map<String, Value>,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (k, v) in map {
        dict.set_item(k, json_py(py, v)?)?;
    }
    Ok(dict)
}

/// The results below cross as tuples of plain values, in the field order of Prefect's
/// models, which `cleanup_queue.prefect` builds from them: ids as UUID text, timestamps as
/// UTC `(year, month, day, hour, minute, second, microsecond)`, JSON objects as dicts.
type Utc = (i64, u32, u32, u32, u32, u32, u32);

fn message<'py>(py: Python<'py>, m: &Message) -> PyResult<Bound<'py, PyAny>> {
    Ok((
        m.message_id.to_string(),
        m.idempotency_key.as_str(),
        m.work_pool_id.to_string(),
        m.work_queue_id.map(|q| q.to_string()),
        m.kind.as_str(),
        json_object(py, &m.target)?,
        json_object(py, &m.data)?,
        m.created_at.to_utc(),
        m.updated_at.to_utc(),
        m.delivery_count,
    )
        .into_pyobject(py)?
        .into_any())
}

/// `(message, reservation_token, lease_expires_at)`.
fn reservation<'py>(py: Python<'py>, r: &Reservation) -> PyResult<Bound<'py, PyAny>> {
    Ok((
        message(py, &r.message)?,
        r.reservation_token.as_str(),
        r.lease_expires_at.to_utc(),
    )
        .into_pyobject(py)?
        .into_any())
}

/// `(message, reason, final_delivery_count, moved_at, reservation_token, lease_expires_at,
/// release_reason)`.
fn dead_letter<'py>(py: Python<'py>, d: &DeadLetter) -> PyResult<Bound<'py, PyAny>> {
    Ok((
        message(py, &d.message)?,
        d.reason.as_str(),
        d.final_delivery_count,
        d.moved_at.to_utc(),
        d.reservation_token.as_deref(),
        d.lease_expires_at.map(Timestamp::to_utc),
        d.release_reason.as_deref(),
    )
        .into_pyobject(py)?
        .into_any())
}

/// `(message_id, operation, status, lease_expires_at, reason, dead_letter)`.
fn op_result<'py>(py: Python<'py>, r: &OperationResult) -> PyResult<Bound<'py, PyAny>> {
    let lease: Option<Utc> = r.lease_expires_at.map(Timestamp::to_utc);
    Ok((
        r.message_id.to_string(),
        r.operation.as_str(),
        r.status.as_str(),
        lease,
        r.reason.as_deref(),
        r.dead_letter
            .as_ref()
            .map(|d| dead_letter(py, d))
            .transpose()?,
    )
        .into_pyobject(py)?
        .into_any())
}

/// `([message], [dead_letter])`.
fn expiry<'py>(py: Python<'py>, e: &LeaseExpiryResult) -> PyResult<Bound<'py, PyAny>> {
    let redelivered = e
        .redelivered
        .iter()
        .map(|m| message(py, m))
        .collect::<PyResult<Vec<_>>>()?;
    let dead_lettered = e
        .dead_lettered
        .iter()
        .map(|d| dead_letter(py, d))
        .collect::<PyResult<Vec<_>>>()?;
    Ok((redelivered, dead_lettered).into_pyobject(py)?.into_any())
}

fn micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// What [`Engine::defer`] left to do (`cleanup_queue::Pending`): wait for durability, then
/// publish wakeups. Completed at most once.
#[pyclass(frozen, module = "cleanup_queue._native")]
struct Pending {
    /// Taken by the one `complete`.
    record: std::sync::Mutex<Option<cleanup_queue::Pending>>,
    /// Waits for the same durability and publishes nothing: waiting and checking never
    /// touch `record`, so a `complete` from another thread never waits behind a waiter
    /// (which, holding the lock while it takes the GIL back, would deadlock with it).
    probe: cleanup_queue::Pending,
}

impl Pending {
    fn take(&self) -> Option<cleanup_queue::Pending> {
        self.record.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// What a [`Notifier`]'s flusher thread and the event loop share.
struct NotifierShared {
    state: std::sync::Mutex<NotifierState>,
    wake: std::sync::Condvar,
    /// The write end of the pipe the event loop watches; at most one byte is ever in it.
    signal: std::io::PipeWriter,
}

#[derive(Default)]
struct NotifierState {
    /// The newest record a caller wants durable, with its engine: taken by the thread,
    /// which holds the engine only while it waits, so the thread itself keeps no database
    /// open once idle (the `Notifier` does, for as long as it lives, as its loop's
    /// `_Durability` holds the engine anyway).
    wanted: Option<(Queue, cleanup_queue::Pending)>,
    /// Requests since the thread last took one.
    requests: usize,
    /// How many requests the last round took: the thread waits (up to `GATHER`) for as
    /// many before it leads the next one.
    last_round: usize,
    /// A request wakes the thread once `requests` reaches this; `usize::MAX` while the
    /// thread is not sleeping (it looks at the state anyway before it sleeps again).
    wake_at: usize,
    /// A byte is in the pipe.
    signalled: bool,
    /// The flush failed (the engine is poisoned): no record will ever be durable.
    failed: bool,
    /// The notifier is gone: the thread exits.
    stop: bool,
}

impl NotifierShared {
    fn signal(&self, st: &mut NotifierState) {
        // A byte is written only when none is in the pipe, so the pipe never fills, and
        // `signalled` is set only once it is there (`drain` then reads it without blocking).
        // Never once the notifier (and so the pipe's read end) is gone: `Drop` sets `stop`
        // under this same lock.
        if !st.stop && !st.signalled && (&self.signal).write_all(&[1]).is_ok() {
            st.signalled = true;
        }
    }
}

/// Durability notifications for one event loop: a thread of its own leads a flush round
/// whenever the loop asks for a record ([`Notifier::request`]), then writes a byte to a pipe
/// the loop watches (`fileno`), so the loop learns of every round without a thread hop.
#[pyclass(frozen, module = "cleanup_queue._native")]
struct Notifier {
    queue: Queue,
    shared: std::sync::Arc<NotifierShared>,
    /// Read only by `drain`, under the state lock.
    reader: std::io::PipeReader,
}

impl Notifier {
    fn start(queue: Queue) -> std::io::Result<Notifier> {
        let (reader, writer) = std::io::pipe()?;
        let shared = std::sync::Arc::new(NotifierShared {
            state: std::sync::Mutex::new(NotifierState::default()),
            wake: std::sync::Condvar::new(),
            signal: writer,
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("cleanup-queue-notifier".into())
            .spawn(move || flusher(&thread_shared))?;
        Ok(Notifier {
            queue,
            shared,
            reader,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, NotifierState> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long the notifier thread waits for the calls of the last round to come back before it
/// leads the next one: an event loop stages a call in tens of microseconds, a round takes
/// hundreds, so a round that waits a little covers more calls (group commit), but while it
/// waits the loop may run out of calls to stage. A probe (16 tasks on 2 vCPUs, cycles/s over
/// four alternating runs each): no wait 5.0k-6.0k (3.3 calls per round), 150 us 5.9k-6.5k
/// (6.3), 300 us 5.2k-6.5k (7.7), 500 us 5.4k-5.7k (9.4); 200 us lies between the best two.
const GATHER: std::time::Duration = std::time::Duration::from_micros(200);

fn flusher(shared: &NotifierShared) {
    let lock = || shared.state.lock().unwrap_or_else(|p| p.into_inner());
    let mut st = lock();
    loop {
        if st.stop {
            return;
        }
        if st.wanted.is_none() {
            st.wake_at = 1;
            st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            st.wake_at = usize::MAX;
            continue;
        }
        // Gather: sleep (no spinning: the loop needs the CPU to stage) until as many calls
        // as the last round took have asked, or `GATHER` has passed.
        let until = std::time::Instant::now() + GATHER;
        while !st.stop && st.requests < st.last_round {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            st.wake_at = st.last_round;
            st = shared
                .wake
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            st.wake_at = usize::MAX;
        }
        let Some((queue, wanted)) = st.wanted.take() else {
            continue;
        };
        st.last_round = std::mem::take(&mut st.requests);
        drop(st);
        // The loop learns of the round as soon as it is durable, before this thread applies
        // the round's batch to sled.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            queue.wait_durable_now(&wanted, || shared.signal(&mut lock()))
        }));
        drop(queue);
        st = lock();
        // A round that panicked has poisoned the engine (`RoundGuard`): like a failed one,
        // every waiting call must learn it, never wait for a thread that is gone.
        if !matches!(result, Ok(Ok(()))) {
            st.failed = true;
            shared.signal(&mut st);
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        let mut st = self.state();
        st.stop = true;
        self.shared.wake.notify_one();
    }
}

#[pymethods]
impl Notifier {
    /// The pipe's read end: readable once a flush round ended (or failed).
    fn fileno(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.reader.as_raw_fd()
    }

    /// Asks for `pending` to be made durable (replacing an older request).
    fn request(&self, pending: &Pending) {
        let mut st = self.state();
        st.wanted = Some((self.queue.clone(), pending.probe.durability_only()));
        st.requests += 1;
        // Wake the thread only when it sleeps waiting for this request (idle, or gathered
        // enough): a wake-up is a system call on the loop's thread.
        if st.requests >= st.wake_at {
            self.shared.wake.notify_one();
        }
    }

    /// Empties the pipe; returns whether a flush failed (then nothing will become durable).
    fn drain(&self) -> bool {
        let mut st = self.state();
        if st.signalled {
            st.signalled = false;
            let mut byte = [0u8];
            let _ = (&self.reader).read_exact(&mut byte);
        }
        st.failed
    }
}

/// One open database. Instances are meant to be shared (see `cleanup_queue.prefect`).
#[pyclass(frozen, module = "cleanup_queue._native")]
struct Engine {
    queue: Queue,
    clock: Option<ManualClock>,
    returns_at_once: bool,
}

impl Engine {
    fn manual_clock(&self) -> PyResult<&ManualClock> {
        self.clock.as_ref().ok_or_else(|| {
            CleanupQueueError::new_err("this engine was not opened with a manual clock")
        })
    }
}

/// The pool and reserve filter from Prefect's arguments; unknown kinds match nothing
/// (dropped).
fn reserve_args(
    work_pool_id: &str,
    cleanup_kinds: Option<Vec<String>>,
    preferred_work_queue_ids: Option<Vec<String>>,
    allow_fallback_to_any_queue: bool,
) -> PyResult<(Uuid, ReserveFilter)> {
    let filter = ReserveFilter {
        cleanup_kinds: cleanup_kinds.map(|ks| {
            ks.iter()
                .filter_map(|k| CleanupKind::from_str(k).ok())
                .collect()
        }),
        preferred_work_queue_ids: preferred_work_queue_ids
            .map(|qs| qs.iter().map(|q| uuid(q)).collect::<PyResult<Vec<_>>>())
            .transpose()?,
        allow_fallback_to_any_queue,
    };
    Ok((uuid(work_pool_id)?, filter))
}

/// `fsync`, `flush` or `buffered:<milliseconds>`.
fn parse_durability(text: &str) -> PyResult<Durability> {
    let bad = || {
        PyValueError::new_err(format!(
            "durability must be fsync, flush or buffered:<milliseconds>, got {text:?}"
        ))
    };
    match text.split_once(':') {
        None if text == "fsync" => Ok(Durability::Fsync),
        None if text == "flush" => Ok(Durability::Flush),
        Some(("buffered", ms)) => match ms.parse::<u64>() {
            Ok(ms) if ms > 0 => Ok(Durability::Buffered {
                every: Duration::from_millis(ms),
            }),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

#[pymethods]
impl Engine {
    /// Opens (or creates) the database in directory `path`. The background sweeper is off:
    /// Prefect's reconciler calls `expire_leases`, so every expiry reaches its metrics.
    /// `manual_clock`: the engine's time stands still until `clock_set`/`clock_advance`.
    /// `durability`: `fsync` (default), `flush`, or `buffered:<milliseconds>`.
    #[new]
    #[pyo3(signature = (path, manual_clock = false, durability = "fsync"))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        manual_clock: bool,
        durability: &str,
    ) -> PyResult<Engine> {
        let durability = parse_durability(durability)?;
        let clock = manual_clock.then(ManualClock::starting_now);
        let mut builder = Queue::builder(&path)
            .sweep_interval(None)
            .durability(durability);
        if let Some(c) = &clock {
            builder = builder.clock(c.clone());
        }
        let queue = py.detach(|| builder.open()).map_err(to_py)?;
        Ok(Engine {
            queue,
            clock,
            returns_at_once: matches!(durability, Durability::Buffered { .. }),
        })
    }

    /// Whether calls return without waiting for a flush (`buffered:<ms>`): then a call is
    /// only CPU work of tens of microseconds and may run on the event loop's thread.
    #[getter]
    fn returns_at_once(&self) -> bool {
        self.returns_at_once
    }

    /// The database directory.
    #[getter]
    fn path(&self) -> Option<PathBuf> {
        self.queue.path().map(|p| p.to_path_buf())
    }

    /// Replaces the policy if it differs (lease and retention in microseconds).
    #[pyo3(signature = (lease_us, max_delivery_attempts, retention_us = None))]
    fn set_policy(
        &self,
        py: Python<'_>,
        lease_us: i64,
        max_delivery_attempts: u32,
        retention_us: Option<i64>,
    ) -> PyResult<()> {
        let policy = Policy {
            lease: micros(lease_us),
            max_delivery_attempts,
            completed_retention: retention_us.map(micros),
        };
        py.detach(|| {
            if self.queue.policy() == policy {
                Ok(())
            } else {
                self.queue.set_policy(policy)
            }
        })
        .map_err(to_py)
    }

    /// Calls `fn(*args)`, in which this thread's mutating calls on this engine return without
    /// waiting for durability (`Queue::deferred`). Returns `(value, error, pending)`: the
    /// call's value (or `None`), the exception it raised (or `None`), and what is left to do
    /// either way: nothing the call did may be reported before `complete(pending)`.
    #[pyo3(signature = (f, *args))]
    fn defer<'py>(
        &self,
        f: Bound<'py, PyAny>,
        args: Bound<'py, pyo3::types::PyTuple>,
    ) -> (Option<Bound<'py, PyAny>>, Option<PyErr>, Pending) {
        let (result, pending) = self.queue.deferred(|| f.call1(args));
        let pending = Pending {
            probe: pending.durability_only(),
            record: std::sync::Mutex::new(Some(pending)),
        };
        match result {
            Ok(v) => (Some(v), None, pending),
            Err(e) => (None, Some(e), pending),
        }
    }

    /// A new [`Notifier`] (one per event loop).
    fn notifier(&self) -> PyResult<Notifier> {
        Notifier::start(self.queue.clone())
            .map_err(|e| CleanupQueueError::new_err(format!("cannot start a notifier: {e}")))
    }

    /// `(transactions, flushes)` since the engine was opened (`Queue::commit_stats`).
    fn commit_stats(&self) -> (u64, u64) {
        let s = self.queue.commit_stats();
        (s.transactions, s.flushes)
    }

    /// Whether `pending` is already durable (never waits).
    fn is_durable(&self, pending: &Pending) -> bool {
        self.queue.is_durable(&pending.probe)
    }

    /// Waits until `pending` is durable (at once if it is), then publishes its wakeups.
    /// Raises if the write or flush failed. A second call does nothing.
    fn complete(&self, py: Python<'_>, pending: &Pending) -> PyResult<()> {
        // The lock is taken without the GIL too: nothing holding it ever waits for the GIL.
        py.detach(|| match pending.take() {
            Some(p) => self.queue.complete(p),
            None => Ok(()),
        })
        .map_err(to_py)
    }

    /// Returns `(duplicate, message)`.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (message_id, idempotency_key, work_pool_id, kind, target_json, data_json = None, work_queue_id = None))]
    fn enqueue<'py>(
        &self,
        py: Python<'py>,
        message_id: &str,
        idempotency_key: String,
        work_pool_id: &str,
        kind: &str,
        target_json: &str,
        data_json: Option<&str>,
        work_queue_id: Option<&str>,
    ) -> PyResult<(bool, Bound<'py, PyAny>)> {
        let kind = CleanupKind::from_str(kind).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let new = NewMessage {
            message_id: uuid(message_id)?,
            idempotency_key,
            work_pool_id: uuid(work_pool_id)?,
            work_queue_id: opt_uuid(work_queue_id)?,
            kind,
            target: json_arg("target", target_json)?,
            data: data_json.map(|d| json_arg("data", d)).transpose()?,
        };
        let done = py
            .detach(|| self.queue.enqueue_detailed(new))
            .map_err(to_py)?;
        Ok((done.duplicate, message(py, &done.message)?))
    }

    /// Returns `(reservation | None, expiry | None, [scan dead letter])`;
    /// the expiry is `None` when the pool had no due lease. Unknown kinds in the filter
    /// match nothing (they are dropped, not an error).
    #[pyo3(signature = (work_pool_id, cleanup_kinds = None, preferred_work_queue_ids = None, allow_fallback_to_any_queue = true))]
    #[allow(clippy::type_complexity)]
    fn reserve<'py>(
        &self,
        py: Python<'py>,
        work_pool_id: &str,
        cleanup_kinds: Option<Vec<String>>,
        preferred_work_queue_ids: Option<Vec<String>>,
        allow_fallback_to_any_queue: bool,
    ) -> PyResult<(
        Option<Bound<'py, PyAny>>,
        Option<Bound<'py, PyAny>>,
        Vec<Bound<'py, PyAny>>,
    )> {
        let (pool, filter) = reserve_args(
            work_pool_id,
            cleanup_kinds,
            preferred_work_queue_ids,
            allow_fallback_to_any_queue,
        )?;
        let done = py
            .detach(|| self.queue.reserve_detailed(pool, &filter))
            .map_err(to_py)?;
        Ok((
            done.reservation
                .as_ref()
                .map(|r| reservation(py, r))
                .transpose()?,
            (!done.expired.is_empty())
                .then(|| expiry(py, &done.expired))
                .transpose()?,
            done.dead_lettered
                .iter()
                .map(|d| dead_letter(py, d))
                .collect::<PyResult<_>>()?,
        ))
    }

    /// Whether `reserve` with these arguments would return nothing and change nothing right
    /// now; never waits, and says `False` when it cannot tell without waiting. Cheap enough
    /// to call on the event loop before deciding to leave it.
    #[pyo3(signature = (work_pool_id, cleanup_kinds = None, preferred_work_queue_ids = None, allow_fallback_to_any_queue = true))]
    fn reserve_finds_nothing(
        &self,
        py: Python<'_>,
        work_pool_id: &str,
        cleanup_kinds: Option<Vec<String>>,
        preferred_work_queue_ids: Option<Vec<String>>,
        allow_fallback_to_any_queue: bool,
    ) -> PyResult<bool> {
        let (pool, filter) = reserve_args(
            work_pool_id,
            cleanup_kinds,
            preferred_work_queue_ids,
            allow_fallback_to_any_queue,
        )?;
        py.detach(|| self.queue.reserve_finds_nothing(pool, &filter))
            .map_err(to_py)
    }

    fn ack<'py>(
        &self,
        py: Python<'py>,
        work_pool_id: &str,
        message_id: &str,
        reservation_token: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (pool, id) = (uuid(work_pool_id)?, uuid(message_id)?);
        py.detach(|| self.queue.ack(pool, id, reservation_token))
            .map_err(to_py)
            .and_then(|r| op_result(py, &r))
    }

    fn release<'py>(
        &self,
        py: Python<'py>,
        work_pool_id: &str,
        message_id: &str,
        reservation_token: &str,
        reason: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (pool, id) = (uuid(work_pool_id)?, uuid(message_id)?);
        py.detach(|| self.queue.release(pool, id, reservation_token, reason))
            .map_err(to_py)
            .and_then(|r| op_result(py, &r))
    }

    fn renew<'py>(
        &self,
        py: Python<'py>,
        work_pool_id: &str,
        message_id: &str,
        reservation_token: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (pool, id) = (uuid(work_pool_id)?, uuid(message_id)?);
        py.detach(|| self.queue.renew(pool, id, reservation_token))
            .map_err(to_py)
            .and_then(|r| op_result(py, &r))
    }

    /// A limit below 1 is the engine's input error ("limit must be at least 1").
    #[pyo3(signature = (limit = 100, work_pool_id = None))]
    fn expire_leases<'py>(
        &self,
        py: Python<'py>,
        limit: i64,
        work_pool_id: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let limit = usize::try_from(limit).unwrap_or(0);
        let pool = opt_uuid(work_pool_id)?;
        py.detach(|| self.queue.expire_leases(limit, pool))
            .map_err(to_py)
            .and_then(|r| expiry(py, &r))
    }

    /// Removes up to `limit` acked tombstones past the retention; returns how many.
    fn prune_tombstones(&self, py: Python<'_>, limit: usize) -> PyResult<usize> {
        py.detach(|| self.queue.prune_tombstones(limit))
            .map_err(to_py)
    }

    fn read_message<'py>(
        &self,
        py: Python<'py>,
        work_pool_id: &str,
        message_id: &str,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let (pool, id) = (uuid(work_pool_id)?, uuid(message_id)?);
        py.detach(|| self.queue.read_message(pool, id))
            .map_err(to_py)?
            .map(|v| message(py, &v))
            .transpose()
    }

    fn read_dead_letter<'py>(
        &self,
        py: Python<'py>,
        work_pool_id: &str,
        message_id: &str,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let (pool, id) = (uuid(work_pool_id)?, uuid(message_id)?);
        py.detach(|| self.queue.read_dead_letter(pool, id))
            .map_err(to_py)?
            .map(|v| dead_letter(py, &v))
            .transpose()
    }

    /// The reservation currently held on a message, if any (an inspection helper).
    fn read_reservation<'py>(
        &self,
        py: Python<'py>,
        work_pool_id: &str,
        message_id: &str,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let (pool, id) = (uuid(work_pool_id)?, uuid(message_id)?);
        py.detach(|| self.queue.read_reservation(pool, id))
            .map_err(to_py)?
            .map(|v| reservation(py, &v))
            .transpose()
    }

    /// Bumps the pool's wakeup sequence; returns the new value.
    fn wake_dispatchers(&self, py: Python<'_>, work_pool_id: &str) -> PyResult<u64> {
        let pool = uuid(work_pool_id)?;
        py.detach(|| self.queue.wake_dispatchers(pool))
            .map(|w| w.sequence)
            .map_err(to_py)
    }

    fn read_wakeup_sequence(&self, py: Python<'_>, work_pool_id: &str) -> PyResult<u64> {
        let pool = uuid(work_pool_id)?;
        py.detach(|| self.queue.read_wakeup_sequence(pool))
            .map_err(to_py)
    }

    /// Blocks (without the GIL) for at most `timeout` seconds (`None`: for ever) until the
    /// pool's sequence exceeds `after`; returns it, or `None` on timeout.
    #[pyo3(signature = (work_pool_id, after = 0, timeout = None))]
    fn wait_for_wakeup(
        &self,
        py: Python<'_>,
        work_pool_id: &str,
        after: i64,
        timeout: Option<f64>,
    ) -> PyResult<Option<u64>> {
        let pool = uuid(work_pool_id)?;
        let after = u64::try_from(after).unwrap_or(0);
        let timeout = timeout
            .map(|t| Duration::try_from_secs_f64(t.max(0.0)))
            .transpose()
            .map_err(|e| PyValueError::new_err(format!("invalid timeout: {e}")))?;
        py.detach(|| self.queue.wait_for_wakeup(pool, after, timeout))
            .map(|w| w.map(|w| w.sequence))
            .map_err(to_py)
    }

    /// Test hook: makes the `n`th durability flush from now fail (the engine is poisoned).
    fn _inject_flush_failure(&self, n: u64) {
        self.queue.inject_flush_failure(n);
    }

    /// Test hook: makes the next durability flush panic (the engine is poisoned).
    fn _inject_flush_panic(&self) {
        self.queue.inject_flush_panic();
    }

    /// The engine's current time, in microseconds since the Unix epoch.
    fn now_us(&self) -> i64 {
        self.queue.now().as_micros()
    }

    /// Whether the engine runs on a manual clock.
    #[getter]
    fn has_manual_clock(&self) -> bool {
        self.clock.is_some()
    }

    /// Manual clock only: sets the time (microseconds since the Unix epoch).
    fn clock_set(&self, us: i64) -> PyResult<()> {
        self.manual_clock()?.set(Timestamp::from_micros(us));
        Ok(())
    }

    /// Manual clock only: moves the time by `us` microseconds (may be negative).
    fn clock_advance(&self, us: i64) -> PyResult<()> {
        let clock = self.manual_clock()?;
        clock.set(Timestamp::from_micros(
            clock.now().as_micros().saturating_add(us),
        ));
        Ok(())
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Pending>()?;
    m.add_class::<Notifier>()?;
    m.add("CleanupQueueError", m.py().get_type::<CleanupQueueError>())?;
    Ok(())
}
