"""Cloud TPU topologies by name, as abstract devices a program can be compiled for on any machine.

libtpu names a slice by its chip grid, `GEN:AxB` (v5e, v6e: 2-D, one TensorCore a chip) or `GEN:AxBxC` (v4,
v5p: 3-D, a megacore chip), and `jax.experimental.topologies.get_topology_desc` gives its devices from that
name, the chip configuration, the chips a host holds and which axes wrap around. Google's slice names count
chips (v5e-256 = 256 chips) or, for v4 and v5p, TensorCores (v4-8 = 4 chips); both forms are accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# generation -> (libtpu's name, axes, chip config). v5p is "v5" to libtpu.
GENERATIONS = {"v4": ("v4", 3, "megacore"), "v5p": ("v5", 3, "megacore"), "v5": ("v5", 3, "megacore"),
               "v5e": ("v5e", 2, "default"), "v6e": ("v6e", 2, "default")}
# Google's slice shapes by chip count (cloud.google.com/tpu/docs: v5e, v6e and v4/v5p topologies)
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
FORMS = ("GEN:AxB for v5e/v6e (v5e:16x16), GEN:AxBxC for v4/v5p (v4:2x2x1, v5p:4x4x8), or a slice name "
         "(v5e-256, v6e-8: chips; v4-8, v5p-128: TensorCores, two a chip)")


class TopologyError(ValueError):
    """A name that is not a Cloud TPU slice; the message names the accepted forms."""


@dataclass(frozen=True)
class Topology:
    name: str  # as libtpu takes it, e.g. "v5e:16x16"
    generation: str  # v4, v5p, v5e, v6e
    shape: tuple[int, ...]
    chip_config: str
    num_slices: int = 1

    @property
    def chips(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.num_slices

    @property
    def hosts(self) -> int:
        """TPU VMs: one per 4 chips (2x2, or 2x2x1), one for a smaller slice."""
        per_slice = self.chips // self.num_slices
        return max(1, per_slice // 4) * self.num_slices

    @property
    def accelerator_type(self) -> str:
        """Google's name of one slice: v5litepod-256, v6e-8, v4-8 and v5p-8 (TensorCores, two a chip)."""
        per_slice = self.chips // self.num_slices
        prefix = {"v5e": "v5litepod", "v6e": "v6e", "v4": "v4", "v5p": "v5p"}[self.generation]
        return f"{prefix}-{per_slice * (2 if len(self.shape) == 3 else 1)}"

    def wrap(self) -> tuple[bool, bool, bool]:
        """Torus links: a 3-D slice wraps all three axes when each is at least 4 (a full cube of cubes);
        a 2-D v5e/v6e slice wraps an axis of 16 chips."""
        if len(self.shape) == 3:
            full = all(s >= 4 for s in self.shape)
            return (full, full, full)
        return (self.shape[0] == 16, self.shape[1] == 16, False)

    def devices(self) -> list:
        """The slice's (or slices') abstract devices; needs libtpu (`pip install -e '.[tpu]'`)."""
        import importlib.util

        from jax.experimental import topologies

        if importlib.util.find_spec("libtpu") is None:
            raise TopologyError(f"compiling for {self.name} needs libtpu, which is not installed: "
                                "pip install -e '.[tpu]' (make installs it)")
        bounds = (1, 1, 1) if self.chips // self.num_slices == 1 else (2, 2, 1)
        try:
            desc = topologies.get_topology_desc(platform="tpu", topology_name=self.name,
                                                chip_config_name=self.chip_config, chips_per_host_bounds=bounds,
                                                num_slices=self.num_slices, wrap=self.wrap())
        except Exception as e:  # libtpu refuses the shape
            raise TopologyError(f"libtpu refuses topology {self.name}: {str(e).strip().splitlines()[0][:300]}; "
                                f"use {FORMS}")
        return list(desc.devices)


def parse(text: str, num_slices: int = 1) -> Topology:
    """`v5e:16x16`, `v5p:2x2x1`, `v5e-256`, `v4-8`, ... -> Topology, or TopologyError."""
    text = str(text).strip().lower()
    m = re.fullmatch(r"(v4|v5p|v5|v5e|v6e):(\d+(?:x\d+){1,2})", text)
    if m:
        gen, axes = m.group(1), tuple(int(a) for a in m.group(2).split("x"))
        lib, ndim, config = GENERATIONS[gen]
        if len(axes) != ndim or min(axes) < 1:
            raise TopologyError(f"'{text}': {gen} slices have {ndim} axes; use {FORMS}")
        return Topology(f"{lib}:{m.group(2)}", "v5p" if lib == "v5" else gen, axes, config, num_slices)
    m = re.fullmatch(r"(v4|v5p|v5e|v6e|v5litepod)-(\d+)", text)
    if m:
        gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
        lib, ndim, config = GENERATIONS[gen]
        chips = int(m.group(2)) // (2 if ndim == 3 else 1)  # v4/v5p names count TensorCores
        shapes = SHAPES_3D if ndim == 3 else SHAPES_2D
        if chips not in shapes:
            raise TopologyError(f"'{text}' is not a {gen} slice size (known: "
                                f"{', '.join(f'{gen}-{c * (2 if ndim == 3 else 1)}' for c in shapes)}); use {FORMS}")
        shape = shapes[chips]
        return Topology(f"{lib}:{'x'.join(map(str, shape))}", gen, shape, config, num_slices)
    raise TopologyError(f"'{text}' is not a Cloud TPU topology; use {FORMS}")
