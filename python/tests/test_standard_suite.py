"""Prefect 3.9.1's own conformance suite, imported from the installed package, unmodified.

Its `queue` and `clock` fixtures come from conftest.py: a fresh database per test, on the
engine's manual clock.
"""

from prefect.testing.standard_test_suites import WorkerCleanupQueueStandardTestSuite


class TestDurableWorkerCleanupQueue(WorkerCleanupQueueStandardTestSuite):
    pass
