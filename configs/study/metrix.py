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

**The transfer regime** (issue 15), `configs/study/metrix.py:omniglot_transfer`: where the paper makes its claim,
a backbone pretrained on a large labelled source and fine-tuned on disjoint target classes with frozen BN. Source:
`python -m metrix_jax.main --config=configs/pretrain_glyphs.py --workdir=workdirs/pretrain_glyphs` (20 min on 2
cores; 1,130 non-Latin glyph classes, none of Omniglot's test alphabets). Then

    python scripts/study.py --config=configs/study/metrix.py:omniglot_transfer --workdir=workdirs/transfer \
      --config.manual_dir=/data/omniglot --config.pretrained=workdirs/pretrain_glyphs
    python scripts/study.py --config=configs/study/metrix.py:omniglot_transfer_scratch \
      --workdir=workdirs/transfer_scratch --config.manual_dir=/data/omniglot

Recipe (both): Omniglot split by alphabet, ResNet-18 at 32 px, 512-d embedding, Adam, backbone lr 1e-4 with the
head at 10x, cosine schedule, 650 steps of 20 classes x 5 images (25 epochs of the 2,600-image split), the last
step reported. Transfer: the glyph backbone and its BN statistics (head re-initialised), BN frozen, the backbone
frozen for the first 2 epochs (the head warms up alone). Scratch: random init, BN trained, no warm-up: what
pretraining itself changed. Rows: MS and contrastive, each without and with feature-level Metrix, and MS with
embedding-level Metrix (transfer); MS without / with feature-level Metrix (scratch). Seeds 1-5 for every row.

**Pre-registered primary endpoint** (written before any transfer run): the paired difference in test Recall@1
(percentage points) of MS + feature-level Metrix minus MS in the transfer study, over seeds 1-5 paired by seed, with
its 95% t interval (4 degrees of freedom); study.md reports it first. The paper's claim is supported if the interval
lies above 0, contradicted if it lies below 0, and undecided otherwise. Secondary (reported, not the endpoint): the
contrastive pair, MS + embedding-level vs MS, 5-way 1-shot and 20-way 1-shot episode accuracy, utilization (the
paper's claim: Metrix raises it), alignment, uniformity and positivity; the scratch study as the reference for what
pretraining changed. Measured cost on a 2-core CPU (2026-11-30, the CPU conv path for both): ~3 min per transfer
run alone (171-186 s; up to 6 min with other jobs beside it), ~4.5 min per scratch run with another study beside
it; the transfer study took 94 min of training + 7 min of evaluation, the scratch study 51 + 3 min.
Results: RESULTS.md, first section (run after this endpoint was written).
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
  # The pre-registered primary endpoint (study.md's first section): `primary` row minus its baseline at R@primary_k,
  # paired by seed, with a 95% t interval. None: no primary endpoint.
  s.primary = config_dict.placeholder(str)
  s.primary_k = 1
  s.requires_pretrained = ''  # non-empty: the command that trains the source (the study refuses to run without it)
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
  if dataset in ('omniglot_transfer', 'omniglot_transfer_scratch'):
    return transfer_study(scratch=dataset.endswith('_scratch'))
  if dataset not in REPORT_KS:
    raise ValueError(
      f'Unknown study data set {dataset!r}; choose one of {", ".join(REPORT_KS)} (or '
      f'omniglot_300, omniglot_transfer, omniglot_transfer_scratch), e.g. --config=configs/study/metrix.py:omniglot.'
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


# The transfer regime (issue 15): fine-tuning the glyph-pretrained ResNet-18 (configs/pretrain_glyphs.py).
TRANSFER_ROWS = ('ms,none', 'ms,feature', 'contrastive,none', 'contrastive,feature', 'ms,embedding')
TRANSFER_OVERRIDES = (
  'dataset.image_size=32',
  'dataset.eval_resize=32',
  'dataset.num_workers=0',
  'dataset.eval_batch_size=500',
  'optim.lr=1e-4',  # backbone
  'optim.head_lr_mult=10.0',
  'optim.schedule=cosine',
  'optim.warmup_epochs=2',  # the backbone frozen for the first 2 epochs: the head warms up alone
  'train.num_epochs=25',
  'train.num_steps=650',  # 25 epochs of the 2,600-image training split at batch 100 (full Omniglot: ~1.5 epochs)
  'train.eval_every_epochs=0',
  'train.checkpoint_every_steps=250',
  'train.log_every_steps=50',
)


def transfer_study(scratch: bool = False) -> config_dict.ConfigDict:
  """Omniglot fine-tuned from the glyph source; `scratch`: the same recipe from random init (what pretraining did)."""
  s = base_study_config()
  s.name = 'omniglot_transfer_scratch' if scratch else 'omniglot_transfer'
  s.trainer_config = 'configs/omniglot.py'
  s.report_ks = REPORT_KS['omniglot']
  s.seeds = (1, 2, 3, 4, 5)
  s.primary = 'ms,feature'
  s.primary_k = 1
  if scratch:
    s.rows = ('ms,none', 'ms,feature')
    s.overrides = TRANSFER_OVERRIDES + ('model.bn_freeze=False', 'optim.warmup_epochs=0', 'model.pretrained=None')
  else:
    s.rows = TRANSFER_ROWS
    s.overrides = TRANSFER_OVERRIDES + ('model.bn_freeze=True',)
    s.requires_pretrained = (
      'python -m metrix_jax.main --config=configs/pretrain_glyphs.py --workdir=workdirs/pretrain_glyphs'
    )
  return s
