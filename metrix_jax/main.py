r"""Entry point: `python -m metrix_jax.main --config=configs/demo.py --workdir=/tmp/metrix_demo`.

Any config value can be overridden on the command line, e.g.

    python -m metrix_jax.main --config=configs/cub200.py:ms --workdir=workdirs/cub_ms \
      --config.mix.mode=feature --config.dataset.manual_dir=/data/cub --config.model.pretrained=resnet50.npz

Running the same command again resumes from the latest checkpoint in --workdir (a finished run prints its results).
SIGTERM or Ctrl-C saves a checkpoint after the current step and stops (a second Ctrl-C aborts at once). Exit
status: 0 done or stopped with a checkpoint, 2 a user mistake (one line on stderr), 3 a non-finite loss, 130
aborted by a second Ctrl-C. Multi-host (every host of a TPU
pod, or several GPU hosts): add `--config.train.distributed=True` (or set METRIX_DISTRIBUTED=1) on every host.
"""

import os
import shlex
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from metrix_jax import cli
from metrix_jax import config_lib
from metrix_jax import sharding
from metrix_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, config.json and results.json.')
flags.DEFINE_bool('verbose_libraries', False, 'Keep the INFO log lines of Orbax, tfds and grain.')
flags.DEFINE_bool(
  'allow_config_change',
  False,
  'Continue the checkpoints in --workdir with a config that differs from its config.json (kept as config.<step>.json).',
)
flags.DEFINE_string('compilation_cache', None, cli.COMPILATION_CACHE_HELP)
config_flags.DEFINE_config_file(
  'config', None, 'Config file, e.g. configs/demo.py or configs/cub200.py:ms,feature.', lock_config=True
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv) -> int:
  cli.reject_arguments(argv)
  config = FLAGS.config
  # jax.distributed.initialize() must come before anything queries devices (opt-in; see metrix_jax.sharding).
  sharding.maybe_initialize_distributed(config.train.distributed)
  status = cli.run_user_command(lambda: config_lib.validate(config))  # every problem at once, no traceback
  if status:
    return status
  cli.configure_logging(verbose_libraries=FLAGS.verbose_libraries)
  cli.enable_compilation_cache(FLAGS.compilation_cache)  # before the first compilation: a restart skips it
  import jax  # pylint: disable=g-import-not-at-top  # after the distributed initialisation

  absl_logging.info('process %d/%d, local devices: %s', jax.process_index(), jax.process_count(), jax.local_devices())
  command = 'python -m metrix_jax.main ' + ' '.join(shlex.quote(arg) for arg in sys.argv[1:])
  try:
    results = train.train_and_evaluate(
      config, os.path.expanduser(FLAGS.workdir), allow_config_change=FLAGS.allow_config_change
    )
  except (cli.UserError, FileNotFoundError) as error:  # an unusable workdir, a changed config, missing data
    return cli.report(error)
  except train.NonFiniteLossError as e:
    absl_logging.error('%s', e)
    return cli.EXIT_NON_FINITE
  except KeyboardInterrupt:
    print(
      'aborted by a second Ctrl-C: the steps since the last checkpoint are lost; rerun to resume:\n  ' + command,
      file=sys.stderr,
      flush=True,
    )
    return cli.EXIT_INTERRUPTED
  if 'stopped_at' in results:
    print(f'stopped at step {results["stopped_at"]} with a checkpoint; to resume, rerun:\n  {command}', flush=True)
  return cli.EXIT_OK


def run():
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
