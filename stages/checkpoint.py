"""The Orbax checkpoint layout shared by train (writes), sample and audit (read the EMA back).

Each step holds two items: `ema` (the weights sampling uses) and `state` (params + optimizer state), so a
reader restores only the EMA. The EMA is restored replicated on the reader's own mesh, whatever topology
wrote it.
"""

from __future__ import annotations

from pathlib import Path


def manager(ckpt_dir: Path, **options):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(**options) if options else None
    return ocp.CheckpointManager((Path(ckpt_dir) / "orbax").resolve(), options=opts)


def save(mgr, step: int, state: dict, force: bool = False) -> None:
    import orbax.checkpoint as ocp

    mgr.save(step, args=ocp.args.Composite(
        ema=ocp.args.StandardSave(state["ema"]),
        state=ocp.args.StandardSave({"params": state["params"], "opt_state": state["opt_state"]})),
             force=force)


def restore_ema(mgr, step: int, config, mesh):
    import jax
    import orbax.checkpoint as ocp

    from dit.models import init_params
    from dit.sharding import replicated_abstract

    abstract = replicated_abstract(mesh, jax.eval_shape(lambda k: init_params(config, k),
                                                        jax.random.key(0)))
    return mgr.restore(step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(abstract)))["ema"]
