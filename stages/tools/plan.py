"""The TPU plan: compile the train step, the sample chunk and Inception's feature call for a Cloud TPU
topology on this machine (no TPU needed, libtpu compiles), and say per chip whether each fits and what
it can do.

    python -m stages.plan --topology v5e:16x16 [--params params-imagenet.yaml] [--num-slices N]
                          [--set train.mesh.fsdp=16 ...] [--num-classes 1000] [--stages train,sample,inception]
                          [--out plan.json]

Each program is built as its stage builds it, by the same functions: the train step by
stages.runtime.train_step.build (model, optimizer, abstract state and shardings on a (data, fsdp) mesh of
the topology's devices, the platform's compile options), the sample chunk by stages.runtime.sampler
(guided denoising and the VAE decode, one chunk per device), Inception by metrics.inception.programs. It
needs only the params file: the latent shape comes from data.image_size and the VAE config (vae.pretrained's
config.json when that folder is here, else the SD VAE's architecture), the classes from --num-classes.

Per chip and per program it prints peak HBM against the chip's, the argument bytes (the train state's
share of them shows that fsdp applied), compiled flops against the model's, HBM bytes accessed, the
bytes the collectives move, and a roofline bound on the step time (max of flops / peak and bytes / HBM
bandwidth) with the MFU it allows. Exit 0 when everything fits, 3 when a program does not (named, with the
shortfall and what would make it fit), 2 for bad input. docs/tpu.md says how to read it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from stages.runtime.common import StageError, declared_params, fail, load_params, write_json

STAGES = ("train", "sample", "inception")
GIB = 1 << 30
SD_VAE = "the SD VAE's architecture (vae.pretrained is not here)"
# HLO collectives and the bytes each moves per chip: the size of its result (all-gather, all-reduce,
# collective-permute, all-to-all) or of its operand (reduce-scatter, whose result is the smaller shard)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}


def use_libtpu(topology=None) -> None:
    """Before jax is imported: CPU as JAX's backend (the plan compiles for TPU without running there), and
    libtpu from `.venv/libtpu` where make put it, out of every stage's way (a libtpu on the path makes
    each `import jax` try a TPU first). No TPU is used, so several plans may load libtpu at once (it
    otherwise takes a machine-wide lock); the slice planned for is what libtpu is told it runs on."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask: this is not a TPU VM
    if topology is not None:
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.accelerator_type)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", ",".join(["localhost"] * topology.hosts))
    side = Path(sys.prefix) / "libtpu"
    if side.is_dir() and str(side) not in sys.path:
        sys.path.insert(0, str(side))


# ------------------------------------------------------------------------------------------------ inputs


def read_params(path: str, sets: list[str]) -> dict:
    """The train, sample and evaluate stages' params (each as the stage reads them), with each --set given to
    the stages that declare its key; a key no stage declares is one line naming it."""
    dvc_yaml = Path(path).resolve().parent / "dvc.yaml"
    from stages.runtime.common import ROOT

    dvc_yaml = dvc_yaml if dvc_yaml.is_file() else ROOT / "dvc.yaml"
    out = {}
    for stage in ("train", "sample", "evaluate"):
        keys = declared_params(stage, dvc_yaml)
        mine = [s for s in sets if any(s.split("=", 1)[0] == k or s.startswith(k + ".") for k in keys)]
        out.update(load_params(stage, ["--params", path] + [a for s in mine for a in ("--set", s)]))
    for s in sets:
        key = s.split("=", 1)[0]
        if not any(key == k or key.startswith(k + ".") for k in _declared(dvc_yaml)):
            fail(f"--set {key}: not a param of the train, sample or evaluate stage")
    return out


def _declared(dvc_yaml: Path) -> list[str]:
    return [k for stage in ("train", "sample", "evaluate") for k in declared_params(stage, dvc_yaml)]


def vae_config(path: str):
    """(VAEConfig, image size, where it came from) from the params file's vae and data sections."""
    import yaml

    from dit.vae import VAEConfig

    doc = yaml.safe_load(Path(path).read_text()) or {}
    vae, size = doc.get("vae") or {}, (doc.get("data") or {}).get("image_size")
    if not isinstance(size, int) or size < 8:
        fail(f"data.image_size: expected an image size in pixels in {path}, got {size!r}")
    if vae.get("pretrained"):
        folder = Path(str(vae["pretrained"])).expanduser()
        for cfg in (folder / "config.json", folder / "vae" / "config.json"):
            if cfg.is_file():
                return VAEConfig.from_diffusers(json.loads(cfg.read_text())), size, str(cfg)
        return VAEConfig(), size, SD_VAE
    keys = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups")
    try:
        return VAEConfig(**{k: vae[k] for k in keys}), size, f"{path}: vae.*"
    except (KeyError, TypeError, ValueError) as e:
        fail(f"vae: cannot build the VAE config from {path} ({e})")


