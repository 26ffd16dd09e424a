"""metrix_jax.jsonio: the one JSON writer: the values it writes (NaN -> null, numpy/jax -> numbers), atomic writes,
the strict reader, a light import; and every committed .json of the repository is strict and machine-free."""

import dataclasses
import enum
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from metrix_jax import jsonio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _strict_loads(text):
  def reject(token):
    raise AssertionError(f'non-standard token {token}')

  return json.loads(text, parse_constant=reject)


# ----------------------------------------------------------------------------------------------------------------
# Values.
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  'value',
  [math.nan, math.inf, -math.inf, np.float32('nan'), np.float64('-inf'), jnp.float32(jnp.inf), np.array(np.nan)],
)
def test_non_finite_becomes_null(value):
  assert jsonio.to_jsonable(value) is None
  assert jsonio.dumps({'x': value}, indent=None) == '{"x": null}'
  assert jsonio.jsonl_line([value, 1.5]) == '[null, 1.5]\n'


def test_numpy_and_jax_values():
  data = {
    'f32': np.float32(0.25),
    'f64': np.float64(0.1),
    'i64': np.int64(7),
    'u8': np.uint8(255),
    'yes': np.bool_(True),
    'no': np.bool_(False),
    'curve': np.arange(3),
    'grid': np.eye(2, dtype=np.int32),
    'jax': jnp.asarray([1.5, np.nan]),
    'jax_scalar': jnp.int32(4),
    'jax_bool': jnp.asarray(True),
    'names': np.array(['a', 'b']),
  }
  out = jsonio.to_jsonable(data)
  assert out == {
    'f32': 0.25,
    'f64': 0.1,
    'i64': 7,
    'u8': 255,
    'yes': True,
    'no': False,
    'curve': [0, 1, 2],
    'grid': [[1, 0], [0, 1]],
    'jax': [1.5, None],
    'jax_scalar': 4,
    'jax_bool': True,
    'names': ['a', 'b'],
  }
  types = {k: type(v) for k, v in out.items() if not isinstance(v, list)}
  assert types == {
    'f32': float,
    'f64': float,
    'i64': int,
    'u8': int,
    'yes': bool,
    'no': bool,
    'jax_scalar': int,
    'jax_bool': bool,
  }
  assert type(out['curve'][0]) is int and type(out['jax'][0]) is float
  assert jsonio.to_jsonable(np.float32(0.1)) == float(np.float32(0.1))  # the float32 value, not 0.1


def test_containers_keys_and_tuples():
  data = {1: ({'a': (1, (2, 3))}, [np.int64(4)]), np.int64(10): 'x', 0.5: None, 'nested': ((), [])}
  assert jsonio.to_jsonable(data) == {'1': [{'a': [1, [2, 3]]}, [4]], '10': 'x', '0.5': None, 'nested': [[], []]}


def test_config_dict_and_odd_config_values():
  class Mode(enum.Enum):
    FAST = 'fast'

  @dataclasses.dataclass
  class Point:
    x: float
    y: tuple

  config = ml_collections.ConfigDict(
    {
      'model': {'dtype': jnp.bfloat16, 'depth': 50},
      'optim': {'lr': 1e-4, 'betas': (0.9, 0.999), 'clip': math.nan},
      'np_dtype': np.dtype('float32'),
      'np_type': np.float16,
      'mode': Mode.FAST,
      'path': pathlib.PurePosixPath('data/cub'),
      'point': Point(1.0, (2, 3)),
    }
  )
  out = jsonio.to_jsonable(config)
  assert out == {
    'model': {'dtype': 'bfloat16', 'depth': 50},
    'optim': {'lr': 1e-4, 'betas': [0.9, 0.999], 'clip': None},
    'np_dtype': 'float32',
    'np_type': 'float16',
    'mode': 'fast',
    'path': 'data/cub',
    'point': {'x': 1.0, 'y': [2, 3]},
  }
  frozen = ml_collections.FrozenConfigDict({'a': (1, 2)})
  assert jsonio.to_jsonable(frozen) == {'a': [1, 2]}
  assert jsonio.to_jsonable(ValueError) == 'ValueError'  # a class: its name
  assert jsonio.to_jsonable(1 + 2j) == '(1+2j)'


def test_dumps_is_strict_and_indented():
  text = jsonio.dumps({'a': [1, math.nan], 'b': {'c': np.float32(2.0)}})
  assert text == '{\n  "a": [\n    1,\n    null\n  ],\n  "b": {\n    "c": 2.0\n  }\n}'
  assert 'NaN' not in jsonio.dumps(np.full(4, np.nan)) and 'Infinity' not in jsonio.dumps([np.inf, -np.inf])
  line = jsonio.jsonl_line({'step': 3, 'loss': np.float32(0.5), 'lr': [1e-3, math.nan]})
  assert line.endswith('\n') and line.count('\n') == 1
  assert _strict_loads(line) == {'step': 3, 'loss': 0.5, 'lr': [1e-3, None]}


