r"""Omniglot (real handwritten characters; class = alphabet/character; train/test split by alphabet).

    python -m metrix_jax.main --config=configs/omniglot.py:ms,feature --workdir=workdirs/omniglot_ms_metrix \
      --config.dataset.manual_dir=/data/omniglot

`--config.dataset.manual_dir` is the folder holding the official zips, unextracted (any subset of
`images_background.zip`, `images_evaluation.zip`, `images_background_small1.zip`, `images_background_small2.zip`
from https://github.com/brendenlake/omniglot, folder `python/`). Without it the builder looks in
`<data_dir>/downloads/manual`, and the error lists the files and where to get them.
ResNet-18 from random init at 64 px: CPU-sized; results are not comparable with the paper's benchmarks.
"""

from metrix_jax import config_lib


def get_config(arg=None):
  loss, mode = config_lib.parse_recipe_arg(arg or 'ms')
  c = config_lib.base_config()
  c.dataset.name = 'omniglot'
  c.dataset.manual_dir = None  # set on the command line: --config.dataset.manual_dir=DIR
  c.dataset.image_size = 64
  c.dataset.eval_resize = 64
  c.dataset.sampler = 'balanced'
  c.dataset.classes_per_batch = 20
  c.dataset.images_per_class = 5
  c.dataset.num_workers = 2
  c.dataset.recall_ks = config_lib.RECALL_KS['omniglot']

  c.model.depth = 18
  c.model.pretrained = None
  c.model.bn_freeze = False

  c.loss.name = loss
  c.mix.mode = mode

  c.optim.lr = 1e-3
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 0

  c.train.batch_size = 100
  c.train.num_epochs = 30
  c.train.eval_every_epochs = 10
  c.train.log_every_steps = 20
  return c
