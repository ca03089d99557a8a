"""The accelerators this project plans for and reports MFU on: one table, read by the trainer's MFU
(stages/runtime/train_log.py) and by the TPU plan's fit and roofline (stages/tools/plan.py).

Per JAX device (a TPU v4/v5p megacore chip, a v5e/v6e chip, a v3 TensorCore, a GPU):
- hbm_gib: the memory XLA lets a program use. For the TPUs it is what libtpu 0.0.42's compiler states when
  it refuses a program ("exceed available HBM (15.75G)" on v5e: `stages.plan` measured each, see
  docs/tpu.md); for the GPUs the card's memory.
- bf16: dense bfloat16 matmul peak, TFLOP/s (a multiply-add counts two).
- f32: float32 matmuls at XLA's default precision, the rate a float32 DiT can reach: one bf16 pass on TPU,
  TF32 on A100/H100/H200.
- f32_highest: float32 at precision=HIGHEST (Inception, the VAE's decoder here): six bf16 passes on TPU
  (bf16 / 6, an estimate: XLA's 6-pass emulation), the FP32 CUDA-core rate on GPU.
- hbm_gbps: HBM bandwidth, GB/s.
Figures are the vendors' published per-chip numbers (cloud.google.com/tpu/docs/system-architecture-tpu-vm,
nvidia.com data sheets), divided by two for v3's per-core devices.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chip:
    name: str  # matched as a substring of jax.Device.device_kind, in table order
    hbm_gib: float
    bf16: float
    f32: float
    f32_highest: float
    hbm_gbps: float


CHIPS = (
    Chip("TPU v3", 16.0, 61.5, 61.5, 61.5 / 6, 450.0),  # per TensorCore: each is a JAX device
    Chip("TPU v4", 30.75, 275.0, 275.0, 275.0 / 6, 1200.0),
    Chip("TPU v5 lite", 15.75, 197.0, 197.0, 197.0 / 6, 819.0),  # v5e
    Chip("TPU v5e", 15.75, 197.0, 197.0, 197.0 / 6, 819.0),
    Chip("TPU v5p", 95.74, 459.0, 459.0, 459.0 / 6, 2765.0),
    Chip("TPU v5", 95.74, 459.0, 459.0, 459.0 / 6, 2765.0),  # v5p reports "TPU v5"
    Chip("TPU v6 lite", 31.25, 918.0, 918.0, 918.0 / 6, 1640.0),  # Trillium (v6e)
    Chip("H100 PCIe", 80.0, 756.0, 378.0, 51.2, 2000.0),
    Chip("H100", 80.0, 989.0, 494.5, 66.9, 3350.0),  # SXM
    Chip("H200", 141.0, 989.0, 494.5, 66.9, 4800.0),
    Chip("A100-SXM4-80GB", 80.0, 312.0, 156.0, 19.5, 2039.0),
    Chip("A100", 40.0, 312.0, 156.0, 19.5, 1555.0),
)


def chip(device_kind: str) -> Chip | None:
    """The table's row for a device kind ("TPU v5 lite", "NVIDIA H100 80GB HBM3"); None for a CPU or an
    accelerator the table does not know."""
    for c in CHIPS:
        if c.name in device_kind:
            return c
    return None


def peak_tflops(device_kind: str, dtype: str, override: float | None = None) -> float | None:
    """Per-device matmul peak for MFU at `dtype`'s rate; `override` (train.peak_tflops) wins."""
    if override:
        return float(override)
    c = chip(device_kind)
    return None if c is None else c.bf16 if dtype == "bfloat16" else c.f32
