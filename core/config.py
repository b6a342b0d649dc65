"""Typed configuration: one YAML file plus ``NDPIPE_<SECTION>__<KEY>`` environment overrides.

Why frozen pydantic models that forbid unknown keys: a daemon must refuse to start on a typo such
as ``heartbeat_intervall`` instead of silently running on a default, and the message must name the
file (or environment variable), the key path, the problem and the value given, one line per error.
Defaults come from :mod:`ndpipe.protocol` so the wire constants and the config never disagree.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from functools import partial
from typing import Annotated, Any, Literal

import psutil
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from ndpipe import protocol
from ndpipe.errors import ConfigError

ENV_PREFIX = "NDPIPE_"
CONFIG_ENV = "NDPIPE_CONFIG"
AUTO_MEMORY_SHARE = 0.8  # worker.memory_limit "auto": this share of the host's physical memory per lane
MAX_TIMEOUT = (2**32 - 1) / 1000  # seconds: timeouts travel as uint32 milliseconds (OPTIONS, META)
_EXPECTED = "expected tcp://HOST:PORT, ipc://PATH or inproc://NAME"
_LISTEN = "expected HOST:PORT (e.g. 127.0.0.1:9109), or '' for off"
_TCP = re.compile(r"tcp://(?P<host>.+):(?P<port>[0-9]{1,5})", re.ASCII)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*", re.ASCII)
_IDENT = r"[^\W\d]\w*"
_HANDLER = re.compile(rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*")


def _check_endpoint(value: str, *, bind: bool) -> str:
    """Reject endpoints ZMQ would refuse only at bind/connect time, deep inside a running daemon."""
    scheme, sep, rest = value.partition("://")
    if scheme in ("ipc", "inproc") and sep:
        if rest:
            return value
        raise PydanticCustomError("endpoint", f"{scheme}:// needs a non-empty {scheme.upper()} name")
    match = _TCP.fullmatch(value)
    if not match:
        raise PydanticCustomError("endpoint", _EXPECTED)
    host, port = match["host"], int(match["port"])
    if not 1 <= port <= 65535:
        raise PydanticCustomError("endpoint", "tcp port must be 1..65535")
    if host == "*":
        if bind:
            return value
        raise PydanticCustomError("endpoint", "'*' only works for binding; name the broker's host")
    if not _good_host(host):
        raise PydanticCustomError("endpoint", f"bad HOST (name, IPv4, [IPv6] or *); {_EXPECTED}")
    return value


def _good_host(host: str) -> bool:
    """A literal address (IPv6 in brackets) or a syntactically valid DNS name; resolving it is left to
    the bind or connect, which may run where the config check does not."""
    try:
        if host.startswith("[") and host.endswith("]"):
            ipaddress.IPv6Address(host[1:-1])
        elif re.fullmatch(r"[0-9.]+", host):
            ipaddress.IPv4Address(host)
        elif not _HOSTNAME.fullmatch(host):
            return False
    except ValueError:
        return False
    return True


def _check_listen(value: str) -> str:
    """``metrics``: "" (off) or HOST:PORT for the Prometheus HTTP listener (port 0: any free port)."""
    if not value:
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port, re.ASCII):
        raise PydanticCustomError("listen", _LISTEN)
    if int(port) > 65535:
        raise PydanticCustomError("listen", "port must be 0..65535")
    if not _good_host(host):
        raise PydanticCustomError("listen", f"bad HOST (name, IPv4 or [IPv6]); {_LISTEN}")
    return value


def _check_handler(value: str) -> str:
    """Syntax only: importing here would run user code in the broker and in every config check."""
    if not _HANDLER.fullmatch(value):
        raise PydanticCustomError("handler", "expected 'package.module:function' (module, colon, attribute)")
    return value


def _check_service_name(value: str) -> str:
    """Names travel in a 1..255-byte UTF-8 frame and appear in logs and env variable names."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise PydanticCustomError("service_name", "service name is not valid UTF-8") from None
    if not 0 < size <= protocol.MAX_SERVICE or any(c.isspace() for c in value):
        raise PydanticCustomError("service_name", f"must be 1..{protocol.MAX_SERVICE} bytes without whitespace")
    return value


