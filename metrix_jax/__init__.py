"""metrix_jax: deep metric learning with Metrix (mixup for metric learning) in JAX/Flax.

Submodules are imported on demand so that `from metrix_jax import losses` stays light in a notebook:
`losses`, `mixup`, `evaluation` and `analysis` need only jax and numpy.
"""

__version__ = '0.1.0'
