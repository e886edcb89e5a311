"""Prefect storage module for the durable engine.

Set ``PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE=cleanup_queue.prefect``.

Prefect creates ``WorkerCleanupQueue()`` once per worker connection and per service and
never closes them, so every instance in a process shares one engine per database path
(the module-level registry below). The engine is closed when the process exits.

- Database: ``CLEANUP_QUEUE_PATH``, default ``$PREFECT_HOME/cleanup-queue``.
- ``CLEANUP_QUEUE_DURABILITY``: ``fsync`` (default: every returned call survives power
  loss), ``flush`` (survives a process crash) or ``buffered:<ms>`` (like Redis
  ``appendfsync everysec``: a crash may lose the last interval).
- ``CLEANUP_QUEUE_MANUAL_CLOCK=1`` (tests only): the engine's clock stands still unless
  moved with :class:`cleanup_queue.testing.QueueClock`.
- Policy (lease, max delivery attempts, completed idempotency retention) is read from
  Prefect's settings on every call (computed once per settings object) and pushed into the
  engine before the operation.
- Mutating operations run inline on the event loop (tens of microseconds each, more for
  ``expire_leases`` of many leases); with ``fsync`` or ``flush`` each then waits for its
  flush round, which a native thread leads and reports through a pipe the loop watches
  (``loop.add_reader``: asyncio's Unix loops and uvloop), so the loop never blocks and
  makes no thread hop. Reads (inline with ``buffered:<ms>``) and ``wait_for_wakeup`` run in
  worker threads with the GIL released.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from pydantic import TypeAdapter
from pydantic_core import to_jsonable_python

from prefect.client.schemas.worker_channel import CleanupKind
from prefect.server.worker_communication.cleanup_queue import (
    CleanupQueueDeadLetter,
    CleanupQueueLeaseExpiryResult,
    CleanupQueueMessage,
    CleanupQueueOperationResult,
    CleanupQueueReservation,
    CleanupQueueWakeup,
    record_cleanup_queue_dead_letter,
    record_cleanup_queue_lease_expiry_result,
    record_cleanup_queue_operation,
)
from prefect.server.worker_communication.cleanup_queue import (
    WorkerCleanupQueue as _WorkerCleanupQueue,
)
from prefect.settings.context import get_current_settings

from cleanup_queue._native import CleanupQueueError, Engine, Pending

__all__ = ["CleanupQueueError", "WorkerCleanupQueue", "open_engine"]

PATH_ENV = "CLEANUP_QUEUE_PATH"
MANUAL_CLOCK_ENV = "CLEANUP_QUEUE_MANUAL_CLOCK"
DURABILITY_ENV = "CLEANUP_QUEUE_DURABILITY"
DEAD_LETTER_SOURCE = "durable_cleanup_queue"
_DEFAULT_EXPIRE_LEASE_LIMIT = 100
# The longest a single blocking native wait lasts; a cancelled wait_for_wakeup frees its
# thread within this.
_WAIT_SLICE_SECONDS = 0.05

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)

# Durable writes from concurrent tasks must overlap so the engine can group-commit them:
# a pool of its own, larger than asyncio's default. Waits get their own pool so that idle
# dispatchers never hold up operations.
_OPERATIONS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="cleanup-queue")
_WAITERS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="cleanup-queue-wait")

# Set when the interpreter starts to exit (before it joins worker threads), so that a wait
# whose event loop was abandoned without cancelling it cannot hold up the exit.
_EXITING = threading.Event()
threading._register_atexit(_EXITING.set)  # type: ignore[attr-defined]

_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()

_M = TypeVar("_M")


def from_micros(us: int) -> datetime:
    """A UTC datetime from the engine's microseconds since the Unix epoch (exact)."""
    return _EPOCH + timedelta(microseconds=us)


def to_micros(value: datetime) -> int:
    """Microseconds since the Unix epoch; a naive datetime is taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return (value - _EPOCH) // _MICROSECOND


def _default_path() -> Path:
    return Path(get_current_settings().home) / "cleanup-queue"


def open_engine(path: str | os.PathLike[str] | None = None) -> Engine:
    """The process's engine for ``path`` (default: ``CLEANUP_QUEUE_PATH`` or
    ``$PREFECT_HOME/cleanup-queue``), opened on first use and shared after that.

    Raises :class:`cleanup_queue.CleanupQueueError` naming the path when another process
    holds the database.
    """
    if path is None:
        path = os.environ.get(PATH_ENV) or _default_path()
    key = os.path.abspath(os.path.expanduser(os.fspath(path)))
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            manual = os.environ.get(MANUAL_CLOCK_ENV, "").lower() in {"1", "true", "yes"}
            os.makedirs(os.path.dirname(key) or ".", exist_ok=True)
            durability = os.environ.get(DURABILITY_ENV) or "fsync"
            engine = Engine(key, manual_clock=manual, durability=durability)
            _ENGINES[key] = engine
        return engine


def _forget_engine(path: str | os.PathLike[str]) -> None:
    """Test helper: drop the registry's engine for ``path`` (it closes once unreferenced)."""
    with _ENGINES_LOCK:
        _ENGINES.pop(os.path.abspath(os.path.expanduser(os.fspath(path))), None)


