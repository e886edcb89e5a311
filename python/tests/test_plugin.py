"""Behaviours beyond Prefect's standard suite: those Prefect's Redis backend tests on top of
it, plus what the plug-in itself promises (errors, metrics hooks, sharing, cancellation)."""

from __future__ import annotations

import asyncio
import gc
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from pydantic import BaseModel

import cleanup_queue.prefect as plugin
from cleanup_queue import CleanupQueueError
from cleanup_queue.prefect import WorkerCleanupQueue
from cleanup_queue.testing import QueueClock
from prefect.client.schemas.worker_channel import (
    CANCELLING_TIMEOUT_TEARDOWN,
    PENDING_CLAIM_TEARDOWN,
)
from prefect.server.worker_communication.cleanup_queue import get_worker_cleanup_queue
from prefect.settings import (
    PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_LEASE_SECONDS,
    PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_MAX_DELIVERY_ATTEMPTS,
    PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE,
    temporary_settings,
)


async def enqueue(queue: WorkerCleanupQueue, pool, **kw: Any):
    kw.setdefault("message_id", uuid4())
    kw.setdefault("idempotency_key", f"key-{uuid4()}")
    kw.setdefault("kind", CANCELLING_TIMEOUT_TEARDOWN)
    kw.setdefault("target", {"flow_run_id": str(uuid4())})
    return await queue.enqueue(work_pool_id=pool, **kw)


def open_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, WorkerCleanupQueue]:
    """A queue on its own database with fsync durability (the default), real clock."""
    path = tmp_path / "fsync"
    monkeypatch.setenv("CLEANUP_QUEUE_PATH", str(path))
    monkeypatch.setenv("CLEANUP_QUEUE_DURABILITY", "fsync")
    return path, WorkerCleanupQueue()


async def test_message_ids_are_scoped_per_pool(queue: WorkerCleanupQueue) -> None:
    pool_a, pool_b, message_id = uuid4(), uuid4(), uuid4()
    a = await enqueue(queue, pool_a, message_id=message_id, idempotency_key="a")
    b = await enqueue(queue, pool_b, message_id=message_id, idempotency_key="b")
    assert (a.work_pool_id, a.idempotency_key) == (pool_a, "a")
    assert (b.work_pool_id, b.idempotency_key) == (pool_b, "b")

    reserved = await queue.reserve(work_pool_id=pool_a)
    assert reserved is not None and reserved.idempotency_key == "a"
    ack = await queue.ack(
        work_pool_id=pool_a,
        message_id=message_id,
        reservation_token=reserved.reservation_token,
    )
    assert ack.status == "accepted"
    still_there = await queue.read_message(work_pool_id=pool_b, message_id=message_id)
    assert still_there is not None and still_there.delivery_count == 0
    assert await queue.read_message(work_pool_id=pool_a, message_id=message_id) is None


async def test_duplicate_of_visible_message_wakes_but_not_of_reserved(
    queue: WorkerCleanupQueue,
) -> None:
    pool, message_id = uuid4(), uuid4()
    first = await enqueue(queue, pool, message_id=message_id, idempotency_key="k")
    assert await queue.read_wakeup_sequence(pool) == 1

    again = await enqueue(
        queue, pool, message_id=uuid4(), idempotency_key="k", target={"other": 1}
    )
    assert again == first
    assert await queue.read_wakeup_sequence(pool) == 2

    assert await queue.reserve(work_pool_id=pool) is not None
    await enqueue(queue, pool, message_id=message_id, idempotency_key="k")
    assert await queue.read_wakeup_sequence(pool) == 2


async def test_concurrent_reserves_create_exactly_one_reservation(
    queue: WorkerCleanupQueue,
) -> None:
    pool = uuid4()
    message = await enqueue(queue, pool)
    results = await asyncio.gather(*(queue.reserve(work_pool_id=pool) for _ in range(10)))
    won = [r for r in results if r is not None]
    assert len(won) == 1
    assert won[0].message_id == message.message_id
    assert won[0].delivery_count == 1


