"""Shared fixtures: the replay upstream over loopback, a gateway per config, fresh SQLite files."""
from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from pathlib import Path

import pytest
import yaml

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MATH_NPZ = SHARED_DATA / "math_mv.npz"


def require_shared_data() -> Path:
    """../shared/data is required: missing under CI=true fails the test, elsewhere it skips."""
    if MATH_NPZ.exists():
        return MATH_NPZ
    message = f"replay data not found at {MATH_NPZ} (expected ../shared/data beside the repo)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster (the machine's server binaries, as `.ci/run` ensures), one per run.
    Missing binaries fail the test under CI=true and skip it elsewhere."""
    from sandbox.postgres import PostgresCluster, PostgresUnavailable

    try:
        cluster = PostgresCluster().start()
    except PostgresUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    """A fresh store of each backend: a new SQLite file, and a new database on the PostgreSQL cluster."""
    if request.param == "sqlite":
        return str(tmp_path / "iapo.db")
    return request.getfixturevalue("postgres").create_database()


@pytest.fixture(scope="session")
def math_env():
    from policies.environments import MVEnvironment

    return MVEnvironment.load(str(require_shared_data()))


@pytest.fixture(scope="session")
def synthetic_envs():
    from policies.environments import synthetic_bon, synthetic_mv

    return {"replay-mv": synthetic_mv(0), "replay-bon": synthetic_bon(0)}


@pytest.fixture(scope="session")
def replay(math_env, synthetic_envs):
    """One replay upstream (uvicorn on loopback) serving MATH and the synthetic MV/BoN tasks."""
    from sandbox.replay import create_replay_app
    from sandbox.servers import ServerThread

    server = ServerThread(create_replay_app({"replay-math": math_env, **synthetic_envs}, seed=1)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def scripted_server():
    """One scripted OpenAI-compatible upstream (uvicorn on loopback) that records what it receives."""
    from sandbox.scripted import create_scripted_app
    from sandbox.servers import ServerThread

    app = create_scripted_app()
    server = ServerThread(app).start()
    server.state = app.state.scripted
    yield server
    server.stop()


@pytest.fixture
def scripted(scripted_server):
    """The scripted upstream with its default script, no recorded requests and zeroed counters."""
    state = scripted_server.state
    state.script.update({}, reset=True)
    state.records.clear()
    state.clear_stats()
    state.url = scripted_server.url
    return state


@pytest.fixture
def reset_faults(replay):
    import httpx

    yield
    httpx.post(f"{replay.url}/admin/faults", json={"error_rate": 0.0, "latency_ms": 0.0, "spike_rate": 0.0,
                                                      "retry_after": None, "error_status": 500, "drop_rate": 0.0,
                                                      "slow_rate": 0.0, "slow_ms": 0.0})


class RunningGateway:
    """A gateway under uvicorn on loopback, with its config file and SQLite path."""

    def __init__(self, config: dict, tmp: Path) -> None:
        from gateway.app import create_app
        from gateway.config import load_config
        from sandbox.servers import ServerThread

        config.setdefault("store", {})
        config["store"].setdefault("path", str(tmp / "iapo.db"))
        config["store"].setdefault("policy_poll_seconds", 0.1)
        self.config_path = tmp / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.settings = load_config(self.config_path)
        self.db_path = self.settings.store.path
        from gateway.connections import ConnectionLimits

        self.app = create_app(self.settings, str(self.config_path))
        self.server = ServerThread(self.app, limits=ConnectionLimits.from_config(self.settings.limits)).start()
        self.url = self.server.url

    @property
    def gateway(self):
        return self.app.state.gateway

    def rows(self, sql: str, params: list | None = None) -> list[dict]:
        """Query the gateway's store after everything it accepted has been written."""
        import sqlite_utils

        self.gateway.writer.flush()
        return list(sqlite_utils.Database(self.db_path).query(sql, params or []))

    def row(self, request_id: str) -> dict | None:
        rows = self.rows("select * from requests where id = ?", [request_id])
        return rows[0] if rows else None

    def spend(self, scope: str) -> dict:
        """Spent and live-reserved dollars and tokens of `scope` in its current per_day window."""
        from store.database import open_database
        from store.spend import SpendLedger

        ledger = SpendLedger(open_database(self.db_path))
        spent = [r for r in ledger.current() if r["scope"] == scope and r["window"] == "per_day"]
        held = [r for r in ledger.reserved() if r["scope"] == scope and r["window"] == "per_day"]
        ledger.db.conn.close()
        return {"dollars": spent[0]["dollars"] if spent else 0.0, "tokens": spent[0]["tokens"] if spent else 0,
                "reserved": held[0]["dollars"] if held else 0.0}

    def client(self, key: str | None = "none"):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=30)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def start_gateway(tmp_path):
    """Factory: start_gateway(config_dict) -> RunningGateway; all stopped at teardown."""
    running = []

    def start(config: dict, name: str = "gw") -> RunningGateway:
        folder = tmp_path / f"{name}{len(running)}"
        folder.mkdir()
        gw = RunningGateway(config, folder)
        running.append(gw)
        return gw

    yield start
    for gw in running:
        gw.stop()


def serve_process(config: str, port: int, *args: str, env: dict | None = None, stdout=None):
    """`iapo serve` as its own process (real signals, real workers); returns once /healthz answers."""
    import subprocess
    import sys
    import time

    import httpx

    base = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    base["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", config, "--port", str(port), *args],
                            env={**base, **(env or {})}, stdout=stdout or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT if stdout else subprocess.PIPE)
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, \
            (proc.stderr.read().decode()[-2000:] if proc.stderr else "gateway did not start")
        time.sleep(0.2)
