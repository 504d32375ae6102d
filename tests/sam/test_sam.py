"""Tests of jaxsam.sam: optax.contrib.sam as peer, closed forms, per-shard references."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsam import sam as sam_lib
from jaxsam.errors import ConfigError

RHO = 0.05
# Tiny problems: compile time dominates and run time is irrelevant, so skip XLA's slow CPU passes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def rel_err(a, b):
  """Global relative error between two trees, in float64."""
  a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def base_opt():
  """A base with state, weight decay and momentum, so a wrong gradient shows in later steps."""
  return optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))


def never_called(params):
  raise AssertionError("grad_fn must not be called when rho is a static 0")


# --- peer: optax.contrib.sam -------------------------------------------------------------------


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(4)(x)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    return nn.Dense(4)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("model", [MLP(), CNN()], ids=["mlp", "cnn"])
def test_matches_optax_contrib_sam(model):
  # optax.contrib.sam with opaque_mode=True and sync_period=2 does one normalised ascent step with
  # adv_opt = chain(normalize(), sgd(rho)) (i.e. +rho g/||g||) and feeds the gradient at the
  # perturbed point to the outer optimizer: one update call = one SAM step, as ours. It has no
  # epsilon, so ours runs with eps=0.
  # numpy data and a jitted init: eager jax.random and flax init cost seconds of op-by-op compiles.
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.normal(size=(4, 16, 8, 8, 3)), jnp.float32)
  ys = jnp.asarray(rng.integers(0, 4, size=(4, 16)))
  params = fast_jit(model.init)(jax.random.key(0), xs[0])

  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

  adv = optax.chain(optax.contrib.normalize(), optax.sgd(RHO))
  peer = optax.contrib.sam(base_opt(), adv, sync_period=2, opaque_mode=True)
  ours = sam_lib.sam(base_opt(), RHO, eps=0.0)

  @functools.partial(fast_jit, static_argnums=0)
  def step(tx, p, state, x, y):
    grads = jax.grad(loss)(p, x, y)
    if tx is peer:
      grad_fn = lambda q, _: jax.grad(loss)(q, x, y)
    else:
      grad_fn = lambda q: jax.value_and_grad(loss)(q, x, y)
    updates, state = tx.update(grads, state, p, grad_fn=grad_fn)
    return optax.apply_updates(p, updates), state

  p_peer, s_peer, p_ours, s_ours = params, peer.init(params), params, ours.init(params)
  for x, y in zip(xs, ys):
    p_peer, s_peer = step(peer, p_peer, s_peer, x, y)
    p_ours, s_ours = step(ours, p_ours, s_ours, x, y)
  assert int(s_ours.count) == len(xs)
  moved = lambda p: jax.tree.map(jnp.subtract, p, params)
  assert rel_err(moved(p_ours), moved(p_peer)) <= 1e-6
  assert rel_err(p_ours, p_peer) <= 1e-6


# --- closed forms on L(w) = 1/2 w^T A w --------------------------------------------------------

SHAPES = {"b": (3,), "k": (2, 3)}  # a bias-like vector and a kernel-like matrix: 9 weights in all


def quadratic(seed=0):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(9, 9))
  a = m @ m.T / 9 + 0.5 * np.eye(9)  # SPD, well conditioned
  w = rng.normal(size=9)
  return a, w


def to_tree(v, dtype=jnp.float32):
  v = np.asarray(v)
  return {"b": jnp.asarray(v[:3].reshape(3), dtype), "k": jnp.asarray(v[3:].reshape(2, 3), dtype)}


def to_vec(tree):
  return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in ("b", "k")])


def quad_fns(a):
  a32 = jnp.asarray(a, jnp.float32)

  def loss(tree):
    v = jnp.concatenate([tree["b"].ravel(), tree["k"].ravel()]).astype(jnp.float32)
    return 0.5 * v @ a32 @ v

  return loss, jax.value_and_grad(loss)


def one_step(tx, a, w, **kw):
  loss, vg = quad_fns(a)
  params = to_tree(w)
  state = tx.init(params)
  updates, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=kw.pop("grad_fn", vg))
  return updates, state


def base_step(a, g_vec, w):
  """The base optimizer's updates when fed the gradient g_vec at w."""
  params = to_tree(w)
  tx = base_opt()
  updates, _ = tx.update(to_tree(g_vec), tx.init(params), params)
  return to_vec(updates)


