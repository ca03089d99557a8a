"""The trainer's inputs: one global batch order fixed by the seed, and bad input refused in one line.

Bad input (a truncated or corrupt shard, a record of another schema, latents the model cannot take, a
nonsense param) ends with exit 2 and one line naming the file or param, before the first step and with
the checkpoint folder untouched.
"""

import json
import shutil

import numpy as np
import pytest

from conftest import run_stage
from test_train_sample import ONE, TRAIN, latents  # noqa: F401  (the module fixture)

pytestmark = pytest.mark.slow  # training runs on bad input


def records_of(wd, use_flips=False):
    from stages.runtime.loader import check_shards, open_records

    m = json.loads((wd / "artifacts/latents/manifest.json").read_text())
    shards, counts = check_shards(wd / "artifacts/latents", m)
    return open_records(shards, counts, use_flips, m["flip"])


def batches(records, rows, start=0, n=12, workers=0, batch=16):
    from stages.runtime.loader import make_loader

    it = make_loader(records, batch, seed=2, rows=rows, start_step=start, only_unflipped=True,
                     num_workers=workers)
    return [next(it) for _ in range(n)]


def test_global_batch_is_the_same_for_any_number_of_hosts_workers_or_start(latents):
    records = records_of(latents)
    one = batches(records, (0, 16))
    for hosts in (2, 4):
        parts = [batches(records, (h * 16 // hosts, (h + 1) * 16 // hosts)) for h in range(hosts)]
        for s, b in enumerate(one):
            for key in ("record", "mean", "label"):
                np.testing.assert_array_equal(np.concatenate([p[s][key] for p in parts]), b[key])
    resumed = batches(records, (0, 16), start=5, n=7)
    for a, b in zip(resumed, one[5:]):
        np.testing.assert_array_equal(a["record"], b["record"])
    for a, b in zip(batches(records, (0, 16), n=4, workers=2), one):
        np.testing.assert_array_equal(a["record"], b["record"])
        np.testing.assert_array_equal(a["mean"], b["mean"])
    # unflipped records only, every one once per epoch (40 images: 2.5 batches of 16), new order each epoch
    seen = np.concatenate([b["record"] for b in one])
    assert all((b["flip"] == 0).all() for b in one)
    assert sorted(seen[:40]) == list(range(0, 80, 2)) and sorted(seen[40:80]) == list(range(0, 80, 2))
    assert list(seen[:40]) != list(seen[40:80])


# ------------------------------------------------------------------------------------------ bad input


def with_shard(wd, records: list[bytes], fix_manifest=True):
    """Replace shard 0 by `records`; optionally record its new bytes in the encode manifest."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from pipelines.encode import ARRAY_RECORD_OPTIONS
    from stages.runtime.common import sha256_file

    mpath = wd / "artifacts/latents/manifest.json"
    m = json.loads(mpath.read_text())
    path = wd / "artifacts/latents" / m["shards"][0]["file"]
    path.unlink()
    w = ArrayRecordWriter(str(path), ARRAY_RECORD_OPTIONS)
    for r in records:
        w.write(r)
    w.close()
    if fix_manifest:
        m["shards"][0].update(sha256=sha256_file(path), records=len(records))
        mpath.write_text(json.dumps(m))
    return m["shards"][0]["file"]


def truncate(wd, fix_manifest):
    from stages.runtime.common import sha256_file

    mpath = wd / "artifacts/latents/manifest.json"
    m = json.loads(mpath.read_text())
    path = wd / "artifacts/latents" / m["shards"][0]["file"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    if fix_manifest:
        m["shards"][0]["sha256"] = sha256_file(path)
        mpath.write_text(json.dumps(m))
    return m["shards"][0]["file"]


def other_schema(wd):
    from flax import serialization

    rec = serialization.msgpack_serialize({"version": 99, "moments": np.zeros((2, 8, 8, 4), np.float32),
                                           "label": 1})
    return with_shard(wd, [rec] * 4)


def edit_manifest(wd, **fields):
    mpath = wd / "artifacts/latents/manifest.json"
    mpath.write_text(json.dumps({**json.loads(mpath.read_text()), **fields}))


CASES = {
    "truncated shard": (lambda wd: truncate(wd, False), ["truncated or corrupted"]),
    "truncated shard, manifest agreeing": (lambda wd: truncate(wd, True), ["not a readable ArrayRecord"]),
    "corrupt record": (lambda wd: with_shard(wd, [b"\xc1\xc1 not msgpack"] * 4), ["cannot decode"]),
    "record of another schema": (other_schema, ["record of another schema", "version"]),
    "latents of another shape than recorded": (lambda wd: edit_manifest(wd, latent_shape=[4, 4, 4]) or
                                               "record 0", ["(8, 8, 4)", "(4, 4, 4)"]),
    "patch size the latents cannot take": (lambda wd: "train.patch_size", ["8x8x4", "patch_size=3"]),
    "keep_every 0": (lambda wd: "train.keep_every", ["got 0"]),
    "keep_every 2.5": (lambda wd: "train.keep_every", ["2.5"]),
    "grad_clip -1": (lambda wd: "train.grad_clip", ["got -1"]),
    "grad_clip nan": (lambda wd: "train.grad_clip", ["got nan"]),
}
SETS = {"patch size the latents cannot take": ["--set", "train.patch_size=3"],
        "keep_every 0": ["--set", "train.keep_every=0"], "keep_every 2.5": ["--set", "train.keep_every=2.5"],
        "grad_clip -1": ["--set", "train.grad_clip=-1"], "grad_clip nan": ["--set", "train.grad_clip=.nan"]}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_no_checkpoint(latents, tmp_path, case):
    from stages.runtime.common import sha256_tree

    wd = tmp_path / "wd"
    shutil.copytree(latents, wd, ignore=shutil.ignore_patterns("checkpoints*", "samples", "logs"))
    ckpt = wd / "artifacts/checkpoints"  # a run in progress that bad input must leave as it is
    (ckpt / "orbax").mkdir(parents=True)
    (ckpt / "run.json").write_text('{"fingerprint": "x"}')
    before = sha256_tree(ckpt)
    make, expected = CASES[case]
    named = make(wd)
    proc = run_stage("train", wd, *TRAIN, *SETS.get(case, []), env=ONE, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and named in line and all(e in line for e in expected), line
    assert sha256_tree(ckpt) == before and not (wd / "artifacts/logs").exists()


def test_a_bad_record_inside_a_batch_is_named(tmp_path):
    """A record the loader cannot use, past the first one that check_shards reads: the batch that holds
    it stops with its shard and record number (the batch decoder finds it, the one-record reader words it)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from pipelines.records import ARRAY_RECORD_OPTIONS, encode_record
    from stages.runtime.loader import BadShard, ReadRows, open_records

    good = [encode_record(np.zeros((8, 8, 4)), np.zeros((8, 8, 4)), 1, i, 0, f"k{i}") for i in range(8)]
    cases = {"corrupt": (b"\xc1\xc1 not msgpack", "cannot decode"),
             "other shape": (encode_record(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), 1, 5, 0, "k5"), "[4, 4, 4]")}
    for name, (bad, words) in cases.items():
        path = tmp_path / f"{name}.array_record"
        w = ArrayRecordWriter(str(path), ARRAY_RECORD_OPTIONS)
        for rec in good[:5] + [bad] + good[6:]:
            w.write(rec)
        w.close()
        rows = ReadRows(open_records([path], [8], use_flips=True, flip_encoded=False), (0, 8), False)
        assert rows.map(np.arange(8)[::-1][3:])["index"].tolist() == [4, 3, 2, 1, 0]  # the good ones read
        with pytest.raises(BadShard, match=rf"{name}.array_record: record 5.*{words}"):
            rows.map(np.arange(8))


# ------------------------------------------------------------------------ the batch decoder


def _batch_records(dtype="float32", n=6, version=2):
    from flax import serialization

    from pipelines import records

    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        mean, logvar = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
        if version == 2:
            out.append(records.encode_record(mean, logvar, label=i % 3, index=100 + i, flip=i % 2,
                                             key=f"k{i}", dtype=dtype))
        else:  # version 1: no version field, float32, no key
            out.append(serialization.msgpack_serialize({"mean": mean, "logvar": logvar, "label": i % 3,
                                                        "index": 100 + i, "flip": i % 2}))
    return out


@pytest.mark.parametrize("dtype,version", [("float16", 2), ("float32", 2), ("float32", 1)])
def test_decode_batch_equals_decode_record_stacked(dtype, version):
    from pipelines.records import decode_record
    from stages.runtime.loader import decode_batch

    data = _batch_records(dtype, version=version)
    got = decode_batch(data)
    one = [decode_record(d) for d in data]
    for k in ("mean", "logvar", "label", "index", "flip"):
        want = np.stack([np.asarray(r[k]) for r in one])
        assert got[k].shape == want.shape and got[k].dtype == (want.dtype if k in ("mean", "logvar") else np.int64)
        np.testing.assert_array_equal(got[k], want)
    assert got["mean"].flags.writeable and got["mean"].dtype == np.dtype(dtype)


def test_decode_batch_names_the_bad_record():
    from flax import serialization

    from pipelines import records
    from stages.runtime.loader import BadRecord, decode_batch

    good = _batch_records()
    other_shape = records.encode_record(np.zeros((2, 2, 4)), np.zeros((2, 2, 4)), 0, 0, 0, "k")
    other_dtype = records.encode_record(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), 0, 0, 0, "k", dtype="float16")
    future = serialization.msgpack_serialize({"version": 99, "mean": np.zeros(1, np.float32)})
    no_flip = serialization.msgpack_serialize({"mean": np.zeros((4, 4, 4), np.float32),
                                               "logvar": np.zeros((4, 4, 4), np.float32), "label": 1, "index": 0})
    for bad, words in ((b"\xc1\xc1 not msgpack", "cannot decode"), (other_shape, "[2, 2, 4]"),
                       (other_dtype, "float16"), (future, "version 99"), (no_flip, "fields")):
        with pytest.raises(BadRecord, match=words) as e:
            decode_batch(good[:4] + [bad] + good[4:])
        assert e.value.position == 4