# The settings object _policy read last and what it gave. Prefect's settings objects are not
# changed once made (``temporary_settings`` and the test fixtures make new ones), so the same
# object gives the same policy.
_LAST_POLICY: tuple[Any, tuple[int, int, int | None]] | None = None


def _policy() -> tuple[int, int, int | None]:
    """(lease µs, max delivery attempts, completed retention µs or None) from the current
    Prefect settings."""
    global _LAST_POLICY
    root = get_current_settings()
    last = _LAST_POLICY
    if last is not None and last[0] is root:
        return last[1]
    settings = root.server.worker_channel
    retention = settings.cleanup_completed_idempotency_retention_seconds
    policy = (
        round(settings.cleanup_lease_seconds * 1_000_000),
        settings.cleanup_max_delivery_attempts,
        None if retention is None else round(retention * 1_000_000),
    )
    _LAST_POLICY = (root, policy)
    return policy


# UUIDs by their text, for the ids the engine returns as text: a pool's id comes back with
# every result and a message's with each of its operations. Parsing one costs more than the
# lookup; the map is emptied when it is full.
_UUIDS: dict[str, UUID] = {}
_UUIDS_MAX = 4096


def _remember(text: str, value: UUID) -> UUID:
    if len(_UUIDS) >= _UUIDS_MAX:
        _UUIDS.clear()
    _UUIDS[text] = value
    return value


def _uuid(text: str) -> UUID:
    value = _UUIDS.get(text)
    return _remember(text, UUID(text)) if value is None else value


def _text(value: UUID) -> str:
    """``str(value)``, remembered for ``_uuid`` when ``value`` is a plain UUID."""
    text = str(value)
    if type(value) is UUID and text not in _UUIDS:
        _remember(text, value)
    return text


# One encoder for every call: json.dumps with options builds a new one each time.
_ENCODER = json.JSONEncoder(default=to_jsonable_python, separators=(",", ":"))


def _json(value: Mapping[str, Any]) -> str:
    return _ENCODER.encode(dict(value))


# Results come from the engine as tuples of plain values in the field order of Prefect's
# models (python/src/lib.rs): ids as UUID text, timestamps as UTC calendar fields, JSON
# objects as dicts. Building the models with ``model_construct`` gives what validating the
# same values as JSON gives (same types, same fields set: a test checks it) at a fraction
# of the cost, since validation converts every timestamp twice.


def _learn_datetime() -> tuple[Callable[..., datetime], Any]:
    """The class and UTC zone of the timestamps Prefect's models hold after validating
    JSON text (which some Python versions give a zone object other than a datetime's)."""
    field = CleanupQueueMessage.model_fields["created_at"].annotation
    probe = TypeAdapter(field).validate_json('"1970-01-01T00:00:00Z"')
    return type(probe), probe.tzinfo


_DATETIME, _UTC = _learn_datetime()


def _ts(utc: tuple[int, ...]) -> datetime:
    return _DATETIME(*utc, tzinfo=_UTC)


def _message_fields(t: tuple[Any, ...]) -> dict[str, Any]:
    message_id, key, pool, queue, kind, target, data, created, updated, count = t
    return {
        "message_id": _uuid(message_id),
        "idempotency_key": key,
        "work_pool_id": _uuid(pool),
        "work_queue_id": None if queue is None else _uuid(queue),
        "kind": kind,
        "target": target,
        "data": data,
        "created_at": _ts(created),
        "updated_at": _ts(updated),
        "delivery_count": count,
    }


def _message(t: tuple[Any, ...]) -> CleanupQueueMessage:
    return CleanupQueueMessage.model_construct(**_message_fields(t))


def _reservation(t: tuple[Any, ...]) -> CleanupQueueReservation:
    message, token, lease = t
    fields = _message_fields(message)
    fields["reservation_token"] = token
    fields["lease_expires_at"] = _ts(lease)
    return CleanupQueueReservation.model_construct(**fields)


