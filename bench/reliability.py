"""Regenerates bench/RELIABILITY.md (not a test): load held, faults injected, crash and drain, with
the store checked after each run; then the failure-semantics scenarios (issue 14): stuck reservations
after a kill -9, a disk that fills up under load (refuse and buffer), and a connection flood.
One command: `python bench/reliability.py [--seconds 15]` (about 9 minutes; `--only
crash-reservation,disk-full,flood` runs just those and keeps the other results in
bench/results/reliability.json; `--render` only rewrites RELIABILITY.md from that file). The
disk-full scenario mounts a tmpfs (root); elsewhere it limits the gateway's RLIMIT_FSIZE instead
(IAPO_FAILING_DISK=rlimit forces that).

The 10-minute soak is separate (it takes 10 minutes): `python bench/load.py --mix --soak 600 --rate 50`
writes bench/results/load-soak.json, which this script folds into the table when present.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import FailingDisk, Stack, check_store, drive  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def run_load(seconds: float, *, n: int = 1, transport: str = "litellm", mix: bool = False, workers: int = 1,
             faults: dict | None = None, concurrency: int = 32) -> dict:
    stack = Stack(n=n, workers=workers, transport=transport, mix=mix)
    try:
        if faults:
            stack.faults(**faults)
        result = asyncio.run(drive(stack.url, seconds=seconds, concurrency=concurrency, mix=mix))
        stack.kill_gateway(signal.SIGTERM)
        result["store"] = check_store(str(stack.work / "iapo.db"), result.pop("served"))
        return result
    finally:
        stack.stop()


def run_crash(seconds: float) -> dict:
    """kill -9 the gateway mid-load, restart it, and check what the store kept."""
    stack = Stack(n=4, workers=1, transport="litellm", mix=False, queue_size=10_000)
    try:
        async def load_and_kill():
            task = asyncio.create_task(drive(stack.url, seconds=seconds, concurrency=16, mix=False))
            await asyncio.sleep(seconds / 2)
            stack.kill_gateway(signal.SIGKILL)
            return await task
        result = asyncio.run(load_and_kill())
        stack.start_gateway()
        served = result.pop("served")
        store = check_store(str(stack.work / "iapo.db"), served)
        after = asyncio.run(drive(stack.url, seconds=2, concurrency=4, mix=False))
        result["store"] = store
        result["served_after_restart"] = after["ok"]
        return result
    finally:
        stack.stop()


# -- failure semantics (issue 14) ----------------------------------------------------------------------
HOUSEKEEPING_S = 5.0  # gateway.service.HOUSEKEEPING_SECONDS


def _reservations(db: str) -> dict[str, float]:
    """Reservation id -> expiry (unix seconds) of every reservation in the store."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        return dict(conn.execute("select id, max(expires) from reservations group by id").fetchall())
    finally:
        conn.close()


def run_crash_reservations(seconds: float) -> dict:
    """A capped tier under load; the upstream starts holding calls, kill -9 with requests in flight, restart.
    Counts the reservations the dead process left, right after the restart and until they are gone."""
    grace, timeout = 5.0, 10.0
    stack = Stack(n=4, workers=1, transport="litellm", mix=False, caps={"per_day": {"dollars": 1_000_000}},
                  store={"reservation_grace_seconds": grace}, upstream={"timeout": timeout})
    try:
        async def load_and_kill():
            stop = asyncio.Event()
            task = asyncio.create_task(drive(stack.url, seconds=seconds, concurrency=16, mix=False, stop=stop))
            await asyncio.sleep(seconds / 2)
            await asyncio.to_thread(stack.faults, latency_ms=8000)  # new calls hang: in flight at the kill
            deadline = time.monotonic() + 5
            while len(await asyncio.to_thread(_reservations, stack.db)) < 16 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            stack.kill_gateway(signal.SIGKILL)
            killed = time.time()
            stop.set()  # the clients stop with the process (no reconnect storm while it restarts)
            return await task, killed

        result, killed = asyncio.run(load_and_kill())
        stuck = _reservations(stack.db)
        stack.faults(latency_ms=0)
        stack.start_gateway()
        restart_s = time.time() - killed  # back up and serving, counted from the kill
        after_restart = len(set(stuck) & set(_reservations(stack.db)))
        served = result.pop("served")
        store = check_store(stack.db, served)
        after = asyncio.run(drive(stack.url, seconds=2, concurrency=4, mix=False))
        while set(stuck) & set(_reservations(stack.db)) and time.time() < max(stuck.values()) + HOUSEKEEPING_S + 30:
            time.sleep(0.25)
        left = len(set(stuck) & set(_reservations(stack.db)))
        return {**result, "store": store, "served_after_restart": after["ok"], "restart_s": restart_s,
                "stuck_at_kill": len(stuck), "stuck_after_restart": after_restart,
                "first_expiry_after_kill_s": min(stuck.values()) - killed if stuck else None,
                "last_expiry_after_kill_s": max(stuck.values()) - killed if stuck else None,
                "released_after_kill_s": time.time() - killed, "stuck_after_expiry": left,
                "released_metric": stack.metric("iapo_reservations_released_total"),
                "config": {"upstream_timeout_s": timeout, "reservation_grace_seconds": grace}}
    finally:
        stack.stop()


