"""Config schema, recipes and `validate(config)`: every problem at once, with the valid choices.

A config is an `ml_collections.ConfigDict` built by `base_config()` and specialised by a file in `configs/`
(`get_config(arg)`; the argument picks a recipe, e.g. `configs/cub200.py:ms,feature`). Keys users rely on:

    config.seed
    config.dataset.name / .manual_dir / .data_dir / .image_size / .sampler / ...
    config.model.depth / .pretrained (weights file or None) / .embedding_dim / .dtype / .bn_freeze
    config.loss.name + config.loss.<name>.<hyperparameter>   (one sub-dict per loss: switching
                                                             --config.loss.name keeps valid hyperparameters)
    config.mix.mode ('none'|'input'|'feature'|'embedding') / .pairs / .alpha / .weight / ...
    config.optim.*  (Adam + coupled L2, clip by value, group lr, schedule, warm-up freezing)
    config.train.batch_size (global) / .num_epochs / .num_steps (> 0 overrides epochs) / eval, checkpoint, log
"""

from __future__ import annotations

import os
from typing import Any

from ml_collections import config_dict

from metrix_jax import data
from metrix_jax import losses
from metrix_jax import mixup

MIX_MODES = ('none', 'input', 'feature', 'embedding')
PAIR_SETS = tuple(mixup.PAIR_SETS)  # positive-negative, anchor-negative, positive-positive, negative-negative
LAMBDA_MODES = tuple(mixup.LAMBDA_MODES)
MASK_MODES = tuple(mixup.MASK_MODES)
DEPTHS = (18, 34, 50)
DTYPES = ('float32', 'bfloat16')
OPTIMIZERS = ('adam', 'adamw')
SCHEDULES = ('step', 'cosine', 'constant')
SAMPLERS = ('random', 'balanced')

# Hyperparameters of each named loss: `metrix_jax.losses.default_hparams(name)` (PML defaults; `form` is 'pml',
# the official code's reduction, or 'paper', per-anchor sums), with the official Metrix code's values where it
# differs (multi-similarity, spec section 1.4). The keys are the keyword arguments of `losses.get(name, ...)`.
OFFICIAL_LOSS_HPARAMS = {'multi_similarity': dict(alpha=17.97, beta=75.66, base=0.77, epsilon=0.39)}
LOSS_DEFAULTS = {
  name: {**losses.default_hparams(name), **OFFICIAL_LOSS_HPARAMS.get(name, {})} for name in losses.LOSS_NAMES
}
PROXY_LOSSES = tuple(losses.PROXY_LOSS_NAMES)
# Short names accepted by get_config(arg).
LOSS_ALIASES = {
  **{name: name for name in losses.LOSS_NAMES},
  'ms': 'multi_similarity',
  'pa': 'proxy_anchor',
  'nca': 'proxy_nca',
  'lifted': 'lifted_structure',
  'nsoftmax': 'normalized_softmax',
  'subcenter': 'subcenter_arcface',
  'softtriple': 'soft_triple',
  'nt_xent': 'ntxent',
}

# The Ks of each data set's Recall@K protocol (the data sets and what is known of them: `data.DATASETS`).
RECALL_KS = {name: spec.recall_ks for name, spec in data.DATASETS.items()}


