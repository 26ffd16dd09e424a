"""What every entry point shares: logging levels, process-0 logging, and user mistakes as one line + exit 2.

Entry points (`metrix_jax.main`, `evaluate`, `embed`, `weights`, `data.builders`, `scripts/study.py`) wrap their
work in `run_user_command(fn)`: a `UserError` (or one of `USER_ERRORS`, the exceptions our validators raise with
a message that names the fix) becomes `error: <message>` on stderr and exit status 2; anything else is a bug of
ours and keeps its traceback.

    from metrix_jax import cli
    def _main(argv):
      cli.configure_logging(verbose_libraries=FLAGS.verbose_libraries)
      return cli.run_user_command(lambda: work(FLAGS.workdir))

Exit statuses: 0 done, 2 a user mistake (the message says how to fix it), 3 training stopped on a non-finite loss,
130 aborted by a second Ctrl-C.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_INTERRUPTED = 130  # a second Ctrl-C (128 + SIGINT, as shells report it)

# Loggers of libraries whose INFO lines bury the progress log (Orbax logs through absl; tfds and grain have
# their own). `configure_logging(verbose_libraries=True)` keeps them.
LIBRARY_LOGGERS = ('absl', 'orbax', 'tensorflow_datasets', 'grain', 'jax._src.xla_bridge', 'jax._src.distributed')


class UserError(Exception):
  """A problem the user can fix (missing workdir, bad checkpoint choice, ...); the message says how."""


# Raised by our validators with a message written for the user (config_lib.validate, data builders, ...).
USER_ERRORS = (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def configure_logging(*, verbose_libraries: bool = False, process_index: int | None = None) -> None:
  """metrix_jax logs INFO on process 0 (WARNING on the others); library loggers WARNING unless verbose.

  `process_index`: this process's index (default: `jax.process_index()`, which needs the backend: call this
  after `jax.distributed.initialize()` on multi-host runs).
  """
  for name in LIBRARY_LOGGERS:  # first: querying the process index below starts the backend, which logs
    logging.getLogger(name).setLevel(logging.INFO if verbose_libraries else logging.WARNING)
  if process_index is None:
    import jax  # pylint: disable=g-import-not-at-top  # keep `import metrix_jax.cli` free of jax

    process_index = jax.process_index()
  package = logging.getLogger('metrix_jax')
  package.setLevel(logging.INFO if process_index == 0 else logging.WARNING)
  root = logging.getLogger()
  if not root.handlers:  # not under absl.app / pytest: one handler on the root logger (absl then adds none of its own,
    # which would print every line twice), levels per logger as set here
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('%(levelname).1s %(asctime)s %(name)s] %(message)s', '%H:%M:%S'))
    root.addHandler(handler)


COMPILATION_CACHE_ENV = 'METRIX_JAX_COMPILATION_CACHE'
COMPILATION_CACHE_OFF = ('off', 'none', 'false', '0', '')
COMPILATION_CACHE_HELP = (
  "Folder of JAX's persistent compilation cache (a restart loads the compiled steps instead of compiling them "
  f"again); 'off' switches it off. Default: ${COMPILATION_CACHE_ENV}, else $XDG_CACHE_HOME/metrix_jax/"
  'jax_compilation_cache (~/.cache/... without XDG_CACHE_HOME).'
)


def compilation_cache_dir(path: str | None = None) -> str | None:
  """The persistent compilation cache folder to use, or None (off).

  Precedence: `path` (the --compilation_cache flag) > $METRIX_JAX_COMPILATION_CACHE > $JAX_COMPILATION_CACHE_DIR
  (JAX's own) > $XDG_CACHE_HOME/metrix_jax/jax_compilation_cache (~/.cache/metrix_jax/... when XDG_CACHE_HOME is
  unset). 'off', 'none', 'false', '0' or '' switch it off. Under pytest (PYTEST_CURRENT_TEST set) the default is
  off, so test runs never fill a user's cache; an explicit flag or variable still applies.
  """
  for value in (path, os.environ.get(COMPILATION_CACHE_ENV), os.environ.get('JAX_COMPILATION_CACHE_DIR')):
    if value is not None:
      return None if value.strip().lower() in COMPILATION_CACHE_OFF else os.path.abspath(os.path.expanduser(value))
  if 'PYTEST_CURRENT_TEST' in os.environ:
    return None
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'metrix_jax', 'jax_compilation_cache')


def enable_compilation_cache(path: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache in `compilation_cache_dir(path)` (before the first compilation);
  returns the folder, or None when it is off. Compiled programs that took >= 1 s to compile are stored (JAX's
  default; $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS changes it) and loaded by the next process that compiles the
  same program on the same backend and versions, so a restart skips the compilation. A cache never changes results:
  the key covers the program, the compile options, the devices and the jax/jaxlib versions. A folder that cannot
  be created is a warning and the run goes on without a cache.
  """
  import jax  # pylint: disable=g-import-not-at-top  # keep `import metrix_jax.cli` free of jax

  folder = compilation_cache_dir(path)
  if folder is None:
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as error:
    logging.getLogger(__name__).warning(
      'compilation cache off: cannot create %s (%s); set --compilation_cache=DIR or %s=DIR to move it, or =off.',
      folder,
      error,
      COMPILATION_CACHE_ENV,
    )
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', folder)
  logging.getLogger(__name__).info(
    'JAX compilation cache: %s (--compilation_cache=DIR or %s=DIR moves it, =off switches it off)',
    folder,
    COMPILATION_CACHE_ENV,
  )
  return folder


