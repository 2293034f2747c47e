"""Several replicas, one truth (issue 15): three `iapo serve` processes (uvicorn, own ports) on one
PostgreSQL database, against the replay upstream.

- 200 concurrent requests spread over the three against one tier cap: the spend stays under the cap
  (plus at most one reservation), no reservation is left, and every answered request has exactly one
  `requests` row and its N `completions` rows (`store.ack: after_commit`: answered means committed);
- a policy published while they serve (and a rollback through the CLI) reaches all three;
- a key revoked through one replica's admin API (and one revoked by `iapo keys revoke --db`) is refused
  by all three within 1 s (each replica caches a key lookup for 0.5 s; the measured delays are printed);
- kill -9 of one replica under load loses nothing that any replica acknowledged.

Each test has its own fresh database on the session's throwaway cluster (`postgres` fixture).
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.access import CACHE_SECONDS
from gateway.config import hash_key
from policies.arms import Arm
from sandbox.demo import replay_route, replay_upstream
from sandbox.replay import problem_text
from sandbox.servers import free_port
from store.database import open_database
from store.keys import KeyStore
from store.policy_store import PolicyEntry, PolicyStore
from store.spend import SpendLedger

REPLICAS = 3
N = 2  # completions per request on the route (the start arm)
MAX_TOKENS = 1200  # the replay route's token limit (sandbox.demo.replay_route)
PRICE_PER_1K = 0.01  # the replay upstream's completion price (prompt tokens are free)
WORST = N * MAX_TOKENS * PRICE_PER_1K / 1000  # $0.024: what one request reserves
CAP = 100.5 * WORST  # per_day cap of the `capped` tier: at least 100 worst cases fit, 200 real costs do not
KEYS = {"capped": "k-replicas-capped", "open": "k-replicas-open", "roomy": "k-replicas-roomy"}
ADMIN = "k-replicas-admin"
POLL_S = 0.2  # store.policy_poll_seconds
ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
ENV.pop("PROMETHEUS_MULTIPROC_DIR", None)


def write_config(folder: Path, url: str, replay, env) -> Path:
    cfg = {
        "upstreams": {"u": replay_upstream(replay.url, "replay-mv")},
        "routes": [replay_route("math", "u", env, base_url=replay.url, env_name="replay-mv",
                                start={"default": {"prompt": "p4", "n": N}})],
        # `roomy` has a cap that never binds: its requests still reserve and settle
        "tiers": [{"name": "capped", "caps": {"per_day": {"dollars": CAP}}}, {"name": "open"},
                  {"name": "roomy", "caps": {"per_day": {"dollars": 1000.0}}}],
        "default_tier": "open",
        "access": {"require_key": True},
        "api_keys": [{"hash": hash_key(key), "tier": tier, "name": f"cfg-{tier}"} for tier, key in KEYS.items()],
        "admin_keys": [{"hash": hash_key(ADMIN), "name": "ops"}],
        "store": {"url": url, "policy_poll_seconds": POLL_S},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Replicas:
    """Three `iapo serve` processes on one config (one database), started in parallel."""

    def __init__(self, folder: Path, config: Path, url: str) -> None:
        from conftest import serve_process

        self.folder, self.config, self.db_url = folder, config, url
        self.ports = [free_port() for _ in range(REPLICAS)]
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.logs = [folder / f"replica{i}.log" for i in range(REPLICAS)]
        files = [log.open("w") for log in self.logs]
        with ThreadPoolExecutor(REPLICAS) as pool:
            self.procs = list(pool.map(lambda i: serve_process(str(config), self.ports[i], stdout=files[i]),
                                       range(REPLICAS)))

    def tail(self, i: int) -> str:
        return self.logs[i].read_text()[-3000:]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def replicas(tmp_path, postgres, replay, synthetic_envs):
    url = postgres.create_database()
    config = write_config(tmp_path, url, replay, synthetic_envs["replay-mv"])
    open_database(url)  # the schema once, before three processes race to create it (they may; it is locked)
    started = []

    def start() -> Replicas:
        r = Replicas(tmp_path, config, url)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def body(q: int) -> dict:
    return {"model": "math", "messages": [{"role": "user", "content": problem_text(q)}]}


def auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


async def burst(urls: list[str], count: int, key: str) -> list[dict]:
    """`count` requests at once, request i to replica i mod len(urls); one outcome per request."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def one(i: int) -> dict:
            replica = i % len(urls)
            r = await client.post(f"{urls[replica]}/v1/chat/completions", json=body(i), headers=auth(key))
            return {"replica": replica, "status": r.status_code, "headers": r.headers,
                    "id": r.json()["id"] if r.status_code == 200 else None,
                    "code": r.json()["error"]["code"] if r.status_code != 200 else None}
        return await asyncio.gather(*(one(i) for i in range(count)))


