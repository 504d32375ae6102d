"""Sharpness of a loss at given parameters: Hessian spectrum and trace, m-sharpness, landscapes.

Pure math on any differentiable `loss_fn(params, batch) -> scalar`; no config, no files, no flags.
The objective is always a SUM of per-batch terms, `L(w) = sum_b loss_fn(w, b)`: the caller makes
each term its batch's share (e.g. a masked sum of per-example losses divided by the subset size),
so padded batches and uneven splits average correctly. Data parallelism comes from the caller's
shardings (params replicated, batches sharded over the mesh); every function here is sharding-blind.

References: Hessian-vector products by forward-over-reverse differentiation (Pearlmutter 1994);
Lanczos with full reorthogonalisation (Golub & Van Loan, sec. 10.1); Hutchinson's trace estimator
(Hutchinson 1989; as in PyHessian, Yao et al. 2020); m-sharpness (Foret et al. 2021, sec. 4.1 and
App. C.3); filter-normalised directions (Li et al. 2018, "Visualizing the Loss Landscape of Neural
Nets", sec. 4).
"""

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.flatten_util import ravel_pytree

Params = Any
Batch = Any
LossFn = Callable[[Params, Batch], jax.Array]
MatVec = Callable[[jax.Array], jax.Array]

# ------------------------------------------------------------------------------------ HVPs


def hvp(loss_fn: LossFn, params: Params, vector: Params, batch: Batch) -> Params:
  """H(params) @ vector for one batch's term, by jax.jvp over jax.grad (forward-over-reverse)."""
  grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
  return jax.jvp(grad_fn, (params,), (vector,))[1]


def hessian_matvec(loss_fn: LossFn, params: Params, batches: Sequence[Batch]) -> tuple[MatVec, int]:
  """The Hessian of sum_b loss_fn(params, b) as a function of flat vectors, and its dimension.

  Each batch's HVP is one compiled call (params replicated, batch as sharded as given); the sum
  over batches runs on the host so the subset may be any size.
  """
  flat, unravel = ravel_pytree(params)

  @jax.jit
  def one(p, v, batch):
    return ravel_pytree(hvp(loss_fn, p, unravel(v), batch))[0]

  # Vectors go where the params live: a committed input after an uncommitted first one would
  # make jit compile the HVP a second time.
  sharding = jax.tree.leaves(params)[0].sharding

  def matvec(v: jax.Array) -> jax.Array:
    v = jax.device_put(v, sharding)
    total = None
    for batch in batches:
      hv = one(params, v, batch)
      total = hv if total is None else total + hv
    return total

  return matvec, int(flat.size)


# ------------------------------------------------------------------------- eigenvalues


class Eigen(NamedTuple):
  """Top eigenvalues (descending) with a convergence measure for each."""

  eigenvalues: np.ndarray
  residuals: np.ndarray  # Lanczos: |beta_m * s_last| = ||H y - theta y||; power: same, measured
  num_matvecs: int


# The small vector operations below are jitted as whole steps: run eagerly, each jnp op would be
# a separate compile per shape and sharding (seconds each on a busy CPU).


@functools.partial(jax.jit, static_argnames=("dim", "dtype"))
def _random_unit(key: jax.Array, dim: int, dtype) -> jax.Array:
  v = jax.random.normal(key, (dim,), dtype)
  return v / jnp.linalg.norm(v)


@jax.jit
def _lanczos_step(basis: jax.Array, j: jax.Array, q: jax.Array, w: jax.Array):
  """Stores q as row j; returns (basis, alpha, beta, next q) for w = H q."""
  basis = basis.at[j].set(q)
  alpha = jnp.vdot(w, q)
  # Full reorthogonalisation, twice ("twice is enough", Parlett): without it float32 Lanczos
  # loses orthogonality after a few iterations and reports ghost copies of the top eigenvalue.
  # Rows of `basis` not yet filled are zero and project nothing; this also removes alpha q and
  # beta q_prev, the three-term recurrence's own terms.
  w = w - basis.T @ (basis @ w)
  w = w - basis.T @ (basis @ w)
  beta = jnp.linalg.norm(w)
  return basis, alpha, beta, w / jnp.where(beta > 0, beta, 1.0)


