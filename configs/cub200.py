r"""CUB-200-2011 (classes 1-100 train, 101-200 test), ResNet-50 ImageNet V1, the official recipes (spec section 4).

    python -m metrix_jax.main --config=configs/cub200.py:ms,feature --workdir=workdirs/cub_ms_metrix \
      --config.dataset.manual_dir=/data/cub --config.model.pretrained=resnet50.npz

The argument picks the recipe: a loss (contrastive | ms | pa | circle | nca | lifted | nsoftmax
| cosface | arcface | subcenter | softtriple | margin | pair_nca | supcon | ntxent;
the losses without an official recipe use the MS/PA one) and a mix mode (none | input | feature |
embedding; 'metrix' = feature). Expected (paper/README, R@1): contrastive 64.7, +Metrix 67.4; MS 67.8, +Metrix 71.4;
PA 69.5, +Metrix 71.0.
"""

from metrix_jax import config_lib


def get_config(arg=None):
  loss, mode = config_lib.parse_recipe_arg(arg)
  c = config_lib.base_config()
  c.dataset.name = 'cub200'
  c.dataset.recall_ks = config_lib.RECALL_KS['cub200']
  c.loss.name = loss
  c.mix.mode = mode
  if loss == 'contrastive':  # baseline and every Metrix mode
    config_lib.set_recipe(c, epochs=60, lr=1e-4, step=10, gamma=0.1, warm=5, bn_freeze=True, sampler='random')
  elif mode == 'none':  # MS / PA (and the other losses) baseline
    config_lib.set_recipe(c, epochs=60, lr=1e-4, step=5, gamma=0.5, warm=5, bn_freeze=True, sampler='random')
  else:  # MS / PA + Metrix: a longer budget on CUB only
    config_lib.set_recipe(c, epochs=100, lr=1e-4, step=10, gamma=0.5, warm=5, bn_freeze=True, sampler='random')
  c.train.eval_every_epochs = 5
  return c
