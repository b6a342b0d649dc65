"""The ``ndpipe`` command: one entry point, one subcommand per role.

Exit codes (named so scripts can rely on them): 0 OK, 1 a task failed, 2 bad usage or config,
3 broker unreachable, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ndpipe import __version__
from ndpipe.config import Config, default_config_path, dump_config, load_config
from ndpipe.errors import BrokerUnreachable, ConfigError, NdpipeError, TaskError
from ndpipe.logsetup import setup_logging
from ndpipe.runtime import follow_parent

EXIT_OK, EXIT_TASK, EXIT_CONFIG, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
log = logging.getLogger("ndpipe.cli")
Section = TypeVar("Section", bound=BaseModel)


def _load(args: argparse.Namespace) -> Config:
    path = args.config or default_config_path(os.environ)
    cfg = load_config(path)
    setup_logging(args.log_level or cfg.logging.level, cfg.logging.format)
    return cfg


def _overridden(section: str, model: Section, flags: dict[str, tuple[str, Any]]) -> Section:
    """``model`` with the command-line flags that override its keys, validated as YAML and environment
    values are (a ConfigError, exit 2, names the flag and the key): `--processes -1` or `--broker
    garbage` must not start a daemon that loops or hangs."""
    given = {key: value for key, (_, value) in flags.items() if value is not None}
    if not given:
        return model
    try:
        return type(model).model_validate({**model.model_dump(), **given})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else ""
            flag = flags[key][0] if key in flags else "command line"
            problems.append(f"{flag}: {section}.{key}: {err['msg']} (got {err['input']!r})")
        raise ConfigError("\n".join(problems)) from None


def cmd_broker(args: argparse.Namespace) -> int:
    from ndpipe.broker import serve

    follow_parent(os.environ)
    cfg = _load(args)
    serve(cfg.broker, sec=cfg.security)
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from ndpipe.worker import serve

    follow_parent(os.environ)
    cfg = _load(args)
    worker = _overridden("worker", cfg.worker, {"processes": ("--processes", args.processes),
                                                "broker": ("--broker", args.broker),
                                                "app_dir": ("--app-dir", args.app_dir)})
    serve(worker, sec=cfg.security)
    return EXIT_OK


def _master(args: argparse.Namespace, cfg: Config) -> Any:
    from ndpipe.master import Master

    master = _overridden("master", cfg.master, {"broker": ("--broker", args.broker)})
    return Master(master.broker, config=master, security=cfg.security)


def cmd_master(args: argparse.Namespace) -> int:
    """Run a job function ``package.module:function`` with a connected Master as its argument."""
    from ndpipe.worker.compute import add_app_dir, resolve

    cfg = _load(args)
    add_app_dir(args.app_dir, "--app-dir")
    job = resolve(args.job)
    with _master(args, cfg) as master:
        result = job(master, *args.job_args)
    if result is not None:
        print(result)
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    cfg = _load(args)
    if args.shards < 1:
        raise ConfigError(f"--shards must be at least 1, got {args.shards}")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):  # before the work, not after it
        raise ConfigError(f"--output {args.output}: {out_dir} is not a writable directory")
    try:
        data = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--input {args.input}: cannot load a .npy array: {exc}") from exc
    if not -data.ndim <= args.axis < max(1, data.ndim):
        raise ConfigError(f"--axis {args.axis} is out of range for an array of shape {data.shape}")
    with _master(args, cfg) as master, tqdm(total=args.shards, unit="shard", disable=args.quiet) as bar:
        result = master.scatter(args.service, data, args.shards, args.axis, timeout=args.timeout,
                                progress=bar.update)
    np.save(args.output, result, allow_pickle=False)
    if not args.quiet:
        print(f"{args.output}: {result.dtype} {result.shape}")
    return EXIT_OK


def cmd_spool(args: argparse.Namespace) -> int:
    """The master daemon: run the job files dropped in spool.dir/inbox (ndpipe.master.spool)."""
    from ndpipe.master.spool import serve
    from ndpipe.runtime import StopSignal

    follow_parent(os.environ)
    cfg = _load(args)
    spool = _overridden("spool", cfg.spool, {"dir": ("--dir", args.dir)})
    try:
        from ndpipe.master.spooljob import make_dirs

        make_dirs(Path(spool.dir))
    except OSError as exc:
        raise ConfigError(f"spool.dir {spool.dir}: cannot create the spool's directories: "
                          f"{exc.strerror or exc} (set spool.dir or --dir)") from None
    with StopSignal() as stop, _master(args, cfg) as master:
        serve(spool, master, stop)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args)
    with _master(args, cfg) as master:
        status = master.status(timeout=args.timeout)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return EXIT_OK
    if status.get("restricted"):
        print(f"broker {status['broker_id']}: your own tasks only ({status['tasks']} held); an admin key "
              "(security.admins) sees workers and every queue")
    else:
        print(f"broker {status['broker_id']}  masters {status['masters']}  tasks held {status['tasks']}")
    print(f"{'service':24} {'queued':>8} {'inflight':>9} {'workers':>8} {'lanes':>6} {'slots':>6} {'broken':>6}")
    for name, s in sorted(status["services"].items()):
        print(f"{name:24} {s['queued']:8} {s['inflight']:9} {s['workers']:8} {s.get('lanes', 0):6} {s['slots']:6} "
              f"{s.get('broken', 0):6}")
    print(f"{'worker / lane':34} {'host':16} {'pid':>7} {'slots':>5} {'busy':>5} {'cpu%':>6} {'rss MiB':>8}")
    for w in status["workers"]:
        st, info = w.get("stats", {}), w.get("info", {})
        print(f"{w['id'][:34]:34} {str(info.get('host', '?'))[:16]:16} {info.get('pid', '?'):>7} {w['slots']:5} "
              f"{w['inflight']:5} {st.get('cpu', 0):6} {st.get('rss', 0) / 2**20:8.1f}")
        usage = {entry.get("pid"): entry for entry in st.get("lanes", []) if isinstance(entry, dict)}
        for lane in w.get("lanes", []):  # pid and in-flight from the broker, cpu and RSS from the daemon
            use = usage.get(lane["pid"], {})
            broken = f"  without {', '.join(lane['broken'])} (constructor failed)" if lane.get("broken") else ""
            print(f"  {lane['address'][:32]:32} {'':16} {lane['pid']:>7} {lane['slots']:5} {lane['inflight']:5} "
                  f"{use.get('cpu', 0):6} {use.get('rss', 0) / 2**20:8.1f}{broken}")
    runs = status.get("iterations", [])
    if runs:
        print(f"{'iteration':18} {'service':20} {'round':>6} {'epoch':>5} {'parts':>5}  where")
        for run in runs:
            where = "  ".join(f"{lane}: {_spans(parts)}" for lane, parts in sorted(run["lanes"].items()))
            print(f"{run['run'][:16]:18} {run['service'][:20]:20} {run['round']:6} {run['epoch']:5} "
                  f"{run['partitions']:5}  {where}")
    counters = "  ".join(f"{k} {v}" for k, v in status["counters"].items())
    print(counters)
    return EXIT_OK


def _spans(parts: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5": a lane's partitions, short."""
    out, start = [], None
    for i, p in enumerate(parts):
        if start is None:
            start = p
        if i + 1 == len(parts) or parts[i + 1] != p + 1:
            out.append(f"{start}" if start == p else f"{start}-{p}")
            start = None
    return ",".join(out)


