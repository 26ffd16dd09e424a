"""torchvision ResNet checkpoints -> Flax variables of `metrix_jax.models.ResNet` / `EmbeddingNet`.

Formats (chosen by file extension):
  `.pth` / `.pt`   a torchvision state dict saved with `torch.save` (needs torch);
  `.npz`           the same state dict as numpy arrays under the same keys (no torch needed);
  `.safetensors`   the same, read with the `safetensors` package.

Convert once on a machine with torch, then train anywhere without it:

    python -m metrix_jax.weights convert resnet50.pth resnet50.npz

Producing the paper's weights (torchvision ImageNet-1k V1, top-1 76.13) on a machine with internet:

    python -c "import torch, torchvision as tv
    torch.save(tv.models.resnet50(weights='IMAGENET1K_V1').state_dict(), 'resnet50.pth')"

Porting: conv OIHW -> HWIO; BN weight/bias -> params scale/bias, running_mean/var -> batch_stats mean/var;
`fc.*` and `num_batches_tracked` dropped. Keys and shapes are validated against the Flax model.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Mapping

import numpy as np

from metrix_jax import cli

# jax/flax/models are imported inside the functions that need them so that the `convert` CLI stays light.

IGNORED_KEY = re.compile(r'(^fc\.(weight|bias)$)|(num_batches_tracked$)')
_BN_LEAVES = {
  'weight': ('params', 'scale'),
  'bias': ('params', 'bias'),
  'running_mean': ('batch_stats', 'mean'),
  'running_var': ('batch_stats', 'var'),
}
_TORCH_STAGES = {
  (2, 2, 2, 2, 'basic'): 18,
  (3, 4, 6, 3, 'basic'): 34,
  (3, 4, 6, 3, 'bottleneck'): 50,
  (3, 4, 23, 3, 'bottleneck'): 101,
  (3, 8, 36, 3, 'bottleneck'): 152,
}


def how_to_produce(path: str, depth: int = 50) -> str:
  """Instructions for producing the torchvision ImageNet V1 weights file `path`."""
  stem = os.path.splitext(os.path.basename(path))[0] or f'resnet{depth}'
  save = (
    f'  python -c "import torch, torchvision; torch.save(torchvision.models.resnet{depth}('
    f"weights='IMAGENET1K_V1').state_dict(), '{stem}.pth')\"\n"
  )
  convert = f'  python -m metrix_jax.weights convert {stem}.pth {stem}.npz\n'
  if os.path.splitext(path)[1].lower() in ('.pth', '.pt'):
    steps = (
      f'{save}and copy {stem}.pth to {path!r}. Training machines without torch: convert it once\n'
      f'{convert}and point the config at the .npz.'
    )
  else:
    steps = (
      f'{save}then convert it once (needs torch, not torchvision) so that training machines need no '
      f'torch:\n{convert}and copy {stem}.npz to {path!r} (or point the config at it).'
    )
  return (
    f'Produce it (torchvision ImageNet-1k V1 ResNet-{depth}) on a machine with internet and '
    f'torchvision:\n{steps} For random init, pass pretrained=None (results are then not comparable '
    f'with the paper).'
  )


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a torchvision-style state dict from `.pth`/`.pt`, `.npz` or `.safetensors` as numpy arrays.

  A `.pth` holding {'state_dict': ...} or {'model': ...} (training checkpoints) is unwrapped, and a
  DistributedDataParallel 'module.' prefix is stripped.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'Weights file {path!r} not found. {how_to_produce(path)}')
  ext = os.path.splitext(path)[1].lower()
  if ext == '.npz':
    with np.load(path, allow_pickle=False) as data:
      state = {k: data[k] for k in data.files}
  elif ext == '.safetensors':
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ImportError(
        f'Reading {path!r} needs the safetensors package (pip install safetensors), or '
        f'convert the file to .npz on a machine that has it.'
      ) from e
    state = dict(load_file(path))
  elif ext in ('.pth', '.pt'):
    try:
      import torch
    except ImportError as e:
      raise ImportError(
        f'Reading {path!r} needs torch, which is not installed. Convert it to .npz once on a machine '
        f'with torch: python -m metrix_jax.weights convert {path} '
        f'{os.path.splitext(path)[0]}.npz, then load the .npz (no torch needed).'
      ) from e
    obj = torch.load(path, map_location='cpu', weights_only=True)
    for wrapper in ('state_dict', 'model'):
      if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
      raise ValueError(
        f'{path!r} holds a {type(obj).__name__}, not a state dict; save `model.state_dict()`, not the model.'
      )
    state = {
      k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
      for k, v in obj.items()
      if isinstance(v, torch.Tensor)
    }
  else:
    raise ValueError(f'Unknown weights format {ext!r} for {path!r}; expected .pth, .pt, .npz or .safetensors.')
  if state and all(k.startswith('module.') for k in state):
    state = {k[len('module.') :]: v for k, v in state.items()}
  return state


def infer_depth(keys) -> int | None:
  """Depth of the torchvision ResNet whose state-dict keys are `keys` (None if not recognisable)."""
  blocks = []
  for stage in range(1, 5):
    indices = {int(m.group(1)) for k in keys if (m := re.match(rf'layer{stage}\.(\d+)\.', k))}
    blocks.append(max(indices) + 1 if indices else 0)
  kind = 'bottleneck' if any(k.endswith('.conv3.weight') for k in keys) else 'basic'
  return _TORCH_STAGES.get((*blocks, kind))


def _torch_key(flax_path: tuple[str, ...]) -> str:
  """('layer1_0', 'downsample_bn') -> 'layer1.0.downsample.1' (module path only, no leaf name)."""
  parts = []
  for name in flax_path:
    if m := re.fullmatch(r'(layer\d)_(\d+)', name):
      parts += [m.group(1), m.group(2)]
    elif name == 'downsample_conv':
      parts += ['downsample', '0']
    elif name == 'downsample_bn':
      parts += ['downsample', '1']
    else:
      parts.append(name)
  return '.'.join(parts)


def _expected_layout(depth: int) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """torch key -> (collection, flax path incl. leaf, torch-layout shape) for `ResNet(depth)`."""
  import jax
  import jax.numpy as jnp
  from metrix_jax import models

  shapes = jax.eval_shape(models.ResNet(depth=depth).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  layout = {}
  for collection, tree in shapes.items():
    for path, leaf in _flatten(tree):
      module, name = path[:-1], path[-1]
      if name == 'kernel':  # HWIO -> OIHW
        key, shape = _torch_key(module) + '.weight', tuple(leaf.shape[i] for i in (3, 2, 0, 1))
      else:
        torch_name = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}[name]
        key, shape = _torch_key(module) + '.' + torch_name, tuple(leaf.shape)
      layout[key] = (collection, path, shape)
  return layout


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _list(names, limit=12) -> str:
  names = sorted(names)
  return ', '.join(names[:limit]) + (f', ... ({len(names) - limit} more)' if len(names) > limit else '')


def convert_state_dict(state: Mapping[str, np.ndarray], *, depth: int = 50, source: str = 'state dict') -> dict:
  """torchvision ResNet state dict (numpy arrays) -> `ResNet(depth)` variables {'params', 'batch_stats'}.

  Raises ValueError naming missing/unexpected keys, wrong shapes and, when recognisable, the depth the
  checkpoint actually has.
  """
  import jax.numpy as jnp

  layout = _expected_layout(depth)
  present = {k for k in state if not IGNORED_KEY.search(k)}
  missing, unexpected = set(layout) - present, present - set(layout)
  if missing or unexpected:
    found = infer_depth(state.keys())
    hint = (
      f' The checkpoint looks like a ResNet-{found}, but depth={depth} was requested: '
      f'pass depth={found} or use a ResNet-{depth} checkpoint.'
      if found not in (None, depth)
      else ''
    )
    raise ValueError(
      f'{source} does not match torchvision ResNet-{depth}.{hint}'
      + (f'\n  missing keys ({len(missing)}): {_list(missing)}' if missing else '')
      + (f'\n  unexpected keys ({len(unexpected)}): {_list(unexpected)}' if unexpected else '')
    )
  bad = [
    f'{k}: {tuple(np.shape(state[k]))} (expected {shape})'
    for k, (_, _, shape) in layout.items()
    if tuple(np.shape(state[k])) != shape
  ]
  if bad:
    raise ValueError(f'{source}: wrong shapes for torchvision ResNet-{depth}:\n  ' + '\n  '.join(bad[:12]))

  variables: dict = {}
  for key, (collection, path, _) in layout.items():
    value = np.asarray(state[key], dtype=np.float32)
    if path[-1] == 'kernel':
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    _set(variables.setdefault(collection, {}), path, jnp.asarray(value))
  return variables


def load_torchvision(path: str, depth: int = 50) -> dict:
  """Reads a torchvision ResNet checkpoint (.pth / .npz / .safetensors) -> `ResNet(depth)` variables.

  Returns {'params': ..., 'batch_stats': ...} (float32), the classifier `fc` dropped. Errors: missing file
  (with how to produce it), missing optional reader (torch / safetensors), key/shape/depth mismatch.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'Weights file {path!r} not found. {how_to_produce(path, depth)}')
  return convert_state_dict(read_state_dict(path), depth=depth, source=repr(path))