def _dead_letter(t: tuple[Any, ...]) -> CleanupQueueDeadLetter:
    message, reason, count, moved, token, lease, release_reason = t
    return CleanupQueueDeadLetter.model_construct(
        message=_message(message),
        reason=reason,
        final_delivery_count=count,
        moved_at=_ts(moved),
        reservation_token=token,
        lease_expires_at=None if lease is None else _ts(lease),
        release_reason=release_reason,
    )


def _operation_result(t: tuple[Any, ...]) -> CleanupQueueOperationResult:
    message_id, operation, status, lease, reason, dead_letter = t
    return CleanupQueueOperationResult.model_construct(
        message_id=_uuid(message_id),
        operation=operation,
        status=status,
        lease_expires_at=None if lease is None else _ts(lease),
        reason=reason,
        dead_letter=None if dead_letter is None else _dead_letter(dead_letter),
    )


def _expiry(t: tuple[Any, ...]) -> CleanupQueueLeaseExpiryResult:
    redelivered, dead_lettered = t
    return CleanupQueueLeaseExpiryResult.model_construct(
        redelivered=[_message(m) for m in redelivered],
        dead_lettered=[_dead_letter(d) for d in dead_lettered],
    )


def _maybe(build: Callable[[Any], _M], value: Any) -> _M | None:
    return None if value is None else build(value)


