"""No code path of the encode job opens a job path itself: with images, VAE and output all on a test
FileSystem scheme (`testfs://`, a Beam FileSystem over a temp folder, as gs:// or s3:// would be), the
job writes the same shard bytes as a plain local run."""

import hashlib
import posixpath
import shutil

import numpy as np
import pytest
from apache_beam.io.filesystem import FileMetadata, FileSystem
from apache_beam.io.localfilesystem import LocalFileSystem
from PIL import Image

from test_encode import tiny_vae

pytestmark = pytest.mark.slow  # Beam encode jobs


class TestFS(FileSystem):
    """`testfs://a/b` is `<root>/a/b` on disk; every call is counted, so the test sees it was used."""

    root = None
    calls = 0
    __test__ = False  # not a pytest class

    def __init__(self, pipeline_options=None):
        super().__init__(pipeline_options)
        self.disk = LocalFileSystem(pipeline_options)

    @classmethod
    def scheme(cls):
        return "testfs"

    def has_dirs(self):
        return True

    def _local(self, path):
        assert path.startswith("testfs://"), path
        TestFS.calls += 1
        return posixpath.join(TestFS.root, path[len("testfs://"):])

    def _remote(self, local):
        return "testfs://" + posixpath.relpath(local, TestFS.root)

    def join(self, base, *paths):
        return posixpath.join(base, *paths)

    def split(self, path):
        head, tail = posixpath.split(path[len("testfs://"):])
        return "testfs://" + head, tail

    def mkdirs(self, path):
        return self.disk.mkdirs(self._local(path))

    def _list(self, dir_or_prefix):
        for m in self.disk._list(self._local(dir_or_prefix)):
            yield FileMetadata(self._remote(m.path), m.size_in_bytes, m.last_updated_in_seconds)

    def create(self, path, *a, **k):
        return self.disk.create(self._local(path), *a, **k)

    def open(self, path, *a, **k):
        return self.disk.open(self._local(path), *a, **k)

    def copy(self, src, dst):
        return self.disk.copy([self._local(p) for p in src], [self._local(p) for p in dst])

    def rename(self, src, dst):
        return self.disk.rename([self._local(p) for p in src], [self._local(p) for p in dst])

    def exists(self, path):
        return self.disk.exists(self._local(path))

    def size(self, path):
        return self.disk.size(self._local(path))

    def last_updated(self, path):
        return self.disk.last_updated(self._local(path))

    def checksum(self, path):
        return self.disk.checksum(self._local(path))

    def metadata(self, path):
        m = self.disk.metadata(self._local(path))
        return FileMetadata(path, m.size_in_bytes, m.last_updated_in_seconds)

    def delete(self, paths):
        return self.disk.delete([self._local(p) for p in paths])


@pytest.fixture
def testfs(tmp_path):
    TestFS.root, TestFS.calls = str(tmp_path / "remote"), 0
    (tmp_path / "remote").mkdir()
    yield tmp_path / "remote"
    TestFS.root = None


def write_images(folder, n=9):
    rng = np.random.default_rng(0)
    rels = []
    for i in range(n):
        rel = f"c{i % 2}/img{i}.png"
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16 + 2 * i, 20, 3), np.uint8)).save(folder / rel)
        rels.append(rel)
    return rels + ["c1/gone.png"]  # indexed, then deleted: the job lists it as unreadable


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.array_record"))}


def test_testfs_run_gives_the_local_bytes(tmp_path, testfs):
    from pipelines.encode import run
    from pipelines.sources import file_units

    local = tmp_path / "local"
    rels = write_images(local / "images")
    tiny_vae(local / "vae")
    shutil.copytree(local / "images", testfs / "images")
    shutil.copytree(local / "vae", testfs / "vae")
    (local / "out").mkdir()

    def items(root):  # with the sha256 the data stage recorded; img2's bytes have changed since
        sha = {rel: hashlib.sha256((local / "images" / rel).read_bytes()).hexdigest()
               for rel in rels if (local / "images" / rel).is_file()}
        sha["c0/img2.png"] = "0" * 64
        return [(i, f"{root}/{rel}", i % 2, rel, sha.get(rel)) for i, rel in enumerate(rels)]

    args = dict(image_size=16, batch_size=4, num_shards=3, flip=True, dtype="float16")
    shards_a, skipped_a = run(file_units(items(local / "images"), 4), str(local / "vae"),
                              str(local / "out"), **args)
    shards_b, skipped_b = run(file_units(items("testfs://images"), 4), "testfs://vae", "testfs://out", **args)

    assert TestFS.calls > 20  # images, VAE files, shards and side files all went through it
    assert shards_a == shards_b and len(shards_a) == 3
    assert sum(s["records"] for s in shards_a) == 2 * (len(rels) - 2)
    a, b = shard_bytes(local / "out"), shard_bytes(testfs / "out")
    assert a == b and len(a) == 3
    assert all(hashlib.sha256(a[s["file"]]).hexdigest() == s["sha256"] for s in shards_a)
    assert [s["item"] for s in skipped_a] == [s["item"] for s in skipped_b] == ["c0/img2.png", "c1/gone.png"]
    assert "changed since the data stage" in skipped_b[0]["reason"] and "000000000000" in skipped_b[0]["reason"]
    assert "cannot read" in skipped_b[1]["reason"]
    assert sorted(p.name for p in (testfs / "out").iterdir()) == sorted(a)  # no side or temp files left
