"""The train step: `TrainState`, the Metrix objective of one global batch, and the jitted `train_step`.

    tx_factory = step.optimizer_factory(config, steps_per_epoch, total_steps)
    state = step.init_state(config, model, loss_fn, tx_factory, num_classes, mesh)
    train_step = step.make_train_step(config, model, loss_fn, tx, mesh)
    state, metrics = train_step(state, batch)

batch: the global batch, sharded along the mesh's 'data' axis: {'image': uint8 [B, H, W, 3], 'label': int32 [B]}
(normalised on device). metrics: replicated float32 scalars {'loss', 'clean_loss', 'mix_loss', 'grad_norm'}
(mix_loss is 0 without Metrix). The state is donated. Parameters are replicated and the loss and the mixing see
the global batch, so the numbers do not depend on the device count.

Metrix levels (`config.mix.mode`, spec section 2.3; the plan of every level comes from `mixup.plan_for`):

* 'none': the loss on the clean embeddings;
* 'input': the clean forward, then the mixed images in a second forward (a mining loss mines its pair sets on the
  clean embeddings of the first, so there is no extra pass: the cost is the extra images only);
* 'feature' (the paper's Metrix): ONE backbone forward; the last feature maps are mixed before pooling and the
  head runs on clean and mixed maps together;
* 'embedding': the clean embeddings are mixed (exact closed form, `mixup.closed_form_similarity`).

The objective is `loss.from_similarity(clean) + w * loss.from_similarity(mixed)` (`mixup.objective`), with
proxies as their own parameter group for proxy-based losses. Per-step randomness: `fold_in(state.rng, step)`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from metrix_jax import data as data_lib
from metrix_jax import embedding
from metrix_jax import losses
from metrix_jax import mixup
from metrix_jax import optim
from metrix_jax import rundir
from metrix_jax import sharding
from metrix_jax import weights
from metrix_jax.config_lib import optional

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator (checkpointed together with it)."""

  step: jax.Array  # int32 scalar: steps done
  params: dict[str, Any]  # {'backbone', 'head'[, 'proxies' [C, D]]}
  batch_stats: dict[str, Any]  # {'backbone': ...} BN running statistics
  opt_state: optax.OptState
  rng: jax.Array  # uint32 key data of the base key; per-step key = fold_in(base, step)

  def variables(self) -> dict[str, Any]:
    """The model's variables (`embedding.model_variables`)."""
    return embedding.model_variables(self.params, self.batch_stats)


def create_loss(config) -> losses.Loss:
  """`losses.get(config.loss.name, **config.loss[<name>])`."""
  return losses.get(config.loss.name, **config.loss[config.loss.name].to_dict())


def mix_settings(mix) -> mixup.MixSettings | None:
  """`config.mix` -> the hashable `mixup.MixSettings` of its level (None for mode 'none'): K items per anchor
  (`input_items_per_anchor` at input level, `items_per_anchor` otherwise), all pairs at embedding level when
  `all_pairs`."""
  if mix.mode == 'none':
    return None
  return mixup.MixSettings(
    level=mix.mode,
    pair_sets=tuple(mix.pairs),
    num_mixed=int(mix.input_items_per_anchor if mix.mode == 'input' else mix.items_per_anchor),
    all_pairs=bool(mix.all_pairs) and mix.mode == 'embedding',
    alpha=float(mix.alpha),
    lambda_mode=mix.lambda_mode,
    mask_mode=mix.mask_mode,
    weight=float(mix.weight),
  )


def optimizer_factory(config, steps_per_epoch: int, total_steps: int) -> Callable[[Any], optax.GradientTransformation]:
  """`tx_factory(params) -> optax.GradientTransformation`: the run's optimiser (`optim.make_optimizer`) for a
  parameter tree (its groups: backbone / head / proxies), as the trainer, the benchmarks and the TPU compiles build
  it. The BN affine parameters stay frozen when BN is frozen and there is no warm-up (the official recipe)."""

  def tx_factory(params):
    return optim.make_optimizer(
      config.optim,
      params=params,
      steps_per_epoch=steps_per_epoch,
      total_steps=total_steps,
      freeze_bn_affine=bool(config.model.bn_freeze) and int(config.optim.warmup_epochs) == 0,
    )

  return tx_factory


