"""Cheaper SAM: SAM every k steps, late phase, LookSAM, AE-SAM, Momentum-SAM, accumulation.

Closed forms on a quadratic against hand-written references, the skip really skipping (the
perturbed pass does not run on a base step), device and group invariance in the real train step,
and gradient accumulation as m-sharpness.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsam import optim, parallel, steps
from jaxsam import sam as sam_lib
from jaxsam.errors import ConfigError
from support.tiny_steps import (
  MESH_1,
  MESH_8,
  TinyBNNet,
  TinyNet,
  assert_trees_close,
  init_state,
  make_batch,
  make_config,
  run_steps,
  step_cfg,
)

RHO = 0.05
LR, MOMENTUM, WD = 0.1, 0.9, 1e-3


def quadratic(seed=0, n=6):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(n, n))
  return m @ m.T / n + 0.5 * np.eye(n), rng.normal(size=n)


def base_opt():
  return optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))


def run_transform(tx, a, w, num_steps, noise_seed=1):
  """`num_steps` updates of `tx` on L(w) = 1/2 w^T A_t w, A_t = A + a small per-step change (so
  that gradient norms vary from step to step); returns (weights per step, states per step)."""
  rng = np.random.default_rng(noise_seed)
  mats = [
    jnp.asarray(a + 0.3 * np.diag(rng.normal(size=len(w))), jnp.float32) for _ in range(num_steps)
  ]

  @jax.jit
  def step(params, state, mat):
    vg = jax.value_and_grad(lambda p: 0.5 * p @ mat @ p)
    updates, state = tx.update(vg(params)[1], state, params, grad_fn=vg)
    return optax.apply_updates(params, updates), state

  params = jnp.asarray(w, jnp.float32)
  state = tx.init(params)
  ws, states = [], []
  for mat in mats:
    params, state = step(params, state, mat)
    ws.append(np.asarray(params))
    states.append(state)
  return ws, states, [np.asarray(m, np.float64) for m in mats]


def reference(a, w, num_steps, take_sam, *, reuse_weight=None):
  """Hand-written SGD (momentum, coupled L2) where step t uses SAM's gradient iff take_sam(t);
  with reuse_weight, the other steps use LookSAM's g + alpha ||g|| / ||g_v|| g_v."""
  _, _, mats = run_transform(base_opt(), a, w, num_steps)  # the same per-step matrices
  w = np.asarray(w, np.float64)
  v = np.zeros_like(w)
  g_v = np.zeros_like(w)
  out = []
  for t, mat in enumerate(mats):
    g = mat @ w
    if take_sam(t):
      g_s = mat @ (w + RHO * g / np.linalg.norm(g))
      g_v = g_s - (g @ g_s) / (g @ g) * g
      d = g_s
    elif reuse_weight is not None:
      d = g + reuse_weight * np.linalg.norm(g) / max(np.linalg.norm(g_v), 1e-12) * g_v
    else:
      d = g
    v = MOMENTUM * v + d + WD * w
    w = w - LR * v
    out.append(w)
  return out


def assert_paths_close(got, expected, rtol=2e-5, atol=1e-6):
  for t, (x, y) in enumerate(zip(got, expected)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"step {t}")


# --- closed forms ------------------------------------------------------------------------------


def test_every_one_and_start_zero_are_sam_bit_for_bit():
  a, w = quadratic()
  plain, plain_states, _ = run_transform(sam_lib.sam(base_opt(), RHO), a, w, 6)
  for kw in ({"every": 1}, {"start_step": 0}, {"variant": "looksam", "every": 1}):
    got, states, _ = run_transform(sam_lib.sam(base_opt(), RHO, **kw), a, w, 6)
    chex.assert_trees_all_equal(got, plain)
    assert all(float(s.active) == 1.0 for s in states)
  assert all(float(s.active) == 1.0 for s in plain_states)


def test_sam_every_k_matches_reference_and_marks_active_steps():
  a, w = quadratic(1)
  got, states, _ = run_transform(sam_lib.sam(base_opt(), RHO, every=3), a, w, 7)
  assert_paths_close(got, reference(a, w, 7, lambda t: t % 3 == 0))
  assert [float(s.active) for s in states] == [1, 0, 0, 1, 0, 0, 1]
  skipped = states[1]
  assert np.isnan(float(skipped.perturbed_loss)) and np.isnan(float(skipped.cosine))
  assert np.isfinite(float(states[3].perturbed_loss))


