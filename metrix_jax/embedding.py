"""The embedding model of a config, and embedding data with it (training's eval hook, `evaluate`, `embed`).

    model = embedding.create_model(config)                      # EmbeddingNet: images -> [B, D] unit rows
    variables = embedding.model_variables(params, batch_stats)  # {'params': {backbone, head}, 'batch_stats'}
    embed_fn = embedding.make_embed_fn(model, config, mesh)     # jitted: (variables, uint8 [B, H, W, 3]) -> [B, D]
    embedded = embedding.embed_splits(embed_fn, variables, {'test': batches}, mesh)  # {split: (emb, labels)}

Batches are this host's rows of global eval batches, {'image': uint8 [b, H, W, 3], 'label': int [b],
'mask': bool [b]} (padding rows have mask False and are dropped). Normalisation (ImageNet mean/std) happens on
device. Embeddings come back as float32 numpy [N, D] on every host, in batch order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from metrix_jax import data as data_lib
from metrix_jax import models
from metrix_jax import progress
from metrix_jax import sharding

log = logging.getLogger(__name__)


def create_model(config) -> models.EmbeddingNet:
  """`EmbeddingNet` of `config.model`: ResNet-`depth` -> GAP+GMP -> Dense(`embedding_dim`) -> L2, in `dtype`
  (float32 embeddings); BatchNorm frozen (running statistics, `bn_freeze=True`) or trained."""
  return models.EmbeddingNet(
    depth=config.model.depth,
    embedding_dim=config.model.embedding_dim,
    dtype=jnp.dtype(config.model.dtype),
    bn_mode='frozen' if config.model.bn_freeze else 'trainable',
  )


def model_variables(params: Mapping[str, Any], batch_stats: Any) -> dict[str, Any]:
  """The model's variables from the trained parameters: {'params': {'backbone', 'head'}, 'batch_stats'}.

  `params` may hold more than the model (a proxy loss's 'proxies' [C, D]); they are left out.
  """
  return {'params': {'backbone': params['backbone'], 'head': params['head']}, 'batch_stats': batch_stats}


def make_embed_fn(model, config, mesh):
  """jit over `mesh`: (variables (replicated), images uint8 [B, H, W, 3] sharded on 'data') -> embeddings
  float32 [B, D] (replicated), with the eval-mode model (BN running statistics) in `config.model.dtype`."""
  dtype = jnp.dtype(config.model.dtype)

  def embed(variables, images):
    embeddings, _ = model.apply(variables, data_lib.normalize_images(images, dtype), train=False)
    return embeddings

  return jax.jit(
    embed,
    in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )


def embed_dataset(
  embed_fn, variables, batches: Iterable[Mapping[str, Any]], mesh, max_items: int = 0, *, what: str = 'embedding'
) -> tuple[np.ndarray, np.ndarray]:
  """Embeds every valid (mask) item of `batches` -> (embeddings float32 [N, D], labels [N]), on all hosts.

  `max_items` > 0 stops after the first `max_items` valid items (the same batches on every host). Logs
  progress with an ETA every 10 s (`what` names the loop).
  """
  total = getattr(batches, 'num_examples', None)  # EvalIterable: the split's size (padding excluded)
  total = min(total, max_items) if total and max_items else (total or max_items or None)
  meter = progress.LoopProgress(what, total, logger=log)
  chunks, labels, count = [], [], 0
  for batch in batches:
    local = {k: np.asarray(v) for k, v in batch.items()}
    meta = {'label': local['label'], 'mask': local.get('mask', np.ones(local['label'].shape, bool))}
    embeddings = embed_fn(variables, sharding.global_batch({'image': local['image']}, mesh)['image'])
    if jax.process_count() > 1:
      meta = multihost_utils.process_allgather(meta, tiled=True)
    keep = np.asarray(meta['mask'], bool)
    chunks.append(np.asarray(embeddings, np.float32)[keep])
    labels.append(np.asarray(meta['label'])[keep])
    count += int(keep.sum())
    meter.update(int(keep.sum()))
    if max_items and count >= max_items:
      break
  if not chunks:
    raise ValueError('The evaluation split is empty.')
  embeddings, labels = np.concatenate(chunks), np.concatenate(labels)
  if max_items:
    embeddings, labels = embeddings[:max_items], labels[:max_items]
  return embeddings, labels


def collect_images(batches: Iterable[Mapping[str, Any]], indices) -> dict[int, np.ndarray]:
  """{index: image [H, W, 3]} of the valid (mask) items at `indices` of `batches`, counted as `embed_dataset`
  counts them (the i-th valid item is row i of its embeddings). Stops after the largest index. This process's
  rows only: call it in single-process evaluation."""
  wanted = {int(i) for i in np.asarray(indices).reshape(-1)}
  found, count = {}, 0
  for batch in batches:
    images = np.asarray(batch['image'])
    mask = np.asarray(batch.get('mask', np.ones(len(images), bool)), bool)
    for image in images[mask]:
      if count in wanted:
        found[count] = image
      count += 1
    if len(found) == len(wanted):
      break
  missing = sorted(wanted - set(found))
  if missing:
    raise ValueError(f'items {missing[:5]} are not in the split ({count} items).')
  return found


def embed_splits(
  embed_fn, variables, splits: Mapping[str, Iterable[Mapping[str, Any]]], mesh, max_items: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{split: (embeddings float32 [N, D], labels [N])} for every split of `splits` ({'test'} or {'query',
  'gallery'}, optionally 'train'); `max_items` > 0 keeps the first that many items of each split."""
  out = {}
  for split, batches in splits.items():
    log.info('embedding the %s split...', split)
    out[split] = embed_dataset(embed_fn, variables, batches, mesh, max_items, what=f'embedding {split}')
  return out
