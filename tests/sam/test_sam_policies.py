"""SAM's variant registry and its ascent schedule.

A variant registered from this file (no change to jaxsam) trains through `sam.sam()` as a
hand-written reference says; the AscentSchedule answers "SAM on this step?" on the host and in a
compiled step as the count rule and AE-SAM's rule say, with the expected values enumerated here.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from jaxsam import config_schema, optim
from jaxsam import sam as sam_lib
from jaxsam.errors import ConfigError
from jaxsam.sam_schedule import AdaptiveRule, AscentSchedule

RHO, LR, MOMENTUM, WD = 0.05, 0.1, 0.9, 1e-3


def base_opt():
  return optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))


@pytest.fixture
def mix_sam():
  """A tiny variant, registered here only: ascent in the L-inf ball (rho * sign(g)), descent
  along (1 - mix) g + mix g_sam, and a count of its SAM steps as the state it carries."""

  @sam_lib.register_policy("mix_sam_test")
  @dataclasses.dataclass(frozen=True)
  class MixSAM(sam_lib.Policy):
    mix: float = 0.5

    def init(self, params):
      return jnp.zeros((), jnp.int32)

    def perturb(self, grads, params, rho, eps):
      return jax.tree.map(lambda g: rho * jnp.sign(g.astype(jnp.float32)), grads)

    def descent(self, g_clean, g_sam, state, eps):
      mixed = jax.tree.map(lambda g, s: (1 - self.mix) * g + self.mix * s, g_clean, g_sam)
      return mixed, state + 1

  yield MixSAM
  del sam_lib.POLICIES["mix_sam_test"]


def quadratic_steps(num_steps, n=5, seed=0):
  """Per-step SPD matrices A_t (the loss 1/2 w^T A_t w) and a start point."""
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(n, n))
  a = m @ m.T / n + 0.5 * np.eye(n)
  mats = [a + 0.3 * np.diag(rng.normal(size=n)) for _ in range(num_steps)]
  return mats, rng.normal(size=n)


def test_a_variant_registered_outside_jaxsam_trains_through_sam(mix_sam):
  mats, w0 = quadratic_steps(7)
  mix, every = 0.3, 2
  tx = sam_lib.sam(base_opt(), RHO, variant="mix_sam_test", mix=mix, every=every)

  @jax.jit
  def step(params, state, mat):
    vg = jax.value_and_grad(lambda p: 0.5 * p @ mat @ p)
    updates, state = tx.update(vg(params)[1], state, params, grad_fn=vg)
    return optax.apply_updates(params, updates), state

  params, v, w = jnp.asarray(w0, jnp.float32), np.zeros(len(w0)), np.asarray(w0)
  state = tx.init(params)
  for t, mat in enumerate(mats):
    params, state = step(params, state, jnp.asarray(mat, jnp.float32))
    g = mat @ w
    d = (1 - mix) * g + mix * (mat @ (w + RHO * np.sign(g))) if t % every == 0 else g
    v = MOMENTUM * v + d + WD * w
    w = w - LR * v
    np.testing.assert_allclose(np.asarray(params), w, rtol=2e-5, atol=1e-6, err_msg=f"step {t}")
    assert float(state.active) == float(t % every == 0)
  assert int(state.policy_state) == 4  # its own state: SAM steps 0, 2, 4, 6


def test_a_registered_variant_s_options_belong_to_it(mix_sam):
  with pytest.raises(ConfigError, match="mix=0.3 is only used by variant='mix_sam_test'"):
    sam_lib.sam(base_opt(), RHO, mix=0.3)
  with pytest.raises(ConfigError, match="alpha=0.2 is only used by variant='gsam'"):
    sam_lib.sam(base_opt(), RHO, variant="mix_sam_test", alpha=0.2)
  sam_lib.sam(base_opt(), RHO, variant="mix_sam_test", alpha=0.0, reuse_weight=0.7)  # defaults
  with pytest.raises(TypeError, match="'mixx'"):
    sam_lib.sam(base_opt(), RHO, variant="mix_sam_test", mixx=0.3)
  with pytest.raises(ValueError, match="already registered"):
    sam_lib.register_policy("mix_sam_test")(mix_sam)


def test_a_registered_variant_is_a_config_choice(mix_sam):
  config = common.get_base_config()
  config.sam.rho, config.sam.variant, config.sam.every = RHO, "mix_sam_test", 3
  assert config_schema.problems(config) == []
  optim.make_optimizer(config, steps_per_epoch=10, axis_name=None)
  schedule = optim.host_ascent_schedule(config, steps_per_epoch=10)
  assert [s for s in range(10) if schedule(s)] == [0, 3, 6, 9]
  config.sam.variant = "no_such_variant"
  assert any("sam.variant='no_such_variant'" in p for p in config_schema.problems(config))


# --- the schedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("every", [1, 2, 3, 5])
def test_schedule_answers_the_count_rule_on_a_grid_of_steps(every):
  """SAM on start, start + every, start + 2 every, ...: on the host, traced, and per update under
  gradient accumulation (3 updates per optimizer step)."""
  n, accum = 40, 3
  for start in (0, 1, 4, 7):
    sam_steps = set(range(start, n, every))  # enumerated, not the schedule's formula
    expected = [s in sam_steps for s in range(n)]
    schedule = AscentSchedule(every=every, start_step=start, accum_steps=accum)
    host = [schedule(s) for s in range(n)]
    assert host == expected, (every, start)
    assert all(type(x) is bool for x in host)
    assert schedule.always == (every == 1 and start == 0) == (not schedule.host_decides)
    counts = jnp.arange(n * accum)
    decide = jax.jit(jax.vmap(lambda c, s=schedule: s.decide(s.opt_step(c), 1.0, ())[0]))
    per_update = [x for x in expected for _ in range(accum)]
    if schedule.always:
      assert schedule.decide(counts[0], 1.0, ()) == (True, ())  # no predicate traced at all
    else:
      assert np.asarray(decide(counts)).tolist() == per_update, (every, start)


def test_adaptive_schedule_follows_ae_sam_s_rule_after_the_start():
  """SAM iff step >= start and ||g||^2 >= mean + c_t std (EMA statistics, c_t linear)."""
  decay, c0, c1, total, start = 0.8, -0.5, 0.5, 10, 2
  schedule = AscentSchedule(
    start_step=start, total_steps=total, adaptive=AdaptiveRule(decay, c0, c1)
  )
  assert not schedule.always and not schedule.host_decides
  norms = np.random.default_rng(3).uniform(0.5, 2.0, size=14)
  decide = jax.jit(schedule.decide)
  stats, mean, var, taken = schedule.init(), 0.0, 0.0, []
  for t, norm in enumerate(norms):
    take, stats = decide(jnp.int32(t), jnp.float32(norm), stats)
    sq = norm * norm
    mean = decay * mean + (1 - decay) * sq
    var = decay * var + (1 - decay) * (sq - mean) ** 2
    c = c0 + (c1 - c0) * min(t / total, 1.0)
    want = t >= start and sq >= mean + c * math.sqrt(var)
    assert bool(take) == want, t
    np.testing.assert_allclose(float(stats.mean), mean, rtol=1e-5)
    taken.append(want)
  assert any(taken[start:]) and not all(taken[start:])  # the rule did switch


def test_config_schedule_starts_at_the_start_fraction():
  config = common.get_base_config()
  config.num_epochs, config.sam.rho = 1, RHO
  config.sam.start_fraction, config.sam.every = 0.25, 3
  schedule = optim.ascent_schedule(config, steps_per_epoch=10)
  # 0.25 of 10 steps is 2.5: the first SAM step is 3, then every 3rd.
  assert [s for s in range(10) if schedule(s)] == [3, 6, 9]
  assert optim.host_ascent_schedule(config, steps_per_epoch=10) == schedule
  for variant in ("aesam", "msam"):
    config.sam.variant, config.sam.every = variant, 1
    assert optim.host_ascent_schedule(config, steps_per_epoch=10) is None
  assert optim.ascent_schedule(config, steps_per_epoch=10).start_step == 3


@pytest.mark.parametrize(
  "kwargs,needle",
  [
    ({"every": 0}, "sam every=0 is invalid"),
    ({"start_step": -1}, "sam start_step=-1 is invalid"),
    ({"accum_steps": 1.5}, "sam accum_steps=1.5 is invalid"),
  ],
)
def test_bad_schedule_arguments_are_one_line_config_errors(kwargs, needle):
  with pytest.raises(ConfigError, match=needle) as e:
    AscentSchedule(**kwargs)
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="sam adaptive_decay=1.0 is invalid"):
    AdaptiveRule(decay=1.0)
