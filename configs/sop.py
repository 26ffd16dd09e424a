r"""Stanford Online Products (Ebay_train / Ebay_test), ResNet-50 ImageNet V1, official recipes (spec section 4).

    python -m metrix_jax.main --config=configs/sop.py:ms,feature --workdir=workdirs/sop_ms_metrix \
      --config.dataset.manual_dir=/data/sop --config.model.pretrained=resnet50.npz

Balanced batches of 20 classes x 5 images. Argument: a loss (contrastive | ms | pa | circle | nca | lifted | nsoftmax
| cosface | arcface | subcenter | softtriple | margin | pair_nca | supcon | ntxent;
the losses without an official recipe use the MS/PA one) and a mix mode.
Expected (paper/README, R@1): contrastive 74.9, +Metrix 77.5; MS 76.9, +Metrix 81.0; PA 79.1, +Metrix 81.3.
"""

from metrix_jax import config_lib


def get_config(arg=None):
  loss, mode = config_lib.parse_recipe_arg(arg)
  c = config_lib.base_config()
  c.dataset.name = 'sop'
  c.dataset.recall_ks = config_lib.RECALL_KS['sop']
  c.dataset.eval_batch_size = 500
  c.loss.name = loss
  c.mix.mode = mode
  if loss == 'contrastive':
    config_lib.set_recipe(
      c, epochs=60, lr=3e-5, step=10, gamma=0.25, warm=5, bn_freeze=mode != 'none', sampler='balanced'
    )
  else:  # MS / PA (and the other losses), baseline and Metrix alike
    config_lib.set_recipe(c, epochs=60, lr=6e-4, step=20, gamma=0.25, warm=1, bn_freeze=False, sampler='balanced')
  c.train.eval_every_epochs = 10
  return c
