"""The shipped dashboard and alerts against a real Prometheus scraping a real worker while messages flow.

Debian's Prometheus server scrapes the worker's /metrics every second and loads the shipped alert rules.
Every query of every dashboard panel must return data (so a typo in a metric name, a label or a function
fails here), every metric an alert reads must exist, and every rule must evaluate without error. The
worker runs exactly-once with Redis, and the stream carries repeats and a few malformed records, so the
transaction, cache and dead-letter panels have something to show.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from deploy.local.stack import free_port
from tests.deploy.test_monitoring import MONITORING, rule_groups, write_rules_file
from tests.fault import harness as h
from tests.fault.test_crash import _topics

pytestmark = [pytest.mark.fault, pytest.mark.kafka, pytest.mark.slow]

PROMETHEUS = shutil.which("prometheus")
RATE_WINDOW = "30s"  # what $__rate_interval becomes: several 1 s scrapes, so every rate() has points


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _get(base: str, path: str) -> dict:
    with urllib.request.urlopen(f"{base}{path}", timeout=10) as resp:
        return json.load(resp)["data"]


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    return [(panel["title"], target["expr"].replace("$__rate_interval", RATE_WINDOW))
            for panel in dashboard["panels"] for target in panel["targets"]]


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not found (Debian: apt-get install prometheus; "
                                               "make setup does it as root)")
def test_every_panel_and_alert_query_works_on_a_live_worker(kafka_settings, names, model_store, stack, workers,
                                                            tmp_path):
    _topics(kafka_settings, names)
    messages = h.make_messages(3000, seed=5)
    bad = [(f"bad-{i}", b"{not json") for i in range(5)]
    publisher = h.RatePublisher(kafka_settings, names.input_topic, messages[:10] + bad + messages[10:], rate=60)
    env = h.worker_env(bootstrap_servers=stack.bootstrap_servers, names=names, model_dir=model_store,
                       redis_url=stack.redis_url, delivery="exactly-once", http_port=0, quality_window=200)
    worker = workers.start("worker", env)
    port = worker.http_port
    publisher.start()

    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [{write_rules_file(tmp_path)}]
scrape_configs:
  - job_name: bert-stream-worker
    static_configs:
      - targets: ["127.0.0.1:{port}"]
        labels: {{pod: worker-0}}
""")
    log = open(tmp_path / "prometheus.log", "w")
    server = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{prom_port}"
    try:
        queries = dashboard_queries()
        empty: list[tuple[str, str]] = queries
        deadline = time.monotonic() + 120
        while empty and time.monotonic() < deadline:
            time.sleep(2)
            try:
                empty = [(title, expr) for title, expr in queries if not _query(base, expr)]
            except OSError:  # the server is still starting
                continue
        assert worker.alive(), worker.tail()
        assert not empty, "dashboard queries without data:\n" + "\n".join(f"{t}: {e}" for t, e in empty)

        # every metric an alert reads is exported by the worker (alerts are quiet here: their names are checked)
        names_read = {m for g in rule_groups() for r in g["rules"] for m in re.findall(r"bert_stream_\w+", r["expr"])}
        missing = [m for m in sorted(names_read) if not _query(base, f"count({{__name__='{m}'}})")]
        assert not missing, f"alerts read metrics the worker does not export: {missing}"
        # the server loaded every rule and evaluated each without error
        loaded = [r for g in _get(base, "/api/v1/rules")["groups"] for r in g["rules"]]
        assert len(loaded) == sum(len(g["rules"]) for g in rule_groups())
        assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]
        drift = _query(base, "bert_stream_label_drift")
        print(f"panels: {len({t for t, _ in queries})}, queries: {len(queries)}, alerts: {len(loaded)}, "
              f"metrics read by alerts: {len(names_read)}, drift: {drift[0]['value'][1]}")
    finally:
        publisher.stop.set()
        server.terminate()
        server.wait(10)
        log.close()
        print(Path(tmp_path / "prometheus.log").read_text()[-2000:] if server.returncode not in (0, -15) else "")
