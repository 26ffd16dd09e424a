"""Training and evaluation: `train_and_evaluate(config, workdir)`.

One jitted `train_step(state, batch)` over a mesh of all devices (`metrix_jax.sharding`): the batch is sharded along
'data', parameters replicated, and the loss and Metrix mixing see the global batch, so the numbers do not depend on
the device count. Mixing modes (`config.mix.mode`, spec section 2.3):

* 'none': loss on the clean embeddings;
* 'input': the clean forward, then the mixed images in a second forward (MS mines its pair sets on the clean
  embeddings of the first, so no extra pass: the cost is the extra images only);
* 'feature' (the paper's Metrix): ONE backbone forward; the last feature maps are mixed before pooling and the head
  runs on clean and mixed maps together;
* 'embedding': the clean embeddings are mixed.

The objective is `loss.from_similarity(clean) + w * loss.from_similarity(mixed)` (`metrix_jax.mixup`), with proxies
as their own parameter group for proxy-based losses. The run resumes from the latest checkpoint in WORKDIR (model,
optimiser, RNG, step, data iterator): the continuation equals an uninterrupted run. Outputs in WORKDIR: config.json,
metrics.jsonl + TensorBoard events, checkpoints/, results.json.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metrix_jax import checkpointing
from metrix_jax import config_lib
from metrix_jax import losses
from metrix_jax import metric_writers
from metrix_jax import models
from metrix_jax import optim
from metrix_jax import sharding

log = logging.getLogger(__name__)

@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator (checkpointed together with it)."""
  step: jax.Array  # int32 scalar: steps done
  params: dict[str, Any]  # {'backbone', 'head'[, 'proxies']}
  batch_stats: dict[str, Any]  # {'backbone': ...} BN running statistics
  opt_state: optax.OptState
  rng: jax.Array  # uint32 key data of the base key; per-step key = fold_in(base, step)

  def variables(self, params=None) -> dict[str, Any]:
    params = self.params if params is None else params
    return {'params': {'backbone': params['backbone'], 'head': params['head']}, 'batch_stats': self.batch_stats}


@dataclasses.dataclass
class DataBundle:
  """What the trainer needs from the data pipeline (built by `metrix_jax.data`, or a stand-in in tests).

  train_iterator: this host's train batches {'image': uint8 [b, H, W, 3], 'label': int32 [b]} (b = per-host batch),
    endless, with get_state()/set_state().
  eval_sets: callable -> {'test': iterable} (leave-one-out) or {'query': ..., 'gallery': ...}; batches add
    'mask': bool [b] (padding); fresh iterables on every call.
  """
  train_iterator: Any
  eval_sets: Callable[[], dict[str, Any]]
  num_train_images: int
  num_train_classes: int


def build_data(config, per_host_batch_size: int) -> DataBundle:
  """The project's tfds builders + grain pipelines (`metrix_jax.data`) for `config.dataset`.

  Builds the data set on first use; the train iterator yields this host's rows of each global batch.
  """
  from metrix_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  del per_host_batch_size  # the pipeline derives it from the global batch and the process count
  d = config.dataset
  where = dict(data_dir=config_lib.optional(d.data_dir), manual_dir=config_lib.optional(d.manual_dir))
  host = dict(process_index=jax.process_index(), process_count=jax.process_count(), num_workers=d.num_workers)
  data_lib.prepare(d.name, **where)
  info = data_lib.get_dataset_info(d.name, **where)
  train_iterator = data_lib.create_train_iterator(
      d.name, global_batch_size=config.train.batch_size, image_size=d.image_size, seed=config.seed,
      sampler=d.sampler, classes_per_batch=d.classes_per_batch, images_per_class=d.images_per_class,
      **where, **host)

  def eval_sets():
    return {split: data_lib.create_eval_iterator(d.name, split, global_batch_size=d.eval_batch_size,
                                                 image_size=d.image_size, resize_size=d.eval_resize, **where,
                                                 **host)
            for split in info.eval_splits}

  return DataBundle(train_iterator=train_iterator, eval_sets=eval_sets, num_train_images=info.num_train_examples,
                    num_train_classes=info.num_classes_train)


def normalize_images(images: jax.Array, dtype) -> jax.Array:
  """uint8 [B, H, W, 3] -> ImageNet-normalised `dtype` (on device; `metrix_jax.data.normalize_images`)."""
  from metrix_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  return data_lib.normalize_images(images).astype(dtype)