def test_sam_closed_form_and_diagnostics():
  a, w = quadratic()
  g = a @ w
  e = RHO * g / np.linalg.norm(g)
  g_sam = a @ (w + e)
  updates, state = one_step(sam_lib.sam(base_opt(), RHO), a, w)
  np.testing.assert_allclose(to_vec(updates), base_step(a, g_sam, w), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(state.rho), RHO, rtol=1e-7)
  np.testing.assert_allclose(float(state.clean_grad_norm), np.linalg.norm(g), rtol=1e-5)
  np.testing.assert_allclose(float(state.sam_grad_norm), np.linalg.norm(g_sam), rtol=1e-5)
  cos = g @ g_sam / np.linalg.norm(g) / np.linalg.norm(g_sam)
  np.testing.assert_allclose(float(state.cosine), cos, rtol=1e-5)
  assert float(state.cosine) < 1 - 1e-5  # the perturbation does change the gradient here
  np.testing.assert_allclose(float(state.perturbed_loss), 0.5 * (w + e) @ a @ (w + e), rtol=1e-5)
  assert int(state.count) == 1


def test_ascent_weight_decay_enters_the_ascent_only():
  a, w = quadratic(1)
  wd = 0.3
  g_asc = a @ w + wd * w
  g_sam = a @ (w + RHO * g_asc / np.linalg.norm(g_asc))
  updates, _ = one_step(sam_lib.sam(base_opt(), RHO, ascent_weight_decay=wd), a, w)
  np.testing.assert_allclose(to_vec(updates), base_step(a, g_sam, w), rtol=1e-5, atol=1e-7)


def asam_closed_form(a, w, eta, masked):
  g = a @ w
  t = np.where(masked, np.abs(w) + eta, 1.0)
  e = RHO * t**2 * g / np.linalg.norm(t * g)
  return a @ (w + e)


def test_asam_closed_form_default_mask_excludes_vectors():
  a, w = quadratic(2)
  eta = 0.01
  kernel = np.arange(9) >= 3  # the default mask: only the ndim > 1 leaf ("k") is rescaled
  g_asam = asam_closed_form(a, w, eta, kernel)
  updates, _ = one_step(sam_lib.sam(base_opt(), RHO, variant="asam", eta=eta), a, w)
  np.testing.assert_allclose(to_vec(updates), base_step(a, g_asam, w), rtol=1e-5, atol=1e-7)
  # The mask matters: rescaling every leaf gives another gradient; a callable mask is honoured.
  g_all = asam_closed_form(a, w, eta, np.ones(9, bool))
  assert rel_err(g_all, g_asam) > 1e-3
  all_mask = lambda p: jax.tree.map(lambda _: True, p)
  tx = sam_lib.sam(base_opt(), RHO, variant="asam", eta=eta, asam_mask=all_mask)
  updates, _ = one_step(tx, a, w)
  np.testing.assert_allclose(to_vec(updates), base_step(a, g_all, w), rtol=1e-5, atol=1e-7)


def test_gsam_alpha_zero_constant_rho_equals_sam():
  a, w = quadratic(3)
  u_sam, s_sam = one_step(sam_lib.sam(base_opt(), RHO), a, w)
  u_gsam, s_gsam = one_step(sam_lib.sam(base_opt(), RHO, variant="gsam", alpha=0.0), a, w)
  chex.assert_trees_all_equal(u_gsam, u_sam)
  chex.assert_trees_all_equal(s_gsam, s_sam)


def test_gsam_closed_form():
  a, w = quadratic(4)
  alpha = 0.4
  g = a @ w
  g_sam = a @ (w + RHO * g / np.linalg.norm(g))
  g_perp = g - (g @ g_sam) / (g_sam @ g_sam) * g_sam
  assert abs(g_perp @ g_sam) < 1e-8 * np.linalg.norm(g_perp) * np.linalg.norm(g_sam) + 1e-12
  g_final = g_sam - alpha * g_perp
  assert rel_err(g_final, g_sam) > 1e-4  # alpha changes something
  updates, _ = one_step(sam_lib.sam(base_opt(), RHO, variant="gsam", alpha=alpha), a, w)
  np.testing.assert_allclose(to_vec(updates), base_step(a, g_final, w), rtol=1e-5, atol=1e-7)


