"""Tests of jaxsam.sharpness on closed forms (quadratics) and finite differences (a tiny CNN)."""

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import enable_x64

from jaxsam import sharpness

DIM = 40
# Well separated top eigenvalues (ratios <= 0.8) over a bulk that includes negative curvature,
# as a network's Hessian has: 30 Lanczos steps resolve the top 4 far below 1e-4.
TOP = np.array([10.0, 7.0, 5.0, 4.0])


def spectrum_matrix(seed=0, dim=DIM):
  """A = Q diag(lam) Q^T with a known spectrum and a random orthogonal Q."""
  rng = np.random.default_rng(seed)
  bulk = rng.uniform(-0.5, 2.0, size=dim - len(TOP))
  lam = np.concatenate([TOP, bulk])
  q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  return (q * lam) @ q.T, lam


def quadratic_params(a):
  """L(w) = 1/2 w^T A w on a two-leaf pytree (so flattening is exercised), split in 2 batches."""
  a = jnp.asarray(a, jnp.float32)
  unflat = lambda w: {"x": w[: DIM // 2], "y": {"z": w[DIM // 2 :]}}
  flat = lambda p: jnp.concatenate([p["x"], p["y"]["z"]])

  def loss_fn(params, batch):  # each batch contributes a share, the sum is the whole loss
    w = flat(params)
    return batch * 0.5 * w @ a @ w

  return loss_fn, unflat, flat, [jnp.float32(0.25), jnp.float32(0.75)]


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b) / np.abs(b))


# -------------------------------------------------------------------------------- quadratic


def test_hvp_of_quadratic_is_a_times_v():
  a, _ = spectrum_matrix()
  loss_fn, unflat, _, batches = quadratic_params(a)
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=DIM), jnp.float32)
  v = jnp.asarray(rng.normal(size=DIM), jnp.float32)
  matvec, dim = sharpness.hessian_matvec(loss_fn, unflat(w), batches)
  assert dim == DIM
  np.testing.assert_allclose(matvec(v), a @ np.asarray(v), rtol=1e-4, atol=1e-4)


def test_lanczos_top_k_matches_spectrum():
  a, _ = spectrum_matrix()
  loss_fn, unflat, _, batches = quadratic_params(a)
  matvec, dim = sharpness.hessian_matvec(loss_fn, unflat(jnp.zeros(DIM)), batches)
  eig = sharpness.lanczos(matvec, dim, num_iters=30, k=4, key=jax.random.PRNGKey(0))
  # float32 vectors with full reorthogonalisation: Ritz values are good to ~1e-6 relative.
  assert rel(eig.eigenvalues, TOP) <= 1e-4
  assert eig.num_matvecs == 30
  # The residual bound is honest: it bounds the actual error (|theta - lambda| <= r).
  assert np.all(np.abs(eig.eigenvalues - TOP) <= eig.residuals + 1e-4)


def test_lanczos_exact_when_iterations_reach_dimension():
  a, lam = spectrum_matrix(seed=3, dim=12)
  eig = sharpness.lanczos(
    lambda v: jnp.asarray(a, jnp.float32) @ v, 12, num_iters=50, k=12, key=jax.random.PRNGKey(1)
  )
  assert eig.num_matvecs <= 12
  np.testing.assert_allclose(eig.eigenvalues, np.sort(lam)[::-1], rtol=1e-4, atol=1e-5)


def test_power_iteration_top_k_matches_spectrum():
  a, _ = spectrum_matrix()
  with enable_x64():  # the stopping tolerance 1e-10 is below float32 resolution
    a64 = jnp.asarray(a)
    eig = sharpness.power_iteration(
      lambda v: a64 @ v,
      DIM,
      num_iters=400,
      k=3,
      tol=1e-10,
      key=jax.random.PRNGKey(0),
      dtype=jnp.float64,
    )
  assert rel(eig.eigenvalues, TOP[:3]) <= 1e-4


def test_hutchinson_exact_on_diagonal():
  # Rademacher probes have v_i^2 = 1, so v^T D v = tr(D) exactly for a diagonal D: one probe is
  # exact, and only float32 summation error (~1e-7 relative) remains.
  d = jnp.asarray(np.random.default_rng(0).uniform(-1, 5, size=DIM), jnp.float32)
  tr = sharpness.hutchinson_trace(lambda v: d * v, DIM, num_probes=3, key=jax.random.PRNGKey(0))
  assert rel(tr.trace, float(np.sum(d))) <= 1e-4
  assert tr.stderr <= 1e-4 * abs(tr.trace)


def test_hutchinson_unbiased_within_its_standard_error():
  # A dense A needs ~1e9 probes for 1e-4, so check the estimator statistically instead: with the
  # closed-form variance 2 (||A||_F^2 - sum A_ii^2), the mean of n probes lies within 4 standard
  # errors of tr(A) (fixed seed: deterministic, and a biased estimator would fail), and the
  # reported standard error matches the closed form to the accuracy of a 400-sample std (~10 %).
  a, lam = spectrum_matrix()
  loss_fn, unflat, _, batches = quadratic_params(a)
  matvec, dim = sharpness.hessian_matvec(loss_fn, unflat(jnp.zeros(DIM)), batches)
  n = 400
  tr = sharpness.hutchinson_trace(matvec, dim, num_probes=n, key=jax.random.PRNGKey(7))
  sigma = np.sqrt(2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2)))
  assert abs(tr.trace - lam.sum()) <= 4 * sigma / np.sqrt(n)
  assert 0.8 <= tr.stderr / (sigma / np.sqrt(n)) <= 1.2


