"""Replicas on PostgreSQL (not a test): the gateway on SQLite and on PostgreSQL, side by side in one run.

    python bench/replicas.py [--rounds 3] [--requests 200] [--seconds 3] [--passes 2] [--concurrency 16]
                             [--reserve-samples 2000] [--hot-seconds 3] [--hot-reps 3]
                             [--threads 1,4,16] [--processes 2,4,8] [--only e2e,reserve,hot]

Every server is its own process on loopback: the replay upstream (`iapo replay`, synthetic MV task), a
throwaway PostgreSQL cluster (`sandbox.postgres`, but with PostgreSQL's default durability: fsync on,
synchronous_commit on; the sandbox turns fsync off for tests), and four gateway processes (`iapo
serve`, one worker each, default config otherwise): one on a SQLite file, one on a PostgreSQL
database, and three on one other PostgreSQL database. The route serves N=1 and the caller's tier has
a per-day dollar cap that never binds, so every request reserves its worst case and settles it, on one
cap row that all three replicas share.

1. End to end (`--rounds` rounds, everything interleaved in each round), with the load client of
   `bench/overhead.py` (aiohttp; its `latency` and `throughput`):
   - latency: `--requests` sequential requests per target and replica, interleaved request by request
     (order shuffled per sweep); "3 on PostgreSQL" is asked once per replica per sweep and its samples
     pooled; added = the target's p50/p99 minus direct's (straight to the replay upstream) that round;
   - throughput: a closed loop of `--concurrency` clients, `--passes` slices of `--seconds` per
     target, targets rotated slice by slice; for "3 on PostgreSQL" the clients are split over the
     three ports (no load balancer: the client spreads the load);
   - CPU per request: user + system CPU of the target's gateway processes (/proc/<pid>/stat, all
     threads) over the slice, divided by the requests answered; the PostgreSQL server's CPU (the
     postmaster and all its backends) separately. These do not depend on how many cores the machine
     has; req/s does.
2. Reservation latency: an in-process harness calls `SpendLedger.reserve` and `settle` back to back on
   one cap, one thread, against a SQLite file and a PostgreSQL database (and one with
   `synchronous_commit = off`), `--reserve-samples` pairs per backend per round; p50/p99 of each call.
3. Hot-cap ceiling: T threads in this process, or P processes, each with its own store handle,
   reserving and settling on ONE cap row as fast as they can for `--hot-seconds` (all start together,
   after a barrier that each passes once its store is open); reservations/s (each one reserved and
   settled), medians of `--hot-reps` repetitions, each on a fresh database.

Writes bench/results/replicas.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the load client, process handling and CPU accounting of the overhead benchmark, as they are there
from bench.overhead import (
    CLK_TCK,
    KEY,
    MESSAGES,
    latency,
    med,
    own_cpu,
    start,
    stop,
    throughput,
)
from sandbox.postgres import PostgresCluster
from sandbox.servers import free_port

TARGETS = ("1 on SQLite", "1 on PostgreSQL", "3 on PostgreSQL")
HOT_CAP_DOLLARS = 1e12
PER_COMPLETION = (0.012, 1200)  # the worst case the bench route reserves per completion ($, tokens)
SETTLED = (0.0075, 750)  # what a replay completion costs on average


class DurableCluster(PostgresCluster):
    """The sandbox's throwaway cluster with PostgreSQL's default durability: every commit is fsynced
    (the sandbox starts the server with fsync=off, which suits tests and would flatter this benchmark)."""

    def _cmd(self, *args: str) -> list[str]:
        args_ = list(args)
        if "fsync=off" in args_:
            at = args_.index("fsync=off")
            del args_[at - 1:at + 1]  # the "-c" before it too
        return super()._cmd(*args_)

    def setting(self, url: str, name: str) -> str:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            return conn.execute(f"SHOW {name}").fetchone()[0]

    def create_async_database(self) -> str:
        """A database whose sessions default to synchronous_commit = off (a crash of the server can lose
        the last commits, as a power loss can with SQLite's synchronous=NORMAL)."""
        import psycopg

        url = self.create_database()
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
        return url


# -- CPU of the database server ----------------------------------------------------------------------
def tree_cpu(root: int) -> float:
    """User + system CPU seconds of a process and all its live descendants. PostgreSQL's backends each
    start a session of their own, so the postmaster's process group (`group_cpu`) does not hold them."""
    parent, cpu = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)], cpu[int(entry)] = int(stat[1]), (int(stat[11]) + int(stat[12])) / CLK_TCK
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