def test_late_phase_is_the_base_before_start_step_then_sam():
  a, w = quadratic(2)
  got, states, _ = run_transform(sam_lib.sam(base_opt(), RHO, start_step=3), a, w, 6)
  assert_paths_close(got, reference(a, w, 6, lambda t: t >= 3))
  assert [float(s.active) for s in states] == [0, 0, 0, 1, 1, 1]
  # With every = 2 after the start: SAM on steps 3 and 5.
  got, _, _ = run_transform(sam_lib.sam(base_opt(), RHO, start_step=3, every=2), a, w, 6)
  assert_paths_close(got, reference(a, w, 6, lambda t: t >= 3 and (t - 3) % 2 == 0))


def test_looksam_reuses_the_stored_orthogonal_direction():
  a, w = quadratic(3)
  tx = sam_lib.sam(base_opt(), RHO, variant="looksam", every=3, reuse_weight=0.7)
  got, states, _ = run_transform(tx, a, w, 7)
  # g_v = g_sam - its projection on g is rho-small, and the reuse rescales it to 0.7 ||g||, which
  # amplifies its fp32 rounding: 5e-5 is < 1e-4 of how far the reuse moves the weights (> 0.35).
  assert_paths_close(got, reference(a, w, 7, lambda t: t % 3 == 0, reuse_weight=0.7), atol=5e-5)
  # It differs from SAM-every-3 (the reuse term is not zero) and stores a direction orthogonal to
  # the clean gradient of its last SAM step.
  every, _, _ = run_transform(sam_lib.sam(base_opt(), RHO, every=3), a, w, 7)
  assert np.max(np.abs(got[1] - every[1])) > 0.1
  assert isinstance(states[0].policy_state, sam_lib.LookSAMState)
  assert float(jnp.linalg.norm(states[0].policy_state.direction)) > 0


def test_aesam_at_minus_infinity_is_sam_and_at_plus_infinity_is_the_base():
  a, w = quadratic(4)
  sam_path, _, _ = run_transform(sam_lib.sam(base_opt(), RHO), a, w, 6)
  base_path, _, _ = run_transform(sam_lib.sam(base_opt(), 0.0), a, w, 6)
  inf = float("inf")
  always, s_always, _ = run_transform(
    sam_lib.sam(base_opt(), RHO, variant="aesam", adaptive_c=(-inf, -inf)), a, w, 6
  )
  never, s_never, _ = run_transform(
    sam_lib.sam(base_opt(), RHO, variant="aesam", adaptive_c=(inf, inf)), a, w, 6
  )
  assert_paths_close(always, sam_path, rtol=1e-6, atol=1e-7)
  assert_paths_close(never, base_path, rtol=1e-6, atol=1e-7)
  assert [float(s.active) for s in s_always] == [1] * 6
  assert [float(s.active) for s in s_never] == [0] * 6


def test_aesam_statistics_and_switching_follow_the_paper_rule():
  """mean/var are EMAs of ||g||^2; SAM iff ||g||^2 >= mean + c_t std, c_t linear over the run."""
  a, w = quadratic(5)
  decay, c0, c1, total = 0.5, -0.5, 0.5, 6
  tx = sam_lib.sam(
    base_opt(), RHO, variant="aesam", adaptive_decay=decay, adaptive_c=(c0, c1), total_steps=total
  )
  got, states, mats = run_transform(tx, a, w, total)
  mean = var = 0.0
  w_ref, v = np.asarray(w, np.float64), np.zeros(len(w))
  for t, mat in enumerate(mats):
    g = mat @ w_ref
    sq = g @ g
    mean = decay * mean + (1 - decay) * sq
    var = decay * var + (1 - decay) * (sq - mean) ** 2
    take = sq >= mean + (c0 + (c1 - c0) * t / total) * np.sqrt(var)
    assert float(states[t].active) == float(take), t
    np.testing.assert_allclose(float(states[t].policy_state.mean), mean, rtol=1e-5)
    d = mat @ (w_ref + RHO * g / np.linalg.norm(g)) if take else g
    v = MOMENTUM * v + d + WD * w_ref
    w_ref = w_ref - LR * v
    np.testing.assert_allclose(got[t], w_ref, rtol=2e-5, atol=1e-6)
  assert 0 < sum(float(s.active) for s in states) < total  # the rule did switch