def test_rho_schedule_is_evaluated_at_the_step_count():
  a, w = quadratic(5)
  loss, vg = quad_fns(a)
  schedule = optax.linear_schedule(0.1, 0.0, 4)
  tx = sam_lib.sam(base_opt(), schedule)
  params = to_tree(w)
  state = tx.init(params)
  for step in range(3):
    updates, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=vg)
    np.testing.assert_allclose(float(state.rho), float(schedule(step)), rtol=1e-6)
    params = optax.apply_updates(params, updates)


def test_gsam_rho_schedule_follows_the_lr():
  lr = optax.cosine_decay_schedule(0.2, 10)
  rho = sam_lib.gsam_rho_schedule(lr, lr_max=0.2, lr_min=0.0, rho_max=0.08, rho_min=0.02)
  for step in (0, 3, 10):
    expected = 0.02 + 0.06 * float(lr(step)) / 0.2
    np.testing.assert_allclose(float(rho(step)), expected, rtol=1e-6)
  const = sam_lib.gsam_rho_schedule(0.1, lr_max=0.1, lr_min=0.1, rho_max=0.05, rho_min=0.0)
  np.testing.assert_allclose(float(const(7)), 0.05)


@pytest.mark.parametrize("variant", ["sam", "asam", "gsam"])
def test_rho_zero_is_the_base_bit_for_bit(variant):
  a, w = quadratic(6)
  loss, _ = quad_fns(a)
  params = to_tree(w)
  tx = sam_lib.sam(base_opt(), 0.0, variant=variant)
  base = base_opt()
  state, b_state = tx.init(params), base.init(params)
  for _ in range(3):
    grads = jax.grad(loss)(params)
    update = jax.jit(functools.partial(tx.update, grad_fn=never_called))
    updates, state = update(grads, state, params)
    b_updates, b_state = jax.jit(base.update)(grads, b_state, params)
    chex.assert_trees_all_equal(updates, b_updates)
    params = optax.apply_updates(params, updates)
  chex.assert_trees_all_equal(state.base_state, b_state)
  assert float(state.cosine) == 1.0 and np.isnan(float(state.perturbed_loss))
  assert float(state.sam_grad_norm) == float(state.clean_grad_norm) > 0


def test_cost_rho_zero_is_one_pass_and_sam_two():
  # XLA's flop count of the whole step (no compile needed): rho = 0 adds only the logged gradient
  # norm (2 flops per weight) to the base step; SAM adds one forward-backward pass.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  params = {"w": jnp.asarray(rng.normal(size=(32, 64)), jnp.float32), "v": jnp.zeros(64)}
  n_weights = 32 * 64 + 64
  loss = lambda p: jnp.mean(jnp.tanh(x @ p["w"]) @ p["v"])

  def flops(tx):
    def step(p, s):
      kw = {} if tx is base else {"grad_fn": jax.value_and_grad(loss)}
      updates, s = tx.update(jax.grad(loss)(p), s, p, **kw)
      return optax.apply_updates(p, updates), s

    return jax.jit(step).lower(params, tx.init(params)).cost_analysis()["flops"]

  base = base_opt()
  f_base, f_zero, f_sam = flops(base), flops(sam_lib.sam(base, 0.0)), flops(sam_lib.sam(base, RHO))
  assert f_base <= f_zero <= f_base + 3 * n_weights
  assert 1.9 * f_base <= f_sam <= 2.1 * f_base


@pytest.mark.parametrize("variant,alpha", [("sam", 0.0), ("asam", 0.0), ("gsam", 0.3)])
def test_zero_gradient_gives_finite_updates(variant, alpha):
  a, _ = quadratic()
  tx = sam_lib.sam(base_opt(), RHO, variant=variant, alpha=alpha)
  updates, state = one_step(tx, a, np.zeros(9))
  chex.assert_tree_all_finite((updates, state.clean_grad_norm, state.sam_grad_norm, state.cosine))
  assert float(state.clean_grad_norm) == 0.0


