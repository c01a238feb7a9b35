"""Which float type this CPU computes fastest: bf16 or fp32, measured rather than guessed.

The trainer's ``--mixed-precision auto``, the worker's ``--dtype auto`` and the benchmarks all ask here.
bf16 halves memory traffic and, on CPUs with bf16 dot-product units (AVX512-BF16, AMX), runs matmuls
several times faster than fp32. But the flags in ``/proc/cpuinfo`` do not say it will: a virtual machine can
list ``avx512_bf16`` and hide AMX, and oneDNN's bf16 matmul then loses to fp32. So the flags only decide
whether bf16 is worth *trying* (without them torch emulates bf16, far slower); :func:`cpu_bf16_speedup` then times one matmul of a small BERT's feed-forward shape
in both types, once per process and thread count (about half a second), and bf16 is used only when it is
clearly faster (:data:`MIN_SPEEDUP`).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

from bert_stream.logs import get_logger

log = get_logger("bert_stream.precision")

BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
# bf16 must beat fp32 by this much to be chosen: a tie is not worth bf16's rounding, and a loaded machine
# makes one measurement noisy by some percent.
MIN_SPEEDUP = 1.15
# tokens x hidden @ hidden x intermediate: a batch of short texts through e5-small's feed-forward layer.
PROBE_SHAPE = (256, 384, 1536)
PROBE_SECONDS = 0.05  # per timed round and dtype; three interleaved rounds each, best taken


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags: the ``flags`` lines of ``cpuinfo``, the text of /proc/cpuinfo (read when not
    given; an unreadable file has none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return flags


def cpu_bf16_flags(cpuinfo: str | None = None) -> bool:
    """True when the CPU has bf16 instructions (AMX or AVX512-BF16), so bf16 may be fast here."""
    return bool(cpu_flags(cpuinfo) & BF16_FLAGS)


def cpu_bf16_speedup() -> float:
    """bf16 matmul throughput over fp32's on this CPU with torch's current thread count (>1: bf16 faster).
    Measured on first use per thread count, then remembered for the process."""
    import torch

    return _measured_speedup(torch.get_num_threads())


@functools.cache
def _measured_speedup(threads: int) -> float:
    import torch

    m, k, n = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    operands = {dtype: (torch.randn(m, k, generator=generator).to(dtype),
                        torch.randn(k, n, generator=generator).to(dtype))
                for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(operands, 0.0)
    with torch.inference_mode():
        for a, b in operands.values():  # first calls pick kernels and allocate
            for _ in range(3):
                a @ b
        for _ in range(3):  # interleaved rounds: a burst of load elsewhere hits both dtypes alike
            for dtype, (a, b) in operands.items():
                calls, start = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - start) < PROBE_SECONDS:
                    a @ b
                    calls += 1
                best[dtype] = max(best[dtype], 2 * m * k * n * calls / elapsed / 1e9)
    speedup = best[torch.bfloat16] / best[torch.float32]
    log.info("precision.cpu_probe", threads=threads, fp32_gflops=round(best[torch.float32], 1),
             bf16_gflops=round(best[torch.bfloat16], 1), bf16_speedup=round(speedup, 2),
             bf16_chosen=speedup >= MIN_SPEEDUP)
    return speedup


def cpu_prefers_bf16(cpuinfo: str | None = None, speedup: float | None = None) -> bool:
    """Whether ``auto`` should compute in bf16 on this CPU: it has bf16 instructions and bf16 measured at
    least :data:`MIN_SPEEDUP` times fp32's speed (``speedup`` overrides the measurement, for tests)."""
    if not cpu_bf16_flags(cpuinfo):
        return False
    return (cpu_bf16_speedup() if speedup is None else speedup) >= MIN_SPEEDUP