def with_backbone(variables: Mapping, backbone_variables: Mapping) -> dict:
  """Puts `ResNet` variables (e.g. from `load_torchvision`) into `EmbeddingNet` variables.

  Returns a new {'params': {'backbone': <loaded>, 'head': <kept>}, 'batch_stats': {'backbone': <loaded>}};
  raises ValueError if the trees differ in structure or shapes (e.g. depth mismatch).
  """
  import jax

  out = {collection: dict(tree) for collection, tree in variables.items()}
  for collection in ('params', 'batch_stats'):
    old, new = variables[collection]['backbone'], backbone_variables[collection]
    old_shapes = jax.tree.map(lambda x: tuple(x.shape), old)
    new_shapes = jax.tree.map(lambda x: tuple(np.shape(x)), new)
    if old_shapes != new_shapes:
      raise ValueError(f"Backbone {collection!r} do not match the EmbeddingNet's backbone (different depth?).")
    out[collection]['backbone'] = new
  return out


def init_embedding_variables(
  model, key, *, pretrained: str | Mapping | None, image_size: int = 64, head: Mapping | None = None
) -> dict:
  """Initialises `model` (an `EmbeddingNet`) and loads the torchvision backbone from `pretrained`.

  Args:
    model: `metrix_jax.models.EmbeddingNet`.
    key: PRNG key for the head (and the backbone when `pretrained` is None).
    pretrained: path of the torchvision weights file (.pth/.npz/.safetensors); or backbone variables already
      loaded, {'params', 'batch_stats'} of the `ResNet` (e.g. a metrix_jax run's, `rundir.load_backbone`); or None
      for random init, which is logged as a warning: such results are not comparable with the paper.
    image_size: side of the dummy image used to initialise (variables do not depend on it).
    head: the head's params to keep (fine-tuning with the source run's head); None: initialised from `key`.
  Returns:
    {'params': {'backbone', 'head'}, 'batch_stats': {'backbone'}}, float32.
  """
  import jax
  import jax.numpy as jnp

  logger = logging.getLogger(__name__)
  if isinstance(pretrained, str) and not os.path.exists(pretrained):
    raise FileNotFoundError(
      f'Pretrained weights {pretrained!r} (ResNet-{model.depth}) not found. {how_to_produce(pretrained, model.depth)}'
    )
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  if pretrained is None:
    logger.warning(
      '!!! ResNet-%d backbone RANDOMLY INITIALISED (pretrained=None): results are NOT '
      'comparable with the paper, which starts from torchvision ImageNet-1k V1 weights. !!!',
      model.depth,
    )
    return jax.jit(model.init)(key, images)
  backbone = load_torchvision(pretrained, depth=model.depth) if isinstance(pretrained, str) else pretrained
  # Only the head is initialised (the same init as model.init); the backbone comes from the file.
  shapes = jax.eval_shape(model.init, key, images)
  feature_map = jnp.zeros(shapes['params']['head']['kernel'].shape[:1], jnp.float32)[None, None, None]
  new_head = jax.jit(lambda k, f: model.init(k, f, method='head'))(key, feature_map)['params']['head']
  if head is not None and jax.tree.map(np.shape, dict(head)) != jax.tree.map(np.shape, dict(new_head)):
    raise ValueError(
      f'The kept head has shapes {jax.tree.map(np.shape, dict(head))} but this model needs '
      f'{jax.tree.map(np.shape, dict(new_head))} (another embedding_dim?).'
    )
  variables = with_backbone(shapes, backbone)
  variables['params']['head'] = new_head if head is None else head
  logger.info(
    'Loaded ResNet-%d backbone from %s.',
    model.depth,
    pretrained if isinstance(pretrained, str) else 'the given variables',
  )
  return variables