def cmd_demo(args: argparse.Namespace) -> int:
    from ndpipe.demo import run_demo

    setup_logging(args.log_level or "WARNING")
    return run_demo(workers=args.workers, processes=args.processes, rows=args.rows, shards=args.shards,
                    lm_batches=args.lm_batches, pagerank_edges=args.pagerank_edges)


def cmd_config(args: argparse.Namespace) -> int:
    path = args.config or default_config_path(os.environ)
    cfg = load_config(path)
    if args.action == "show":
        print(dump_config(cfg), end="")
    else:
        _check_security(cfg)
        if args.imports:
            _check_imports(cfg, args.app_dir)
        print(f"{path or '(built-in defaults)'}: OK")
    return EXIT_OK


def _check_imports(cfg: Config, app_dir: str | None) -> None:
    """``config check --import``: import every handler (and check that a resident service's class can
    be called) as the worker would at start, constructing nothing: a typo fails here, not in the
    deployment."""
    from ndpipe.worker import compute

    compute.add_app_dir(app_dir or cfg.worker.app_dir, "--app-dir" if app_dir else "worker.app_dir")
    for name, spec in cfg.worker.services.items():
        try:
            compute.check_service(name, spec.handler, spec.init)
        except ConfigError as exc:
            raise ConfigError(f"worker.services.{name}: {exc}") from None
    print(f"{len(cfg.worker.services)} handlers import")


def _check_security(cfg: Config) -> None:
    """What the broker would refuse to start with, said as a warning; key files that are set are read
    (a ConfigError, exit 2, names the key and the file)."""
    from ndpipe import security

    exposed = security.insecure_binds(cfg.security, {"frontend": cfg.broker.frontend, "backend": cfg.broker.backend})
    if exposed:
        print(f"warning: {', '.join(exposed)}: a non-loopback TCP address with security.curve off; the broker "
              f"will refuse to start: {security.INSECURE_HINT}", file=sys.stderr)
    sec = cfg.security
    if sec.curve:
        if sec.secret_key:
            security.server_curve(sec)
        if sec.broker_key:
            security.client_curve(sec)
        if sec.masters is not None or sec.workers is not None:
            print(f"allow-lists: {security.AllowLists.load(sec).describe()}")