def init_state(
  config, model, loss_fn: losses.Loss, tx_factory: Callable[[Any], optax.GradientTransformation], num_classes: int, mesh
) -> TrainState:
  """Parameters from the seed (+ pretrained backbone), replicated over the mesh; identical on every host.

  tx_factory(params) -> the optimiser (it may depend on the parameter tree: groups). num_classes: proxies [C, D]
  for proxy losses.
  """
  key = jax.random.key(config.seed)
  model_key, proxy_key = jax.random.split(jax.random.fold_in(key, 1))
  pretrained, head = optional(config.model.pretrained), None
  if pretrained is not None and rundir.parse_run_reference(pretrained) is not None:  # fine-tune a metrix_jax run
    source = rundir.load_backbone(pretrained, depth=config.model.depth)
    log.info(
      'Fine-tuning from %s (backbone and BN statistics%s).',
      source['source'],
      ', head kept' if config.model.pretrained_head else '; head re-initialised',
    )
    pretrained, head = source['backbone'], source['head'] if config.model.pretrained_head else None
  variables = weights.init_embedding_variables(
    model, model_key, pretrained=pretrained, head=head, image_size=min(64, config.dataset.image_size)
  )
  params = {'backbone': variables['params']['backbone'], 'head': variables['params']['head']}
  if loss_fn.uses_proxies:
    params['proxies'] = loss_fn.init_proxies(proxy_key, num_classes, config.model.embedding_dim)  # [C * K, D]
  tx = tx_factory(params)

  def make(params, batch_stats):
    return TrainState(
      step=jnp.zeros([], jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.fold_in(key, 2)),
    )

  return jax.jit(make, out_shardings=sharding.replicated(mesh))(params, variables['batch_stats'])


def _apply(model, variables, x, *, train_bn: bool, method=None):
  """model.apply -> (output, batch_stats), the statistics updated only when training BN (bn_freeze=False)."""
  if train_bn:
    out, updates = model.apply(variables, x, train=True, mutable=['batch_stats'], method=method)
    return out, updates['batch_stats']
  return model.apply(variables, x, train=False, method=method), variables['batch_stats']


def compute_loss(
  params,
  batch_stats,
  images,
  labels,
  key,
  *,
  model,
  loss_fn: losses.Loss,
  mix: mixup.MixSettings | None,
  train_bn: bool,
):
  """The objective of one global batch and what it measured.

  images: normalised float [B, H, W, 3]; labels: int32 [B]; key: this step's PRNG key.
  Returns (loss scalar, (new batch_stats, {'clean_loss', 'mix_loss'} scalars)).
  """
  variables = embedding.model_variables(params, batch_stats)
  proxies = params.get('proxies')
  head = functools.partial(model.apply, variables, method='head')
  if mix is None:
    (embeddings, _), new_stats = _apply(model, variables, images, train_bn=train_bn)
    loss = loss_fn(embeddings, labels, proxies)
    return loss, (new_stats, {'clean_loss': loss, 'mix_loss': jnp.zeros_like(loss)})

  plan_for = functools.partial(mixup.plan_for, key, loss_fn, labels, mix, proxies=proxies)
  mixed_embeddings = None  # embedding level: exact closed form from the clean embeddings
  if mix.level == 'feature':  # ONE backbone forward; mixed maps before pooling; the head on clean + mixed
    feature_map, new_stats = _apply(model, variables, images, train_bn=train_bn, method='features')
    if loss_fn.mines:  # the pair sets come from the clean embeddings: head on the clean maps first
      embeddings = head(feature_map)
      plan = plan_for(embeddings=embeddings)
      mixed_embeddings = head(mixup.mix(feature_map, plan))
    else:  # pair sets from the labels: clean and mixed maps through the head together
      plan = plan_for()
      both = head(jnp.concatenate([feature_map, mixup.mix(feature_map, plan)]))
      embeddings, mixed_embeddings = both[: images.shape[0]], both[images.shape[0] :]
  else:
    (embeddings, _), new_stats = _apply(model, variables, images, train_bn=train_bn)
    plan = plan_for(embeddings=embeddings)
    if mix.level == 'input':  # the mixed images in a second forward. Trainable BN: they are normalised by their
      # own batch statistics and the running statistics follow the clean images only.
      (mixed_embeddings, _), _ = _apply(model, variables, mixup.mix(images, plan), train_bn=train_bn)
  loss, parts = mixup.objective(
    loss_fn, embeddings, labels, plan, mixed_embeddings=mixed_embeddings, proxies=proxies, weight=mix.weight
  )
  return loss, (new_stats, {'clean_loss': parts['clean'], 'mix_loss': parts['mixed']})


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model,
  loss_fn: losses.Loss,
  tx,
  mix: mixup.MixSettings | None,
  train_bn: bool,
  dtype,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on the global batch (module docstring: shapes); pure."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  images = data_lib.normalize_images(batch['image'], dtype)
  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  (loss, (new_stats, aux)), grads = grad_fn(
    state.params,
    state.batch_stats,
    images,
    batch['label'],
    key,
    model=model,
    loss_fn=loss_fn,
    mix=mix,
    train_bn=train_bn,
  )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': loss, **aux, 'grad_norm': optax.tree.norm(grads)}
  return state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state), metrics


def make_train_step(config, model, loss_fn: losses.Loss, tx, mesh):
  """`train_step` of `config` jitted over `mesh`: (state replicated, batch sharded on 'data') -> (state,
  metrics) replicated; the state is donated."""
  fn = functools.partial(
    train_step,
    model=model,
    loss_fn=loss_fn,
    tx=tx,
    mix=mix_settings(config.mix),
    train_bn=not config.model.bn_freeze,
    dtype=jnp.dtype(config.model.dtype),
  )
  replicated = sharding.replicated(mesh)
  return jax.jit(
    fn,
    in_shardings=(replicated, sharding.batch_sharding(mesh)),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )
