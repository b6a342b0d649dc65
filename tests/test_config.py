"""ndpipe.config and ndpipe.logsetup: defaults, file, env overrides, and the error messages users see."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ndpipe import protocol
from ndpipe.config import (
    Config,
    ServiceSpec,
    WorkerConfig,
    default_config_path,
    dump_config,
    load_config,
)
from ndpipe.errors import ConfigError
from ndpipe.logsetup import JournalFormatter, setup_logging, under_journald

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path | None = None, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return str(info.value)


# --- defaults and the shipped file ----------------------------------------------------------------


def test_defaults_come_from_protocol_constants() -> None:
    # Given no file and no environment
    # When loading
    cfg = load_config(None, env={})
    # Then every default is the protocol's, and the endpoints are local
    assert cfg == Config()
    assert cfg.broker.heartbeat_interval == protocol.HEARTBEAT_INTERVAL
    assert cfg.broker.liveness == protocol.LIVENESS
    assert cfg.broker.max_attempts == protocol.MAX_ATTEMPTS_DEFAULT
    assert cfg.broker.max_queued == protocol.MAX_QUEUED
    assert cfg.broker.max_frames == cfg.worker.max_frames == protocol.MAX_FRAMES
    assert (cfg.worker.reconnect_min, cfg.worker.reconnect_max) == (
        protocol.RECONNECT_MIN,
        protocol.RECONNECT_MAX,
    )
    assert cfg.broker.frontend == cfg.master.broker == "tcp://127.0.0.1:5555"
    assert cfg.broker.backend == cfg.worker.broker == "tcp://127.0.0.1:5556"
    assert cfg.worker.services == {"echo": ServiceSpec(handler="ndpipe.examples.handlers:echo")}
    assert cfg.logging.level == "INFO"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    # Given an empty file (or one with only comments)
    path = write(tmp_path, "# nothing here\n")
    # When loading it
    # Then the defaults apply
    assert load_config(path, env={}) == Config()


def test_shipped_config_yaml_is_valid_and_shows_every_key() -> None:
    # Given the repository's commented config.yaml
    path = REPO / "config.yaml"
    # When loading it
    cfg = load_config(path, env={})
    # Then it is valid, lists the example services, and its values are the defaults
    assert set(cfg.worker.services) == {"echo", "mlp", "normalize", "mlp_resident"}
    assert cfg.worker.services["mlp_resident"].init == {"d_in": 256, "d_hidden": 512, "seed": 0}
    assert cfg.worker.services["mlp"].handler == "ndpipe.examples.handlers:mlp_forward"
    assert cfg.worker.services["mlp"].timeout == 60.0
    assert cfg.worker.services["normalize"].handler == "ndpipe.examples.handlers:normalize"
    assert cfg.model_copy(update={"worker": Config().worker}) == Config()
    # And every key of every section appears in it (so the file documents them all)
    text = path.read_text()
    for section, model in Config.model_fields.items():
        assert f"\n{section}:\n" in text
        assert model.annotation is not None
        for key in model.annotation.model_fields:
            assert f"  {key}:" in text, f"{section}.{key} missing from config.yaml"


def test_service_shorthand_and_mapping_forms(tmp_path: Path) -> None:
    # Given services in both forms
    path = write(tmp_path, "worker:\n  services:\n    a: pkg.mod:fn\n    b: {handler: p.q:r.s, timeout: 2.5}\n")
    # When loading
    services = load_config(path, env={}).worker.services
    # Then both become ServiceSpec
    assert services["a"] == ServiceSpec(handler="pkg.mod:fn")
    assert services["b"] == ServiceSpec(handler="p.q:r.s", timeout=2.5)


def test_effective_processes() -> None:
    # Given processes 0 (auto) and an explicit count
    # Then auto is the usable CPUs, explicit is kept
    assert WorkerConfig().effective_processes >= 1
    assert WorkerConfig(processes=3).effective_processes == 3


def test_models_are_frozen() -> None:
    # Given a loaded config
    cfg = load_config(None, env={})
    # When changing a field
    # Then it refuses (daemons share one config object across threads)
    with pytest.raises(ValueError):
        cfg.broker.hwm = 5  # type: ignore[misc]


# --- environment overrides ------------------------------------------------------------------------


def test_env_overrides_float_int_service_and_null(tmp_path: Path) -> None:
    # Given a file and overrides of several types, with mixed-case names
    path = write(tmp_path, "master:\n  timeout: 5.0\nworker:\n  services:\n    echo: a.b:c\n")
    env = {
        "NDPIPE_BROKER__HEARTBEAT_INTERVAL": "0.5",
        "ndpipe_worker__processes": "4",
        "NDPIPE_WORKER__SERVICES__ECHO": "pkg.mod:fn",
        "NDPIPE_WORKER__SERVICES__SLOW__HANDLER": "pkg.slow:run",
        "NDPIPE_WORKER__SERVICES__SLOW__TIMEOUT": "120",
        "NDPIPE_MASTER__TIMEOUT": "null",
        "NDPIPE_LOGGING__LEVEL": "debug",
        "NDPIPE_CONFIG": "/ignored.yaml",
        "NDPIPE_WORKER_INSTANCE": "2",
        "PATH": "/usr/bin",
    }
    # When loading
    cfg = load_config(path, env=env)
    # Then env beats file, values are typed by YAML, and non-override variables are ignored
    assert cfg.broker.heartbeat_interval == 0.5
    assert cfg.worker.processes == 4
    assert cfg.worker.services["echo"].handler == "pkg.mod:fn"
    assert cfg.worker.services["slow"] == ServiceSpec(handler="pkg.slow:run", timeout=120)
    assert cfg.master.timeout is None
    assert cfg.logging.level == "DEBUG"


def test_env_adds_to_default_services_and_extends_shorthand() -> None:
    # Given no file, a new service, and a timeout for a service given in shorthand
    env = {"NDPIPE_WORKER__SERVICES__MLP": "x.y:z", "NDPIPE_WORKER__SERVICES__MLP__TIMEOUT": "3"}
    # When loading
    services = load_config(None, env=env).worker.services
    # Then the default echo stays and mlp has both handler and timeout
    assert set(services) == {"echo", "mlp"}
    assert services["mlp"] == ServiceSpec(handler="x.y:z", timeout=3)


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given an override in the process environment
    monkeypatch.setenv("NDPIPE_BROKER__HWM", "2000")
    # When loading without an explicit env
    # Then it applies
    assert load_config().broker.hwm == 2000


def test_env_error_names_the_variable(tmp_path: Path) -> None:
    # Given a valid file and an invalid override
    path = write(tmp_path, "broker:\n  hwm: 5000\n")
    # When loading
    msg = error_of(path, {"NDPIPE_BROKER__HEARTBEAT_INTERVAL": "-1"})
    # Then the message names the variable, key, problem and value
    assert msg == (
        "environment variable NDPIPE_BROKER__HEARTBEAT_INTERVAL: broker.heartbeat_interval: "
        "Input should be greater than or equal to 0.01 (got -1)"
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"NDPIPE_BOGUS__X": "1"}, "environment variable NDPIPE_BOGUS__X: bogus: unknown key"),
        ({"NDPIPE_BROKER____X": "1"}, "environment variable NDPIPE_BROKER____X: empty key"),
        ({"NDPIPE_BROKER__HWM": "[1"}, "environment variable NDPIPE_BROKER__HWM: line 1"),
        (
            {"NDPIPE_WORKER__SERVICES__X__TIMEOUT": "1"},
            "environment variable NDPIPE_WORKER__SERVICES__X__TIMEOUT: worker.services.x.handler: missing",
        ),
        (
            {"NDPIPE_WORKER__RECONNECT_MIN": "10"},
            "environment variable NDPIPE_WORKER__RECONNECT_MIN: worker.reconnect_max: must be >=",
        ),
    ],
)
def test_env_errors_blame_the_right_variable(env: dict[str, str], expected: str) -> None:
    # Given a bad override (unknown section, bad name, bad YAML, incomplete service, broken ordering)
    # When loading
    # Then the message starts by naming that variable
    assert error_of(None, env).startswith(expected)


# --- file errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key_path", "hint"),
    [
        ("bogus: 1\n", "bogus", "known keys: broker, worker, master, logging"),
        (
            "broker:\n  heartbeat_intervall: 1\n",
            "broker.heartbeat_intervall",
            "did you mean 'heartbeat_interval'?",
        ),
        ("worker:\n  sevices: {}\n", "worker.sevices", "did you mean 'services'?"),
        ("worker:\n  services:\n    a: {handler: a:b, timeot: 1}\n", "worker.services.a.timeot", "'timeout'"),
        ("master:\n  windw: 1\n", "master.windw", "'window'"),
        ("logging:\n  levl: INFO\n", "logging.levl", "'level'"),
    ],
)
def test_unknown_key_at_each_level_names_file_and_key_path(tmp_path: Path, text: str, key_path: str, hint: str) -> None:
    # Given a file with a misspelt key
    path = write(tmp_path, text)
    # When loading
    msg = error_of(path)
    # Then the message is "<file>: <key path>: unknown key (...)"
    assert msg.startswith(f"{path}: {key_path}: unknown key (")
    assert hint in msg


def test_unknown_key_message_matches_documented_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the documented example
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "broker:\n  heartbeat_intervall: 1\n")
    # When loading by relative name
    # Then the message reads as documented
    assert error_of(Path("config.yaml")).startswith("config.yaml: broker.heartbeat_intervall: unknown key")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "broker:\n  heartbeat_interval: -1\n",
            "broker.heartbeat_interval: Input should be greater than or equal to 0.01 (got -1)",
        ),
        ("broker:\n  liveness: many\n", "broker.liveness: Input should be a valid integer (got 'many')"),
        ("broker:\n  liveness: true\n", "broker.liveness: Input should be a valid integer (got True)"),
        ("broker:\n  hwm: 10\n", "broker.hwm: Input should be greater than or equal to 1000 (got 10)"),
        ("broker: 5\n", "broker: Input should be a valid dictionary or instance of BrokerConfig (got 5)"),
        ("worker:\n  processes: 2.5\n", "worker.processes: Input should be a valid integer (got 2.5)"),
        ("worker:\n  services: {}\n", "worker.services: Dictionary should have at least 1 item"),
        ("worker:\n  services:\n    a: 5\n", "worker.services.a: Input should be a valid dictionary"),
        ("worker:\n  services:\n    a: {timeout: 1}\n", "worker.services.a.handler: missing required key"),
        (
            "worker:\n  services:\n    'a b': x:y\n",
            "worker.services.a b: must be 1..255 bytes without whitespace",
        ),
        ("master:\n  timeout: .inf\n", "master.timeout: Input should be a finite number"),
        ("master:\n  timeout: 0\n", "master.timeout: Input should be greater than 0 (got 0)"),
        ("logging:\n  level: LOUD\n", "logging.level: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
    ],
)
def test_wrong_value_names_key_expected_and_given(tmp_path: Path, text: str, expected: str) -> None:
    # Given a file with a value of the wrong type or out of range
    path = write(tmp_path, text)
    # When loading
    # Then the message names file, key path, what was expected and what was given
    assert error_of(path).startswith(f"{path}: {expected}")


def test_all_errors_are_reported_one_per_line(tmp_path: Path) -> None:
    # Given a file with three mistakes
    path = write(tmp_path, "broker:\n  liveness: 1\n  hwm: 1\nmaster:\n  window: 0\n")
    # When loading
    lines = error_of(path).splitlines()
    # Then each has its own line
    assert [line.split(": ")[1] for line in lines] == ["broker.liveness", "broker.hwm", "master.window"]


@pytest.mark.parametrize(
    ("field", "endpoint", "problem"),
    [
        ("broker:\n  frontend", "udp://1.2.3.4:5", "expected tcp://HOST:PORT, ipc://PATH or inproc://NAME"),
        ("broker:\n  frontend", "tcp://127.0.0.1", "expected tcp://HOST:PORT"),
        ("broker:\n  frontend", "tcp://127.0.0.1:0", "tcp port must be 1..65535"),
        ("broker:\n  backend", "tcp://127.0.0.1:70000", "tcp port must be 1..65535"),
        ("broker:\n  backend", "tcp://999.1.1.1:5", "bad HOST"),
        ("broker:\n  backend", "tcp://[::zz]:5", "bad HOST"),
        ("broker:\n  backend", "tcp://bad_host!:5", "bad HOST"),
        ("broker:\n  backend", "ipc://", "ipc:// needs a non-empty"),
        ("worker:\n  broker", "tcp://*:5556", "'*' only works for binding"),
        ("master:\n  broker", "inproc://", "inproc:// needs a non-empty"),
        ("master:\n  broker", "5555", "expected tcp://HOST:PORT"),
    ],
)
def test_bad_endpoint(tmp_path: Path, field: str, endpoint: str, problem: str) -> None:
    # Given a file with a malformed endpoint
    path = write(tmp_path, f"{field}: '{endpoint}'\n")
    # When loading
    msg = error_of(path)
    # Then the message says what was expected and echoes the value
    assert problem in msg
    assert f"(got '{endpoint}')" in msg


@pytest.mark.parametrize(
    ("section", "key", "endpoint"),
    [
        ("broker", "frontend", "tcp://*:5555"),
        ("broker", "backend", "tcp://[::1]:5556"),
        ("broker", "backend", "ipc:///run/ndpipe/backend"),
        ("worker", "broker", "tcp://broker-1.example.org:5556"),
        ("worker", "broker", "tcp://10.0.0.7:5556"),
        ("master", "broker", "inproc://test"),
    ],
)
def test_good_endpoints(tmp_path: Path, section: str, key: str, endpoint: str) -> None:
    # Given a valid endpoint of each form
    path = write(tmp_path, f"{section}:\n  {key}: '{endpoint}'\n")
    # When loading
    # Then it is kept as given
    assert getattr(getattr(load_config(path, env={}), section), key) == endpoint


@pytest.mark.parametrize("handler", ["nocolon", "pkg.mod:", ":fn", "pkg..mod:fn", "pkg.mod:fn()", "1pkg:fn", "a b:c"])
def test_bad_handler_string(tmp_path: Path, handler: str) -> None:
    # Given a service whose handler is not "package.module:function"
    path = write(tmp_path, f"worker:\n  services:\n    s: '{handler}'\n")
    # When loading
    msg = error_of(path)
    # Then the message names the service's handler key and the expected form
    assert msg.startswith(f"{path}: worker.services.s.handler: expected 'package.module:function'")
    assert f"(got '{handler}')" in msg


def test_handler_is_not_imported(tmp_path: Path) -> None:
    # Given a handler in a module that does not exist
    path = write(tmp_path, "worker:\n  services:\n    s: no_such_pkg.mod:Cls.method\n")
    # When loading
    # Then it is accepted (syntax only; the worker imports it)
    assert load_config(path, env={}).worker.services["s"].handler == "no_such_pkg.mod:Cls.method"


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    # Given a file with broken YAML on line 3
    path = write(tmp_path, "broker:\n  hwm: 2000\n  liveness: [3\n")
    # When loading
    msg = error_of(path)
    # Then the message names the file, the line and says it is YAML
    assert msg.startswith(f"{path}: line ")
    assert "invalid YAML" in msg


def test_yaml_syntax_error_line_number(tmp_path: Path) -> None:
    # Given a mapping value where none is allowed on line 2
    path = write(tmp_path, "broker:\n  hwm: 2000: 3\n")
    # Then the line is 2
    assert error_of(path).startswith(f"{path}: line 2, column ")


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    # Given a file with two broker sections (PyYAML would keep only the last)
    path = write(tmp_path, "broker:\n  hwm: 2000\nmaster: {}\nbroker:\n  liveness: 4\n")
    # When loading
    msg = error_of(path)
    # Then the second one is reported with its line
    assert msg.startswith(f"{path}: line 4, column 1: invalid YAML: duplicate key 'broker'")


def test_merge_keys_still_work(tmp_path: Path) -> None:
    # Given YAML anchors and a merge key overriding one value
    path = write(
        tmp_path,
        "worker:\n  services:\n    a: &s {handler: p.m:f, timeout: 1}\n    b: {<<: *s, timeout: 2}\n",
    )
    # Then the merge applies and is not a duplicate
    services = load_config(path, env={}).worker.services
    assert services["b"] == ServiceSpec(handler="p.m:f", timeout=2)


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_top_level_not_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    # Given a file whose top level is not a mapping
    path = write(tmp_path, text)
    # When loading
    # Then the message names the file and what it got
    assert error_of(path) == f"{path}: top level must be a mapping of sections (got {kind})"


def test_missing_file(tmp_path: Path) -> None:
    # Given a path that does not exist
    path = tmp_path / "nope.yaml"
    # When loading
    # Then the message names the file and says it is missing
    assert error_of(path) == f"{path}: config file not found"


def test_unreadable_paths(tmp_path: Path) -> None:
    # Given a directory and a non-UTF-8 file
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"broker:\n  x: \xff\n")
    # Then both give a ConfigError naming the path
    assert error_of(tmp_path).startswith(f"{tmp_path}: cannot read config file")
    assert error_of(binary).startswith(f"{binary}: not UTF-8 text")


# --- dump -----------------------------------------------------------------------------------------


def test_dump_then_load_roundtrip(tmp_path: Path) -> None:
    # Given a config that differs from the defaults everywhere it can
    path = write(
        tmp_path,
        "broker: {frontend: 'tcp://*:6000', heartbeat_interval: 0.25, max_frame_bytes: 2048}\n"
        "worker: {processes: 2, services: {a: p.m:f, b: {handler: p.m:g, timeout: 1.5}}}\n"
        "master: {timeout: 10, max_attempts: 5}\nlogging: {level: debug, format: journal}\n",
    )
    cfg = load_config(path, env={})
    # When dumping it and loading the dump
    text = dump_config(cfg)
    again = load_config(write(tmp_path, text, "dumped.yaml"), env={})
    # Then nothing changed, and services are written as mappings
    assert again == cfg
    assert "    a:\n      handler: p.m:f\n" in text


def test_dump_of_defaults_roundtrips(tmp_path: Path) -> None:
    # Given the defaults
    # When dumped and loaded
    # Then they are equal
    assert load_config(write(tmp_path, dump_config(Config())), env={}) == Config()


def test_default_config_path() -> None:
    # Given NDPIPE_CONFIG set, empty, or missing
    # Then it names the file only when set
    assert default_config_path({"NDPIPE_CONFIG": "/etc/ndpipe/config.yaml"}) == "/etc/ndpipe/config.yaml"
    assert default_config_path({"NDPIPE_CONFIG": ""}) is None
    assert default_config_path({}) is None


# --- logsetup -------------------------------------------------------------------------------------


@pytest.fixture
def clean_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("ndpipe_test_logs")
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)


def test_setup_logging_is_idempotent(clean_logger: logging.Logger) -> None:
    # Given setup called twice with different levels
    setup_logging("INFO", "text", name=clean_logger.name)
    setup_logging("debug", "text", name=clean_logger.name)
    # Then one handler remains, at the last level
    assert len(clean_logger.handlers) == 1
    assert clean_logger.level == logging.DEBUG


def test_text_format_has_time_level_process_and_logger(
    clean_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given text format
    setup_logging("INFO", "text", name=clean_logger.name)
    # When logging
    clean_logger.getChild("broker").warning("hello %s", "world")
    # Then the line carries time, level, process name and pid, logger name and message
    line = capsys.readouterr().err.strip()
    assert "WARNING" in line
    assert f"[{os.getpid()}]" in line
    assert "ndpipe_test_logs.broker: hello world" in line
    assert line[:4].isdigit()  # starts with the year


def test_journal_format_prefixes_every_line_with_priority() -> None:
    # Given the journal formatter
    fmt = JournalFormatter()

    def line(level: int, msg: str) -> str:
        return fmt.format(logging.LogRecord("ndpipe.x", level, __file__, 1, msg, None, None))

    # Then each level maps to its syslog priority, with no timestamp, on every line
    assert line(logging.ERROR, "e").startswith("<3>ndpipe.x[")
    assert line(logging.WARNING, "w").startswith("<4>")
    assert line(logging.INFO, "i").startswith("<6>")
    assert line(logging.DEBUG, "d").startswith("<7>")
    assert all(part.startswith("<3>") for part in line(logging.ERROR, "a\nb\nc").splitlines())


def test_auto_detects_journal_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a stream whose device:inode is in JOURNAL_STREAM, and one that is not
    with open(tmp_path / "j", "w") as journal, open(tmp_path / "other", "w") as other:
        st = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        # Then only the first counts as the journal, and streams without fileno are not
        assert under_journald(journal)
        assert not under_journald(other)
        assert not under_journald(io.StringIO())
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not under_journald(journal)


def test_setup_logging_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="logging.level"):
        setup_logging("LOUD")
    with pytest.raises(ConfigError, match="logging.format"):
        setup_logging("INFO", "xml")


def test_memory_limit_defaults_to_most_of_the_host_so_one_handler_cannot_take_it_all() -> None:
    """Issue 12, attack 5: memory_limit defaulted to 0 (none), and a 15 MiB payload pushed one compute
    process to 1.2 GiB. The default is now "auto": 80 % of physical memory per lane; 0 still means none."""
    import psutil

    from ndpipe.config import WorkerConfig

    auto = WorkerConfig()
    assert auto.memory_limit == "auto"
    assert auto.lane_memory_limit == int(psutil.virtual_memory().total * 0.8)
    assert WorkerConfig(memory_limit=0).lane_memory_limit == 0
    assert WorkerConfig(memory_limit=1 << 30).lane_memory_limit == 1 << 30