def lanczos(
  matvec: MatVec,
  dim: int,
  *,
  num_iters: int,
  k: int,
  key: jax.Array,
  dtype=jnp.float32,
  progress: bool = False,
) -> Eigen:
  """Top-k eigenvalues of a symmetric operator by `num_iters` Lanczos steps.

  Args:
    matvec: v -> H v on flat vectors of length `dim`.
    dim: the operator's size; `num_iters` is clipped to it (then the result is exact).
    num_iters: Lanczos steps (= matvecs); extreme eigenvalues converge first, so 20-40 steps give
      the top few of a network's Hessian to a few digits (see the returned residuals).
    k: how many of the largest (algebraic) Ritz values to return.
    key: seeds the start vector.
    dtype: of the Lanczos vectors (the params' dtype).
    progress: a tqdm bar over the iterations.

  Returns:
    Eigen with the k largest Ritz values and their residual norms ||H y - theta y||, which bound
    the distance to a true eigenvalue.

  >>> A = jnp.diag(jnp.arange(1.0, 6.0))
  >>> e = lanczos(lambda v: A @ v, 5, num_iters=5, k=2, key=jax.random.PRNGKey(0))
  >>> [round(float(x), 4) for x in e.eigenvalues]
  [5.0, 4.0]
  """
  num_iters = min(num_iters, dim)
  basis = jnp.zeros((num_iters, dim), dtype)
  q = _random_unit(key, dim, dtype)
  alphas, betas = [], []
  beta = 0.0
  for j in tqdm.trange(num_iters, desc="hessian lanczos", disable=not progress, leave=False):
    basis, alpha, beta, q = _lanczos_step(basis, j, q, matvec(q))
    alpha, beta = float(alpha), float(beta)
    alphas.append(alpha)
    # An invariant subspace (beta ~ 0) means the Ritz values are exact: stop there.
    if j + 1 == num_iters or beta <= 1e-10 * max(abs(a) for a in alphas):
      break
    betas.append(beta)
  m = len(alphas)
  tri = np.diag(np.asarray(alphas, np.float64))
  off = np.asarray(betas[: m - 1], np.float64)
  tri += np.diag(off, 1) + np.diag(off, -1)
  theta, s = np.linalg.eigh(tri)
  order = np.argsort(theta)[::-1][:k]
  residuals = np.abs(beta * s[-1, order])
  return Eigen(eigenvalues=theta[order], residuals=residuals, num_matvecs=m)


def power_iteration(
  matvec: MatVec,
  dim: int,
  *,
  num_iters: int,
  k: int,
  key: jax.Array,
  dtype=jnp.float32,
  tol: float = 1e-6,
  progress: bool = False,
) -> Eigen:
  """Top-k eigenvalues (largest magnitude) by power iteration with deflation, as PyHessian does.

  Each eigenvector is iterated orthogonal to the ones found before; iteration stops when the
  Rayleigh quotient changes by less than `tol` (relative) or after `num_iters` matvecs.
  """
  k = min(k, dim)
  found = jnp.zeros((k, dim), dtype)  # rows: the eigenvectors found so far (zeros project nothing)
  values, residuals = [], []
  used = 0
  bar = tqdm.tqdm(total=k * num_iters, desc="hessian power", disable=not progress, leave=False)
  for i in range(k):
    v = _random_unit(jax.random.fold_in(key, i), dim, dtype)
    value = None
    for _ in range(num_iters):
      v = _deflate(found, v)
      hv = matvec(v)
      used += 1
      bar.update(1)
      new = float(_dot(v, hv))
      converged = value is not None and abs(new - value) <= tol * (abs(value) + 1e-12)
      value = new
      if converged:
        break
      v = hv
    v = _deflate(found, v)  # measure the residual of the (deflated) Rayleigh pair
    hv = matvec(v)
    used += 1
    value, residual = _rayleigh_residual(v, hv)
    values.append(float(value))
    residuals.append(float(residual))
    found = found.at[i].set(v)
  bar.close()
  return Eigen(eigenvalues=np.asarray(values), residuals=np.asarray(residuals), num_matvecs=used)


@jax.jit
def _deflate(found: jax.Array, v: jax.Array) -> jax.Array:
  v = v - found.T @ (found @ v)
  return v / jnp.linalg.norm(v)


@jax.jit
def _rayleigh_residual(v: jax.Array, hv: jax.Array):
  value = jnp.vdot(v, hv)
  return value, jnp.linalg.norm(hv - value * v)


# ------------------------------------------------------------------------------- trace


_dot = jax.jit(jnp.vdot)


