"""bf16 or fp32 on this CPU: flags say whether bf16 may be fast, a measurement says whether it is."""

from __future__ import annotations

import math

from bert_stream import precision

WITH_BF16 = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n"
WITHOUT = "processor\t: 0\nflags\t\t: fpu sse avx2 fma\n"


def test_flags_mark_cpus_with_bf16_instructions():
    assert precision.cpu_bf16_flags(WITH_BF16)
    assert precision.cpu_bf16_flags("flags\t: amx_bf16\n")
    assert not precision.cpu_bf16_flags(WITHOUT)
    assert not precision.cpu_bf16_flags("model name\t: avx512_bf16 in a name is not a flag\n")


def test_bf16_is_chosen_only_where_it_measured_faster(monkeypatch):
    def no_probe():
        raise AssertionError("a CPU without bf16 instructions must not be probed (emulated bf16 is ~50x slower)")

    monkeypatch.setattr(precision, "cpu_bf16_speedup", no_probe)
    assert not precision.cpu_prefers_bf16(WITHOUT)
    assert precision.cpu_prefers_bf16(WITH_BF16, speedup=2.5)  # AMD Zen 4, AVX512-BF16
    assert not precision.cpu_prefers_bf16(WITH_BF16, speedup=0.58)  # Intel VM hiding AMX: fp32 is faster
    assert not precision.cpu_prefers_bf16(WITH_BF16, speedup=precision.MIN_SPEEDUP - 0.01)  # a tie: fp32
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.58)
    assert not precision.cpu_prefers_bf16(WITH_BF16)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 3.0)
    assert precision.cpu_prefers_bf16(WITH_BF16)


def test_the_probe_measures_both_types_once_per_thread_count(monkeypatch):
    import torch

    precision._measured_speedup.cache_clear()
    monkeypatch.setattr(precision, "PROBE_SECONDS", 0.005)
    threads = torch.get_num_threads()
    calls = []
    real = torch.Tensor.__matmul__

    def counting(a, b):
        calls.append(a.dtype)
        return real(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", counting)
    try:
        speedup = precision.cpu_bf16_speedup()
        assert math.isfinite(speedup) and speedup > 0
        assert {torch.float32, torch.bfloat16} <= set(calls)  # both were timed
        measured = len(calls)
        assert precision.cpu_bf16_speedup() == speedup and len(calls) == measured  # remembered, not re-run
        torch.set_num_threads(1)
        precision.cpu_bf16_speedup()  # another thread count is another measurement
        assert len(calls) > measured
    finally:
        torch.set_num_threads(threads)
        precision._measured_speedup.cache_clear()

