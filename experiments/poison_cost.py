"""``python -m experiments.poison_cost [--against REV]``: what one pathological input costs the worker's main thread.

The worker decodes every record on its main thread (``worker.messages.decode``), between polls: an input
that takes a second to decode stalls its partition's poll loop, and with it every partition of the worker.
This times ``decode`` on each kind of input the hardening issue names (best of 5 repeats of ~50 ms, microseconds)
as the worker calls it (``max_text_chars`` from the default ``max_length``), for this tree and, with
``--against``, for an older commit in a temporary git worktree, in the same run (the ratio is what holds on a
noisy machine). An input that raised out of decode is reported as "raised" (the worker exited on it).

Writes ``experiments/poison_cost.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import common

MAX_LENGTH = 128  # WorkerSettings.max_length's default

# (name, value): each kind of record that once crashed or stalled the main thread, and an ordinary one
CASES = {
    "ordinary JSON title": '{"id": "1", "text": "国足世预赛主场两球击败对手，出线形势明朗"}',
    "JSON number of 5,000 digits": '{"text": "x", "n": ' + "1" * 5000 + "}",
    "escaped lone surrogate": '{"text": "\\ud800\\u4e2d\\u6587"}',
    "64 KB of alternating combining marks": ("a" + "\u0301\u0316" * 16_250)[:32_500],
    "64 KB of plain Chinese": "长" * 21_800,
}

_PROBE = r"""
import inspect, json, sys, time
from types import SimpleNamespace
sys.path.insert(0, sys.argv[1])
from worker import messages
cases = json.loads(sys.stdin.read())
takes_cut = "max_text_chars" in inspect.signature(messages.decode).parameters
out = {}
for name, text in cases.items():
    record = SimpleNamespace(topic="t", partition=0, offset=1, key=None, value=text.encode(), headers=[])
    kwargs = {"max_text_chars": int(sys.argv[2])} if takes_cut else {}
    def call():
        try:
            return messages.decode(record, **kwargs)
        except Exception as exc:
            return exc
    result, t0 = call(), time.perf_counter()
    call()
    number = max(1, int(0.05 / max(time.perf_counter() - t0, 1e-9)))  # ~50 ms a repeat
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(number):
            call()
        best = min(best, (time.perf_counter() - t0) / number)
    verdict = (f"raised {type(result).__name__}" if isinstance(result, Exception)
               else getattr(result, "reason", "output"))
    out[name] = {"us": round(best * 1e6, 2), "verdict": verdict}
print(json.dumps(out))
"""


def measure(tree: Path) -> dict:
    """decode's cost per case in the worker code at ``tree``, in a fresh interpreter."""
    from worker.messages import CHARS_PER_TOKEN

    done = subprocess.run([sys.executable, "-c", _PROBE, str(tree), str(CHARS_PER_TOKEN * MAX_LENGTH)],
                          input=json.dumps(CASES), capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.poison_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--against", default=None, help="a git revision to measure beside this tree")
    parser.add_argument("--out", default=str(common.REPO / "experiments" / "poison_cost.json"))
    args = parser.parse_args(argv)
    from worker.messages import CHARS_PER_TOKEN

    commit = subprocess.run(["git", "-C", str(common.REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cpu = common.cpu_description()
    result = {"date": datetime.date.today().isoformat(), "cpu": f"{cpu['model']}, {cpu['logical_cpus']} CPUs",
              "commit": commit,
              "max_text_chars": CHARS_PER_TOKEN * MAX_LENGTH, "now": measure(common.REPO)}
    if args.against:
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "tree"
            subprocess.run(["git", "-C", str(common.REPO), "worktree", "add", "--detach", "-q", str(tree),
                            args.against], check=True)
            try:
                result["against"] = {"revision": args.against, "cases": measure(tree)}
            finally:
                subprocess.run(["git", "-C", str(common.REPO), "worktree", "remove", "--force", str(tree)],
                               check=True)
    common.save_json(Path(args.out), result)
    for name, now in result["now"].items():
        before = result.get("against", {}).get("cases", {}).get(name)
        was = f"{before['us']:>10.1f} us ({before['verdict']})" if before else ""
        print(f"{name:40s} {now['us']:>10.1f} us ({now['verdict']})  {was}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
