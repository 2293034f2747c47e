"""Load benchmark (not a test): the gateway under a concurrent client for a fixed time, then a check
of the store: every 200 has one `requests` row and N `completions` rows, no duplicates, no orphans.

    python bench/load.py [--seconds 20] [--concurrency 32] [--n 1] [--workers 1] [--transport litellm|openai]
                         [--mix] [--soak 600 --rate 50] [--faults '{"error_rate": 0.1}']

Every process is separate and on loopback: replay upstream, gateway (uvicorn, --workers), client.
Writes JSON to bench/results/load-*.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sandbox.servers import free_port  # noqa: E402

ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
KEYS = {"low": "load-low", "mid": "load-mid", "high": "load-high"}


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


class Stack:
    """Replay upstream + gateway as processes; restartable gateway (for crash tests). `caps` go on every
    tier, `store`, `limits` and `upstream` entries are merged into the config, `db_path` moves the store."""

    def __init__(self, *, n: int, workers: int, transport: str, mix: bool, queue_size: int = 10_000,
                 caps: dict | None = None, store: dict | None = None, limits: dict | None = None,
                 upstream: dict | None = None, db_path: str | None = None) -> None:
        from gateway.config import hash_key
        from sandbox.demo import replay_route, replay_upstream
        from policies.environments import synthetic_bon, synthetic_mv

        self.work = Path(tempfile.mkdtemp(prefix="iapo-load-"))
        self.up_port, self.gw_port = free_port(), free_port()
        self.upstream = f"http://127.0.0.1:{self.up_port}"
        self.url = f"http://127.0.0.1:{self.gw_port}"
        self.workers = workers
        self.replay = subprocess.Popen([sys.executable, "-m", "gateway.cli", "replay", "--env", "replay-mv=synthetic-mv",
                                        "--env", "replay-bon=synthetic-bon", "--port", str(self.up_port)],
                                       env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_up(f"{self.upstream}/v1/models", self.replay)
        mv, bon = synthetic_mv(0), synthetic_bon(0)
        ups = {"mv": replay_upstream(self.upstream, "replay-mv", transport=transport, retries=2, **(upstream or {})),
               "bon": replay_upstream(self.upstream, "replay-bon", transport=transport, retries=2, **(upstream or {}))}
        routes = [replay_route("math", "mv", mv, base_url=self.upstream, env_name="replay-mv",
                               start={"default": {"prompt": "p4", "n": n}})]
        tiers = [{"name": "low", "cost_weight": 0.0}]
        if mix:  # two routes, three tiers, N up to 16
            routes[0]["start"] = {"low": {"prompt": "p4", "n": 16}, "mid": {"prompt": "p4", "n": 8},
                                  "high": {"prompt": "p5", "n": 1}}
            routes.append(replay_route("assist", "bon", bon, base_url=self.upstream, env_name="replay-bon",
                                       start={"low": {"prompt": "p3", "n": 8}, "mid": {"prompt": "p3", "n": 4},
                                              "high": {"prompt": "p2", "n": 1}}))
            tiers = [{"name": t, "cost_weight": w} for t, w in (("low", 0.0), ("mid", 0.2), ("high", 1.0))]
        if caps:
            tiers = [{**t, "caps": caps} for t in tiers]
        self.db = db_path or str(self.work / "iapo.db")
        self.config = {"upstreams": ups, "routes": routes, "tiers": tiers,
                       "api_keys": [{"hash": hash_key(k), "tier": t} for t, k in KEYS.items() if t in {x["name"] for x in tiers}],
                       "store": {"path": self.db, "queue_size": queue_size, **(store or {})}}
        if limits:
            self.config["limits"] = limits
        (self.work / "config.yaml").write_text(yaml.safe_dump(self.config))
        self.gateway: subprocess.Popen | None = None
        self.start_gateway()

    def start_gateway(self) -> None:
        env = {k: v for k, v in ENV.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        self.gateway = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config",
                                         str(self.work / "config.yaml"), "--port", str(self.gw_port),
                                         "--workers", str(self.workers)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_up(f"{self.url}/healthz", self.gateway)

    def rss_mb(self) -> float:
        """Resident memory of the gateway's process tree (master and workers)."""
        pids = [self.gateway.pid]
        try:
            out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.gateway.pid)], capture_output=True, text=True)
            pids += [int(p) for p in out.stdout.split()]
        except OSError:
            pass
        total = 0
        for pid in pids:
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def faults(self, **switches) -> None:
        httpx.post(f"{self.upstream}/admin/faults", json=switches)

    def upstream_calls(self) -> int:
        """Chat calls the replay upstream has received so far."""
        return httpx.get(f"{self.upstream}/admin/stats").json()["requests"]

    def open_fds(self) -> int:
        """Open files (sockets included) of the gateway process."""
        return len(os.listdir(f"/proc/{self.gateway.pid}/fd"))

    def health(self) -> tuple[int, dict]:
        r = httpx.get(f"{self.url}/healthz", timeout=10)
        return r.status_code, r.json()

    def metric(self, name: str) -> float | None:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return next((s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name), None)

    def kill_gateway(self, sig=signal.SIGKILL) -> None:
        os.killpg(self.gateway.pid, sig)
        self.gateway.wait(30)

    def stop(self) -> None:
        for proc in (self.gateway, self.replay):
            if proc and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


