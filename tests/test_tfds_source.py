"""data.source: tfds on tensorflow-datasets' mock_data: the data stage's index, the encode job, the
reference stage's reader, and one-line failures for a dataset that is not there.

The tfds wheel ships no ImageNet examples; `tfds.testing.mock_data` stands in for the prepared files with
imagenet2012's real metadata (1000 synset labels). Its default generator ignores split slices, which the
encode job's work units use, so the fake below honours them like a real prepared split does.
"""

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from conftest import run_stage
from test_encode import tiny_vae

pytestmark = pytest.mark.slow  # the data and encode stages on tfds and a fake GCS

N, BAD, CMYK = 10, 4, 7


def example_bytes(i: int) -> bytes:
    if i == BAD:
        return b"\xff\xd8\xff\xe0 truncated jpeg"
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    if i == CMYK:
        Image.new("CMYK", (20, 18), (10, 200, 30, 40)).save(buf, "JPEG")
    else:
        Image.fromarray(rng.integers(0, 256, (18 + i, 24, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def fake_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
    import tensorflow as tf

    m = re.fullmatch(r"(\w+)(?:\[(\d*):(\d*)\])?", split)
    start, stop = int(m.group(2) or 0), min(int(m.group(3) or N), N)

    def gen():
        for i in range(start, stop):
            yield {"image": example_bytes(i), "label": i % 3, "file_name": f"img{i}.JPEG",
                   "tfds_id": f"imagenet2012-{m.group(1)}.tfrecord-00000-of-00001__{i}"}
    sig = {"image": tf.TensorSpec((), tf.string), "label": tf.TensorSpec((), tf.int64),
           "file_name": tf.TensorSpec((), tf.string), "tfds_id": tf.TensorSpec((), tf.string)}
    return tf.data.Dataset.from_generator(gen, output_signature=sig)


def key(i: int) -> str:
    return f"imagenet2012-train.tfrecord-00000-of-00001__{i}"


def test_tfds_split_feeds_data_encode_and_reference(workdir, tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from pipelines import sources
    from stages import data, encode
    from stages.runtime.common import Manifest
    from stages.runtime.images import BadImage, iter_images, read_index

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sources, "TFDS_CHUNK_BATCHES", 1)  # 3 work units of one batch each
    (tmp_path / "manual").mkdir()
    with tfds.testing.mock_data(as_dataset_fn=fake_as_dataset):
        data.main(["--set", "data.source=tfds", "--set", f"data.data_dir={tmp_path / 'tfds'}",
                   "--set", f"data.manual_dir={tmp_path / 'manual'}", "--set", "data.image_size=16"])
        tiny_vae(workdir / "artifacts/vae")
        encode.main(["--set", "data.image_size=16", "--set", "encode.batch_size=4", "--set", "encode.shards=2",
                     "--set", "encode.num_workers=1", "--set", "encode.dtype=float16"])
        index = read_index(workdir / "artifacts/data")
        seen = list(iter_images(index, 16))  # what the reference and yardsticks stages read
        from stages import vae  # the vae stage trains on the same split (no pretrained VAE given)

        vm = Manifest("vae", {})
        trained_on = vae.read_images(16, vm)

    dm = json.loads((workdir / "artifacts/data/manifest.json").read_text())
    assert dm["counts"] == {"total": N, "processed": N - 1, "skipped": 1, "classes": 1000}
    assert dm["skipped"][0]["item"] == key(BAD) and "cannot decode" in dm["skipped"][0]["reason"]
    assert index["classes"][:2] == ["n01440764", "n01443537"] and len(index["empty_classes"]) == 997
    assert dm["modes_converted_to_rgb"] == {"CMYK": 1} and index["tfds"]["num_examples"] == N

    em = json.loads((workdir / "artifacts/latents/manifest.json").read_text())
    assert em["counts"] == {"total": N, "processed": N - 1, "skipped": 1, "records": 2 * (N - 1)}
    assert em["skipped"] == dm["skipped"] and em["source"] == "tfds"
    assert em["record_schema"]["version"] == 2 and em["record_schema"]["dtype"] == "float16"

    from array_record.python.array_record_data_source import ArrayRecordDataSource

    from pipelines.records import decode_record

    files = sorted((workdir / "artifacts/latents").glob("*.array_record"))
    src = ArrayRecordDataSource([str(f) for f in files])
    recs = [decode_record(src[i]) for i in range(len(src))]
    assert {(r["index"], r["flip"]) for r in recs} == {(i, f) for i in range(N) if i != BAD for f in (0, 1)}
    assert all(r["key"] == key(r["index"]) and r["label"] == r["index"] % 3 for r in recs)
    assert all(r["mean"].dtype == np.float16 for r in recs)

    assert [k for k, _, _ in seen] == [key(i) for i in range(N)]
    assert [isinstance(img, BadImage) for _, _, img in seen] == [i == BAD for i in range(N)]
    assert trained_on.shape == (N - 1, 16, 16, 3) and trained_on.dtype == np.uint8
    assert [s["item"] for s in vm.skipped] == [key(BAD)] and vm.counts["processed"] == N - 1


@pytest.mark.parametrize("extra, needle", [
    ([], "data.data_dir"),                                                # nothing prepared, no tars
    (["--set", "data.manual_dir=/no/such/tars"], "data.manual_dir"),
    (["--set", "data.tfds_name=no_such_dataset_xyz"], "data.tfds_name"),
    (["--set", "data.data_dir=s3://no-bucket/tfds"], "data.data_dir: 's3://no-bucket/tfds'"),  # no S3 in TF
])
def test_missing_tfds_dataset_is_one_line_exit_2(workdir, tmp_path, extra, needle):
    proc = run_stage("data", workdir, "--set", "data.source=tfds", "--set", f"data.data_dir={tmp_path}",
                     *extra, check=False, timeout=120)  # fails fast, never waits on the network
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert not (workdir / "artifacts/data").exists()


@pytest.mark.parametrize("param, mode, needle", [
    ("data_dir", "dns", "Could not resolve"),       # no DNS (a proxy host under .invalid never resolves)
    ("data_dir", "refused", "did not answer within 10 s"),  # no route: the client retries until the deadline
    ("data_dir", "hang", "did not answer within 10 s"),     # accepted, never answered
    ("data_dir", "401", "check the credentials"),   # no credentials: no metadata server, anonymous refused
    ("data_dir", "403", "response code 403"),       # credentials without access
    ("data_dir", "404", "the bucket gs://dit-test-bucket does not exist"),
    ("manual_dir", "403", "response code 403"),
])
def test_unreachable_bucket_is_one_line_exit_2(workdir, tmp_path, param, mode, needle):
    """Every way a gs:// path can be out of reach, made on loopback whatever this machine's network does:
    TensorFlow's own GCS client (what tfds reads with) goes through a proxy that fails as `mode` says."""
    from fake_gcs import FakeGCS, env

    fake = FakeGCS(mode, tmp_path / "fake") if mode not in ("dns", "refused") else None
    path = "gs://dit-test-bucket/tfds"
    sets = {"data_dir": str(tmp_path / "tfds"), "manual_dir": None, param: path}
    args = [a for k, v in sets.items() if v for a in ("--set", f"data.{k}={v}")]
    try:
        proc = run_stage("data", workdir, "--set", "data.source=tfds", *args, check=False, timeout=120,
                         env={**env(mode, tmp_path, fake), "DIT_REMOTE_TIMEOUT_S": "10"})
    finally:
        if fake:
            fake.close()
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: data.{param}: '{path}'") and needle in lines[0], lines[0]
    if fake:  # the client did go to the fake: GCS itself answered, or (hang) its first request never was
        assert any("googleapis.com" in r for r in fake.requests) if mode != "hang" else fake.requests
    assert not (workdir / "artifacts/data").exists()
