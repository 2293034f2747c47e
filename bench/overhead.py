"""Gateway overhead (not a test): direct to the upstream vs through iapo vs through LiteLLM's proxy.

    python bench/overhead.py [--rounds 5] [--requests 300] [--seconds 2] [--passes 3] [--streams 10]
                             [--skip-litellm-proxy]

Every server is its own process on loopback, one worker each:

- the replay upstream (`iapo replay`, non-streaming answers) and the scripted upstream
  (`sandbox.scripted`, a stream of `--chunks` content chunks, `--chunk-delay` s apart);
- iapo with the default upstream config (no `transport` key: `auto`, which is direct HTTP for these
  `openai/...` models with an api_base; `store.ack` default, `after_commit`);
- iapo with `transport: litellm` (everything else default);
- iapo with `store.ack: queued` (everything else default), for the cost of the ack mode;
- LiteLLM's proxy, installed by this script into bench/.venv-litellm-proxy (`litellm[proxy]`).

Each of `--rounds` rounds runs everything interleaved: latency (one request at a time, zero think
time, targets interleaved request by request, order shuffled per sweep), throughput (a closed loop
of `--concurrency` clients in `--passes` short slices per target, targets rotated slice by slice; the
CPU seconds that the target's process group used meanwhile, from /proc/<pid>/stat, children
excluded; and how busy other processes kept the machine meanwhile), streaming (one
stream at a time, targets interleaved, a new connection per stream: time to the first content
chunk and to the end). Figures are medians over rounds. The client is aiohttp (about 0.2 ms of
CPU per request here, against 1.8 ms for httpx, which capped the old direct figure).
Writes bench/results/overhead.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import wait_up  # noqa: E402
from sandbox.servers import free_port  # noqa: E402

VENV = ROOT / "bench" / ".venv-litellm-proxy"
ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1"}
ENV.pop("PROMETHEUS_MULTIPROC_DIR", None)
KEY = "sk-bench-" + "5f3a9c0e7b21d4868a0c1e2f3b4d5e6f"  # iapo's API key and LiteLLM's master key
HEADERS = {"authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Problem 3: solve it and give the final answer."}]
STREAM_TEXT = "Working through problem 3 under prompt 3, one step at a time, with care. Final answer: \\boxed{7}"
CLK_TCK = os.sysconf("SC_CLK_TCK")
FIGURES = ("medians over rounds of each round's figure (p50/p99 of that round's samples; added = target - direct "
           "in the same round); ratios: medians of the per-round ratios (each round is a paired, interleaved "
           "comparison)")

SCRIPTED = """
import sys, uvicorn
from sandbox.scripted import Script, create_scripted_app
port, count, delay, text = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
script = Script(content=text, chunk_count=count, chunk_delay=delay, models=["scripted"])
uvicorn.run(create_scripted_app(script), host="127.0.0.1", port=port, log_level="warning", access_log=False)
"""


# -- processes --------------------------------------------------------------------------------------
def start(cmd: list[str], url: str, log: Path, timeout: float = 120) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_up(url, proc, timeout)
    except RuntimeError:
        stop(proc)
        raise RuntimeError(f"{cmd[0]} did not come up; see {log}") from None
    return proc


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except ProcessLookupError:
        pass
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)


def group_cpu(pgid: int) -> tuple[float, int]:
    """User + system CPU seconds of every live process in the process group (its threads included,
    waited-for children excluded), and how many processes that is."""
    total, count = 0, 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields[0] is the state (field 3 of stat), pgrp is field 5
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
            count += 1
    return total / CLK_TCK, count


def machine_busy() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def litellm_proxy_binary() -> Path:
    binary = VENV / "bin" / "litellm"
    if not binary.exists():
        print("installing litellm[proxy] into", VENV, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return binary


def venv_litellm_version() -> str | None:
    try:
        out = subprocess.run([str(VENV / "bin" / "python"), "-c", "import importlib.metadata as m; "
                              "print(m.version('litellm'))"], capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


# -- configs ----------------------------------------------------------------------------------------
def iapo_config(replay: str, scripted: str, db: Path, *, transport: str | None = None, ack: str | None = None) -> dict:
    """The bench's gateway config: only the keys a user would write. `transport` and `ack` are left
    out unless given, so the defaults apply."""
    from gateway.config import hash_key
    from sandbox.demo import replay_upstream
    from sandbox.replay import prompt_text

    extra = {"transport": transport} if transport else {}
    upstreams = {"replay": replay_upstream(replay, "replay-mv", **extra),
                 "scripted": {**replay_upstream(scripted, "scripted", **extra)}}

    def route(name: str, upstream: str, n: int) -> dict:
        return {"model": name, "upstream": upstream, "aggregator": "mv", "n_max": 32,
                "prompts": [{"id": "p3", "system": prompt_text(3), "params": {"max_tokens": 1200}}],
                "start": {"default": {"prompt": "p3", "n": n}}}

    store = {"path": str(db)}
    if ack:
        store["ack"] = ack
    return {"upstreams": upstreams,
            "routes": [route("bench-n1", "replay", 1), route("bench-n8", "replay", 8),
                       route("stream-n1", "scripted", 1)],
            "api_keys": [{"hash": hash_key(KEY), "tier": "default", "name": "bench"}],
            "store": store}


def litellm_config(replay: str, scripted: str) -> dict:
    return {"model_list": [
        {"model_name": "replay", "litellm_params": {"model": "openai/replay-mv", "api_base": f"{replay}/v1",
                                                    "api_key": "sk-replay"}},
        {"model_name": "scripted", "litellm_params": {"model": "openai/scripted", "api_base": f"{scripted}/v1",
                                                      "api_key": "sk-scripted"}}],
        "general_settings": {"master_key": KEY}}


# -- measurements -----------------------------------------------------------------------------------
async def post(session: aiohttp.ClientSession, url: str, body: dict) -> int:
    async with session.post(url, json=body, headers=HEADERS) as r:
        await r.read()
        return r.status


async def latency(targets: dict[str, tuple[str, dict]], requests: int, rng: random.Random) -> dict[str, np.ndarray]:
    """`requests` sequential requests per target, interleaved request by request (order shuffled per sweep)."""
    times: dict[str, list[float]] = {name: [] for name in targets}
    names = list(targets)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for name, (url, body) in targets.items():  # warm-up (and open the connection)
            for _ in range(5):
                if await post(session, url, body) != 200:
                    raise RuntimeError(f"{name}: warm-up request failed")
        for _ in range(requests):
            rng.shuffle(names)
            for name in names:
                url, body = targets[name]
                t0 = time.perf_counter()
                status = await post(session, url, body)
                times[name].append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"{name}: HTTP {status}")
    return {k: np.array(v) for k, v in times.items()}


async def throughput(url: str, body: dict, seconds: float, concurrency: int, pgid: int, pgids: list[int]) -> dict:
    """A closed loop of `concurrency` clients for `seconds`; the server's CPU while it ran (and 0.5 s
    after, so rows still being committed are counted). `other_cores`: how busy the machine was with
    processes that are not this benchmark's (the noise), in cores."""
    done = errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        for _ in range(5):
            await post(session, url, body)
        cpu0, procs = group_cpu(pgid)
        ours0, busy0, client0 = sum(group_cpu(g)[0] for g in pgids), machine_busy(), own_cpu()
        t0 = time.perf_counter()
        stop_at = time.monotonic() + seconds

        async def worker():
            nonlocal done, errors
            while time.monotonic() < stop_at:
                try:
                    ok = await post(session, url, body) == 200
                    done += ok
                    errors += not ok
                except aiohttp.ClientError:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    await asyncio.sleep(0.5)
    cpu = group_cpu(pgid)[0] - cpu0
    ours = sum(group_cpu(g)[0] for g in pgids) - ours0 + own_cpu() - client0
    other = max(0.0, machine_busy() - busy0 - ours)
    return {"requests": done, "errors": errors, "seconds": elapsed, "rps": done / elapsed, "cpu_s": cpu,
            "cpu_s_per_1k": cpu / done * 1000 if done else None, "processes": procs,
            "client_cpu_s_per_1k": (own_cpu() - client0) / done * 1000 if done else None,
            "other_cores": other / (elapsed + 0.5)}


