"""Grain input pipeline over the encode stage's ArrayRecord shards: one global batch order, fixed by the seed.

The records used (all of them, or only the unflipped ones when train.use_flips is false) are permuted
with a named seed, a new permutation every epoch, and cut into global batches of train.global_batch_size
(a Grain MapDataset indexed by step). Global batch s is therefore fixed by (seed, batch size)
alone; each host reads only its own rows [lo, hi) of it (the rows its devices hold), so 1 host and 4 hosts,
1 device or 8, 0 or 8 Grain workers all train on the same records in the same order. The data position is
the step: resuming at step s is `dataset[s:]`, exact on any number of hosts, with no iterator state to save
(a per-host iterator state would tie a resume to the host count it was saved with).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import grain
import msgpack
import numpy as np

from pipelines.records import KNOWN_VERSIONS, UnknownSchema, decode_record

FIELDS = ("mean", "logvar", "label", "index", "flip")


class BadShard(ValueError):
    """A shard or record the trainer cannot use; the message names the shard."""


@dataclasses.dataclass(frozen=True)
class Records:
    """The shards as one indexable source, and which global record numbers training uses."""

    shards: tuple[Path, ...]
    offsets: np.ndarray  # offsets[k] = global number of shard k's first record
    used: np.ndarray  # global record numbers in use, ascending

    def shard_of(self, record: int) -> tuple[Path, int]:
        k = int(np.searchsorted(self.offsets, record, side="right")) - 1
        return self.shards[k], record - int(self.offsets[k])


def open_records(shards: list[Path], counts: list[int], use_flips: bool, flip_encoded: bool) -> Records:
    """Which records to train on. The encode job writes each shard sorted by (image index, flip), so with
    flips encoded an image's two views are neighbours and the unflipped one sits at an even position;
    `read` checks each record's flip flag against that, so a change of layout cannot go unnoticed."""
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    if use_flips or not flip_encoded:
        used = np.arange(sum(counts), dtype=np.int64)
    else:
        used = np.concatenate([off + np.arange(0, n, 2) for off, n in zip(offsets, counts)]).astype(np.int64)
    return Records(tuple(shards), offsets, used)


def parse(data: bytes, where: str) -> dict:
    """One record as arrays; a record of another schema is a BadShard naming where it was read."""
    try:
        r = decode_record(data)
    except UnknownSchema as e:
        raise BadShard(f"{where}: record of another schema ({e})")
    except Exception as e:  # msgpack errors
        raise BadShard(f"{where}: cannot decode the record ({type(e).__name__}: {e}); rerun the encode stage")
    if not isinstance(r, dict) or set(FIELDS) - set(r):
        keys = sorted(r) if isinstance(r, dict) else type(r).__name__
        raise BadShard(f"{where}: record of another schema (fields {keys}, expected {list(FIELDS)}); "
                       "rerun the encode stage")
    return {"mean": np.asarray(r["mean"], np.float32), "logvar": np.asarray(r["logvar"], np.float32),
            "label": np.int32(r["label"]), "index": np.int32(r["index"]), "flip": np.int32(r["flip"])}


# flax.serialization writes an ndarray as msgpack ExtType 1, holding msgpack (shape, dtype name, C-order bytes)
_NDARRAY_EXT = 1


class BadRecord(ValueError):
    """decode_batch: the record at `position` of the batch is not a latent record of this batch's layout."""

    def __init__(self, position: int, reason: str):
        super().__init__(reason)
        self.position = position


def _ndarray_parts(code, data):
    return tuple(msgpack.unpackb(data, raw=True)) if code == _NDARRAY_EXT else msgpack.ExtType(code, data)