class _Durability:
    """Waits for the durability of many deferred calls of one engine on one event loop
    without a thread hop: the calls run inline on the loop (``Engine.defer``); a native
    thread of the engine's ``Notifier`` leads a flush round for the newest of them while the
    loop keeps running (and staging) others, then makes a pipe the loop watches readable;
    the loop completes (publishes the wakeups of) every call the round covered. A caller
    cancelled meanwhile still has its call completed. One per (loop, engine):
    ``_durability``."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.notifier = engine.notifier()
        self.waiting: list[tuple[Pending, asyncio.Future[None]]] = []
        loop.add_reader(self.notifier.fileno(), self._round_ended)

    async def wait(self, pending: Pending) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pending, future)
        self.waiting.append(entry)
        self.notifier.request(pending)
        try:
            await future
        except asyncio.CancelledError:
            # The caller is gone (perhaps with its loop), but its write still becomes
            # durable: its wakeups are published off the loop once it is (completing twice
            # does nothing). Nothing here may keep a closed loop alive.
            if entry in self.waiting:
                self.waiting.remove(entry)
            _OPERATIONS.submit(self.engine.complete, pending)
            raise

    def _round_ended(self) -> None:
        failed = self.notifier.drain()
        engine = self.engine
        covered, rest = [], []
        for w in self.waiting:
            (covered if failed or engine.is_durable(w[0]) else rest).append(w)
        # A call not covered was staged after the thread took the round's request, so its
        # own request is waiting for the next round.
        self.waiting = rest
        for pending, future in covered:
            try:
                engine.complete(pending)  # at once: durable, or the flush failed
            except Exception as e:
                if not future.done():
                    future.set_exception(e)
            else:
                if not future.done():
                    future.set_result(None)


# Per event loop, per engine, both weakly: what keeps a _Durability alive is its loop's
# reader registration (and the calls waiting on it), so a loop closed with calls still
# waiting (whose futures refer to the loop) is freed with its _Durability and notifier.
_DURABILITY: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, weakref.WeakValueDictionary[Engine, _Durability]
] = weakref.WeakKeyDictionary()


def _durability(engine: Engine) -> _Durability:
    loop = asyncio.get_running_loop()
    per_engine = _DURABILITY.setdefault(loop, weakref.WeakValueDictionary())
    durability = per_engine.get(engine)
    if durability is None:
        durability = per_engine[engine] = _Durability(engine, loop)
    return durability


class WorkerCleanupQueue(_WorkerCleanupQueue):
    """Durable cleanup queue storage backed by the embedded Rust engine."""

    def __init__(self) -> None:
        self.engine: Engine = open_engine()
        # The loop and _Durability this instance used last, weakly (a closed loop and its
        # notifier are freed): a cheaper lookup than _durability's for every call.
        self._last: tuple[weakref.ref[Any], weakref.ref[_Durability]] | None = None

    def _durability(self) -> _Durability:
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            durability = last[1]()
            if durability is not None:
                return durability
        durability = _durability(self.engine)
        self._last = (weakref.ref(loop), weakref.ref(durability))
        return durability

    async def _mutate(self, fn: Callable[..., _M], *args: Any) -> _M:
        """Runs the mutating ``fn(*args)`` inline on the event loop, then waits for its
        durability (``fsync``, ``flush``) in a flush round shared with every concurrent
        call (``_Durability``). A thread hop would cost more than the engine's work for a
        call; the flush itself is shared either way."""
        engine = self.engine
        engine.set_policy(*_policy())
        if engine.returns_at_once:
            return fn(*args)
        # Before anything is written: should this loop give no durability notifications
        # (no add_reader, no file descriptor left), the call fails having done nothing.
        durability = self._durability()
        value, error, pending = engine.defer(fn, *args)
        if engine.is_durable(pending):
            engine.complete(pending)
        else:
            await durability.wait(pending)
        if error is not None:
            raise error
        return value

    async def _call(self, fn: Callable[..., _M], *args: Any) -> _M:
        """Runs ``fn(*args)`` after pushing the current policy: in a worker thread when the
        call waits for a flush (``fsync``, ``flush``), inline on the event loop when it
        cannot (``buffered:<ms>``: CPU work only, and a thread hop would cost more than the
        call itself, like Prefect's in-memory backend, which also works on the loop)."""
        policy = _policy()  # read here: settings live in the caller's context
        engine = self.engine
        if engine.returns_at_once:
            engine.set_policy(*policy)
            return fn(*args)

        def run() -> _M:
            engine.set_policy(*policy)
            return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(_OPERATIONS, run)

    async def enqueue(
        self,
        *,
        message_id: UUID,
        idempotency_key: str,
        work_pool_id: UUID,
        kind: CleanupKind,
        target: Mapping[str, Any],
        data: Mapping[str, Any] | None = None,
        work_queue_id: UUID | None = None,
    ) -> CleanupQueueMessage:
        duplicate, message = await self._mutate(
            self.engine.enqueue,
            _text(message_id),
            idempotency_key,
            _text(work_pool_id),
            str(kind),
            _json(target),
            None if data is None else _json(data),
            None if work_queue_id is None else str(work_queue_id),
        )
        record_cleanup_queue_operation(
            "enqueue",
            status="duplicate" if duplicate else "accepted",
            work_pool_id=work_pool_id,
            message_id=message_id,
            cleanup_kind=str(kind),
        )
        return _message(message)

    async def reserve(
        self,
        *,
        work_pool_id: UUID,
        cleanup_kinds: Iterable[CleanupKind] | None = None,
        preferred_work_queue_ids: Iterable[UUID] | None = None,
        allow_fallback_to_any_queue: bool = True,
    ) -> CleanupQueueReservation | None:
        args = (
            _text(work_pool_id),
            None if cleanup_kinds is None else [str(k) for k in cleanup_kinds],
            None
            if preferred_work_queue_ids is None
            else [str(q) for q in preferred_work_queue_ids],
            allow_fallback_to_any_queue,
        )
        if not self.engine.returns_at_once and self.engine.reserve_finds_nothing(*args):
            # The dispatcher's most frequent call: nothing due, nothing visible. Answered on
            # the loop in microseconds instead of a thread hop (the engine checks that what
            # it read is durable, else it says False and the call takes the normal path).
            reserved, expired, scan_dead_letters = None, None, []
        else:
            reserved, expired, scan_dead_letters = await self._mutate(
                self.engine.reserve, *args
            )
        expiry = _maybe(_expiry, expired)
        if expiry is None:
            expiry = CleanupQueueLeaseExpiryResult()
        for dead_letter in expiry.dead_lettered:
            record_cleanup_queue_dead_letter(dead_letter, source=DEAD_LETTER_SOURCE)
        for dead_letter in scan_dead_letters:
            record_cleanup_queue_dead_letter(
                _dead_letter(dead_letter), source=DEAD_LETTER_SOURCE
            )
        record_cleanup_queue_lease_expiry_result(expiry)

        result = _maybe(_reservation, reserved)
        if result is not None:
            record_cleanup_queue_operation(
                "reserve",
                status="accepted",
                work_pool_id=work_pool_id,
                message_id=result.message_id,
                cleanup_kind=str(result.kind),
            )
        return result

    async def _lease_operation(
        self,
        operation: str,
        fn: Callable[..., str],
        work_pool_id: UUID,
        message_id: UUID,
        *args: str,
    ) -> CleanupQueueOperationResult:
        result = _operation_result(
            await self._mutate(fn, _text(work_pool_id), _text(message_id), *args)
        )
        if result.dead_letter is not None:
            record_cleanup_queue_dead_letter(
                result.dead_letter, source=DEAD_LETTER_SOURCE
            )
        record_cleanup_queue_operation(
            operation,
            status=result.status,
            work_pool_id=work_pool_id,
            message_id=message_id,
        )
        return result

    async def ack(
        self,
        *,
        work_pool_id: UUID,
        message_id: UUID,
        reservation_token: str,
    ) -> CleanupQueueOperationResult:
        return await self._lease_operation(
            "ack", self.engine.ack, work_pool_id, message_id, reservation_token
        )

    async def release(
        self,
        *,
        work_pool_id: UUID,
        message_id: UUID,
        reservation_token: str,
        reason: str,
    ) -> CleanupQueueOperationResult:
        return await self._lease_operation(
            "release",
            self.engine.release,
            work_pool_id,
            message_id,
            reservation_token,
            reason,
        )

    async def renew(
        self,
        *,
        work_pool_id: UUID,
        message_id: UUID,
        reservation_token: str,
    ) -> CleanupQueueOperationResult:
        return await self._lease_operation(
            "renew", self.engine.renew, work_pool_id, message_id, reservation_token
        )

    async def expire_leases(
        self,
        *,
        limit: int = _DEFAULT_EXPIRE_LEASE_LIMIT,
        work_pool_id: UUID | None = None,
    ) -> CleanupQueueLeaseExpiryResult:
        engine = self.engine

        def expire_then_prune(pool: str | None) -> tuple[Any, Any]:
            expired = engine.expire_leases(limit, pool)
            # The engine's own sweeper is off (so every expiry reaches Prefect's metrics);
            # Prefect's reconciler calls this periodically, so prune acked tombstones whose
            # retention ran out here, in a bounded batch.
            engine.prune_tombstones(max(limit, 1))
            return expired

        result = _expiry(
            await self._mutate(
                expire_then_prune, None if work_pool_id is None else str(work_pool_id)
            )
        )
        for dead_letter in result.dead_lettered:
            record_cleanup_queue_dead_letter(dead_letter, source=DEAD_LETTER_SOURCE)
        record_cleanup_queue_lease_expiry_result(result)
        return result

    async def read_message(
        self, *, work_pool_id: UUID, message_id: UUID
    ) -> CleanupQueueMessage | None:
        return _maybe(
            _message,
            await self._call(
                self.engine.read_message, str(work_pool_id), str(message_id)
            ),
        )

    async def read_dead_letter(
        self, *, work_pool_id: UUID, message_id: UUID
    ) -> CleanupQueueDeadLetter | None:
        return _maybe(
            _dead_letter,
            await self._call(
                self.engine.read_dead_letter, str(work_pool_id), str(message_id)
            ),
        )

    async def read_reservation(
        self, *, work_pool_id: UUID, message_id: UUID
    ) -> CleanupQueueReservation | None:
        """The live reservation of a message, if any (an inspection helper beyond
        Prefect's interface)."""
        return _maybe(
            _reservation,
            await self._call(
                self.engine.read_reservation, str(work_pool_id), str(message_id)
            ),
        )

    async def wake_dispatchers(self, work_pool_id: UUID) -> CleanupQueueWakeup:
        sequence = await self._mutate(self.engine.wake_dispatchers, str(work_pool_id))
        return CleanupQueueWakeup(work_pool_id=work_pool_id, sequence=sequence)

    async def read_wakeup_sequence(self, work_pool_id: UUID) -> int:
        return await self._call(self.engine.read_wakeup_sequence, str(work_pool_id))

    async def wait_for_wakeup(
        self,
        work_pool_id: UUID,
        *,
        after: int = 0,
        timeout: float | None = None,
    ) -> CleanupQueueWakeup | None:
        engine = self.engine
        pool = str(work_pool_id)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        stop = threading.Event()

        def wait() -> int | None:
            # Short blocking slices, so a cancelled wait frees its thread promptly.
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is None or remaining > _WAIT_SLICE_SECONDS:
                    step, last = _WAIT_SLICE_SECONDS, False
                else:
                    step, last = max(remaining, 0.0), True
                sequence = engine.wait_for_wakeup(pool, after, step)
                if sequence is not None or last or stop.is_set() or _EXITING.is_set():
                    return sequence

        try:
            sequence = await asyncio.get_running_loop().run_in_executor(_WAITERS, wait)
        finally:
            stop.set()
        if sequence is None:
            return None
        return CleanupQueueWakeup(work_pool_id=work_pool_id, sequence=sequence)
