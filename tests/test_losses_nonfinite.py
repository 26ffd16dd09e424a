"""Every loss propagates non-finite inputs: a NaN or inf in one embedding (or proxy) row gives a NaN loss, not a
finite loss with NaN gradients (the trainer's NaN stop then says what happened); finite inputs are unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metrix_jax import losses, mixup

NAMED = {
  'contrastive': losses.contrastive_loss,
  'multi_similarity': losses.multi_similarity_loss,
  'proxy_anchor': losses.proxy_anchor_loss,
  'circle': losses.circle_loss,
  'proxy_nca': losses.proxy_nca_loss,
  'lifted_structure': losses.lifted_structure_loss,
}


def _batch():
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(12, 8)).astype(np.float32)
  labels = np.repeat(np.arange(4), 3).astype(np.int32)
  proxies = rng.normal(size=(4, 8)).astype(np.float32)
  return embeddings, labels, proxies


@pytest.mark.parametrize('name', sorted(NAMED))
@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_a_non_finite_embedding_gives_a_non_finite_loss(name, bad):
  embeddings, labels, proxies = _batch()
  loss = losses.get(name)
  extra = (proxies,) if loss.uses_proxies else ()
  clean = float(loss(embeddings, labels, *extra))
  assert np.isfinite(clean)
  assert float(NAMED[name](embeddings, labels, *extra)) == clean  # the named function and the Loss object agree
  broken = embeddings.copy()
  broken[5, 2] = bad
  assert np.isnan(float(loss(broken, labels, *extra)))
  assert np.isnan(float(NAMED[name](broken, labels, *extra)))
  assert np.isnan(float(jax.jit(lambda e: loss(e, labels, *extra))(broken)))
  if loss.uses_proxies:
    bad_proxies = proxies.copy()
    bad_proxies[1, 0] = bad
    assert np.isnan(float(loss(embeddings, labels, bad_proxies)))
  # Metrix: the objective of a batch with a bad row is NaN too.
  plan = mixup.plan_for(
    jax.random.key(0),
    loss,
    labels,
    mixup.MixSettings(num_mixed=2),
    embeddings=embeddings,
    proxies=extra[0] if extra else None,
  )
  total, _ = mixup.objective(loss, broken, labels, plan, proxies=extra[0] if extra else None)
  assert np.isnan(float(total))


def test_finite_inputs_are_unchanged_bit_for_bit_and_gradients_too():
  embeddings, labels, _ = _batch()
  loss = losses.get('multi_similarity')
  plain = loss.from_similarity(*loss.clean_terms(embeddings, labels))
  assert float(loss(embeddings, labels)) == float(plain)
  grad = jax.grad(lambda e: loss(e, labels))(jnp.asarray(embeddings))
  grad_plain = jax.grad(lambda e: loss.from_similarity(*loss.clean_terms(e, labels)))(jnp.asarray(embeddings))
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(grad_plain))
  assert float(losses.nan_if_nonfinite(jnp.float32(1.5), None, jnp.ones(3))) == 1.5
