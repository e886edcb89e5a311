"""The engine's ceiling through the binding, without asyncio: N Python threads (the GIL is
released inside every native call) each loop enqueue -> reserve -> ack directly on
``cleanup_queue._native.Engine`` (default durability, fsync) for 3 s. Compare with the
``ours`` row of three_backends.py to split the plug-in's cost into engine and asyncio glue.

    python/.venv/bin/python python/bench/native_ceiling.py [threads ...]   # default 1 16 32
"""

import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from uuid import uuid4

scratch = tempfile.mkdtemp(prefix="native-ceiling-")
os.environ["CLEANUP_QUEUE_PATH"] = os.path.join(scratch, "db")

from cleanup_queue.prefect import _policy, open_engine  # noqa: E402

KIND = "cancelling_timeout_teardown.v1"


def run(engine, nthreads: int, seconds: float = 3.0) -> None:
    pool = str(uuid4())
    stop = time.perf_counter() + seconds
    counts = [0] * nthreads

    def worker(i: int) -> None:
        while time.perf_counter() < stop:
            m = str(uuid4())
            engine.enqueue(m, f"bench-{m}", pool, KIND, '{"flow_run_id":"x"}')
            reservation, _, _ = engine.reserve(pool)
            message, token, _ = reservation
            engine.ack(pool, message[0], token)
            counts[i] += 1

    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    n = sum(counts)
    user, sys_ = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    print(
        f"{nthreads:2d} threads: {n / elapsed:7.0f} cycles/s  user {user / n * 1e6:5.0f} µs/cycle"
        f"  sys {sys_ / n * 1e6:5.0f} µs/cycle  CPUs busy {(user + sys_) / elapsed:.2f}",
        flush=True,
    )


def main() -> None:
    engine = open_engine()
    engine.set_policy(*_policy())
    try:
        for n in [int(a) for a in sys.argv[1:]] or [1, 16, 32]:
            run(engine, n)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
