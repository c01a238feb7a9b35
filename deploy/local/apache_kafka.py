"""Apache Kafka for the local stack: one KRaft node (broker + controller) run from Maven Central's jars.

Why jars and not the release tarball or a container: Maven Central is reachable wherever this project is
built (the tarball's download site and Docker are not), and ``mvn`` resolves exactly the runtime closure of
``org.apache.kafka:kafka_2.13`` (deploy/local/kafka/pom.xml says what the tarball adds: the slf4j binding).

What happens, and what it costs (2-core machine, measured in the issue notes):
- once per cache dir: ``mvn dependency:copy-dependencies`` into ``<cache>/kafka-<version>/libs`` (~45 MB, a
  few tens of seconds; Maven's own ``~/.m2`` keeps a copy, and its ``settings.xml`` mirrors and proxies
  apply). A lock makes concurrent first starts wait for one download.
- once per data dir: ``kafka.tools.StorageTool format`` (a JVM start, ~3 s); a formatted dir is reused, so
  a restart keeps its topics and offsets.
- every start: ``java -Xmx<heap> -cp '<libs>/*' kafka.Kafka server.properties``, ready when a Metadata request
  lists the broker (5-10 s).

Settings are test-friendly, not production ones: replication factor 1 and few partitions for the internal
topics, no initial rebalance delay, session timeouts down to 1 s.
"""

from __future__ import annotations

import base64
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bert_stream.paths import cache_dir
from deploy.local.errors import BrokerUnavailable, StackError

HERE = Path(__file__).resolve().parent / "kafka"
POM = HERE / "pom.xml"
LOG4J_CONFIG = HERE / "log4j2.properties"
KAFKA_VERSION = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text()).group(1)
JAVA_MIN_MAJOR = 17          # Kafka 4.x brokers need Java 17+
HEAP = os.environ.get("BERT_STREAM_KAFKA_HEAP", "512m")  # bounded: a test broker, not a production one
MVN_TIMEOUT_S = 900          # a registry that stalls gets a clear error, not a hang
FORMAT_TIMEOUT_S = 120


def find_java() -> str:
    """``$JAVA_HOME/bin/java``, else ``java`` on PATH; a missing or too old Java is BrokerUnavailable."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home and (Path(home) / "bin" / "java").exists() else shutil.which("java")
    if not java:
        raise BrokerUnavailable(f"Apache Kafka needs Java {JAVA_MIN_MAJOR}+ and no `java` was found "
                                f"(apt-get install openjdk-17-jre-headless, or set JAVA_HOME)")
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerUnavailable(f"`{java} -version` failed ({exc})") from None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    major = int(found.group(1)) if found else 0
    major = int(found.group(2)) if major == 1 and found.group(2) else major  # "1.8.0" is Java 8
    if major < JAVA_MIN_MAJOR:
        raise BrokerUnavailable(f"Apache Kafka {KAFKA_VERSION} needs Java {JAVA_MIN_MAJOR}+, {java} is "
                                f"{major or 'unknown'} (set JAVA_HOME to a newer one)")
    return java


def kafka_home() -> Path:
    return cache_dir(f"kafka-{KAFKA_VERSION}")


def ensure_jars() -> Path:
    """The folder of broker jars, fetched from Maven Central on first use."""
    home = kafka_home()
    libs, done = home / "libs", home / "libs.complete"
    if done.exists():
        return libs
    with open(home / "fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be fetching: wait for it
        if not done.exists():
            _fetch(libs)
            done.write_text(f"{KAFKA_VERSION}\n")
    return libs


def _fetch(libs: Path) -> None:
    mvn = shutil.which("mvn")
    if not mvn:
        raise BrokerUnavailable(f"Apache Kafka's jars are fetched from Maven Central with `mvn`, which was not "
                                f"found (apt-get install maven)")
    partial = libs.with_name(f"libs.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    argv = [mvn, "-B", "-q", "-f", str(POM), "dependency:copy-dependencies", "-DincludeScope=runtime",
            f"-DoutputDirectory={partial}"]
    print(f"deploy.local: fetching Apache Kafka {KAFKA_VERSION} from Maven Central into {libs} (once)",
          file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=MVN_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        shutil.rmtree(partial, ignore_errors=True)
        raise BrokerUnavailable(f"mvn did not fetch Apache Kafka within {MVN_TIMEOUT_S} s (is Maven Central "
                                f"reachable?)") from None
    if run.returncode != 0 or not any(partial.glob("kafka_2.13-*.jar")):
        shutil.rmtree(partial, ignore_errors=True)
        raise BrokerUnavailable(f"mvn could not fetch Apache Kafka {KAFKA_VERSION} (is Maven Central "
                                f"reachable?): {_mvn_error(run.stdout + run.stderr)}")
    shutil.rmtree(libs, ignore_errors=True)
    partial.rename(libs)
    size = sum(f.stat().st_size for f in libs.iterdir()) / 1e6
    print(f"deploy.local: Apache Kafka {KAFKA_VERSION}: {len(list(libs.iterdir()))} jars, {size:.0f} MB in "
          f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


def _mvn_error(output: str) -> str:
    """The first [ERROR] line of Maven's output, without its colour codes: what failed, in one line."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in output.splitlines()]
    errors = [line.removeprefix("[ERROR]").strip() for line in lines if line.startswith("[ERROR]")]
    text = next((e for e in errors if e), next((line for line in reversed(lines) if line), "no output"))
    return text[:300]