# --- data parallel: shard_map over 8 CPU devices ------------------------------------------------

N_DEV = 8


def mlp_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "w1": jnp.asarray(0.5 * rng.normal(size=(5, 8)), jnp.float32),
    "b1": jnp.zeros(8),
    "w2": jnp.asarray(0.5 * rng.normal(size=(8,)), jnp.float32),
    "b2": jnp.zeros(()),
  }


def mlp_loss(p, x, y):
  """Mean squared error of a tiny MLP: means of equal shards average to the global mean."""
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)


def dp_data(steps=3, per_dev=4):
  rng = np.random.default_rng(1)
  xs = jnp.asarray(rng.normal(size=(steps, N_DEV * per_dev, 5)), jnp.float32)
  ys = jnp.asarray(rng.normal(size=(steps, N_DEV * per_dev)), jnp.float32)
  return xs, ys


def run_sharded(tx, params, xs, ys, check_vma=True):
  """3 SAM steps inside shard_map over 8 devices, with device-local clean gradients."""
  assert len(jax.devices()) >= N_DEV, "tests/conftest.py forces 8 CPU devices"
  mesh = jax.make_mesh((N_DEV,), ("data",), axis_types=(AxisType.Auto,))
  specs = {"in_specs": (P(), P(), P("data"), P("data")), "out_specs": (P(), P())}

  @fast_jit
  @functools.partial(jax.shard_map, mesh=mesh, check_vma=check_vma, **specs)
  def step(p, state, x, y):
    # With check_vma, autodiff psums the gradient of replicated params: cast them to varying first.
    local = jax.lax.pcast(p, "data", to="varying") if check_vma else p
    grads = jax.grad(mlp_loss)(local, x, y)
    grad_fn = lambda q: jax.value_and_grad(mlp_loss)(q, x, y)
    updates, state = tx.update(grads, state, p, grad_fn=grad_fn)
    return optax.apply_updates(p, updates), state

  state = tx.init(params)
  shard = NamedSharding(mesh, P("data"))
  for x, y in zip(xs, ys):
    params, state = step(params, state, jax.device_put(x, shard), jax.device_put(y, shard))
  return params, state


def run_single(tx, params, xs, ys):
  @fast_jit
  def step(p, state, x, y):
    grad_fn = lambda q: jax.value_and_grad(mlp_loss)(q, x, y)
    updates, state = tx.update(jax.grad(mlp_loss)(p, x, y), state, p, grad_fn=grad_fn)
    return optax.apply_updates(p, updates), state

  state = tx.init(params)
  for x, y in zip(xs, ys):
    params, state = step(params, state, x, y)
  return params, state


def per_shard_reference(params, xs, ys, variant="sam", alpha=0.0, n_shards=N_DEV):
  """Hand-computed m-sharpness: each shard ascends along its own gradient; the gradients at the
  perturbed points are averaged."""
  base = base_opt()
  grad = jax.grad(mlp_loss)
  mean = lambda trees: jax.tree.map(lambda *t: sum(t) / n_shards, *trees)

  @fast_jit  # one compile for the unrolled loop over shards, instead of hundreds of eager ops
  def step(params, b_state, x, y):
    gs, gcs = [], []
    for xi, yi in zip(jnp.split(x, n_shards), jnp.split(y, n_shards)):
      g = grad(params, xi, yi)
      scale = RHO / jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(g)))
      gs.append(grad(jax.tree.map(lambda p, gi, s=scale: p + s * gi, params, g), xi, yi))
      gcs.append(g)
    g_sam = mean(gs)
    if variant == "gsam":  # decomposed with the averaged gradients, as documented in sam.py
      g_clean = mean(gcs)
      dot = sum(jnp.sum(c * s) for c, s in zip(jax.tree.leaves(g_clean), jax.tree.leaves(g_sam)))
      sq = sum(jnp.sum(s * s) for s in jax.tree.leaves(g_sam))
      g_sam = jax.tree.map(lambda s, c: s - alpha * (c - dot / sq * s), g_sam, g_clean)
    updates, b_state = base.update(g_sam, b_state, params)
    return optax.apply_updates(params, updates), b_state

  b_state = base.init(params)
  for x, y in zip(xs, ys):
    params, b_state = step(params, b_state, x, y)
  return params


