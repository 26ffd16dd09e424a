r"""In-Shop Clothes Retrieval (train / query / gallery), ResNet-50 ImageNet V1, official recipes (spec section 4).

    python -m metrix_jax.main --config=configs/inshop.py:ms,feature --workdir=workdirs/inshop_ms_metrix \
      --config.dataset.manual_dir=/data/inshop --config.model.pretrained=resnet50.npz

Balanced batches of 20 classes x 5 images; query -> gallery retrieval. Argument: a loss and a mix mode.
Expected (paper/README, R@1): contrastive 86.4, +Metrix 89.1; MS 90.1, +Metrix 92.2; PA 90.0, +Metrix 91.9.
"""

from metrix_jax import config_lib


def get_config(arg=None):
  loss, mode = config_lib.parse_recipe_arg(arg)
  c = config_lib.base_config()
  c.dataset.name = 'inshop'
  c.dataset.recall_ks = config_lib.RECALL_KS['inshop']
  c.dataset.eval_batch_size = 500
  c.loss.name = loss
  c.mix.mode = mode
  if loss == 'contrastive' and mode == 'none':
    config_lib.set_recipe(c, epochs=60, lr=3e-5, step=5, gamma=0.25, warm=1, bn_freeze=False, sampler='balanced')
  elif loss == 'contrastive':  # contrastive + Metrix
    config_lib.set_recipe(c, epochs=60, lr=1e-4, step=10, gamma=0.25, warm=5, bn_freeze=True, sampler='balanced')
  else:  # MS / PA (and the other losses), baseline and Metrix alike
    config_lib.set_recipe(c, epochs=60, lr=6e-4, step=20, gamma=0.25, warm=1, bn_freeze=False, sampler='balanced')
  c.train.eval_every_epochs = 10
  return c
