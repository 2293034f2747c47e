"""`iapo`: serve, demo, replay, policy and key commands (thin code over the library)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile

import gateway  # noqa: F401  (sets LITELLM_LOCAL_MODEL_COST_MAP)
from gateway import cli_store


def app_from_env():
    """uvicorn factory for `iapo serve` with several workers: config from IAPO_CONFIG."""
    from gateway.app import create_app
    from gateway.config import load_config

    return create_app(load_config(), os.environ.get("IAPO_CONFIG"))


def cmd_serve(args) -> int:
    import uvicorn

    from gateway.config import ConfigError, load_config

    if args.config:
        os.environ["IAPO_CONFIG"] = os.path.abspath(args.config)
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # several processes: metrics go through prometheus-client's multiprocess files
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="iapo-metrics-")
    from gateway.connections import ConnectionLimits, raise_open_file_limit, uvicorn_options

    try:
        settings = load_config()  # fail fast with a message naming the field
    except ConfigError as exc:
        print(f"iapo: {exc}", file=sys.stderr)
        return 2
    raise_open_file_limit()  # before uvicorn.run: spawned workers inherit it
    limits = ConnectionLimits.from_config(settings.limits)
    uvicorn.run("gateway.cli:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level, access_log=False, **uvicorn_options(limits, workers=args.workers))
    return 0


def cmd_demo(args) -> int:
    import uvicorn
    import yaml

    from gateway.connections import ConnectionLimits, uvicorn_options
    from gateway.app import create_app
    from gateway.config import load_config
    from sandbox.demo import DEMO_KEYS, demo_config
    from sandbox.replay import create_replay_app, problem_text
    from sandbox.servers import ServerThread
    from policies.environments import synthetic_bon, synthetic_mv

    mv, bon = synthetic_mv(seed=args.seed), synthetic_bon(seed=args.seed)
    replay = ServerThread(create_replay_app({"replay-mv": mv, "replay-bon": bon}, seed=args.seed),
                          port=args.upstream_port).start()
    config = demo_config(replay.url, os.path.abspath(args.db), mv, bon)  # absolute: `iapo train` works from anywhere
    path = os.path.join(tempfile.mkdtemp(prefix="iapo-demo-"), "demo.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    settings = load_config(path)
    base = f"http://{args.host}:{args.port}"
    body = json.dumps({"model": "math", "messages": [{"role": "user", "content": problem_text(7)}]})
    print(f"""
iapo demo: replay upstream at {replay.url}, gateway at {base}/v1 (config {path}, store {args.db})
routes: math (majority vote), assist (best-of-N); tiers low / mid / high (keys {', '.join(DEMO_KEYS.values())})

  curl -s {base}/v1/chat/completions -H 'authorization: Bearer {DEMO_KEYS['high']}' \\
       -H 'content-type: application/json' -d '{body}'

metrics: {base}/metrics   models: {base}/v1/models   stop with Ctrl-C
after some traffic (20+ distinct queries per route), learn and publish a policy without a restart:
  iapo train --config {path}