# ------------------------------------------------------------------------------------------------ analysis


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes each kind of collective moves per chip in a compiled HLO module (async pairs counted once,
    at their start)."""
    out = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (.+?) (all-gather|all-reduce|reduce-scatter|collective-permute|"
                     r"all-to-all)(-start)?\((.*)", line)
        if not m:
            continue
        kind, shapes = m.group(2), m.group(1) if m.group(2) != "reduce-scatter" else m.group(4)
        out[kind] += sum(DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
                         for dt, dims in re.findall(r"\b(f32|bf16|f16|s32|u32|s8|u8|pred|f64|s64)\[([\d,]*)\]",
                                                    shapes))
    return {k: v for k, v in out.items() if v}


def jaxpr_macs(fn, *args) -> int:
    """Multiply-adds of the dot_generals and convolutions in fn's jaxpr (nested jaxprs included): the
    model's own count, independent of what XLA compiles."""
    import jax

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                a = eqn.invars[0].aval.shape
                total += math.prod(eqn.outvars[0].aval.shape) * math.prod(a[i] for i in lc)
            elif name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape  # HWIO
                total += math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs[:-1])
            for sub in jax.core.jaxprs_in_params(eqn.params):
                total += count(sub)
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def analyse(name: str, lowered, chip, model_flops: float, peak: float, extra: dict, dump: Path | None = None) -> dict:
    """Compile `lowered` and measure it; a program that does not fit is reported, not raised. `dump`: a
    folder for the compiled program's HLO text (--dump)."""
    t = time.time()
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA refuses a program over the chip's HBM: RESOURCE_EXHAUSTED
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "exceed" not in text:
            raise
        need = re.search(r"\(([\d.]+)G\) exceeds? available HBM \(([\d.]+)G\)", text)
        return {"stage": name, "fits": False, "compile_s": round(time.time() - t, 1),
                "error": text.strip().splitlines()[0][:400],
                "temporaries_gib": float(need.group(1)) if need else None,
                "available_gib": float(need.group(2)) if need else chip.hbm_gib, **extra}
    compile_s = time.time() - t
    hlo = compiled.as_text()
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{name}.hlo.txt").write_text(hlo)
    loops = len(re.findall(r"\bwhile\(", hlo))
    mem, cost = compiled.memory_analysis(), compiled.cost_analysis() or {}
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    flops = extra.pop("flops_override", flops)
    peak_bytes = getattr(mem, "peak_memory_in_bytes", 0) or (
        mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    t_flops, t_hbm = flops / (peak * 1e12), accessed / (chip.hbm_gbps * 1e9)
    bound = max(t_flops, t_hbm)
    return {
        "stage": name, "fits": peak_bytes <= chip.hbm_gib * GIB, "compile_s": round(compile_s, 1),
        "peak_gib": peak_bytes / GIB, "hbm_gib": chip.hbm_gib, "margin_gib": chip.hbm_gib - peak_bytes / GIB,
        "argument_gib": mem.argument_size_in_bytes / GIB, "temporaries_gib": mem.temp_size_in_bytes / GIB,
        "output_gib": mem.output_size_in_bytes / GIB,
        "compiled_tflop": flops / 1e12, "model_tflop": model_flops / 1e12,
        "flops_ratio": flops / model_flops if model_flops else None,
        "bytes_accessed_gb": accessed / 1e9, "while_loops": loops,
        "collectives_gb": {k: v / 1e9 for k, v in collective_bytes(hlo).items()},
        "bound_ms": bound * 1e3, "bound_by": "flops" if t_flops >= t_hbm else "HBM bandwidth",
        "flops_ms": t_flops * 1e3, "hbm_ms": t_hbm * 1e3, "peak_tflops": peak,
        # model flops, or the compiled ones where XLA counts fewer (Inception's convolutions on TPU): never over 1
        "mfu_bound": min(model_flops, flops) / (bound * peak * 1e12) if bound else None, **extra}


# ------------------------------------------------------------------------------------------------ programs


def plan_train(params: dict, devices, chip, latent_shape, num_classes: int, scale: float, dump=None) -> dict:
    import jax
    import jax.numpy as jnp

    from dit.flops import count_flops
    from dit.sharding import make_mesh
    from stages.runtime.checkpoint import tree_bytes
    from stages.runtime.train_step import build, check_params

    cfg = params["train"]
    check_params(cfg)
    try:
        mesh = make_mesh(cfg["mesh"]["data"], cfg["mesh"]["fsdp"], devices)
    except ValueError as e:
        fail(f"{e} (train.mesh; the topology has {len(devices)} chips)")
    B = cfg["global_batch_size"]
    if B % len(devices):
        fail(f"train.global_batch_size: {B} is not divisible by the topology's {len(devices)} chips")
    setup = build(cfg, params["seed"], latent_shape, num_classes, scale, mesh)
    lowered = setup.jit_step().lower(setup.abstract_state, setup.abstract_batch(),
                                     jax.ShapeDtypeStruct((), jnp.int32))
    leaves = jax.tree.leaves(setup.abstract_state)
    state = tree_bytes(setup.abstract_state)
    per_chip = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
    fsdp = mesh.shape["fsdp"]
    slices = {getattr(d, "slice_index", 0) for d in devices}
    spans = len(slices) > 1 and any(len({getattr(d, "slice_index", 0) for d in row}) > 1
                                    for row in mesh.devices.reshape(-1, fsdp))
    extra = {"mesh": dict(mesh.shape), "remat": cfg["remat"], "per_chip_batch": B // len(devices),
             "state_gib": state / GIB, "state_gib_over_fsdp": state / fsdp / GIB,
             "state_gib_per_chip": per_chip / GIB, "fsdp_spans_slices": spans,
             "hosts_rows_contiguous": hosts_rows_contiguous(setup.x_shard, B)}
    model = 2 * count_flops(setup.config) * 3 * (B // len(devices))
    return analyse("train", lowered, chip, model, chip.bf16 if cfg["dtype"] == "bfloat16" else chip.f32, extra, dump)


def hosts_rows_contiguous(x_shard, global_batch: int) -> bool:
    """Every host's rows of the global batch are one contiguous range (the loader reads rows [lo, hi))."""
    from stages.runtime.train_step import host_rows

    try:
        for p in sorted({d.process_index for d in x_shard.mesh.devices.flat}):
            host_rows(x_shard, global_batch, p)
    except ValueError:
        return False
    return True


def plan_sample(params: dict, devices, chip, latent_shape, num_classes: int, vae_cfg, scale: float,
                dump=None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import SingleDeviceSharding

    from dit import vae as vae_lib
    from dit.diffusion import create_diffusion
    from dit.flops import count_flops
    from dit.models import DiT, param_shapes
    from dit.sharding import batch_sharding, make_mesh, replicated_abstract
    from stages.runtime.sampler import build_sampler, check_params, chunk_program
    from stages.runtime.train_step import model_config

    cfg = params["sample"]
    check_params(cfg, num_classes)
    try:
        diffusion = create_diffusion(timestep_respacing=str(cfg["num_sampling_steps"]), learn_sigma=True)
    except (ValueError, KeyError) as e:
        fail(f"sample.num_sampling_steps: {e}")
    config = model_config(params["train"], latent_shape, num_classes)  # the model the train stage makes
    mesh = make_mesh(-1, 1, devices)
    vae = vae_lib.AutoencoderKL(vae_cfg)
    per_device, n = cfg["batch_size"], mesh.size
    body = chunk_program(DiT(config), vae, diffusion, cfg, scale, latent_shape)
    ema = replicated_abstract(mesh, param_shapes(config))
    side = latent_shape[0] * vae_cfg.downsample_factor
    vae_tree = jax.eval_shape(lambda k: vae.init(k, jnp.zeros((1, side, side, 3)), k)["params"], jax.random.key(0))
    vae_params = replicated_abstract(mesh, vae_tree)
    shard = batch_sharding(mesh)
    keys = jax.ShapeDtypeStruct((n * per_device, 2), np.uint32, sharding=shard)
    labels = jax.ShapeDtypeStruct((n * per_device,), np.int32, sharding=shard)
    lowered = build_sampler(body, mesh).lower(ema, vae_params, keys, labels)
    # XLA's cost analysis counts a while loop's body once: the denoising loop is scaled by its steps, its
    # body being the chunk's flops less the decode's (compiled on its own, one device)
    z = jax.ShapeDtypeStruct((per_device, *latent_shape), jnp.float32)
    plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), vae_params)
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode)).lower(
        *jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=SingleDeviceSharding(devices[0])),
                      (plain, z)))
    decode_flops = float((decode.compile().cost_analysis() or {}).get("flops", 0.0))
    steps, guided = diffusion.num_timesteps, cfg["cfg_scale"] > 1.0
    model = 2 * count_flops(config) * (2 if guided else 1) * per_device * steps
    rows = hosts_chunks_once(shard, n, per_device)
    report = analyse("sample", lowered, chip, model, chip.bf16 if config.dtype == "bfloat16" else chip.f32,
                     {"per_device_batch": per_device, "sampling_steps": steps, "guided": guided,
                      "decode_tflop": decode_flops / 1e12, "hosts_chunks_once": rows}, dump)
    if report["fits"] and "compiled_tflop" in report:  # the loop counted once: scale it by the steps
        loop = report["compiled_tflop"] * 1e12 - decode_flops
        total = decode_flops + steps * loop
        report.update(compiled_tflop_as_counted=report["compiled_tflop"], compiled_tflop=total / 1e12)
        report["flops_ratio"] = (total - decode_flops) / model
        t_flops = total / (report["peak_tflops"] * 1e12)
        bound = max(t_flops, report["hbm_ms"] * steps / 1e3)
        report.update(flops_ms=t_flops * 1e3, hbm_ms=report["hbm_ms"] * steps, bound_ms=bound * 1e3,
                      bound_by="flops" if t_flops * 1e3 >= report["hbm_ms"] else "HBM bandwidth",
                      mfu_bound=model / (bound * report["peak_tflops"] * 1e12))
    return report