def convert_file(src: str, dst: str, *, depth: int | None = None) -> int:
  """Converts a .pth/.safetensors state dict to .npz (same torch keys, float32). Returns the depth.

  The file is validated against `ResNet(depth)` (depth inferred from the keys when None). fc is kept so the
  .npz is a lossless copy; num_batches_tracked is dropped.
  """
  state = read_state_dict(src)
  depth = depth or infer_depth(state.keys())
  if depth is None:
    raise ValueError(f'{src!r} is not a recognisable torchvision ResNet-18/34/50 state dict; pass --depth.')
  convert_state_dict(state, depth=depth, source=repr(src))  # validates keys and shapes
  if not dst.endswith('.npz'):
    raise ValueError(f'Output {dst!r} must end with .npz.')
  np.savez(dst, **{k: np.asarray(v) for k, v in state.items() if not k.endswith('num_batches_tracked')})
  return depth


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m metrix_jax.weights', description='torchvision ResNet checkpoints for metrix_jax.'
  )
  sub = parser.add_subparsers(dest='command', required=True)
  convert = sub.add_parser('convert', help='.pth/.safetensors state dict -> .npz (no torch needed to load)')
  convert.add_argument('src', help='torchvision state dict (.pth, .pt or .safetensors)')
  convert.add_argument('dst', help='output .npz')
  convert.add_argument(
    '--depth', type=int, default=None, choices=(18, 34, 50), help='ResNet depth (default: inferred from the keys)'
  )
  args = parser.parse_args(argv)

  def work():
    depth = convert_file(args.src, args.dst, depth=args.depth)
    print(
      f'wrote {args.dst} (torchvision ResNet-{depth} state dict as numpy; '
      f'load with metrix_jax.weights.load_torchvision({args.dst!r}, depth={depth}))'
    )

  return cli.run_user_command(work, user_errors=cli.USER_ERRORS + (ImportError,))  # ImportError: torch missing


if __name__ == '__main__':
  sys.exit(main())