def base_config() -> config_dict.ConfigDict:
  """Every key the trainer reads, with the official recipe's common values (spec section 4)."""
  c = config_dict.ConfigDict()
  c.seed = 1

  c.dataset = config_dict.ConfigDict()
  c.dataset.name = 'cub200'
  c.dataset.manual_dir = config_dict.placeholder(str)  # folder with the official archives
  c.dataset.data_dir = config_dict.placeholder(str)  # where built datasets live (None: data module's default)
  c.dataset.image_size = 224  # train crop / eval centre crop
  c.dataset.eval_resize = 256  # eval: shorter side -> this, centre crop image_size; 0/None: image_size * 256 / 224
  c.dataset.sampler = 'random'  # 'random' (CUB, Cars) or 'balanced' (classes_per_batch x images_per_class)
  c.dataset.classes_per_batch = 20
  c.dataset.images_per_class = 5
  c.dataset.num_workers = 4  # grain worker processes per host (0: in-process)
  c.dataset.eval_batch_size = 256  # global
  c.dataset.eval_max_images = 0  # > 0: evaluate on the first n images of each eval split only (smoke tests)
  c.dataset.recall_ks = (1, 2, 4, 8, 16, 32)

  c.model = config_dict.ConfigDict()
  c.model.depth = 50
  # Converted torchvision weights (.npz/.pth), or a metrix_jax run to fine-tune from (WORKDIR[:STEP]); None = random.
  c.model.pretrained = config_dict.placeholder(str)
  c.model.pretrained_head = False  # with a metrix_jax run as `pretrained`: keep its head (False: re-initialise)
  c.model.embedding_dim = 512
  c.model.dtype = 'float32'  # compute dtype ('bfloat16' on GPU/TPU); params and loss stay float32
  c.model.bn_freeze = True  # True: BN running statistics frozen for the whole run (official bn_freeze=1)

  c.loss = config_dict.ConfigDict()
  c.loss.name = 'contrastive'
  for name, hp in LOSS_DEFAULTS.items():
    c.loss[name] = config_dict.ConfigDict(dict(hp))

  c.mix = config_dict.ConfigDict()
  c.mix.mode = 'none'
  c.mix.pairs = ('pos_neg', 'anc_neg')  # spec section 9 default (a)
  c.mix.alpha = 2.0  # lambda ~ Beta(alpha, alpha)
  c.mix.weight = 0.4  # w in L = mean_a[l(a) + w * l~(a)]
  c.mix.lambda_mode = 'batch'  # one lambda per step ('batch', official) or per mixed item ('item')
  c.mix.mask_mode = 'own'  # each anchor sees its own mixed items ('own', paper) or all, with soft labels ('all')
  c.mix.items_per_anchor = 8  # feature level: mixed items sampled per anchor from M(a) (B x K maps)
  c.mix.input_items_per_anchor = 1  # input level: mixed images per anchor (each costs a backbone pass)
  c.mix.all_pairs = True  # embedding level: every pair of M(a), exact closed form (else items_per_anchor)

  c.optim = config_dict.ConfigDict()
  c.optim.name = 'adam'  # 'adam': Adam + coupled L2 (official); 'adamw': decoupled weight decay
  c.optim.lr = 1e-4  # backbone learning rate
  c.optim.head_lr_mult = 1.0
  c.optim.proxy_lr_mult = 100.0
  c.optim.weight_decay = 1e-4
  c.optim.proxy_weight_decay = 1e-4
  c.optim.clip_value = 10.0  # element-wise gradient clip to [-clip, clip]; 0 disables
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.schedule = 'step'  # 'step' (StepLR per epoch), 'cosine' (per step), 'constant'
  c.optim.step_epochs = 10  # StepLR step size in epochs
  c.optim.gamma = 0.1  # StepLR factor
  c.optim.warmup_epochs = 5  # backbone frozen (no update, no decay, no Adam moments) for these epochs

  c.train = config_dict.ConfigDict()
  c.train.batch_size = 100  # global, over all hosts and devices
  c.train.num_epochs = 60
  c.train.num_steps = 0  # > 0 overrides num_epochs
  c.train.eval_every_epochs = 5  # 0: only at the end
  c.train.checkpoint_every_steps = 1000  # also at every evaluation and at the end
  c.train.keep = 2  # last n checkpoints kept (plus the best by R@1)
  c.train.log_every_steps = 50
  c.train.nan_check_every_steps = 0  # 0: at every log line (the loss is read there anyway)
  c.train.profile_steps = 0  # > 0: jax.profiler trace of that many steps after the first log line
  c.train.distributed = False  # multi-host: call jax.distributed.initialize() (also env METRIX_DISTRIBUTED=1)
  return c


