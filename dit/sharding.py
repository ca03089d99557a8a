"""A named (data, fsdp) mesh and the rule that places parameters and batches on it.

Batches split over both axes. A parameter is split over `fsdp` along its largest axis that divides evenly
(XLA gathers it for use) and replicated over `data`; with fsdp = 1 this is plain data parallelism.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh. Devices are ordered by (process, id) first, so each host's devices are
    consecutive and its rows of a batch sharded over both axes are one range, which the train stage's
    loader reads (a TPU pod numbers its chips across hosts: host 0 of a v5e-256 holds ids 0, 1, 16, 17)."""
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"train.mesh.fsdp: {fsdp} does not divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"train.mesh: data {data} x fsdp {fsdp} != {n} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def param_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    n = mesh.shape["fsdp"]
    spec: list = [None] * len(shape)
    if n > 1:
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if shape[axis] % n == 0 and shape[axis] >= n:
                spec[axis] = "fsdp"
                break
    return NamedSharding(mesh, P(*spec))


def tree_shardings(mesh: Mesh, abstract_tree):
    return jax.tree.map(lambda x: param_sharding(mesh, tuple(x.shape)), abstract_tree)


def replicated_abstract(mesh: Mesh, abstract_tree):
    """ShapeDtypeStructs placed whole on every device of `mesh` (a restore target that does not depend
    on the topology a checkpoint was written with)."""
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract_tree)