def new_cluster_id() -> str:
    """A KRaft cluster id, as ``kafka-storage.sh random-uuid`` prints it (base64url of 16 bytes), made here
    to save a JVM start; never starting with '-' (it would read as an option)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def server_properties(port: int, controller_port: int, data_dir: Path) -> str:
    return f"""\
# written by deploy/local/apache_kafka.py: a single KRaft node for tests, the demo and benchmarks
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs={data_dir}
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
# one node: internal topics with replication factor 1, and few partitions (each is a file set to open)
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# tests join groups all the time: no initial delay, and their short session timeouts allowed
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
# a crashed exactly-once worker's open transaction holds back read_committed readers of its output partitions
# until the coordinator aborts it: checked for every second, not every 10 s (the default), so that wait is
# the transaction timeout and little more
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000
# two cores: fewer request threads than the defaults (3 network, 8 I/O)
num.network.threads=2
num.io.threads=4
"""


def write_config(state_dir: Path, port: int, controller_port: int, data_dir: Path) -> Path:
    path = state_dir / "kafka-server.properties"
    path.write_text(server_properties(port, controller_port, data_dir))
    return path


def format_storage(java: str, libs: Path, config: Path, data_dir: Path, log: Path) -> None:
    """Format ``data_dir`` for a new single-node cluster, unless it holds one already (a restart)."""
    if (data_dir / "meta.properties").exists():
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [java, "-Xmx256m", *_log_options(log.parent), "-cp", f"{libs}/*", "kafka.tools.StorageTool", "format",
            "--cluster-id", new_cluster_id(), "-c", str(config), "--ignore-formatted"]
    with open(log, "ab") as out:
        run = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=FORMAT_TIMEOUT_S,
                             stdin=subprocess.DEVNULL)
    if run.returncode != 0:
        raise StackError(f"formatting Kafka storage in {data_dir} failed (exit {run.returncode}); see {log}")


def broker_argv(java: str, libs: Path, config: Path) -> list[str]:
    return [java, f"-Xmx{HEAP}", "-Xms128m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true", *_log_options(config.parent), "-cp", f"{libs}/*", "kafka.Kafka",
            str(config)]


def _log_options(state_dir: Path) -> list[str]:
    return [f"-Dlog4j2.configurationFile={LOG4J_CONFIG}", f"-Dkafka.logs.dir={state_dir}"]