@functools.partial(jax.jit, static_argnames=("dim", "dtype"))
def _rademacher(key: jax.Array, i: int, dim: int, dtype) -> jax.Array:
  return jax.random.rademacher(jax.random.fold_in(key, i), (dim,), dtype)


class Trace(NamedTuple):
  """Hutchinson's estimate of tr(H) with the standard error of the mean over probes."""

  trace: float
  stderr: float
  samples: np.ndarray  # v_i^T H v_i per probe


def hutchinson_trace(
  matvec: MatVec,
  dim: int,
  *,
  num_probes: int,
  key: jax.Array,
  dtype=jnp.float32,
  progress: bool = False,
) -> Trace:
  """tr(H) ~ mean_i v_i^T H v_i over Rademacher probes v_i (unbiased; Hutchinson 1989).

  Rademacher probes have the least variance among i.i.d. probes: Var(v^T H v) =
  2 (||H||_F^2 - sum_i H_ii^2), so a diagonal H is estimated exactly by one probe.
  """
  samples = []
  for i in tqdm.trange(num_probes, desc="hessian trace", disable=not progress, leave=False):
    v = _rademacher(key, i, dim, dtype)
    samples.append(float(_dot(v, matvec(v))))
  samples = np.asarray(samples, np.float64)
  stderr = float(samples.std(ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("nan")
  return Trace(trace=float(samples.mean()), stderr=stderr, samples=samples)


# -------------------------------------------------------------------------- m-sharpness


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def ascent_sharpness(
  loss_fn: LossFn, params: Params, batch: Batch, *, rho: float, steps: int = 1
) -> jax.Array:
  """L(w + eps_s) - L(w) for one group of examples after s = 1..steps ascent steps (cumulative max).

  Step 1 is SAM's one-step solution eps = rho g / ||g|| of max_{||eps|| <= rho} L(w + eps) (Foret et
  al. 2021, eq. 2). Later steps are projected normalised-gradient ascent with step rho,
  eps <- P_rho(eps + rho grad L(w + eps) / ||grad L(w + eps)||); returning the running maximum
  makes each entry a valid lower bound on the true maximum, non-decreasing in the step count.

  Returns:
    float32 [steps]: the sharpness estimate after 1, 2, ..., steps ascent steps.
  """
  value_and_grad = jax.value_and_grad(loss_fn)
  base, grads = value_and_grad(params, batch)
  eps = jax.tree.map(jnp.zeros_like, params)
  best = -jnp.inf
  out = []
  for s in range(steps):
    scale = rho / (_global_norm(grads) + 1e-12)
    eps = jax.tree.map(lambda e, g, c=scale: e + c * g, eps, grads)
    shrink = jnp.minimum(1.0, rho / (_global_norm(eps) + 1e-12))
    eps = jax.tree.map(lambda e, c=shrink: e * c, eps)
    perturbed = jax.tree.map(jnp.add, params, eps)
    if s + 1 < steps:
      loss, grads = value_and_grad(perturbed, batch)
    else:
      loss = loss_fn(perturbed, batch)
    best = jnp.maximum(best, loss - base)
    out.append(best)
  return jnp.stack(out)


class Sharpness(NamedTuple):
  """m-sharpness per ascent-step count: mean over groups and its standard error."""

  values: np.ndarray  # [steps]
  stderr: np.ndarray  # [steps]
  num_groups: int


def m_sharpness(
  loss_fn: LossFn,
  params: Params,
  group_batches: Iterable[tuple[Batch, Any]],
  *,
  rho: float,
  steps: int = 1,
  progress: bool = False,
) -> Sharpness:
  """The SAM paper's m-sharpness: the mean over disjoint groups of m examples of their sharpness.

  Args:
    loss_fn: the MEAN loss of one group of m examples (batch leaves lead with m).
    params: the weights w.
    group_batches: (batch, weight) pairs; batch leaves lead with [groups, m], weight is float
      [groups] (1 for a real group, 0 for padding), sharded as the batch. Groups within a batch
      run vmapped, so a batch sharded on its group axis runs data-parallel.
    rho: radius of the ascent ball.
    steps: ascent steps; see `ascent_sharpness`.
    progress: a tqdm bar over batches.
  """
  ascend = jax.vmap(
    lambda p, b: ascent_sharpness(loss_fn, p, b, rho=rho, steps=steps), in_axes=(None, 0)
  )

  @jax.jit
  def moments(p, batch, weight):
    # Weighted sums, not per-group values, leave the device: they are replicated scalars even when
    # the groups are sharded over devices of several processes.
    values = ascend(p, batch)
    w = jnp.asarray(weight, values.dtype)[:, None]
    return jnp.sum(w), jnp.sum(w * values, 0), jnp.sum(w * values**2, 0)

  count, total, squares = 0.0, 0.0, 0.0
  for batch, weight in tqdm.tqdm(
    group_batches, desc="m-sharpness", disable=not progress, leave=False
  ):
    c, t, q = (np.asarray(x, np.float64) for x in jax.device_get(moments(params, batch, weight)))
    count, total, squares = count + c, total + t, squares + q
  n = round(float(count))
  mean = total / count
  if n > 1:
    variance = np.maximum(squares - count * mean**2, 0.0) / (count - 1)
    stderr = np.sqrt(variance / count)
  else:
    stderr = np.full_like(mean, np.nan)
  return Sharpness(values=mean, stderr=stderr, num_groups=n)


# ----------------------------------------------------------------------- landscapes


@functools.partial(jax.jit, static_argnames="ignore_1d")
def filter_normalized_direction(
  key: jax.Array, params: Params, *, ignore_1d: bool = True
) -> Params:
  """A Gaussian direction rescaled filter-wise to the weights' filter norms (Li et al. 2018).

  A filter is a slice along the last axis (Flax conv kernels are HWIO, dense kernels IO), so each
  output unit's direction has the norm of its weights: the plot becomes invariant to the rescaling
  that BatchNorm makes meaningless. 1-D parameters (biases, BN scale/offset) get a zero direction
  when `ignore_1d`, as in Li et al.'s plots (their code's `--xignore biasbn`).
  """
  # One Gaussian draw for all parameters: a draw per leaf made XLA compile ~70 threefry
  # kernels (a minute of CPU for a ResNet).
  flat, unravel = ravel_pytree(params)
  gaussian = unravel(jax.random.normal(key, flat.shape, flat.dtype))
  out = []
  for d, w in zip(jax.tree.leaves(gaussian), jax.tree.leaves(params)):
    if w.ndim <= 1:
      out.append(jnp.zeros_like(w) if ignore_1d else w)
      continue
    axes = tuple(range(w.ndim - 1))
    d_norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=axes, keepdims=True))
    w_norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
    out.append(d * w_norm / (d_norm + 1e-10))
  return jax.tree.unflatten(jax.tree.structure(params), out)


