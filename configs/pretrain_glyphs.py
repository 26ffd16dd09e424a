r"""Pretraining source for transfer studies: ResNet-18 on the generated `glyphs` classes (no download).

    python -m metrix_jax.main --config=configs/pretrain_glyphs.py --workdir=workdirs/pretrain_glyphs

Rerunning the same command resumes an interrupted run (checkpoints every 250 steps). The backbone it trains is
what `--config.model.pretrained=workdirs/pretrain_glyphs` (or `configs/study/metrix.py:omniglot_transfer`) loads.

Source: the `glyphs` data set (`metrix_jax/data/demo.py`): every non-Latin glyph class the fonts give (Greek,
Cyrillic, Armenian, Georgian, arrows, mathematical operators, technical and geometric shapes, miscellaneous
symbols, Braille: 1,291 classes with matplotlib 3.10's fonts), 30 rendered instances each; 7/8 of the classes train
(33,900 images), 1/8 are held out and are this run's test split, so the Recall@K it prints is the source model's
retrieval on unseen source classes. None of Omniglot's test alphabets (Latin, Japanese katakana, Early Aramaic,
Tagalog) is in the source: Latin, IPA and the letterlike symbols are left out, and the fonts hold no katakana,
Aramaic or Tagalog.

Recipe: ResNet-18 from random init at 32 px (BN trained: nothing pretrained to protect), 512-d embedding, Proxy
Anchor (one proxy per class, proxies at 100x the learning rate, the paper's loss), balanced batches of 25 classes x
4 images, Adam lr 1e-3 with a cosine schedule, 4,000 steps (~11.8 epochs). Measured 2026-11-30 on a 2-core CPU
(jax 0.10.2, tests running beside it part of the time): 20 min (344 images/s on average, ~465 when alone), held-out
R@1 / R@2 / R@4 / R@8 = 88.39 / 93.33 / 96.73 / 98.43 on the 161 unseen glyph classes (4,830 images; chance R@1
0.6%); at epochs 3 / 6 / 9: R@1 16.9 / 60.6 / 85.9.
"""

from metrix_jax import config_lib


def get_config(arg=None):
  del arg  # one recipe
  c = config_lib.base_config()
  c.dataset.name = 'glyphs'
  c.dataset.image_size = 32
  c.dataset.eval_resize = 32
  c.dataset.sampler = 'balanced'
  c.dataset.classes_per_batch = 25
  c.dataset.images_per_class = 4
  c.dataset.num_workers = 0
  c.dataset.eval_batch_size = 500
  c.dataset.recall_ks = config_lib.RECALL_KS['glyphs']

  c.model.depth = 18
  c.model.pretrained = None
  c.model.bn_freeze = False

  c.loss.name = 'proxy_anchor'
  c.mix.mode = 'none'

  c.optim.lr = 1e-3
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 0

  c.train.batch_size = 100
  c.train.num_epochs = 12
  c.train.num_steps = 4000
  c.train.eval_every_epochs = 3
  c.train.checkpoint_every_steps = 250
  c.train.log_every_steps = 50
  return c