def parse_recipe_arg(arg: str | None, *, default_loss: str = 'contrastive') -> tuple[str, str]:
  """'ms,feature' -> ('multi_similarity', 'feature'). Tokens: a loss alias and/or a mix mode, any order."""
  loss, mode = default_loss, 'none'
  for token in [t.strip() for t in (arg or '').split(',') if t.strip()]:
    if token in LOSS_ALIASES:
      loss = LOSS_ALIASES[token]
    elif token in MIX_MODES:
      mode = token
    elif token == 'metrix':
      mode = 'feature'
    else:
      raise ValueError(
        f'Unknown config argument {token!r}: expected a loss ({", ".join(sorted(LOSS_ALIASES))}) '
        f'and/or a mix mode ({", ".join(MIX_MODES)} or "metrix" = feature), comma-separated, '
        f'e.g. --config=configs/cub200.py:ms,feature'
      )
  return loss, mode


def set_recipe(
  c: config_dict.ConfigDict,
  *,
  epochs: int,
  lr: float,
  step: int,
  gamma: float,
  warm: int,
  bn_freeze: bool,
  sampler: str,
) -> None:
  """One row of the spec's recipe table (section 4)."""
  c.train.num_epochs = epochs
  c.optim.lr = lr
  c.optim.schedule = 'step'
  c.optim.step_epochs = step
  c.optim.gamma = gamma
  c.optim.warmup_epochs = warm
  c.model.bn_freeze = bn_freeze
  c.dataset.sampler = sampler


def optional(value):
  """An optional path from a config: None, '' and the string 'None' (what the command line gives) -> None."""
  if value is None or (isinstance(value, str) and value.strip() in ('', 'None', 'none')):
    return None
  return os.path.expanduser(value) if isinstance(value, str) else value  # ints (eval_resize) pass through


def _choice(problems, path, value, choices):
  if value not in choices:
    problems.append(f'{path}={value!r} is not valid; choose one of {", ".join(map(repr, choices))}.')


