"""Restart safety across processes, and one owner per database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest

from cleanup_queue.prefect import WorkerCleanupQueue, _forget_engine
from cleanup_queue.testing import QueueClock

ENQUEUE_AND_RESERVE = textwrap.dedent(
    """
    import asyncio, json, sys
    from uuid import uuid4
    from cleanup_queue.prefect import WorkerCleanupQueue

    async def main():
        queue = WorkerCleanupQueue()
        pool, message_id = uuid4(), uuid4()
        await queue.enqueue(
            message_id=message_id,
            idempotency_key="flow-run-1:cancel",
            work_pool_id=pool,
            kind="cancelling_timeout_teardown.v1",
            target={"flow_run_id": "1", "infrastructure_pid": "k8s:job-1"},
        )
        r = await queue.reserve(work_pool_id=pool)
        print(r.model_dump_json())

    asyncio.run(main())
    """
)

OPEN = textwrap.dedent(
    """
    from cleanup_queue import CleanupQueueError
    from cleanup_queue.prefect import WorkerCleanupQueue
    try:
        WorkerCleanupQueue()
    except CleanupQueueError as e:
        print(e)
        raise SystemExit(3)
    """
)


def run(script: str, db_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CLEANUP_QUEUE_PATH=str(db_path))
    env.pop("CLEANUP_QUEUE_MANUAL_CLOCK", None)
    return subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_a_reservation_survives_the_process(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = run(ENQUEUE_AND_RESERVE, db_path)
    assert first.returncode == 0, first.stderr
    before = json.loads(first.stdout.strip().splitlines()[-1])

    monkeypatch.setenv("CLEANUP_QUEUE_PATH", str(db_path))
    monkeypatch.setenv("CLEANUP_QUEUE_MANUAL_CLOCK", "1")
    queue = WorkerCleanupQueue()
    try:
        pool, message_id = UUID(before["work_pool_id"]), UUID(before["message_id"])
        after = await queue.read_reservation(work_pool_id=pool, message_id=message_id)
        assert after is not None
        assert after.model_dump(mode="json") == before
        assert after.delivery_count == 1
        assert await queue.reserve(work_pool_id=pool) is None

        clock = QueueClock(queue)
        clock.set(datetime.fromisoformat(before["lease_expires_at"]))
        redelivered = await queue.reserve(work_pool_id=pool)
        assert redelivered is not None
        assert redelivered.message_id == message_id
        assert redelivered.delivery_count == 2
        assert redelivered.reservation_token != before["reservation_token"]
        assert redelivered.lease_expires_at == clock.current + timedelta(seconds=30)
    finally:
        _forget_engine(db_path)


def test_a_second_process_gets_a_clear_error_naming_the_path(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEANUP_QUEUE_PATH", str(db_path))
    WorkerCleanupQueue()
    try:
        other = run(OPEN, db_path)
        assert other.returncode == 3, other.stderr
        assert str(db_path) in other.stdout
        assert "in use by another process" in other.stdout
    finally:
        _forget_engine(db_path)