def test_msam_matches_a_hand_written_reference_on_a_quadratic():
  """Becker et al.'s MSAM: g_t at w_t - rho v/||v||, then SGD momentum; the stored weights are
  the clean w_t (what eval and checkpoints see)."""
  a, w = quadratic(6)
  rho = 0.3
  tx = sam_lib.sam(base_opt(), rho, variant="msam")
  mat = jnp.asarray(a, jnp.float32)

  @jax.jit
  def step(params, state):
    at = sam_lib.msam_point(params, state, rho)
    grads = jax.grad(lambda p: 0.5 * p @ mat @ p)(at)
    updates, state = tx.update(grads, state, params)  # no grad_fn: one gradient per step
    return optax.apply_updates(params, updates), state

  params, state = jnp.asarray(w, jnp.float32), tx.init(jnp.asarray(w, jnp.float32))
  w_ref, v = np.asarray(w, np.float64), np.zeros(len(w))
  for t in range(6):
    params, state = step(params, state)
    point = w_ref - rho * v / (np.linalg.norm(v) + 1e-12)
    v = MOMENTUM * v + a @ point + WD * w_ref
    w_ref = w_ref - LR * v
    np.testing.assert_allclose(np.asarray(params), w_ref, rtol=2e-5, atol=1e-6, err_msg=str(t))
    assert float(state.active) == 1.0
  assert np.linalg.norm(v) > 0


def test_msam_needs_a_momentum_buffer():
  with pytest.raises(ConfigError, match="momentum"):
    sam_lib.msam_point(
      jnp.zeros(3), sam_lib.sam(optax.adam(0.1), 0.1, variant="msam").init(jnp.zeros(3)), 0.1
    )


