"""Weight conversion: facebookresearch/DiT state dicts <-> our Flax params, and -> diffusers.

    python -m dit.convert IN.pt OUT.msgpack [--model DiT-XL/2] [--image-size 256] [--num-classes 1000]

Reads the checkpoint with torch.load(weights_only=True) (no pickle code runs), checks every key and
shape, and writes our params with flax.serialization msgpack. The official code has only the
adaLN-Zero block, so only that block design converts.

Layout differences handled here: torch Linear weights are (out, in), ours (in, out); the patch conv
is (D, C, p, p) there and (p, p, C, D) here (NHWC); the frozen `pos_embed` buffer is not a param
here (it is recomputed), so it is checked against ours instead of copied.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Callable, Mapping

import flax.serialization
import numpy as np

from dit.models import DiTConfig, dit_config, get_2d_sincos_pos_embed

# (official key, our param path, official -> ours transform, ours -> official transform)
Rule = tuple[str, tuple[str, ...], Callable, Callable]
_T = lambda a: np.ascontiguousarray(a.T)
_ID = lambda a: a
_CONV_IN = lambda a: np.ascontiguousarray(a.transpose(2, 3, 1, 0))  # (D, C, p, p) -> (p, p, C, D)
_CONV_OUT = lambda a: np.ascontiguousarray(a.transpose(3, 2, 0, 1))


def _linear(official: str, ours: tuple[str, ...]) -> list[Rule]:
    return [(f"{official}.weight", ours + ("kernel",), _T, _T), (f"{official}.bias", ours + ("bias",), _ID, _ID)]


def official_rules(config: DiTConfig) -> list[Rule]:
    if config.block != "adaln_zero":
        raise ValueError(f"official DiT checkpoints are adaLN-Zero only; config.block={config.block!r}")
    rules: list[Rule] = [
        ("x_embedder.proj.weight", ("x_embedder", "kernel"), _CONV_IN, _CONV_OUT),
        ("x_embedder.proj.bias", ("x_embedder", "bias"), _ID, _ID),
        ("y_embedder.embedding_table.weight", ("y_embedder", "embedding_table"), _ID, _ID),
    ]
    rules += _linear("t_embedder.mlp.0", ("t_embedder", "fc1")) + _linear("t_embedder.mlp.2", ("t_embedder", "fc2"))
    for i in range(config.depth):
        b = f"blocks_{i}"
        rules += _linear(f"blocks.{i}.attn.qkv", (b, "attn", "qkv"))
        rules += _linear(f"blocks.{i}.attn.proj", (b, "attn", "proj"))
        rules += _linear(f"blocks.{i}.mlp.fc1", (b, "mlp", "fc1"))
        rules += _linear(f"blocks.{i}.mlp.fc2", (b, "mlp", "fc2"))
        rules += _linear(f"blocks.{i}.adaLN_modulation.1", (b, "adaLN_modulation"))
    rules += _linear("final_layer.linear", ("final_layer", "linear"))
    rules += _linear("final_layer.adaLN_modulation.1", ("final_layer", "adaLN_modulation"))
    return rules


def _expected_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> shape, derived from our param shapes (no allocation)."""
    from dit.models import param_shapes

    shapes = param_shapes(config)
    out = {}
    for key, path, _, back in official_rules(config):
        leaf = shapes
        for p in path:
            leaf = leaf[p]
        out[key] = back(np.empty(leaf.shape, np.float32)).shape
    out["pos_embed"] = (1, config.num_patches, config.hidden_size)
    return out


def check_official_state_dict(sd: Mapping[str, np.ndarray], config: DiTConfig) -> None:
    """ValueError naming the first misshapen, missing, unexpected or non-finite entry.

    Shapes are checked first: a checkpoint for another model or resolution then names its first
    differing tensor and both shapes, which says more than the first key one model lacks."""
    want = _expected_shapes(config)
    for k, shape in want.items():
        if k in sd and tuple(sd[k].shape) != shape:
            raise ValueError(f"checkpoint key {k!r} has shape {tuple(sd[k].shape)}, expected {shape} "
                             f"(check --model / --image-size / --num-classes)")
    missing = [k for k in want if k not in sd]
    if missing:
        raise ValueError(f"checkpoint is missing key {missing[0]!r} ({len(missing)} missing) for {config}")
    extra = [k for k in sd if k not in want]
    if extra:
        raise ValueError(f"checkpoint has unexpected key {extra[0]!r} ({len(extra)} unexpected)")
    for k in want:
        if not np.isfinite(sd[k]).all():
            raise ValueError(f"checkpoint key {k!r} holds NaN or inf values")


def official_to_params(sd: Mapping[str, np.ndarray], config: DiTConfig) -> dict:
    """An official state dict (numpy arrays) -> our float32 param tree."""
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    check_official_state_dict(sd, config)
    pos = get_2d_sincos_pos_embed(config.hidden_size, config.grid_size).astype(np.float32)
    if not np.allclose(sd["pos_embed"][0], pos, atol=1e-5):
        raise ValueError("checkpoint key 'pos_embed' differs from the 2-D sin-cos embedding this code "
                         "computes (a different grid or ordering)")
    params: dict = {}
    for key, path, fwd, _ in official_rules(config):
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = fwd(sd[key])
    return params


def params_to_official(params, config: DiTConfig) -> dict[str, np.ndarray]:
    """Our params -> an official state dict (with the pos_embed buffer)."""
    sd = {}
    for key, path, _, back in official_rules(config):
        leaf = params
        for p in path:
            leaf = leaf[p]
        sd[key] = back(np.asarray(leaf, np.float32))
    sd["pos_embed"] = get_2d_sincos_pos_embed(config.hidden_size, config.grid_size).astype(np.float32)[None]
    return sd


