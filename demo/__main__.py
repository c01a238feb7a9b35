"""python -m demo (make demo): the whole product, end to end, on real Chinese news titles.

 1. start a local broker + Redis (unless KAFKA_BOOTSTRAP_SERVERS / REDIS_URL answer);
 2. use the published model in the checkpoint store, or train one (trainer --quick, ~3 min on 2 cores);
 3. start a worker and stream held-out test titles through it, then exact repeats and malformed messages;
 4. print each result as it arrives, then accuracy, messages/s, latency, cache hits and dead letters;
 5. retrain a model while the worker runs and show the worker switching to it without a restart;
 6. stop everything (also on Ctrl-C) and say where the logs, metrics and checkpoint are.
"""

from __future__ import annotations

import os
import random
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from bert_stream.kafka import KafkaSettings
from bert_stream.logs import configure_logging
from bert_stream.settings import from_env, parse_settings
from demo import model as models
from demo.display import Column, Table, display_width, short_version, shown
from demo.model import DemoError
from demo.processes import Interrupted, StopFlag, http_status, run_streamed, spawn, stop, tail
from demo.settings import DemoSettings
from demo.stats import Result, format_summary, summarize
from demo.stream import (
    MAX_MESSAGE_BYTES,
    Collector,
    DeadLetter,
    RunNames,
    malformed_messages,
    send_raw,
    start_servers,
    write_jsonl,
)
from deploy.local.errors import StackError
from deploy.local.stack import free_port
from trainer.data import DataSpec, load_splits

# Tansu completes a group join in about half the session timeout: a short one gets the worker going sooner
# (Apache Kafka joins at once either way).
WORKER_SESSION_TIMEOUT_MS = "6000"
# The batch after the retrain is sent slowly (messages/s) so the swap can land in the middle of it.
RETRAIN_BATCH_RATE = 10.0


def say(*lines: str) -> None:
    print(*lines, sep="\n", flush=True)


def step(title: str) -> None:
    say("", f"== {title}")


def by_version(results: list[Result]) -> list[tuple[str, int, int]]:
    """(version, results, correct) in order of first appearance."""
    out = []
    for version in dict.fromkeys(r.model_version for r in results):
        mine = [r for r in results if r.model_version == version]
        out.append((version, len(mine), sum(bool(r.correct) for r in mine)))
    return out


def results_table(labels: list[str]) -> Table:
    """One row per result: the title gets whatever width the terminal leaves."""
    width = max(9, *(display_width(label) for label in labels))
    columns = [Column("#", 4, "right"), Column("text", 0), Column("predicted", width),
               Column("true", width + 2), Column("score", 5, "right"), Column("cache", 5),
               Column("ms", 6, "right"), Column("model", 15)]
    return Table(columns, flex="text")