BindEndpoint = Annotated[str, AfterValidator(partial(_check_endpoint, bind=True))]
ConnectEndpoint = Annotated[str, AfterValidator(partial(_check_endpoint, bind=False))]
Handler = Annotated[str, AfterValidator(_check_handler)]
Listen = Annotated[str, AfterValidator(_check_listen)]
ServiceName = Annotated[str, AfterValidator(_check_service_name)]
Timeout = Annotated[float, Field(gt=0, le=MAX_TIMEOUT, strict=True)] | None
_FROZEN = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _num(default: Any, **bounds: Any) -> Any:
    """A strict numeric field: YAML ``true`` or ``"5"`` for a number is a mistake, not a 1 or a 5."""
    return Field(default, strict=True, **bounds)


class BrokerConfig(BaseModel):
    """The broker binds both endpoints; ``*`` as host listens on all interfaces."""

    model_config = _FROZEN
    frontend: BindEndpoint = "tcp://127.0.0.1:5555"
    backend: BindEndpoint = "tcp://127.0.0.1:5556"
    heartbeat_interval: float = _num(protocol.HEARTBEAT_INTERVAL, ge=0.01, le=60)
    liveness: int = _num(protocol.LIVENESS, ge=2, le=100)
    max_attempts: int = _num(protocol.MAX_ATTEMPTS_DEFAULT, ge=1, le=100)
    max_queued: int = _num(protocol.MAX_QUEUED, ge=1)
    max_services: int = _num(protocol.MAX_SERVICES, ge=1)
    max_frames: int = _num(protocol.MAX_FRAMES, ge=1)
    max_frame_bytes: int = _num(protocol.MAX_FRAME_BYTES, ge=1024, le=2**63 - 1)
    hwm: int = _num(protocol.HWM, ge=1000, le=2**31 - 1)
    rcvhwm: int = _num(1000, ge=100, le=2**31 - 1)
    unroutable_timeout: float = _num(protocol.UNROUTABLE_TIMEOUT, gt=0, le=86400)
    # Payload bytes the broker holds (queued or in flight), in all, per master, per service; 0 = no bound.
    max_queued_bytes: int = _num(4 << 30, ge=0, le=2**63 - 1)
    max_queued_bytes_per_master: int = _num(1 << 30, ge=0, le=2**63 - 1)
    max_queued_bytes_per_service: int = _num(2 << 30, ge=0, le=2**63 - 1)
    max_slots_per_key: int = _num(16384, ge=1, le=2**31 - 1)  # with security.curve: slots one worker key may register
    metrics: Listen = ""  # HOST:PORT of a Prometheus /metrics listener (ndpipe.metrics); "" = off


class ServiceSpec(BaseModel):
    """One service a worker offers: which function runs it, and its per-task defaults.

    ``handler`` names a function, or a class: a **resident** service, which each lane constructs once
    (``init`` as keyword arguments) before it takes tasks, then calls per task (``__call__``), so a
    model's weights load once per process, not once per task."""

    model_config = _FROZEN
    handler: Handler
    timeout: Timeout = None
    init: dict[str, Any] | None = None


