"""The data stage's tfds source: find (or prepare) the dataset, or say in one line why it cannot.

`imagenet2012` the way JAX/TPU labs keep it: prepared once by tensorflow-datasets into a `data_dir`
(often gs://), or prepared here from the official tars in `manual_dir`.
"""

from __future__ import annotations

from stages.runtime.common import fail


def check_paths(data_dir: str | None, manual_dir: str | None) -> None:
    """One line naming the param when a data_dir or manual_dir cannot be reached (a remote one is asked as
    tfds will ask it, within pipelines.storage.REMOTE_TIMEOUT_S)."""
    from pipelines import storage
    from pipelines.sources import tfds_path_exists

    if any(storage.scheme(str(p)) not in ("", "file") for p in (data_dir, manual_dir) if p):
        import tensorflow  # noqa: F401  (the client loads before the deadline starts: seconds on a busy CPU)
        from etils import epath  # noqa: F401
    for param, path in (("data.data_dir", data_dir), ("data.manual_dir", manual_dir)):
        if path:
            try:
                storage.check_reachable(str(path), param, exists=tfds_path_exists)
            except storage.StorageError as e:
                fail(str(e))


def index_tfds(cfg: dict):
    """(spec, class names, iterator of (position, tfds id, label, image bytes)) for `data.split`."""
    import tensorflow_datasets as tfds

    from pipelines.sources import iter_tfds
    from pipelines.storage import first_line

    name, split, data_dir, manual_dir = cfg["tfds_name"], cfg["split"], cfg["data_dir"], cfg["manual_dir"]
    if not isinstance(name, str) or not name:
        fail(f"data.tfds_name: expected a tensorflow-datasets name, got {name!r}")
    check_paths(data_dir, manual_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except tfds.core.registered.DatasetNotFoundError:
        fail(f"data.tfds_name: '{name}' is not a tensorflow-datasets dataset")
    except Exception as e:  # the data_dir answered the check but not tfds (permissions on a sub-folder, ...)
        fail(f"data.data_dir: cannot open {name} under '{data_dir}' ({type(e).__name__}: {first_line(e)})")
    if not prepared:
        if not manual_dir:
            fail(f"data.data_dir: {name} is not prepared under '{builder.data_dir}'; point data.data_dir at a "
                 "prepared copy or set data.manual_dir to the folder holding the official archives")
        from etils import epath

        manual = epath.Path(manual_dir).expanduser()
        if not manual.is_dir():
            fail(f"data.manual_dir: '{manual_dir}' is not a folder")
        config = tfds.download.DownloadConfig(manual_dir=str(manual))
        try:
            builder.download_and_prepare(download_config=config)
        except Exception as e:  # tfds: "manual_dir lacks X.tar"; a data_dir it cannot write
            fail(f"data.manual_dir: cannot prepare {name} from '{manual_dir}' into '{builder.data_dir}' "
                 f"({type(e).__name__}: {first_line(e)})")
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
