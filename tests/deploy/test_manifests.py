"""The Kubernetes manifests (deploy/k8s) are tested like code: every kustomization renders offline, every
built-in kind validates against a pinned Kubernetes schema, the CRD resources carry what their controllers
require, and names that must agree across files do agree with each other and with the code that reads them
(the settings classes, the worker's HTTP server, the checkpoint store). deploy/README.md's commands are
checked against the manifests too.

Rendering needs ``kubectl`` (its built-in kustomize works offline); without it these tests skip.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from bert_stream.settings import env_vars, from_env, required_env_vars
from trainer.settings import TrainSettings
from worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
README = REPO / "deploy" / "README.md"
EXAMPLE_SECRETS = K8S / "examples" / "secrets.example.yaml"

# The oldest Kubernetes the manifests promise to work on (CronJob timeZone, Job podFailurePolicy: >= 1.27).
K8S_VERSION = "1.30"
OVERLAYS = ("gpu", "cpu")
# Everything a user renders: the long-lived overlays, the one-off training Jobs, the Strimzi topics.
KUSTOMIZATIONS = (*(f"overlays/{o}" for o in OVERLAYS), *(f"overlays/{o}/train-job" for o in OVERLAYS),
                  "topics")

# Custom resources: no schema in kubernetes-validate; their required fields are checked by hand below.
CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
# Environment variables read by code other than the settings classes: name -> the file that reads it.
EXTRA_ENV = {
    "BERT_STREAM_CACHE": REPO / "bert_stream" / "paths.py",  # the data/model cache folder
}
# Read by third-party libraries, allowed on the trainer only, with the reason.
LIBRARY_ENV = {"OMP_NUM_THREADS": "torch's intra-op threads (the trainer has no thread setting of its own)"}
PLACEHOLDER = "CHANGE-ME"

KUBECTL = shutil.which("kubectl")
NO_KUBECTL = "kubectl not found: it renders the kustomizations (Debian: apt-get install kubectl)"
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason=NO_KUBECTL)


# ---- rendering and lookup ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _render(kustomization: str) -> tuple[dict, ...]:
    proc = subprocess.run([KUBECTL, "kustomize", str(K8S / kustomization)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def render(kustomization: str) -> list[dict]:
    return list(_render(kustomization))


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def container(obj: dict, name: str) -> dict:
    (c,) = [c for c in pod_spec(obj)["containers"] if c["name"] == name]
    return c


def container_env(docs: list[dict], c: dict) -> dict[str, object]:
    """What the container's environment holds: a string, or ("secret", name, key) for a secretKeyRef.
    ConfigMaps named by envFrom must be in the same render (the hashed name is matched)."""
    env: dict[str, object] = {}
    for source in c.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        env.update(one(docs, "ConfigMap", ref)["data"])
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = ("secret", ref["name"], ref["key"])
    return env


def expanded_env(env: dict[str, object]) -> dict[str, str]:
    """The environment as the process sees it: secrets replaced by placeholders, $(VAR) expanded like the
    kubelet does (only variables defined earlier in the list; ours are)."""
    out: dict[str, str] = {}
    for name, value in env.items():
        if isinstance(value, tuple):
            out[name] = f"{PLACEHOLDER}-{value[2]}".replace(".", "-")
        else:
            out[name] = re.sub(r"\$\((\w+)\)", lambda m: out.get(m.group(1), m.group(0)), value)
    return out


def composition_only(c: dict) -> set[str]:
    """Variables set only to be expanded into another variable's value ($(REDIS_PASSWORD) in REDIS_URL)."""
    values = " ".join(item.get("value", "") for item in c.get("env", []))
    return set(re.findall(r"\$\((\w+)\)", values))


def workload(docs: list[dict], component: str) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "Job", "CronJob")
            and d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]


@pytest.fixture(scope="module")
def topics() -> list[dict]:
    return render("topics")


