"""The worker's forward pass against what could beat it on this CPU, side by side through the engine.

``python -m experiments.alternatives [--seconds 2] [--skip compile,onnx]``

Every variant runs inside :meth:`worker.engine.LoadedModel.predict` (the worker's tokenisation, length
sorting, chunking and top-k), with only the forward pass swapped, on the same batches, interleaved in
rounds so the machine's noise hits all of them alike:

- ``<base> packed``: what the worker serves on the CPU (:mod:`worker.packed`, padding-free) in its dtype
  (``--dtype auto``: ``bf16`` on AMX/AVX512-BF16 CPUs where it measures faster than fp32, else ``fp32``,
  see :mod:`bert_stream.precision`);
- ``<base> padded``: the transformers forward (eager, SDPA) on chunks padded to their longest row: the
  worker's path before packed, and what every ratio is taken against; ``fp32 packed`` / ``fp32 padded``
  beside a bf16 base (``fp32 padded``, the checkpoint's own computation, is the labels' reference);
- ``<base> padded chunk=N``: the engine's ``CHUNK_TOKENS`` (padded tokens per forward pass) raised from 2048;
- ``<base> padded torch.compile``: inductor with weight freezing (oneDNN prepacked linears); compile time is
  reported apart. Shapes vary per batch, so ``dynamic=True``;
- ``int8 dynamic (torch)``: ``torch.ao.quantization.quantize_dynamic`` of the fp32 model's Linear layers
  (int8 weights, activations quantised per batch; the x86 engine, VNNI/AMX int8 where available);
- ``onnxruntime fp32`` / ``onnxruntime int8``: the fp32 model exported to ONNX, run by ONNX Runtime's CPU
  provider with all graph optimisations (fused attention, GELU, LayerNorm), and its dynamic int8
  quantisation (``onnxruntime.quantization.quantize_dynamic``, QInt8 weights, MLAS int8 kernels);
- ``onnxruntime int8 static``: static int8 (QDQ, per-channel weights, activation ranges calibrated on
  :data:`CALIBRATION_TEXTS` training titles) of the MatMul and Gemm nodes only: quantizing every node, the
  attention mask's Add and the Softmax included, put the labels at chance (10.4% agreement, measured).

Each variant's labels are compared with the fp32 padded forward's on ``agreement_texts`` texts (the
checkpoint's test split, then stream texts), and its accuracy on the test split is reported, so a fast
variant that changes answers is visible. Variants whose optional packages (onnx, onnxruntime) are missing
are skipped and say so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import common
from bench.model_only import batches_of, load_engines, time_predict, worker_batches, worker_dtype

def variant_names(base: str) -> tuple[str, ...]:
    """The variants in table order, for a base dtype (``bf16`` or ``fp32``)."""
    return tuple(dict.fromkeys((
        f"{base} packed",
        f"{base} padded",
        "fp32 packed",
        "fp32 padded",
        f"{base} padded chunk=8192",
        f"{base} padded torch.compile",
        "int8 dynamic (torch)",
        "onnxruntime fp32",
        "onnxruntime int8",
        "onnxruntime int8 static",
    )))


def reference_names(base: str) -> tuple[str, str]:
    """(the path the ratios are taken against: the padded forward in the worker's dtype, the worker's path
    before packed; the labels agreement is taken against: the checkpoint's own fp32 transformers forward)."""
    return f"{base} padded", "fp32 padded"


class _Logits(types.SimpleNamespace):
    logits: object


class OrtForward:
    """An ONNX Runtime session called like a transformers model (``model(input_ids=, attention_mask=).logits``)."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no spinning between calls: idle ORT threads would steal the CPU from the variants interleaved with it
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids, attention_mask):
        import torch

        (logits,) = self.session.run(
            ["logits"], {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        )
        return _Logits(logits=torch.from_numpy(logits))


def export_onnx(model, path: Path) -> Path:
    """The fp32 model as ONNX with dynamic batch and sequence axes (TorchScript exporter: no extra deps)."""
    import torch

    ids = torch.ones((2, 16), dtype=torch.long)
    with torch.inference_mode():
        torch.onnx.export(
            model,
            (ids, torch.ones_like(ids)),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            opset_version=17,
            dynamo=False,
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
            },
        )
    return path


CALIBRATION_TEXTS = 256  # the first titles of the data set: its training split, what the model was trained on


def quantize_static_calibrated(source: Path, target: Path, loaded, texts: Sequence[str]) -> Path:
    """ONNX Runtime static int8 (QDQ, per-channel int8 weights, int8 activations whose ranges are calibrated
    on ``texts``, in batches of 16 padded as the engine pads)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_static)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([
                dict(loaded.tokenizer(list(texts[i:i + 16]), padding=True, truncation=True,
                                      max_length=loaded.max_length, return_tensors="np"))
                for i in range(0, len(texts), 16)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {k: batch[k].astype("int64") for k in ("input_ids", "attention_mask")}

    quantize_static(str(source), str(target), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm"])
    return target


def with_forward(loaded, forward) -> object:
    """A shallow copy of a LoadedModel whose padded forward pass is ``forward`` (tokenizer, labels shared)."""
    clone = copy.copy(loaded)
    clone.model, clone.packed, clone.backend = forward, None, "padded"
    return clone


def with_backend(loaded, backend: str) -> object:
    """A shallow copy of a LoadedModel that runs ``packed`` or ``padded`` (weights shared)."""
    from worker.packed import PackedBert

    clone = copy.copy(loaded)
    clone.backend = backend
    clone.packed = (loaded.packed or PackedBert(loaded.model)) if backend == "packed" else None
    return clone


@contextlib.contextmanager
def chunk_tokens(loaded, n: int):
    """Temporarily change a loaded model's padded tokens per forward pass."""
    saved = loaded.chunk_tokens
    loaded.chunk_tokens = n
    try:
        yield
    finally:
        loaded.chunk_tokens = saved


def build_variants(
    engines: dict, work_dir: Path, skip: Sequence[str], sample: Sequence[str]
) -> tuple[dict, dict]:
    """name -> predict(texts) callable, and name -> setup notes (build seconds, or why it was skipped)."""
    import torch

    base = worker_dtype(engines)
    fp32, served = engines["fp32"].current, engines[base].current
    paths = {f"{d} {b}": with_backend(engines[d].current, b) for d in (base, "fp32") for b in ("packed", "padded")}
    padded = paths[f"{base} padded"]
    predicts: dict[str, Callable] = {name: loaded.predict for name, loaded in paths.items()}
    notes: dict[str, dict] = {name: {} for name in paths}

    def chunked(texts):
        with chunk_tokens(padded, 8192):
            return padded.predict(texts)

    predicts[f"{base} padded chunk=8192"] = chunked
    notes[f"{base} padded chunk=8192"] = {}

    def add(name: str, build: Callable[[], Callable]) -> None:
        if any(s and s in name for s in skip):
            notes[name] = {"skipped": "--skip"}
            return
        t0 = time.perf_counter()
        try:
            predict = build()
            predict(list(sample[:64]))  # first call: compilation / kernel selection, not measured
        except Exception as exc:  # noqa: BLE001 - a variant that does not build is reported, not fatal
            notes[name] = {"skipped": f"{type(exc).__name__}: {exc}"[:300]}
            return
        predicts[name] = predict
        notes[name] = {"build_s": time.perf_counter() - t0}

    def compiled():
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights become constants: oneDNN prepacks the linears
        model = copy.copy(served.model)
        return with_forward(padded, torch.compile(model, dynamic=True)).predict

    def int8_torch():
        torch.backends.quantized.engine = (
            "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
        )
        q = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(fp32.model), {torch.nn.Linear}, dtype=torch.qint8
        )
        return with_forward(fp32, q).predict

    onnx_path = work_dir / "model-fp32.onnx"

    def ort_fp32():
        export_onnx(fp32.model, onnx_path)
        return with_forward(fp32, OrtForward(onnx_path, torch.get_num_threads())).predict

    def ort_int8():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        if not onnx_path.exists():
            export_onnx(fp32.model, onnx_path)
        q_path = work_dir / "model-int8.onnx"
        quantize_dynamic(str(onnx_path), str(q_path), weight_type=QuantType.QInt8)
        return with_forward(fp32, OrtForward(q_path, torch.get_num_threads())).predict

    def ort_int8_static():
        if not onnx_path.exists():
            export_onnx(fp32.model, onnx_path)
        q_path = work_dir / "model-int8-static.onnx"
        quantize_static_calibrated(onnx_path, q_path, fp32, list(sample[:CALIBRATION_TEXTS]))
        return with_forward(fp32, OrtForward(q_path, torch.get_num_threads())).predict

    add(f"{base} padded torch.compile", compiled)
    add("int8 dynamic (torch)", int8_torch)
    add("onnxruntime fp32", ort_fp32)
    add("onnxruntime int8", ort_int8)
    add("onnxruntime int8 static", ort_int8_static)
    return predicts, notes


def labels_of(predict: Callable, texts: Sequence[str]) -> list[str]:
    out: list[str] = []
    for i in range(0, len(texts), 64):
        out += [p.label for p in predict(list(texts[i : i + 64]))]
    return out


def test_split(loaded) -> tuple[list[str], list[str]]:
    """The checkpoint's own test split (texts, gold labels), from the test_predictions.jsonl the trainer
    publishes beside the weights; empty when the folder has none."""
    import json

    path = Path(loaded.folder) / "test_predictions.jsonl"
    if not path.exists():
        return [], []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def agreement(predicts: dict, texts: Sequence[str], reference: str = "fp32 padded",
              gold: Sequence[str] = ()) -> tuple[dict, dict]:
    """Share of ``texts`` on which each variant's label equals the reference variant's; and each variant's
    accuracy on the first ``len(gold)`` texts (the test split), when given."""
    predicted = {name: labels_of(predict, texts) for name, predict in predicts.items()}
    ref = predicted[reference]
    agree = {name: sum(a == b for a, b in zip(ls, ref)) / len(ref) for name, ls in predicted.items()}
    accuracy = {}
    if gold:
        accuracy = {name: sum(p == g for p, g in zip(ls, gold)) / len(gold) for name, ls in predicted.items()}
    return agree, accuracy


def run(
    ws: common.Workspace | None = None,
    *,
    model_dir=None,
    engines: dict | None = None,
    seconds: float = 2.0,
    rounds: int = 2,
    skip: Sequence[str] = (),
    stream: Sequence[str] | None = None,
    agreement_texts: int = 4000,
    warmup_batches: int = 6,
    student_dir=None,
) -> dict:
    import torch

    model_dir = model_dir or ws.model_dir
    engines = engines or load_engines(model_dir)
    titles = common.dataset_texts("titles")
    stream = list(stream or common.stream_texts(4000))
    work_dir = ws.work_dir if ws else common.WORK_DIR
    work_dir.mkdir(parents=True, exist_ok=True)
    predicts, notes = build_variants(engines, work_dir, skip, titles)
    base = worker_dtype(engines)
    if student_dir:  # a distilled student (trainer.run --teacher --student-layers): its own checkpoint
        from worker.engine import Engine

        student = Engine(student_dir, device="cpu", dtype=base, max_length=engines[base].max_length).start().current
        name = f"student {student.model.config.num_hidden_layers} layers, {base} packed"
        predicts[name], notes[name] = student.predict, {"model": student.version}
    ratio_ref, labels_ref = reference_names(base)

    workloads = {
        "titles, batch 64": batches_of(titles, 64, count=16),
        "e2e stream, worker batches": worker_batches(engines[base], stream[:2000]),
    }
    for batches in workloads.values():  # untimed warm-up on the shapes to come: a compiled variant compiles
        for predict in predicts.values():  # (or recompiles) here, not inside the timed rounds
            for batch in batches[:warmup_batches]:
                predict(batch)
    totals: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        order = list(predicts) if r % 2 == 0 else list(reversed(predicts))  # no variant always goes first
        for wl_name, batches in workloads.items():
            for name in order:
                msgs, secs = time_predict(predicts[name], batches, seconds / rounds)
                acc = totals.setdefault((wl_name, name), [0, 0.0])
                acc[0] += msgs
                acc[1] += secs
    rates = {
        wl: {name: totals[(wl, name)][0] / totals[(wl, name)][1] for name in predicts} for wl in workloads
    }
    # agreement on the checkpoint's test split (its accuracy too) and the stream's texts (what workers see)
    served = engines[base].current
    test_texts, gold = test_split(served)
    test_texts, gold = test_texts[:agreement_texts], gold[:agreement_texts]
    agree_texts = test_texts + stream[: max(0, agreement_texts - len(test_texts))]
    agree, accuracy = agreement(predicts, agree_texts, labels_ref, gold)
    result = {
        "threads": torch.get_num_threads(),
        "rates_msgs_per_s": rates,
        "agreement_with_fp32": agree,
        "agreement_texts": len(agree_texts),
        "test_accuracy": accuracy,
        "notes": notes,
        "base": base,
        "reference": ratio_ref,
        "agreement_reference": labels_ref,
        "speedup_over_reference": {wl: {n: v / by[ratio_ref] for n, v in by.items()} for wl, by in rates.items()},
    }
    rows = []
    for name in dict.fromkeys([*variant_names(base), *predicts]):
        if name in predicts:
            rows.append(
                [
                    name,
                    *(rates[wl][name] for wl in workloads),
                    *(f"{rates[wl][name] / rates[wl][ratio_ref]:.2f}x" for wl in workloads),
                    f"{agree[name]:.2%}",
                    f"{accuracy[name]:.2%}" if accuracy else "-",
                    notes[name].get("build_s"),
                ]
            )
        else:
            rows.append(
                [
                    name,
                    *("-" for _ in workloads),
                    *("-" for _ in workloads),
                    "-",
                    "-",
                    "skipped: " + notes.get(name, {}).get("skipped", "?")[:60],
                ]
            )
    common.print_table(
        f"Beyond the padded {base} forward: model-only through the engine's path (msgs/s)",
        [
            "variant",
            *workloads,
            *(f"vs {ratio_ref} ({w.split(',')[0]})" for w in workloads),
            f"labels = {labels_ref}",
            "test accuracy",
            "build s",
        ],
        rows,
    )
    return result


def markdown(alt: dict) -> list[str]:
    """The run as a markdown table (printed by ``main``; the dated notes quote it)."""
    from bench.report import _table, _x  # the report's number formats

    rates, agree, notes = alt["rates_msgs_per_s"], alt["agreement_with_fp32"], alt["notes"]
    base = alt.get("base", "bf16")  # runs before the CPU-dependent base recorded bf16 only
    ref = alt.get("reference", base)  # runs before the packed backend took ratios against the base dtype
    labels_ref = alt.get("agreement_reference", "fp32")
    accuracy = alt.get("test_accuracy") or {}
    wls = list(rates)
    rows = []
    for name, note in notes.items():
        if name in agree:
            rows.append(
                [
                    name,
                    *(rates[w][name] for w in wls),
                    *(_x(rates[w][name] / rates[w][ref]) for w in wls),
                    f"{agree[name]:.2%}",
                    f"{accuracy[name]:.2%}" if name in accuracy else "-",
                    note.get("build_s"),
                ]
            )
        else:
            rows.append(
                [name, *("-" for _ in wls), *("-" for _ in wls), "-", "-", "skipped: " + note.get("skipped", "")]
            )
    texts = alt.get("agreement_texts")
    return [
        "## The worker's forward against the alternatives (model-only, same path, interleaved)",
        "",
        (
            f"{alt['threads']} torch threads; every variant goes through the engine's `predict` (tokenise, sort, "
            f"top-k) with only the forward pass swapped. Ratios against `{ref}` (the worker's path before the "
            f"packed backend); agreement = share of labels equal to `{labels_ref}`'s (the checkpoint's own fp32 "
            f"transformers forward) on {f'{texts:,} texts (the checkpoint test split, then stream texts)' if texts else 'the same texts'}; "
            "test accuracy on the checkpoint's test split."
        ),
        "",
        _table(
            [
                "variant",
                *[f"{w} msgs/s" for w in wls],
                *[f"vs {ref} ({w.split(',')[0]})" for w in wls],
                f"labels = {labels_ref}",
                "test accuracy",
                "build s",
            ],
            rows,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.alternatives", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=None, help="checkpoint store (default: checkpoints/)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per variant and workload")
    parser.add_argument("--skip", default="", help="comma-separated substrings of variant names to skip")
    parser.add_argument("--student-dir", default=None,
                        help="also measure this checkpoint store's model (a distilled student); its accuracy "
                             "is on the same test split when it was trained on the same data")
    parser.add_argument(
        "--output", default=str(common.WORK_DIR / "alternatives.json"), help="JSON written here"
    )
    args = parser.parse_args(argv)
    from bert_stream.logs import configure_logging

    configure_logging("WARNING")
    model_dir = common.ensure_checkpoint(args.model_dir or common.DEFAULT_STORE)
    result = run(model_dir=model_dir, seconds=args.seconds, skip=[s for s in args.skip.split(",") if s],
                 student_dir=args.student_dir)
    common.save_json(Path(args.output), result)
    print("\n".join(markdown(result)))
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