@pytest.mark.parametrize("check_vma", [True, False])
def test_sync_sharded_equals_single_device_full_batch(check_vma):
  params, (xs, ys) = mlp_params(), dp_data()
  tx_dp = sam_lib.sam(base_opt(), RHO, sync=True, axis_name="data")
  p_dp, s_dp = run_sharded(tx_dp, params, xs, ys, check_vma)
  p_one, s_one = run_single(sam_lib.sam(base_opt(), RHO), params, xs, ys)
  assert rel_err(p_dp, p_one) <= 1e-5
  for field in ("clean_grad_norm", "sam_grad_norm", "cosine", "perturbed_loss"):
    np.testing.assert_allclose(float(getattr(s_dp, field)), float(getattr(s_one, field)), rtol=1e-5)


@pytest.mark.parametrize("variant,alpha,check_vma", [("sam", 0.0, True), ("gsam", 0.5, True)])
def test_per_device_ascent_equals_per_shard_reference(variant, alpha, check_vma):
  params, (xs, ys) = mlp_params(), dp_data()
  tx = sam_lib.sam(base_opt(), RHO, variant=variant, alpha=alpha, sync=False, axis_name="data")
  p_dp, _ = run_sharded(tx, params, xs, ys, check_vma)
  p_ref = per_shard_reference(params, xs, ys, variant, alpha)
  assert rel_err(p_dp, p_ref) <= 1e-5
  # m-sharpness is a different algorithm from the synchronised ascent: the test can tell them apart.
  p_sync, _ = run_single(sam_lib.sam(base_opt(), RHO, variant=variant, alpha=alpha), params, xs, ys)
  assert rel_err(p_sync, p_ref) > 1e-4


def test_ascent_groups_via_vmap_inside_shard_map():
  # sam.m smaller than the per-device batch: groups of m examples vmapped inside each device, the
  # transform averaging over (devices, groups). JAX 0.10 cannot mix vmap-axis collectives with
  # check_vma, so this runs with check_vma=False (device-local gradients without a cast).
  params, (xs, ys) = mlp_params(), dp_data()
  groups = 2  # per device: 4 examples = 2 groups of m = 2
  mesh = jax.make_mesh((N_DEV,), ("data",), axis_types=(AxisType.Auto,))
  tx = sam_lib.sam(base_opt(), RHO, axis_name=("data", "group"))
  specs = {"in_specs": (P(), P(), P("data"), P("data")), "out_specs": (P(), P())}

  @fast_jit
  @functools.partial(jax.shard_map, mesh=mesh, check_vma=False, **specs)
  def step(p, state, x, y):
    def one_group(x, y):
      grads = jax.grad(mlp_loss)(p, x, y)
      grad_fn = lambda q: jax.value_and_grad(mlp_loss)(q, x, y)
      updates, new_state = tx.update(grads, state, p, grad_fn=grad_fn)
      return optax.apply_updates(p, updates), new_state

    split = lambda a: a.reshape((groups, -1) + a.shape[1:])
    return jax.vmap(one_group, axis_name="group", out_axes=None)(split(x), split(y))

  state = tx.init(params)
  shard = NamedSharding(mesh, P("data"))
  p = params
  for x, y in zip(xs, ys):
    p, state = step(p, state, jax.device_put(x, shard), jax.device_put(y, shard))
  p_ref = per_shard_reference(params, xs, ys, n_shards=N_DEV * groups)
  assert rel_err(p, p_ref) <= 1e-5
  assert rel_err(per_shard_reference(params, xs, ys), p_ref) > 1e-4  # m = 2 differs from m = 4


def test_rho_zero_sharded_is_base_on_the_averaged_gradient():
  params, (xs, ys) = mlp_params(), dp_data()
  p_dp, _ = run_sharded(sam_lib.sam(base_opt(), 0.0, axis_name="data"), params, xs, ys)
  base = base_opt()
  state = base.init(params)
  p_ref = params
  for x, y in zip(xs, ys):
    updates, state = base.update(jax.grad(mlp_loss)(p_ref, x, y), state, p_ref)
    p_ref = optax.apply_updates(p_ref, updates)
  assert rel_err(p_dp, p_ref) <= 1e-5