def test_a_skipped_step_never_runs_the_perturbed_pass():
  """The skip is a real branch: the perturbed pass's host callback fires on SAM steps only."""
  a, w = quadratic(7)
  calls = []
  mat = jnp.asarray(a, jnp.float32)
  tx = sam_lib.sam(base_opt(), RHO, every=3)

  def grad_fn(p):
    jax.debug.callback(lambda: calls.append(1))
    return jax.value_and_grad(lambda q: 0.5 * q @ mat @ q)(p)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(mat @ params, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  params = jnp.asarray(w, jnp.float32)
  state = tx.init(params)
  for _ in range(6):
    params, state = step(params, state)
  jax.effects_barrier()
  assert len(calls) == 2  # steps 0 and 3
  hlo = step.lower(params, state).compile().as_text()
  assert "conditional" in hlo


def test_predicate_under_vmap_groups_stays_a_cond():
  """AE-SAM's predicate is a pmean over the ascent groups: unbatched, so vmap keeps the cond."""
  a, w = quadratic(8)
  mat = jnp.asarray(a, jnp.float32)
  tx = sam_lib.sam(base_opt(), RHO, variant="aesam", axis_name="g")
  params = jnp.asarray(w, jnp.float32)
  state = tx.init(params)
  vg = jax.value_and_grad(lambda p, x: 0.5 * (p * x) @ mat @ (p * x))

  def group(x):
    return tx.update(vg(params, x)[1], state, params, grad_fn=lambda p: vg(p, x))[0]

  jaxpr = jax.make_jaxpr(jax.vmap(group, axis_name="g"))(jnp.ones((4, len(w))))
  assert "cond[" in str(jaxpr)


# --- the real train step -----------------------------------------------------------------------


def variant_config(**sam):
  """make_config's SAM with these sam.* keys, over a 10-step schedule (run_steps: 10 per epoch)."""
  config = make_config(rho=0.05)
  config.num_epochs = 1
  for key, value in sam.items():
    config.sam[key] = value
  return config


@pytest.mark.slow  # compiles the real train step, several configs
@pytest.mark.parametrize(
  "sam",
  [{"every": 2}, {"variant": "looksam", "every": 2}, {"variant": "aesam"}, {"start_fraction": 0.2}],
  ids=["every2", "looksam", "aesam", "late"],
)
def test_8_devices_take_the_branch_1_device_with_8_groups_takes(sam):
  batches = [make_batch(seed=s) for s in range(4)]
  config = variant_config(**sam)
  on_8, m8, _ = run_steps(config, MESH_8(), TinyNet(), batches)
  config.sam.m = 4
  grouped, m1, _ = run_steps(config, MESH_1(), TinyNet(), batches, group=4)
  assert_trees_close(grouped.params, on_8.params)
  assert [m["sam/active"] for m in m8] == [m["sam/active"] for m in m1]
  assert 0 < sum(m["sam/active"] for m in m8) <= len(batches)


def _run_with_settings(config, mesh, model, batches, per_device):
  """run_steps with the StepConfig SAM fields the train loop derives from the config."""
  settings = optim.step_sam_settings(config, per_device, steps_per_epoch=10)
  groups = settings["group_size"] < per_device // settings["accum_steps"]
  return run_steps(
    config,
    mesh,
    model,
    batches,
    group=settings["group_size"] * groups,
    cfg=dataclasses.replace(step_cfg(), **settings),
  )


@pytest.mark.slow  # compiles the real train step, several configs
@pytest.mark.parametrize(
  "sam",
  [{}, {"every": 2}, {"start_fraction": 0.2}, {"variant": "aesam"}],
  ids=["sam", "every2", "late", "aesam"],
)
def test_accum_steps_equals_sam_m_of_the_micro_batch(sam):
  """accum_steps = 2 on a per-device batch of 32 is sam.m = 16: own ascent, own BN statistics."""
  batches = [make_batch(seed=s) for s in range(3)]
  accum = variant_config(**sam)
  accum.accum_steps = 2
  got, m_acc, _ = _run_with_settings(accum, MESH_1(), TinyBNNet(), batches, per_device=32)
  grouped = variant_config(**sam)
  grouped.sam.m = 16
  want, m_grp, _ = _run_with_settings(grouped, MESH_1(), TinyBNNet(), batches, per_device=32)
  if sam.get("variant") == "aesam":  # it decides per micro-batch, on the micro-batch's gradient
    assert all(m["sam/active"] in (0.0, 0.5, 1.0) for m in m_acc)
    return
  assert_trees_close(got.params, want.params)
  assert_trees_close(got.batch_stats, want.batch_stats)
  assert [m["sam/active"] for m in m_acc] == [m["sam/active"] for m in m_grp]
  np.testing.assert_allclose(
    [m["train/loss"] for m in m_acc], [m["train/loss"] for m in m_grp], rtol=1e-5
  )


@pytest.mark.slow  # compiles the real train step, several configs
@pytest.mark.parametrize(
  "sam",
  [
    {"variant": "looksam", "every": 2},
    {"variant": "gsam", "alpha": 0.1},
    {"variant": "msam"},
    {"variant": "asam"},
  ],
  ids=["looksam", "gsam", "msam", "asam"],
)
def test_accum_steps_runs_every_variant(sam):
  """Each micro-batch is one SAM update: LookSAM's stored direction and GSAM's decomposition use
  the micro-batch's (device-averaged) gradients, so they differ from sam.m grouping; it trains."""
  batches = [make_batch(seed=s) for s in range(3)]
  config = variant_config(**sam)
  config.accum_steps = 2
  got, metrics, _ = _run_with_settings(config, MESH_1(), TinyBNNet(), batches, per_device=32)
  plain = variant_config(**sam)
  ref, _, _ = _run_with_settings(plain, MESH_1(), TinyBNNet(), batches, per_device=32)
  assert all(np.isfinite(m["train/loss"]) for m in metrics)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(got.params))
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), got.params, ref.params)
  assert max(jax.tree.leaves(moved)) > 1e-4  # micro-batch ascents and BN: another step


@pytest.mark.slow  # compiles the real train step, several configs
def test_accum_steps_with_sgd_equals_the_full_batch_step():
  batches = [make_batch(seed=s) for s in range(3)]
  accum = make_config(rho=0.0)
  accum.accum_steps = 4
  got, _, _ = _run_with_settings(accum, MESH_8(), TinyNet(), batches, per_device=4)
  want, _, _ = run_steps(make_config(rho=0.0), MESH_8(), TinyNet(), batches)
  assert_trees_close(got.params, want.params)