async def test_release_and_expiry_advance_wakeup_sequence(
    queue: WorkerCleanupQueue, clock: QueueClock
) -> None:
    pool = uuid4()
    message = await enqueue(queue, pool)
    reserved = await queue.reserve(work_pool_id=pool)
    assert reserved is not None
    before = await queue.read_wakeup_sequence(pool)
    released = await queue.release(
        work_pool_id=pool,
        message_id=message.message_id,
        reservation_token=reserved.reservation_token,
        reason="connection_unavailable",
    )
    assert released.status == "accepted"
    assert await queue.read_wakeup_sequence(pool) == before + 1

    assert await queue.reserve(work_pool_id=pool) is not None
    clock.advance(timedelta(seconds=31))
    expired = await queue.expire_leases(work_pool_id=pool)
    assert [m.message_id for m in expired.redelivered] == [message.message_id]
    assert await queue.read_wakeup_sequence(pool) == before + 2


async def test_cancelled_wait_returns_promptly_and_frees_its_thread(
    queue: WorkerCleanupQueue,
) -> None:
    pool = uuid4()
    # More forever-waits than the wait pool has threads: if cancelled waits kept their
    # threads, the last wait below could never start.
    waits = [
        asyncio.create_task(queue.wait_for_wakeup(pool, after=0, timeout=None))
        for _ in range(80)
    ]
    await asyncio.sleep(0.2)
    started = time.monotonic()
    for w in waits:
        w.cancel()
    results = await asyncio.gather(*waits, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert time.monotonic() - started < 0.5

    await asyncio.sleep(0.15)  # every cancelled wait's thread finishes its last slice
    waiter = asyncio.create_task(queue.wait_for_wakeup(pool, after=0, timeout=5))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await queue.wake_dispatchers(pool)
    wakeup = await waiter
    assert wakeup is not None and wakeup.sequence == 1
    assert time.monotonic() - started < 0.5


async def test_wait_for_wakeup_timeouts(queue: WorkerCleanupQueue) -> None:
    pool = uuid4()
    started = time.monotonic()
    assert await queue.wait_for_wakeup(pool, after=0, timeout=0) is None
    assert await queue.wait_for_wakeup(pool, after=0, timeout=0.12) is None
    assert 0.1 <= time.monotonic() - started < 0.6
    await queue.wake_dispatchers(pool)
    got = await queue.wait_for_wakeup(pool, after=0, timeout=0)
    assert got is not None and got.sequence == 1 and got.work_pool_id == pool


async def test_two_instances_share_one_engine(queue: WorkerCleanupQueue) -> None:
    other = WorkerCleanupQueue()
    assert other.engine is queue.engine
    pool = uuid4()
    waiter = asyncio.create_task(other.wait_for_wakeup(pool, after=0, timeout=5))
    await asyncio.sleep(0.05)
    message = await enqueue(queue, pool)
    wakeup = await waiter
    assert wakeup is not None and wakeup.sequence == 1
    reserved = await other.reserve(work_pool_id=pool)
    assert reserved is not None and reserved.message_id == message.message_id


async def test_input_errors_are_value_errors_with_prefect_sentences(
    queue: WorkerCleanupQueue,
) -> None:
    pool, message_id = uuid4(), uuid4()
    with pytest.raises(ValueError, match="^idempotency_key must be non-empty$"):
        await enqueue(queue, pool, idempotency_key="")
    with pytest.raises(ValueError, match="unknown cleanup kind"):
        await enqueue(queue, pool, message_id=message_id, kind="no_such_kind.v1")
    # nothing was stored, and nobody was woken
    assert await queue.read_message(work_pool_id=pool, message_id=message_id) is None
    assert await queue.read_wakeup_sequence(pool) == 0

    await enqueue(queue, pool, message_id=message_id, idempotency_key="one")
    with pytest.raises(
        ValueError,
        match="^message_id is already associated with a different cleanup message$",
    ):
        await enqueue(queue, pool, message_id=message_id, idempotency_key="two")
    reserved = await queue.reserve(work_pool_id=pool)
    assert reserved is not None
    with pytest.raises(ValueError, match="^release reason must be non-empty$"):
        await queue.release(
            work_pool_id=pool,
            message_id=message_id,
            reservation_token=reserved.reservation_token,
            reason="",
        )
    for limit in (0, -1):
        with pytest.raises(ValueError, match="^limit must be at least 1$"):
            await queue.expire_leases(limit=limit)


async def test_unknown_kinds_in_a_reserve_filter_match_nothing(
    queue: WorkerCleanupQueue,
) -> None:
    pool = uuid4()
    await enqueue(queue, pool)
    assert await queue.reserve(work_pool_id=pool, cleanup_kinds=["future_kind.v9"]) is None
    assert (
        await queue.reserve(work_pool_id=pool, cleanup_kinds=[PENDING_CLAIM_TEARDOWN])
        is None
    )
    assert (
        await queue.reserve(
            work_pool_id=pool,
            cleanup_kinds=["future_kind.v9", CANCELLING_TIMEOUT_TEARDOWN],
        )
        is not None
    )


async def test_results_are_prefect_models_with_utc_microsecond_datetimes(
    queue: WorkerCleanupQueue, clock: QueueClock
) -> None:
    pool, queue_id = uuid4(), uuid4()
    message = await enqueue(
        queue,
        pool,
        target={"flow_run_id": "x", "nested": {"n": [1, 2.5, None, True]}},
        data={"d": "e"},
        work_queue_id=queue_id,
    )
    assert message.created_at == clock.current == message.updated_at
    assert message.created_at.utcoffset() == timedelta(0)
    assert message.target == {"flow_run_id": "x", "nested": {"n": [1, 2.5, None, True]}}
    assert message.data == {"d": "e"}
    assert message.work_queue_id == queue_id
    clock.advance(timedelta(microseconds=7))
    reserved = await queue.reserve(work_pool_id=pool)
    assert reserved is not None
    assert reserved.updated_at == clock.current
    assert reserved.lease_expires_at == clock.current + timedelta(seconds=30)
    stored = await queue.read_reservation(work_pool_id=pool, message_id=message.message_id)
    assert stored == reserved


def assert_same(built: Any, validated: Any, where: str = "result") -> None:
    """``built`` equals ``validated`` down to every value's type, dict order, datetime zone
    object and each model's set of fields."""
    assert type(built) is type(validated), (where, type(built), type(validated))
    if isinstance(built, BaseModel):
        assert built.model_fields_set == validated.model_fields_set, where
        assert built.__pydantic_extra__ == validated.__pydantic_extra__, where
        assert built.__pydantic_private__ == validated.__pydantic_private__, where
        assert list(built.__dict__) == list(validated.__dict__), where
        for name in type(built).model_fields:
            assert_same(getattr(built, name), getattr(validated, name), f"{where}.{name}")
    elif isinstance(built, dict):
        assert list(built) == list(validated), where
        for key in built:
            assert_same(built[key], validated[key], f"{where}[{key!r}]")
    elif isinstance(built, list):
        assert len(built) == len(validated), where
        for i, (a, b) in enumerate(zip(built, validated)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(built, datetime):
        assert built == validated and built.fold == validated.fold, where
        assert built.tzinfo is validated.tzinfo, (where, built.tzinfo, validated.tzinfo)
    else:
        assert built == validated, where


def assert_as_validated(result: BaseModel) -> None:
    """The plug-in builds results from the engine's values without validation: they must be
    exactly what Prefect's validation of the same data gives."""
    assert_same(result, type(result).model_validate_json(result.model_dump_json()))


async def test_results_are_exactly_what_prefect_validation_gives(
    queue: WorkerCleanupQueue, clock: QueueClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    expiries: list[Any] = []
    monkeypatch.setattr(plugin, "record_cleanup_queue_lease_expiry_result", expiries.append)
    pool, work_queue = uuid4(), uuid4()
    target = {
        "flow_run_id": str(uuid4()),
        "z": {"n": [1, -2, 2**63, 2**64 - 1, 2.5, 1e-7, None, True, False, "é ✓"]},
        "a": [],
        "m": {},
    }
    results: list[BaseModel] = []
    first = await enqueue(queue, pool, target=target, data={"d": [{"e": 1}]},
                          work_queue_id=work_queue, idempotency_key="k1")
    assert first.target == target
    results.append(first)
    results.append(await enqueue(queue, pool, idempotency_key="k1"))  # duplicate
    results.append(await enqueue(queue, pool, idempotency_key="k2", data=None))
    reserved = await queue.reserve(work_pool_id=pool)
    assert reserved is not None and reserved.message_id == first.message_id
    results.append(reserved)
    stored = await queue.read_reservation(work_pool_id=pool, message_id=reserved.message_id)
    assert stored is not None
    results.append(stored)
    message = await queue.read_message(work_pool_id=pool, message_id=reserved.message_id)
    assert message is not None
    results.append(message)
    token = reserved.reservation_token
    clock.advance(timedelta(microseconds=999_999))
    for operation in (queue.renew, queue.ack):
        results.append(await operation(
            work_pool_id=pool, message_id=reserved.message_id, reservation_token="bad"))
        results.append(await operation(
            work_pool_id=pool, message_id=reserved.message_id, reservation_token=token))
    second = await queue.reserve(work_pool_id=pool)
    assert second is not None
    results.append(await queue.release(
        work_pool_id=pool, message_id=second.message_id,
        reservation_token=second.reservation_token, reason="worker restarting"))
    # Expiry: one message redelivered, one dead-lettered (with its lease and token).
    with temporary_settings({PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_MAX_DELIVERY_ATTEMPTS: 2}):
        third = await queue.reserve(work_pool_id=pool)
        assert third is not None
        await enqueue(queue, pool, idempotency_key="k3")
        fourth = await queue.reserve(work_pool_id=pool)
        assert fourth is not None
        clock.advance(timedelta(seconds=31))
        expired = await queue.expire_leases()
        assert expired.redelivered and expired.dead_lettered
        results.append(expired)
        dead = await queue.read_dead_letter(work_pool_id=pool, message_id=third.message_id)
        assert dead is not None and dead.lease_expires_at is not None
        results.append(dead)
        # A release that uses up the attempts returns its dead letter.
        again = await queue.reserve(work_pool_id=pool)
        assert again is not None and again.delivery_count == 2
        released = await queue.release(
            work_pool_id=pool, message_id=again.message_id,
            reservation_token=again.reservation_token, reason="gave up")
        assert released.dead_letter is not None
        results.append(released)
        # A reserve's own expiry of the pool's due leases.
        await enqueue(queue, pool, idempotency_key="k4")
        assert await queue.reserve(work_pool_id=pool) is not None
        clock.advance(timedelta(seconds=31))
        results.append(await queue.reserve(work_pool_id=pool))
    results.extend(e for e in expiries if e.redelivered or e.dead_lettered)
    assert any(isinstance(r, plugin.CleanupQueueLeaseExpiryResult) for r in expiries)
    for result in results:
        assert_as_validated(result)


async def test_metrics_hooks_are_called_like_the_memory_backend(
    queue: WorkerCleanupQueue, monkeypatch: pytest.MonkeyPatch, clock: QueueClock
) -> None:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(
        plugin,
        "record_cleanup_queue_operation",
        lambda op, **kw: calls.append(("op", (op, kw["status"]))),
    )
    monkeypatch.setattr(
        plugin,
        "record_cleanup_queue_dead_letter",
        lambda dl, *, source: calls.append(("dlq", (dl.reason, source))),
    )
    monkeypatch.setattr(
        plugin,
        "record_cleanup_queue_lease_expiry_result",
        lambda r: calls.append(("expiry", (len(r.redelivered), len(r.dead_lettered)))),
    )
    pool = uuid4()
    m = await enqueue(queue, pool, idempotency_key="k")
    await enqueue(queue, pool, idempotency_key="k")
    with temporary_settings({PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_MAX_DELIVERY_ATTEMPTS: 1}):
        r = await queue.reserve(work_pool_id=pool)
        assert r is not None
        clock.advance(timedelta(seconds=31))
        await queue.expire_leases()
    assert await queue.reserve(work_pool_id=pool) is None
    assert r.message_id == m.message_id
    assert calls == [
        ("op", ("enqueue", "accepted")),
        ("op", ("enqueue", "duplicate")),
        ("expiry", (0, 0)),
        ("op", ("reserve", "accepted")),
        ("dlq", ("max_delivery_attempts_reached", plugin.DEAD_LETTER_SOURCE)),
        ("expiry", (0, 1)),
        ("expiry", (0, 0)),
    ]


async def test_policy_follows_prefect_settings_on_every_call(
    queue: WorkerCleanupQueue, clock: QueueClock
) -> None:
    pool = uuid4()
    await enqueue(queue, pool)
    with temporary_settings({PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_MAX_DELIVERY_ATTEMPTS: 7}):
        assert queue.engine is not None
        reserved = await queue.reserve(work_pool_id=pool)
    assert reserved is not None
    # back to the default policy (30 s lease)
    renewed = await queue.renew(
        work_pool_id=pool,
        message_id=reserved.message_id,
        reservation_token=reserved.reservation_token,
    )
    assert renewed.lease_expires_at == clock.current + timedelta(seconds=30)


async def test_a_lease_setting_applies_inside_its_context_only(
    queue: WorkerCleanupQueue, clock: QueueClock
) -> None:
    """The policy is cached per settings object: a changed setting (a new object) must
    still reach the engine, and the old one must come back with the old object."""
    pool = uuid4()
    await enqueue(queue, pool)
    await enqueue(queue, pool)
    with temporary_settings({PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_LEASE_SECONDS: 7}):
        first = await queue.reserve(work_pool_id=pool)
    second = await queue.reserve(work_pool_id=pool)
    assert first is not None and second is not None
    assert first.lease_expires_at == clock.current + timedelta(seconds=7)
    assert second.lease_expires_at == clock.current + timedelta(seconds=30)


def test_uuid_text_map_gives_equal_uuids_when_full() -> None:
    texts = [str(uuid4()) for _ in range(plugin._UUIDS_MAX + 10)]
    for text in texts:
        assert plugin._uuid(text) == UUID(text)
        assert type(plugin._uuid(text)) is UUID
    assert len(plugin._UUIDS) <= plugin._UUIDS_MAX
    known = uuid4()
    assert plugin._text(known) == str(known)
    assert plugin._uuid(str(known)) is known


def test_get_worker_cleanup_queue_returns_the_plugin(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEANUP_QUEUE_PATH", str(db_path))
    with temporary_settings(
        {PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE: "cleanup_queue.prefect"}
    ):
        q = get_worker_cleanup_queue()
    assert type(q) is WorkerCleanupQueue
    assert q.engine.path == db_path
    plugin._forget_engine(db_path)


def test_default_path_is_under_prefect_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLEANUP_QUEUE_PATH", raising=False)
    q = WorkerCleanupQueue()
    from prefect.settings.context import get_current_settings

    expected = Path(get_current_settings().home) / "cleanup-queue"
    assert q.engine.path == expected.resolve()
    plugin._forget_engine(expected)


def test_storage_errors_have_the_package_exception_type() -> None:
    assert issubclass(CleanupQueueError, Exception)
    assert not issubclass(CleanupQueueError, ValueError)
    assert plugin.CleanupQueueError is CleanupQueueError


async def test_durability_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A buffered engine works like the default one; data written through it is there after
    # a clean close and reopen.
    path = tmp_path / "buffered"
    monkeypatch.setenv("CLEANUP_QUEUE_PATH", str(path))
    monkeypatch.setenv("CLEANUP_QUEUE_DURABILITY", "buffered:200")
    q = WorkerCleanupQueue()
    pool, message_id = uuid4(), uuid4()
    await enqueue(q, pool, message_id=message_id, idempotency_key="k")
    plugin._forget_engine(path)
    del q
    import gc

    gc.collect()
    monkeypatch.setenv("CLEANUP_QUEUE_DURABILITY", "flush")
    deadline = time.monotonic() + 10
    while True:
        try:
            again = WorkerCleanupQueue()
            break
        except CleanupQueueError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    stored = await again.read_message(work_pool_id=pool, message_id=message_id)
    assert stored is not None and stored.idempotency_key == "k"
    plugin._forget_engine(path)

    monkeypatch.setenv("CLEANUP_QUEUE_PATH", str(tmp_path / "bad"))
    for bad in ("fast", "buffered:", "buffered:0", "buffered:x"):
        monkeypatch.setenv("CLEANUP_QUEUE_DURABILITY", bad)
        with pytest.raises(ValueError, match="durability must be"):
            WorkerCleanupQueue()


async def test_calls_never_leave_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every operation runs on the event loop and makes no worker-thread hop: with buffered
    # durability a call never waits for a flush; with fsync (the default) a write waits for
    # its flush round, which the engine's notifier thread leads and reports through a pipe
    # the loop watches (see the next test).
    class NoThreads:
        used = 0

        def submit(self, *args: object, **kwargs: object) -> None:
            NoThreads.used += 1
            raise AssertionError("no worker thread expected")

    monkeypatch.setattr(plugin, "_OPERATIONS", NoThreads())
    for durability in ("buffered:200", "fsync"):
        path = tmp_path / durability.replace(":", "-")
        monkeypatch.setenv("CLEANUP_QUEUE_PATH", str(path))
        monkeypatch.setenv("CLEANUP_QUEUE_DURABILITY", durability)
        q = WorkerCleanupQueue()
        assert q.engine.returns_at_once == (durability != "fsync")
        pool, message_id = uuid4(), uuid4()
        # An empty reserve (nothing due, nothing visible) is answered at once.
        assert await q.reserve(work_pool_id=pool) is None
        await enqueue(q, pool, message_id=message_id, idempotency_key="k")
        reservation = await q.reserve(work_pool_id=pool)
        assert reservation is not None and reservation.message_id == message_id
        ack = await q.ack(
            work_pool_id=pool,
            message_id=message_id,
            reservation_token=reservation.reservation_token,
        )
        assert ack.status == "accepted"
        assert q.engine.read_wakeup_sequence(str(pool)) == 1
        assert NoThreads.used == 0
        plugin._forget_engine(path)


async def test_concurrent_durable_writes_share_flush_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Durable writes run on the loop and share flush rounds: far fewer rounds than calls.
    # Every call still returns only once durable, and the wakeups are published.
    path, q = open_fsync(tmp_path, monkeypatch)
    pool = uuid4()
    calls = 32
    before = q.engine.commit_stats()[1]

    async def write(i: int) -> None:
        message = await enqueue(q, pool, idempotency_key=f"k{i}")
        # Returned: durable, so nothing is left waiting for this call.
        assert q.engine.read_message(str(pool), str(message.message_id)) is not None

    await asyncio.gather(*(write(i) for i in range(calls)))
    flushes = q.engine.commit_stats()[1] - before
    assert 1 <= flushes < calls, flushes
    assert await q.read_wakeup_sequence(pool) == calls
    plugin._forget_engine(path)


@pytest.mark.parametrize("fault", ["failure", "panic"])
def test_a_failed_flush_fails_every_call_it_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    # The notifier thread's round fails (an I/O error, or a bug that panics): every call
    # waiting for it raises (none hangs, none reports success), and so does every later
    # call, until the database is reopened.
    path, q = open_fsync(tmp_path, monkeypatch)
    pool = uuid4()

    async def fail() -> None:
        await enqueue(q, pool, idempotency_key="before")
        if fault == "failure":
            q.engine._inject_flush_failure(1)
        else:
            q.engine._inject_flush_panic()
        results = await asyncio.wait_for(
            asyncio.gather(
                *(enqueue(q, pool, idempotency_key=f"k{i}") for i in range(8)),
                return_exceptions=True,
            ),
            timeout=10,
        )
        assert all(isinstance(r, CleanupQueueError) for r in results), results
        with pytest.raises(CleanupQueueError, match="writing to disk failed"):
            await enqueue(q, pool, idempotency_key="after")

    asyncio.run(fail())
    plugin._forget_engine(path)
    del q
    gc.collect()  # the closed loop, its notifier and the engine are freed

    async def reopened() -> None:
        # What was acknowledged before the failure is there.
        q = WorkerCleanupQueue()
        reservation = await q.reserve(work_pool_id=pool)
        assert reservation is not None and reservation.idempotency_key == "before"

    asyncio.run(reopened())
    plugin._forget_engine(path)


def test_a_loop_without_durability_notifications_fails_calls_before_they_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A loop that cannot watch the notifier's pipe (no add_reader) gets an error from a
    # durable write, and the write did not happen.
    path, q = open_fsync(tmp_path, monkeypatch)
    pool, message_id = uuid4(), uuid4()
    before = q.engine.commit_stats()[0]

    async def attempt() -> None:
        loop = asyncio.get_running_loop()

        def no_reader(*args: object) -> None:
            raise NotImplementedError("no add_reader here")

        monkeypatch.setattr(loop, "add_reader", no_reader)
        with pytest.raises(NotImplementedError):
            await enqueue(q, pool, message_id=message_id, idempotency_key="k")

    asyncio.run(attempt())
    assert q.engine.read_message(str(pool), str(message_id)) is None
    assert q.engine.commit_stats()[0] == before, "nothing was committed"
    plugin._forget_engine(path)


def test_calls_cut_off_by_a_closing_loop_still_publish_their_wakeups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A durable write whose caller (and the loop's durability task) is cancelled while it
    # waits for its flush still becomes durable and still wakes the pool; the closed loops
    # are freed.
    path, q = open_fsync(tmp_path, monkeypatch)
    pool = uuid4()
    assert q.engine.read_wakeup_sequence(str(pool)) == 0  # a dispatcher is watching

    async def cut_off(i: int) -> None:
        task = asyncio.ensure_future(enqueue(q, pool, idempotency_key=f"k{i}"))
        await asyncio.sleep(0)  # the write ran on the loop and now waits for its flush
        assert not task.done()
        # Returning leaves the task pending: asyncio.run cancels it and closes the loop.

    for i in range(3):
        asyncio.run(cut_off(i))
        assert q.engine.wait_for_wakeup(str(pool), i, 5.0) == i + 1
    gc.collect()
    assert len(plugin._DURABILITY) == 0
    plugin._forget_engine(path)


def test_a_loop_closed_with_calls_still_waiting_is_freed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A loop closed without cancelling its tasks (their futures refer to the loop) is
    # still freed with its notifier; the write it started is durable all the same.
    path, q = open_fsync(tmp_path, monkeypatch)
    pool, message_id = uuid4(), uuid4()
    loop = asyncio.new_event_loop()
    task = loop.create_task(enqueue(q, pool, message_id=message_id))
    loop.run_until_complete(asyncio.sleep(0))  # the write ran and waits for its flush
    assert not task.done()
    loop.close()
    del loop, task
    gc.collect()
    assert len(plugin._DURABILITY) == 0
    assert q.engine.read_message(str(pool), str(message_id)) is not None
    plugin._forget_engine(path)