def create_model(config) -> models.EmbeddingNet:
  return models.EmbeddingNet(depth=config.model.depth, embedding_dim=config.model.embedding_dim,
                             dtype=jnp.dtype(config.model.dtype),
                             bn_mode='frozen' if config.model.bn_freeze else 'trainable')


def create_loss(config) -> losses.Loss:
  return losses.get(config.loss.name, **config.loss[config.loss.name].to_dict())


def init_state(config, model, loss_fn, tx_factory, num_classes: int, mesh) -> TrainState:
  """Parameters from the seed (+ pretrained backbone), replicated over the mesh; identical on every host."""
  from metrix_jax import weights  # pylint: disable=g-import-not-at-top
  key = jax.random.key(config.seed)
  model_key, proxy_key = jax.random.split(jax.random.fold_in(key, 1))
  variables = weights.init_embedding_variables(model, model_key, pretrained=config_lib.optional(
      config.model.pretrained), image_size=min(64, config.dataset.image_size))
  params = {'backbone': variables['params']['backbone'], 'head': variables['params']['head']}
  if loss_fn.uses_proxies:
    params['proxies'] = losses.init_proxies(proxy_key, num_classes, config.model.embedding_dim)
  tx = tx_factory(params)

  def make(params, batch_stats):
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=jax.random.key_data(jax.random.fold_in(key, 2)))

  return jax.jit(make, out_shardings=sharding.replicated(mesh))(params, variables['batch_stats'])


# ----------------------------------------------------------------------------------------------------------------
# The train step.
# ----------------------------------------------------------------------------------------------------------------
def _apply(model, variables, x, *, train_bn: bool, method=None):
  """model.apply with BN statistics updated only when training BN (bn_freeze=False)."""
  if train_bn:
    out, updates = model.apply(variables, x, train=True, mutable=['batch_stats'], method=method)
    return out, updates['batch_stats']
  return model.apply(variables, x, train=False, method=method), variables['batch_stats']


def make_plan(key, labels, pos_mask, neg_mask, mix, *, level: str):
  """The Metrix plan of one step (metrix_jax.mixup): all pairs of M(a) at embedding level (exact closed form),
  `items_per_anchor` sampled items per anchor at feature level, `input_items_per_anchor` at input level."""
  from metrix_jax import mixup  # pylint: disable=g-import-not-at-top
  kwargs = dict(pos_mask=pos_mask, neg_mask=neg_mask, pair_sets=mix.pairs, alpha=mix.alpha,
                lambda_mode=mix.lambda_mode, mask_mode=mix.mask_mode)
  if level == 'embedding' and mix.all_pairs:
    return mixup.all_pairs_plan(key, labels, **kwargs)
  num_mixed = mix.input_items_per_anchor if level == 'input' else mix.items_per_anchor
  return mixup.make_plan(key, labels, num_mixed=num_mixed, **kwargs)


