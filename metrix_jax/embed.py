r"""Embed a folder of images with a trained model.

    python -m metrix_jax.embed --workdir=DIR --images=FOLDER --out=FILE.npz

Every image file under FOLDER (recursively; extensions in `IMAGE_EXTENSIONS`, case-insensitive; hidden files and
folders skipped) goes through the run's eval preprocessing (`metrix_jax.data.pipeline.eval_transform`: resize the
shorter side to `dataset.eval_resize`, centre crop `dataset.image_size`, RGB) and the model of the chosen
checkpoint (best R@1 by default, as `metrix_jax.evaluate`), in batches over all local devices. Files that cannot
be decoded are reported and skipped.

The .npz holds
  paths       str [N]: file paths relative to FOLDER ('/'-separated), sorted;
  embeddings  float32 [N, D]: L2-normalised (cosine similarity = dot product), row i for paths[i];
  step        int: the checkpoint step used.
Load with `np.load(FILE)` (no pickle needed) to build your own retrieval index.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from absl import app
from absl import flags

from metrix_jax import cli
from metrix_jax import embedding
from metrix_jax import input_pipeline
from metrix_jax import progress
from metrix_jax import rundir
from metrix_jax import sharding
from metrix_jax.data import pipeline

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm', '.pbm')


def list_images(folder: str) -> list[str]:
  """Paths (relative to `folder`, '/'-separated, sorted) of the image files under `folder`, recursively."""
  folder = os.path.abspath(os.path.expanduser(folder))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'Image folder {folder} does not exist (or is not a folder).')
  found = []
  for root, dirs, files in os.walk(folder, followlinks=True):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    for name in files:
      if not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS):
        found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, '/'))
  if not found:
    raise ValueError(
      f'No image files under {folder} (looked recursively for '
      f'{", ".join(IMAGE_EXTENSIONS)}). Point --images at the folder that holds them.'
    )
  return sorted(found)


def _load(folder: str, relative: str, image_size: int, resize_size: int | None) -> np.ndarray | str:
  """uint8 [S, S, 3] with the eval preprocessing, or the error message if the file cannot be read."""
  try:
    with open(os.path.join(folder, relative), 'rb') as f:
      data = f.read()
    return pipeline.eval_transform(data, image_size, resize_size)
  except Exception as error:  # pylint: disable=broad-except  # PIL raises many kinds on bad files
    return f'{type(error).__name__}: {error}'


def embed_images(
  model,
  variables,
  config,
  folder: str,
  paths: Sequence[str],
  *,
  batch_size: int | None = None,
  num_threads: int | None = None,
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
  """Embeds `paths` (relative to `folder`) -> (kept paths, embeddings float32 [N, D], [(skipped path, why)]).

  `batch_size`: global images per step (default `config.dataset.eval_batch_size`), rounded up to a multiple of
  the device count; the last batch is zero-padded and the padding dropped.
  """
  if jax.process_count() > 1:
    raise ValueError(
      'metrix_jax.embed runs on one host (all its local devices); run it without '
      '--config.train.distributed / METRIX_DISTRIBUTED.'
    )
  mesh = sharding.make_mesh()
  batch_size = int(batch_size or config.dataset.eval_batch_size)
  batch_size = -(-batch_size // mesh.size) * mesh.size
  image_size = int(config.dataset.image_size)
  resize_size = input_pipeline.eval_resize(config)
  embed_fn = embedding.make_embed_fn(model, config, mesh)
  variables = sharding.replicate(variables, mesh)  # on device once, not per batch
  kept, chunks, skipped = [], [], []
  meter = progress.LoopProgress('embedding', len(paths), logger=log)
  folder = os.path.abspath(os.path.expanduser(folder))
  with ThreadPoolExecutor(max_workers=num_threads or min(8, os.cpu_count() or 1)) as pool:
    for start in range(0, len(paths), batch_size):
      names = list(paths[start : start + batch_size])
      loaded = list(pool.map(lambda p: _load(folder, p, image_size, resize_size), names))
      images = []
      for name, item in zip(names, loaded):
        if isinstance(item, str):
          log.warning('skipping %s: %s', name, item)
          skipped.append((name, item))
        else:
          kept.append(name)
          images.append(item)
      if not images:
        continue
      count = len(images)
      batch = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
      batch[:count] = np.stack(images)
      embeddings = embed_fn(variables, sharding.global_batch({'image': batch}, mesh)['image'])
      chunks.append(np.asarray(embeddings, np.float32)[:count])
      meter.update(len(names))
  if not kept:
    raise ValueError(
      f'None of the {len(paths)} image files under {folder} could be read '
      f'(first error: {skipped[0][0]}: {skipped[0][1]}).'
    )
  return kept, np.concatenate(chunks), skipped


def run(
  workdir: str,
  images: str,
  out: str,
  *,
  checkpoint: str | int = 'best',
  config=None,
  batch_size: int | None = None,
  model_factory: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
  """Embeds every image under `images` with the run in `workdir`; writes `out` (.npz); returns a summary dict."""
  paths = list_images(images)  # fail fast, before restoring the model
  out = os.path.abspath(os.path.expanduser(out))
  if not out.endswith('.npz'):
    raise ValueError(f'--out must be a .npz file path; got {out}.')
  trained = rundir.load_trained_model(workdir, checkpoint=checkpoint, config=config, model_factory=model_factory)
  kept, embeddings, skipped = embed_images(
    trained.model, trained.variables, trained.config, images, paths, batch_size=batch_size
  )
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = out[:-4] + f'.tmp{os.getpid()}.npz'
  np.savez(tmp, paths=np.asarray(kept, dtype=str), embeddings=embeddings, step=np.int64(trained.step))
  os.replace(tmp, out)
  return {
    'out': out,
    'num_embedded': len(kept),
    'dim': int(embeddings.shape[1]),
    'skipped': skipped,
    'step': trained.step,
  }


def main() -> int:
  """Command line; see the module docstring."""
  flags.DEFINE_string('images', None, 'Folder of images (searched recursively).', required=True)
  flags.DEFINE_string('out', None, 'Output .npz (paths, embeddings).', required=True)
  flags.DEFINE_integer('batch_size', None, 'Images per step (default: config.dataset.eval_batch_size).')
  flags.DEFINE_string('compilation_cache', None, cli.COMPILATION_CACHE_HELP)
  status = rundir.define_run_flags(sys.argv[1:], example='--config.dataset.image_size=256')
  if status:
    return status

  def _main(argv):
    cli.reject_arguments(argv)
    FLAGS = flags.FLAGS  # pylint: disable=invalid-name
    cli.configure_logging(verbose_libraries=FLAGS.verbose_libraries)
    cli.enable_compilation_cache(FLAGS.compilation_cache)  # before the first compilation

    def work():
      summary = run(
        FLAGS.workdir,
        FLAGS.images,
        FLAGS.out,
        checkpoint=FLAGS.checkpoint,
        config=FLAGS.config,
        batch_size=FLAGS.batch_size,
      )
      print(
        f'wrote {summary["out"]}: {summary["num_embedded"]} embeddings of dim {summary["dim"]} '
        f'(checkpoint step {summary["step"]})'
      )
      if summary['skipped']:
        print(f'skipped {len(summary["skipped"])} unreadable file(s):')
        for name, why in summary['skipped']:
          print(f'  {name}: {why}')

    return cli.run_user_command(work)

  app.run(_main, flags_parser=cli.parse_flags)
  return 0


if __name__ == '__main__':
  sys.exit(main())
