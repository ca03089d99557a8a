"""pretrained: a released facebookresearch/DiT checkpoint as the checkpoint layout sample and audit read.

    python -m stages.pretrained PT OUT_DIR [--model DiT-XL/2] [--image-size 256] [--num-classes 1000]
    python -m stages.pretrained [--params PATH] [--set pretrained.KEY=VALUE]   # the DVC stage

As a DVC stage (released/dvc.yaml) it reads `pretrained.{path, model, image_size, num_classes}` and writes
artifacts/checkpoints, the folder the sample stage and the audit read.

PT is an official `.pt` (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt, or a train.py checkpoint saved
without its argparse args) read with torch.load(weights_only=True): no pickle code runs. Every key and
shape is checked against the config the flags name before anything is written; the released files
carry no config, so a 512 px file given as --image-size 256 is refused naming `pos_embed` and both
shapes. OUT_DIR gets, atomically (a failed run leaves the old folder or none):
- orbax/0/{ema,meta}: the weights as the Orbax item stages.runtime.checkpoint.restore_ema reads (step 0), and
  their checksums (stages/runtime/integrity.py) in meta. No `state`
  item: a released file has no optimizer state, and sampling restores the EMA alone;
- model.json: the keys the train stage writes (dit config, VAE scaling factor, classes, learn_sigma,
  diffusion steps, final_step 0);
- manifest.json: the source file's sha256 (as an input the audit rehashes, so an edited file is named),
  which entry was taken (ema / model / a bare state dict), ema_sha256 and final_step.
The written checkpoint is restored and its hash compared before the folder is put in place.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from stages.runtime.common import Manifest, atomic_dir, fail, main_guard, sha256_file, tree_sha256, write_json

# The released models were trained on sd-vae-ft-ema/-mse latents scaled by this (official sample.py).
SCALING_FACTOR = 0.18215
DIFFUSION_STEPS = 1000


def convert_checkpoint(pt_path, model_name: str | None, image_size: int, num_classes: int = 1000,
                       **overrides):
    """Load and check an official checkpoint -> (DiTConfig, our params, info).

    model_name is a paper name ("DiT-XL/2"); None with `overrides` (depth, hidden_size, ...) builds a
    custom config, as the tests do. ValueError, naming the key and shapes, on any mismatch."""
    from dit import convert
    from dit.models import dit_config

    if not isinstance(image_size, int) or image_size < 8 or image_size % 8:
        raise ValueError(f"image size {image_size!r} must be a positive multiple of 8 (the VAE factor)")
    config = dit_config(model_name, input_size=image_size // 8, num_classes=num_classes, **overrides)
    path = Path(pt_path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    source_sha256 = sha256_file(path)
    sd, taken = convert.read_official_checkpoint(str(path))
    try:
        params = convert.official_to_params(sd, config)
    except ValueError as e:
        raise ValueError(f"{path} does not fit {model_name or 'the config'} at {image_size} px "
                         f"({num_classes} classes): {e}") from e
    n = sum(int(v.size) for k, v in sd.items() if k != "pos_embed")  # pos_embed is recomputed, not a param
    info = {"source": path.as_posix(), "source_sha256": source_sha256, "taken": taken, "num_params": n}
    return config, params, info


def model_info(config, num_classes: int) -> dict:
    """model.json as the train stage writes it. Labels are ImageNet class indices: index i is the i-th
    synset in sorted order, the same order the data stage gives an ImageFolder."""
    return {"dit": dataclasses.asdict(config), "scaling_factor": SCALING_FACTOR,
            "classes": [str(i) for i in range(num_classes)], "learn_sigma": config.learn_sigma,
            "diffusion_steps": DIFFUSION_STEPS, "final_step": 0}


def export(pt_path, out_dir, model_name: str | None, image_size: int, num_classes: int = 1000,
           **overrides) -> dict:
    """convert_checkpoint, then write OUT_DIR (see the module doc); returns the manifest.
    StageError (one line) on bad input; nothing is written then."""
    try:
        config, params, info = convert_checkpoint(pt_path, model_name, image_size, num_classes, **overrides)
    except ValueError as e:
        fail(str(e))

    import jax
    import orbax.checkpoint as ocp

    from dit.sharding import make_mesh
    from stages.runtime import checkpoint
    from stages.runtime.integrity import checksums, sealed

    params = jax.tree.map(jax.numpy.asarray, params)
    ema_sha256 = tree_sha256(params)
    manifest = Manifest("pretrained", {"pretrained": {
        "model": model_name, "image_size": image_size, "num_classes": num_classes, **overrides}})
    # The file was hashed once in convert_checkpoint; recorded as an input so the audit rehashes it.
    manifest.inputs["source"] = info["source_sha256"]
    manifest.input_paths["source"] = {"path": info["source"], "exclude": []}
    with atomic_dir(Path(out_dir)) as tmp:
        mgr = checkpoint.manager(tmp, create=True)
        meta = sealed({"checksums": {"ema": checksums(params)}})  # as the trainer's steps carry them
        mgr.save(0, args=ocp.args.Composite(ema=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
        mgr.wait_until_finished()
        mgr.close()
        restored = checkpoint.restore_ema(checkpoint.manager(tmp), 0, config, make_mesh(-1, 1))
        if tree_sha256(restored) != ema_sha256:
            fail(f"{out_dir}: the written checkpoint does not restore to the converted weights")
        write_json(tmp / "model.json", model_info(config, num_classes))
        manifest.counts = {"params": info["num_params"]}
        manifest.extra.update({"source_sha256": info["source_sha256"], "taken": info["taken"],
                               "ema_sha256": ema_sha256, "final_step": 0})
        doc = manifest.write(tmp)
    return doc


def stage_main(argv: list[str]) -> None:
    """The DVC stage: params instead of arguments, artifacts/checkpoints as the output."""
    from stages.runtime.common import load_params

    params = load_params("pretrained", argv, __doc__)
    cfg = params["pretrained"]
    if not isinstance(cfg["path"], str) or not cfg["path"]:
        fail(f"pretrained.path: expected the .pt file's path, got {cfg['path']!r}")
    # a paper name ("DiT-XL/2"), or {depth, hidden_size, num_heads, patch_size} for a custom size
    model, custom = (cfg["model"], {}) if isinstance(cfg["model"], str) else (None, cfg["model"])
    if not isinstance(custom, dict) or (model is None and not custom):
        fail(f"pretrained.model: expected a name like DiT-XL/2 or a mapping of depth, hidden_size, "
             f"num_heads, patch_size; got {cfg['model']!r}")
    for key in ("image_size", "num_classes"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            fail(f"pretrained.{key}: expected a positive integer, got {cfg[key]!r}")
    try:
        from dit.models import dit_config

        dit_config(model, **custom)
    except (ValueError, TypeError) as e:
        fail(f"pretrained.model: {e}")
    if not Path(cfg["path"]).expanduser().is_file():
        fail(f"pretrained.path: '{cfg['path']}' does not exist")
    out = Path("artifacts/checkpoints")
    doc = export(Path(cfg["path"]).expanduser(), out, model, cfg["image_size"], cfg["num_classes"], **custom)
    print(f"pretrained: {cfg['path']} ({doc['taken']}, sha256 {doc['source_sha256'][:12]}) -> {out}")


def main(argv: list[str]) -> None:
    if not argv or argv[0].startswith("--params") or argv[0].startswith("--set"):
        return stage_main(argv)
    ap = argparse.ArgumentParser(prog="python -m stages.pretrained", description=__doc__.split("\n")[0])
    ap.add_argument("pt", help="official .pt checkpoint (e.g. DiT-XL-2-256x256.pt)")
    ap.add_argument("out_dir", help="output folder (e.g. artifacts/checkpoints)")
    ap.add_argument("--model", default="DiT-XL/2", help="paper model name (default DiT-XL/2)")
    ap.add_argument("--image-size", type=int, default=256, help="image size in pixels: 256 or 512")
    ap.add_argument("--num-classes", type=int, default=1000)
    args = ap.parse_args(argv)
    try:
        from dit.models import dit_config

        dit_config(args.model)
    except ValueError as e:
        fail(f"--model: {e}")
    doc = export(args.pt, args.out_dir, args.model, args.image_size, args.num_classes)
    print(f"pretrained: {args.pt} ({doc['taken']}, sha256 {doc['source_sha256'][:12]}) -> {args.out_dir}: "
          f"{args.model} at {args.image_size} px, {doc['counts']['params']:,} params")


if __name__ == "__main__":
    main_guard(main)
