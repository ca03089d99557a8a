"""Where the encode job's images come from: work units that any Beam worker can read on its own.

A unit names its images without holding them, so a runner ships a few bytes per unit to its workers:
- ("files", [(index, path, label, key[, sha256]), ...]): one VAE batch of image files on any Beam
  FileSystem; with the sha256 the data stage recorded, a file whose bytes changed since is skipped;
- ("tfds", spec, start, stop): positions [start, stop) of a tensorflow-datasets split, read in order
  (interleave cycle 1, no file shuffling) so position p is always the same example. `spec` is the data
  index's `tfds` entry: {name, split, data_dir, num_examples, image_key, label_key}.
Units cover whole VAE batches (batch = index // batch_size), so each batch is encoded in one call
whatever the runner does with the units.
"""

from __future__ import annotations

from typing import Iterator

from pipelines.images import changed_since_indexed

TFDS_CHUNK_BATCHES = 16  # batches per tfds unit: few units, and little reading to skip into a file


def file_units(items: list[tuple], batch_size: int) -> list[tuple]:
    """Group (index, path, label, key[, sha256]) items into one unit per VAE batch."""
    batches: dict[int, list] = {}
    for item in items:
        batches.setdefault(item[0] // batch_size, []).append(tuple(item))
    return [("files", batches[b]) for b in sorted(batches)]


def tfds_units(spec: dict, batch_size: int, chunk_batches: int | None = None) -> list[tuple]:
    step = batch_size * (chunk_batches or TFDS_CHUNK_BATCHES)
    n = spec["num_examples"]
    return [("tfds", dict(spec), a, min(a + step, n)) for a in range(0, n, step)]


def tfds_path_exists(path: str) -> bool:
    """Whether a data_dir or manual_dir exists, asked as tensorflow-datasets asks (etils' epath: TensorFlow's
    own GCS client for gs://), so a check before the job meets the failures the job would meet."""
    from etils import epath

    return epath.Path(path).exists()


def open_builder(spec: dict):
    import tensorflow_datasets as tfds

    return tfds.builder(spec["name"], data_dir=spec.get("data_dir"))


def iter_tfds(spec: dict, start: int, stop: int | None) -> Iterator[tuple[int, str, int, bytes]]:
    """(position, tfds id, label, encoded image bytes) for positions [start, stop) of the split
    (stop None: to its end)."""
    import tensorflow_datasets as tfds

    builder = open_builder(spec)
    image_key, label_key = spec.get("image_key", "image"), spec.get("label_key", "label")
    ds = builder.as_dataset(
        split=f"{spec['split']}[{start}:{'' if stop is None else stop}]", shuffle_files=False,
        read_config=tfds.ReadConfig(add_tfds_id=True, interleave_cycle_length=1),
        decoders={image_key: tfds.decode.SkipDecoding()})  # the JPEG bytes: PIL decodes as for files
    for offset, ex in enumerate(ds.as_numpy_iterator()):
        yield start + offset, ex["tfds_id"].decode(), int(ex[label_key]), bytes(ex[image_key])
        if stop is not None and start + offset + 1 >= stop:  # a split that yields more than asked (never on real data)
            return


def read_unit(unit: tuple) -> Iterator[tuple[int, str, int, bytes | None, str | None]]:
    """(index, key, label, image bytes or None, reason it could not be read or None) per example."""
    if unit[0] == "files":
        from pipelines import storage

        for index, path, label, key, *sha in sorted(unit[1]):
            try:
                data = storage.read_bytes(path)
            except Exception as e:  # the file went away or is unreadable since the data stage ran
                yield index, key, label, None, f"cannot read: {type(e).__name__}: {e}"
                continue
            changed = changed_since_indexed(data, *sha)
            yield index, key, label, None if changed else data, changed
    elif unit[0] == "tfds":
        _, spec, start, stop = unit
        for index, key, label, data in iter_tfds(spec, start, stop):
            yield index, key, label, data, None
    else:
        raise ValueError(f"unknown work unit kind {unit[0]!r}")