def compute_loss(params, batch_stats, images, labels, key, *, model, loss_fn, mix, train_bn: bool):
  """Scalar objective and aux for one global batch. images: normalised [B, H, W, 3]; labels int32 [B].

  Returns (loss, (new batch_stats, {'clean_loss', 'mix_loss'})).
  """
  variables = {'params': {'backbone': params['backbone'], 'head': params['head']}, 'batch_stats': batch_stats}
  proxies = params.get('proxies')
  if mix.mode == 'none':
    (embeddings, _), new_stats = _apply(model, variables, images, train_bn=train_bn)
    loss = loss_fn(embeddings, labels, proxies)
    return loss, (new_stats, {'clean_loss': loss, 'mix_loss': jnp.zeros_like(loss)})

  from metrix_jax import mixup  # pylint: disable=g-import-not-at-top
  batch = images.shape[0]
  mixed_embeddings = None  # embedding level: exact closed form from the clean embeddings
  if mix.mode == 'embedding':
    (embeddings, _), new_stats = _apply(model, variables, images, train_bn=train_bn)
    pos, neg = mixup.pair_masks(loss_fn, embeddings, labels, proxies)
    plan = make_plan(key, labels, pos, neg, mix, level='embedding')
  elif mix.mode == 'feature':  # ONE backbone forward; mixed maps before pooling; the head on clean + mixed
    feature_map, new_stats = _apply(model, variables, images, train_bn=train_bn, method='features')
    if mixup.plan_needs_embeddings(loss_fn):  # MS mining: pair sets from the clean embeddings first
      embeddings = model.apply(variables, feature_map, method='head')
      pos, neg = mixup.pair_masks(loss_fn, embeddings, labels, proxies)
      plan = make_plan(key, labels, pos, neg, mix, level='feature')
      mixed_embeddings = model.apply(variables, mixup.mix(feature_map, plan), method='head')
    else:
      plan = make_plan(key, labels, None, None, mix, level='feature')  # pair sets from the labels
      both = model.apply(variables, jnp.concatenate([feature_map, mixup.mix(feature_map, plan)]), method='head')
      embeddings, mixed_embeddings = both[:batch], both[batch:]
  elif mix.mode == 'input':  # the clean forward, then the mixed images (built from the plan) in a second one
    (embeddings, _), new_stats = _apply(model, variables, images, train_bn=train_bn)
    pos, neg = mixup.pair_masks(loss_fn, embeddings, labels, proxies) if mixup.plan_needs_embeddings(loss_fn) else (
        None, None)  # MS mines its pair sets on the clean embeddings of this very forward
    plan = make_plan(key, labels, pos, neg, mix, level='input')
    # Trainable BN: the mixed images are normalised by their own batch statistics and the running statistics
    # follow the clean images only (the eval-time statistics never see mixed images).
    (mixed_embeddings, _), _ = _apply(model, variables, mixup.mix(images, plan), train_bn=train_bn)
  else:
    raise ValueError(f'Unknown mix mode {mix.mode!r}; choose one of {config_lib.MIX_MODES}.')
  loss, parts = mixup.objective(loss_fn, embeddings, labels, plan, mixed_embeddings=mixed_embeddings,
                                proxies=proxies, weight=mix.weight)
  return loss, (new_stats, {'clean_loss': parts['clean'], 'mix_loss': parts['mixed']})


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model, loss_fn, tx, mix, train_bn: bool,
               dtype) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on the global batch; pure (jit with donate_argnums=0)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  images = normalize_images(batch['image'], dtype)
  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  (loss, (new_stats, aux)), grads = grad_fn(state.params, state.batch_stats, images, batch['label'], key,
                                             model=model, loss_fn=loss_fn, mix=mix, train_bn=train_bn)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': loss, **aux, 'grad_norm': optax.tree.norm(grads)}
  return state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state), metrics