async def drive(url: str, *, seconds: float, concurrency: int, mix: bool, rate: float | None = None,
                stream_share: float = 0.25, seed: int = 0, record: list | None = None,
                stop: asyncio.Event | None = None) -> dict:
    """Closed loop (or a fixed `rate` per second) for `seconds`; returns per-request outcomes. With
    `record`, each non-streamed answer is also appended there as a dict (sent at, status, error code,
    x-iapo-logged). Setting `stop` ends the run early (no new requests; those in flight finish)."""
    rng = random.Random(seed)
    results: list[tuple[int, float, str | None, int]] = []  # status, seconds, response id, n
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def one():
            tier = rng.choice(list(KEYS)) if mix else "low"
            model = rng.choice(["math", "assist"]) if mix else "math"
            q = rng.randrange(300)
            content = f"Problem {q}: solve" if model == "math" else f"Query {q}: help"
            body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": rng.random() < stream_share}
            t0 = time.perf_counter()
            try:
                if body["stream"]:
                    async with client.stream("POST", "/v1/chat/completions", json=body,
                                             headers={"authorization": f"Bearer {KEYS[tier]}"}) as r:
                        rid, n, status = None, int(r.headers.get("x-iapo-n", 0)), r.status_code
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                event = json.loads(line[6:])
                                if "error" in event:  # failed after the 200 went out (N > 1 streams start at once)
                                    status = 502
                                elif rid is None:
                                    rid = event.get("id")
                        results.append((status, time.perf_counter() - t0, rid if status == 200 else None, n))
                else:
                    sent = time.monotonic()
                    r = await client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEYS[tier]}"})
                    ok = r.status_code == 200
                    if record is not None:
                        error = r.json().get("error") if not ok and r.headers.get("content-type", "").startswith(
                            "application/json") else None
                        record.append({"t0": sent, "status": r.status_code, "code": (error or {}).get("code"),
                                       "logged": r.headers.get("x-iapo-logged")})
                    results.append((r.status_code, time.perf_counter() - t0, r.json()["id"] if ok else None,
                                    int(r.headers.get("x-iapo-n", 0))))
            except httpx.HTTPError:
                results.append((0, time.perf_counter() - t0, None, 0))

        if rate:
            tasks = []
            next_at = time.monotonic()
            while time.monotonic() < stop_at and not (stop and stop.is_set()):
                tasks.append(asyncio.create_task(one()))
                next_at += 1 / rate
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await asyncio.gather(*tasks)
        else:
            async def worker():
                while time.monotonic() < stop_at and not (stop and stop.is_set()):
                    await one()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarise(results, seconds)


def summarise(results, seconds: float) -> dict:
    lat = np.array([s for code, s, _, _ in results if code == 200]) * 1e3
    codes: dict[str, int] = {}
    for code, *_ in results:
        codes[str(code)] = codes.get(str(code), 0) + 1
    return {"requests": len(results), "ok": int(len(lat)), "rps": len(lat) / seconds, "codes": codes,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "served": {rid: n for code, _, rid, n in results if code == 200 and rid}}