def reject_arguments(argv) -> None:
  """absl's `app.UsageError` for positional arguments (every option of our commands is a --flag)."""
  if len(argv) > 1:
    from absl import app  # pylint: disable=g-import-not-at-top  # keep `import metrix_jax.cli` free of absl

    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}; every option is a --flag=VALUE.')


def _flag_error_text(error: BaseException) -> str:
  """The user-relevant part of a flag-parsing error: ml_collections embeds the config file's traceback in its
  message (keep its last line) and wraps key typos in AttributeError/KeyError (say it is a config key)."""
  text = str(error).strip()
  if 'Traceback (most recent call last)' in text:
    head, _, trace = text.partition('Traceback (most recent call last)')
    last = [line for line in trace.splitlines() if line.strip()][-1].strip()
    text = f'{head.strip()} {last}'
  if isinstance(error, (AttributeError, KeyError)):
    text = 'a --config.KEY override names no key of the config: ' + text.strip('\'"').replace('\\n', ' ')
  return ' '.join(text.replace("\\'", "'").split())


def _command_name(argv0: str) -> str:
  """'python -m metrix_jax.main' when run as a module, else argv[0]."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  return f'python -m {spec.name}' if spec is not None and spec.name else argv0


def _missing_config_file(argv) -> str | None:
  """The path of `--config=PATH[:ARG]` when that file does not exist (ml_collections reports it lazily)."""
  for i, arg in enumerate(argv):
    value = (
      arg.split('=', 1)[1]
      if arg.startswith('--config=')
      else argv[i + 1]
      if arg == '--config' and i + 1 < len(argv)
      else None
    )
    if value is not None and not os.path.isfile(value.split(':', 1)[0]):
      return value.split(':', 1)[0]
  return None


def parse_flags(argv):
  """absl `flags_parser` for `app.run`: a mistyped flag, a bad value, a missing or broken --config file or a
  --config.KEY override of a key that does not exist is one line on stderr and exit 2 (no traceback)."""
  from absl import flags  # pylint: disable=g-import-not-at-top  # keep `import metrix_jax.cli` free of absl

  try:
    missing = _missing_config_file(argv)
    if missing is not None:
      raise UserError(f'the config file {missing} does not exist (e.g. --config=configs/demo.py).')
    return flags.FLAGS(argv)
  except UserError as error:
    text = str(error)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as error:
    text = _flag_error_text(error)
  print(f'error: {text}', file=sys.stderr)
  print(f'  ({_command_name(argv[0])} --helpshort lists the flags)', file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def error_line(error: BaseException) -> str:
  """`error: <message>` on one line of stderr (a message with several lines keeps them, indented)."""
  text = str(error).strip() or type(error).__name__
  if isinstance(error, KeyError) and text.startswith(("'", '"')):  # KeyError quotes its message
    text = text[1:-1]
  return 'error: ' + text.replace('\n', '\n  ')


def report(error: BaseException) -> int:
  """Prints `error_line(error)` to stderr; returns EXIT_USER_ERROR."""
  print(error_line(error), file=sys.stderr, flush=True)
  return EXIT_USER_ERROR


def run_user_command(
  fn: Callable[[], int | None], *, user_errors: tuple[type[BaseException], ...] = USER_ERRORS
) -> int:
  """`fn()`'s exit status (None -> 0); a user mistake -> one line on stderr and EXIT_USER_ERROR."""
  try:
    status = fn()
  except user_errors as error:
    return report(error)
  return EXIT_OK if status is None else int(status)