def make_train_step(config, model, loss_fn, tx, mesh):
  mix = _MixConfig.from_config(config.mix)
  fn = functools.partial(train_step, model=model, loss_fn=loss_fn, tx=tx, mix=mix,
                         train_bn=not config.model.bn_freeze, dtype=jnp.dtype(config.model.dtype))
  replicated = sharding.replicated(mesh)
  return jax.jit(fn, in_shardings=(replicated, sharding.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class _MixConfig:
  """The hashable part of config.mix the step closes over (a ConfigDict is not hashable)."""
  mode: str
  pairs: tuple
  alpha: float
  weight: float
  lambda_mode: str
  mask_mode: str
  items_per_anchor: int
  input_items_per_anchor: int
  all_pairs: bool

  @classmethod
  def from_config(cls, mix) -> '_MixConfig':
    return cls(mode=mix.mode, pairs=tuple(mix.pairs), alpha=float(mix.alpha), weight=float(mix.weight),
               lambda_mode=mix.lambda_mode, mask_mode=mix.mask_mode, items_per_anchor=int(mix.items_per_anchor),
               input_items_per_anchor=int(mix.input_items_per_anchor), all_pairs=bool(mix.all_pairs))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------------------------------
def make_embed_fn(model, config, mesh):
  dtype = jnp.dtype(config.model.dtype)

  def embed(variables, images):
    embeddings, _ = model.apply(variables, normalize_images(images, dtype), train=False)
    return embeddings

  return jax.jit(embed, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def embed_dataset(embed_fn, variables, batches, mesh, max_items: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Embeds every valid (mask) item of `batches` (this host's slices) -> (embeddings [N, D], labels [N]), all hosts.

  max_items > 0 stops after the first `max_items` valid items (the same batches on every host).
  """
  chunks, labels, count = [], [], 0
  for batch in batches:
    local = {k: np.asarray(v) for k, v in batch.items()}
    mask = local.get('mask', np.ones(local['label'].shape, bool))
    global_batch = sharding.global_batch({'image': local['image']}, mesh)
    embeddings = embed_fn(variables, global_batch['image'])
    meta = {'label': local['label'], 'mask': mask}
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      meta = multihost_utils.process_allgather(meta, tiled=True)
    keep = np.asarray(meta['mask'], bool)
    chunks.append(np.asarray(embeddings, np.float32)[keep])
    labels.append(np.asarray(meta['label'])[keep])
    count += int(keep.sum())
    if max_items and count >= max_items:
      break
  if not chunks:
    raise ValueError('The evaluation split is empty.')
  embeddings, labels = np.concatenate(chunks), np.concatenate(labels)
  if max_items:
    embeddings, labels = embeddings[:max_items], labels[:max_items]
  return embeddings, labels


def evaluate(state: TrainState, embed_fn, data: DataBundle, config, mesh) -> dict[str, float]:
  """Recall@K (+ MAP@R, R-Precision) on the test split(s): leave-one-out, or query -> gallery (In-Shop)."""
  from metrix_jax import evaluation  # pylint: disable=g-import-not-at-top
  sets = data.eval_sets()
  variables = state.variables()
  ks = tuple(config.dataset.recall_ks)
  limit = int(config.dataset.eval_max_images)
  if 'gallery' in sets:
    q_emb, q_lab = embed_dataset(embed_fn, variables, sets['query'], mesh, limit)
    g_emb, g_lab = embed_dataset(embed_fn, variables, sets['gallery'], mesh, limit)
    result = evaluation.retrieval_metrics(q_emb, q_lab, ks, gallery_embeddings=g_emb, gallery_labels=g_lab)
  else:
    emb, lab = embed_dataset(embed_fn, variables, sets['test'], mesh, limit)
    result = evaluation.retrieval_metrics(emb, lab, ks)
  metrics = {f'recall@{k}': float(v) for k, v in result['recall'].items()}
  for name in ('map_at_r', 'r_precision'):
    if name in result:
      metrics[name] = float(result[name])
  return metrics


# ----------------------------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------------------------
class NonFiniteLossError(FloatingPointError):
  pass


class _PreemptionFlag:
  """SIGTERM sets `requested` (the loop then checkpoints and stops) instead of killing the process mid-step."""

  def __init__(self):
    import signal  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    self.requested = False
    self._signal, self._previous = signal, None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    log.warning('SIGTERM: saving a checkpoint after this step and stopping.')
    self.requested = True

  def should_stop(self, step: int, every: int) -> bool:
    """Every step on one process; on several, every `every` steps and by agreement (all stop at one step)."""
    if jax.process_count() == 1:
      return self.requested
    if step % every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.asarray([self.requested]))))

  def restore(self):
    if self._previous is not None:
      self._signal.signal(self._signal.SIGTERM, self._previous)
      self._previous = None


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def train_and_evaluate(config, workdir: str, *, data_factory: Callable[..., DataBundle] | None = None,
                       model_factory: Callable[[Any], Any] | None = None, stop_after_steps: int | None = None
                       ) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns the results dict.

  Test seams: `data_factory(config, per_host_batch_size) -> DataBundle` replaces the project's pipelines,
  `model_factory(config)` the EmbeddingNet; `stop_after_steps` stops (with a checkpoint) as a pre-emption would.
  SIGTERM (pre-emption) also saves a checkpoint and stops; rerunning the command resumes.
  """
  config_lib.validate(config)
  start_time = time.time()
  workdir = metric_writers.resolve_workdir(workdir)  # local: absolute path; gs://...: as given
  mesh = sharding.make_mesh()
  sharding.log_startup(mesh)
  per_host = sharding.per_host_batch_size(config.train.batch_size, mesh)
  sharding.per_host_batch_size(config.dataset.eval_batch_size, mesh)  # checks divisibility
  data = (data_factory or build_data)(config, per_host)
  spe = config_lib.steps_per_epoch(data.num_train_images, config.train.batch_size)
  total = config_lib.total_steps(config, spe)

  writer = metric_writers.MetricWriter(workdir)
  writer.write_config(config)
  model, loss_fn = (model_factory or create_model)(config), create_loss(config)
  freeze_bn_affine = bool(config.model.bn_freeze) and int(config.optim.warmup_epochs) == 0

  def tx_factory(params):
    return optim.make_optimizer(config.optim, params=params, steps_per_epoch=spe, total_steps=total,
                                freeze_bn_affine=freeze_bn_affine)

  state = init_state(config, model, loss_fn, tx_factory, data.num_train_classes, mesh)
  tx = tx_factory(state.params)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  log.info('%s + %s loss, mix=%s; %s parameters; global batch %d (%d per host); %d steps/epoch, %d steps.',
           f'ResNet-{config.model.depth}', config.loss.name, config.mix.mode, f'{num_params:,}',
           config.train.batch_size, per_host, spe, total)

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.train.keep)
  latest = ckpt.latest_step()
  if latest is not None:
    state, _ = ckpt.restore(latest, state, data_iterator=data.train_iterator)
    log.info('Resumed from %s/checkpoints/%d.', workdir, latest)
  step = int(state.step)

  step_fn = make_train_step(config, model, loss_fn, tx, mesh)
  embed_fn = make_embed_fn(model, config, mesh)
  eval_every = int(config.train.eval_every_epochs) * spe
  pending: list[tuple[int, jax.Array]] = []  # (step, loss) not yet checked for finiteness
  last_good = latest
  history = {'train_loss': math.nan, 'eval': {}, 'best': None}
  timer = {'t': None, 'steps': 0, 'images': 0, 'elapsed': 0.0, 'paused': 0.0}  # paused: eval/save time

  def check_finite():
    nonlocal pending
    if not pending:
      return
    values = jax.device_get([v for _, v in pending])  # [loss, grad_norm] per step
    for (s, _), v in zip(pending, values):
      if not np.all(np.isfinite(v)):
        first = pending[0][0]
        ckpt.wait()
        good = 'none' if last_good is None else f'{workdir}/checkpoints/{last_good}'
        raise NonFiniteLossError(
            f'Loss became {float(v[0])} (gradient norm {float(v[1])}) at step {s} (checked window: steps '
            f'{first}-{pending[-1][0]}; last finite checkpoint: {good}). Lower --config.optim.lr or check the '
            'data; rerunning resumes from that checkpoint.')
    history['train_loss'] = float(values[-1][0])
    pending = []

  def save(step, metrics=None):
    nonlocal last_good
    t0 = time.time()
    check_finite()
    ckpt.save(step, state, data_iterator=data.train_iterator, metrics=metrics,
              extra={'epoch': step / spe, 'dataset': config.dataset.name})
    last_good = step
    writer.flush()
    timer['paused'] += time.time() - t0

  def run_eval(step):
    t0 = time.time()
    metrics = evaluate(state, embed_fn, data, config, mesh)
    history['eval'][step] = metrics
    if history['best'] is None or metrics['recall@1'] > history['best'][1]['recall@1']:
      history['best'] = (step, metrics)
    writer.write_scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
    log.info('eval @ step %d (epoch %.2f, %.1fs): %s', step, step / spe, time.time() - t0,
             '  '.join(f'{k} {100 * v:.2f}' for k, v in metrics.items()))
    timer['paused'] += time.time() - t0
    return metrics

  log.info('compiling the train step (first step)...')
  compile_start = time.time()
  stop_at = total if stop_after_steps is None else min(total, int(stop_after_steps))
  nan_every = int(config.train.nan_check_every_steps)  # 0: at log lines, checkpoints and the end
  profile_steps = int(config.train.profile_steps)
  profile_start = (step // config.train.log_every_steps + 1) * config.train.log_every_steps  # after a log line
  preempted = _PreemptionFlag()
  try:
    while step < stop_at and not preempted.should_stop(step, config.train.log_every_steps):
      local = next(data.train_iterator)
      batch = sharding.global_batch({'image': local['image'], 'label': local['label']}, mesh)
      state, metrics = step_fn(state, batch)
      step += 1
      pending.append((step, jnp.stack([metrics['loss'], metrics['grad_norm']])))
      if nan_every and step % nan_every == 0:
        check_finite()
      if profile_steps and step in (profile_start, profile_start + profile_steps):
        if step == profile_start:
          jax.profiler.start_trace(os.path.join(writer.local_dir, 'profile'))
        else:
          jax.block_until_ready(metrics['loss'])
          jax.profiler.stop_trace()
          log.info('profiled steps %d-%d -> %s/profile (tensorboard --logdir %s/profile)', profile_start + 1,
                   step, writer.local_dir, writer.local_dir)
      if timer['t'] is None:
        jax.block_until_ready(metrics['loss'])
        log.info('compiled and ran the first step in %.1fs.', time.time() - compile_start)
        timer['t'] = time.time()
      else:
        timer['steps'] += 1
      is_last = step == total
      if step % config.train.log_every_steps == 0 or is_last:
        scalars = jax.device_get(metrics)
        check_finite()
        elapsed = time.time() - timer['t'] - timer['paused']
        timer['elapsed'] += elapsed
        timer['images'] += timer['steps'] * config.train.batch_size
        ips = timer['steps'] * config.train.batch_size / elapsed if timer['steps'] else math.nan
        steps_per_s = timer['steps'] / elapsed if timer['steps'] else math.nan
        lrs = optim.learning_rates(config.optim, steps_per_epoch=spe, total_steps=total, step=step - 1)
        writer.write_scalars(step, {**{k: float(v) for k, v in scalars.items()}, 'images_per_second': ips,
                                    'epoch': step / spe, **lrs})
        log.info('step %d/%d (epoch %.2f)  loss %.4f (clean %.4f, mix %.4f)  %.1f img/s  ETA %s', step, total,
                 step / spe, scalars['loss'], scalars['clean_loss'], scalars['mix_loss'], ips,
                 _format_eta((total - step) / steps_per_s) if timer['steps'] else '?')
        timer['t'], timer['steps'], timer['paused'] = time.time(), 0, 0.0
      evaluated = None
      if eval_every and step % eval_every == 0 and not is_last:
        evaluated = run_eval(step)
      if is_last:
        evaluated = run_eval(step)
      if evaluated is not None or step % config.train.checkpoint_every_steps == 0 or is_last:
        save(step, evaluated)
    check_finite()
    if step < total:  # stopped early (pre-emption or stop_after_steps): checkpoint and leave
      if ckpt.latest_step() != step:
        save(step)
      log.info('Stopped at step %d/%d with a checkpoint; rerun the same command to resume.', step, total)
      writer.close()
      return {'stopped_at': step}
    if step not in history['eval']:  # resumed after the end: evaluate the final state
      save(step, run_eval(step))
  finally:
    preempted.restore()
    ckpt.close()
    writer.flush()

  wall = time.time() - start_time
  final = history['eval'].get(step) or {}
  ips = timer['images'] / timer['elapsed'] if timer['elapsed'] > 0 else math.nan
  results = {
      'dataset': config.dataset.name,
      'loss': config.loss.name,
      'mix': config.mix.mode,
      'steps': int(step),
      'epochs': step / spe,
      'train_loss': history['train_loss'],
      'recall': {str(k.split('@')[1]): v for k, v in final.items() if k.startswith('recall@')},
      'map_at_r': final.get('map_at_r'),
      'r_precision': final.get('r_precision'),
      'images_per_second': ips,
      'wall_s': wall,
      'model_selection': 'last step (the recall above); best-on-test below is optimistic (spec defect 8)',
      'best_on_test': (None if history['best'] is None else
                       {'step': history['best'][0], **history['best'][1]}),
      'variant': {
          'loss_hparams': config.loss[config.loss.name].to_dict(),
          'mix': config.mix.to_dict() if config.mix.mode != 'none' else {'mode': 'none'},
          'model': {'depth': config.model.depth, 'pretrained': config_lib.optional(config.model.pretrained),
                    'embedding_dim': config.model.embedding_dim, 'dtype': config.model.dtype,
                    'bn_freeze': config.model.bn_freeze},
          'optim': config.optim.to_dict(),
          'batch_size': config.train.batch_size,
          'seed': config.seed,
          'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.process_count()} process(es))',
      },
  }
  writer.write_json('results.json', results)
  writer.close()
  log.info('results: R@%s  (%s img/s, %.0fs) -> %s/results.json',
           '  R@'.join(f'{k} {100 * v:.2f}' for k, v in results['recall'].items()),
           f'{ips:.1f}', wall, workdir)
  return results