# ----------------------------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------------------------
def test_write_json_round_trip_atomic_and_creates_folders(tmp_path):
  path = jsonio.write_json(tmp_path / 'a' / 'b' / 'out.json', {'x': np.nan, 'k': {1: np.int64(2)}})
  assert path == str(tmp_path / 'a' / 'b' / 'out.json')
  with open(path) as f:
    text = f.read()
  assert text.endswith('}\n') and _strict_loads(text) == {'x': None, 'k': {'1': 2}}
  assert jsonio.read_json(path) == {'x': None, 'k': {'1': 2}}
  jsonio.write_json(path, [1, 2])  # replaces the file
  assert jsonio.read_json(path) == [1, 2]
  assert os.listdir(tmp_path / 'a' / 'b') == ['out.json']  # no temp file left


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
  path = tmp_path / 'out.json'
  jsonio.write_json(path, {'old': True})

  def broken_replace(src, dst):
    raise OSError('disk full')

  monkeypatch.setattr(jsonio.os, 'replace', broken_replace)
  with pytest.raises(OSError, match='disk full'):
    jsonio.write_json(path, {'new': True})
  assert os.listdir(tmp_path) == ['out.json'] and jsonio.read_json(path) == {'old': True}


def test_cloud_path_is_one_object_write(monkeypatch):
  from etils import epath

  objects = {}

  class FakeCloudPath:
    def __init__(self, path):
      self.path = str(path)

    def write_text(self, text):
      objects[self.path] = text

    def read_text(self):
      return objects[self.path]

  monkeypatch.setattr(epath, 'Path', FakeCloudPath)
  assert jsonio.write_json('gs://bucket/run/results.json', {'r': np.float32(0.5), 'n': np.nan}) == (
    'gs://bucket/run/results.json'
  )
  assert list(objects) == ['gs://bucket/run/results.json']
  assert _strict_loads(objects['gs://bucket/run/results.json']) == {'r': 0.5, 'n': None}
  assert jsonio.read_json('gs://bucket/run/results.json') == {'r': 0.5, 'n': None}
  assert jsonio.is_remote('gs://b/x') and not jsonio.is_remote('/tmp/x') and not jsonio.is_remote('x')


@pytest.mark.parametrize('token', ['NaN', 'Infinity', '-Infinity'])
def test_read_json_rejects_non_standard_tokens_naming_the_file(tmp_path, token):
  path = tmp_path / 'legacy.json'
  path.write_text('{"a": [1, %s]}' % token)
  with pytest.raises(ValueError, match=re.escape(str(path)) + '.*not strict JSON.*' + re.escape(token)):
    jsonio.read_json(path)


def test_read_json_names_the_file_of_broken_json(tmp_path):
  path = tmp_path / 'half.json'
  path.write_text('{"a": [1, ')
  with pytest.raises(ValueError, match=re.escape(str(path)) + ' is not valid JSON'):
    jsonio.read_json(path)
  with pytest.raises(FileNotFoundError):
    jsonio.read_json(tmp_path / 'missing.json')


def test_import_is_light():
  code = (
    'import sys, metrix_jax.jsonio; '
    'print(sorted(m for m in ("jax", "etils", "matplotlib", "ml_collections") if m in sys.modules))'
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, check=True)
  assert out.stdout.strip() == '[]'


# ----------------------------------------------------------------------------------------------------------------
# The committed .json files of the repository.
# ----------------------------------------------------------------------------------------------------------------
_ABSOLUTE = re.compile(r'^(/|~|[A-Za-z]:[\\/]|\\\\)|/work/|/tmp/|/home/|/Users/')


def _committed_json_files():
  out = subprocess.run(
    ['git', 'ls-files', '-z', '--', '*.json'], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout
  return sorted(name for name in out.split('\0') if name)


def _strings(value, where=''):
  if isinstance(value, dict):
    for key, item in value.items():
      yield f'{where}.{key} (key)', key
      yield from _strings(item, f'{where}.{key}')
  elif isinstance(value, list):
    for i, item in enumerate(value):
      yield from _strings(item, f'{where}[{i}]')
  elif isinstance(value, str):
    yield where, value


def test_committed_json_is_strict_and_has_no_absolute_paths():
  files = _committed_json_files()
  assert any(name.startswith('results/') for name in files), files  # the walk sees the committed studies
  for name in files:
    value = jsonio.read_json(os.path.join(ROOT, name))  # strict: a NaN token fails here, naming the file
    bad = [(where, s) for where, s in _strings(value) if _ABSOLUTE.search(s)]
    assert not bad, f'{name} holds absolute paths of the machine that wrote it: {bad[:5]}'