def run_disk_full(seconds: float, policy: str) -> dict:
    """The store's disk fills up a quarter into the load and is freed two thirds in; every 200 must have its
    rows once it recovers, every other answer must be a 503 that never reached the upstream."""
    folder = Path(tempfile.mkdtemp(prefix="iapo-disk-"))
    disk = FailingDisk(folder / "disk", size_mb=64)
    store_cfg = {"on_write_failure": policy}
    if policy == "buffer":
        store_cfg.update(queue_size=50, ack_timeout=1.0)
    stack = None
    try:
        stack = Stack(n=4, workers=1, transport="litellm", mix=False, store=store_cfg,
                      db_path=str(disk.folder / "iapo.db"))
        disk.pid = stack.gateway.pid
        calls_before = stack.upstream_calls()
        record: list[dict] = []
        seen: dict = {"queue_max": 0}

        async def watch():
            start = time.monotonic()
            await asyncio.sleep(seconds / 4)
            await asyncio.to_thread(disk.fail)
            seen["t_fail"] = time.monotonic()

            def failing_until() -> float:  # two thirds in, at least 3 s after /healthz saw it, 20 s at most
                if "t_detect" in seen:
                    return max(start + 2 * seconds / 3, seen["t_detect"] + 3)
                return start + 2 * seconds / 3 + 20
            while time.monotonic() < failing_until():
                code, health = await asyncio.to_thread(stack.health)
                seen["queue_max"] = max(seen["queue_max"], health["store"]["queue"])
                if "t_detect" not in seen and code == 503 and health["store"]["state"] == "failing":
                    seen["t_detect"] = time.monotonic()
                    seen["healthz_failing"] = health
                    seen["store_up_failing"] = await asyncio.to_thread(stack.metric, "iapo_store_up")
                await asyncio.sleep(0.1)
            await asyncio.to_thread(disk.recover)
            seen["t_recover"] = time.monotonic()
            while (await asyncio.to_thread(stack.health))[0] != 200:
                await asyncio.sleep(0.1)
            seen["t_ok"] = time.monotonic()
            seen["store_up_after"] = await asyncio.to_thread(stack.metric, "iapo_store_up")

        async def both():
            return (await asyncio.gather(drive(stack.url, seconds=seconds, concurrency=16, mix=False, stream_share=0,
                                               record=record), watch()))[0]

        result = asyncio.run(both())
        deadline = time.monotonic() + 30
        while stack.health()[1]["store"]["queue"] and time.monotonic() < deadline:
            time.sleep(0.2)
        served = result.pop("served")
        store = check_store(stack.db, served)  # while the gateway runs: the rows landed after the recovery
        calls = stack.upstream_calls() - calls_before
        during = [r for r in record if seen["t_fail"] < r["t0"] < seen["t_recover"]]
        refused = [r for r in record if r["status"] == 503 and r["code"] == "store_unavailable"]
        return {**result, "store": store, "policy": policy, "disk": disk.mode, "config": store_config(stack),
                "upstream_calls": calls, "upstream_calls_for_non_200": calls - result["ok"],
                "pending_200": sum(1 for r in record if r["status"] == 200 and r["logged"] == "pending"),
                "refused_503": len(refused), "other_non_200": len(record) - result["ok"] - len(refused),
                "sent_while_full": len(during), "served_while_full": sum(r["status"] == 200 for r in during),
                "detect_s": seen["t_detect"] - seen["t_fail"] if "t_detect" in seen else None,
                "recover_s": seen["t_ok"] - seen["t_recover"], "queue_max": seen["queue_max"],
                "store_up_failing": seen.get("store_up_failing"), "store_up_after": seen["store_up_after"],
                "healthz_failing": seen.get("healthz_failing")}
    finally:
        if stack:
            stack.stop()
        disk.close()
        shutil.rmtree(folder, ignore_errors=True)