def check_rows(db, answered: dict[str, int]) -> dict:
    """Every acknowledged request (id -> N) has exactly one requests row with status 200 and N completion
    rows (idx 0..N-1); nothing is half-written or orphaned anywhere in the store."""
    ids = list(answered)
    rows = {r["id"]: r for r in db.query("select id, n, status from requests where id = any(?)", [ids])}
    missing = [i for i in ids if i not in rows]
    assert not missing, f"{len(missing)} acknowledged request(s) have no requests row, e.g. {missing[:3]}"
    assert all(rows[i]["status"] == 200 and rows[i]["n"] == n for i, n in answered.items())
    comps = {}
    for r in db.query("select request_id, count(*) as k, count(distinct idx) as d, min(idx) as lo, max(idx) as hi"
                      " from completions where request_id = any(?) group by request_id", [ids]):
        comps[r["request_id"]] = (r["k"], r["d"], r["lo"], r["hi"])
    wrong = {i: comps.get(i) for i, n in answered.items() if comps.get(i) != (n, n, 0, n - 1)}
    assert not wrong, f"completion rows differ from N for {len(wrong)} request(s): {list(wrong.items())[:3]}"
    half = db.query("select count(*) as k from requests r where r.status = 200 and r.n !="
                    " (select count(*) from completions c where c.request_id = r.id)")[0]["k"]
    orphans = db.query("select count(*) as k from completions c left join requests r on r.id = c.request_id"
                       " where r.id is null")[0]["k"]
    dup = db.query("select count(*) as k from (select id from requests group by id having count(*) > 1) d")[0]["k"]
    assert (half, orphans, dup) == (0, 0, 0)
    return {"acknowledged": len(ids), "rows": len(rows)}


# -- 1. one cap, three replicas, 200 concurrent requests --------------------------------------------
def test_200_concurrent_requests_over_three_replicas_respect_one_cap(replicas):
    group = replicas()
    db = open_database(group.db_url)
    held, done = [], threading.Event()

    def watch() -> None:  # what the live reservations are while the burst runs
        while not done.is_set():
            held.append(db.query("select count(*) as k, coalesce(max(dollars), 0) as top,"
                                 " coalesce(min(dollars), 0) as low from reservations")[0])
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        outcomes = asyncio.run(burst(group.urls, 200, KEYS["capped"]))
    finally:
        done.set()
        watcher.join(10)
    statuses = [o["status"] for o in outcomes]
    assert set(statuses) <= {200, 429}, [o for o in outcomes if o["status"] not in (200, 429)][:3]
    assert all(o["code"] == "budget_exhausted" for o in outcomes if o["status"] == 429)
    ok = [o for o in outcomes if o["status"] == 200]
    per_replica = [sum(1 for o in ok if o["replica"] == i) for i in range(REPLICAS)]
    # a request is refused only when spend + live reservations + its worst case > cap, and every
    # admitted request adds at most one worst case, so at least 100 fit; 200 real costs do not
    assert 100 <= len(ok) < 200, statuses
    assert all(k > 0 for k in per_replica), per_replica
    assert all(o["headers"]["x-iapo-n"] == str(N) for o in ok)

    seen = [h for h in held if h["k"]]
    assert seen and all(h["top"] == h["low"] == pytest.approx(WORST) for h in seen)  # one request reserves WORST
    ledger = SpendLedger(db)
    spent = [r for r in ledger.current() if r["scope"] == "tier:capped" and r["window"] == "per_day"]
    assert len(spent) == 1
    dollars = spent[0]["dollars"]
    live = db.query("select count(*) as k from reservations")[0]["k"]
    logged = db.query("select coalesce(sum(cost), 0) as c, count(*) as k from requests where tier = 'capped'")[0]
    print(f"\n200 requests over {REPLICAS} replicas: {len(ok)} answered 200 ({per_replica} per replica), "
          f"{statuses.count(429)} refused 429; spend ${dollars:.4f} of the ${CAP:.4f} cap "
          f"(one reservation: ${WORST:.3f}); at most {max(h['k'] for h in seen)} reservations live at once; "
          f"reservation rows left: {live}")
    assert dollars <= CAP + WORST + 1e-9  # the bound
    assert dollars <= CAP + 1e-9  # and the design's: spend + live reservations <= cap at every booking
    assert live == 0, db.query("select * from reservations")
    assert logged["k"] == len(ok)  # refusals write no requests row; every 200 wrote exactly one
    assert logged["c"] == pytest.approx(dollars, abs=1e-9)  # the ledger and the log agree
    check_rows(db, {o["id"]: N for o in ok})


