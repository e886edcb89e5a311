"""A durable, embedded storage module for Prefect's worker cleanup queue.

Point Prefect at it with
``PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE=cleanup_queue.prefect``.
The Prefect class lives in :mod:`cleanup_queue.prefect`; this package root only exposes
the native engine and its exception type, so importing it does not import Prefect.
"""

from cleanup_queue._native import CleanupQueueError, Engine

__all__ = ["CleanupQueueError", "Engine"]