def store_config(stack: Stack) -> dict:
    return {k: v for k, v in stack.config["store"].items() if k != "path"}


def _flood_process(port: int, idle: int, loris: int, seconds: float, out) -> None:
    """In its own process: `idle` connections that never send a byte and `loris` connections that send a
    header line a second and never finish, each reopened as soon as the gateway closes it."""
    from gateway.connections import raise_open_file_limit

    raise_open_file_limit()

    async def main() -> dict:
        stop_at = time.monotonic() + seconds
        stats = {"opened": 0, "refused": 0, "idle_lifetimes": [], "loris_lifetimes": [], "loris_408": 0, "open_max": 0}
        open_now = [0]

        async def one(kind: str) -> None:
            while time.monotonic() < stop_at:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    stats["refused"] += 1
                    await asyncio.sleep(0.1)
                    continue
                opened = time.monotonic()
                stats["opened"] += 1
                open_now[0] += 1
                stats["open_max"] = max(stats["open_max"], open_now[0])
                feeder = None
                if kind == "loris":
                    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")

                    async def trickle():
                        i = 0
                        while True:
                            await asyncio.sleep(1.0)
                            writer.write(f"x-h{i}: v\r\n".encode())
                            await writer.drain()
                            i += 1
                    feeder = asyncio.create_task(trickle())
                try:
                    data = await asyncio.wait_for(reader.read(), max(0.01, stop_at - time.monotonic()))
                    stats[f"{kind}_lifetimes"].append(time.monotonic() - opened)
                    if data.startswith(b"HTTP/1.1 408"):
                        stats["loris_408"] += 1
                except (asyncio.TimeoutError, OSError):
                    pass
                finally:
                    open_now[0] -= 1
                    if feeder:
                        feeder.cancel()
                    writer.close()

        await asyncio.gather(*(one("idle") for _ in range(idle)), *(one("loris") for _ in range(loris)))
        return stats

    out.put(asyncio.run(main()))


def run_flood(seconds: float, idle: int = 1000, loris: int = 200) -> dict:
    """Normal clients alone, then the same clients while another process holds `idle` idle connections and
    `loris` slow-loris connections open against the gateway (default limits: idle 5 s, headers 10 s)."""
    stack = Stack(n=1, workers=1, transport="openai", mix=False)
    try:
        def normal() -> dict:
            fds: list[int] = []

            async def sample():
                while not done.is_set():
                    fds.append(stack.open_fds())
                    await asyncio.sleep(0.5)

            async def both():
                sampler = asyncio.create_task(sample())
                result = await drive(stack.url, seconds=seconds, concurrency=8, mix=False, stream_share=0)
                done.set()
                await sampler
                return result
            done = asyncio.Event()
            result = asyncio.run(both())
            result.pop("served")
            result["gateway_fds_max"] = max(fds)
            return result

        base_fds = stack.open_fds()
        baseline = normal()
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        warmup = 3.0
        flooder = ctx.Process(target=_flood_process, args=(stack.gw_port, idle, loris, seconds + warmup + 1, out))
        flooder.start()
        time.sleep(warmup)  # let the flood connect
        flooded = normal()
        stats = out.get(timeout=seconds + 120)
        flooder.join(30)
        deadline = time.monotonic() + 30
        while stack.open_fds() > base_fds + 20 and time.monotonic() < deadline:
            time.sleep(0.5)
        after_fds = stack.open_fds()
        after = asyncio.run(drive(stack.url, seconds=2, concurrency=8, mix=False, stream_share=0))
        lifetimes = {k: statistics.median(stats[f"{k}_lifetimes"]) if stats[f"{k}_lifetimes"] else None
                     for k in ("idle", "loris")}
        return {"baseline": baseline, "flood": flooded, "served_after": after["ok"],
                "flood_stats": {k: v for k, v in stats.items() if not k.endswith("lifetimes")},
                "median_lifetime_s": lifetimes, "gateway_fds": {"before": base_fds, "max_during_flood":
                                                                flooded["gateway_fds_max"], "after": after_fds},
                "idle": idle, "loris": loris, "limits": "defaults: header_timeout 10 s, idle_timeout 5 s"}
    finally:
        stack.stop()



