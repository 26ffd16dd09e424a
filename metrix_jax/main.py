r"""Entry point: `python -m metrix_jax.main --config=configs/demo.py --workdir=/tmp/metrix_demo`.

Any config value can be overridden on the command line, e.g.

    python -m metrix_jax.main --config=configs/cub200.py:ms --workdir=workdirs/cub_ms \
      --config.mix.mode=feature --config.dataset.manual_dir=/data/cub --config.model.pretrained=resnet50.npz

Running the same command again resumes from the latest checkpoint in --workdir. Multi-host (every host of a TPU
pod, or several GPU hosts): add `--config.train.distributed=True` (or set METRIX_DISTRIBUTED=1) on every host.
"""
import logging
import os
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, config.json and results.json.')
flags.DEFINE_bool('verbose_libraries', False, 'Keep the INFO log lines of Orbax and other absl-logging libraries.')
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/demo.py or configs/cub200.py:ms,feature.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  config = FLAGS.config
  # jax.distributed.initialize() must come before anything queries devices (opt-in; see metrix_jax.sharding).
  from metrix_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed(config.train.distributed)

  import jax  # pylint: disable=g-import-not-at-top
  from metrix_jax import config_lib  # pylint: disable=g-import-not-at-top
  from metrix_jax import train  # pylint: disable=g-import-not-at-top

  try:
    config_lib.validate(config)
  except ValueError as e:  # a readable list of every problem, no traceback
    print(e, file=sys.stderr)
    return 2

  logging.getLogger('metrix_jax').setLevel(logging.INFO)
  if not FLAGS.verbose_libraries:  # Orbax / tfds INFO lines (dozens per checkpoint) bury the progress log
    logging.getLogger('absl').setLevel(logging.WARNING)
  logging.getLogger('metrix_jax').info('process %d/%d, local devices: %s', jax.process_index(),
                                       jax.process_count(), jax.local_devices())
  # only process 0 logs progress
  logging.getLogger('metrix_jax').setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  try:
    train.train_and_evaluate(config, os.path.expanduser(FLAGS.workdir))
  except train.NonFiniteLossError as e:
    absl_logging.error('%s', e)
    return 3
  return 0


def run():
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == '__main__':
  run()