# -- 2. a published policy reaches every replica ----------------------------------------------------
class Background:
    """Steady traffic on every replica (one client loop each) recording what each answer said."""

    def __init__(self, urls: list[str], key: str, interval: float = 0.02) -> None:
        self.urls, self.key, self.interval = urls, key, interval
        self.records: list[list[dict]] = [[] for _ in urls]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(len(urls))]

    def _loop(self, i: int) -> None:
        with httpx.Client(timeout=30) as client:
            q = 0
            while not self._stop.is_set():
                q += 1
                sent = time.time()
                r = client.post(f"{self.urls[i]}/v1/chat/completions", json=body(q), headers=auth(self.key))
                self.records[i].append({"sent": sent, "received": time.time(), "status": r.status_code,
                                        "version": r.headers.get("x-iapo-policy-version"),
                                        "prompt": r.headers.get("x-iapo-prompt"), "n": r.headers.get("x-iapo-n"),
                                        "id": r.json()["id"] if r.status_code == 200 else None})
                self._stop.wait(self.interval)

    def __enter__(self) -> Background:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def wait_count(self, count: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while any(len(r) < count for r in self.records):
            assert time.monotonic() < deadline, [len(r) for r in self.records]
            time.sleep(0.02)

    def first(self, i: int, version: str, after: float) -> dict | None:
        return next((r for r in self.records[i] if r["sent"] >= after and r["version"] == version), None)

    def wait_all(self, version: str, after: float, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            firsts = [self.first(i, version, after) for i in range(len(self.urls))]
            if all(firsts):
                return firsts
            assert time.monotonic() < deadline, f"version {version} did not reach replicas " \
                f"{[i for i, f in enumerate(firsts) if f is None]} within {timeout} s"
            time.sleep(0.02)


def test_a_policy_published_while_serving_reaches_all_three(replicas):
    group = replicas()
    db = open_database(group.db_url)
    with Background(group.urls, KEYS["open"]) as load:
        load.wait_count(3)
        assert all(x["status"] == 200 and x["version"] == "0" for r in load.records for x in r), load.records
        started = time.time()
        store = PolicyStore(db)
        version = store.publish([PolicyEntry("math", "open", Arm("p2", 3)),
                                 PolicyEntry("math", "capped", Arm("p2", 3))], note="replicas test")
        assert version == 1
        firsts = load.wait_all("1", started)
        # and back, through the CLI on the same database: version 2 is a copy of version 0 (the start arms)
        started = time.time()
        rolled = subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "--config", str(group.config),
                                 "--db", group.db_url, "rollback", "0"], env=ENV, capture_output=True, text=True, check=False,
                                timeout=60)
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        assert "published version 2" in rolled.stdout
        seconds = load.wait_all("2", started)
        time.sleep(0.5)
    # from each version's `created` (stamped inside the publishing transaction, so just before its commit)
    created = {v["version"]: v["created"] for v in store.versions()}
    delays = [f["received"] - created[1] for f in firsts]
    rollback_delays = [f["received"] - created[2] for f in seconds]
    print(f"\npolicy v1 answered by each replica {[round(d, 3) for d in delays]} s after it was published; "
          f"rollback v2 (CLI) {[round(d, 3) for d in rollback_delays]} s (policy_poll_seconds {POLL_S})")
    served = 0
    for i, records in enumerate(load.records):
        assert all(r["status"] == 200 for r in records), group.tail(i)
        v1_at = firsts[i]["received"]
        v2_at = seconds[i]["received"]
        for r in records:
            served += 1
            expected = {"0": ("p4", str(N)), "1": ("p2", "3"), "2": ("p4", str(N))}[r["version"]]
            assert (r["prompt"], r["n"]) == expected, r
            # once a replica has answered with a version, nothing it starts later is older (no flapping)
            if r["sent"] > v1_at:
                assert r["version"] in ("1", "2"), (i, r)
            if r["sent"] > v2_at:
                assert r["version"] == "2", (i, r)
        assert sum(r["version"] == "1" for r in records) >= 1
    logged = {r["id"]: int(r["policy_version"]) for r in
              db.query("select id, policy_version from requests where kind = 'serve'")}
    for records in load.records:
        for r in records:
            assert logged[r["id"]] == int(r["version"])  # the log says which version served each answer
    assert len(logged) == served