def row(what: str, command: str, r: dict, target: str = "") -> str:
    s = r["store"]
    five = sum(v for k, v in r["codes"].items() if k.startswith("5"))
    conn = r["codes"].get("0", 0)
    return (f"| {what} | `{command}` | {r['rps']:.0f} | {r['p50_ms']:.0f} / {r['p99_ms']:.0f} | "
            f"{r['ok']}/{r['requests']} ({five} 5xx, {conn} conn. errors) | {s['acknowledged']} ack, "
            f"{s['missing_rows']} missing, {s['wrong_completion_count']} wrong N, {s['orphan_completions']} orphans, "
            f"{s['half_written']} half-written, integrity {s['integrity']} | {target} |")


BASE = "python bench/load.py"
CASES = [
    ("load N=1, transport litellm", f"{BASE} --n 1", dict(n=1), "≥ 150 req/s"),
    ("load N=1, transport openai", f"{BASE} --n 1 --transport openai", dict(n=1, transport="openai"), "≥ 150 req/s"),
    ("load N=8, transport litellm", f"{BASE} --n 8", dict(n=8), "≥ 50 req/s"),
    ("load N=8, transport openai", f"{BASE} --n 8 --transport openai", dict(n=8, transport="openai"), "≥ 50 req/s"),
    ("mixed: 2 routes, 3 tiers, N ≤ 16, 25% streaming", f"{BASE} --mix", dict(mix=True), "no loss"),
    ("mixed, 2 workers", f"{BASE} --mix --workers 2", dict(mix=True, workers=2), "no loss"),
    ("fault: 10% upstream 500s", f"{BASE} --mix --faults '{{\"error_rate\": 0.1}}'",
     dict(mix=True, faults={"error_rate": 0.1}), "retried; no loss"),
    ("fault: 10% 429 with retry-after 0.05 s", f"{BASE} --mix --faults '{{\"error_rate\": 0.1, \"error_status\": 429, \"retry_after\": 0.05}}'",
     dict(mix=True, faults={"error_rate": 0.1, "error_status": 429, "retry_after": 0.05}), "retried; no loss"),
    ("fault: 5% latency spikes of 2 s", f"{BASE} --mix --faults '{{\"spike_rate\": 0.05, \"spike_ms\": 2000}}'",
     dict(mix=True, faults={"spike_rate": 0.05, "spike_ms": 2000}), "no loss"),
    ("fault: 10% connections dropped mid-body", f"{BASE} --mix --faults '{{\"drop_rate\": 0.1}}'",
     dict(mix=True, faults={"drop_rate": 0.1}), "retried; no loss"),
    ("fault: 10% slow bodies (trickled over 1.5 s)", f"{BASE} --mix --faults '{{\"slow_rate\": 0.1, \"slow_ms\": 1500}}'",
     dict(mix=True, faults={"slow_rate": 0.1, "slow_ms": 1500}), "no loss"),
    ("fault: 60% upstream 500s (beyond retries)", f"{BASE} --mix --faults '{{\"error_rate\": 0.6}}'",
     dict(mix=True, faults={"error_rate": 0.6}), "clear 502s; no loss"),
]
SCENARIOS = ("load", "crash", "crash-reservation", "disk-full", "flood")


def run(T: float, only: set[str], report: dict) -> dict:
    if "load" in only:
        for what, _, kwargs, _ in CASES:
            print("running:", what, flush=True)
            report[what] = run_load(T, **kwargs)
    if "crash" in only:
        print("running: crash", flush=True)
        report["crash"] = run_crash(max(T, 8))
    if "crash-reservation" in only:
        print("running: crash-reservation", flush=True)
        report["crash-reservation"] = run_crash_reservations(max(T, 8))
    if "disk-full" in only:
        for policy in ("refuse", "buffer"):
            print("running: disk-full", policy, flush=True)
            report[f"disk-full {policy}"] = run_disk_full(max(T, 12), policy)
    if "flood" in only:
        print("running: connection flood", flush=True)
        report["flood"] = run_flood(max(T, 10))
    return report