def combine(slices: list[dict]) -> dict:
    """One round's throughput of a target from its slices: totals, then rates."""
    done, seconds, cpu = (sum(s[k] for s in slices) for k in ("requests", "seconds", "cpu_s"))
    client = sum(s["client_cpu_s_per_1k"] * s["requests"] / 1000 for s in slices if s["requests"])
    return {"requests": done, "errors": sum(s["errors"] for s in slices), "seconds": seconds, "rps": done / seconds,
            "cpu_s": cpu, "cpu_s_per_1k": cpu / done * 1000 if done else None, "processes": slices[0]["processes"],
            "client_cpu_s_per_1k": client / done * 1000 if done else None,
            "other_cores": float(np.mean([s["other_cores"] for s in slices])),
            "slices_rps": [round(s["rps"], 1) for s in slices]}


async def one_stream(url: str, body: dict) -> tuple[float, float, int]:
    """(time to the first non-empty content delta, time to the end, content chunks) of one stream."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        t0 = time.perf_counter()
        first, chunks = None, 0
        async with session.post(url, json={**body, "stream": True}, headers=HEADERS) as r:
            if r.status != 200:
                raise RuntimeError(f"{url} {body['model']}: HTTP {r.status}: {(await r.read())[:300]!r}")
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                data = json.loads(line[6:])
                if any((c.get("delta") or {}).get("content") for c in data.get("choices") or []):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - t0
        total = time.perf_counter() - t0
    if first is None:
        raise RuntimeError(f"{url} {body['model']}: the stream had no content")
    return first, total, chunks


async def streaming(targets: dict[str, tuple[str, dict]], streams: int, rng: random.Random) -> dict[str, dict]:
    names = list(targets)
    for name in names:  # warm-up
        await one_stream(*targets[name])
    out = {name: {"ttft": [], "total": [], "chunks": []} for name in names}
    for _ in range(streams):
        rng.shuffle(names)
        for name in names:
            first, total, chunks = await one_stream(*targets[name])
            out[name]["ttft"].append(first)
            out[name]["total"].append(total)
            out[name]["chunks"].append(chunks)
    return out


# -- report -----------------------------------------------------------------------------------------
def med(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def summarise(rounds: list[dict], proxy: bool) -> dict:
    lat_names = list(rounds[0]["latency"])
    tp_names = list(rounds[0]["throughput"])
    st_names = list(rounds[0]["streams"])
    targets = {}
    for name in lat_names:
        e = {"p50_ms": med(r["latency"][name]["p50_ms"] for r in rounds),
             "p99_ms": med(r["latency"][name]["p99_ms"] for r in rounds)}
        if name != "direct":
            e["added_p50_ms"] = med(r["latency"][name]["added_p50_ms"] for r in rounds)
            e["added_p99_ms"] = med(r["latency"][name]["added_p99_ms"] for r in rounds)
        if name in tp_names:
            e["rps"] = med(r["throughput"][name]["rps"] for r in rounds)
            e["cpu_s_per_1k_requests"] = med(r["throughput"][name]["cpu_s_per_1k"] for r in rounds)
            e["errors"] = int(sum(r["throughput"][name]["errors"] for r in rounds))
            e["processes"] = rounds[0]["throughput"][name]["processes"]
            e["other_cores_during_slices"] = [round(r["throughput"][name]["other_cores"], 2) for r in rounds]
        targets[name] = e
    streams = {}
    for name in st_names:
        e = {"ttft_p50_ms": med(r["streams"][name]["ttft_p50_ms"] for r in rounds),
             "total_p50_ms": med(r["streams"][name]["total_p50_ms"] for r in rounds),
             "content_chunks": rounds[0]["streams"][name]["content_chunks"]}
        if name != "direct":
            e["added_ttft_p50_ms"] = med(r["streams"][name]["added_ttft_p50_ms"] for r in rounds)
            e["added_total_p50_ms"] = med(r["streams"][name]["added_total_p50_ms"] for r in rounds)
        streams[name] = e
    report = {"targets": targets, "streams": streams}

    def per_round(phase: str, name: str, key: str, base: str) -> list[float | None]:
        return [ratio(r[phase][name][key], r[phase][base][key]) for r in rounds]

    if proxy:
        # each round is a paired, interleaved comparison: a ratio is the median of the per-round ratios
        ratios = {}
        for label, name, stream_pass, stream_route in (
                ("iapo (default config)", "iapo", "iapo passthrough", "iapo N=1 route"),
                ("iapo passthrough (default config)", "iapo passthrough", "iapo passthrough", None),
                ("iapo, store.ack: queued", "iapo store.ack=queued", None, None),
                ("iapo, transport: litellm", "iapo transport=litellm", "iapo transport=litellm passthrough",
                 "iapo transport=litellm N=1 route"),
                ("iapo passthrough, transport: litellm", "iapo transport=litellm passthrough",
                 "iapo transport=litellm passthrough", None)):
            rounds_of = {"added_p50": per_round("latency", name, "added_p50_ms", "litellm-proxy"),
                         "rps": per_round("throughput", name, "rps", "litellm-proxy"),
                         "cpu_per_request": per_round("throughput", name, "cpu_s_per_1k", "litellm-proxy")}
            if stream_pass:
                rounds_of["added_ttft_passthrough"] = per_round("streams", stream_pass, "added_ttft_p50_ms",
                                                                "litellm-proxy")
            if stream_route:
                rounds_of["added_ttft_n1_route"] = per_round("streams", stream_route, "added_ttft_p50_ms",
                                                             "litellm-proxy")
            ratios[label] = {**{k: med(v) for k, v in rounds_of.items()},
                             "per_round": {k: [round(x, 3) if x is not None else None for x in v]
                                           for k, v in rounds_of.items()}}
        report["ratios_vs_litellm_proxy"] = ratios
        d = ratios["iapo (default config)"]

        def met(value: float | None, bound: float, above: bool = False) -> bool | None:
            return None if value is None else (value >= bound if above else value <= bound)

        report["goals (default config, N=1 route)"] = {
            "added_p50 <= 0.2x": met(d["added_p50"], 0.2),
            "rps >= 3.5x": met(d["rps"], 3.5, above=True),
            "cpu_per_request <= 0.25x": met(d["cpu_per_request"], 0.25),
            "added_ttft <= 0.3x (passthrough)": met(d["added_ttft_passthrough"], 0.3),
            "added_ttft <= 0.3x (N=1 route)": met(d["added_ttft_n1_route"], 0.3),
        }
    a, q = "iapo", "iapo store.ack=queued"
    report["ack_cost (after_commit - queued, N=1 route)"] = {
        "added_p50_ms": med(r["latency"][a]["p50_ms"] - r["latency"][q]["p50_ms"] for r in rounds),
        "added_p99_ms": med(r["latency"][a]["p99_ms"] - r["latency"][q]["p99_ms"] for r in rounds),
        "rps_after_commit": targets[a]["rps"], "rps_queued": targets[q]["rps"],
        "rps_ratio": med(per_round("throughput", a, "rps", q)),
        "cpu_s_per_1k_after_commit": targets[a]["cpu_s_per_1k_requests"],
        "cpu_s_per_1k_queued": targets[q]["cpu_s_per_1k_requests"],
        "per_round_p50_ms": [round(r["latency"][a]["p50_ms"] - r["latency"][q]["p50_ms"], 3) for r in rounds],
        "per_round_rps_ratio": [round(x, 3) for x in per_round("throughput", a, "rps", q)],
        "cost_at_p50 <= 1 ms": None}
    cost = report["ack_cost (after_commit - queued, N=1 route)"]
    cost["cost_at_p50 <= 1 ms"] = cost["added_p50_ms"] <= 1.0
    return report


def round_figures(lat: dict, tp: dict, st: dict) -> dict:
    d50, d99 = (float(np.percentile(lat["direct"], q) * 1e3) for q in (50, 99))
    latency_fig = {}
    for name, t in lat.items():
        p50, p99 = float(np.percentile(t, 50) * 1e3), float(np.percentile(t, 99) * 1e3)
        latency_fig[name] = {"p50_ms": p50, "p99_ms": p99, "added_p50_ms": p50 - d50, "added_p99_ms": p99 - d99}
    s_ttft = float(np.median(st["direct"]["ttft"]) * 1e3)
    s_total = float(np.median(st["direct"]["total"]) * 1e3)
    streams_fig = {}
    for name, s in st.items():
        ttft, total = float(np.median(s["ttft"]) * 1e3), float(np.median(s["total"]) * 1e3)
        streams_fig[name] = {"ttft_p50_ms": ttft, "total_p50_ms": total, "added_ttft_p50_ms": ttft - s_ttft,
                             "added_total_p50_ms": total - s_total,
                             "content_chunks": int(np.median(s["chunks"])),
                             "ttft_ms_all": [round(v * 1e3, 2) for v in s["ttft"]]}
    return {"latency": latency_fig, "throughput": tp, "streams": streams_fig}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="repetitions of everything; medians reported")
    parser.add_argument("--requests", type=int, default=300, help="latency samples per target per round")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds of one throughput slice")
    parser.add_argument("--passes", type=int, default=3, help="throughput slices per target per round (interleaved)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--streams", type=int, default=10, help="streams per target per round")
    parser.add_argument("--chunks", type=int, default=10, help="content chunks per upstream stream")
    parser.add_argument("--chunk-delay", type=float, default=0.1, help="seconds before each content chunk")
    parser.add_argument("--skip-litellm-proxy", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "overhead.json"))
    parser.add_argument("--from-json", help="re-summarise the rounds of an earlier run's JSON (no measuring)")
    args = parser.parse_args()
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        report.update(summarise(report["rounds"], "litellm-proxy" in report["rounds"][0]["latency"]))
        report["settings"]["figures"] = FIGURES
        report["rounds"] = report.pop("rounds")  # keep the rounds last
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(json.dumps({k: v for k, v in report.items() if k != "rounds"}, indent=1))
        return
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="iapo-overhead-"))
    procs: dict[str, subprocess.Popen] = {}
    started, load_at_start = time.time(), os.getloadavg()
    try:
        ports = {name: free_port() for name in ("replay", "scripted", "iapo", "iapo-litellm", "iapo-queued", "proxy")}
        url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        procs["replay"] = start([sys.executable, "-m", "gateway.cli", "replay", "--env", "replay-mv=synthetic-mv",
                                 "--port", str(ports["replay"])], f"{url['replay']}/v1/models", work / "replay.log")
        procs["scripted"] = start([sys.executable, "-c", SCRIPTED, str(ports["scripted"]), str(args.chunks),
                                   str(args.chunk_delay), STREAM_TEXT], f"{url['scripted']}/v1/models",
                                  work / "scripted.log")
        variants = (("iapo", {}), ("iapo-litellm", {"transport": "litellm"}), ("iapo-queued", {"ack": "queued"}))
        for name, options in variants:
            config = iapo_config(url["replay"], url["scripted"], work / f"{name}.db", **options)
            (work / f"{name}.yaml").write_text(yaml.safe_dump(config))
            procs[name] = start([sys.executable, "-m", "gateway.cli", "serve", "--config", str(work / f"{name}.yaml"),
                                 "--port", str(ports[name])], f"{url[name]}/healthz", work / f"{name}.log")
        if not args.skip_litellm_proxy:
            binary = litellm_proxy_binary()
            (work / "litellm.yaml").write_text(yaml.safe_dump(litellm_config(url["replay"], url["scripted"])))
            procs["proxy"] = start([str(binary), "--config", str(work / "litellm.yaml"), "--port", str(ports["proxy"]),
                                    "--num_workers", "1"], f"{url['proxy']}/health/liveliness", work / "litellm.log",
                                   timeout=300)
        chat = lambda server: f"{url[server]}/v1/chat/completions"  # noqa: E731
        body = lambda model: {"model": model, "messages": MESSAGES}  # noqa: E731
        # name -> (server, model)
        lat_targets = {
            "direct": ("replay", "replay-mv"),
            "iapo": ("iapo", "bench-n1"),
            "iapo N=8": ("iapo", "bench-n8"),
            "iapo passthrough": ("iapo", "replay"),
            "iapo transport=litellm": ("iapo-litellm", "bench-n1"),
            "iapo transport=litellm N=8": ("iapo-litellm", "bench-n8"),
            "iapo transport=litellm passthrough": ("iapo-litellm", "replay"),
            "iapo store.ack=queued": ("iapo-queued", "bench-n1"),
        }
        stream_targets = {
            "direct": ("scripted", "scripted"),
            "iapo passthrough": ("iapo", "scripted"),
            "iapo N=1 route": ("iapo", "stream-n1"),
            "iapo transport=litellm passthrough": ("iapo-litellm", "scripted"),
            "iapo transport=litellm N=1 route": ("iapo-litellm", "stream-n1"),
        }
        if "proxy" in procs:
            lat_targets["litellm-proxy"] = ("proxy", "replay")
            stream_targets["litellm-proxy"] = ("proxy", "scripted")
        tp_names = [n for n in lat_targets if not n.endswith("N=8")]
        lat = {n: (chat(s), body(m)) for n, (s, m) in lat_targets.items()}
        st = {n: (chat(s), body(m)) for n, (s, m) in stream_targets.items()}
        rounds = []
        for k in range(args.rounds):
            t_round = time.time()
            print(f"round {k + 1}/{args.rounds}: latency", flush=True)
            lat_times = asyncio.run(latency(lat, args.requests, rng))
            print(f"round {k + 1}/{args.rounds}: throughput", flush=True)
            slices: dict[str, list[dict]] = {name: [] for name in tp_names}
            pgids = [proc.pid for proc in procs.values()]
            for one_pass in range(args.passes):  # short slices, targets rotated, so every target sees the same noise
                shift = (k * args.passes + one_pass) % len(tp_names)
                for name in tp_names[shift:] + tp_names[:shift]:
                    server = lat_targets[name][0]
                    slices[name].append(asyncio.run(throughput(*lat[name], args.seconds, args.concurrency,
                                                               procs[server].pid, pgids)))
            tp = {name: combine(slices[name]) for name in tp_names}
            for name, f in tp.items():
                print(f"  {name}: {f['rps']:.0f} req/s, {f['cpu_s_per_1k'] or 0:.2f} CPU s per 1k "
                      f"(other processes: {f['other_cores']:.2f} cores)", flush=True)
            print(f"round {k + 1}/{args.rounds}: streams", flush=True)
            streams = asyncio.run(streaming(st, args.streams, rng))
            figures = round_figures(lat_times, tp, streams)
            figures["seconds"] = time.time() - t_round
            figures["load_average_after"] = os.getloadavg()
            rounds.append(figures)
            for name, f in figures["latency"].items():
                print(f"  {name}: p50 {f['p50_ms']:.2f} ms (+{f['added_p50_ms']:.2f})", flush=True)
            for name, f in figures["streams"].items():
                print(f"  stream {name}: ttft {f['ttft_p50_ms']:.1f} ms (+{f['added_ttft_p50_ms']:.1f}), "
                      f"total {f['total_p50_ms']:.0f} ms", flush=True)
        report = {
            "settings": {
                "rounds": args.rounds, "latency_requests_per_target_per_round": args.requests,
                "throughput_seconds_per_slice": args.seconds,
                "throughput_slices_per_target_per_round": args.passes, "concurrency": args.concurrency,
                "streams_per_target_per_round": args.streams, "stream_content_chunks": args.chunks,
                "stream_chunk_delay_s": args.chunk_delay, "cpus": os.cpu_count(),
                "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
                "python": platform.python_version(),
                "litellm_in_iapo": _version("litellm"), "litellm_proxy": venv_litellm_version(),
                "client": f"aiohttp {_version('aiohttp')}", "seconds": None,
                "figures": FIGURES},
        }
        report.update(summarise(rounds, "proxy" in procs))
        report["rounds"] = rounds
        report["settings"]["seconds"] = round(time.time() - started, 1)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        print(json.dumps({k: v for k, v in report.items() if k != "rounds"}, indent=1))
    finally:
        for proc in procs.values():
            stop(proc)
        if os.environ.get("OVERHEAD_KEEP_WORK"):  # the servers' logs and configs, for a look afterwards
            print("kept", work, flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
