"""Optimizer (AdamW + warmup/cosine + clipping + layer-wise lr decay + freezing) and the train-state pytree.

Why plain pytrees: the train state is `{'step', 'params', 'opt_state', 'rng'}` (rng = raw uint32 key data, so Orbax
saves it as an ordinary array); everything is jit-, shard- and checkpoint-friendly without framework classes.

Optimizer = clip_by_global_norm(clip) -> scale_by_adam(b1, b2) -> add_decayed_weights(wd, mask) ->
scale_by_learning_rate(schedule) -> per-parameter multiplier. The multiplier carries layer-wise lr decay
(`decay ** (n_layers + 1 - layer_id)`, BEiT/MAE style, ids from `cinema_jax.models.transfer.layer_decay_groups`) and
freezing (0 for encoder subtrees when `freeze_encoder`), so a frozen parameter never moves, not even by weight decay.
This matches torch AdamW with per-group lr: p -= lr_g * (adam + wd * p).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from cinema_jax.config import get

NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "token")


def lr_schedule(optim, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then half-cycle cosine to `min_lr` at `total_steps`."""
    lr, min_lr = float(optim.lr), float(optim.min_lr)
    warmup = int(optim.warmup_steps)
    schedule = str(get(optim, "schedule"))
    if schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
                                    [max(warmup, 1)]) if warmup > 0 else optax.constant_schedule(lr)
    if schedule != "cosine":
        from cinema_jax.errors import ConfigError

        raise ConfigError(f"optim.schedule must be 'cosine' or 'constant', got {schedule!r}")
    decay_steps = max(int(total_steps), warmup + 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps, end_value=min_lr)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: >= 2-D parameters that are not tokens (biases, norms, tokens: no decay)."""
    flat = flatten_dict(params)
    out = {}
    for path, leaf in flat.items():
        is_token = any(name in path[-1] for name in NO_DECAY_NAMES)
        out[path] = bool(len(leaf.shape) > 1 and not is_token)
    return unflatten_dict(out)


def _encoder_mask(params: Any) -> Any:
    from cinema_jax.models.transfer import is_encoder_path

    flat = flatten_dict(params)
    return unflatten_dict({p: is_encoder_path(p) for p in flat})


def lr_multipliers(params: Any, optim, freeze_encoder: bool = False) -> Any | None:
    """Per-parameter lr multiplier tree, or None when every multiplier is 1."""
    layer_decay = float(get(optim, "layer_decay"))
    flat = flatten_dict(params)
    scales = {p: 1.0 for p in flat}
    if layer_decay > 0:
        from cinema_jax.models.transfer import layer_decay_groups

        ids = flatten_dict(layer_decay_groups(params))
        n_top = max(ids.values()) if ids else 0
        for p in flat:
            scales[p] *= layer_decay ** (n_top - int(ids[p]))
    if freeze_encoder:
        enc = flatten_dict(_encoder_mask(params))
        for p in flat:
            if enc[p]:
                scales[p] = 0.0
    if all(s == 1.0 for s in scales.values()):
        return None
    return unflatten_dict(scales)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update by a fixed per-parameter float (lr groups / freezing)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


def make_optimizer(config, params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule) from `config.optim` (+ `freeze_encoder`) for an unboxed params tree."""
    optim = config.optim
    schedule = lr_schedule(optim, int(config.total_steps))
    parts = []
    clip = float(get(config, "optim.clip_norm"))
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(optax.scale_by_adam(b1=float(optim.b1), b2=float(optim.b2), eps=float(get(config, "optim.eps"))))
    wd = float(get(config, "optim.weight_decay"))
    if wd > 0:
        parts.append(optax.add_decayed_weights(wd, mask=decay_mask(params)))
    parts.append(optax.scale_by_learning_rate(schedule))
    mult = lr_multipliers(params, optim, bool(get(config, "freeze_encoder")))
    if mult is not None:
        parts.append(scale_by_tree(mult))
    return optax.chain(*parts), schedule


def new_state(params: Any, opt_state: Any, rng_data: Any, step: int = 0) -> dict:
    return {"step": jnp.asarray(step, jnp.int32), "params": params, "opt_state": opt_state, "rng": rng_data}