def render(report: dict, T: float) -> list[str]:
    lines = [
        "# Reliability",
        "",
        f"Regenerated by `python bench/reliability.py --seconds {T:g}` on {report['_meta']['date']} "
        "(2 cores shared by the replay upstream, the gateway and the client; all on loopback; one uvicorn "
        "worker unless said; `store.ack: after_commit`, the default). Every load run ends with SIGTERM "
        "(graceful drain), then the store is checked: each acknowledged 200 must have one `requests` row and "
        "exactly N `completions` rows.",
    ]
    runs = report["_meta"].get("runs", {})
    if runs:
        full = ",".join(sorted(SCENARIOS))
        said = [f"{'the full run' if what == full else f'`--only {what}`'} ({r['minutes']:.1f} min, 1-minute load "
                f"average {r['load_average_1m_before']:.1f} just before it started)" for what, r in runs.items()]
        lines += ["", f"Runs behind these figures: {', then '.join(said)}."]
        if max(r["load_average_1m_before"] for r in runs.values()) > 1.0:
            lines[-1] += (" On 2 cores a load average above 1 before a run means other processes (not part of this "
                          "benchmark) were using the CPU, so throughput and latency are worse than on an idle machine "
                          "(idle runs reached about 200 req/s with `transport: openai` and 100 with litellm at N=1, "
                          "see the previous version of this file).")
    lines += [
        "",
        "| scenario | command | req/s | p50 / p99 ms | 200s of sent | store after | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for what, command, _, target in CASES:
        if what in report:
            lines.append(row(what, command + f" --seconds {T:g}", report[what], target))
    if "crash" in report:
        crash = report["crash"]
        s = crash["store"]
        lines += [
            "",
            "## Crash (kill -9 mid-load) and restart",
            "",
            f"`python bench/reliability.py` (run_crash, N=4, 16 clients): {crash['ok']} requests acknowledged before "
            f"the kill; after restart `PRAGMA integrity_check` = {s['integrity']}, {s['half_written']} half-written "
            f"requests, {s['orphan_completions']} orphan completions, {s['missing_rows']} acknowledged requests "
            f"without rows (`store.ack: after_commit`: a 200 leaves once its rows are committed; the run before "
            f"after_commit lost 2, the queue's content at the kill), {crash['served_after_restart']} requests "
            "served in the 2 s after the restart.",
        ]
    lines += failure_sections(report)
    soak = RESULTS / "load-soak.json"
    if soak.exists():
        d = json.loads(soak.read_text())
        rss = d["rss_mb"]
        lines += ["", "## Soak", "", f"`python bench/load.py --mix --soak 600 --rate 50 --out load-soak`: "
                  f"{d['load']['ok']} requests in {d['args']['soak']:.0f} s; gateway RSS start {rss['start']:.0f} MB, "
                  f"after warm-up {rss['after_warmup']:.0f} MB, peak {rss['peak']:.0f} MB, end {rss['end']:.0f} MB "
                  f"(growth after warm-up {100 * rss['growth_after_warmup']:.1f}%); store: {d['store']}. "
                  "(Not re-run by this script; measured before issue 14.)"]
    lines += ["", "## Hostile input (tests, run by `.ci/run`)", "",
              "- `tests/e2e/test_hostile_input.py`: hypothesis (400 request bodies built from arbitrary JSON, 200 "
              "arbitrary byte strings; 300 vote and 200 best-of-N cases); schemathesis against `/openapi.json` "
              "(`not_a_server_error`, 60 examples per operation); templates never interpolate user text; limits on "
              "messages, max_tokens, header size; keys and `Authorization` never in logs, store or metrics.",
              "- `tests/e2e/test_failure_semantics.py`, against a running `iapo serve`: 100,000 nested arrays in "
              "`content` → 400, a lone surrogate `\\ud800` → 400, a declared 100 MB body never sent → 413 at once; "
              "none reaches the upstream.",
              "- Found by the fuzz run and fixed: a non-string `role` caused a 500."]
    return lines


def failure_sections(report: dict) -> list[str]:
    lines: list[str] = []
    c = report.get("crash-reservation")
    if c:
        s = c["store"]
        cfg = c["config"]
        lines += [
            "", "## Crash with reservations held (kill -9, restart)", "",
            f"`run_crash_reservations`: a tier capped at $1,000,000 a day (never reached), N=4, 16 clients; half-way "
            f"the upstream starts holding calls for 8 s, and the gateway is killed with -9 once 16 requests hold "
            f"reservations (upstream timeout {cfg['upstream_timeout_s']:g} s, `store.reservation_grace_seconds` "
            f"{cfg['reservation_grace_seconds']:g}; a reservation expires at its request's deadline plus the grace; "
            f"housekeeping every {HOUSEKEEPING_S:g} s).",
            "",
            "| figure | value | target |",
            "|---|---|---|",
            f"| reservations left by the killed process | {c['stuck_at_kill']} | – (requests in flight at the kill) |",
            f"| of those, still held right after the restart ({c['restart_s']:.1f} s after the kill) | "
            f"{c['stuck_after_restart']} | all (they have not expired yet, so they still hold their room) |",
            f"| their expiry, after the kill | {c['first_expiry_after_kill_s']:.1f}–{c['last_expiry_after_kill_s']:.1f} s | – |",
            f"| stuck reservations after the expiry (+ one housekeeping round) | {c['stuck_after_expiry']} "
            f"(all gone {c['released_after_kill_s']:.1f} s after the kill; `iapo_reservations_released_total` "
            f"{c['released_metric']:.0f}) | 0 |",
            f"| acknowledged before the kill vs written | {s['acknowledged']} vs {s['acknowledged'] - s['missing_rows']} "
            f"({s['missing_rows']} missing, {s['wrong_completion_count']} wrong N, {s['half_written']} half-written, "
            f"integrity {s['integrity']}) | all written (`after_commit`) |",
            f"| served in the 2 s after the restart | {c['served_after_restart']} | > 0 |",
            "",
            "That a stuck reservation really holds its room until it expires (a request that fits only without it "
            "gets 429 before the expiry and 200 after) is asserted by `tests/e2e/test_failure_semantics.py`.",
        ]
    disks = [report[k] for k in ("disk-full refuse", "disk-full buffer") if k in report]
    if disks:
        mode = disks[0]["disk"]
        how = ("a 64 MB tmpfs holding the SQLite file, filled up by a filler file and freed by deleting it"
               if mode == "tmpfs" else "RLIMIT_FSIZE = 0 on the gateway process (writes fail with EFBIG), raised back")
        lines += [
            "", "## Disk full under load", "",
            f"`run_disk_full`: N=4, 16 clients (non-streamed) for {report['_meta']['seconds_disk']:g} s; the store's "
            f"disk is {how}. It fails a quarter into the run and recovers two thirds in. Acknowledged vs written "
            "is checked once the queue is empty, with the gateway still running (no drain at exit helps). "
            "Upstream calls are the replay upstream's own count; each 200 is one call (N=4 in one `n=4` call, no "
            "faults, so no retries), so calls − 200s is the number of refused requests that reached the upstream.",
            "",
            "| `on_write_failure` | sent | 200s (of which `x-iapo-logged: pending`) | 503 `store_unavailable` | "
            "other | upstream calls − 200s | acknowledged vs written | failure seen by `/healthz` after | "
            "200s of sent between filling and freeing the disk | `/healthz` ok again after freeing | "
            "`iapo_store_up` failing / after | target |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for d in disks:
            s = d["store"]
            extra = (f", queue_size {d['config']['queue_size']}, ack_timeout {d['config']['ack_timeout']:g} s"
                     if d["policy"] == "buffer" else "")
            target = ("every 200 written; every other answer a 503 before the upstream" if d["policy"] == "refuse"
                      else "served from memory while the queue has room, 503 beyond; every 200 written")
            lines.append(
                f"| {d['policy']}{extra} | {d['requests']} | {d['ok']} ({d['pending_200']}) | {d['refused_503']} | "
                f"{d['other_non_200']} | {d['upstream_calls_for_non_200']} | {s['acknowledged']} vs "
                f"{s['acknowledged'] - s['missing_rows']} ({s['missing_rows']} missing, integrity {s['integrity']}) | "
                f"{_s(d['detect_s'])} | {d['served_while_full']} of {d['sent_while_full']} (queue max "
                f"{d['queue_max']}) | {d['recover_s']:.1f} s | {_n(d['store_up_failing'])} / {_n(d['store_up_after'])} | "
                f"{target} |")
        lines += [
            "",
            "With a tmpfs the failure shows at the first commit that needs a new page; SQLite's WAL reuses the "
            "pages it already has after a checkpoint, so that can take up to one WAL cycle (about 1,000 pages) "
            "after the disk is full. `/healthz` answers 503 `{\"status\": \"degraded\", \"store\": {\"state\": "
            "\"failing\", ...}}` meanwhile; the alert `IapoStoreWriteFailing` (`deploy/prometheus/alerts.yml`) fires "
            "on `iapo_store_up == 0` for 1 minute.",
        ]
    f = report.get("flood")
    if f:
        b, fl, st, fds = f["baseline"], f["flood"], f["flood_stats"], f["gateway_fds"]
        life = f["median_lifetime_s"]
        lines += [
            "", "## Connection flood", "",
            f"`run_flood`: 8 normal clients (N=1, `transport: openai`, closed loop) for {report['_meta']['seconds_flood']:g} s alone, "
            f"then again while another process holds {f['idle']} idle connections (never a byte) and {f['loris']} "
            "slow-loris connections (a header line a second, never the end of the headers), reopening each as soon "
            f"as the gateway closes it. Gateway limits at their defaults (header_timeout 10 s, idle_timeout 5 s, "
            "max_connections from the open-file limit). The flood process shares the 2 cores.",
            "",
            "| normal clients | req/s | p50 / p99 ms | errors (non-200) | gateway open files (max) |",
            "|---|---|---|---|---|",
            f"| alone | {b['rps']:.0f} | {b['p50_ms']:.1f} / {b['p99_ms']:.1f} | {b['requests'] - b['ok']} | "
            f"{b['gateway_fds_max']} |",
            f"| during the flood | {fl['rps']:.0f} | {fl['p50_ms']:.1f} / {fl['p99_ms']:.1f} | {fl['requests'] - fl['ok']} | "
            f"{fl['gateway_fds_max']} |",
            "",
            f"The flood opened {st['opened']} connections (at most {st['open_max']} at once; {st['refused']} refused "
            f"at connect); the gateway closed idle ones after a median {life['idle'] or float('nan'):.1f} s "
            f"(idle_timeout 5 s) and answered {st['loris_408']} slow-loris connections with 408 after a median "
            f"{life['loris'] or float('nan'):.1f} s (header_timeout 10 s). Gateway open files: {fds['before']} before, "
            f"{fds['max_during_flood']} at most during the flood, {fds['after']} after it stopped; "
            f"{f['served_after']} requests served in the 2 s after.",
        ]
    return lines


def _s(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f} s"


def _n(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(SCENARIOS)}; the others are kept "
                                       "from bench/results/reliability.json")
    parser.add_argument("--render", action="store_true", help="only rewrite RELIABILITY.md from reliability.json")
    args = parser.parse_args()
    T = args.seconds
    path = RESULTS / "reliability.json"
    if args.render:
        report = json.loads(path.read_text())
        (ROOT / "bench" / "RELIABILITY.md").write_text("\n".join(render(report, report["_meta"]["seconds"])) + "\n")
        return
    only = set(args.only.split(",")) if args.only else set(SCENARIOS)
    unknown = only - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {SCENARIOS}")
    report = json.loads(path.read_text()) if args.only and path.exists() else {}
    report["_meta"] = {**report.get("_meta", {}), "date": time.strftime("%Y-%m-%d"), "seconds": T,
                       "seconds_disk": max(T, 12), "seconds_flood": max(T, 10)}
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    run(T, only, report)
    report["_meta"]["runs"] = {**report["_meta"].get("runs", {}), ",".join(sorted(only)): {
        "load_average_1m_before": load_before, "load_average_1m_after": os.getloadavg()[0],
        "minutes": (time.monotonic() - started) / 60}}
    lines = render(report, T)
    (ROOT / "bench" / "RELIABILITY.md").write_text("\n".join(lines) + "\n")
    path.write_text(json.dumps(report, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
