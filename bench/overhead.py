"""Gateway overhead (not a test): direct to the replay upstream vs through iapo vs through LiteLLM's proxy.

    python bench/overhead.py [--requests 400] [--seconds 6] [--skip-litellm-proxy]

Every server is its own process on loopback, one worker each, same replay upstream. Latency: one
request at a time, zero think time, the targets interleaved request by request. Throughput: a
closed loop of concurrent clients, the targets interleaved in slices. LiteLLM's proxy is installed
by this script into bench/.venv-litellm-proxy (litellm[proxy]). Writes bench/results/overhead.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
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

from bench.load import wait_up  # noqa: E402
from sandbox.servers import free_port  # noqa: E402

VENV = ROOT / "bench" / ".venv-litellm-proxy"
ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1"}
MASTER_KEY = "sk-bench-" + "5f3a9c0e7b21d4868a0c1e2f3b4d5e6f"
MESSAGES = [{"role": "user", "content": "Problem 3: solve it and give the final answer."}]


def start(cmd: list[str], url: str, log: Path, timeout: float = 120) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_up(url, proc, timeout)
    except RuntimeError:
        proc.kill()
        raise RuntimeError(f"{cmd[0]} did not come up; see {log}") from None
    return proc


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)


def litellm_proxy_binary() -> Path:
    binary = VENV / "bin" / "litellm"
    if not binary.exists():
        print("installing litellm[proxy] into", VENV, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return binary


async def latency(targets: dict[str, tuple[str, dict]], rounds: int) -> dict[str, np.ndarray]:
    times = {name: [] for name in targets}
    async with httpx.AsyncClient(timeout=30) as client:
        for name, (url, body) in targets.items():  # warm-up
            for _ in range(10):
                (await client.post(url, json=body, headers={"authorization": f"Bearer {MASTER_KEY}"})).raise_for_status()
        for _ in range(rounds):
            for name, (url, body) in targets.items():
                t0 = time.perf_counter()
                r = await client.post(url, json=body, headers={"authorization": f"Bearer {MASTER_KEY}"})
                times[name].append(time.perf_counter() - t0)
                r.raise_for_status()
    return {k: np.array(v) for k, v in times.items()}


async def throughput(url: str, body: dict, seconds: float, concurrency: int) -> tuple[int, int]:
    done = errors = 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        async def worker():
            nonlocal done, errors
            while time.monotonic() < stop_at:
                try:
                    r = await client.post(url, json=body, headers={"authorization": f"Bearer {MASTER_KEY}"})
                    done += r.status_code == 200
                    errors += r.status_code != 200
                except httpx.HTTPError:
                    errors += 1
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="latency samples per target")
    parser.add_argument("--seconds", type=float, default=6.0, help="throughput seconds per target per slice")
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--skip-litellm-proxy", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="iapo-overhead-"))
    procs = []
    try:
        up_port, gw_port, lp_port = free_port(), free_port(), free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        procs.append(start([sys.executable, "-m", "gateway.cli", "replay", "--env", "replay-mv=synthetic-mv",
                            "--port", str(up_port)], f"{upstream}/v1/models", work / "replay.log"))
        from sandbox.demo import replay_upstream
        from sandbox.replay import prompt_text

        route = lambda name, n: {  # noqa: E731
            "model": name, "upstream": "replay", "aggregator": "mv", "n_max": 32,
            "prompts": [{"id": "p3", "system": prompt_text(3), "params": {"max_tokens": 1200}}],
            "start": {"default": {"prompt": "p3", "n": n}}}
        config = {"upstreams": {"replay": replay_upstream(upstream, "replay-mv"),
                                "replay-direct": replay_upstream(upstream, "replay-mv", transport="openai")},
                  "routes": [route("bench-n1", 1), route("bench-n8", 8), {**route("direct-n1", 1), "upstream": "replay-direct"},
                             {**route("direct-n8", 8), "upstream": "replay-direct"}],
                  "store": {"path": str(work / "iapo.db")}}
        (work / "iapo.yaml").write_text(yaml.safe_dump(config))
        gateway = f"http://127.0.0.1:{gw_port}"
        procs.append(start([sys.executable, "-m", "gateway.cli", "serve", "--config", str(work / "iapo.yaml"),
                            "--port", str(gw_port)], f"{gateway}/healthz", work / "gateway.log"))
        targets = {
            "direct": (f"{upstream}/v1/chat/completions", {"model": "replay-mv", "messages": MESSAGES}),
            "iapo": (f"{gateway}/v1/chat/completions", {"model": "bench-n1", "messages": MESSAGES}),
            "iapo N=8": (f"{gateway}/v1/chat/completions", {"model": "bench-n8", "messages": MESSAGES}),
            "iapo transport=openai": (f"{gateway}/v1/chat/completions", {"model": "direct-n1", "messages": MESSAGES}),
            "iapo transport=openai N=8": (f"{gateway}/v1/chat/completions", {"model": "direct-n8", "messages": MESSAGES}),
        }
        if not args.skip_litellm_proxy:
            binary = litellm_proxy_binary()
            (work / "litellm.yaml").write_text(yaml.safe_dump({"model_list": [{
                "model_name": "replay", "litellm_params": {"model": "openai/replay-mv", "api_base": f"{upstream}/v1",
                                                            "api_key": "sk-replay"}}],
                "general_settings": {"master_key": MASTER_KEY}}))
            proxy = f"http://127.0.0.1:{lp_port}"
            procs.append(start([str(binary), "--config", str(work / "litellm.yaml"), "--port", str(lp_port),
                                "--num_workers", "1"], f"{proxy}/health/liveliness", work / "litellm.log", timeout=240))
            targets["litellm-proxy"] = (f"{proxy}/v1/chat/completions", {"model": "replay", "messages": MESSAGES})
        lat = asyncio.run(latency(targets, args.requests))
        rps = {name: [] for name in targets if not name.endswith("N=8")}
        for _ in range(args.slices):
            for name in rps:
                url, body = targets[name]
                done, errors = asyncio.run(throughput(url, body, args.seconds, args.concurrency))
                rps[name].append((done / args.seconds, errors))
        report = {"requests": args.requests, "concurrency": args.concurrency, "cpus": os.cpu_count(), "targets": {}}
        for name, t in lat.items():
            entry = {"p50_ms": float(np.percentile(t, 50) * 1e3), "p99_ms": float(np.percentile(t, 99) * 1e3)}
            if name != "direct":
                entry["added_p50_ms"] = entry["p50_ms"] - float(np.percentile(lat["direct"], 50) * 1e3)
                entry["added_p99_ms"] = entry["p99_ms"] - float(np.percentile(lat["direct"], 99) * 1e3)
            if name in rps:
                entry["rps"] = float(np.mean([r for r, _ in rps[name]]))
                entry["errors"] = int(sum(e for _, e in rps[name]))
            report["targets"][name] = entry
        t = report["targets"]
        ratios = {}
        for label, name in (("litellm_transport", "iapo"), ("openai_transport", "iapo transport=openai")):
            ratios[f"{label}: N8_over_N1_p50"] = t[f"{name} N=8"]["p50_ms"] / t[name]["p50_ms"]
            if "litellm-proxy" in t:
                ratios[f"{label}: added_p50_over_litellm_proxy"] = t[name]["added_p50_ms"] / t["litellm-proxy"]["added_p50_ms"]
                ratios[f"{label}: rps_over_litellm_proxy"] = t[name]["rps"] / t["litellm-proxy"]["rps"]
        report["ratios"] = ratios
        out = ROOT / "bench" / "results" / "overhead.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
