"""Checksums that tell a damaged checkpoint from a whole one, on any mesh, without gathering the arrays.

A leaf's checksum is S = sum over its elements i of (2i + 1) * bits(x_i), modulo 2**64, with i the element's
flat index in the global array and bits(x_i) its bytes read as an unsigned integer. Because S is a sum
over elements, each process computes it over the shards it holds (replica 0 only, so a replicated array
counts once), and the processes' partial sums add up to the leaf's: 16 bytes a leaf cross the hosts, not
the 10.8 GB of a DiT-XL/2 train state. Because the weight 2i + 1 is odd, changing any one element changes S
(a flipped bit moves it by an odd multiple of a power of two, never 0 mod 2**64), and moving values
between positions changes it too; a truncated or missing file fails Orbax's read before any sum. And
because i is the global index, a checkpoint written on one mesh verifies when restored onto another (a
preempted run resumed on another slice). Not a cryptographic hash: it guards against bit rot and partial
copies, not against someone forging bytes (the audit's sha256 of the EMA does that).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class Damaged(ValueError):
    """A checkpoint step whose bytes are not the ones its checksums recorded."""


def _partial(data: np.ndarray, index: tuple, shape: tuple) -> int:
    """S over one shard: `data` at `index` (slices) of a global array of `shape`. Uses
    S = 2 * sum_d stride_d * sum_k (offset_d + k) * B_d[k] + sum(bits), with B_d the bits summed over
    every axis but d, all in wrapping uint64 arithmetic."""
    data = np.asarray(data)
    if data.ndim == 0:  # a scalar (the optimizer's step count): i = 0, weight 1
        return int(data.reshape(1).view(_UINT[data.dtype.itemsize])[0])
    bits = np.ascontiguousarray(data).view(_UINT[data.dtype.itemsize]).astype(np.uint64)
    strides = [int(np.prod(shape[d + 1:], dtype=np.int64)) for d in range(len(shape))]
    total = np.uint64(0)
    with np.errstate(over="ignore"):
        for d in range(bits.ndim):
            per = bits.sum(axis=tuple(a for a in range(bits.ndim) if a != d), dtype=np.uint64)
            start = (index[d].start or 0) if d < len(index) else 0
            pos = np.arange(start, start + bits.shape[d], dtype=np.uint64)
            total += np.uint64(strides[d]) * np.sum(pos * per, dtype=np.uint64)
        total = np.uint64(2) * total + bits.sum(dtype=np.uint64)
    return int(total)


def checksums(tree) -> dict[str, str]:
    """{leaf path: S as 16 hex digits} of a pytree of jax.Arrays (or numpy arrays), over every process: a
    collective when several processes hold the tree (each calls it)."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    local = []
    for _, leaf in leaves:
        s = 0
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                if shard.replica_id == 0:
                    s += _partial(np.asarray(shard.data), shard.index, leaf.shape)
        elif jax.process_index() == 0:  # host data: process 0 counts it
            arr = np.asarray(leaf)
            s += _partial(arr, tuple(slice(0, n) for n in arr.shape), arr.shape)
        local.append(s % 2 ** 64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        parts = np.array([[v >> 32, v & 0xFFFFFFFF] for v in local], np.uint32).reshape(-1, 2)
        every = np.asarray(multihost_utils.process_allgather(parts))  # (processes, leaves, 2)
        local = [sum((int(hi) << 32) + int(lo) for hi, lo in every[:, k]) % 2 ** 64 for k in range(len(local))]
    return {jax.tree_util.keystr(path): f"{v:016x}" for (path, _), v in zip(leaves, local)}


def sealed(meta: dict) -> dict:
    """`meta` with `meta_sha256`: the sha256 of its other keys' canonical JSON, so a damaged meta item is
    told from a whole one too."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return {**body, "meta_sha256": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()}


def verify(meta: dict, trees: dict) -> None:
    """Raise Damaged naming what differs: the meta item's own hash, or the first leaf of `trees` ({item:
    pytree}) whose checksum is not the one `meta["checksums"][item]` recorded."""
    if sealed(meta).get("meta_sha256") != meta.get("meta_sha256"):
        raise Damaged("its meta item does not match its own sha256")
    recorded = meta.get("checksums") or {}
    for item, tree in trees.items():
        want = recorded.get(item)
        if want is None:
            raise Damaged(f"no checksums recorded for its {item} item")
        got = checksums(tree)
        for path in sorted(set(want) | set(got)):
            if want.get(path) != got.get(path):
                raise Damaged(f"{item}{path}: checksum {got.get(path)} where {want.get(path)} was saved")