# -- 3. a revoked key is refused by every replica within 1 s ----------------------------------------
class Pollers:
    """One thread per replica sending a request with `key` every `every` seconds until each replica has
    refused it `settle` times (or `timeout`)."""

    def __init__(self, urls: list[str], key: str, every: float = 0.05) -> None:
        self.urls, self.key, self.every = urls, key, every
        self.records: list[list[tuple[float, float, int]]] = [[] for _ in urls]  # (sent, received, status)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(len(urls))]
        for t in self._threads:
            t.start()

    def _loop(self, i: int) -> None:
        with httpx.Client(timeout=10) as client:
            q, next_at = 0, time.monotonic()
            while not self._stop.is_set():
                q += 1
                sent = time.time()
                status = client.post(f"{self.urls[i]}/v1/chat/completions", json=body(q), headers=auth(self.key)).status_code
                self.records[i].append((sent, time.time(), status))
                next_at += self.every
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def wait(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(predicate(r) for r in self.records):
                return True
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


def new_key(keys: KeyStore, tier: str, name: str) -> str:
    """A key created in the store; its secret (`create` returns the secret, or (secret, record))."""
    created = keys.create(tier, name)
    return created[0] if isinstance(created, tuple) else created


def refusal_delays(pollers: Pollers, revoked_at: float) -> list[float | None]:
    """Per replica: seconds from `revoked_at` (wall clock) to the first 401 received; and no 200 after it."""
    delays = []
    for i, records in enumerate(pollers.records):
        first = next((k for k, (_, _, status) in enumerate(records) if status == 401), None)
        if first is None:
            delays.append(None)
            continue
        delays.append(records[first][1] - revoked_at)
        later = [status for sent, _, status in records if sent >= records[first][1]]
        assert all(status == 401 for status in later), (i, later)  # refused once, refused from then on
    return delays


def revoke_through_admin_api(group: Replicas, name: str) -> None:
    r = httpx.post(f"{group.urls[0]}/admin/keys/{name}/revoke", headers=auth(ADMIN), timeout=30)
    assert r.status_code == 200 and r.json() == {"revoked": 1}, r.text


def revoke_through_cli(group: Replicas, name: str) -> None:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "--config", str(group.config),
                          "--db", group.db_url, "revoke", name], env=ENV, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0 and "revoked 1 key(s)" in out.stdout, out.stdout + out.stderr


def test_a_revoked_key_is_refused_by_every_replica_within_one_second(replicas):
    group = replicas()
    db = open_database(group.db_url)
    # one key made through replica 1's admin API (so the others know it only from the store), one by KeyStore
    made = httpx.post(f"{group.urls[1]}/admin/keys", json={"tier": "open", "name": "victim-admin"},
                      headers=auth(ADMIN), timeout=30)
    assert made.status_code == 200, made.text
    victims = [("admin API of replica 0", made.json()["key"], "victim-admin", revoke_through_admin_api),
               ("iapo keys revoke", new_key(KeyStore(db), "open", "victim-cli"), "victim-cli", revoke_through_cli)]
    results = {}
    for how, key, victim_name, revoke in victims:
        pollers = Pollers(group.urls, key)
        try:
            # every replica has served the key (so its key cache holds it as valid: the worst case)
            assert pollers.wait(lambda rs: sum(1 for _, _, s in rs if s == 200) >= 5, 15), pollers.records
            assert all(s == 200 for rs in pollers.records for _, _, s in rs)
            called = time.time()
            revoke(group, victim_name)
            returned = time.time()
            pollers.wait(lambda rs: sum(1 for _, _, s in rs if s == 401) >= 3, 5)
        finally:
            pollers.stop()
        # measured from the `revoked` stamp, taken inside the revoking transaction just before its commit
        # (for the CLI, its interpreter start-up is not propagation)
        revoked = db.query("select revoked from api_keys where name = ?", [victim_name])[0]["revoked"]
        assert called <= revoked <= returned
        delays = refusal_delays(pollers, revoked)
        results[how] = delays
        late = [(i, round(sent - revoked, 3)) for i, rs in enumerate(pollers.records)
                for sent, _, status in rs if status == 200 and sent > revoked + 1.0]
        assert not late, (how, late)  # nothing sent a second after the revocation is served, anywhere
        print(f"\n{how}: first 401 from each replica {[None if d is None else round(d, 3) for d in delays]} s "
              f"after the revoking transaction (the call took {returned - called:.3f} s; key cache "
              f"{CACHE_SECONDS} s, a poll every {pollers.every} s)")
    for how, delays in results.items():
        assert all(d is not None for d in delays), (how, delays)
        # the bound the issue states: each replica's key cache holds a lookup for CACHE_SECONDS (0.5 s),
        # the pollers add ≤ 50 ms and the refused request's own time; the rest is margin for a loaded machine
        assert max(delays) <= 1.0, (how, delays)
    assert db.query("select count(*) as k from api_keys where revoked is not null")[0]["k"] == 2


