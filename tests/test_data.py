"""The data stage: embedded digits and an external ImageFolder with every kind of bad file."""

import json

import numpy as np
from PIL import Image

from conftest import run_stage
from stages.runtime.images import center_crop_arr


def test_digits_imagefolder(workdir):
    run_stage("data", workdir, "--set", "data.limit=40", "--set", "data.image_size=16")
    out = workdir / "artifacts/data"
    index = json.loads((out / "index.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert index["classes"] == [str(i) for i in range(10)]
    assert len(index["items"]) == 40 and {it[1] for it in index["items"]} == set(range(10))
    rel, label, _ = index["items"][0]
    img = Image.open(out / "images" / rel)
    assert img.mode == "RGB" and img.size == (16, 16) and rel.startswith(f"{label}/")
    assert manifest["counts"] == {"total": 40, "processed": 40, "skipped": 0, "classes": 10}
    assert len(manifest["inputs_sha256"]["sklearn_digits"]) == 64


def make_tree(root):
    rng = np.random.default_rng(0)
    for cls in ("n01", "n02"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(root / cls / f"ok{i}.JPEG")
    Image.fromarray(rng.integers(0, 255, (40, 40), np.uint8), "L").save(root / "n01/gray.png")
    Image.new("CMYK", (40, 40), (10, 20, 30, 40)).save(root / "n01/cmyk.jpg")
    Image.new("RGBA", (40, 40), (10, 20, 30, 128)).save(root / "n02/alpha.png")
    Image.new("RGB", (4, 40)).save(root / "n02/tiny.png")
    (root / "n02/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (root / "n01/ok0.JPEG").read_bytes()
    (root / "n01/truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "n02/notes.txt").write_text("not an image")
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(root / "n02/gray16.png")  # 16-bit grey
    Image.new("P", (40, 40), 3).save(root / "n01/palette.png")
    (root / "n03_empty").mkdir()  # a synset with no images keeps its label index
    (root / "README").write_text("stray file beside the class folders")


def test_imagefolder_skips_and_lists_bad_items(workdir, tmp_path):
    root = tmp_path / "tree"
    make_tree(root)
    run_stage("data", workdir, "--set", "data.source=imagefolder", "--set", f"data.path={root}",
              "--set", "data.min_size=8")
    out = workdir / "artifacts/data"
    index = json.loads((out / "index.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    kept = {it[0] for it in index["items"]}
    converted = {"n01/gray.png", "n01/cmyk.jpg", "n02/alpha.png", "n02/gray16.png", "n01/palette.png"}
    assert converted <= kept  # converted, not dropped
    skipped = {s["item"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"n02/tiny.png", "n02/corrupt.jpg", "n01/truncated.jpg", "n02/notes.txt",
                            "README"}
    assert "too small" in skipped["n02/tiny.png"] and "not an image" in skipped["n02/notes.txt"]
    assert "not in a class folder" in skipped["README"]
    c = manifest["counts"]
    assert c["processed"] + c["skipped"] == c["total"] == 16 and c["processed"] == 11
    assert c["classes"] == 3 and index["classes"] == ["n01", "n02", "n03_empty"]
    assert manifest["empty_classes"] == index["empty_classes"] == ["n03_empty"]
    assert manifest["modes_converted_to_rgb"] == {"L": 1, "CMYK": 1, "RGBA": 1, "I;16": 1, "P": 1}
    assert index["root"] == str(root.resolve())
    assert {it[1] for it in index["items"] if it[0].startswith("n02/")} == {1}


def test_16_bit_grey_is_scaled_not_clipped():
    import io

    from pipelines.images import decode_rgb

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(buf, "PNG")  # 32896 = 128 * 257
    rgb, mode = decode_rgb(buf.getvalue())
    assert mode in ("I;16", "I") and np.asarray(rgb)[0, 0].tolist() == [128, 128, 128]


def test_center_crop_matches_adm():
    img = Image.fromarray(np.arange(300 * 200 * 3, dtype=np.uint8).reshape(300, 200, 3))
    out = center_crop_arr(img, 64)
    assert out.shape == (64, 64, 3)
    # ADM: one BOX halving (200 >= 128), then BICUBIC to short side 64, then the middle crop
    half = img.resize((100, 150), Image.BOX)
    ref = np.asarray(half.resize((64, round(150 * 0.64)), Image.BICUBIC))
    y = (ref.shape[0] - 64) // 2
    np.testing.assert_array_equal(out, ref[y:y + 64])
