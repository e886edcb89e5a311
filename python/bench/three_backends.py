"""Cross-backend comparison of Prefect worker cleanup queue storages (issue 6).

Runs, in one process and one event loop, the same workload against:

- ``memory``    Prefect 3.9.1's default in-memory backend (not durable);
- ``redis``     prefect-redis, Redis without persistence (``appendonly no``, no RDB);
- ``redis-prefix`` the same, but the instance is given its (default) key prefix, so it does
                not rebuild its pydantic-settings object for every key name as the stock
                instance Prefect creates does: what prefect-redis costs once that is cached;
- ``redis-aof`` prefect-redis, Redis with ``appendonly yes`` + ``appendfsync everysec``
                (set with CONFIG SET on the same server for that backend only);
- ``ours``      ``cleanup_queue.prefect`` (this repository), default durability (fsync
                before every call returns), a fresh database directory per measurement.

Every backend is obtained the way the Prefect server obtains it: through
``get_worker_cleanup_queue()`` with ``PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE``
set in Prefect's settings context; the policy comes from Prefect's default settings.

Measurements (each starts from a fresh state: memory ``clear()``, Redis ``FLUSHALL``, ours a
new directory, so a new engine):

- ``cycles``: N concurrent asyncio tasks (N = 1 and 16) on one shared pool, each looping
  enqueue -> reserve -> ack; cycles/s over ``--duration`` s after ``--warmup`` s.
- ``latency``: sequential reserve and reserve+ack at backlog 0 (one message enqueued,
  untimed, before each timed pair) and at a backlog of ``--backlog`` (enqueued first by 16
  tasks, then ``--samples`` reserve+ack pairs), plus an empty reserve (nothing visible)
  with and without the backlog present in another pool.

Usage (Redis must be listening; see BENCHMARKS.md):

    python/.venv/bin/python python/bench/three_backends.py --redis-port 6399 \
        --rounds 2 --json python/bench/results.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID, uuid4

MEMORY = "prefect.server.worker_communication.cleanup_queue.memory"
REDIS = "prefect_redis.cleanup_queue"
OURS = "cleanup_queue.prefect"
MODULES = {
    "memory": MEMORY,
    "redis": REDIS,
    "redis-prefix": REDIS,
    "redis-aof": REDIS,
    "ours": OURS,
}
KIND = "cancelling_timeout_teardown.v1"


def _setup_env(args: argparse.Namespace) -> str:
    """Environment that must be in place before Prefect is imported."""
    home = tempfile.mkdtemp(prefix="three-backends-home-")
    os.environ["PREFECT_HOME"] = home
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_SERVER_LEVEL", "WARNING")
    os.environ["PREFECT_REDIS_WORKER_CLEANUP_QUEUE_HOST"] = args.redis_host
    os.environ["PREFECT_REDIS_WORKER_CLEANUP_QUEUE_PORT"] = str(args.redis_port)
    return home


class Backend:
    """One storage module plus the means to give it a fresh state."""

    def __init__(self, name: str, scratch: str) -> None:
        self.name = name
        self.module = MODULES[name]
        self.scratch = scratch
        self.queue: Any = None
        self._path: str | None = None
        self._runs = 0

    async def fresh(self) -> Any:
        from prefect.server.worker_communication.cleanup_queue import (
            get_worker_cleanup_queue,
        )
        from prefect.settings import (
            PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE,
            temporary_settings,
        )

        await self.close()
        if self.name == "ours":
            # Engines are cached per path: a new path per run is a new engine.
            self._runs += 1
            self._path = os.path.join(self.scratch, f"ours-{self._runs}")
            os.environ["CLEANUP_QUEUE_PATH"] = self._path
        with temporary_settings(
            {PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE: self.module}
        ):
            queue = get_worker_cleanup_queue()
        if self.name == "memory":
            queue.clear()
        elif self.name.startswith("redis"):
            client = queue._client()
            await client.flushall()
            if self.name == "redis-prefix":
                queue._key_prefix = _redis_default_prefix()
            aof = "yes" if self.name == "redis-aof" else "no"
            await client.config_set("appendonly", aof)
            await client.config_set("appendfsync", "everysec")
            # Switching AOF on starts a rewrite; let it finish before measuring.
            for _ in range(200):
                info = await client.info("persistence")
                if not info.get("aof_rewrite_in_progress") and not info.get(
                    "aof_rewrite_scheduled"
                ):
                    break
                await asyncio.sleep(0.05)
        self.queue = queue
        return queue

    async def close(self) -> None:
        queue, self.queue = self.queue, None
        if queue is None:
            return
        if self.name.startswith("redis"):
            client = queue._redis_client
            if client is not None:
                await client.aclose()
        elif self.name == "ours" and self._path is not None:
            from cleanup_queue.prefect import _forget_engine

            _forget_engine(self._path)
            del queue
            gc.collect()
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None

    async def durability(self) -> str:
        if self.name == "memory":
            return "none (process memory)"
        if self.name == "redis":
            return "none (appendonly no, no RDB)"
        if self.name == "redis-aof":
            return "AOF, fsync every second"
        if self.name == "redis-prefix":
            return "none (appendonly no, no RDB)"
        mode = os.environ.get("CLEANUP_QUEUE_DURABILITY") or "fsync"
        return {
            "fsync": "fsync before each call returns",
            "flush": "log flushed to the OS before each call returns",
        }.get(mode, f"{mode} (background flush; calls run inline on the loop)")


def _redis_default_prefix() -> str:
    from prefect_redis.cleanup_queue import RedisWorkerCleanupQueueSettings

    return RedisWorkerCleanupQueueSettings().key_prefix


def _filler_queue(backend: Backend, queue: Any) -> Any:
    """The instance that builds the backlog. Stock prefect-redis re-reads its settings
    (a pydantic-settings object) on every key name and fills 50k messages at ~130/s here;
    the backlog is therefore written by an instance given the same key prefix explicitly
    (same keys, same data, same server), and only the timed calls use the stock one."""
    if backend.name in ("redis", "redis-aof"):
        return type(queue)(redis_client=queue._client(), key_prefix=_redis_default_prefix())
    return queue


async def _enqueue(queue: Any, pool: UUID) -> UUID:
    message_id = uuid4()
    await queue.enqueue(
        message_id=message_id,
        idempotency_key=f"bench-{message_id}",
        work_pool_id=pool,
        kind=KIND,
        target={"flow_run_id": str(uuid4())},
    )
    return message_id


async def _reserve_ack(queue: Any, pool: UUID) -> bool:
    reservation = await queue.reserve(work_pool_id=pool)
    if reservation is None:
        return False
    result = await queue.ack(
        work_pool_id=pool,
        message_id=reservation.message_id,
        reservation_token=reservation.reservation_token,
    )
    if result.status != "accepted":
        raise RuntimeError(f"ack returned {result.status}")
    return True


async def cycles(
    backend: Backend, tasks: int, warmup: float, duration: float
) -> dict[str, Any]:
    queue = await backend.fresh()
    pool = uuid4()
    # Deadlines, not a timer task: Prefect's in-memory backend never suspends when its
    # lock is free, so a task looping on it would starve any timer. Each worker counts the
    # cycles it completes inside [start + warmup, start + warmup + duration).
    start = time.perf_counter()
    t0, t1 = start + warmup, start + warmup + duration
    done = 0
    total = 0
    misses = 0
    errors = 0

    async def worker() -> None:
        nonlocal done, total, misses, errors
        while True:
            now = time.perf_counter()
            if now >= t1:
                return
            try:
                await _enqueue(queue, pool)
                reserved = await _reserve_ack(queue, pool)
            except RuntimeError:
                # prefect-redis gives up after 20 WATCH conflicts under contention
                # ("... transaction failed."); counted, not a cycle.
                errors += 1
                continue
            if reserved:
                total += 1
                now = time.perf_counter()
                if t0 <= now < t1:
                    done += 1
            else:
                misses += 1

    cpu0, loop0 = time.process_time(), time.thread_time()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    elapsed = time.perf_counter() - start
    cpu1, loop1 = time.process_time(), time.thread_time()
    rate = done / duration
    return {
        "tasks": tasks,
        "cycles": done,
        "seconds": duration,
        "cycles_per_s": rate,
        "mean_cycle_ms": tasks / rate * 1e3 if rate else None,
        "process_cpu_per_cycle_us": (cpu1 - cpu0) / total * 1e6 if total else None,
        "process_cpu_share": (cpu1 - cpu0) / elapsed,
        # The event loop's own thread: how busy it was, and its CPU per cycle.
        "loop_busy": (loop1 - loop0) / elapsed,
        "loop_cpu_per_cycle_us": (loop1 - loop0) / total * 1e6 if total else None,
        "empty_reserves": misses,
        "transaction_failures": errors,
    }


async def _timed(fn: Callable[[], Awaitable[Any]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


def _summary(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "n": len(s),
        "p50_us": s[len(s) // 2] * 1e6,
        "p99_us": s[min(len(s) - 1, int(len(s) * 0.99))] * 1e6,
        "mean_us": statistics.fmean(s) * 1e6,
    }


async def _reserve_ack_timed(queue: Any, pool: UUID) -> tuple[float, float]:
    t0 = time.perf_counter()
    reservation = await queue.reserve(work_pool_id=pool)
    t1 = time.perf_counter()
    if reservation is None:
        raise RuntimeError("reserve found nothing with a backlog present")
    result = await queue.ack(
        work_pool_id=pool,
        message_id=reservation.message_id,
        reservation_token=reservation.reservation_token,
    )
    t2 = time.perf_counter()
    if result.status != "accepted":
        raise RuntimeError(f"ack returned {result.status}")
    return t1 - t0, t2 - t0


async def latency(backend: Backend, backlog: int, samples: int) -> dict[str, Any]:
    queue = await backend.fresh()
    pool = uuid4()
    out: dict[str, Any] = {}

    # Backlog 0: one message, untimed, before each timed reserve+ack.
    reserve0, pair0, empty0 = [], [], []
    for _ in range(samples):
        await _enqueue(queue, pool)
        r, p = await _reserve_ack_timed(queue, pool)
        reserve0.append(r)
        pair0.append(p)
    for _ in range(samples):
        empty0.append(await _timed(lambda: queue.reserve(work_pool_id=pool)))
    out["reserve_b0"] = _summary(reserve0)
    out["reserve_ack_b0"] = _summary(pair0)
    out["empty_reserve_b0"] = _summary(empty0)

    # Backlog: 16 tasks enqueue `backlog` messages into the pool.
    remaining = backlog
    fill_queue = _filler_queue(backend, queue)
    out["fill_instance"] = "stock" if fill_queue is queue else "key_prefix given"

    async def filler() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await _enqueue(fill_queue, pool)

    t0 = time.perf_counter()
    await asyncio.gather(*(filler() for _ in range(16)))
    fill = time.perf_counter() - t0
    out["fill"] = {"messages": backlog, "seconds": fill, "enqueues_per_s": backlog / fill}

    reserve_n, pair_n = [], []
    for _ in range(samples):
        r, p = await _reserve_ack_timed(queue, pool)
        reserve_n.append(r)
        pair_n.append(p)
    out["reserve_bN"] = _summary(reserve_n)
    out["reserve_ack_bN"] = _summary(pair_n)
    other = uuid4()
    empty_n = [
        await _timed(lambda: queue.reserve(work_pool_id=other)) for _ in range(samples)
    ]
    out["empty_reserve_other_pool_bN"] = _summary(empty_n)
    out["backlog"] = backlog
    for key in ("reserve", "reserve_ack"):
        out[f"{key}_growth"] = out[f"{key}_bN"]["p50_us"] / out[f"{key}_b0"]["p50_us"]
    return out


def _load() -> list[float]:
    return list(os.getloadavg())


async def run(args: argparse.Namespace, scratch: str) -> dict[str, Any]:
    import prefect

    names = args.backends
    backends = {name: Backend(name, scratch) for name in names}
    rounds: list[dict[str, Any]] = []
    for index in range(args.rounds):
        # Alternate the order so that no backend always runs first or last.
        order = names if index % 2 == 0 else list(reversed(names))
        result: dict[str, Any] = {"round": index + 1, "order": order, "backends": {}}
        for name in order:
            backend = backends[name]
            entry: dict[str, Any] = {
                "module": backend.module,
                "durability": await backend.durability(),
                "load_before": _load(),
                "cycles": {},
            }
            for tasks in args.tasks:
                entry["cycles"][str(tasks)] = await cycles(
                    backend, tasks, args.warmup, args.duration
                )
                done = entry["cycles"][str(tasks)]
                loop_cpu = done["loop_cpu_per_cycle_us"] or 0.0
                print(
                    f"round {index + 1} {name:9s} tasks={tasks:2d} "
                    f"{done['cycles_per_s']:9.0f} cycles/s  "
                    f"loop busy {done['loop_busy']:.2f}, {loop_cpu:.0f} µs/cycle  "
                    f"load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
            if index == 0 and name not in args.no_latency:
                entry["latency"] = await latency(backend, args.backlog, args.samples)
                lat = entry["latency"]
                print(
                    f"round 1 {name:9s} reserve+ack p50 {lat['reserve_ack_b0']['p50_us']:.0f} us"
                    f" -> {lat['reserve_ack_bN']['p50_us']:.0f} us at {args.backlog}"
                    f" (x{lat['reserve_ack_growth']:.2f}); fill {lat['fill']['enqueues_per_s']:.0f}/s",
                    flush=True,
                )
            entry["load_after"] = _load()
            await backend.close()
            result["backends"][name] = entry
        rounds.append(result)

    return {
        "prefect": prefect.__version__,
        "prefect_redis": _version("prefect-redis"),
        "redis_server": await _redis_version(args),
        "python": sys.version.split()[0],
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
        },
        "scratch_dir": scratch,
        "settings": {
            "tasks": args.tasks,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "backlog": args.backlog,
            "samples": args.samples,
        },
        "rounds": rounds,
        "summary": summarize(rounds, args),
    }


def summarize(rounds: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"cycles_per_s": {}, "ratios": {}}
    for tasks in map(str, args.tasks):
        per: dict[str, list[float]] = {}
        for r in rounds:
            for name, entry in r["backends"].items():
                per.setdefault(name, []).append(entry["cycles"][tasks]["cycles_per_s"])
        out["cycles_per_s"][tasks] = {
            name: {"mean": statistics.fmean(v), "min": min(v), "max": max(v), "rounds": v}
            for name, v in per.items()
        }
        ratios: dict[str, Any] = {}
        for peer in ("memory", "redis", "redis-prefix", "redis-aof"):
            if "ours" in per and peer in per:
                each = [o / p for o, p in zip(per["ours"], per[peer])]
                ratios[f"ours/{peer}"] = {
                    "per_round": each,
                    "min": min(each),
                    "mean": statistics.fmean(each),
                }
        out["ratios"][tasks] = ratios
    return out


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


async def _redis_version(args: argparse.Namespace) -> str | None:
    if not any(n.startswith("redis") for n in args.backends):
        return None
    from redis.asyncio import Redis

    client = Redis(host=args.redis_host, port=args.redis_port)
    try:
        return (await client.info("server"))["redis_version"]
    finally:
        await client.aclose()


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def print_table(report: dict[str, Any], args: argparse.Namespace) -> None:
    rounds = report["rounds"]
    names = args.backends
    print()
    header = "| backend | durability | " + " | ".join(
        f"{t} task{'s' if t > 1 else ''}, cycles/s" for t in args.tasks
    ) + " |"
    print(header)
    print("|" + "---|" * (2 + len(args.tasks)))
    for name in names:
        cells = []
        for t in map(str, args.tasks):
            s = report["summary"]["cycles_per_s"][t][name]
            per = " / ".join(f"{v:,.0f}" for v in s["rounds"])
            cells.append(f"{s['mean']:,.0f} ({per})")
        durability = rounds[0]["backends"][name]["durability"]
        print(f"| {name} | {durability} | " + " | ".join(cells) + " |")
    print()
    for t in map(str, args.tasks):
        for key, r in report["summary"]["ratios"][t].items():
            per = ", ".join(f"{v:.2f}" for v in r["per_round"])
            print(f"{t:>2} tasks  {key:15s} mean {r['mean']:.2f}x  min {r['min']:.2f}x  ({per})")
    lat_rows = [(n, rounds[0]["backends"][n].get("latency")) for n in names]
    lat_rows = [(n, l) for n, l in lat_rows if l]
    if lat_rows:
        backlog = lat_rows[0][1]["backlog"]
        print()
        print(
            f"| backend | reserve p50, backlog 0 | reserve p50, backlog {backlog:,} | "
            f"reserve+ack p50, 0 -> {backlog:,} | growth | empty reserve p50 (other pool at "
            f"0 / {backlog:,}) | fill, enqueues/s (16 tasks) |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, lat in lat_rows:
            print(
                f"| {name} | {lat['reserve_b0']['p50_us']:,.0f} µs | "
                f"{lat['reserve_bN']['p50_us']:,.0f} µs | "
                f"{lat['reserve_ack_b0']['p50_us']:,.0f} -> {lat['reserve_ack_bN']['p50_us']:,.0f} µs | "
                f"{lat['reserve_ack_growth']:.2f}x | "
                f"{lat['empty_reserve_b0']['p50_us']:,.0f} / {lat['empty_reserve_other_pool_bN']['p50_us']:,.0f} µs | "
                f"{lat['fill']['enqueues_per_s']:,.0f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backends", nargs="+", default=["memory", "redis", "redis-prefix", "redis-aof", "ours"],
        choices=sorted(MODULES),
    )
    parser.add_argument("--tasks", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--backlog", type=int, default=50_000)
    parser.add_argument("--samples", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--no-latency", nargs="*", default=["redis-aof"],
        help="backends whose latency part is skipped (default: redis-aof)",
    )
    parser.add_argument("--redis-host", default="127.0.0.1")
    parser.add_argument("--redis-port", type=int, default=6399)
    parser.add_argument("--scratch", default=None, help="parent of the temp directories (default: system temp, which must be a real disk for 'ours')")
    parser.add_argument("--json", default=None, help="write the full report here")
    args = parser.parse_args()

    home = _setup_env(args)
    scratch = tempfile.mkdtemp(prefix="three-backends-", dir=args.scratch)
    try:
        report = asyncio.run(run(args, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    report["command"] = " ".join([os.path.basename(sys.executable)] + sys.argv)
    print_table(report, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
