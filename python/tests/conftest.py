from __future__ import annotations

import os
import tempfile

# Keep Prefect's home (and so the default database path) out of the user's ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="cleanup-queue-prefect-home-"))

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from cleanup_queue.prefect import WorkerCleanupQueue, _forget_engine  # noqa: E402
from cleanup_queue.testing import QueueClock  # noqa: E402


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "cleanup-queue"


@pytest.fixture
def queue(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WorkerCleanupQueue]:
    monkeypatch.setenv("CLEANUP_QUEUE_PATH", str(db_path))
    monkeypatch.setenv("CLEANUP_QUEUE_MANUAL_CLOCK", "1")
    yield WorkerCleanupQueue()
    _forget_engine(db_path)


@pytest.fixture
def clock(queue: WorkerCleanupQueue) -> QueueClock:
    return QueueClock(queue)
