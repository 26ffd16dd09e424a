"""Shared pytest fixtures for tests/.

Fixtures
--------
`x64`
    float64 inside the requesting test only: `jax.enable_x64(True)` for the test's duration, restored on exit
    (also on failure). Never flips `jax_enable_x64` for the session (DESIGN.md, conventions). Use it for every
    comparison against a float64 reference at 1e-9-level tolerances::

        def test_matches_reference(x64):
          np.testing.assert_allclose(float(losses.contrastive_loss(emb, labels)), ref_value, rtol=1e-9)

`fake_devices_runner`
    Returns `run_with_fake_devices(code: str, num_devices: int = 4, timeout: float = 180) ->
    subprocess.CompletedProcess`: runs the python snippet `code` (dedented) in a fresh interpreter
    (`sys.executable -c code`, cwd = repository root) whose jax sees `num_devices` fake CPU devices
    (`XLA_FLAGS=--xla_force_host_platform_device_count=N`, other XLA flags of this process kept;
    `JAX_PLATFORMS=cpu`). The repository root and tests/ are on its PYTHONPATH, so the snippet can import
    `metrix_jax` and `reference`. stdout/stderr are captured as text; the return code is NOT checked (callers
    assert it, showing stderr). The device count of a process is fixed when jax starts, hence the subprocess;
    this is how multi-device code paths run on a 1-device machine. Typical use (print one marked JSON line)::

        def test_four_devices(fake_devices_runner):
          proc = fake_devices_runner('''
              import json, jax
              print('RESULT' + json.dumps({'n': jax.device_count()}))
          ''', num_devices=4)
          assert proc.returncode == 0, proc.stderr[-3000:]
          assert json.loads(proc.stdout.split('RESULT', 1)[1])['n'] == 4

    Each call pays an interpreter start and a jax import (~2-4 s on a loaded 2-core CPU) plus its compilations:
    put everything a test needs from the devices in one snippet.
"""

import os
import subprocess
import sys
import textwrap

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)
_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


@pytest.fixture
def x64():
  """float64 inside the test only (never flips jax_enable_x64 for the session)."""
  import jax  # pylint: disable=g-import-not-at-top

  with jax.enable_x64(True):
    yield


def run_with_fake_devices(code: str, num_devices: int = 4, timeout: float = 180) -> subprocess.CompletedProcess:
  """`python -c code` with `num_devices` fake CPU devices; see the module docstring."""
  if num_devices < 1:
    raise ValueError(f'num_devices must be >= 1, got {num_devices}')
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=' '.join(flags + [f'{_DEVICE_COUNT_FLAG}={num_devices}']),
    PYTHONPATH=os.pathsep.join([ROOT, TESTS_DIR] + [p for p in [os.environ.get('PYTHONPATH')] if p]),
  )
  return subprocess.run(
    [sys.executable, '-c', textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
  )


@pytest.fixture
def fake_devices_runner():
  """The function `run_with_fake_devices(code, num_devices=4, timeout=180) -> CompletedProcess` (see above)."""
  return run_with_fake_devices