# --- dtypes and compilation ----------------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("variant,alpha", [("sam", 0.0), ("asam", 0.0), ("gsam", 0.3)])
def test_bf16_gradients(param_dtype, variant, alpha):
  a, w = quadratic(7)
  loss, _ = quad_fns(a)
  bf16 = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16), t)

  def grad_fn(p):
    value, g = jax.value_and_grad(loss)(p)
    return value, bf16(g)

  params = to_tree(w, param_dtype)
  tx = sam_lib.sam(base_opt(), RHO, variant=variant, alpha=alpha)
  updates, state = tx.update(bf16(jax.grad(loss)(params)), tx.init(params), params, grad_fn=grad_fn)
  chex.assert_tree_all_finite(updates)
  jax.tree.map(lambda u, p: chex.assert_type(u, p.dtype), updates, params)
  assert state.clean_grad_norm.dtype == jnp.float32 and state.cosine.dtype == jnp.float32
  ref, _ = one_step(sam_lib.sam(base_opt(), RHO, variant=variant, alpha=alpha), a, w)
  assert rel_err(updates, ref) < 3e-2  # bf16 has an 8-bit mantissa


def test_update_compiles_once_across_steps():
  a, w = quadratic(8)
  loss, vg = quad_fns(a)
  tx = sam_lib.sam(base_opt(), optax.linear_schedule(0.1, 0.0, 5), variant="gsam", alpha=0.1)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params, grad_fn=vg)
    return optax.apply_updates(params, updates), state

  params = to_tree(w)
  state = tx.init(params)
  for _ in range(4):
    params, state = step(params, state)
  assert int(state.count) == 4


# --- bad arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs,needle",
  [
    ({"rho": -0.1}, "-0.1"),
    ({"rho": float("nan")}, "nan"),
    ({"rho": "0.1"}, "'0.1'"),
    ({"rho": 0.1, "variant": "adam"}, "sam, asam, gsam"),
    ({"rho": 0.1, "eta": -1.0}, "eta=-1.0"),
    ({"rho": 0.1, "eps": -1e-12}, "eps=-1e-12"),
    ({"rho": 0.1, "alpha": -0.2, "variant": "gsam"}, "alpha=-0.2"),
    ({"rho": 0.1, "alpha": 0.2}, "alpha=0.2"),
    ({"rho": 0.1, "ascent_weight_decay": -1.0}, "ascent_weight_decay=-1.0"),
    ({"rho": 0.1, "sync": "yes"}, "sync='yes'"),
    ({"rho": 0.1, "asam_mask": lambda p: p}, "asam_mask"),
    ({"rho": 0.1, "axis_name": 3}, "axis_name=3"),
    ({"rho": 0.1, "axis_name": ()}, "axis_name=()"),
  ],
)
def test_bad_arguments_raise_config_error(kwargs, needle):
  with pytest.raises(ConfigError) as info:
    sam_lib.sam(optax.sgd(0.1), **kwargs)
  message = str(info.value)
  assert needle in message and "\n" not in message
  if kwargs.get("variant") == "adam":
    assert "'adam'" in message


def test_bad_base_and_gsam_schedule_arguments():
  with pytest.raises(ConfigError, match="base="):
    sam_lib.sam(lambda g: g, 0.1)
  with pytest.raises(ConfigError, match="rho_max=0.01 < rho_min=0.05"):
    sam_lib.gsam_rho_schedule(0.1, lr_max=0.1, lr_min=0.0, rho_max=0.01, rho_min=0.05)
  with pytest.raises(ConfigError, match="lr_max=0.0 < lr_min=0.1"):
    sam_lib.gsam_rho_schedule(0.1, lr_max=0.0, lr_min=0.1, rho_max=0.05, rho_min=0.0)


def test_docstring_examples_run():
  import doctest

  result = doctest.testmod(sam_lib, verbose=False)
  assert result.attempted >= 2 and result.failed == 0