class Demo:
    def __init__(self, settings: DemoSettings, flag: StopFlag):
        self.settings, self.flag = settings, flag
        self.work = Path(settings.work_dir).absolute()
        self.store = Path(settings.model_dir).absolute()
        self.names = RunNames.new()
        self.rows = 0
        self.retrained: tuple[str, str] | None = None  # (version before, version the demo published)

    def run(self) -> int:
        with ExitStack() as cleanup:
            self.work.mkdir(parents=True, exist_ok=True)
            step("1/6 local stack")
            self.servers = start_servers(self.work.with_name(self.work.name + "-stack"), cleanup)
            self.kafka = from_env(KafkaSettings, bootstrap_servers=self.servers.bootstrap_servers)
            self.describe_servers()
            step("2/6 model")
            version = self.ensure_model()
            cleanup.callback(self.undo_retrain)
            step("3/6 worker")
            self.names.create_topics(self.kafka)
            self.start_worker(cleanup)
            self.pick_titles(version)
            self.collector = Collector(self.kafka, self.names, self.truth)
            cleanup.callback(self.collector.close)
            self.wait_until_ready()
            step(f"4/6 streaming {self.settings.messages} held-out news titles, repeats, malformed messages")
            self.stream_and_summarize()
            if not self.settings.skip_retrain:
                step("5/6 retraining while the worker runs (hot reload, no restart)")
                self.retrain_and_switch(version)
            step("6/6 shutting down")
        self.say_where()
        return 0

    # ---- 1. servers ----------------------------------------------------------------------------------------
    def describe_servers(self) -> None:
        started = ", ".join(self.servers.started) or "nothing (both given by the environment)"
        say(f"broker {self.servers.bootstrap_servers}, Redis {self.servers.redis_url}; started: {started}")

    # ---- 2. model ------------------------------------------------------------------------------------------
    def ensure_model(self) -> str:
        version = models.published_version(self.store)
        if version:
            say(f"using the published model {shown(self.store / version)} (move it away, or pass --model-dir, "
                "to train a new one)")
            return version
        say(f"no model published in {self.store}: training one with the trainer's --quick preset "
            f"(about 3 minutes on 2 CPU cores; log {self.work / 'train.log'})")
        argv = models.train_command(self.store, self.settings.data)
        started = time.monotonic()
        rc = run_streamed(argv, self.child_env(), self.work / "train.log", self.flag, echo=True)
        if rc != 0:
            raise DemoError(f"training failed with exit status {rc}: see {self.work / 'train.log'}")
        version = models.published_version(self.store)
        if version is None:
            raise DemoError(f"the trainer exited 0 but published nothing in {self.store}")
        say(f"trained and published {self.store / version} in {time.monotonic() - started:.0f} s")
        return version

    def child_env(self, **extra: str) -> dict[str, str]:
        """Our environment plus the servers, with console (not JSON) logs for children we show."""
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}  # only the worker gets it (in extra)
        return {**env, "KAFKA_BOOTSTRAP_SERVERS": self.servers.bootstrap_servers,
                "LOG_FORMAT": os.environ.get("LOG_FORMAT", "console"), "PYTHONUNBUFFERED": "1", **extra}

    # ---- 3. worker and titles ------------------------------------------------------------------------------
    def start_worker(self, cleanup: ExitStack) -> None:
        self.http_port = free_port()
        self.worker_log = self.work / "worker.log"
        self.worker_log.unlink(missing_ok=True)
        env = self.child_env(
            LOG_FORMAT="json", REDIS_URL=self.servers.redis_url, BERT_STREAM_MODEL_DIR=str(self.store),
            BERT_STREAM_INPUT_TOPIC=self.names.input_topic, BERT_STREAM_OUTPUT_TOPIC=self.names.output_topic,
            BERT_STREAM_DLQ_TOPIC=self.names.dlq_topic, BERT_STREAM_GROUP_ID=self.names.group_id,
            BERT_STREAM_CACHE_PREFIX=self.names.cache_prefix, BERT_STREAM_HTTP_PORT=str(self.http_port),
            BERT_STREAM_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES), BERT_STREAM_MODEL_POLL_S="1",
            KAFKA_SESSION_TIMEOUT_MS=os.environ.get("KAFKA_SESSION_TIMEOUT_MS", WORKER_SESSION_TIMEOUT_MS))
        self.worker = spawn([sys.executable, "-m", "worker.run"], env, self.worker_log)
        cleanup.callback(self.stop_worker)
        say(f"worker pid {self.worker.pid}: topics {self.names.input_topic} -> {self.names.output_topic} "
            f"(+ {self.names.dlq_topic}), log {shown(self.worker_log)}")

    def worker_died(self) -> DemoError:
        return DemoError(f"the worker exited with status {self.worker.returncode}:\n{tail(self.worker_log)}")

    def stop_worker(self) -> None:
        if self.worker.poll() is None:
            say(f"stopping the worker (SIGTERM to pid {self.worker.pid}: finish the batch, commit, exit)")
        rc = stop(self.worker)
        say(f"worker exited with status {rc}")

    def pick_titles(self, version: str) -> None:
        """Titles from the model's held-out test split, each with its true label (kept here, keyed by id)."""
        seed = models.trained_seed(self.store / version)
        splits = load_splits(DataSpec(data=self.settings.data, seed=seed))
        unknown = set(splits.labels) - models.model_labels(self.store / version)
        if unknown:
            raise DemoError(f"the model in {self.store / version} does not know the labels {sorted(unknown)} "
                            f"of {self.settings.data}: pass --model-dir with a {self.settings.data} model")
        s = self.settings
        wanted = s.messages + (0 if s.skip_retrain else s.retrain_messages)
        picked = random.Random(self.settings.seed).sample(splits.test, min(wanted, len(splits.test)))
        picked += [picked[i % len(picked)] for i in range(wanted - len(picked))]  # tiny test split: repeat
        self.truth = {f"t{i:04d}": e.label for i, e in enumerate(picked)}
        self.texts = {f"t{i:04d}": e.text for i, e in enumerate(picked)}
        self.labels = len(splits.labels)
        self.table = results_table(splits.labels)

    def wait_until_ready(self) -> None:
        """/readyz answers 200 once the model is loaded and the worker has its partitions."""
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        deadline, started = time.monotonic() + self.settings.timeout_s, time.monotonic()
        while http_status(url) != 200:
            if self.worker.poll() is not None:
                raise self.worker_died()
            if time.monotonic() > deadline:
                raise DemoError(f"the worker was not ready after {self.settings.timeout_s:.0f} s:\n"
                                f"{tail(self.worker_log)}")
            self.flag.sleep(0.25)
        say(f"worker ready in {time.monotonic() - started:.1f} s; metrics at "
            f"http://127.0.0.1:{self.http_port}/metrics while it runs")

    # ---- 4. streaming --------------------------------------------------------------------------------------
    def stream_and_summarize(self) -> None:
        n = self.settings.messages
        main_ids = list(self.truth)[:n]
        if not self.settings.quiet_table:
            say(self.table.header())
        self.publish("titles", main_ids)
        self.collect(set(main_ids), dead_letters=0)
        repeats = [f"{i}-again" for i in main_ids[: self.settings.duplicates]]
        for copy in repeats:
            original = copy.removesuffix("-again")
            self.truth[copy], self.texts[copy] = self.truth[original], self.texts[original]
        bad = malformed_messages()
        say(f"-- {len(repeats)} exact repeats (expect Redis cache hits) and {len(bad)} malformed messages "
            f"({', '.join(reason for _, _, reason in bad)})")
        if repeats:
            self.publish("repeats", repeats)
        send_raw(self.kafka, self.names.input_topic, bad)
        self.collect(set(main_ids) | set(repeats), dead_letters=len(bad))
        summary = summarize([self.collector.results[i] for i in [*main_ids, *repeats]],
                            [d.reason for d in self.collector.dead_letters])
        say("", "summary:", *format_summary(summary, self.labels))
        if summary.dlq_total != len(bad):
            raise DemoError(f"expected {len(bad)} dead letters, got {summary.dlq_total}")

    def publish(self, what: str, ids: list[str], rate: float = 0) -> None:
        """Send (id, text) pairs as JSONL, keyed by id, through the project's publisher CLI."""
        path = write_jsonl(self.work / f"{what}.jsonl", [(i, self.texts[i]) for i in ids])
        argv = [sys.executable, "-m", "worker.publish", "--input", str(path), "--topic",
                self.names.input_topic, "--key-field", "id", "--rate", str(rate), "--no-progress"]
        rc = run_streamed(argv, self.child_env(), self.work / "publish.log", self.flag, echo=False)
        if rc != 0:
            raise DemoError(f"worker.publish exited with status {rc}:\n{tail(self.work / 'publish.log')}")

    def collect(self, ids: set[str], dead_letters: int, until=None) -> None:
        """Print results as they arrive until every id in ``ids`` has one, ``dead_letters`` are on the DLQ
        and ``until()`` (if given) holds."""
        deadline = time.monotonic() + self.settings.timeout_s
        while not (ids <= self.collector.results.keys() and len(self.collector.dead_letters) >= dead_letters
                   and (until is None or until())):
            self.flag.check()
            if self.worker.poll() is not None:
                raise self.worker_died()
            if time.monotonic() > deadline:
                missing = len(ids - self.collector.results.keys())
                raise DemoError(f"{missing} results missing after {self.settings.timeout_s:.0f} s; "
                                f"worker log "
                                f"{self.worker_log}:\n{tail(self.worker_log)}")
            for item in self.collector.poll(timeout_ms=300):
                self.show(item)

    def show(self, item: Result | DeadLetter) -> None:
        if self.settings.quiet_table:
            return
        if isinstance(item, DeadLetter):
            say(f"     dead letter  key={item.key}  reason={item.reason}  ({item.detail[:60]})")
            return
        self.rows += 1
        truth = "?" if item.correct is None else ("✓" if item.correct else f"✗ {item.true_label}")
        say(self.table.row(str(self.rows), self.texts.get(item.id, item.id), item.label, truth,
                           f"{item.score:.2f}", "hit" if item.cached else "", str(item.latency_ms),
                           short_version(item.model_version)))

    # ---- 5. retrain and hot reload -------------------------------------------------------------------------
    def retrain_and_switch(self, before: str) -> None:
        """Half of the fresh titles go in while the trainer runs (served by the current model), the other
        half once the new version is published: the model column shows the swap, the ids show nothing lost."""
        s = self.settings
        fresh = list(self.truth)[s.messages: s.messages + s.retrain_messages]
        during, after_publish = fresh[: len(fresh) // 2], fresh[len(fresh) // 2:]
        if during:
            say(f"sending {len(during)} titles now: the worker serves them with the current model while "
                "the trainer runs" + ("" if s.quiet_table else " (their rows follow the trainer's output)"))
            self.publish("during-retrain", during)
        after = self.retrain(before)
        published_ms = time.time() * 1000
        self.collect(set(during), dead_letters=0)
        say(f"-- {len(after_publish)} titles after publishing {after} "
            "(the worker swaps models between batches)")
        self.publish("after-retrain", after_publish, rate=RETRAIN_BATCH_RATE)
        self.collect(set(after_publish), dead_letters=0)
        probes = self.probe_until_served_by(after, fresh[0])
        results = [self.collector.results[i] for i in fresh]
        first_new = min(r.output_ms for r in self.collector.results.values() if r.model_version == after)
        say(f"the worker switched {short_version(before)} -> {short_version(after)} without a restart (first "
            f"answer by the new model {(first_new - published_ms) / 1000:.1f} s after its publication); "
            f"all {len(fresh)} titles answered, none lost",
            *(f"  {short_version(v)}: {n} results, {c}/{n} correct" for v, n, c in by_version(results)))
        if probes:
            say(f"  (+{probes} single probe titles until the new model answered)")

    def retrain(self, before: str) -> str:
        """Run the short retrain (output shown as it comes); returns the version it published."""
        s = self.settings
        base = self.store / before
        argv = models.retrain_command(self.store, base, s.data, models.trained_seed(base), s.retrain_examples,
                                      self.servers.redis_url)
        say(f"fine-tuning the current model further on {s.retrain_examples} examples; published with --force "
            f"and announced on Redis (log {shown(self.work / 'retrain.log')})")
        with models.discard_unfinished_runs(self.store):
            rc = run_streamed(argv, self.child_env(), self.work / "retrain.log", self.flag, echo=True)
        after = models.published_version(self.store)
        if rc != 0 or after in (None, before):
            raise DemoError(f"the retrain published nothing (exit status {rc}): "
                            f"see {self.work / 'retrain.log'}")
        self.retrained = (before, after)
        return after

    def probe_until_served_by(self, version: str, like: str) -> int:
        """When the swap lands after the last title, send single titles until the new model answers one."""
        probes, deadline = 0, time.monotonic() + self.settings.timeout_s
        while not self.served_by(version):
            if time.monotonic() > deadline:
                raise DemoError(f"the worker never served {version}:\n{tail(self.worker_log)}")
            probes += 1
            probe = f"probe{probes}"
            self.truth[probe], self.texts[probe] = self.truth[like], self.texts[like]
            self.publish("probe", [probe])
            self.collect({probe}, dead_letters=0)
        return probes

    def served_by(self, version: str) -> bool:
        return any(r.model_version == version for r in self.collector.results.values())

    def undo_retrain(self) -> None:
        """After the worker has stopped: LATEST back to the model the demo started with (--keep-retrained)."""
        if self.retrained and not self.settings.keep_retrained:
            before, after = self.retrained
            models.roll_back(self.store, keep=before, remove=after)
            say(f"LATEST points back at {before}; the retrained {after} was removed "
                "(--keep-retrained keeps it)")

    # ---- 6. where things are -------------------------------------------------------------------------------
    def say_where(self) -> None:
        say("", "everything stopped. Where things are:",
            f"  checkpoint  {shown(self.store / (models.published_version(self.store) or ''))}",
            f"  worker log  {shown(self.worker_log)} (JSON lines; one per batch)",
            f"  metrics     were at http://127.0.0.1:{self.http_port}/metrics while the worker ran; "
            "a worker of your own serves them on --http-port",
            f"  demo files  {shown(self.work)} (messages sent, trainer and publisher logs)")


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(DemoSettings, argv, prog="python -m demo", description=__doc__)
    configure_logging(level="WARNING")  # the demo's output is its story on stdout; only problems on stderr
    flag = StopFlag()
    restore = flag.install()
    started = time.monotonic()
    try:
        code = Demo(settings, flag).run()
        say(f"demo finished in {time.monotonic() - started:.0f} s")
        return code
    except Interrupted as exc:
        say(f"interrupted ({exc}): everything the demo started has been stopped")
        return 130
    except (DemoError, StackError) as exc:
        print(f"python -m demo: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
