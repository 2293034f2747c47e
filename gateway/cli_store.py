"""`iapo train`, `iapo policy`, `iapo keys`: thin shells over the trainer and the store. They print and
choose exit codes; the library calls return values and raise domain errors."""
from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import time

log = logging.getLogger("iapo.cli")


class CliError(Exception):
    """A problem to print as `iapo: <message>` with an exit code (2: usage, config or store)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def settings_of(args):
    from gateway.config import load_config

    return load_config(getattr(args, "config", None))


def store_path(args, *, must_exist: bool) -> str:
    """The store the command works on: --db, else the config's store.url; a clear error when a SQLite
    file is not there (a PostgreSQL URL is checked by connecting)."""
    from store.database import is_postgres

    path = getattr(args, "db", None) or settings_of(args).store.url
    if is_postgres(path):
        return path
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"the store's folder {folder} does not exist (store.url is {path!r})")
    if must_exist and not os.path.exists(path):
        raise CliError(f"no store at {path}: start the gateway once, or pass --db / --config")
    return path


def open_store(args, *, must_exist: bool = True):
    from store.database import open_database

    return open_database(store_path(args, must_exist=must_exist))


# -- train ------------------------------------------------------------------------------------------
class Progress:
    """A one-line bar on a terminal, plain log lines otherwise."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.open = False

    def __call__(self, p) -> None:
        if self.tty:
            width = 30
            done = int(width * p.completions / max(p.budget, 1))
            self.stream.write(f"\r{p.route}: [{'#' * done}{'.' * (width - done)}] round {p.round} "
                              f"{p.completions}/{p.budget} completions ${p.dollars:.4f}")
            self.stream.flush()
            self.open = True
        else:
            log.info("%s: round %d, %d/%d completions, $%.4f", p.route, p.round, p.completions, p.budget, p.dollars)

    def close(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.open = False


def summary(report) -> str:
    """The end-of-run table: per tier old arm → new arm and the estimated gain."""
    lines = [f"route {report.route}: {report.status}" + (f" (version {report.version})" if report.version else "")
             + (f": {report.message}" if report.message else "")]
    if report.status == "dry-run":
        for i, r in enumerate(report.rounds, 1):
            lines.append(f"  round {i:2d}: {r['pulls']:4d} pulls, {r['completions']:6d} completions, "
                         f"≤ ${r['worst_dollars']:.4f}")
        lines.append(f"  total: {report.completions} completions of budget {report.budget}, ≤ ${report.dollars:.4f}"
                     f" on {report.queries} training queries")
        return "\n".join(lines)
    if report.status == "refused":
        return "\n".join(lines)
    resumed = f", resumed run {report.run_id} ({report.replayed_completions} completions replayed)" \
        if report.resumed else ""
    lines.append(f"  {report.queries} training queries, {report.completions}/{report.budget} completions, "
                 f"${report.dollars:.4f}, {report.saved_completions} completions reused from served traffic{resumed}, "
                 f"{report.wall_s:.1f} s")
    if report.changes:
        lines.append(f"  {'tier':8s} {'old arm':>16s} -> {'new arm':16s} {'value':>8s} {'± s.e.':>7s} {'est. gain':>10s}")
        for c in report.changes:
            gain = c.new_value - c.old_value if not math.isnan(c.old_value) else float("nan")
            lines.append(f"  {c.tier:8s} {f'({c.old.prompt_id}, N={c.old.n})':>16s} -> "
                         f"{_arm(c.new):16s} {c.new_value:8.4f} {c.new_se:7.4f} {gain:+10.4f}")
    return "\n".join(lines)


def cmd_train(args) -> int:
    from gateway.trainer import TrainingRefused, train_routes

    settings = settings_of(args)
    if getattr(args, "db", None):
        settings.store.url = args.db
    store_path(args, must_exist=False)
    if args.status:
        return train_status(settings, args)
    if args.no_wait:
        settings.train.batch_wait_seconds = 0.0
    progress = Progress()
    try:
        reports = asyncio.run(train_routes(settings, args.route, budget=args.budget, dry_run=args.dry_run,
                                           publish_partial=args.publish_partial, resume=not args.fresh,
                                           on_progress=progress))
    except TrainingRefused as exc:
        raise CliError(str(exc)) from None
    finally:
        progress.close()
    for report in reports:
        print(summary(report))
    if any(r.status == "refused" for r in reports):
        return 2
    return 0 if all(r.status in ("published", "dry-run", "waiting") for r in reports) else 1


def train_status(settings, args) -> int:
    """`iapo train --status`: each route's unfinished run, how far it got, and where its batches stand."""
    from store.training_runs import TrainingBatches, TrainingRuns

    db = open_store(args)
    runs, batches = TrainingRuns(db), TrainingBatches(db)
    for route in settings.routes:
        if args.route and route.model != args.route:
            continue
        run = runs.unfinished(route.model)
        if run is None:
            last = runs.list(route.model, limit=1)
            print(f"route {route.model}: no unfinished run" + (f" (last: {last[0].run_id} {last[0].status})"
                                                                if last else ""))
            continue
        print(f"route {route.model}: run {run.run_id} {run.status}, {run.spent}/{run.budget} completions, "
              f"${run.dollars:.4f}")
        for b in batches.list(run.run_id):
            print(f"  round {b['round']:2d}: batch {b['batch_id']} {b['status']} ({b['requests']} pulls)")
    return 0


# -- policy -----------------------------------------------------------------------------------------
def _value(v: float | None, se: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"  value {v:.4f}" + (f" ± {se:.4f}" if se is not None and not math.isnan(se) else "")


def cmd_policy(args) -> int:
    from store.policy_store import PolicyStore, PolicyVersionMissing

    store = PolicyStore(open_store(args))
    if args.action == "show":
        version = args.version if args.version is not None else store.latest_version()
        entries = store.entries(version)
        if version != 0 and not entries:
            raise CliError(f"policy version {version} does not exist (the newest is {store.latest_version()})")
        print(f"policy version {version}" + ("" if entries else " (the configured start arms)"))
        for e in entries:
            stop = f" stop={e.arm.stop}" if e.arm.stop else ""
            print(f"  {e.route:12s} {e.tier:8s} prompt={e.arm.prompt_id:8s} n={e.arm.n:<3d}{stop}{_value(e.value, e.value_se)}")
            for a in e.ranked[1:args.alternatives + 1]:
                cost = f"  cost ${a.cost:.5f}" if not math.isnan(a.cost) else ""
                print(f"  {'':12s} {'':8s}   or {a.prompt_id:8s} n={a.n:<3d}{_value(a.value, a.value_se)}{cost}")
        return 0
    if args.action == "list":
        for v in store.versions():
            print(f"  v{v['version']:<4d} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(v['created']))}"
                  f"  run={v['run_id'] or '-'}  {v['note'] or ''}")
        return 0
    if args.action == "diff":
        latest = store.latest_version()
        for version in (args.a, args.b):
            if version < 0 or version > latest or (version and not store.entries(version)):
                raise CliError(f"policy version {version} does not exist (the newest is {latest})")
        a = {(e.route, e.tier): e.arm for e in store.entries(args.a)}
        b = {(e.route, e.tier): e.arm for e in store.entries(args.b)}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                print(f"  {key[0]:12s} {key[1]:8s} {_arm(a.get(key))} -> {_arm(b.get(key))}")
        return 0
    try:
        version = store.rollback(args.version)
    except PolicyVersionMissing as exc:
        raise CliError(str(exc)) from None
    print(f"published version {version} (a copy of version {args.version})")
    return 0


def _arm(arm) -> str:
    if not arm:
        return "(start arm)"
    return f"({arm.prompt_id}, N≤{arm.n} {arm.stop})" if arm.stop else f"({arm.prompt_id}, N={arm.n})"


# -- keys -------------------------------------------------------------------------------------------
def cmd_keys(args) -> int:
    from gateway.config import hash_key
    from store.keys import KeyStore

    if args.action == "hash":
        print(hash_key(args.key))
        return 0
    settings = settings_of(args)
    keys = KeyStore(open_store(args, must_exist=args.action == "list"))
    if args.action == "create":
        from gateway.console import create_key

        secret, record = create_key(keys, settings, tier=args.tier, name=args.name, admin=args.admin)
        what = "admin key" if args.admin else f"key for tier {args.tier}"
        print(f"{secret}\n(store it now: only its hash is kept; {what}, name {record.name}, id {record.id})")
        return 0
    if args.action == "list":
        for k in keys.list():
            state = "revoked" if k.revoked else "active"
            print(f"  {k.name or '-':16s} {k.role:6s} {k.tier or '-':10s} {state:8s} {k.id}")
        return 0
    from gateway.console import ConsoleError, revoke_key

    try:
        revoked = revoke_key(keys, args.key)
    except ConsoleError as exc:
        raise CliError(str(exc), code=1) from None
    print(f"revoked {revoked} key(s)")
    return 0


# -- db ---------------------------------------------------------------------------------------------
def cmd_db(args) -> int:
    """`iapo db upgrade`: bring the store to the newest schema (safe with replicas starting at once);
    `iapo db copy --to URL`: copy a SQLite store's history into another store (e.g. PostgreSQL)."""
    from store.copy import copy_store
    from store.database import open_database

    if args.action == "upgrade":
        db = open_database(store_path(args, must_exist=False))
        print(f"store {db.url}: schema version {db.version()} ({db.dialect})")
        return 0
    source = open_store(args)
    target = open_database(args.to)
    counts = copy_store(source, target)
    for table, count in counts.items():
        print(f"  {table:22s} {count:8d} rows")
    print(f"copied {sum(counts.values())} rows from {source.url} to {target.url}")
    return 0