""", flush=True)
    try:
        uvicorn.run(create_app(settings, path), host=args.host, port=args.port, log_level="warning", access_log=False,
                    **uvicorn_options(ConnectionLimits.from_config(settings.limits)))
    finally:
        replay.stop()
    return 0


def cmd_replay(args) -> int:
    import uvicorn

    from sandbox.replay import create_replay_app
    from policies.environments import MVEnvironment, synthetic_bon, synthetic_mv

    envs = {}
    for spec in args.env:
        name, _, source = spec.partition("=")
        if source == "synthetic-mv":
            envs[name] = synthetic_mv(args.seed)
        elif source == "synthetic-bon":
            envs[name] = synthetic_bon(args.seed)
        else:
            envs[name] = MVEnvironment.load(source)
    uvicorn.run(create_replay_app(envs, seed=args.seed), host=args.host, port=args.port, log_level="warning",
                access_log=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="iapo", description="Inference-aware prompt optimisation gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", help="YAML config (else IAPO_CONFIG)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="synthetic replay upstream + gateway on localhost, no API keys needed")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--upstream-port", type=int, default=8101)
    p.add_argument("--db", default="./iapo.db")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("replay", help="run a replay upstream: --env NAME=PATH.npz|synthetic-mv|synthetic-bon")
    p.add_argument("--env", action="append", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8101)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("policy", help="list, show, diff or roll back policy versions")
    p.add_argument("--config")
    p.add_argument("--db")
    ps = p.add_subparsers(dest="action", required=True)
    s = ps.add_parser("show")
    s.add_argument("version", type=int, nargs="?")
    s.add_argument("--alternatives", type=int, default=3, help="ranked alternatives shown per tier")
    ps.add_parser("list")
    s = ps.add_parser("diff")
    s.add_argument("a", type=int)
    s.add_argument("b", type=int)
    s = ps.add_parser("rollback")
    s.add_argument("version", type=int)
    p.set_defaults(func=cli_store.cmd_policy)

    p = sub.add_parser("keys", help="API keys: create, list, revoke (stored hashed), or hash one for the config")
    p.add_argument("--config")
    p.add_argument("--db")
    ks = p.add_subparsers(dest="action", required=True)
    s = ks.add_parser("hash", help="print the sha256 form to put under api_keys in the config")
    s.add_argument("key")
    s = ks.add_parser("create", help="create a key for a tier (or an admin key); prints it once")
    s.add_argument("--tier")
    s.add_argument("--name")
    s.add_argument("--admin", action="store_true", help="a key for the console (/admin, /ui), not for models")
    ks.add_parser("list")
    s = ks.add_parser("revoke", help="revoke by name or hash prefix")
    s.add_argument("key")
    p.set_defaults(func=cli_store.cmd_keys)

    p = sub.add_parser("db", help="the store: upgrade its schema, or copy it into another store")
    p.add_argument("--config")
    p.add_argument("--db", help="the store (a SQLite path or a postgresql:// URL); default: the config's store.url")
    ds = p.add_subparsers(dest="action", required=True)
    upgrade = ds.add_parser("upgrade", help="bring the store to the newest schema")
    s = ds.add_parser("copy", help="copy every table into another store (re-runnable: rows are upserted)")
    s.add_argument("--to", required=True, help="the target store, e.g. postgresql://user@host/iapo")
    for each in (upgrade, s):  # `iapo db copy --db ./iapo.db --to ...` as well as `iapo db --db ... copy`
        each.add_argument("--config", default=argparse.SUPPRESS)
        each.add_argument("--db", default=argparse.SUPPRESS, help="the store (default: the config's store.url)")
    p.set_defaults(func=cli_store.cmd_db)

    p = sub.add_parser("train", help="re-learn the policy of each route with PSST on logged traffic")
    p.add_argument("--config")
    p.add_argument("--route")
    p.add_argument("--budget", type=int)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--publish-partial", action="store_true")
    p.add_argument("--fresh", action="store_true", help="do not resume an unfinished run of the route")
    p.add_argument("--status", action="store_true", help="show each route's unfinished run and its batch jobs")
    p.add_argument("--no-wait", action="store_true", help="batch mode: submit or check the round's batch and exit")
    p.add_argument("--db", help="the store (default: the config's store.url)")
    p.set_defaults(func=cli_store.cmd_train)

    args = parser.parse_args(argv)
    return run_command(args)


def run_command(args) -> int:
    """Run a subcommand; domain errors become one line on stderr and an exit code, never a traceback."""
    import sqlite3

    from gateway.cli_store import CliError
    from gateway.config import ConfigError
    from gateway.console import ConsoleError
    from store.errors import StoreError

    try:
        return args.func(args)
    except CliError as exc:
        print(f"iapo: {exc}", file=sys.stderr)
        return exc.code
    except ConsoleError as exc:
        print(f"iapo: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"iapo: {exc}", file=sys.stderr)
        return 2
    except (StoreError, sqlite3.Error) as exc:
        print(f"iapo: the store cannot be used: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