def test_landscape_equals_closed_form():
  a, _ = spectrum_matrix()
  loss_fn, unflat, _, batches = quadratic_params(a)
  rng = np.random.default_rng(2)
  w = rng.normal(size=DIM)
  d1, d2 = rng.normal(size=DIM), rng.normal(size=DIM)
  xs, ys = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 3)
  eval_fn = lambda p: {"loss": float(sum(loss_fn(p, b) for b in batches))}
  as_tree = lambda x: unflat(jnp.asarray(x, jnp.float32))
  grid = sharpness.landscape(eval_fn, as_tree(w), [as_tree(d1), as_tree(d2)], [xs, ys])
  expected = np.array(
    [[0.5 * (w + x * d1 + y * d2) @ a @ (w + x * d1 + y * d2) for y in ys] for x in xs]
  )
  assert grid["loss"].shape == (5, 3)
  np.testing.assert_allclose(grid["loss"], expected, rtol=1e-4, atol=1e-4)
  line = sharpness.landscape(eval_fn, as_tree(w), [as_tree(d1)], [xs])
  np.testing.assert_allclose(line["loss"], expected[:, 1], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- sharpness


def linear_regression(seed=0, groups=6, m=5, dim=7):
  """Per-group loss 1/2 mean (x.w - y)^2: a quadratic with A = X^T X / m, g = A w - X^T y / m."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(groups, m, dim))
  y = rng.normal(size=(groups, m))
  w = rng.normal(size=dim)
  loss_fn = lambda p, b: 0.5 * jnp.mean((b[0] @ p["w"] - b[1]) ** 2)
  return loss_fn, {"w": jnp.asarray(w, jnp.float32)}, x, y, w


def test_one_step_sharpness_closed_form():
  # For a quadratic, L(w + eps) - L(w) = g.eps + 1/2 eps^T A eps; SAM's eps = rho g/||g||.
  loss_fn, params, x, y, w = linear_regression()
  rho = 0.3
  batch = (jnp.asarray(x[0], jnp.float32), jnp.asarray(y[0], jnp.float32))
  got = sharpness.ascent_sharpness(loss_fn, params, batch, rho=rho, steps=1)
  a = x[0].T @ x[0] / 5
  g = a @ w - x[0].T @ y[0] / 5
  expected = rho * np.linalg.norm(g) + 0.5 * rho**2 * g @ a @ g / (g @ g)
  assert got.shape == (1,)
  assert rel(got[0], expected) <= 1e-4


def trust_region_max(a, g, rho):
  """max_{||e|| = rho} g.e + 1/2 e^T A e, by bisection on the secular equation
  (e = (sI - A)^-1 g)."""
  lam, q = np.linalg.eigh(a)
  gq = q.T @ g
  norm = lambda s: np.linalg.norm(gq / (s - lam))
  lo, hi = lam[-1] + 1e-12, lam[-1] + np.linalg.norm(g) / rho + 1.0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if norm(mid) > rho else (lo, mid)
  e = q @ (gq / (0.5 * (lo + hi) - lam))
  return g @ e + 0.5 * e @ a @ e


def test_multi_step_ascent_approaches_the_true_maximum():
  loss_fn, params, x, y, w = linear_regression(seed=1)
  rho = 1.0
  batch = (jnp.asarray(x[0], jnp.float32), jnp.asarray(y[0], jnp.float32))
  a = x[0].T @ x[0] / 5
  g = a @ w - x[0].T @ y[0] / 5
  exact = trust_region_max(a, g, rho)
  steps = sharpness.ascent_sharpness(loss_fn, params, batch, rho=rho, steps=40)
  assert np.all(np.diff(steps) >= 0)  # a running maximum
  assert steps[-1] <= exact * (1 + 1e-5)  # never above the true maximum
  assert steps[0] < steps[-1]  # more steps do find more for rho this large
  assert rel(steps[-1], exact) <= 1e-3


def test_m_sharpness_is_the_mean_over_groups_and_ignores_padding():
  loss_fn, params, x, y, _ = linear_regression(groups=6)
  rho = 0.1
  as_batch = lambda i: (jnp.asarray(x[i], jnp.float32), jnp.asarray(y[i], jnp.float32))
  singles = [
    float(sharpness.ascent_sharpness(loss_fn, params, as_batch(i), rho=rho)[0]) for i in range(6)
  ]
  # Two batches of 4 groups; the last two groups of the second batch are padding (weight 0).
  idx = [np.array([0, 1, 2, 3]), np.array([4, 5, 0, 0])]
  batches = [
    (
      (jnp.asarray(x[i], jnp.float32), jnp.asarray(y[i], jnp.float32)),
      np.array([1, 1, 1, 1.0]) if j == 0 else np.array([1, 1, 0, 0.0]),
    )
    for j, i in enumerate(idx)
  ]
  result = sharpness.m_sharpness(loss_fn, params, batches, rho=rho, steps=2)
  assert result.num_groups == 6
  assert rel(result.values[0], np.mean(singles)) <= 1e-5
  assert rel(result.stderr[0], np.std(singles, ddof=1) / np.sqrt(6)) <= 1e-4
  assert result.values[1] >= result.values[0]


# ---------------------------------------------------------------------------- tiny CNN


class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    f64 = {"dtype": jnp.float64, "param_dtype": jnp.float64}
    x = nn.Conv(4, (3, 3), **f64)(x)
    x = nn.BatchNorm(use_running_average=not train, **f64)(x)
    x = nn.tanh(x)
    x = nn.avg_pool(x, (2, 2), (2, 2))
    return nn.Dense(3, **f64)(x.reshape(x.shape[0], -1))


def test_cnn_hvp_equals_finite_differences_of_gradients():
  # float64: central differences with h = 1e-4 have truncation error ~h^2 |L'''| ~ 1e-8 and
  # rounding ~1e-16 / h ~ 1e-12, so 1e-5 relative is a safe bound well inside the 1e-3 asked for.
  # Host numpy for the setup: every eager jax op would cost a compile.
  with enable_x64():
    model = TinyCNN()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 6, 8, 8, 3))
    labels = rng.integers(0, 3, size=(2, 6))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[0])
    params = variables["params"]
    # Non-trivial running statistics, fixed during the analysis (BN in inference mode).
    stats = jax.tree.map(lambda s: np.asarray(s) + 0.3, variables["batch_stats"])

    def loss_fn(p, batch):
      logits = model.apply({"params": p, "batch_stats": stats}, batch[0], train=False)
      return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])) / 12

    batches = [(jnp.asarray(images[i]), jnp.asarray(labels[i])) for i in range(2)]
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    v = jnp.asarray(rng.normal(size=flat.shape))

    @jax.jit
    def central_difference(w, d, h=1e-4):
      grad = jax.grad(lambda w: sum(loss_fn(unravel(w), b) for b in batches))
      return (grad(w + h * d) - grad(w - h * d)) / (2 * h)

    fd = np.asarray(central_difference(flat, v))
    matvec, _ = sharpness.hessian_matvec(loss_fn, params, batches)
    hv = np.asarray(matvec(v))
    assert hv.dtype == np.float64
    assert np.linalg.norm(hv - fd) / np.linalg.norm(fd) <= 1e-5


# ----------------------------------------------------------------------------- directions


def test_filter_normalized_direction():
  params = {
    "conv": {
      "kernel": np.arange(48, dtype=np.float32).reshape(2, 2, 3, 4),
      "bias": np.ones(4, np.float32),
    },
    "dense": {"kernel": np.full((5, 2), 3.0, np.float32), "bias": np.ones(2, np.float32)},
  }
  params = jax.tree.map(jnp.asarray, params)
  d = jax.tree.map(np.asarray, sharpness.filter_normalized_direction(jax.random.PRNGKey(0), params))
  for name in ("conv", "dense"):
    w, dk = np.asarray(params[name]["kernel"]), d[name]["kernel"]
    np.testing.assert_allclose(
      np.linalg.norm(dk.reshape(-1, w.shape[-1]), axis=0),
      np.linalg.norm(w.reshape(-1, w.shape[-1]), axis=0),
      rtol=1e-5,
    )
    assert not np.allclose(dk / np.linalg.norm(dk), w / np.linalg.norm(w))  # random, not w
    np.testing.assert_array_equal(d[name]["bias"], 0.0)  # biases and BN: no direction
  again = sharpness.filter_normalized_direction(jax.random.PRNGKey(0), params)
  other = sharpness.filter_normalized_direction(jax.random.PRNGKey(1), params)
  np.testing.assert_array_equal(again["conv"]["kernel"], d["conv"]["kernel"])
  assert not np.allclose(other["conv"]["kernel"], d["conv"]["kernel"])


def test_deterministic_for_a_fixed_seed():
  a, _ = spectrum_matrix()
  matvec = lambda v: jnp.asarray(a, jnp.float32) @ v
  run = lambda seed: (
    sharpness.lanczos(matvec, DIM, num_iters=8, k=2, key=jax.random.PRNGKey(seed)).eigenvalues,
    sharpness.hutchinson_trace(matvec, DIM, num_probes=5, key=jax.random.PRNGKey(seed)).trace,
  )
  first, second, other = run(3), run(3), run(4)
  np.testing.assert_array_equal(first[0], second[0])
  assert first[1] == second[1]
  assert first[1] != other[1]


def test_landscape_rejects_mismatched_axes():
  with pytest.raises(ValueError, match="2 directions but 1 grid axes"):
    sharpness.landscape(
      lambda p: {"loss": 0.0}, {"w": jnp.zeros(2)}, [{"w": jnp.ones(2)}] * 2, [np.zeros(3)]
    )
