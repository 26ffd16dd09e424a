"""The official optimiser (spec section 4) as one optax transformation, plus AdamW and cosine options.

Per step and per parameter group (backbone, head, proxies), for `name='adam'` (official):

    g <- clip(g, -10, 10)            element-wise (torch.nn.utils.clip_grad_value_)
    g <- g + wd * theta              coupled L2 (torch.optim.Adam(weight_decay=wd)), not AdamW
    u <- Adam(g; 0.9, 0.999, 1e-8)   torch.optim.Adam's moments and bias correction
    theta <- theta - lr_group(epoch) * u

with lr_group = lr (backbone), head_lr_mult * lr (head), proxy_lr_mult * lr (proxies, 100x officially) and StepLR
per epoch: lr * gamma ** floor(epoch / step_epochs) (stepping during warm-up too). For `name='adamw'` the decay is
decoupled: theta <- theta - lr * (Adam(clip(g)) + wd * theta).

Warm-up: for the first `warmup_epochs` epochs the backbone is frozen: no update, no decay, and no Adam moments.
Its Adam state (moments and the step count used for bias correction) starts at the unfreeze step, as PyTorch's
per-parameter Adam state does for parameters that had no gradient before. The freeze is a function of the step
count held in the optimiser state (`jnp.where`, no Python branch), so the jitted step never recompiles.

BatchNorm gamma/beta are backbone parameters: frozen during warm-up, trained afterwards. The official code never
unfreezes them when `warmup_epochs == 0` and `bn_freeze` is set (`freeze_bn_affine=True` reproduces that).
Running statistics are the model's business (`bn_mode='frozen'`), not the optimiser's.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

GROUPS = ('backbone', 'head', 'proxies')
BN_AFFINE_NAMES = ('scale', 'bias')  # the backbone's convs are bias-free: these leaves are BatchNorm gamma/beta


def make_schedule(
  *, lr: float, schedule: str, steps_per_epoch: int, total_steps: int, step_epochs: int = 10, gamma: float = 0.1
) -> Callable[[jax.Array], jax.Array]:
  """Learning rate as a pure function of the global step (0-based).

  'step': lr * gamma ** floor(epoch / step_epochs) with epoch = step // steps_per_epoch (torch StepLR stepped once
  per epoch); 'cosine': lr * (1 + cos(pi * step / total_steps)) / 2 per step; 'constant': lr.
  """
  if schedule == 'step':

    def fn(step):
      epoch = jnp.asarray(step) // steps_per_epoch
      return lr * jnp.power(gamma, (epoch // step_epochs).astype(jnp.float32))
  elif schedule == 'cosine':

    def fn(step):
      t = jnp.minimum(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 1.0)
      return lr * 0.5 * (1.0 + jnp.cos(math.pi * t))
  elif schedule == 'constant':

    def fn(step):
      return jnp.full((), lr, jnp.float32) + 0.0 * jnp.asarray(step, jnp.float32)
  else:
    raise ValueError(f'Unknown schedule {schedule!r}; choose one of step, cosine, constant.')
  return fn


class FrozenUntilState(NamedTuple):
  count: jax.Array  # global steps seen (int32)
  inner: Any  # the wrapped transformation's state: untouched while frozen


def frozen_until(inner: optax.GradientTransformation, start_step: int) -> optax.GradientTransformation:
  """Zero updates and an untouched `inner` state for steps < start_step; `inner` as usual from start_step on.

  `inner` sees its first update at the unfreeze step, so Adam's moments and its bias-correction count start
  there (PyTorch semantics for parameters without gradients until then).
  """

  def init_fn(params):
    return FrozenUntilState(count=jnp.zeros([], jnp.int32), inner=inner.init(params))

  def update_fn(updates, state, params=None):
    frozen = state.count < start_step
    new_updates, new_inner = inner.update(updates, state.inner, params)
    new_updates = jax.tree.map(lambda u: jnp.where(frozen, jnp.zeros_like(u), u), new_updates)
    new_inner = jax.tree.map(lambda old, new: jnp.where(frozen, old, new), state.inner, new_inner)
    return new_updates, FrozenUntilState(count=optax.safe_increment(state.count), inner=new_inner)

  return optax.GradientTransformation(init_fn, update_fn)


def _group_transform(
  *, name: str, schedule_fn, weight_decay: float, clip_value: float, b1: float, b2: float, eps: float, frozen_steps: int
) -> optax.GradientTransformation:
  """clip -> (coupled L2) -> Adam -> (decoupled decay), frozen for `frozen_steps`, then -lr(step)."""
  parts = []
  if clip_value > 0:
    parts.append(optax.clip(clip_value))
  if name == 'adam' and weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  if name == 'adamw' and weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay))
  inner = optax.chain(*parts)
  if frozen_steps > 0:
    inner = frozen_until(inner, frozen_steps)
  # scale_by_learning_rate counts global steps from 0 itself, independently of the freeze.
  return optax.chain(inner, optax.scale_by_learning_rate(schedule_fn))


def param_labels(params: dict[str, Any], *, freeze_bn_affine: bool = False) -> dict[str, Any]:
  """Group label of every leaf: the top-level key ('backbone', 'head', 'proxies'), or 'frozen'."""
  unknown = set(params) - set(GROUPS)
  if unknown:
    raise ValueError(f'Unknown parameter groups {sorted(unknown)}; the optimiser knows {GROUPS}.')

  def label(group):
    def fn(path, _):
      if group == 'backbone' and freeze_bn_affine and getattr(path[-1], 'key', None) in BN_AFFINE_NAMES:
        return 'frozen'
      return group

    return fn

  return {g: jax.tree_util.tree_map_with_path(label(g), p) for g, p in params.items()}


def make_optimizer(
  optim_config, *, params: dict[str, Any], steps_per_epoch: int, total_steps: int, freeze_bn_affine: bool = False
) -> optax.GradientTransformation:
  """The trainer's optimiser from `config.optim` for params {'backbone', 'head'[, 'proxies']}.

  The returned transformation's state is a pure function of the step count it holds: the freeze, the schedule
  and the group learning rates need no Python state, so one jitted train step serves the whole run.
  """
  o = optim_config
  frozen_steps = int(o.warmup_epochs) * int(steps_per_epoch)

  def schedule(mult):
    base = make_schedule(
      lr=float(o.lr),
      schedule=o.schedule,
      steps_per_epoch=steps_per_epoch,
      total_steps=total_steps,
      step_epochs=int(o.step_epochs),
      gamma=float(o.gamma),
    )
    return lambda step: mult * base(step)

  common = dict(name=o.name, clip_value=float(o.clip_value), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps))
  transforms = {
    'backbone': _group_transform(
      schedule_fn=schedule(1.0), weight_decay=float(o.weight_decay), frozen_steps=frozen_steps, **common
    ),
    'head': _group_transform(
      schedule_fn=schedule(float(o.head_lr_mult)), weight_decay=float(o.weight_decay), frozen_steps=0, **common
    ),
    'proxies': _group_transform(
      schedule_fn=schedule(float(o.proxy_lr_mult)), weight_decay=float(o.proxy_weight_decay), frozen_steps=0, **common
    ),
    'frozen': optax.set_to_zero(),
  }
  labels = param_labels(params, freeze_bn_affine=freeze_bn_affine)
  used = set(jax.tree.leaves(labels))
  return optax.multi_transform({k: v for k, v in transforms.items() if k in used}, labels)


def learning_rates(optim_config, *, steps_per_epoch: int, total_steps: int, step: int) -> dict[str, float]:
  """Group learning rates at `step` (for logging); the backbone's is 0 while frozen."""
  o = optim_config
  base = float(
    make_schedule(
      lr=float(o.lr),
      schedule=o.schedule,
      steps_per_epoch=steps_per_epoch,
      total_steps=total_steps,
      step_epochs=int(o.step_epochs),
      gamma=float(o.gamma),
    )(step)
  )
  frozen = step < int(o.warmup_epochs) * steps_per_epoch
  return {
    'lr_backbone': 0.0 if frozen else base,
    'lr_head': base * float(o.head_lr_mult),
    'lr_proxies': base * float(o.proxy_lr_mult),
  }