@pytest.mark.slow  # compiles the real train step, several configs
def test_msam_step_takes_one_pass_and_keeps_clean_weights():
  batches = [make_batch(seed=s) for s in range(3)]
  config = variant_config(variant="msam")
  config.sam.rho = 0.5
  got, metrics, _ = _run_with_settings(config, MESH_1(), TinyNet(), batches, per_device=32)
  assert all(m["sam/active"] == 1.0 for m in metrics)
  # The reference: the same loop by hand, gradients at w - rho v / ||v||.
  tx, _ = optim.make_optimizer(config, steps_per_epoch=10, axis_name=None)
  model = TinyNet()
  params = init_state(model, tx).params  # the run's own initial weights
  state = tx.init(params)
  cfg = step_cfg()
  for b in batches:
    images = steps.preprocess(jnp.asarray(b["image"]), cfg)
    loss = lambda p, b=b, images=images: jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, images, train=False), b["label"]
      )
    )
    grads = jax.grad(loss)(sam_lib.msam_point(params, state, 0.5))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert_trees_close(got.params, params, rtol=1e-5, atol=1e-6)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs,needle",
  [
    ({"every": 0}, "every=0"),
    ({"every": 2, "variant": "aesam"}, "every=2 is not used"),
    ({"every": 2, "variant": "msam"}, "every=2 is not used"),
    ({"start_step": -1}, "start_step=-1"),
    ({"accum_steps": 0}, "accum_steps=0"),
    ({"reuse_weight": 0.5}, "reuse_weight=0.5 is only used by variant='looksam'"),
    ({"adaptive_c": (0.0, 1.0)}, "only used by variant='aesam'"),
    ({"variant": "aesam", "adaptive_decay": 1.0}, "adaptive_decay=1.0"),
  ],
)
def test_bad_variant_arguments_raise_one_line_config_errors(kwargs, needle):
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")) as e:
    sam_lib.sam(base_opt(), RHO, **kwargs)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "key,value,needle",
  [
    ("sam.start_fraction", 1.0, "sam.start_fraction=1.0"),
    ("sam.start_fraction", -0.1, "sam.start_fraction=-0.1"),
    ("accum_steps", 3, "accum_steps=3 is invalid; accepted: an integer >= 1 that divides"),
  ],
)
def test_bad_config_keys_raise_config_errors(key, value, needle):
  config = make_config(rho=0.05)
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(ConfigError, match=needle):
    optim.step_sam_settings(config, per_device_batch=32, steps_per_epoch=10)
    optim.make_optimizer(config, steps_per_epoch=10, axis_name=None)


def test_msam_with_a_momentum_free_optimizer_is_a_config_error():
  config = variant_config(variant="msam")
  config.optimizer.name = "adamw"
  with pytest.raises(ConfigError, match="optimizer.name='adamw'"):
    optim.make_optimizer(config, steps_per_epoch=10, axis_name=None)


@pytest.mark.slow  # compiles the real train step, several configs
@pytest.mark.parametrize(
  "sam",
  [{"every": 3}, {"variant": "looksam", "every": 3}, {"start_fraction": 0.3}],
  ids=["every3", "looksam", "late"],
)
def test_host_scheduled_steps_equal_the_on_device_schedule(sam):
  """The loop's two branch-free programs chosen on the host give the cond path's training."""
  batches = [make_batch(seed=s) for s in range(5)]
  config = variant_config(**sam)
  want, m_cond, _ = run_steps(config, MESH_8(), TinyNet(), batches)
  mesh = MESH_8()
  tx, lr = optim.make_optimizer(config, steps_per_epoch=10, axis_name=parallel.DATA_AXIS)
  schedule = optim.host_ascent_schedule(config, steps_per_epoch=10)
  step = steps.compile_scheduled_train_step(
    mesh, schedule, model=TinyNet(), tx=tx, lr_schedule=lr, cfg=step_cfg()
  )
  state = parallel.replicate(init_state(TinyNet(), tx), mesh)
  active = []
  for i, b in enumerate(batches):
    state, m = step(state, parallel.shard_batch(b, mesh), i)
    active.append(float(m["sam/active"]))
  assert_trees_close(parallel.fetch(state).params, want.params)
  assert active == [m["sam/active"] for m in m_cond] == [float(schedule(i)) for i in range(5)]
  sam_only = steps.compile_train_step(
    mesh, ascent=True, model=TinyNet(), tx=tx, lr_schedule=lr, cfg=step_cfg()
  )
  hlo = sam_only.lower(state, parallel.shard_batch(batches[0], mesh)).compile().as_text()
  assert "conditional" not in hlo


def test_no_host_schedule_where_one_program_serves_every_step():
  for sam in ({}, {"variant": "aesam"}, {"variant": "msam"}):
    assert optim.host_ascent_schedule(variant_config(**sam), steps_per_epoch=10) is None
  assert optim.host_ascent_schedule(make_config(rho=0.0), steps_per_epoch=10) is None
