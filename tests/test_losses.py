"""The loss against an independent NumPy implementation of docs/method.md §4, and closed forms."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from spcl_jax import losses


def tsp(kappa):
  return losses.make_similarity("tsp", {"kappa": kappa})


def np_tsp(c, kappa):
  return 0.5 * (1 + c) / (1 + (1 - c) * kappa)


def np_logsumexp(x):
  m = np.max(x)
  return m + math.log(np.sum(np.exp(x - m)))


def np_reference(z1, z2, log_s, sim, negatives, max_scale=100.0):
  """Loops over rows, written from the paper's eq. 2 (float64)."""
  z1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
  z2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
  s = math.exp(min(log_s, math.log(max_scale)))
  b = len(z1)
  if negatives == "all":
    z = np.concatenate([z1, z2])
    total = 0.0
    for i in range(2 * b):
      partner = (i + b) % (2 * b)
      others = [j for j in range(2 * b) if j != i]
      row = np.array([sim(z[i] @ z[j]) * s for j in others])
      total += np_logsumexp(row) - sim(z[i] @ z[partner]) * s
    return total / (2 * b)
  ce = []
  for a, c in ((z1, z2), (z2, z1)):
    total = 0.0
    for i in range(b):
      row = np.array([sim(a[i] @ c[j]) * s for j in range(b)])
      total += np_logsumexp(row) - row[i]
    ce.append(total / b)
  return 0.5 * (ce[0] + ce[1])


@pytest.mark.parametrize("negatives", ["all", "cross"])
@pytest.mark.parametrize("name,params,np_sim", [
    ("tsp", {"kappa": 1 / 64}, lambda c: np_tsp(c, 1 / 64)),
    ("tsp", {"kappa": 0.5}, lambda c: np_tsp(c, 0.5)),
    ("tsp", {"kappa": 4.0}, lambda c: np_tsp(c, 4.0)),
    ("cosine", {"kappa": 0.5}, lambda c: c),
])
def test_matches_numpy_reference(negatives, name, params, np_sim):
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(6, 16)), rng.normal(size=(6, 16))
  log_s = math.log(1 / 0.07)
  got = losses.spcl_loss(jnp.float32(z1), jnp.float32(z2), jnp.float32(log_s),
                         similarity=losses.make_similarity(name, params), negatives=negatives)
  want = np_reference(z1, z2, log_s, np_sim, negatives)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_similarity_table_binds_parameters_from_the_config():
  config = ml_collections.ConfigDict({"similarity": "tsp", "kappa": 0.25})
  cos = jnp.array([0.3])
  np.testing.assert_allclose(losses.similarity_from_config(config)(cos), np_tsp(0.3, 0.25),
                             rtol=1e-6)
  config.similarity = "cosine"
  np.testing.assert_allclose(losses.similarity_from_config(config)(cos), 0.3, rtol=1e-6)
  with pytest.raises(ValueError, match="similarity must be one of"):
    losses.make_similarity("dot", {})


def test_tsp_similarity_closed_form():
  cos = jnp.array([1.0, 0.0, -1.0])
  np.testing.assert_allclose(losses.tsp_similarity(cos, 1.0), [1.0, 0.25, 0.0], rtol=1e-6)
  np.testing.assert_allclose(losses.tsp_similarity(cos, 1 / 64), [1.0, 0.5 / (1 + 1 / 64), 0.0],
                             rtol=1e-6)


@pytest.mark.slow
def test_all_embeddings_identical_gives_log_of_negatives_plus_one():
  # Every logit equals s: each row is a uniform softmax over 2B - 1 columns.
  z = jnp.ones((5, 8))
  loss = losses.spcl_loss(z, z, jnp.log(10.0), similarity=tsp(0.1), negatives="all")
  np.testing.assert_allclose(float(loss), math.log(2 * 5 - 1), rtol=1e-6)
  loss = losses.spcl_loss(z, z, jnp.log(10.0), similarity=tsp(0.1), negatives="cross")
  np.testing.assert_allclose(float(loss), math.log(5), rtol=1e-6)


def test_partners_identical_and_negatives_orthogonal():
  # z1 = z2 = e_i: positive sim 1, every negative cos 0 -> sim 0.5/(1+kappa).
  b, kappa, s = 4, 0.25, 5.0  # loss ~0.2: well inside float32 resolution
  z = jnp.eye(b, 8)
  loss = losses.spcl_loss(z, z, jnp.log(s), similarity=tsp(kappa), negatives="all")
  neg = 0.5 / (1 + kappa) * s
  want = -s + math.log(math.exp(s) + 2 * (b - 1) * math.exp(neg))
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  retrieval = losses.pair_retrieval_top1(z, z, similarity=tsp(kappa))
  assert float(retrieval) == 1.0


@pytest.mark.slow
def test_scale_is_clamped_with_zero_gradient_above_the_cap():
  z1, z2 = jnp.eye(3, 4), jnp.eye(3, 4)[::-1]
  grad = jax.grad(lambda ls: losses.spcl_loss(z1, z2, ls, similarity=tsp(0.1)))
  assert float(grad(jnp.log(200.0))) == 0.0
  assert float(grad(jnp.log(10.0))) != 0.0
  np.testing.assert_allclose(float(losses.logit_scale(jnp.log(200.0))), 100.0, rtol=1e-6)


def test_retrieval_counts_rows_whose_best_other_is_the_partner():
  z1 = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  # z2[1] is z1[0] itself, so z1[0] and z2[1] find each other instead of their partners.
  z2 = jnp.array([[1.0, 0.1], [1.0, 0.0]])
  got = float(losses.pair_retrieval_top1(z1, z2, similarity=tsp(1e-3)))
  z = np.concatenate([np.asarray(z1), np.asarray(z2)])
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  sims = z @ z.T
  np.fill_diagonal(sims, -np.inf)
  want = np.mean(np.argmax(sims, axis=1) == np.array([2, 3, 0, 1]))
  assert got == want and 0 < got < 1


def test_unknown_negatives_mode_is_refused():
  with pytest.raises(ValueError, match="negatives"):
    losses.spcl_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), 0.0, similarity=tsp(0.1),
                     negatives="some")