def decode_batch(datas: list[bytes]) -> dict:
    """pipelines/records.py's records, a batch at a time: mean and logvar stacked, (n, h, w, c) in their
    stored dtype, and label, index and flip as (n,) int64 arrays. The values decode_record gives record by
    record, read without an array per record: each field's bytes are joined and read once (the loader's
    decode and stack, 8x8x4 records: 9.7 against 2.2 us a record). A record decode_record refuses, or
    whose latents' shape or dtype differ from the first record's, raises BadRecord with its position."""
    if not datas:
        raise ValueError("decode_batch: no records")
    parts = {"mean": [], "logvar": []}
    ints, layout = [], None
    for i, data in enumerate(datas):
        try:
            r = msgpack.unpackb(data, ext_hook=_ndarray_parts, raw=False)
        except Exception as e:  # msgpack's errors
            raise BadRecord(i, f"cannot decode ({type(e).__name__}: {e})")
        version = r.get("version", 1) if isinstance(r, dict) else None
        if version not in KNOWN_VERSIONS or set(FIELDS) - set(r):
            raise BadRecord(i, f"schema version {version!r}, fields {sorted(r) if isinstance(r, dict) else r}")
        m, lv = r["mean"], r["logvar"]
        if not (isinstance(m, tuple) and isinstance(lv, tuple) and len(m) == len(lv) == 3):
            raise BadRecord(i, "mean or logvar is not an array")
        layout = layout or (m[0], m[1])
        if (m[0], m[1]) != layout or (lv[0], lv[1]) != layout:
            raise BadRecord(i, f"latents {m[0]} {m[1].decode()}, the batch's first record's {layout[0]} "
                               f"{layout[1].decode()}")
        parts["mean"].append(m[2])
        parts["logvar"].append(lv[2])
        ints.append((r["label"], r["index"], r["flip"]))
    shape, dtype = (len(datas), *layout[0]), np.dtype(layout[1].decode())
    out = {k: np.frombuffer(bytearray().join(v), dtype).reshape(shape) for k, v in parts.items()}  # writable
    out.update(zip(("label", "index", "flip"), np.asarray(ints, np.int64).reshape(-1, 3).T))
    return out


class ReadRows(grain.transforms.Map):
    """A global batch's positions -> this host's rows of it, read: {mean, logvar, label, index, flip,
    record} (`record`: global record numbers, what the 1-vs-2-host test compares)."""

    def __init__(self, records: Records, rows: tuple[int, int], only_unflipped: bool):
        self.records, self.rows, self.only_unflipped = records, rows, only_unflipped
        self._source = None

    def map(self, positions: np.ndarray) -> dict:
        if self._source is None:  # opened lazily, so a Grain worker process opens its own readers
            self._source = grain.sources.ArrayRecordDataSource([str(p) for p in self.records.shards])
        lo, hi = self.rows
        numbers = [int(n) for n in self.records.used[positions[lo:hi]]]
        try:
            raw = [self._source[n] for n in numbers]  # __getitems__'s threads cost more on local disk
        except Exception as e:
            raise BadShard(f"{self._where(numbers[0])}: cannot read ({type(e).__name__}: {e})")
        try:
            r = decode_batch(raw)
        except Exception as e:  # let the one-record reader name what is wrong, where
            at = e.position if isinstance(e, BadRecord) else 0
            for n, data in zip(numbers[at:], raw[at:]):
                parse(data, self._where(n))
            raise BadShard(f"{self._where(numbers[at])}: {e}")
        if self.only_unflipped and r["flip"].any():
            n = numbers[int(np.argmax(r["flip"] != 0))]
            raise BadShard(f"{self._where(n)}: expected an unflipped record (encode layout changed?)")
        batch = {k: r[k].astype(np.float32 if k in ("mean", "logvar") else np.int32, copy=False) for k in FIELDS}
        batch["record"] = np.asarray(numbers, np.int64)
        return batch

    def _where(self, number: int) -> str:
        shard, local = self.records.shard_of(number)
        return f"{shard}: record {local}"


class GlobalBatches(grain.MapDataset):
    """Element s: the positions (into Records.used) of global batch s, an endless seed-fixed sequence.

    Global position g is perm_e[g mod n] with e = g div n and perm_e a permutation drawn from
    SeedSequence([seed, e]): a new order every epoch, fixed by the seed alone. Not Grain's own
    `shuffle().repeat()`, which expresses the same thing but whose index_shuffle took 0.7 ms per index
    here (180 ms for one 256-record batch); one NumPy permutation per epoch costs ~30 ms for ImageNet.
    """

    def __init__(self, num_used: int, seed: int, global_batch: int):
        super().__init__()
        self.n, self.seed, self.batch = num_used, seed, global_batch
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize // self.batch

    def __str__(self) -> str:
        return f"GlobalBatches(n={self.n}, seed={self.seed}, batch={self.batch})"

    def __getitem__(self, step):
        if isinstance(step, slice):
            return self.slice(step)
        epoch, pos = np.divmod(np.arange(step * self.batch, (step + 1) * self.batch, dtype=np.int64), self.n)
        out = np.empty(self.batch, np.int64)
        for e in np.unique(epoch):
            out[epoch == e] = self._perm(int(e))[pos[epoch == e]]
        return out

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # a batch spans at most two epochs unless it exceeds the data
                self._perms.pop(min(self._perms))
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perms[epoch] = rng.permutation(self.n)
        return self._perms[epoch]


