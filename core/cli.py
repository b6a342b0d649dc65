"""The ``ndpipe`` command: one entry point, one subcommand per role.

Exit codes (named so scripts can rely on them): 0 OK (``EXIT_OK``), 1 a task failed (``EXIT_TASK``),
2 bad usage or config (``EXIT_CONFIG``: retrying cannot help, the units do not restart on it),
3 broker unreachable (``EXIT_UNREACHABLE``), 75 an endpoint to bind is in use (``EXIT_TEMPFAIL``,
EX_TEMPFAIL of sysexits.h: try again later; the units restart on it), 130 interrupted
(``EXIT_INTERRUPTED``).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import sys
import textwrap
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ndpipe import __version__
from ndpipe.config import Config, default_config_path, dump_config, load_config
from ndpipe.errors import AddressInUse, BrokerUnreachable, ConfigError, NdpipeError, TaskError
from ndpipe.logsetup import setup_logging
from ndpipe.runtime import follow_parent
from ndpipe.sdnotify import Notifier

EXIT_OK, EXIT_TASK, EXIT_CONFIG, EXIT_UNREACHABLE, EXIT_TEMPFAIL, EXIT_INTERRUPTED = 0, 1, 2, 3, 75, 130
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


def _daemon_start() -> Notifier:
    """What both daemons do first: systemd's notifier, taken out of the environment so lanes and
    handlers inherit none of it; and Python tracebacks on SIGABRT, which is how systemd's watchdog
    ends a stuck loop, so the journal shows where it was stuck."""
    follow_parent(os.environ)
    faulthandler.enable()
    return Notifier.from_environ(os.environ)


def cmd_broker(args: argparse.Namespace) -> int:
    from ndpipe.broker import serve

    notify = _daemon_start()
    cfg = _load(args)
    serve(cfg.broker, sec=cfg.security, notify=notify)
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from ndpipe.worker import serve

    notify = _daemon_start()
    cfg = _load(args)
    worker = _overridden("worker", cfg.worker, {"processes": ("--processes", args.processes),
                                                "broker": ("--broker", args.broker),
                                                "app_dir": ("--app-dir", args.app_dir)})
    serve(worker, sec=cfg.security, notify=notify)
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
        try:
            result = job(master, *args.job_args)
        except NdpipeError:
            raise  # ndpipe's own (no broker: exit 3, a bad config: 2): the exit codes scripts rely on
        except Exception as exc:  # the job's own error: its traceback from the job's frames on, not the CLI's
            trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next if
                                                       exc.__traceback__ else None))
            print(f"ndpipe: job {args.job} failed:\n{trace}", end="", file=sys.stderr)
            return EXIT_TASK
    if result is not None:
        print(result)
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

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
    # Log lines (a silent broker, a resend) go above the bar instead of through it; the bar counts
    # finished shards only, so a failure or Ctrl-C leaves it where the work stopped.
    with logging_redirect_tqdm(loggers=[logging.getLogger("ndpipe")]), _master(args, cfg) as master, \
            tqdm(total=args.shards, unit="shard", disable=args.quiet) as bar:
        try:
            result = master.scatter(args.service, data, args.shards, args.axis, timeout=args.timeout,
                                    progress=bar.update)
        except (NdpipeError, KeyboardInterrupt):
            bar.set_postfix_str(f"stopped after {bar.n} of {args.shards} shards", refresh=True)
            raise
    np.save(args.output, result, allow_pickle=False)
    if not args.quiet:
        print(f"{args.output}: {result.dtype} {result.shape}")
    return EXIT_OK


def cmd_spool(args: argparse.Namespace) -> int:
    """The master daemon: run the job files dropped in spool.dir/inbox (ndpipe.master.spool)."""
    from ndpipe.master.spool import SpoolFatal, serve
    from ndpipe.runtime import StopSignal

    notify = _daemon_start()
    cfg = _load(args)
    spool = _overridden("spool", cfg.spool, {"dir": ("--dir", args.dir)})
    try:
        from ndpipe.master.spooljob import make_dirs

        make_dirs(Path(spool.dir))
    except OSError as exc:
        raise ConfigError(f"spool.dir {spool.dir}: cannot create the spool's directories: "
                          f"{exc.strerror or exc} (set spool.dir or --dir)") from None
    with StopSignal() as stop, _master(args, cfg) as master:
        try:
            serve(spool, master, stop, notify)
        except SpoolFatal as exc:  # not a job's fault (the master closed): systemd restarts it, the journal resumes
            log.error("spool: %s; exiting (the jobs in flight rerun at the next start)", exc)
            return EXIT_TASK
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """One look at the broker, or with ``--watch`` one every few seconds until Ctrl-C (a broker that
    stops answering is shown as such, and watched on: a restart is what an operator watches for)."""
    cfg = _load(args)
    if args.watch is not None and not 0 < args.watch <= 3600:
        raise ConfigError(f"--watch takes seconds between looks, 0 < SECONDS <= 3600 (got {args.watch:g})")
    with _master(args, cfg) as master:
        if args.watch is None:
            _print_status(master.status(timeout=args.timeout), args.json)
            return EXIT_OK
        clear = "\033[H\033[2J" if sys.stdout.isatty() and not args.json else ""
        try:
            while True:
                try:
                    status: dict[str, Any] | None = master.status(timeout=args.timeout)
                except BrokerUnreachable as exc:
                    status, error = None, str(exc)
                if not args.json:  # --json: one JSON document per look, nothing between them (| jq works)
                    print(clear + time.strftime("%Y-%m-%d %H:%M:%S") + f"  every {args.watch:g} s, Ctrl-C to stop")
                if status is None:
                    print(f"ndpipe: {error} (still watching)", file=sys.stderr if args.json else sys.stdout)
                else:
                    _print_status(status, args.json)
                sys.stdout.flush()
                time.sleep(args.watch)
        except KeyboardInterrupt:
            return EXIT_OK


def _print_status(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=2, default=str))
        return
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
        instance = f"  instance {info['instance']}" if info.get("instance") else ""  # ndpipe-worker@N
        print(f"{w['id'][:34]:34} {str(info.get('host', '?'))[:16]:16} {info.get('pid', '?'):>7} {w['slots']:5} "
              f"{w['inflight']:5} {st.get('cpu', 0):6} {st.get('rss', 0) / 2**20:8.1f}{instance}")
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
    print("  ".join(f"{k} {v}" for k, v in status["counters"].items()))


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


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _sub(sub: Any, name: str, summary: str, description: str, examples: tuple[str, ...],
         parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """A subcommand whose --help says what it is for and shows how it is called."""
    return sub.add_parser(name, parents=list(parents), help=summary,  # type: ignore[no-any-return]
                          description=textwrap.fill(description, 100), epilog=_examples(*examples),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ndpipe", description=textwrap.fill("ZeroMQ task pipeline for numpy work: a broker, worker daemons and "
                                                 "masters, configured from one YAML file (ndpipe config show prints "
                                                 "every key).", 100),
        epilog=_examples("ndpipe demo                                   # everything on this machine, checked",
                         "ndpipe broker --config /etc/ndpipe/config.yaml",
                         "ndpipe worker --config /etc/ndpipe/config.yaml --processes 4",
                         "ndpipe submit normalize --input x.npy --output y.npy --shards 64",
                         "ndpipe status --watch 2",
                         "ndpipe COMMAND --help                         # each command's options and examples"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ndpipe {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE",
                        help="YAML config file (default: $NDPIPE_CONFIG, else the built-in single-host defaults)")
    common.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="overrides logging.level (DEBUG: one line per task)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _sub(sub, "broker", "run the broker",
             "Bind broker.frontend (masters) and broker.backend (workers) and route tasks between them until "
             "SIGTERM. SIGHUP reloads the CurveZMQ allow-lists. Exit 2: bad config; 75: an address in use.",
             ("ndpipe broker --config /etc/ndpipe/config.yaml",
              "NDPIPE_BROKER__FRONTEND=tcp://127.0.0.1:6000 ndpipe broker"), [common])
    p.set_defaults(func=cmd_broker)

    p = _sub(sub, "worker", "run a worker daemon and its compute processes",
             "Register with the broker and run the services of worker.services in compute processes (lanes), "
             "one per CPU unless --processes says otherwise. SIGTERM drains: lanes finish what they hold.",
             ("ndpipe worker --config /etc/ndpipe/config.yaml",
              "ndpipe worker --broker tcp://broker-host:5556 --processes 8 --app-dir ./handlers"), [common])
    p.add_argument("--processes", type=int, metavar="N", help="compute processes (overrides worker.processes; "
                   "0 = one per CPU)")
    p.add_argument("--broker", metavar="ENDPOINT", help="broker backend endpoint, e.g. tcp://host:5556 "
                   "(overrides worker.broker)")
    p.add_argument("--app-dir", metavar="DIR", help="directory to import handlers from, first on sys.path "
                   "(overrides worker.app_dir)")
    p.set_defaults(func=cmd_worker)

    p = _sub(sub, "master", "run a job function with a connected Master",
             "Import package.module:function and call it as function(master, *job_args) with a connected "
             "ndpipe.Master; what it returns is printed.",
             ("ndpipe master ndpipe.examples.jobs:normalize_random 100000 16",
              "ndpipe master myjobs:nightly --app-dir /srv/jobs"), [common])
    p.add_argument("job", help="package.module:function, called as function(master, *job_args)")
    p.add_argument("job_args", nargs="*", help="strings passed to the job after the master")
    p.add_argument("--app-dir", metavar="DIR", help="directory to import the job from, first on sys.path")
    p.add_argument("--broker", metavar="ENDPOINT", help="broker frontend endpoint (overrides master.broker)")
    p.set_defaults(func=cmd_master)

    p = _sub(sub, "submit", "scatter a .npy array over a service, gather the result",
             "Split --input into --shards pieces along --axis, run SERVICE on each, concatenate the results "
             "into --output. Exit 1: a shard failed (its remote traceback is printed); 3: no broker.",
             ("ndpipe submit normalize --input x.npy --output y.npy --shards 64",
              "ndpipe submit embed --input tokens.npy --output emb.npy --timeout 30 --quiet"), [common])
    p.add_argument("service", help="the service to run on each shard")
    p.add_argument("--input", required=True, metavar="FILE", help=".npy file to split (no pickled objects)")
    p.add_argument("--output", required=True, metavar="FILE", help=".npy file for the concatenated result")
    p.add_argument("--shards", type=int, default=16, metavar="N", help="pieces to split into (default 16)")
    p.add_argument("--axis", type=int, default=0, help="axis to split and concatenate along (default 0)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="per-shard timeout")
    p.add_argument("--broker", metavar="ENDPOINT", help="broker frontend endpoint (overrides master.broker)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")
    p.set_defaults(func=cmd_submit)

    p = _sub(sub, "spool", "master daemon: run job files dropped in a directory",
             "Watch SPOOL/inbox for NAME.job.yaml files (a service or a pipeline, a .npy input), run each "
             "exactly once, write SPOOL/outbox/NAME.npy atomically and move the inputs to SPOOL/done/ or "
             "SPOOL/failed/ (with NAME.error). A journal in SPOOL makes a restart lose no job and rerun no "
             "finished one. SIGTERM finishes the jobs in flight (spool.drain_timeout) and exits 0. See "
             "docs/spool.md.",
             ("ndpipe spool --config /etc/ndpipe/config.yaml",
              "ndpipe spool --dir ./spool --broker tcp://broker-host:5555"), [common])
    p.add_argument("--dir", metavar="DIR", help="spool root holding inbox/, outbox/, done/, failed/ and the "
                   "journal (overrides spool.dir)")
    p.add_argument("--broker", metavar="ENDPOINT", help="broker frontend endpoint (overrides master.broker)")
    p.set_defaults(func=cmd_spool)

    p = _sub(sub, "status", "show the broker's services, queues and workers",
             "Ask the broker for its view: per service what is queued and in flight, each worker and lane "
             "with its pid, CPU and RSS, running iterations, counters. With CurveZMQ, only an admin key sees "
             "workers and every queue.",
             ("ndpipe status", "ndpipe status --json | jq .counters", "ndpipe status --watch 2"), [common])
    p.add_argument("--broker", metavar="ENDPOINT", help="broker frontend endpoint (overrides master.broker)")
    p.add_argument("--json", action="store_true", help="the broker's reply as JSON")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="wait this long for the answer")
    p.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                   help="show it again every SECONDS (default 2) until Ctrl-C")
    p.set_defaults(func=cmd_status)

    p = _sub(sub, "demo", "local broker + workers: data-parallel MLP, model-parallel LM, PageRank",
             "Start a broker and worker daemons on this machine, run the example workloads through them with "
             "progress bars and throughput lines, check every result against one process, and stop them.",
             ("ndpipe demo", "ndpipe demo --workers 1 --processes 2 --lm-batches 0 --pagerank-edges 0"), [common])
    p.add_argument("--workers", type=int, default=2, help="worker daemons (default 2)")
    p.add_argument("--processes", type=int, default=1, help="compute processes per worker (default 1)")
    p.add_argument("--rows", type=int, default=16384, help="rows of the MLP job's input")
    p.add_argument("--shards", type=int, default=64, help="shards of the MLP job")
    p.add_argument("--lm-batches", type=int, default=16, help="batches through the LM's stage pipeline (0: skip)")
    p.add_argument("--pagerank-edges", type=int, default=1_000_000,
                   help="edges of the PageRank graph iterated over 8 resident partitions (0: skip)")
    p.set_defaults(func=cmd_demo)

    p = _sub(sub, "keys", "CurveZMQ key pairs: generate one, or show a file's public key",
             "Write CurveZMQ key pairs as ZeroMQ certificates, or print a file's public key. Put masters', "
             "workers' and admins' public keys in the broker's security.masters/workers/admins directories.",
             ("ndpipe keys generate broker --dir /etc/ndpipe/keys",
              "ndpipe keys show /etc/ndpipe/keys/broker.key"))
    keys = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    k = keys.add_parser("generate", help="write NAME.key (public, 0644) and NAME.key_secret (0600) in DIR; "
                                         "never overwrites")
    k.add_argument("name", metavar="NAME", help="the pair's name: letters, digits, '.', '_', '-'")
    k.add_argument("--dir", required=True, help="directory for the two files (created if missing)")
    k = keys.add_parser("show", help="print the public key of a .key or .key_secret file")
    k.add_argument("file", metavar="FILE", help="a .key or .key_secret file")
    p.set_defaults(func=cmd_keys)

    p = _sub(sub, "config", "check or show the effective configuration",
             "check: validate the YAML and environment overrides (exit 2 naming file and key), read the key "
             "files, warn about exposed plaintext binds; with --import also import every handler. "
             "show: print every key with its effective value.",
             ("ndpipe config check --config /etc/ndpipe/config.yaml --import",
              "NDPIPE_WORKER__PROCESSES=4 ndpipe config show"), [common])
    p.add_argument("action", choices=["check", "show"], help="check: validate; show: print the effective YAML")
    p.add_argument("--import", dest="imports", action="store_true",
                   help="check: also import every worker handler (constructs nothing)")
    p.add_argument("--app-dir", metavar="DIR",
                   help="with --import: directory to import handlers from (default: worker.app_dir)")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except AddressInUse as exc:
        print(f"ndpipe: {exc}; exit {EXIT_TEMPFAIL}: try again later", file=sys.stderr)
        return EXIT_TEMPFAIL
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