def cmd_keys(args: argparse.Namespace) -> int:
    from ndpipe.keys import generate, load

    if args.action == "generate":
        public_file, secret_file = generate(args.name, args.dir)
        print(f"{public_file} (public, 0644)\n{secret_file} (secret, 0600: keep it on this host, readable only "
              "by the program's user)")
        print(load(public_file)[0].decode())
    else:
        print(load(args.file)[0].decode())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ndpipe", description="ZeroMQ task pipeline for numpy work.")
    parser.add_argument("--version", action="version", version=f"ndpipe {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config file (default: $NDPIPE_CONFIG, else built-in defaults)")
    common.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", parents=[common], help="run the broker")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("worker", parents=[common], help="run a worker daemon and its compute processes")
    p.add_argument("--processes", type=int, help="compute processes (overrides worker.processes)")
    p.add_argument("--broker", help="broker backend endpoint (overrides worker.broker)")
    p.add_argument("--app-dir", help="directory to import handlers from, first on sys.path (overrides "
                                     "worker.app_dir)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("master", parents=[common], help="run a job function with a connected Master")
    p.add_argument("job", help="package.module:function, called as function(master, *job_args)")
    p.add_argument("job_args", nargs="*")
    p.add_argument("--app-dir", help="directory to import the job from, first on sys.path")
    p.add_argument("--broker", help="broker frontend endpoint (overrides master.broker)")
    p.set_defaults(func=cmd_master)

    p = sub.add_parser("submit", parents=[common], help="scatter a .npy array over a service, gather the result")
    p.add_argument("service")
    p.add_argument("--input", required=True, help=".npy file to split")
    p.add_argument("--output", required=True, help=".npy file for the concatenated result")
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--axis", type=int, default=0)
    p.add_argument("--timeout", type=float, help="per-shard timeout in seconds")
    p.add_argument("--broker", help="broker frontend endpoint (overrides master.broker)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("spool", parents=[common], help="master daemon: run job files dropped in a directory",
                       description="Watch SPOOL/inbox for NAME.job.yaml files (service or pipeline, a .npy "
                                   "input), run each exactly once, write SPOOL/outbox/NAME.npy atomically and "
                                   "move the inputs to SPOOL/done/ or SPOOL/failed/ (with NAME.error). A journal "
                                   "in SPOOL makes a restart lose no job and rerun no finished one. SIGTERM "
                                   "finishes the jobs in flight (spool.drain_timeout) and exits 0. See "
                                   "docs/spool.md.")
    p.add_argument("--dir", help="spool root holding inbox/, outbox/, done/, failed/ and the journal "
                                 "(overrides spool.dir)")
    p.add_argument("--broker", help="broker frontend endpoint (overrides master.broker)")
    p.set_defaults(func=cmd_spool)

    p = sub.add_parser("status", parents=[common], help="show the broker's services, queues and workers")
    p.add_argument("--broker", help="broker frontend endpoint (overrides master.broker)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", parents=[common],
                       help="local broker + workers: a data-parallel MLP job and a model-parallel transformer LM")
    p.add_argument("--workers", type=int, default=2, help="worker daemons")
    p.add_argument("--processes", type=int, default=1, help="compute processes per worker")
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--shards", type=int, default=64)
    p.add_argument("--lm-batches", type=int, default=16, help="batches through the LM's stage pipeline (0: skip)")
    p.add_argument("--pagerank-edges", type=int, default=1_000_000,
                   help="edges of the PageRank graph iterated over 8 resident partitions (0: skip)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("keys", help="CurveZMQ key pairs: generate one, or show a file's public key")
    keys = p.add_subparsers(dest="action", required=True)
    k = keys.add_parser("generate", help="write NAME.key (public, 0644) and NAME.key_secret (0600) in DIR; "
                                         "never overwrites")
    k.add_argument("name", metavar="NAME", help="the pair's name: letters, digits, '.', '_', '-'")
    k.add_argument("--dir", required=True, help="directory for the two files (created if missing)")
    k = keys.add_parser("show", help="print the public key of a .key or .key_secret file")
    k.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("config", parents=[common], help="check or show the effective configuration")
    p.add_argument("action", choices=["check", "show"])
    p.add_argument("--import", dest="imports", action="store_true",
                   help="check: also import every worker handler (constructs nothing)")
    p.add_argument("--app-dir", help="with --import: directory to import handlers from (default: worker.app_dir)")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"ndpipe: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokerUnreachable as exc:
        print(f"ndpipe: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except TaskError as exc:
        print(f"ndpipe: {exc}", file=sys.stderr)
        return EXIT_TASK
    except NdpipeError as exc:
        print(f"ndpipe: {exc}", file=sys.stderr)
        return EXIT_TASK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