def hosts_chunks_once(shard, devices: int, per_device: int) -> bool:
    """The sample stage's chunks of one call: each host writes the chunks of its devices' rows; over all
    hosts every chunk position is written exactly once."""
    index = shard.devices_indices_map((devices * per_device,))
    seen: list[int] = []
    for p in sorted({d.process_index for d in index}):
        seen += [(idx[0].start or 0) // per_device for d, idx in index.items() if d.process_index == p]
    return sorted(seen) == list(range(devices))


def plan_inception(params: dict, devices, chip, image_size: int, dump=None) -> dict:
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from dit.backend import conv_compiler_options
    from metrics import inception, inception_weights
    from stages.runtime.common import check_inception_batch

    ev = params["evaluate"]
    check_inception_batch(ev)
    per_device = ev["batch_size"]
    mesh = Mesh(np.asarray(devices), ("batch",))
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    convs = inception_weights.abstract_params()
    net_params = {"convs": convs} | ({"softmax": jax.ShapeDtypeStruct((2048, 1008), np.float32)}
                                    if ev["inception_source"] == "graphdef" else {})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), net_params)
    n = per_device * mesh.size
    prep, net = inception.programs(mesh, tuple(sorted((conv_compiler_options("tpu") or {}).items())))
    x = jax.ShapeDtypeStruct((n, inception.SIZE, inception.SIZE, 3), np.float32, sharding=rows)
    images = jax.ShapeDtypeStruct((n, image_size, image_size, 3), np.uint8, sharding=rows)
    prep_report = analyse("inception-resize", prep.lower(images), chip, 0.0, chip.f32_highest, {})
    one = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), net_params)
    model = 2 * jaxpr_macs(inception.forward, one, jax.ShapeDtypeStruct((per_device, inception.SIZE,
                                                                          inception.SIZE, 3), np.float32))
    report = analyse("inception", net.lower(abstract, x), chip, model, chip.f32_highest,
                     {"per_device_batch": per_device, "resize_peak_gib": prep_report.get("peak_gib")}, dump)
    return report