def gateway_config(upstream: str, store_url: str) -> dict:
    from gateway.config import hash_key
    from policies.environments import synthetic_mv
    from sandbox.demo import replay_route, replay_upstream

    route = replay_route("bench", "replay", synthetic_mv(0), base_url=upstream, env_name="replay-mv",
                         start={"default": {"prompt": "p3", "n": 1}})
    return {"upstreams": {"replay": replay_upstream(upstream, "replay-mv")},
            "routes": [route],
            "tiers": [{"name": "capped", "caps": {"per_day": {"dollars": 1e9}}}],  # never binds: every request reserves
            "api_keys": [{"hash": hash_key(KEY), "tier": "capped", "name": "bench"}],
            "store": {"url": store_url}}


# -- end to end -----------------------------------------------------------------------------------------
async def spread_throughput(urls: list[str], body: dict, seconds: float, concurrency: int, pgids: list[int],
                            db_pid: int, all_pgids: list[int]) -> dict:
    """One slice of `bench.overhead.throughput` per replica at once (the closed loop's clients split over
    the replicas: the client spreads the load, no load balancer), plus the PostgreSQL server's CPU."""
    db0, client0 = tree_cpu(db_pid), own_cpu()
    shares = [concurrency // len(urls) + (i < concurrency % len(urls)) for i in range(len(urls))]
    parts = await asyncio.gather(*(throughput(url, body, seconds, share, pgid, all_pgids)
                                   for url, share, pgid in zip(urls, shares, pgids)))
    elapsed = max(p["seconds"] for p in parts)
    db = tree_cpu(db_pid) - db0
    # each part counts every other process as "other"; the database server is this benchmark's
    other = max(0.0, float(np.mean([p["other_cores"] for p in parts])) - db / (elapsed + 0.5))
    return {"requests": sum(p["requests"] for p in parts), "errors": sum(p["errors"] for p in parts),
            "seconds": elapsed, "gateway_cpu_s": sum(p["cpu_s"] for p in parts), "db_cpu_s": db,
            "client_cpu_s": own_cpu() - client0, "other_cores": other}


def combine(slices: list[dict]) -> dict:
    done = sum(s["requests"] for s in slices)
    per_request = {f"{part}_cpu_ms_per_request": sum(s[f"{part}_cpu_s"] for s in slices) / done * 1e3 if done else None
                   for part in ("gateway", "db", "client")}
    return {"requests": done, "errors": sum(s["errors"] for s in slices),
            "rps": done / sum(s["seconds"] for s in slices), **per_request,
            "other_cores": float(np.mean([s["other_cores"] for s in slices])),
            "slices_rps": [round(s["requests"] / s["seconds"], 1) for s in slices]}


# -- the ledger in process ------------------------------------------------------------------------------
def reserve_latency(url: str, samples: int) -> dict:
    """One thread: reserve then settle on one cap, `samples` times; seconds inside each call."""
    from policies.budget import Cap
    from store.database import open_database
    from store.spend import SpendLedger

    ledger = SpendLedger(open_database(url))
    caps = [Cap(f"tier:lat-{uuid.uuid4().hex[:6]}", "per_day", dollars=HOT_CAP_DOLLARS)]
    reserve, settle = [], []
    for k in range(samples + 50):
        t0 = time.perf_counter()
        r = ledger.reserve(caps, 1, *PER_COMPLETION, allow_fewer=False, owner="bench", expires_at=time.time() + 60)
        t1 = time.perf_counter()
        ledger.settle(r, *SETTLED)
        t2 = time.perf_counter()
        if k >= 50:  # warm-up
            reserve.append(t1 - t0)
            settle.append(t2 - t1)
    return {"reserve": np.array(reserve), "settle": np.array(settle)}


def hot_loop(url: str, scope: str, seconds: float, barrier) -> dict:
    """Reserve + settle on one cap row for `seconds`, from when every worker has passed `barrier` (each
    has opened its store and booked one reservation first: spawned interpreters take seconds to import)."""
    from policies.budget import Cap
    from store.database import open_database
    from store.errors import StoreUnavailable
    from store.spend import SpendLedger

    ledger = SpendLedger(open_database(url))
    caps = [Cap(scope, "per_day", dollars=HOT_CAP_DOLLARS)]
    ledger.settle(ledger.reserve(caps, 1, *PER_COMPLETION, allow_fewer=False, owner="warm-up"), *SETTLED)
    barrier.wait(300)
    began = time.perf_counter()
    stop_at = began + seconds
    count = errors = 0
    lat = []
    while time.perf_counter() < stop_at:
        try:
            t0 = time.perf_counter()
            r = ledger.reserve(caps, 1, *PER_COMPLETION, allow_fewer=False, owner="hot", expires_at=time.time() + 60)
            lat.append(time.perf_counter() - t0)
            ledger.settle(r, *SETTLED)
            count += 1
        except StoreUnavailable:
            errors += 1
    return {"count": count, "errors": errors, "reserve_s": lat, "seconds": time.perf_counter() - began}


def _hot_process(url: str, scope: str, seconds: float, barrier, out) -> None:
    result = hot_loop(url, scope, seconds, barrier)
    result["reserve_s"] = result["reserve_s"][:: max(1, len(result["reserve_s"]) // 2000)]
    out.put(result)


def hot_cap(url: str, mode: str, workers: int, seconds: float) -> dict:
    """`workers` threads (in this process) or processes on one cap row; reservations/s over `seconds`
    (every worker's count over the longest worker's time: a worker finishes its last call after `seconds`)."""
    scope = f"tier:hot-{uuid.uuid4().hex[:8]}"
    results: list[dict] = []
    if mode == "threads":
        barrier = threading.Barrier(workers)

        def run() -> None:
            results.append(hot_loop(url, scope, seconds, barrier))
        threads = [threading.Thread(target=run) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        ctx = multiprocessing.get_context("spawn")
        out, barrier = ctx.Queue(), ctx.Barrier(workers)
        procs = [ctx.Process(target=_hot_process, args=(url, scope, seconds, barrier, out)) for _ in range(workers)]
        for p in procs:
            p.start()
        results = [out.get(timeout=seconds + 600) for _ in procs]
        for p in procs:
            p.join(30)
    lat = np.concatenate([np.array(r["reserve_s"]) for r in results]) if results else np.array([])
    count = sum(r["count"] for r in results)
    elapsed = max(r["seconds"] for r in results)
    return {"reservations_per_s": count / elapsed, "errors": sum(r["errors"] for r in results),
            "reserve_p50_ms": float(np.percentile(lat, 50) * 1e3) if len(lat) else None,
            "reserve_p99_ms": float(np.percentile(lat, 99) * 1e3) if len(lat) else None,
            "finished_late_s": round(elapsed - seconds, 3)}


# -- report ---------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="e2e,reserve,hot", help="which parts to run (a partial run updates its parts)")
    parser.add_argument("--rounds", type=int, default=3, help="end-to-end and reservation-latency repetitions")
    parser.add_argument("--requests", type=int, default=200, help="latency samples per target (replica) per round")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients, split over a target's replicas")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of one throughput slice")
    parser.add_argument("--passes", type=int, default=2, help="throughput slices per target per round")
    parser.add_argument("--reserve-samples", type=int, default=2000)
    parser.add_argument("--hot-seconds", type=float, default=3.0)
    parser.add_argument("--hot-reps", type=int, default=3)
    parser.add_argument("--threads", default="1,4,16")
    parser.add_argument("--processes", default="2,4,8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "replicas.json"))
    args = parser.parse_args()
    parts = set(args.only.split(","))
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="iapo-replicas-"))
    started, load_at_start = time.time(), os.getloadavg()
    cluster = DurableCluster().start()
    procs: dict[str, subprocess.Popen] = {}
    report: dict = {}
    try:
        db = {"pg-1": cluster.create_database(), "pg-3": cluster.create_database(),
              "lat": cluster.create_database(), "lat-async": cluster.create_async_database()}
        durability = {"fsync": cluster.setting(db["pg-1"], "fsync"),
                      "synchronous_commit": cluster.setting(db["pg-1"], "synchronous_commit"),
                      "synchronous_commit (async database)": cluster.setting(db["lat-async"], "synchronous_commit"),
                      "wal_sync_method": cluster.setting(db["pg-1"], "wal_sync_method"),
                      "server_version": cluster.setting(db["pg-1"], "server_version"),
                      "sqlite": "WAL, synchronous=NORMAL (a commit is not fsynced; a crash of the process loses "
                                "nothing, a power loss can lose the last commits)"}
        print("PostgreSQL:", durability, flush=True)
        report["settings"] = {
            "rounds": args.rounds, "latency_requests_per_target_per_round": args.requests,
            "throughput_seconds_per_slice": args.seconds, "throughput_slices_per_target_per_round": args.passes,
            "concurrency": args.concurrency, "reserve_samples_per_backend_per_round": args.reserve_samples,
            "hot_seconds": args.hot_seconds, "hot_reps": args.hot_reps, "cpus": os.cpu_count(),
            "python": platform.python_version(), "postgres": durability, "load_average_at_start": load_at_start,
            "route": "N=1 (one upstream call per request), tier with a per_day dollar cap that never binds"}

        if "e2e" in parts:
            up_port = free_port()
            upstream = f"http://127.0.0.1:{up_port}"
            procs["replay"] = start([sys.executable, "-m", "gateway.cli", "replay", "--env", "replay-mv=synthetic-mv",
                                     "--port", str(up_port)], f"{upstream}/v1/models", work / "replay.log")
            stores = {"1 on SQLite": (str(work / "iapo.db"), 1), "1 on PostgreSQL": (db["pg-1"], 1),
                      "3 on PostgreSQL": (db["pg-3"], 3)}
            urls: dict[str, list[str]] = {}
            gateway_pgids: dict[str, list[int]] = {}
            for t, (name, (store_url, count)) in enumerate(stores.items()):
                config = work / f"gateway{t}.yaml"
                config.write_text(yaml.safe_dump(gateway_config(upstream, store_url)))
                urls[name], gateway_pgids[name] = [], []
                for k in range(count):
                    port = free_port()
                    proc = start([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port",
                                  str(port)], f"http://127.0.0.1:{port}/healthz", work / f"gateway{t}-{k}.log")
                    procs[f"{name} #{k}"] = proc
                    urls[name].append(f"http://127.0.0.1:{port}/v1/chat/completions")
                    gateway_pgids[name].append(proc.pid)
            body = {"model": "bench", "messages": MESSAGES}
            # `bench.overhead.latency` takes one URL per target: a target of several replicas is one target
            # per replica there (each sweep then asks each replica once) and its samples are pooled here
            lat_targets = {"direct": (f"{upstream}/v1/chat/completions", {"model": "replay-mv", "messages": MESSAGES})}
            for name in TARGETS:
                lat_targets.update({f"{name} #{k}": (url, body) for k, url in enumerate(urls[name])})
            all_pgids = [p.pid for p in procs.values()]
            rounds = []
            for k in range(args.rounds):
                print(f"round {k + 1}/{args.rounds}: latency", flush=True)
                per_url = asyncio.run(latency(lat_targets, args.requests, rng))
                times = {"direct": per_url["direct"],
                         **{name: np.concatenate([v for key, v in per_url.items() if key.startswith(f"{name} #")])
                            for name in TARGETS}}
                d50, d99 = (float(np.percentile(times["direct"], q) * 1e3) for q in (50, 99))
                lat = {}
                for name, t in times.items():
                    p50, p99 = float(np.percentile(t, 50) * 1e3), float(np.percentile(t, 99) * 1e3)
                    lat[name] = {"p50_ms": p50, "p99_ms": p99, "added_p50_ms": p50 - d50, "added_p99_ms": p99 - d99}
                    print(f"  {name}: p50 {p50:.2f} ms (+{p50 - d50:.2f}), p99 {p99:.2f} ms (+{p99 - d99:.2f})",
                          flush=True)
                print(f"round {k + 1}/{args.rounds}: throughput", flush=True)
                slices: dict[str, list[dict]] = {name: [] for name in TARGETS}
                for one_pass in range(args.passes):
                    shift = (k * args.passes + one_pass) % len(TARGETS)
                    for name in TARGETS[shift:] + TARGETS[:shift]:
                        slices[name].append(asyncio.run(spread_throughput(
                            urls[name], body, args.seconds, args.concurrency, gateway_pgids[name],
                            cluster.process.pid, all_pgids)))
                tp = {name: combine(s) for name, s in slices.items()}
                for name, f in tp.items():
                    print(f"  {name}: {f['rps']:.0f} req/s, gateway {f['gateway_cpu_ms_per_request']:.2f} CPU ms/req, "
                          f"PostgreSQL {f['db_cpu_ms_per_request']:.2f} CPU ms/req, errors {f['errors']} "
                          f"(other processes: {f['other_cores']:.2f} cores)", flush=True)
                rounds.append({"latency": lat, "throughput": tp, "load_average_after": os.getloadavg()})
            targets = {"direct": {"p50_ms": med(r["latency"]["direct"]["p50_ms"] for r in rounds),
                                  "p99_ms": med(r["latency"]["direct"]["p99_ms"] for r in rounds)}}
            for name in TARGETS:
                targets[name] = {
                    "replicas": len(urls[name]),
                    **{key: med(r["latency"][name][key] for r in rounds)
                       for key in ("p50_ms", "p99_ms", "added_p50_ms", "added_p99_ms")},
                    **{key: med(r["throughput"][name][key] for r in rounds)
                       for key in ("rps", "gateway_cpu_ms_per_request", "db_cpu_ms_per_request",
                                   "client_cpu_ms_per_request")},
                    "errors": int(sum(r["throughput"][name]["errors"] for r in rounds)),
                    "other_cores_during_slices": [round(r["throughput"][name]["other_cores"], 2) for r in rounds]}
            report["end_to_end"] = targets
            report["end_to_end_rounds"] = rounds
            for name in list(procs):
                if name != "replay":
                    stop(procs.pop(name))
            stop(procs.pop("replay"))

        if "reserve" in parts:
            backends = {"SQLite": str(work / "ledger.db"), "PostgreSQL": db["lat"],
                        "PostgreSQL, synchronous_commit=off": db["lat-async"]}
            per_round: dict[str, list[dict]] = {name: [] for name in backends}
            for k in range(args.rounds):
                for name, url in backends.items():
                    m = reserve_latency(url, args.reserve_samples)
                    figures = {f"{call}_{q}_ms": float(np.percentile(m[call], q) * 1e3)
                               for call in ("reserve", "settle") for q in (50, 99)}
                    per_round[name].append(figures)
                    print(f"reservation latency, {name}: reserve p50 {figures['reserve_50_ms']:.3f} ms, "
                          f"p99 {figures['reserve_99_ms']:.3f} ms; settle p50 {figures['settle_50_ms']:.3f} ms",
                          flush=True)
            report["reservation_latency"] = {
                name: {key: med(r[key] for r in rounds_) for key in rounds_[0]} | {"rounds": rounds_}
                for name, rounds_ in per_round.items()}

        if "hot" in parts:
            backends = {"SQLite": None, "PostgreSQL": None, "PostgreSQL, synchronous_commit=off": None}
            configs = [("threads", int(t)) for t in args.threads.split(",")] + \
                      [("processes", int(p)) for p in args.processes.split(",")]
            hot: dict[str, dict] = {}
            for name in backends:
                hot[name] = {}
                for mode, workers in configs:
                    reps = []
                    for _ in range(args.hot_reps):
                        # a fresh store per repetition: every run starts from the same table sizes
                        url = (str(work / f"hot-{uuid.uuid4().hex[:6]}.db") if name == "SQLite"
                               else cluster.create_async_database() if "off" in name else cluster.create_database())
                        from store.database import open_database

                        open_database(url)  # the schema, before the workers race for it
                        reps.append(hot_cap(url, mode, workers, args.hot_seconds))
                    label = f"{workers} {mode}"
                    hot[name][label] = {"reservations_per_s": med(r["reservations_per_s"] for r in reps),
                                        "reserve_p50_ms": med(r["reserve_p50_ms"] for r in reps),
                                        "reserve_p99_ms": med(r["reserve_p99_ms"] for r in reps),
                                        "errors": sum(r["errors"] for r in reps),
                                        "reps": [round(r["reservations_per_s"], 1) for r in reps]}
                    print(f"hot cap, {name}, {label}: {hot[name][label]['reservations_per_s']:.0f} reservations/s "
                          f"{hot[name][label]['reps']} (reserve p50 {hot[name][label]['reserve_p50_ms']:.2f} ms)",
                          flush=True)
            report["hot_cap"] = hot
            report["hot_cap_ceiling"] = {name: max(v["reservations_per_s"] for v in rows.values())
                                         for name, rows in hot.items()}
        report["settings"]["load_average_at_end"] = os.getloadavg()
        report["settings"]["seconds"] = round(time.time() - started, 1)
        out = Path(args.out)
        if out.exists() and parts != {"e2e", "reserve", "hot"}:  # a partial run updates its parts only
            report = {**json.loads(out.read_text()), **report}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        print(json.dumps({k: v for k, v in report.items() if k not in ("end_to_end_rounds",)}, indent=1))
    finally:
        for proc in procs.values():
            stop(proc)
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