@jax.jit
def _shift(params: Params, directions: tuple, coords: jax.Array) -> Params:
  """params + sum_i coords[i] * directions[i]."""

  def leaf(w, *ds):
    return w + sum(c * d for c, d in zip(coords, ds)).astype(w.dtype)

  return jax.tree.map(leaf, params, *directions)


def landscape(
  eval_fn: Callable[[Params], dict[str, float]],
  params: Params,
  directions: Sequence[Params],
  axes: Sequence[np.ndarray],
  *,
  progress: bool = False,
  desc: str = "landscape",
) -> dict[str, np.ndarray]:
  """eval_fn(params + sum_i a_i d_i) on the grid axes[0] x axes[1] x ... (1-D or 2-D plots).

  Args:
    eval_fn: params -> {metric name: float} over the whole subset (e.g. loss, accuracy).
    params: the centre w.
    directions: one direction per grid axis (e.g. from `filter_normalized_direction`).
    axes: the coordinates along each direction.
    progress: a tqdm bar over grid points.

  Returns:
    {metric: array of shape [len(axes[0]), len(axes[1]), ...]}.
  """
  if len(directions) != len(axes):
    raise ValueError(f"{len(directions)} directions but {len(axes)} grid axes")
  shape = tuple(len(a) for a in axes)
  grids = np.meshgrid(*axes, indexing="ij")
  points = np.stack([g.reshape(-1) for g in grids], axis=-1)
  results: dict[str, np.ndarray] = {}
  for i, point in enumerate(tqdm.tqdm(points, desc=desc, disable=not progress, leave=False)):
    metrics = eval_fn(_shift(params, tuple(directions), jnp.asarray(point, jnp.float32)))
    for name, value in metrics.items():
      results.setdefault(name, np.zeros(len(points)))[i] = value
  return {name: v.reshape(shape) for name, v in results.items()}
