"""An engine from a preset or a checkpoint, a plan set and tiers: what `Engine.build` does."""

from __future__ import annotations

import jax

from nitsum_jax.scheduler import by_rank, default_classes
from nitsum_jax.scheduler.controller import PlanController


def build_engine(engine_cls, *, preset: str = "tiny", checkpoint: str | None = None, plans: str | None = None,
                 num_devices: int | None = None, seed: int = 0, dtype: str | None = None, adaptive: bool = False,
                 hold_s: float = 0.5, min_dwell_s: float = 1.0, weights: str = "auto", **kwargs):
    """An engine from a preset (random weights) or a checkpoint, over the first `num_devices`
    devices, with a plan set in the compact form or a TOML path (None: the default set over the
    tiers in `classes`). `adaptive`: a PlanController picks the plan from the load (else the
    first plan, or `initial_plan`, stays until `switch_plan`). `weights`: "fp8" quantizes the
    linear weights (nitsum_jax.quant), "bf16" upcasts an fp8 checkpoint's, "auto" keeps them.
    On a CPU-only machine set XLA_FLAGS=--xla_force_host_platform_device_count=N first."""
    from nitsum_jax.plans import read_plans
    from nitsum_jax.source import load_model

    if checkpoint is None and preset != "tiny":
        # Random weights of a large shape are drawn on the devices, chunk by chunk (no host copy).
        from nitsum_jax.config import preset as preset_config
        from nitsum_jax.model import abstract_params
        from nitsum_jax.quant import check_choice
        from nitsum_jax.source import LoadedModel

        cfg = preset_config(preset)
        if dtype:
            cfg = cfg.replace(dtype={"bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype))
        # fp8: an abstract tree, so the plan set draws random fp8 weights
        params = abstract_params(cfg, weights="fp8") if check_choice(weights) == "fp8" else None
        model = LoadedModel(cfg, params, None, f"preset:{preset}")
    else:
        model = load_model(checkpoint, preset, seed, dtype, weights=weights)
    devices = jax.devices()[:num_devices] if num_devices else jax.devices()
    classes = kwargs.get("classes") or default_classes()
    plan_set = read_plans(plans, len(devices), model.cfg, tuple(c.name for c in by_rank(classes)))
    kwargs.setdefault("tokenizer", model.tokenizer)
    if adaptive and kwargs.get("controller") is None:
        kwargs["controller"] = PlanController(plan_set, kwargs.get("initial_plan") or plan_set[0].name,
                                              classes=classes, hold_s=hold_s, min_dwell_s=min_dwell_s)
    return engine_cls(model.cfg, model.params, plan_set, devices=devices, **kwargs)
