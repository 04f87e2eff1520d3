"""The roofline of a compiled program on one chip: XLA's cost analysis (FLOPs, bytes accessed) against the chip's
peak bfloat16 FLOP/s and HBM bandwidth (the sharding file's `peak_bf16_flops`, `hbm_bandwidth`).

The program cannot run faster than max(FLOPs / peak, bytes / bandwidth); its best MFU is the compute time's share
of that bound, min(1, intensity / ridge) with intensity = FLOPs / byte and ridge = peak / bandwidth. XLA's cost
analysis counts a loop body once (the scanned layers, the gradient-accumulation micro-batches), so the FLOPs and
bytes are those of one trip through each loop plus the code outside; the ratio, and so the best MFU, is the
loop body's, which dominates the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Roofline:
    """XLA's per-chip counts and the bound they give on the chip."""

    flops: float
    bytes_accessed: float
    peak_flops: float
    bandwidth: float

    @property
    def compute_seconds(self) -> float:
        """FLOPs at the chip's peak."""
        return self.flops / self.peak_flops

    @property
    def memory_seconds(self) -> float:
        """Bytes accessed at the chip's HBM bandwidth."""
        return self.bytes_accessed / self.bandwidth

    @property
    def bound_seconds(self) -> float:
        """The lower bound on the program's time: the slower of compute and memory traffic."""
        return max(self.compute_seconds, self.memory_seconds)

    @property
    def best_mfu(self) -> float:
        """The highest model-FLOP utilization the program could reach: compute time / the bound."""
        return self.compute_seconds / self.bound_seconds if self.bound_seconds > 0 else 0.0

    def describe(self) -> str:
        """Two lines: the counts and the bound."""
        limit = "compute" if self.compute_seconds >= self.memory_seconds else "HBM bandwidth"
        return (f"XLA cost analysis per chip: {self.flops / 1e9:,.1f} GFLOP, {self.bytes_accessed / 1e9:,.2f} GB "
                f"accessed (intensity {self.flops / max(self.bytes_accessed, 1):.0f} FLOP/byte; loop bodies counted "
                f"once)\nroofline at {self.peak_flops / 1e12:.0f} TFLOP/s bf16 and {self.bandwidth / 1e9:,.0f} GB/s: "
                f"≥ {1e3 * self.bound_seconds:.1f} ms for that work ({limit}-bound), best MFU "
                f"{100 * self.best_mfu:.0f}%")


def cost_analysis(compiled: Any) -> tuple[float | None, float | None]:
    """(flops, bytes accessed) of a compiled program from XLA's cost analysis; None where XLA gives none."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) and analysis else analysis
    if not isinstance(analysis, dict):
        return None, None
    flops, nbytes = analysis.get("flops"), analysis.get("bytes accessed")
    return (None if flops is None else float(flops)), (None if nbytes is None else float(nbytes))