# ------------------------------------------------------------------------------------------------ report


def suggestion(r: dict) -> str:
    what = {"train": "more train.mesh.fsdp (it divides the state), train.remat: true, or a smaller per-chip "
                     "batch (more chips)",
            "sample": "a smaller sample.batch_size (samples per device per call)",
            "inception": "a smaller evaluate.batch_size (images per device per call)"}[r["stage"]]
    if r.get("temporaries_gib") is not None:  # XLA stated what it needed
        short = f"{r['temporaries_gib'] - r['available_gib']:.2f} GiB of temporaries over the chip's HBM"
    else:  # another on-chip memory ran out (sflag, vmem): XLA's own words
        short = f"XLA refused it ({r.get('error', '')[:160]})"
    return f"{r['stage']} does not fit: {short}; try {what}"


def print_table(reports: list[dict], topo, chip) -> None:
    print(f"{topo.name} x{topo.num_slices}: {topo.chips} chips ({chip.name}, {chip.hbm_gib} GiB HBM, "
          f"{chip.bf16:g} bf16 TFLOP/s, {chip.hbm_gbps:g} GB/s), {topo.hosts} hosts")
    for r in reports:
        if not r["fits"]:
            print(f"  {r['stage']:9s} DOES NOT FIT: {r.get('error', '')}")
            continue
        coll = sum(r["collectives_gb"].values())
        line = (f"  {r['stage']:9s} peak {r['peak_gib']:6.2f} of {r['hbm_gib']:.2f} GiB (margin {r['margin_gib']:5.2f}); "
                f"args {r['argument_gib']:.2f} GiB; {r['compiled_tflop']:.3f} TFLOP, model {r['model_tflop']:.3f}")
        if r.get("flops_ratio"):
            line += f" ({r['flops_ratio']:.3f}x)"
        line += (f"; {r['bytes_accessed_gb']:.1f} GB accessed, collectives {coll:.2f} GB; bound "
                 f"{r['bound_ms']:.1f} ms ({r['bound_by']}), MFU <= {100 * (r['mfu_bound'] or 0):.1f}%")
        print(line)
        if r["stage"] == "train":
            print(f"            mesh {r['mesh']}, remat {r['remat']}, {r['per_chip_batch']} images a chip, state "
                  f"{r['state_gib_per_chip']:.2f} GiB a chip ({r['state_gib']:.2f} in all), hosts' rows contiguous: "
                  f"{r['hosts_rows_contiguous']}" + ("; WARNING: fsdp spans slices (its all-gathers cross "
                                                      "the data-centre network)" if r["fsdp_spans_slices"] else ""))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--topology", required=True, help="v5e:16x16, v4:2x2x1, v5p-128, v6e-8, ...")
    parser.add_argument("--num-slices", type=int, default=1, help="slices joined over the data-centre network")
    parser.add_argument("--num-classes", type=int, default=1000, help="label classes (default 1000: ImageNet)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a train, sample or evaluate param, e.g. --set train.mesh.fsdp=4")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"of {','.join(STAGES)}")
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--dump", help="write each compiled program's HLO text into this folder")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from stages.tools.topology import TopologyError, parse

    dump = Path(args.dump) if args.dump else None

    if not Path(args.params).is_file():
        fail(f"--params {args.params}: no such file")
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not wanted or set(wanted) - set(STAGES):
        fail(f"--stages {args.stages}: expected a comma-separated subset of {','.join(STAGES)}")
    if args.num_slices < 1 or args.num_classes < 1:
        fail(f"--num-slices / --num-classes: expected positive integers, got {args.num_slices} / {args.num_classes}")
    try:
        topo = parse(args.topology, args.num_slices)
    except TopologyError as e:
        fail(f"--topology: {e}")
    params = read_params(args.params, args.set)
    vae_cfg, image_size, vae_from = vae_config(args.params)
    if image_size % vae_cfg.downsample_factor:
        fail(f"data.image_size: {image_size} is not divisible by the VAE's downsampling {vae_cfg.downsample_factor}")
    side = image_size // vae_cfg.downsample_factor
    latent_shape = (side, side, vae_cfg.latent_channels)

    use_libtpu(topo)
    import jax

    from stages.runtime.chips import chip as chip_of

    try:
        devices = topo.devices()
    except TopologyError as e:
        fail(f"--topology: {e}")
    chip = chip_of(devices[0].device_kind)
    if chip is None:
        fail(f"--topology: {devices[0].device_kind} is not in stages/runtime/chips.py's table")
    reports = []
    for stage in wanted:
        print(f"plan: compiling {stage} for {topo.name}...", file=sys.stderr, flush=True)
        if stage == "train":
            reports.append(plan_train(params, devices, chip, latent_shape, args.num_classes, vae_cfg.scaling_factor,
                                      dump))
        elif stage == "sample":
            reports.append(plan_sample(params, devices, chip, latent_shape, args.num_classes, vae_cfg,
                                       vae_cfg.scaling_factor, dump))
        else:
            reports.append(plan_inception(params, devices, chip, image_size, dump))
    print_table(reports, topo, chip)
    import importlib.metadata as md

    doc = {"topology": topo.name, "num_slices": topo.num_slices, "chips": topo.chips, "hosts": topo.hosts,
           "chip": vars(chip), "device_kind": devices[0].device_kind, "params_file": args.params,
           "sets": args.set, "latent_shape": list(latent_shape), "vae_config_from": vae_from,
           "jax": jax.__version__, "libtpu": md.version("libtpu"), "stages": reports}
    if args.out:
        write_json(Path(args.out), doc)
    failed = [r for r in reports if not r["fits"]]
    for r in failed:
        print(f"error: {suggestion(r)}", file=sys.stderr)
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
