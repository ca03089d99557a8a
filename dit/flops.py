"""Parameter and Gflop counts of DiT configs, beside the paper's appendix table.

Counted from the model itself, with nothing allocated: params from `jax.eval_shape` of the init
(plus the frozen 2-D sin-cos position embedding, a buffer in the official model), flops from the
jaxpr of one forward pass at batch 1 -- every dot_general (linears, the attention matmuls QK^T and
AV) and convolution, one multiply-add = one flop as in the paper. Softmax, norms, activations and
other elementwise ops are not counted.

    python -m dit.flops [--json]
"""

from __future__ import annotations

import argparse
import json
import math

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr

from dit.models import MODEL_NAMES, DiT, DiTConfig, dit_config, dummy_inputs, frozen_param_count, param_shapes

# Paper, Table 4 (appendix): (trainable) params in millions and Gflops at 256x256 (latent 32), plus XL/2 at 512.
PAPER = {
    "DiT-S/8": (33, 0.36), "DiT-S/4": (33, 1.41), "DiT-S/2": (33, 6.06),
    "DiT-B/8": (131, 1.42), "DiT-B/4": (130, 5.56), "DiT-B/2": (130, 23.01),
    "DiT-L/8": (459, 5.01), "DiT-L/4": (458, 19.70), "DiT-L/2": (458, 80.71),
    "DiT-XL/8": (676, 7.39), "DiT-XL/4": (675, 29.05), "DiT-XL/2": (675, 118.64),
}
PAPER_512 = ("DiT-XL/2", 64, 675, 524.6)  # name, latent size, params (M), Gflops
# Paper, Table 4: DiT-XL/2 at 256x256 with each block design (Section 3.2 / Figure 5).
PAPER_BLOCKS = {"in_context": (449, 119.37), "cross_attn": (598, 137.62), "adaln": (600, 118.56),
                "adaln_zero": (675, 118.64), "tmsa": (None, None)}


def count_params(config: DiTConfig, include_frozen: bool = True) -> int:
    """All parameters; include_frozen=False leaves out the frozen pos-embed. The paper's params
    column matches the latter (e.g. B/2: 130.3M trainable, 130.5M with the pos-embed; paper 130)."""
    n = sum(math.prod(s.shape) for s in jax.tree.leaves(param_shapes(config)))
    return n + (frozen_param_count(config) if include_frozen else 0)


def _dot_macs(eqn) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs[i] for i in lc)
    batch = math.prod(lhs[i] for i in lb)
    lhs_free = math.prod(d for i, d in enumerate(lhs) if i not in lc and i not in lb)
    rhs_free = math.prod(d for i, d in enumerate(rhs) if i not in rc and i not in rb)
    return batch * contract * lhs_free * rhs_free


def _conv_macs(eqn) -> int:
    out = eqn.outvars[0].aval.shape
    kernel = eqn.invars[1].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec  # (out_feature_dim, in_feature_dim, spatial...)
    per_output = math.prod(kernel) // kernel[spec[0]]  # in_features * spatial (grouping ignored)
    return math.prod(out) * per_output // eqn.params.get("feature_group_count", 1)


def count_macs(jaxpr) -> int:
    """Multiply-adds of every dot_general / conv in a (closed) jaxpr, sub-jaxprs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_macs(eqn)
        elif name == "conv_general_dilated":
            total += _conv_macs(eqn)
        elif name in ("while", "cond"):
            raise NotImplementedError(f"cannot count flops through {name}")
        reps = eqn.params.get("length", 1) if name == "scan" else 1
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(sub, (Jaxpr, ClosedJaxpr)):
                    total += reps * count_macs(sub)
    return total


def count_flops(config: DiTConfig) -> int:
    """Forward flops (multiply-add = 1) of one sample."""
    fn = lambda p, x, t, y: DiT(config).apply({"params": p}, x, t, y)
    return count_macs(jax.make_jaxpr(fn)(param_shapes(config), *dummy_inputs(config)))


def _row(name, latent, block, paper_m, paper_g):
    cfg = dit_config(name, input_size=latent, block=block)
    return {"model": name, "block": block, "image_size": latent * 8, "params": count_params(cfg),
            "trainable": count_params(cfg, include_frozen=False), "gflops": count_flops(cfg) / 1e9, "paper_params_m": paper_m, "paper_gflops": paper_g}


def table(blocks: bool = True) -> list[dict]:
    """The 12 configs at 256, XL/2 at 512, then (blocks=True) XL/2 with each block design."""
    rows = [_row(name, 32, "adaln_zero", *PAPER[name]) for name in MODEL_NAMES]
    rows.append(_row(PAPER_512[0], PAPER_512[1], "adaln_zero", *PAPER_512[2:]))
    if blocks:
        rows += [_row("DiT-XL/2", 32, b, *PAPER_BLOCKS[b]) for b in PAPER_BLOCKS if b != "adaln_zero"]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    rows = table()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("params: all, frozen pos-embed included; trainable: without it (what the paper's column\n"
          "rounds: B/2 130.3M -> 130, XL/2@512 674.8M -> 675). Gflops: forward, batch 1, multiply-add = 1.")
    print(f"{'model':10} {'block':10} {'image':>5} {'params':>13} {'trainable':>13} {'paper M':>7} "
          f"{'Gflops':>9} {'paper':>7} {'diff':>7}")
    for r in rows:
        pm, pg = r["paper_params_m"], r["paper_gflops"]
        diff = f"{100 * (r['gflops'] / pg - 1):+6.2f}%" if pg else "      -"
        print(f"{r['model']:10} {r['block']:10} {r['image_size']:5d} {r['params']:13,d} {r['trainable']:13,d} "
              f"{pm if pm else '-':>7} {r['gflops']:9.2f} {f'{pg:.2f}' if pg else '-':>7} {diff}")


if __name__ == "__main__":
    main()