# -- 4. kill -9 of one replica under load -----------------------------------------------------------
async def steady(urls: list[str], key: str, seconds: float, concurrency: int, kill_after: float, victim: int,
                 kill) -> list[dict]:
    """A closed loop of `concurrency` clients spread over the replicas for `seconds`; `kill` is called
    after `kill_after` s. A client whose replica is gone moves on to the next replica."""
    outcomes: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    stop_at = time.monotonic() + seconds
    counter = iter(range(10**9))
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        async def worker(w: int) -> None:
            replica = w % len(urls)
            while time.monotonic() < stop_at:
                q = next(counter)
                sent = time.monotonic()
                try:
                    r = await client.post(f"{urls[replica]}/v1/chat/completions", json=body(q), headers=auth(key))
                    outcomes.append({"replica": replica, "sent": sent, "status": r.status_code,
                                     "id": r.json()["id"] if r.status_code == 200 else None,
                                     "n": int(r.headers.get("x-iapo-n", 0))})
                except httpx.HTTPError as exc:
                    outcomes.append({"replica": replica, "sent": sent, "status": 0, "id": None, "n": 0,
                                     "error": type(exc).__name__})
                    if replica == victim:
                        replica = (replica + 1) % len(urls)

        async def killer() -> None:
            await asyncio.sleep(kill_after)
            kill()

        await asyncio.gather(killer(), *(worker(w) for w in range(concurrency)))
    return outcomes


def test_kill_9_of_one_replica_under_load_loses_nothing_acknowledged(replicas):
    group = replicas()
    victim = 1
    pid = group.procs[victim].pid
    killed = {}

    def kill() -> None:
        killed["at"] = time.monotonic()
        os.kill(pid, signal.SIGKILL)

    outcomes = asyncio.run(steady(group.urls, KEYS["roomy"], seconds=6.0, concurrency=24, kill_after=2.5,
                                  victim=victim, kill=kill))
    assert group.procs[victim].wait(10) == -signal.SIGKILL
    ok = [o for o in outcomes if o["status"] == 200]
    errors = [o for o in outcomes if o["status"] not in (200, 0)]
    assert not errors, errors[:5]
    failed = [o for o in outcomes if o["status"] == 0]
    assert all(o["replica"] == victim for o in failed), failed[:5]  # only requests to the killed replica failed
    by_replica = [sum(1 for o in ok if o["replica"] == i) for i in range(REPLICAS)]
    victim_acked = [o for o in ok if o["replica"] == victim]
    survivors_after = [o for o in ok if o["replica"] != victim and o["sent"] > killed["at"]]
    assert len(victim_acked) >= 10 and len(survivors_after) >= 20, by_replica
    db = open_database(group.db_url)
    report = check_rows(db, {o["id"]: o["n"] for o in ok})
    # the survivors still serve, and they hold no reservation; anything left is the dead replica's
    owners = [r["owner"] for r in db.query("select owner from reservations")]
    host_pid = [o.split(":")[1] for o in owners]
    print(f"\nkill -9 of replica {victim} at 2.5 s of 6 s: {len(ok)} answered 200 ({by_replica} per replica), "
          f"{len(failed)} connection errors (all to the killed replica), {report['acknowledged']} acknowledged "
          f"requests all with their rows; reservations left: {len(owners)} (all the killed replica's)")
    assert all(p == str(pid) for p in host_pid), owners
    for i in range(REPLICAS):
        if i != victim:
            r = httpx.post(f"{group.urls[i]}/v1/chat/completions", json=body(1), headers=auth(KEYS["open"]), timeout=30)
            assert r.status_code == 200 and httpx.get(f"{group.urls[i]}/healthz").status_code == 200