class WorkerConfig(BaseModel):
    """A worker daemon connects to the broker backend and runs tasks in a pool of compute processes."""

    model_config = _FROZEN
    broker: ConnectEndpoint = "tcp://127.0.0.1:5556"
    processes: int = _num(0, ge=0, le=1024)
    prefetch: int = _num(0, ge=0, le=65536)
    services: dict[ServiceName, ServiceSpec] = Field(
        default_factory=lambda: {"echo": ServiceSpec(handler="ndpipe.examples.handlers:echo")}, min_length=1
    )
    reconnect_min: float = _num(protocol.RECONNECT_MIN, gt=0, le=3600)
    reconnect_max: float = _num(protocol.RECONNECT_MAX, gt=0, le=3600)
    drain_timeout: float = _num(30.0, ge=0, le=86400)
    max_frames: int = _num(protocol.MAX_FRAMES, ge=1)
    max_frame_bytes: int = _num(protocol.MAX_FRAME_BYTES, ge=1024, le=2**63 - 1)
    # Bytes of address space per compute process (RLIMIT_AS): "auto" = 80 % of the host's memory, so one
    # runaway handler fails alone with MemoryError instead of taking the host down; 0 = no limit.
    memory_limit: Annotated[int, Field(ge=0, le=2**63 - 1, strict=True)] | Literal["auto"] = "auto"
    cache_bytes: int = _num(protocol.CACHE_BYTES, ge=1 << 20, le=2**63 - 1)  # arrays sent once, per host
    # A directory put first on sys.path (the daemon's and its lanes') so handlers import from it, as
    # uvicorn's --app-dir; null = only what is installed in ndpipe's environment.
    app_dir: str | None = None
    metrics: Listen = ""  # HOST:PORT of a Prometheus /metrics listener (ndpipe.metrics); "" = off

    @field_validator("services", mode="before")
    @classmethod
    def _handler_shorthand(cls, value: Any) -> Any:
        """``name: pkg.mod:fn`` is the common case; the mapping form is only needed for per-task defaults."""
        if isinstance(value, Mapping):
            return {k: {"handler": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("reconnect_max")
    @classmethod
    def _not_below_min(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("reconnect_min")
        if low is not None and value < low:
            raise PydanticCustomError("reconnect_order", "must be >= reconnect_min ({low})", {"low": low})
        return value

    @property
    def lane_credit(self) -> int:
        """Tasks the broker may have in flight at each lane: the running one plus an equal share of
        ``prefetch`` (waiting in that lane's socket), at most LANE_CREDIT_MAX."""
        return min(protocol.LANE_CREDIT_MAX, 1 + -(-self.prefetch // self.effective_processes))

    @property
    def lane_memory_limit(self) -> int:
        """``memory_limit`` in bytes, "auto" resolved on this host (0: none)."""
        if self.memory_limit == "auto":
            return int(psutil.virtual_memory().total * AUTO_MEMORY_SHARE)
        return self.memory_limit

    @property
    def effective_processes(self) -> int:
        """``processes``, or when 0 the CPUs this process may run on (affinity, so a worker pinned by
        systemd ``CPUAffinity=`` or a container cpuset does not oversubscribe; else ``os.cpu_count()``)."""
        if self.processes:
            return self.processes
        try:
            return len(os.sched_getaffinity(0)) or 1
        except (AttributeError, OSError):
            return os.cpu_count() or 1


class MasterConfig(BaseModel):
    """Client-side defaults; 0 / None mean "let the broker or service decide"."""

    model_config = _FROZEN
    broker: ConnectEndpoint = "tcp://127.0.0.1:5555"
    window: int = _num(1000, ge=1)
    timeout: Timeout = None
    heartbeat_interval: float = _num(protocol.HEARTBEAT_INTERVAL, ge=0.01, le=60)
    liveness: int = _num(protocol.LIVENESS, ge=2, le=100)
    max_attempts: int = _num(0, ge=0, le=100)
    broker_timeout: Timeout = 60.0
    max_frames: int = _num(protocol.MAX_FRAMES, ge=1)
    max_frame_bytes: int = _num(protocol.MAX_FRAME_BYTES, ge=1024, le=2**63 - 1)


class LoggingConfig(BaseModel):
    """``auto`` picks journal format when stderr is connected to journald (see ndpipe.logsetup)."""

    model_config = _FROZEN
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "text", "journal"] = "auto"

    @field_validator("level", "format", mode="before")
    @classmethod
    def _any_case(cls, value: Any, info: ValidationInfo) -> Any:
        """``level: debug`` is what people type; the canonical spelling is fixed here, once."""
        if isinstance(value, str):
            return value.upper() if info.field_name == "level" else value.lower()
        return value


class SecurityConfig(BaseModel):
    """CurveZMQ (PROTOCOL.md §13). Paths, checked when a program loads them (ndpipe.security), since
    which ones it needs depends on the program: the broker its pair and the allow-lists, a master or a
    worker its pair and the broker's public key."""

    model_config = _FROZEN
    curve: bool = _num(False)  # strict: YAML "yes" or 1 for a bool is a mistake here too
    insecure: bool = _num(False)  # allow binding a non-loopback TCP address without curve
    secret_key: str | None = None  # this program's key pair (NAME.key_secret)
    broker_key: str | None = None  # masters and workers: the broker's public key (NAME.key)
    masters: str | None = None  # broker: a directory of public keys allowed to submit
    workers: str | None = None  # broker: … allowed to register lanes
    admins: str | None = None  # broker: … allowed to read the full STATUS


class SpoolConfig(BaseModel):
    """``ndpipe spool``: a master daemon running job files dropped in ``dir``/inbox (ndpipe.master.spool).

    ``dir`` holds inbox/, outbox/, done/, failed/ and the journal; under systemd it is the unit's
    StateDirectory. The broker endpoint and keys come from the ``master`` and ``security`` sections."""

    model_config = _FROZEN
    dir: str = "/var/lib/ndpipe-spool"
    poll_interval: float = _num(1.0, ge=0.01, le=3600)  # seconds between scans of inbox/
    concurrency: int = _num(4, ge=1, le=1024)  # jobs in flight at once
    shards: int = _num(16, ge=1, le=65536)  # a scatter job's shards when its file names none
    drain_timeout: float = _num(30.0, ge=0, le=86400)  # SIGTERM: seconds in-flight jobs may still take
    retry_interval: float = _num(5.0, gt=0, le=3600)  # broker unreachable: seconds before a job is resent
    max_input_bytes: int = _num(4 << 30, ge=1, le=1 << 50)  # a job's input file and array, checked before loading

    @field_validator("dir")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("spool_dir", "must name a directory")
        return value


class Config(BaseModel):
    """The whole file. Every section has defaults, so an empty file is a working single-host setup."""

    model_config = _FROZEN
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    master: MasterConfig = Field(default_factory=MasterConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)


# SafeLoader that rejects duplicate keys, where PyYAML would silently keep the last one. Built with
# type() because PyYAML has no type stubs here and mypy --strict refuses to subclass Any.
_Loader: Any = type("_Loader", (yaml.SafeLoader,), {})


def _construct_mapping(loader: Any, node: Any) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            key = loader.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark, ctx = exc.problem_mark, exc.context_mark
        where = f" ({exc.context} at line {ctx.line + 1}, column {ctx.column + 1})" if exc.context and ctx else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {exc.problem}{where}"
    return f"invalid YAML: {exc}"


def _read_file(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_problem(exc)}") from None


def _env_overrides(env: Mapping[str, str]) -> list[tuple[str, tuple[str, ...], Any]]:
    """``NDPIPE_A__B=v`` → (name, ("a", "b"), yaml(v)). Variables without ``__`` (NDPIPE_CONFIG,
    NDPIPE_WORKER_INSTANCE set by the systemd template, …) are not overrides and are ignored."""
    found = []
    for name in sorted(env):
        rest = name[len(ENV_PREFIX) :]
        if name.upper()[: len(ENV_PREFIX)] != ENV_PREFIX or "__" not in rest or name.upper() == CONFIG_ENV:
            continue
        path = tuple(part.lower() for part in rest.split("__"))
        if not all(path):
            raise ConfigError(f"environment variable {name}: empty key in name (use one '__' between levels)")
        try:
            value = yaml.load(env[name], Loader=_Loader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment variable {name}: {_yaml_problem(exc)} (got {env[name]!r})") from None
        found.append((name, path, value))
    return found


def _default_at(path: tuple[str, ...]) -> Any:
    """The built-in default at ``path`` (a fresh copy), or None."""
    node: Any = Config().model_dump()
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _apply(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set ``path`` in ``data``; a missing level starts from its defaults so env layers on top of them."""
    node: Any = data
    for depth, key in enumerate(path[:-1]):
        child = node.get(key)
        if depth == 2 and path[:2] == ("worker", "services") and isinstance(child, str):
            child = {"handler": child}  # NDPIPE_WORKER__SERVICES__X__TIMEOUT after a string form
        if not isinstance(child, dict):
            default = _default_at(path[: depth + 1])
            child = default if isinstance(default, dict) else {}
        node[key] = child
        node = child
    node[path[-1]] = value


def _known_keys(parent: tuple[str, ...]) -> list[str]:
    """Keys allowed under ``parent`` (for "did you mean"); worker.services.<name> is a ServiceSpec."""
    if len(parent) == 3 and parent[:2] == ("worker", "services"):
        return list(ServiceSpec.model_fields)
    node = _default_at(parent)
    return list(node) if isinstance(node, dict) and parent != ("worker", "services") else []


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _has(data: Any, loc: tuple[str, ...]) -> bool:
    for part in loc:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _source(loc: tuple[str, ...], label: str, file_data: Any, origins: dict[tuple[str, ...], str]) -> str:
    """Blame the variable that set ``loc`` or a level above it; if the file lacks ``loc``, the variables
    below it (``NDPIPE_BOGUS__X`` → ``bogus: unknown key``) or beside it; else the file."""
    above = [name for p, name in sorted(origins.items(), key=lambda i: len(i[0])) if loc[: len(p)] == p]
    if above:
        return f"environment variable {above[-1]}"
    for scope in (loc, loc[:-1]):  # then siblings: a default broke because env changed its neighbour
        below = [name for p, name in origins.items() if p[: len(scope)] == scope]
        if below and not _has(file_data, loc):
            return "environment variable " + ", ".join(below)
    return label


def _messages(exc: ValidationError, label: str, file_data: Any, origins: dict[tuple[str, ...], str]) -> str:
    """One line per pydantic error: ``<file or env var>: <key.path>: <problem> (got <value>)``."""
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"] if p != "[key]")
        source = _source(loc, label, file_data, origins)
        if err["type"] == "extra_forbidden":
            known = _known_keys(loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(known)
            problem = f"unknown key ({hint})" if known else "unknown key"
        elif err["type"] == "missing":
            problem = "missing required key"
        else:
            problem = f"{err['msg']} (got {_show(err['input'])})"
        lines.append(f"{source}: {'.'.join(loc) or '(top level)'}: {problem}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load ``path`` (None: built-in local defaults), apply env overrides (env beats file), validate.

    Raises :class:`ConfigError` naming file or variable, key path, problem and value given.
    """
    label = os.fspath(path) if path is not None else "<defaults>"
    data: Any = {} if path is None else _read_file(label)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: top level must be a mapping of sections (got {type(data).__name__})")
    file_data = copy.deepcopy(data)
    origins: dict[tuple[str, ...], str] = {}
    for name, key_path, value in _env_overrides(os.environ if env is None else env):
        _apply(data, key_path, value)
        origins[key_path] = name
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_messages(exc, label, file_data, origins)) from None


def dump_config(cfg: Config) -> str:
    """YAML of the effective config (services in mapping form); ``load_config`` of it gives ``cfg``."""
    body: str = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    return "# effective ndpipe configuration\n" + body


def default_config_path(env: Mapping[str, str] | None = None) -> str | None:
    """``$NDPIPE_CONFIG`` if set and non-empty, else None (then the built-in defaults apply)."""
    source: Mapping[str, str] = os.environ if env is None else env
    return source.get(CONFIG_ENV) or None