def official_to_diffusers(sd: Mapping[str, np.ndarray], config: DiTConfig) -> dict[str, np.ndarray]:
    """Official state dict -> diffusers DiTTransformer2DModel state dict (for parity tests).

    diffusers keeps a copy of the shared timestep/label embedders in every block (only block 0's is
    used) and splits the fused qkv into to_q / to_k / to_v; its pos_embed is a non-persistent buffer.
    """
    check_official_state_dict(sd, config)
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"]}
    for i in range(config.depth):
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[d + f"norm1.emb.timestep_embedder.linear_1.{part}"] = sd[f"t_embedder.mlp.0.{part}"]
            out[d + f"norm1.emb.timestep_embedder.linear_2.{part}"] = sd[f"t_embedder.mlp.2.{part}"]
            out[d + f"norm1.linear.{part}"] = sd[o + f"adaLN_modulation.1.{part}"]
            q, k, v = np.split(np.asarray(sd[o + f"attn.qkv.{part}"]), 3, axis=0)
            out[d + f"attn1.to_q.{part}"], out[d + f"attn1.to_k.{part}"], out[d + f"attn1.to_v.{part}"] = q, k, v
            out[d + f"attn1.to_out.0.{part}"] = sd[o + f"attn.proj.{part}"]
            out[d + f"ff.net.0.proj.{part}"] = sd[o + f"mlp.fc1.{part}"]
            out[d + f"ff.net.2.{part}"] = sd[o + f"mlp.fc2.{part}"]
        out[d + "norm1.emb.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    for part in ("weight", "bias"):
        out[f"proj_out_1.{part}"] = sd[f"final_layer.adaLN_modulation.1.{part}"]
        out[f"proj_out_2.{part}"] = sd[f"final_layer.linear.{part}"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def read_official_checkpoint(path: str) -> tuple[dict[str, np.ndarray], str]:
    """torch.load(weights_only=True) an official checkpoint; returns (state dict, where it was found).

    Accepts a bare state dict (the released DiT-XL-2-*.pt files: "state_dict") or a dict holding one
    under "ema" (preferred: the weights the paper samples from) or "model", as train.py saves them.
    Any other layout, or a file that needs pickle to load, is a ValueError of one line."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # needs pickle (a custom class, train.py's argparse "args"), or not a torch file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) (no pickle code runs): "
                         f"{first}. Save the state dict alone, e.g. torch.save(ckpt['ema'], ...), and retry") from e
    taken = "state_dict"
    if isinstance(obj, dict):
        for key in ("ema", "model"):
            if isinstance(obj.get(key), dict):
                obj, taken = obj[key], key
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected a state dict (name -> tensor) or a dict holding one under "
                         f"'ema' or 'model', got {type(obj).__name__}")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(f"{path}: not a state dict: entry {bad!r} is {type(obj[bad]).__name__}, not a tensor")
    return {k: v.detach().float().numpy() for k, v in obj.items()}, taken


def load_official_checkpoint(path: str) -> dict[str, np.ndarray]:
    """The state dict of an official checkpoint (see read_official_checkpoint)."""
    return read_official_checkpoint(path)[0]


def save_params(params, path: str) -> None:
    """msgpack (no pickle), written atomically: a killed run leaves the old file or none."""
    data = flax.serialization.msgpack_serialize(params)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".msgpack")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_params(path: str, config: DiTConfig):
    """Read params written by save_params, checked against config's param shapes."""
    import jax

    from dit.models import param_shapes

    with open(path, "rb") as f:
        raw = flax.serialization.msgpack_restore(f.read())
    want = param_shapes(config)
    got_paths = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(raw)}
    for p, leaf in jax.tree_util.tree_leaves_with_path(want):
        k = jax.tree_util.keystr(p)
        if k not in got_paths:
            raise ValueError(f"{path}: missing param {k}")
        if tuple(got_paths[k]) != tuple(leaf.shape):
            raise ValueError(f"{path}: param {k} has shape {got_paths[k]}, expected {leaf.shape}")
    if len(got_paths) != len(jax.tree.leaves(want)):
        extra = sorted(set(got_paths) - {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(want)})
        raise ValueError(f"{path}: unexpected param {extra[0]}")
    return raw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Convert a facebookresearch/DiT checkpoint to Flax msgpack params.")
    ap.add_argument("input", help="official .pt state dict")
    ap.add_argument("output", help="output .msgpack")
    ap.add_argument("--model", default="DiT-XL/2", help="model name, e.g. DiT-XL/2")
    ap.add_argument("--image-size", type=int, default=256, help="image size; the latent is 1/8 of it")
    ap.add_argument("--num-classes", type=int, default=1000)
    args = ap.parse_args(argv)
    try:
        if args.image_size % 8:
            raise ValueError(f"--image-size={args.image_size} must be a multiple of 8 (the VAE factor)")
        config = dit_config(args.model, input_size=args.image_size // 8, num_classes=args.num_classes)
        if not os.path.isfile(args.input):
            raise ValueError(f"input checkpoint {args.input!r} does not exist")
        params = official_to_params(load_official_checkpoint(args.input), config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_params(params, args.output)
    n = sum(v.size for v in (np.asarray(x) for x in _leaves(params)))
    print(f"wrote {args.output}: {args.model} at {args.image_size}px, {n:,} params")
    return 0


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else (v,))


if __name__ == "__main__":
    sys.exit(main())