def _positive(problems, path, value, *, allow_zero=False, integer=False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if ok and integer:
    ok = float(value).is_integer()
  if not ok or value < 0 or (value == 0 and not allow_zero):
    kind = 'an integer' if integer else 'a number'
    problems.append(f'{path}={value!r} must be {kind} {">= 0" if allow_zero else "> 0"}.')


def validate(config: config_dict.ConfigDict, *, check_files: bool = True) -> None:
  """Raises ValueError listing every problem of `config` (and the valid choices) before any work starts."""
  p: list[str] = []
  expected = base_config()
  _unknown_keys(config, expected, '', p)
  if p:
    raise ValueError('Invalid config:\n  - ' + '\n  - '.join(p))
  d, m, lo, mx, o, t = config.dataset, config.model, config.loss, config.mix, config.optim, config.train

  _positive(p, 'seed', config.seed, allow_zero=True, integer=True)
  _choice(p, 'dataset.name', d.name, data.DATASET_NAMES)
  _positive(p, 'dataset.image_size', d.image_size, integer=True)
  if d.eval_resize is not None:  # None or 0: the pipeline's default for image_size
    _positive(p, 'dataset.eval_resize', d.eval_resize, allow_zero=True, integer=True)
  if isinstance(d.image_size, int) and isinstance(d.eval_resize, int) and 0 < d.eval_resize < d.image_size:
    p.append(
      f'dataset.eval_resize={d.eval_resize} must be >= dataset.image_size={d.image_size} (or 0: the '
      f'default, round(image_size * 256 / 224)).'
    )
  _choice(p, 'dataset.sampler', d.sampler, SAMPLERS)
  _positive(p, 'dataset.classes_per_batch', d.classes_per_batch, integer=True)
  _positive(p, 'dataset.images_per_class', d.images_per_class, integer=True)
  _positive(p, 'dataset.num_workers', d.num_workers, allow_zero=True, integer=True)
  _positive(p, 'dataset.eval_batch_size', d.eval_batch_size, integer=True)
  _positive(p, 'dataset.eval_max_images', d.eval_max_images, allow_zero=True, integer=True)
  if (
    not isinstance(d.recall_ks, tuple) or not d.recall_ks or not all(isinstance(k, int) and k > 0 for k in d.recall_ks)
  ):
    p.append(f'dataset.recall_ks={d.recall_ks!r} must be a non-empty tuple of positive integers.')
  elif 1 not in d.recall_ks:
    p.append(f'dataset.recall_ks={d.recall_ks!r} must contain 1 (R@1 picks the best checkpoint).')
  if (
    d.sampler == 'balanced'
    and isinstance(t.batch_size, int)
    and isinstance(d.classes_per_batch, int)
    and (isinstance(d.images_per_class, int))
    and d.classes_per_batch * d.images_per_class != t.batch_size
  ):
    p.append(
      f'dataset.sampler="balanced" needs classes_per_batch x images_per_class == train.batch_size, got '
      f'{d.classes_per_batch} x {d.images_per_class} != {t.batch_size}.'
    )
  if check_files and d.name in data.DATASETS:
    _check_manual_dir(p, d.name, d.manual_dir)

  _choice(p, 'model.depth', m.depth, DEPTHS)
  _positive(p, 'model.embedding_dim', m.embedding_dim, integer=True)
  _choice(p, 'model.dtype', m.dtype, DTYPES)
  if not isinstance(m.bn_freeze, bool):
    p.append(f'model.bn_freeze={m.bn_freeze!r} must be True or False.')
  if not isinstance(m.pretrained_head, bool):
    p.append(f'model.pretrained_head={m.pretrained_head!r} must be True or False.')
  if check_files and optional(m.pretrained) and not os.path.exists(optional(m.pretrained).rsplit(':', 1)[0]):
    p.append(
      f'model.pretrained={m.pretrained!r} does not exist. Convert torchvision IMAGENET1K_V1 weights once '
      f'with `python -m metrix_jax.weights convert resnet{m.depth}.pth resnet{m.depth}.npz`, or set '
      f'--config.model.pretrained=None for random init (results not comparable with the paper), or a metrix_jax '
      'run directory to fine-tune from (WORKDIR[:STEP]).'
    )

  _choice(p, 'loss.name', lo.name, tuple(LOSS_DEFAULTS))
  if lo.name in LOSS_DEFAULTS:
    _check_loss(lo.name, lo[lo.name].to_dict(), p)

  _choice(p, 'mix.mode', mx.mode, MIX_MODES)
  if not isinstance(mx.pairs, tuple) or not mx.pairs:
    p.append(
      f'mix.pairs={mx.pairs!r} must be a non-empty tuple of pair-set names from {PAIR_SETS} '
      f'(on the command line: --config.mix.pairs="(\'pos_neg\',)").'
    )
  else:
    for name in mx.pairs:
      _choice(p, 'mix.pairs[...]', name, PAIR_SETS)
  _positive(p, 'mix.alpha', mx.alpha)
  _positive(p, 'mix.weight', mx.weight, allow_zero=True)
  _choice(p, 'mix.lambda_mode', mx.lambda_mode, LAMBDA_MODES)
  _choice(p, 'mix.mask_mode', mx.mask_mode, MASK_MODES)
  _positive(p, 'mix.items_per_anchor', mx.items_per_anchor, integer=True)
  _positive(p, 'mix.input_items_per_anchor', mx.input_items_per_anchor, integer=True)
  if not isinstance(mx.all_pairs, bool):
    p.append(f'mix.all_pairs={mx.all_pairs!r} must be True or False.')

  _choice(p, 'optim.name', o.name, OPTIMIZERS)
  for key in ('lr', 'head_lr_mult', 'proxy_lr_mult', 'eps'):
    _positive(p, f'optim.{key}', o[key])
  for key in ('weight_decay', 'proxy_weight_decay', 'clip_value'):
    _positive(p, f'optim.{key}', o[key], allow_zero=True)
  for key in ('b1', 'b2'):
    if not isinstance(o[key], float) or not 0.0 <= o[key] < 1.0:
      p.append(f'optim.{key}={o[key]!r} must be in [0, 1).')
  _choice(p, 'optim.schedule', o.schedule, SCHEDULES)
  _positive(p, 'optim.step_epochs', o.step_epochs, integer=True)
  _positive(p, 'optim.gamma', o.gamma)
  _positive(p, 'optim.warmup_epochs', o.warmup_epochs, allow_zero=True, integer=True)

  _positive(p, 'train.batch_size', t.batch_size, integer=True)
  _positive(p, 'train.num_epochs', t.num_epochs, integer=True)
  _positive(p, 'train.num_steps', t.num_steps, allow_zero=True, integer=True)
  for key in ('eval_every_epochs', 'nan_check_every_steps', 'profile_steps'):
    _positive(p, f'train.{key}', t[key], allow_zero=True, integer=True)
  for key in ('checkpoint_every_steps', 'keep', 'log_every_steps'):
    _positive(p, f'train.{key}', t[key], integer=True)
  if not isinstance(t.distributed, bool):
    p.append(f'train.distributed={t.distributed!r} must be True or False.')
  if p:
    raise ValueError('Invalid config:\n  - ' + '\n  - '.join(p))


def _check_manual_dir(problems, name, manual_dir):
  """A data set built from downloaded archives: `manual_dir`, when given, must be a folder (named with the fix)."""
  path = optional(manual_dir)
  if data.DATASETS[name].needs_manual_dir and path and not os.path.isdir(path):
    instructions = data.download_instructions(name).replace('\n', '\n    ')
    problems.append(
      f'dataset.manual_dir={manual_dir!r} is not a folder; pass the folder that holds the official '
      f'archives of {name} with --config.dataset.manual_dir=DIR.\n    {instructions}'
    )


def _unknown_keys(config, expected, prefix, problems):
  """Keys present in `config` but not in the schema (a config file that added a key by mistake)."""
  for key in config.keys():
    path = f'{prefix}{key}'
    if key not in expected:
      problems.append(f'unknown key {path!r}; valid keys here: {", ".join(sorted(expected.keys()))}.')
    elif isinstance(expected[key], config_dict.ConfigDict):
      if isinstance(config[key], config_dict.ConfigDict):
        _unknown_keys(config[key], expected[key], path + '.', problems)
      else:
        problems.append(f'{path!r} must be a group of settings, got {config[key]!r}.')
  for key in expected.keys():
    if key not in config:
      problems.append(f'missing key {prefix}{key!r} (build configs on config_lib.base_config()).')


def _check_loss(name: str, hparams: dict[str, Any], problems: list[str]) -> None:
  """Builds the loss once (cheap, pure) so that a bad hyperparameter fails here, not after compilation."""
  try:
    losses.get(name, **hparams)
  except Exception as e:  # pylint: disable=broad-except
    problems.append(f'loss.{name} hyperparameters {hparams} are not accepted by losses.get({name!r}): {e}')


def steps_per_epoch(num_train_images: int, batch_size: int) -> int:
  """Batches per epoch with drop_last (official: floor(N / B))."""
  spe = num_train_images // batch_size
  if spe < 1:
    raise ValueError(
      f'train.batch_size={batch_size} is larger than the training set ({num_train_images} images); '
      f'lower --config.train.batch_size.'
    )
  return spe


def total_steps(config: config_dict.ConfigDict, spe: int) -> int:
  return int(config.train.num_steps) if config.train.num_steps > 0 else int(config.train.num_epochs) * spe
