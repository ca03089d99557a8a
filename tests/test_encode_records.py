"""The latent record schema: versions, dtypes, and the one-way import from stages to pipelines."""

import ast

import numpy as np
import pytest
from flax import serialization

from conftest import ROOT
from pipelines import records
from pipelines.encode import decode_record  # the loader's import keeps working


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_in_either_dtype(dtype):
    mean = np.random.default_rng(0).normal(size=(4, 4, 4)).astype(np.float32)
    data = records.encode_record(mean, mean - 1, label=7, index=12, flip=1, key="n01/a.JPEG", dtype=dtype)
    r = decode_record(data)
    assert r["version"] == records.SCHEMA_VERSION and r["key"] == "n01/a.JPEG"
    assert (r["label"], r["index"], r["flip"]) == (7, 12, 1)
    assert r["mean"].dtype == np.dtype(dtype) and r["logvar"].shape == (4, 4, 4)
    np.testing.assert_allclose(r["mean"].astype(np.float32), mean, rtol=1e-3 if dtype == "float16" else 0)
    # what the loader does with it
    assert np.asarray(r["logvar"], np.float32).dtype == np.float32


def test_unknown_version_is_refused_and_version_1_still_reads():
    legacy = serialization.msgpack_serialize({"mean": np.zeros((2, 2, 4), np.float32),
                                              "logvar": np.zeros((2, 2, 4), np.float32),
                                              "label": 1, "index": 0, "flip": 0})
    assert decode_record(legacy)["label"] == 1
    future = serialization.msgpack_serialize({"version": 99, "mean": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="schema version 99"):
        decode_record(future)
    with pytest.raises(ValueError, match="dtype"):
        records.encode_record(np.zeros(1), np.zeros(1), 0, 0, 0, "k", dtype="bfloat16")


def test_pipelines_never_import_stages():
    for path in sorted((ROOT / "pipelines").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "stages" or n.startswith("stages.") for n in names), f"{path.name}: {names}"

