r"""Cars196 (classes 1-98 train, 99-196 test), ResNet-50 ImageNet V1, the official recipes (spec section 4).

    python -m metrix_jax.main --config=configs/cars196.py:ms,feature --workdir=workdirs/cars_ms_metrix \
      --config.dataset.manual_dir=/data/cars196 --config.model.pretrained=resnet50.npz

Argument: a loss (contrastive | ms | pa | circle | nca | lifted | nsoftmax
| cosface | arcface | subcenter | softtriple | margin | pair_nca | supcon | ntxent;
the losses without an official recipe use the MS/PA one) and a mix mode (none | input | feature | embedding).
Expected (paper/README, R@1): contrastive 81.6, +Metrix 85.1; MS 87.8, +Metrix 89.6; PA 87.6, +Metrix 89.1.
"""

from metrix_jax import config_lib


def get_config(arg=None):
  loss, mode = config_lib.parse_recipe_arg(arg)
  c = config_lib.base_config()
  c.dataset.name = 'cars196'
  c.dataset.recall_ks = config_lib.RECALL_KS['cars196']
  c.loss.name = loss
  c.mix.mode = mode
  if loss == 'contrastive':
    config_lib.set_recipe(c, epochs=60, lr=1e-4, step=10, gamma=0.1, warm=5, bn_freeze=True, sampler='random')
  else:  # MS / PA (and the other losses), baseline and Metrix alike
    config_lib.set_recipe(c, epochs=60, lr=1e-4, step=5, gamma=0.5, warm=5, bn_freeze=True, sampler='random')
  c.train.eval_every_epochs = 5
  return c