def host_dataset(records: Records, global_batch: int, seed: int, rows: tuple[int, int],
                 only_unflipped: bool) -> grain.MapDataset:
    """Element s: this host's rows [lo, hi) of global batch s, read and stacked."""
    return GlobalBatches(len(records.used), seed, global_batch).map(ReadRows(records, rows, only_unflipped))


def order_sha256(records: Records, global_batch: int, seed: int, only_unflipped: bool) -> str:
    """sha256 of what the loader feeds the step, for the run fingerprint: the record numbers of global
    batches 0 and 1 and of the two at the first epoch boundary (the order, the per-epoch reshuffle), and
    the arrays of global batch 0 as the step receives them, every host's rows (the decoding). The same
    on any number of hosts; a change to the order or the decoding changes it, a refactor does not."""
    import hashlib

    batches = GlobalBatches(len(records.used), seed, global_batch)
    boundary = len(records.used) // global_batch
    h = hashlib.sha256()
    for step in sorted({0, 1, boundary, boundary + 1}):
        h.update(records.used[batches[step]].tobytes())
    first = ReadRows(records, (0, global_batch), only_unflipped).map(batches[0])
    for k in ("mean", "logvar", "label"):
        h.update(f"{k}|{first[k].dtype.str}|{first[k].shape}".encode() + first[k].tobytes())
    return h.hexdigest()


# One thread reading a few batches ahead of the step, in order. Grain's default (16 threads, 500 batches
# ahead) spent 2.3x the CPU per batch here (3.1 against 1.35 ms for 64 records of 8x8x4: its threads contend
# for the GIL), CPU taken from the trainer's devices, and would hold 500 batches in memory (4 GB at batch 256
# of 32x32x4). Reading from slow storage: train.num_workers processes, each with its own reader.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


def make_loader(records: Records, global_batch: int, seed: int, rows: tuple[int, int], start_step: int,
                only_unflipped: bool, num_workers: int = 0):
    """An endless iterator of this host's batches from global batch `start_step` on."""
    ds = host_dataset(records, global_batch, seed, rows, only_unflipped)[start_step:]
    it = ds.to_iter_dataset(READ_OPTIONS)
    if num_workers > 0:
        from absl import flags

        flags.FLAGS.mark_as_parsed()  # Grain's multiprocessing reads absl flags (see DESIGN.md)
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it)


def check_shards(latents_dir: Path, manifest: dict) -> tuple[list[Path], list[int]]:
    """Every shard the encode manifest lists: present, the bytes it recorded (a truncated or corrupted
    shard differs), as many records, and a first record of the expected schema and latent shape. Run
    before the first step, so bad input stops the job before any checkpoint is touched."""
    from stages.runtime.common import sha256_file

    shards, counts = [], []
    shape = tuple(manifest["latent_shape"])
    for s in manifest["shards"]:
        path = Path(latents_dir) / s["file"]
        if not path.is_file():
            raise BadShard(f"{path}: shard missing; rerun the encode stage")
        if sha256_file(path) != s["sha256"]:
            raise BadShard(f"{path}: bytes differ from the encode manifest's sha256 (truncated or "
                           "corrupted); rerun the encode stage")
        try:
            source = grain.sources.ArrayRecordDataSource([str(path)])
            n = len(source)
            first = source[0] if n else None
        except Exception as e:
            raise BadShard(f"{path}: not a readable ArrayRecord file ({type(e).__name__}: {e})")
        if n != s["records"]:
            raise BadShard(f"{path}: {n} records, the encode manifest says {s['records']}")
        if first is not None:
            row = parse(first, f"{path}: record 0")
            if row["mean"].shape != shape or row["logvar"].shape != shape:
                raise BadShard(f"{path}: record 0 has latents {row['mean'].shape}, the encode manifest "
                               f"says {shape}")
        shards.append(path)
        counts.append(n)
    return shards, counts
