"""The project's one JSON writer (and strict reader): every .json / .jsonl file metrix_jax writes goes through here.

Output is strict JSON (RFC 8259: `jq`, browsers and every strict parser accept it): NaN, inf and -inf are written
as `null`, never as the bare tokens `NaN`/`Infinity` (which `json.dumps` emits by default) nor as strings.
numpy/jax scalars and arrays become Python numbers and lists, mapping keys strings, tuples lists, ConfigDicts
dicts. `read_json` rejects the non-standard tokens, naming the file.

    write_json(path, value)     # indented, atomic for local paths (temp file + os.replace), gs://... via etils
    jsonl_line(value)           # one line (with its newline) for an append-only .jsonl log
    read_json(path)             # strict parse

Light on purpose: stdlib + numpy at import (etils only for cloud paths, imported there).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
  """`value` as plain JSON data (dict with str keys, list, str, int, float, bool, None), recursively.

  numpy/jax scalars and arrays -> Python numbers / nested lists; mapping keys -> str; tuples (and lists) -> lists;
  NaN, inf, -inf -> None; ConfigDicts and other objects with `to_dict()` -> dicts; dataclass instances -> dicts;
  enum members -> their value; dtypes and dtype classes (np.float32, jnp.bfloat16) -> their name ('bfloat16');
  anything else (a path, a function: odd config values) -> `str(value)`.
  """
  if isinstance(value, (str, bool)) or value is None:
    return value
  if isinstance(value, type) or isinstance(value, np.dtype):
    return _type_name(value)
  if callable(getattr(value, 'to_dict', None)):  # ml_collections.ConfigDict (not a Mapping)
    return to_jsonable(value.to_dict())
  if isinstance(value, Mapping):
    return {str(key): to_jsonable(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(item) for item in value]
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, (np.ndarray, np.generic)) or (hasattr(value, '__array__') and hasattr(value, 'dtype')):
    array = np.asarray(value)  # numpy or jax: [...] -> nested lists, [] -> a Python scalar
    if array.dtype.kind not in 'biufO':
      array = array.astype(str)  # complex, strings, dates: their text
    return to_jsonable(array.tolist()) if array.ndim else to_jsonable(array.item())
  if dataclasses.is_dataclass(value):
    return to_jsonable(dataclasses.asdict(value))
  if isinstance(value, enum.Enum):
    return to_jsonable(value.value)
  return str(value)  # an odd config value (a path, a function): its text, as json.dumps(default=str) would


def _type_name(value: Any) -> str:
  """'float32' for np.dtype('float32'), np.float32 or jnp.bfloat16 (a config's dtype); else the class name."""
  if isinstance(value, np.dtype):
    return value.name
  if issubclass(value, np.generic) or isinstance(getattr(value, 'dtype', None), np.dtype):
    return np.dtype(value).name
  return value.__name__


def dumps(value: Any, *, indent: int | None = 2) -> str:
  """Strict JSON text of `to_jsonable(value)` (no trailing newline); `indent=None` for one line."""
  return json.dumps(to_jsonable(value), indent=indent, allow_nan=False)


def jsonl_line(value: Any) -> str:
  """One line of a .jsonl log: `dumps(value, indent=None)` + '\\n' (write it with `file.write`)."""
  return dumps(value, indent=None) + '\n'


def is_remote(path: str | os.PathLike) -> bool:
  """True for cloud paths such as gs://bucket/run (anything with '://')."""
  return '://' in str(path)


def write_json(path: str | os.PathLike, value: Any) -> str:
  """Writes `dumps(value)` + '\\n' to `path`; returns the path as a string.

  Local paths: parent folders are created and the write is atomic (a temp file in the same folder, then
  `os.replace`): a reader sees the old file or the new one, never half of one, and no temp file is left.
  Cloud paths (gs://...): one object write through `etils.epath`.
  """
  text = dumps(value) + '\n'  # serialise first: an unwritable value leaves no file behind
  if is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top

    epath.Path(str(path)).write_text(text)
    return str(path)
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
  try:
    with open(tmp, 'x', encoding='utf-8') as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def _reject_token(path: str):
  def reject(token: str):
    raise ValueError(
      f'{path} is not strict JSON: it holds the token {token} (NaN/Infinity are not JSON; '
      f'metrix_jax.jsonio writes null for them). Replace {token} with null in the file.'
    )

  return reject


def read_json(path: str | os.PathLike) -> Any:
  """Parses the JSON file `path` strictly (local or gs://...).

  Raises:
    FileNotFoundError / OSError: the file cannot be read.
    ValueError: not valid strict JSON, e.g. a bare NaN/Infinity token; the message names the file.
  """
  if is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top

    text = epath.Path(str(path)).read_text()
  else:
    with open(os.fspath(path), encoding='utf-8') as f:
      text = f.read()
  name = str(path)
  try:
    return json.loads(text, parse_constant=_reject_token(name))
  except json.JSONDecodeError as error:
    raise ValueError(f'{name} is not valid JSON: {error}.') from None


__all__ = ['dumps', 'is_remote', 'jsonl_line', 'read_json', 'to_jsonable', 'write_json']
