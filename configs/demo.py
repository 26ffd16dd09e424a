r"""The embedded default: generated glyph classes (no download), ResNet-18 from random init at small images.

    python -m metrix_jax.main --config=configs/demo.py --workdir=/tmp/metrix_demo

Finishes in a few minutes on a 2-core CPU and prints Recall@K on held-out classes, far above chance.
The argument picks a loss and a mix mode like the benchmark configs, e.g. `configs/demo.py:contrastive,none`
(default: multi-similarity + Metrix at feature level). Random-init results are not comparable with the paper.
"""

from metrix_jax import config_lib


def get_config(arg=None):
  loss, mode = config_lib.parse_recipe_arg(arg or 'ms,feature')
  c = config_lib.base_config()
  c.dataset.name = 'demo'
  c.dataset.image_size = 32
  c.dataset.eval_resize = 32
  c.dataset.sampler = 'balanced'
  c.dataset.classes_per_batch = 16
  c.dataset.images_per_class = 4
  c.dataset.num_workers = 0
  c.dataset.eval_batch_size = 256
  c.dataset.recall_ks = config_lib.RECALL_KS['demo']

  c.model.depth = 18
  c.model.pretrained = None
  c.model.embedding_dim = 128
  c.model.bn_freeze = False  # random init: BN statistics must be learned

  c.loss.name = loss
  c.mix.mode = mode

  c.optim.lr = 1e-3
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 0  # nothing pretrained to protect

  c.train.batch_size = 64
  c.train.num_epochs = 1
  c.train.num_steps = 150
  c.train.eval_every_epochs = 0
  c.train.checkpoint_every_steps = 50
  c.train.log_every_steps = 10
  return c