class FailingDisk:
    """A folder whose writes can be made to fail and recover: a small tmpfs filled up by a filler file
    (deleting it recovers) where mounting is allowed (root), else RLIMIT_FSIZE = 0 on the gateway process
    `pid` (Python ignores SIGXFSZ, so its writes fail with EFBIG; raised back to recover).
    IAPO_FAILING_DISK=rlimit forces the latter."""

    def __init__(self, folder: Path, size_mb: int = 32) -> None:
        self.folder, self.pid = Path(folder), None
        self.folder.mkdir(parents=True, exist_ok=True)
        self.filler = self.folder / "filler"
        self.mode = "rlimit"
        if os.environ.get("IAPO_FAILING_DISK") != "rlimit" and shutil.which("mount"):
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(self.folder)],
                                     capture_output=True)
            if mounted.returncode == 0:
                self.mode = "tmpfs"

    def fail(self) -> None:
        if self.mode == "tmpfs":
            fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                for chunk in (b"\0" * (1 << 20), b"\0" * 4096):
                    try:
                        while True:
                            os.write(fd, chunk)
                    except OSError:  # ENOSPC: this size no longer fits
                        pass
            finally:
                os.close(fd)
            st = os.statvfs(self.folder)
            assert st.f_bavail * st.f_frsize < 4096, "the tmpfs still has room"
        else:
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    def recover(self) -> None:
        if self.mode == "tmpfs":
            os.unlink(self.filler)
        else:
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (hard, hard))

    def close(self) -> None:
        if self.mode == "tmpfs" and subprocess.run(["umount", str(self.folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)


def check_store(db_path: str, served: dict[str, int]) -> dict:
    """Rows for every acknowledged request: one requests row, N completions, nothing orphaned."""
    from store.database import open_database

    db = open_database(db_path)
    rows = dict(db.execute("select id, n from requests where kind = 'serve'").fetchall())
    comp = dict(db.execute("select request_id, count(*) from completions group by request_id").fetchall())
    missing = [rid for rid in served if rid not in rows]
    wrong_n = [rid for rid, n in served.items() if rid in rows and (rows[rid] != n or comp.get(rid) != n)]
    orphans = db.execute("select count(*) from completions c left join requests r on r.id = c.request_id "
                         "where r.id is null").fetchone()[0]
    half = db.execute("select count(*) from requests r where r.status = 200 and r.n != "
                      "(select count(*) from completions c where c.request_id = r.id)").fetchone()[0]
    return {"acknowledged": len(served), "missing_rows": len(missing), "wrong_completion_count": len(wrong_n),
            "orphan_completions": orphans, "half_written": half,
            "integrity": db.execute("pragma integrity_check").fetchone()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--transport", default="litellm", choices=["litellm", "openai"])
    parser.add_argument("--mix", action="store_true", help="two routes, three tiers, N up to 16, some streaming")
    parser.add_argument("--rate", type=float, help="fixed arrival rate instead of a closed loop")
    parser.add_argument("--soak", type=float, help="seconds of steady load, sampling the gateway's RSS")
    parser.add_argument("--faults", help='replay fault switches as JSON, e.g. {"error_rate": 0.1, "error_status": 429}')
    parser.add_argument("--out")
    args = parser.parse_args()
    stack = Stack(n=args.n, workers=args.workers, transport=args.transport, mix=args.mix)
    try:
        if args.faults:
            stack.faults(**json.loads(args.faults))
        report = {"args": vars(args)}
        if args.soak:
            samples = []
            start = time.monotonic()

            async def sample():
                while time.monotonic() - start < args.soak:
                    samples.append((time.monotonic() - start, stack.rss_mb()))
                    await asyncio.sleep(5)

            async def both():
                results = await asyncio.gather(drive(stack.url, seconds=args.soak, concurrency=args.concurrency,
                                                     mix=args.mix, rate=args.rate or 50), sample())
                return results[0]
            result = asyncio.run(both())
            warm = [rss for t, rss in samples if t >= min(60, args.soak / 5)]
            report["rss_mb"] = {"start": samples[0][1], "after_warmup": warm[0], "peak": max(s for _, s in samples),
                                "end": samples[-1][1], "growth_after_warmup": (samples[-1][1] - warm[0]) / warm[0]}
        else:
            result = asyncio.run(drive(stack.url, seconds=args.seconds, concurrency=args.concurrency,
                                       mix=args.mix, rate=args.rate))
        stack.kill_gateway(signal.SIGTERM)  # graceful: drain and flush, then count rows
        report["load"] = {k: v for k, v in result.items() if k != "served"}
        report["store"] = check_store(str(stack.work / "iapo.db"), result["served"])
    finally:
        stack.stop()
    name = args.out or f"load-{'mix' if args.mix else f'n{args.n}'}-{args.transport}-w{args.workers}"
    out = ROOT / "bench" / "results" / f"{name}.json"
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
