r"""Study config of `scripts/study.py`: does Metrix raise Recall@K? The argument picks the data set.

    nice -n 10 python scripts/study.py --config=configs/study/metrix.py:omniglot --workdir=workdirs/study_omniglot \
      --config.manual_dir=/data/omniglot
    python scripts/study.py --config=configs/study/metrix.py:cub200 --workdir=workdirs/study_cub200 \
      --config.manual_dir=/data/cub --config.pretrained=resnet50.npz

A study config is not a trainer config: it names the trainer config every run starts from (`trainer_config`),
the rows (`<loss>,<mix mode>` recipe arguments of that trainer config, as in `configs/omniglot.py:ms,feature`),
the seeds, and `--config.KEY=VALUE` overrides of the trainer config applied to every run (`overrides`). The same
script runs the paper's benchmarks with `configs/study/metrix.py:<dataset>` (cub200, cars196, sop, inshop):
each run is then the trainer config's official recipe (`configs/<dataset>.py:<loss>,<mix>`, ResNet-50 at 224 px,
the README budgets) unchanged, with the ImageNet weights given by `--config.pretrained`.

Omniglot sizing: a 2-core CPU shared with ~5 other jobs (load average ~10; these runs niced), where one ResNet-18
step of 100 images at 32 px took ~12 s and the end-of-run evaluation of the 2,240 test images minutes: 24 runs at
32 px would take hours. So: ResNet-18 from random init at 16 x 16 pixels (the 105 px glyphs downsampled; about
half the cost of 32 px), 30 steps of 20 classes x 5 images (about 1.2 epochs of the 2,600 training images), Adam
lr 1e-3 with a cosine schedule (configs/omniglot.py otherwise). This is the very start of training: the study
measures whether Metrix changes what is learned in that budget, not what it does at convergence. At 16 px the
last two ResNet stages are 1 x 1, so feature-level Metrix mixes the pooled 512-d features before the head (GMP is
the identity there); with images of >= 64 px the 2-D maps are mixed as in the paper. Results are not comparable
with the paper's benchmarks (pretrained ResNet-50 at 224 px, 60+ epochs).

`configs/study/metrix.py:omniglot_300` is the longer-budget addendum: the same recipe for 300 steps (about 11.5
epochs), MS and contrastive, baseline vs feature-level Metrix, and MS at input and embedding level, 3 seeds
(18 runs, ~3-8 min each on 2 cores).
"""

from ml_collections import config_dict

# The 8 rows of the study: baseline vs +Metrix (feature level) for three losses, input and embedding level for MS.
ROWS = (
  'ms,none',
  'ms,feature',
  'ms,input',
  'ms,embedding',
  'contrastive,none',
  'contrastive,feature',
  'pa,none',
  'pa,feature',
)


def base_study_config() -> config_dict.ConfigDict:
  """Every key scripts/study.py reads."""
  s = config_dict.ConfigDict()
  s.name = 'study'
  s.trainer_config = 'configs/omniglot.py'  # relative to the repository root (or absolute)
  s.rows = ROWS
  s.seeds = (1, 2, 3)
  s.overrides = ()  # ('train.num_steps=300', ...): --config.KEY=VALUE for every run
  # Data and weights locations (set on the command line: --config.manual_dir=/data/cub ...); None: the trainer
  # config's default (no manual dir: the builder's <data_dir>/downloads/manual; the data set may be built already).
  s.manual_dir = config_dict.placeholder(str)
  s.data_dir = config_dict.placeholder(str)
  s.pretrained = config_dict.placeholder(str)
  s.report_ks = (1, 2, 4)  # columns of the table (the plot shows every K the trainer evaluates)
  s.baselines = {'feature': 'none', 'input': 'none', 'embedding': 'none'}  # each Metrix row vs its loss's baseline
  # Per-run analysis with `python -m metrix_jax.evaluate` (utilization, alignment, uniformity, positivity).
  s.evaluate = config_dict.ConfigDict()
  s.evaluate.enabled = True
  s.evaluate.when = 'end'  # 'end': after all training runs (recall first); 'each': right after each run
  s.evaluate.checkpoint = 'latest'  # the last step: the model the recall table reports (no test-set selection)
  s.evaluate.utilization = True  # embeds the train split too
  s.evaluate.positivity = True
  s.positivity_row = 'ms,feature'  # the row whose positivity curve (mean over seeds) is plotted
  return s


# Table columns per data set (the spec's reported Ks).
REPORT_KS = {
  'omniglot': (1, 2, 4),
  'demo': (1, 2, 4),
  'cub200': (1, 2, 4),
  'cars196': (1, 2, 4),
  'sop': (1, 10, 100),
  'inshop': (1, 10, 20),
}


def get_config(arg=None):
  dataset = (arg or 'omniglot').strip()
  if dataset == 'omniglot_300':  # the longer-budget addendum (RESULTS.md): 10x the steps, MS (all levels), contrastive
    s = get_config('omniglot')
    s.name = 'omniglot_cpu_300'
    s.rows = ('ms,none', 'ms,feature', 'ms,input', 'ms,embedding', 'contrastive,none', 'contrastive,feature')
    s.overrides = tuple(o for o in s.overrides if not o.startswith(('train.num_steps=', 'train.log_every_steps=')))
    s.overrides += ('train.num_steps=300', 'train.log_every_steps=50')
    return s
  if dataset not in REPORT_KS:
    raise ValueError(
      f'Unknown study data set {dataset!r}; choose one of {", ".join(REPORT_KS)} (or '
      f'omniglot_300), e.g. --config=configs/study/metrix.py:omniglot.'
    )
  s = base_study_config()
  s.name = dataset
  s.trainer_config = f'configs/{dataset}.py'
  s.report_ks = REPORT_KS[dataset]
  if dataset != 'omniglot':  # the trainer config's own recipe, unchanged
    return s
  s.name = 'omniglot_cpu'
  s.trainer_config = 'configs/omniglot.py'
  s.overrides = (
    'dataset.image_size=16',
    'dataset.eval_resize=16',
    'dataset.num_workers=0',  # decoding 100 small PNGs per step is cheap; no worker processes on 2 cores
    'dataset.eval_batch_size=500',
    'train.num_steps=30',
    'train.eval_every_epochs=0',  # evaluate once, at the end (the last step is the reported model)
    'train.checkpoint_every_steps=1000',  # the trainer also checkpoints at the end
    'train.log_every_steps=10',
  )
  return s
