"""The data stage's tfds source: find (or prepare) the dataset, or say in one line why it cannot.

`imagenet2012` the way JAX/TPU labs keep it: prepared once by tensorflow-datasets into a `data_dir`
(often gs://), or prepared here from the official tars in `manual_dir`.
"""

from __future__ import annotations

from pathlib import Path

from stages.common import fail


def index_tfds(cfg: dict):
    """(spec, class names, iterator of (position, tfds id, label, image bytes)) for `data.split`."""
    import tensorflow_datasets as tfds

    from pipelines import storage
    from pipelines.sources import iter_tfds

    name, split, data_dir, manual_dir = cfg["tfds_name"], cfg["split"], cfg["data_dir"], cfg["manual_dir"]
    if not isinstance(name, str) or not name:
        fail(f"data.tfds_name: expected a tensorflow-datasets name, got {name!r}")
    if data_dir:
        try:
            storage.check_reachable(data_dir, "data.data_dir")
        except storage.StorageError as e:
            fail(str(e))
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        fail(f"data.tfds_name: '{name}' is not a tensorflow-datasets dataset")
    if not builder.is_prepared():
        if not manual_dir:
            fail(f"data.data_dir: {name} is not prepared under '{builder.data_dir}'; point data.data_dir at a "
                 "prepared copy or set data.manual_dir to the folder holding the official archives")
        if not Path(manual_dir).expanduser().is_dir():
            fail(f"data.manual_dir: '{manual_dir}' is not a folder")
        config = tfds.download.DownloadConfig(manual_dir=str(Path(manual_dir).expanduser()))
        try:
            builder.download_and_prepare(download_config=config)
        except (AssertionError, FileNotFoundError, ValueError) as e:  # tfds: "manual_dir lacks X.tar"
            fail(f"data.manual_dir: cannot prepare {name} from '{manual_dir}': {str(e).splitlines()[0]}")
    features = builder.info.features
    image_key, label_key = "image", "label"
    if image_key not in features or label_key not in features or not hasattr(features[label_key], "names"):
        fail(f"data.tfds_name: '{name}' has no image + class label features (has {sorted(features)})")
    known = list(builder.info.splits)
    if known and split not in known:
        fail(f"data.split: '{split}' is not a split of {name} (splits: {', '.join(sorted(known))})")
    limit = cfg["limit"]
    spec = {"name": name, "split": split, "data_dir": data_dir, "image_key": image_key,
            "label_key": label_key, "version": str(builder.version)}
    stop = limit
    if known and limit is not None:  # a slice past the end of a split is an error in tfds
        stop = min(limit, builder.info.splits[split].num_examples)
    return spec, list(features[label_key].names), iter_tfds(spec, 0, stop)
