"""Devices: one mesh of every device with a 'data' axis; the batch sharded along it, parameters replicated.

The train step is one `jax.jit` over global arrays: the loss and Metrix mixing see the global batch (XLA inserts
the collectives), so a run gives the same numbers on 1 CPU, 8 GPUs or a TPU pod. Each host feeds its own slice of
the global batch (`global_batch`).

Multi-host is opt-in (`maybe_initialize_distributed`): `jax.distributed.initialize()` must run before any device
query, and its auto-detection can pick up a scheduler you did not mean. Enable it with
`--config.train.distributed=True` or `METRIX_DISTRIBUTED=1`; on Cloud TPU VMs and SLURM nothing else is needed,
elsewhere set `METRIX_COORDINATOR=host:port`, `METRIX_NUM_PROCESSES` and `METRIX_PROCESS_ID`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXIS = 'data'
_initialized = False


def distributed_requested(flag: bool = False) -> bool:
  return bool(flag) or os.environ.get('METRIX_DISTRIBUTED', '0').lower() in ('1', 'true', 'yes')


def maybe_initialize_distributed(flag: bool = False) -> bool:
  """`jax.distributed.initialize()` when asked (flag or METRIX_DISTRIBUTED=1); returns whether it ran."""
  global _initialized
  if _initialized or not distributed_requested(flag):
    return _initialized
  kwargs = {}
  if os.environ.get('METRIX_COORDINATOR'):
    kwargs = dict(
      coordinator_address=os.environ['METRIX_COORDINATOR'],
      num_processes=int(os.environ['METRIX_NUM_PROCESSES']),
      process_id=int(os.environ['METRIX_PROCESS_ID']),
    )
  jax.distributed.initialize(**kwargs)
  _initialized = True
  return True


def make_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh ('data',) over all devices (or `devices`), with Auto axes (GSPMD propagates shardings)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def per_host_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """The slice of the global batch this host loads; checks that it splits evenly over hosts and devices."""
  num_devices, num_hosts = mesh.devices.size, jax.process_count()
  if global_batch_size % num_devices:
    raise ValueError(
      f'The global batch size {global_batch_size} must be divisible by the number of devices '
      f'({num_devices}); set --config.train.batch_size to a multiple of {num_devices}.'
    )
  return global_batch_size // num_hosts


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's slice of the batch (leading axis) -> global arrays sharded along 'data' over all hosts."""
  sharding = batch_sharding(mesh)
  num_hosts = jax.process_count()

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * num_hosts,) + x.shape[1:])

  return jax.tree.map(put, local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host values (identical on every host) -> replicated global arrays."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def describe(mesh: Mesh) -> str:
  local = jax.local_devices()
  return (
    f'process {jax.process_index()}/{jax.process_count()}; mesh {dict(mesh.shape)} over '
    f'{mesh.devices.size} {jax.default_backend()} devices ({len(local)} local: '
    f'{", ".join(str(d) for d in local[:8])}{" ..." if len(local) > 8 else ""})'
  )


def log_startup(mesh: Mesh) -> None:
  log.info('%s', describe(mesh))