# ---- every kustomization renders and validates -------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_and_validates(kustomization):
    docs = render(kustomization)
    assert docs, f"{kustomization} renders nothing"
    for doc in docs:
        where = f"{kustomization}: {doc['kind']}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue  # checked field by field in test_crd_*
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{where}: no Kubernetes {K8S_VERSION} schema for {doc['apiVersion']} "
                        f"(a typo, or a CRD missing from CRDS)")
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where} does not validate against Kubernetes {K8S_VERSION}: {path}: {exc.message}")


# ---- CRDs: what the controllers require --------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_crd_keda_scaledobject(overlay):
    docs = render(f"overlays/{overlay}")
    so = one(docs, "ScaledObject")
    spec = so["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    one(docs, "Deployment", target["name"])  # KEDA scales an existing Deployment
    assert "replicas" not in one(docs, "Deployment", target["name"])["spec"], \
        "KEDA owns the replica count: a replicas field would be reset by every apply"
    assert isinstance(spec["minReplicaCount"], int) and spec["minReplicaCount"] >= 1
    assert isinstance(spec["maxReplicaCount"], int) and spec["maxReplicaCount"] >= spec["minReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    # KEDA's trigger metadata is map[string]string: a YAML number would be rejected by the CRD schema.
    assert all(isinstance(v, str) for v in meta.values()), f"non-string trigger metadata: {meta}"
    for key in ("bootstrapServers", "consumerGroup", "topic", "lagThreshold"):
        assert meta.get(key), f"kafka trigger needs {key}"
    assert int(meta["lagThreshold"]) > 0
    assert meta.get("offsetResetPolicy", "latest") in ("earliest", "latest")
    auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    allowed = {"sasl", "username", "password", "tls", "ca", "cert", "key", "keyPassword"}
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["parameter"] in allowed and ref["name"] and ref["key"], ref


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_crd_prometheus_operator_monitoring(overlay):
    """Both overlays include deploy/k8s/monitoring: the PodMonitor selects the worker pods on a port their
    container names, every alert has an expression, a severity and a runbook line, and the dashboard
    ConfigMap carries Grafana's sidecar label and valid JSON (queried for real in test_monitoring.py)."""
    import json

    docs = render(f"overlays/{overlay}")
    worker = one(docs, "Deployment", "bert-stream-worker")["spec"]["template"]
    monitor = one(docs, "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= worker["metadata"]["labels"].items()
    ports = {p["name"] for c in worker["spec"]["containers"] for p in c.get("ports", [])}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    rules = [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    assert len(rules) >= 8
    for rule in rules:
        assert rule["alert"].startswith("BertStream") and rule["expr"].strip()
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and len(rule["annotations"]["runbook"]) > 40, rule["alert"]
    dashboard = one(docs, "ConfigMap", "bert-stream-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    (body,) = dashboard["data"].values()
    assert json.loads(body)["panels"]
    assert {d["metadata"].get("namespace") for d in (monitor, dashboard)} == {"bert-stream"}


@needs_kubectl
def test_crd_strimzi_kafkatopics(topics):
    assert len(find(topics, "KafkaTopic")) == 5  # input, output, dead letters, review, labels
    for topic in find(topics, "KafkaTopic"):
        name = topic["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) and len(name) <= 253, name
        assert topic["metadata"]["labels"].get("strimzi.io/cluster"), \
            f"{name}: the Topic Operator ignores a KafkaTopic without strimzi.io/cluster"
        assert topic["metadata"].get("namespace"), f"{name}: must be in the Topic Operator's namespace"
        spec = topic["spec"]
        assert re.fullmatch(r"[a-zA-Z0-9._-]{1,249}", spec.get("topicName", name)), name
        assert isinstance(spec["partitions"], int) and spec["partitions"] >= 1
        assert isinstance(spec["replicas"], int) and 1 <= spec["replicas"] <= 32767
        retention = int(spec["config"]["retention.ms"])
        assert retention > 0 or (retention == -1 and spec["config"]["cleanup.policy"] == "compact"), \
            f"{name}: retention must be explicit (forever only for a compacted topic)"
        assert int(spec["config"]["min.insync.replicas"]) <= spec["replicas"]


# ---- names that must agree ---------------------------------------------------------------------------------


def _topic_by_name(topics: list[dict]) -> dict[str, dict]:
    return {t["spec"].get("topicName", t["metadata"]["name"]): t for t in find(topics, "KafkaTopic")}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_topics_group_and_bootstrap_agree(overlay, topics):
    docs = render(f"overlays/{overlay}")
    worker = container(one(docs, "Deployment", "bert-stream-worker"), "worker")
    env = expanded_env(container_env(docs, worker))
    settings = from_env(WorkerSettings, env=env)
    by_name = _topic_by_name(topics)
    for role in ("input_topic", "output_topic", "dlq_topic", "review_topic"):
        assert getattr(settings, role) in by_name, \
            f"{role}={getattr(settings, role)!r} has no KafkaTopic (topics: {sorted(by_name)})"
    trainer = container(one(docs, "CronJob", "bert-stream-trainer"), "trainer")
    trained = from_env(TrainSettings, env=expanded_env(container_env(docs, trainer)))
    labels = by_name.get(trained.feedback_topic)
    assert labels is not None, f"the trainer's feedback topic {trained.feedback_topic!r} has no KafkaTopic"
    assert labels["spec"]["config"]["cleanup.policy"] == "compact", "a label must replace the id's earlier one"
    assert trained.kafka.bootstrap_servers == settings.kafka.bootstrap_servers
    assert trained.kafka.security_protocol == settings.kafka.security_protocol
    assert len(by_name) == 5, f"KafkaTopics nothing uses: {sorted(by_name)}"

    so = one(docs, "ScaledObject")
    meta = so["spec"]["triggers"][0]["metadata"]
    assert meta["topic"] == settings.input_topic, "KEDA must watch the lag of the worker's input topic"
    assert meta["consumerGroup"] == settings.group_id, "KEDA must watch the worker's consumer group"
    assert meta["bootstrapServers"] == settings.kafka.bootstrap_servers
    partitions = by_name[settings.input_topic]["spec"]["partitions"]
    assert so["spec"]["maxReplicaCount"] <= partitions, \
        f"maxReplicaCount {so['spec']['maxReplicaCount']} > {partitions} input partitions: idle workers"

    # The security settings KEDA uses are the worker's.
    protocol = settings.kafka.security_protocol
    assert (meta.get("tls") == "enable") == protocol.endswith("SSL")
    keda_sasl = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
    expected_sasl = keda_sasl[settings.kafka.sasl_mechanism] if protocol.startswith("SASL") else None
    assert meta.get("sasl") == expected_sasl, "KEDA must log in the way the worker does"

    # Strimzi's bootstrap service is <cluster>-kafka-bootstrap in the cluster's namespace.
    topic = by_name[settings.input_topic]
    cluster, namespace = topic["metadata"]["labels"]["strimzi.io/cluster"], topic["metadata"]["namespace"]
    hosts = {s.split(":")[0] for s in settings.kafka.bootstrap_servers.split(",")}
    assert hosts <= {f"{cluster}-kafka-bootstrap.{namespace}.svc",
                     f"{cluster}-kafka-bootstrap.{namespace}.svc.cluster.local"}, hosts


# ---- env vars: set <=> read --------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_env_is_what_worker_settings_read(overlay):
    docs = render(f"overlays/{overlay}")
    c = container(one(docs, "Deployment", "bert-stream-worker"), "worker")
    env = container_env(docs, c)
    unknown = set(env) - set(env_vars(WorkerSettings)) - composition_only(c)
    assert not unknown, f"the worker reads no such variables: {sorted(unknown)}"
    missing = required_env_vars(WorkerSettings) - set(env)
    assert not missing, f"required worker settings not set: {sorted(missing)}"
    from_env(WorkerSettings, env=expanded_env(env))  # every value parses and passes the invariants


@needs_kubectl
@pytest.mark.parametrize("kustomization", [f"overlays/{o}" for o in OVERLAYS])
def test_trainer_env_is_what_train_settings_read(kustomization):
    docs = render(kustomization)
    for name, reader in EXTRA_ENV.items():
        assert f'"{name}"' in reader.read_text(), f"{reader} no longer reads {name}"
    cron = one(docs, "CronJob", "bert-stream-trainer")
    c = container(cron, "trainer")
    env = container_env(docs, c)
    known = set(env_vars(TrainSettings)) | set(EXTRA_ENV) | set(LIBRARY_ENV) | composition_only(c)
    unknown = set(env) - known
    assert not unknown, f"the trainer reads no such variables: {sorted(unknown)}"
    missing = required_env_vars(TrainSettings) - set(env)
    assert not missing, f"required trainer settings not set: {sorted(missing)}"
    settings = from_env(TrainSettings, env=expanded_env(env))
    assert settings.redis_url, "the trainer must announce new versions (REDIS_URL)"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_off_job_is_the_cronjob_pod(overlay):
    """The Job (train-job) is rendered apart from the CronJob; its pod must be the same one."""
    cron = one(render(f"overlays/{overlay}"), "CronJob", "bert-stream-trainer")
    job = one(render(f"overlays/{overlay}/train-job"), "Job")
    assert job["spec"]["template"] == cron["spec"]["jobTemplate"]["spec"]["template"]
    for key in ("backoffLimit", "activeDeadlineSeconds", "podFailurePolicy"):
        assert job["spec"][key] == cron["spec"]["jobTemplate"]["spec"][key], key
    # The Job refers to the ConfigMap by its plain name: the main render must produce exactly that name.
    main = render(f"overlays/{overlay}")
    for source in container(job, "trainer")["envFrom"]:
        one(main, "ConfigMap", source["configMapRef"]["name"])


# ---- the worker's HTTP server ------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_metrics_match_the_worker_http_server(overlay):
    from worker.metrics import Health, OpsServer, WorkerMetrics

    docs = render(f"overlays/{overlay}")
    deployment = one(docs, "Deployment", "bert-stream-worker")
    c = container(deployment, "worker")
    port = from_env(WorkerSettings, env=expanded_env(container_env(docs, c))).http_port
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": port}, f"container ports {ports} != the worker's http_port {port}"

    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert probe["port"] in ("http", port), f"{kind} port {probe['port']}"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "startup must cover model load"

    service = one(docs, "Service", "bert-stream-worker-metrics")
    (sport,) = service["spec"]["ports"]
    assert sport["targetPort"] in ("http", port)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pod_annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    for notes in (service["metadata"]["annotations"], pod_annotations):
        assert notes["prometheus.io/scrape"] == "true"
        assert notes["prometheus.io/port"] == str(port)
        metrics_path = notes["prometheus.io/path"]

    # Ask the worker's own server (worker/metrics.py) for every path the manifests use: none may be a 404.
    server = OpsServer(WorkerMetrics(), Health(), port=0, host="127.0.0.1").start()
    try:
        for path in {p["path"] for p in probes.values()} | {metrics_path}:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5).status
            except urllib.error.HTTPError as exc:
                status = exc.code
            assert status in (200, 503), f"the worker's HTTP server answers {status} on {path}"
    finally:
        server.close()


# ---- storage, secrets, security ----------------------------------------------------------------------------


def _mount_for(c: dict, pod: dict, path: str) -> tuple[dict, dict]:
    """(volumeMount, volume) of the mount that holds ``path``."""
    mounts = [m for m in c.get("volumeMounts", [])
              if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    assert mounts, f"{path} is on no volume of container {c['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return mount, volume


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkpoint_store_shared_read_only_by_workers(overlay):
    docs = render(f"overlays/{overlay}")
    pvc = one(docs, "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "workers on many nodes mount the store"

    worker = one(docs, "Deployment", "bert-stream-worker")
    c = container(worker, "worker")
    env = expanded_env(container_env(docs, c))
    mount, volume = _mount_for(c, pod_spec(worker), from_env(WorkerSettings, env=env).model_dir)
    assert mount["mountPath"] == env["BERT_STREAM_MODEL_DIR"], "the store is the mount (LATEST at its root)"
    assert mount.get("readOnly") and volume["persistentVolumeClaim"].get("readOnly")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]

    # The Kafka CA the worker is told to use lies on the mounted Secret.
    ca = from_env(WorkerSettings, env=env).kafka.ssl_cafile
    if ca:
        mount, volume = _mount_for(c, pod_spec(worker), ca)
        items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
        assert ca[len(mount["mountPath"]) + 1:] in items or not items

    cron = one(docs, "CronJob", "bert-stream-trainer")
    t = container(cron, "trainer")
    tenv = expanded_env(container_env(docs, t))
    mount, volume = _mount_for(t, pod_spec(cron), from_env(TrainSettings, env=tenv).output_dir)
    assert mount["mountPath"] == tenv["BERT_STREAM_MODEL_DIR"]
    assert not mount.get("readOnly"), "the trainer publishes into the store"
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def _secret_refs(docs: list[dict]) -> set[tuple[str, str]]:
    refs = set()
    for d in docs:
        if d["kind"] == "TriggerAuthentication":
            refs |= {(r["name"], r["key"]) for r in d["spec"]["secretTargetRef"]}
        if d["kind"] not in ("Deployment", "Job", "CronJob"):
            continue
        pod = pod_spec(d)
        for c in pod["containers"]:
            for item in c.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
        for v in pod.get("volumes", []):
            if "secret" in v:
                refs |= {(v["secret"]["secretName"], i["key"]) for i in v["secret"]["items"]}
    return refs


@needs_kubectl
def test_example_secrets_hold_every_key_the_manifests_read():
    examples = [d for d in yaml.safe_load_all(EXAMPLE_SECRETS.read_text()) if d]
    provided = set()
    for secret in examples:
        kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
        for key, value in secret["stringData"].items():
            assert PLACEHOLDER in value, f"{secret['metadata']['name']}.{key} must be a marked placeholder"
            provided.add((secret["metadata"]["name"], key))
    used = set()
    for kustomization in KUSTOMIZATIONS:
        used |= _secret_refs(render(kustomization))
    assert used == provided, f"used but not in the example: {used - provided}; unused: {provided - used}"
    # Real Secrets are never rendered from the repository.
    for kustomization in KUSTOMIZATIONS:
        assert not find(render(kustomization), "Secret"), f"{kustomization} renders a Secret"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_url_points_at_the_redis_service(overlay):
    docs = render(f"overlays/{overlay}")
    service = one(docs, "Service", "bert-stream-redis")
    redis = container(one(docs, "Deployment", "bert-stream-redis"), "redis")
    server_password = container_env(docs, redis)["REDIS_PASSWORD"]
    for obj in (one(docs, "Deployment", "bert-stream-worker"), one(docs, "CronJob", "bert-stream-trainer")):
        (c,) = pod_spec(obj)["containers"]
        env = container_env(docs, c)
        assert env["REDIS_PASSWORD"] == server_password, "clients and server must read the same Secret key"
        url = urlsplit(expanded_env(env)["REDIS_URL"])
        assert (url.hostname, url.port) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])
        assert url.password == expanded_env(env)["REDIS_PASSWORD"]


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS[:4])
def test_pods_are_locked_down(kustomization):
    for obj in [d for d in render(kustomization) if d["kind"] in ("Deployment", "Job", "CronJob")]:
        pod = pod_spec(obj)
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod.get("automountServiceAccountToken") is False, where
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "memory" in c["resources"]["limits"], f"{where}: unbounded memory"
        if obj["metadata"]["name"] != "bert-stream-redis":
            (c,) = pod["containers"]
            mount, volume = _mount_for(c, pod, "/tmp")
            assert "emptyDir" in volume, f"{where}: /tmp (HOME, HF_HOME, caches) must be writable"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_shutdown_and_disruption(overlay):
    docs = render(f"overlays/{overlay}")
    worker = one(docs, "Deployment", "bert-stream-worker")
    env = expanded_env(container_env(docs, container(worker, "worker")))
    kafka = from_env(WorkerSettings, env=env).kafka
    settings = from_env(WorkerSettings, env=env)
    # The drain is bounded by shutdown_timeout_s; the producer flush may then take a request timeout.
    grace = pod_spec(worker)["terminationGracePeriodSeconds"]
    assert grace > settings.shutdown_timeout_s + kafka.request_timeout_ms / 1000
    assert settings.inference_stall_s > settings.shutdown_timeout_s  # a slow batch is not a hung one
    pdb = one(docs, "PodDisruptionBudget")
    pod_labels = worker["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1


@needs_kubectl
def test_overlay_devices_and_resources():
    gpu = render("overlays/gpu")
    cpu = render("overlays/cpu")
    for docs, device in ((gpu, "cuda"), (cpu, "cpu")):
        worker = one(docs, "Deployment", "bert-stream-worker")
        c = container(worker, "worker")
        settings = from_env(WorkerSettings, env=expanded_env(container_env(docs, c)))
        assert settings.device.startswith(device)
        limits = c["resources"]["limits"]
        if device == "cuda":
            assert str(limits["nvidia.com/gpu"]) == "1", "one GPU per worker pod"
            assert str(c["resources"]["requests"]["nvidia.com/gpu"]) == "1"
            tolerations = {t["key"] for t in pod_spec(worker).get("tolerations", [])}
            assert "nvidia.com/gpu" in tolerations and pod_spec(worker).get("nodeSelector")
            assert settings.dtype in ("auto", "bf16")
            trainer = container(one(docs, "CronJob", "bert-stream-trainer"), "trainer")
            assert "nvidia.com/gpu" in trainer["resources"]["limits"]
        else:
            assert "nvidia.com/gpu" not in limits
            assert settings.torch_threads == int(limits["cpu"]), "torch threads = the CPU limit"
            assert settings.dtype == "auto"
        assert settings.max_batch_tokens >= settings.max_length


# ---- the docs' commands ------------------------------------------------------------------------------------


@needs_kubectl
def test_readme_commands_match_the_manifests():
    text = README.read_text()
    for k in KUSTOMIZATIONS:
        assert f"deploy/k8s/{k}" in text, f"README does not mention deploy/k8s/{k}"
    dirs = set(re.findall(r"-k (deploy/k8s/[\w/.-]+)", text))
    assert dirs, "README shows no kubectl ... -k command"
    for d in dirs:
        assert (REPO / d / "kustomization.yaml").is_file(), f"README names {d}, which is not a kustomization"
    for path in re.findall(r"\b(deploy/[\w/.-]+\.(?:ya?ml|md|env|cuda|cpu))\b", text):
        assert (REPO / path).exists(), f"README names {path}, which does not exist"

    rendered = [d for k in KUSTOMIZATIONS for d in render(k)]
    names = {(d["kind"].lower(), d["metadata"]["name"]) for d in rendered}
    kinds = "deployment|cronjob|job|scaledobject|pvc|configmap|service"
    for kind, name in re.findall(rf"(?<![\w/.-])({kinds})/([a-z0-9-]+)", text):
        kind = {"pvc": "persistentvolumeclaim"}.get(kind, kind)
        assert (kind, name) in names, f"README refers to {kind}/{name}, which the manifests do not define"
    for ns in re.findall(r"kubectl -n ([a-z0-9-]+)", text):
        assert ns in {d["metadata"].get("namespace") for d in rendered} | {"bert-stream"}, ns

    # Image references in the docs' docker build commands are the ones the overlays deploy.
    images = {f"{i['newName']}:{i['newTag']}" for o in OVERLAYS
              for i in yaml.safe_load((K8S / "overlays" / o / "kustomization.yaml").read_text())["images"]}
    built = set(re.findall(r"-t (\S+:\S+)", text))
    assert images <= built, f"README does not show how to build {images - built}"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_fence_redis_and_the_workers(overlay):
    docs = render(f"overlays/{overlay}")
    redis_pod = one(docs, "Deployment", "bert-stream-redis")["spec"]["template"]["metadata"]["labels"]
    worker_pod = one(docs, "Deployment", "bert-stream-worker")["spec"]["template"]["metadata"]["labels"]
    trainer_pod = one(docs, "CronJob", "bert-stream-trainer")["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    redis_policy = one(docs, "NetworkPolicy", "bert-stream-redis")["spec"]
    assert redis_policy["podSelector"]["matchLabels"].items() <= redis_pod.items()
    assert set(redis_policy["policyTypes"]) == {"Ingress", "Egress"} and redis_policy["egress"] == []
    (rule,) = redis_policy["ingress"]
    allowed = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    assert all(set(peer) == {"podSelector"} for peer in rule["from"]), "no namespace-wide or IP peers"
    assert any(sel.items() <= worker_pod.items() for sel in allowed)
    assert any(sel.items() <= trainer_pod.items() for sel in allowed)
    assert [p["port"] for p in rule["ports"]] == ["redis"]
    worker_policy = one(docs, "NetworkPolicy", "bert-stream-worker")["spec"]
    assert worker_policy["podSelector"]["matchLabels"].items() <= worker_pod.items()
    assert [p["port"] for r in worker_policy["ingress"] for p in r["ports"]] == ["http"]
    redis_egress = [r for r in worker_policy["egress"] if any("podSelector" in t for t in r.get("to", []))
                    and any(t.get("podSelector", {}).get("matchLabels", {}).items() <= redis_pod.items()
                            for t in r["to"])]
    assert redis_egress and redis_egress[0]["ports"] == [{"port": 6379, "protocol": "TCP"}]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_redis_password_is_on_no_command_line(overlay):
    redis = container(one(render(f"overlays/{overlay}"), "Deployment", "bert-stream-redis"), "redis")
    argv = [*redis.get("command", []), *redis.get("args", [])]
    assert not any("$(REDIS_PASSWORD)" in a or a == "--requirepass" for a in argv), argv
    # it reaches redis-server on stdin, from the shell's printf builtin (no process of its own)
    assert redis["command"][:2] == ["sh", "-c"] and redis["command"][2].startswith("printf 'requirepass %s")
    assert "exec redis-server -" in redis["command"][2]


@needs_kubectl
def test_the_promote_cronjob_reads_the_shadow_metrics_the_workers_serve():
    """trainer.promote's settings parse from its CronJob; its metrics URL names the workers' metrics Service
    and port, and it writes the store the trainer publishes into."""
    from trainer.promote import PromoteSettings

    docs = render("overlays/cpu")
    promote = container(one(docs, "CronJob", "bert-stream-promote"), "promote")
    settings = from_env(PromoteSettings, env=expanded_env(container_env(docs, promote)))
    assert promote["command"][-2:] == ["-m", "trainer.promote"] and settings.min_agreement is not None
    url = urlsplit(settings.metrics_url)
    service = one(docs, "Service", url.hostname)
    assert url.port in [p["port"] for p in service["spec"]["ports"]] and url.path == "/metrics"
    assert service["spec"]["selector"]["app.kubernetes.io/name"] == "bert-stream-worker"
    mount = next(m for m in promote["volumeMounts"] if m["mountPath"] == settings.model_dir)
    assert not mount.get("readOnly"), "promotion moves LATEST"
