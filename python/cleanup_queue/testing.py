"""Test helpers: drive the engine's manual clock from Python.

Open the queue with ``CLEANUP_QUEUE_MANUAL_CLOCK=1`` in the environment (read when an engine
is first opened for a path), then wrap it: ``clock = QueueClock(queue)``. The clock starts at
the real time of opening and only moves when told to. It has what Prefect's standard suite
expects of its ``clock`` fixture: ``current`` (a UTC datetime) and ``advance(timedelta)``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cleanup_queue.prefect import WorkerCleanupQueue, from_micros, to_micros


class QueueClock:
    def __init__(self, queue: WorkerCleanupQueue) -> None:
        if not queue.engine.has_manual_clock:
            raise RuntimeError(
                "the queue's engine has no manual clock: "
                "set CLEANUP_QUEUE_MANUAL_CLOCK=1 before its database is first opened"
            )
        self._engine = queue.engine

    @property
    def current(self) -> datetime:
        return from_micros(self._engine.now_us())

    @current.setter
    def current(self, value: datetime) -> None:
        self.set(value)

    def set(self, value: datetime) -> None:
        self._engine.clock_set(to_micros(value))

    def advance(self, duration: timedelta) -> None:
        self._engine.clock_advance(duration // timedelta(microseconds=1))
