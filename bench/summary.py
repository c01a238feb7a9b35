"""The figures a run is judged by: headline keys, ratios and targets, derived from the parts' raw results.

``bench.run`` calls :func:`summarize` after a run, ``bench.report`` again when it re-renders an older
results.json, so both judge by this version's rules. A target carries what bounds its figure, printed when it
is missed.
"""

from __future__ import annotations

from bench import common

# Why the uncached path misses its GPU-rate targets on a CPU host: the tokenizer runs on the host's cores,
# which the cached ceiling never spends.
TOKENIZER_BOUND = ("the tokenizer runs on the host CPU for every uncached message; the cached ceiling never "
                   "tokenizes, and the host's cores also run the broker and Redis")

CEILING_BOUND = "the worker's one main thread decodes, looks up and publishes every message in Python"


def summarize(results: dict, settings: dict, machine: dict) -> dict:
    """The headline keys (each from this run), ratios and targets."""
    p = results["parts"]
    mo, e, pl, ca, so, br, dv, ce, si = (
        p.get(k) for k in ("model_only", "e2e", "pipeline_baseline", "cache", "scale_out", "brokers", "delivery",
                           "ceiling", "standin")
    )
    e2e_rate = e["backlog"]["msgs_per_s"] if e else None
    model_rate = mo["stream"]["msgs_per_s"] if mo else None
    steady = e["steady"]["latency_ms"] if e else {}
    headline = {
        "e2e_msgs_per_s": e2e_rate,
        "baseline_pipeline_msgs_per_s": pl["msgs_per_s"] if pl else None,
        "model_only_msgs_per_s": model_rate,
        "cached_msgs_per_s": ca["cached"]["msgs_per_s"] if ca else None,
        "ceiling_msgs_per_s": ce["ceiling_msgs_per_s"] if ce else None,
        "ceiling_confluent_msgs_per_s": ce.get("ceiling_confluent_msgs_per_s") if ce else None,
        "ceiling_confluent_eos_msgs_per_s": ce.get("ceiling_confluent_eos_msgs_per_s") if ce else None,
        "standin_msgs_per_s": si["standin_msgs_per_s"] if si else None,
        "standin_eos_msgs_per_s": si["standin_eos_msgs_per_s"] if si else None,
        "standin_ceiling_msgs_per_s": si.get("ceiling_msgs_per_s") if si else None,
        "gemm_limit_msgs_per_s": mo["stream"]["limit_msgs_per_s"] if mo else None,
        "latency_ms_p50": steady.get("p50"),
        "latency_ms_p95": steady.get("p95"),
        "latency_ms_p99": steady.get("p99"),
    }
    # the efficiency target is judged in the dtype the worker serves: bf16 where the CPU has the units and
    # the probe measures it faster (bert_stream.precision), fp32 elsewhere
    served = mo["worker_dtype"] if mo else "bf16"
    best_served = {name: by[served] for name, by in mo["best"].items() if served in by} if mo else {}
    ratios = {
        "e2e_over_pipeline": common.ratio(e2e_rate, headline["baseline_pipeline_msgs_per_s"]),
        "e2e_over_model_only": common.ratio(e2e_rate, model_rate),
        "overhead": (1 - e2e_rate / model_rate) if e2e_rate and model_rate else None,
        "cached_over_uncached": ca["cached_over_uncached"] if ca else None,
        "model_only_over_limit": common.ratio(model_rate, headline["gemm_limit_msgs_per_s"]),
        "served_dtype": served,
        "best_efficiency": {n: b["efficiency"] for n, b in best_served.items()},
        "two_workers_over_one": so["two_over_one"] if so else None,
        "tansu_over_kafka_e2e": br["backlog_over_reference"] if br else None,
        "ceiling_two_over_one": ce["two_over_one"] if ce else None,
        "standin_over_ceiling": si.get("standin_over_ceiling") if si else None,
        "standin_two_over_one": si.get("two_over_one") if si else None,
        **(dv["ratios"] if dv else {}),
    }
    st = e["steady"] if e else {}
    targets = {
        "e2e >= 6x pipeline": _target(
            ratios["e2e_over_pipeline"], 6, ">=",
            "both run the same model: on a CPU the forward pass is the cost, and batching saves only its padding"),
        # negative overhead (end-to-end faster than model-only) means the machine's load changed between the
        # two measurements: no verdict rather than a false "met"
        "overhead <= 15%": _target(
            ratios["overhead"], 0.15, "<=",
            "the broker, Redis and the worker's own threads share the model's cores on this machine")
        if (ratios["overhead"] or 0) >= 0
        else {"value": ratios["overhead"], "bound": 0.15, "op": "<=", "met": None},
        **{
            f"{served} efficiency ({n}) >= 40% at best batch": _target(
                v, 0.40, ">=", "attention, softmax and layer norms are not GEMMs; short texts leave tiles half full")
            for n, v in ratios["best_efficiency"].items()
        },
        "model-only >= 50% of the GEMM limit (worker batches)": _target(
            ratios["model_only_over_limit"], 0.5, ">=",
            "the worker's batches are smaller than the GEMM timing's; tokenizing and top-k are outside the limit"),
        "cached >= 5,000 msgs/s": _target(headline["cached_msgs_per_s"], 5000, ">=",
                                          "a Redis round trip per poll and the client's per-record cost"),
        "ceiling >= 50,000 msgs/s (one process)": _target(
            headline["ceiling_msgs_per_s"], 50_000, ">=",
            "kafka-python parses and sends records in Python; confluent-kafka (librdkafka) is the fast client"),
        "ceiling >= 50,000 msgs/s (one process, confluent-kafka)": _target(
            headline["ceiling_confluent_msgs_per_s"], 50_000, ">=", CEILING_BOUND),
        "ceiling >= 50,000 msgs/s (one process, confluent-kafka, exactly-once)": _target(
            headline["ceiling_confluent_eos_msgs_per_s"], 50_000, ">=", CEILING_BOUND),
        "stand-in forward >= 0.7x the cached ceiling (same run and batching, confluent-kafka)": _target(
            ratios["standin_over_ceiling"], 0.7, ">=", TOKENIZER_BOUND),
        "stand-in forward >= 50,000 msgs/s (one process, confluent-kafka)": _target(
            headline["standin_msgs_per_s"], 50_000, ">=", TOKENIZER_BOUND),
        "exactly-once >= 0.8x at-least-once backlog at 1,000 ms commits (confluent-kafka)": _target(
            ratios.get("eos_over_alos_confluent_1000ms"), 0.8, ">=",
            "each commit is a transaction: a flush and three round trips while the loop waits"),
        "p99 at 70% load < 4 x (max_wait + one batch)": _target(
            st.get("latency_ms", {}).get("p99"), st.get("p99_bound_ms"), "<",
            "a batch waits behind the one in the model; bursts above the mean rate queue"),
    }
    return {
        **headline,
        "ratios": ratios,
        "targets": targets,
        "settings": settings,
        "machine": machine,
        **results,
    }


def _target(value, bound, op: str, why: str = "") -> dict:
    """A target's verdict; ``why`` names what bounds the figure, printed under the table when it is missed."""
    if value is None or bound is None:
        return {"value": value, "bound": bound, "met": None, "why": why}
    met = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
    return {"value": value, "bound": bound, "op": op, "met": bool(met), "why": why}
