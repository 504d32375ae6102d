"""The Flax ViT and its weight import, proven against timm's PyTorch VisionTransformer.

The timm model gets random weights everywhere (its zero-initialised head and class token too, so a
wrong mapping shows), is saved as timm saves it (safetensors) or in the original ViT `.npz` layout,
imported through `load_pretrained`, and both run on the same batch.
"""

import sys

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from jaxsam import models, run_setup
from jaxsam.convert import convert
from jaxsam.errors import ConfigError, PretrainedError
from jaxsam.models import pretrained, vit, vit_import, weight_files

sys.modules.setdefault("triton", None)  # see test_pretrained.py: triton's LLVM vs TensorFlow's
torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # after the torch skip

LOGIT_TOL = 1e-4  # relative to the largest logit, as the other imports
WIDTH, DEPTH, HEADS, PATCH, CLASSES = 96, 2, 3, 4, 10


def timm_vit(pool: str, size: int, classes: int = CLASSES, seed: int = 0):
  """A small timm ViT (token: class token + final norm; avg: no class token, fc_norm), random."""
  torch.manual_seed(seed)
  model = timm.models.vision_transformer.VisionTransformer(
    img_size=size,
    patch_size=PATCH,
    num_classes=classes,
    global_pool="token" if pool == "token" else "avg",
    class_token=pool == "token",
    embed_dim=WIDTH,
    depth=DEPTH,
    num_heads=HEADS,
  ).eval()
  with torch.no_grad():
    for p in model.parameters():  # all nonzero and O(1)-varied: every tensor matters
      p.copy_(p + 0.1 * torch.randn_like(p))
  return model


def flax_vit(pool: str, classes: int = CLASSES, dtype=jnp.float32) -> vit.ViT:
  return vit.ViT(
    num_classes=classes,
    patch=PATCH,
    width=WIDTH,
    depth=DEPTH,
    heads=HEADS,
    mlp=4 * WIDTH,
    pool=pool,
    dtype=dtype,
  )


def init_zeros(module, size):
  x = jnp.zeros((1, size, size, 3))
  shapes = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)}, x, train=False))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def jiggle(variables, scale=0.1):
  """Random nonzero values everywhere (the head starts at zero)."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return tree.unflatten([a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def images(size, seed=0):
  return np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)


def timm_logits(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def assert_logits_close(got, want):
  rel = np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want))
  assert rel <= LOGIT_TOL, f"relative logit error {rel:.2e}"


def save_timm(model, path):
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
  return path


def original_npz(model, path, big_vision=False):
  """The timm model's weights under google-research/vision_transformer's `.npz` names (or
  big_vision's, blocks stacked as its scanned encoder stores them)."""
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  heads, width = HEADS, WIDTH
  out = {
    "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
    "embedding/bias": sd["patch_embed.proj.bias"],
    "cls": sd["cls_token"],
    "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
    "Transformer/encoder_norm/scale": sd["norm.weight"],
    "Transformer/encoder_norm/bias": sd["norm.bias"],
    "head/kernel": sd["head.weight"].T,
    "head/bias": sd["head.bias"],
  }
  names = ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
  if big_vision:
    names = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
  ln0, attn, ln2, mlp = names
  blocks = []
  for i in range(DEPTH):
    b = f"blocks.{i}."
    q, k, v = np.split(sd[b + "attn.qkv.weight"], 3)
    qb, kb, vb = np.split(sd[b + "attn.qkv.bias"], 3)
    block = {
      f"{ln0}/scale": sd[b + "norm1.weight"],
      f"{ln0}/bias": sd[b + "norm1.bias"],
      f"{ln2}/scale": sd[b + "norm2.weight"],
      f"{ln2}/bias": sd[b + "norm2.bias"],
      f"{mlp}/Dense_0/kernel": sd[b + "mlp.fc1.weight"].T,
      f"{mlp}/Dense_0/bias": sd[b + "mlp.fc1.bias"],
      f"{mlp}/Dense_1/kernel": sd[b + "mlp.fc2.weight"].T,
      f"{mlp}/Dense_1/bias": sd[b + "mlp.fc2.bias"],
      f"{attn}/out/kernel": sd[b + "attn.proj.weight"].T.reshape(heads, width // heads, width),
      f"{attn}/out/bias": sd[b + "attn.proj.bias"],
    }
    for part, w, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
      block[f"{attn}/{part}/kernel"] = w.T.reshape(width, heads, width // heads)
      block[f"{attn}/{part}/bias"] = bias.reshape(heads, width // heads)
    blocks.append(block)
  if big_vision:
    out["pos_embedding"] = out.pop("Transformer/posembed_input/pos_embedding")
    for key in blocks[0]:
      out[f"Transformer/encoderblock/{key}"] = np.stack([b[key] for b in blocks])
    out = {f"params/{k}": v for k, v in out.items()}
  else:
    for i, block in enumerate(blocks):
      out.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in block.items()})
  np.savez(path, **out)
  return path


def test_parameter_counts_equal_timms():
  """ViT-B/16 and ViT-S/16 at 224 px with 1000 classes: the same count as timm's models."""
  for name, timm_name, expected in (
    ("vit_b16", "vit_base_patch16_224", 86_567_656),
    ("vit_s16", "vit_small_patch16_224", 22_050_664),
  ):
    module = models.create_model(ml_collections.ConfigDict({"name": name}), 1000)
    x = jnp.zeros((1, 224, 224, 3))
    shapes = jax.eval_shape(
      lambda m=module, x=x: m.init({"params": jax.random.key(0)}, x, train=False)
    )
    ours = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    theirs = sum(p.numel() for p in timm.create_model(timm_name, pretrained=False).parameters())
    assert ours == theirs == expected


def test_registry_holds_every_vit_size():
  assert {"vit_ti16", "vit_s16", "vit_b16", "vit_b32", "vit_l16", "vit_ti4", "vit_s4"} <= set(
    models.MODELS
  )
  cfg = ml_collections.ConfigDict({"name": "vit_s4", "pool": "mean"})
  with pytest.raises(ConfigError, match=r"model.pool='mean'.*token, gap"):
    models.create_model(cfg, 10)


@pytest.mark.parametrize("pool", ["token", "gap"])
@pytest.mark.parametrize("size", [32, 48])
def test_timm_safetensors_give_timms_logits(tmp_path, pool, size):
  """Two resolutions, both poolings: the imported weights compute timm's logits."""
  ref = timm_vit(pool, size)
  path = save_timm(ref, tmp_path / "vit.safetensors")
  module = flax_vit(pool)
  variables = pretrained.load_pretrained(path, module, init_zeros(module, size))
  x = images(size)
  assert_logits_close(module.apply(variables, x, train=False), timm_logits(ref, x))


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_position_embeddings_resample_bilinearly_to_a_new_resolution(tmp_path, pool):
  """Weights for 32 px loaded at 48 px equal timm's model at 48 px with timm's bilinear resample
  (class token's embedding kept); the import also matches torch's bilinear interpolate."""
  ref32 = timm_vit(pool, 32)
  path = save_timm(ref32, tmp_path / "vit32.safetensors")
  prefix = 1 if pool == "token" else 0
  ref48 = timm_vit(pool, 48, seed=1)
  state = dict(ref32.state_dict())
  state["pos_embed"] = timm.layers.resample_abs_pos_embed(
    state["pos_embed"],
    [12, 12],
    [8, 8],
    num_prefix_tokens=prefix,
    interpolation="bilinear",
    antialias=False,
  )
  ref48.load_state_dict(state)
  module = flax_vit(pool)
  variables = pretrained.load_pretrained(path, module, init_zeros(module, 48))
  pos = variables["params"]["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_allclose(pos, state["pos_embed"].numpy(), rtol=1e-6, atol=1e-6)
  x = images(48)
  assert_logits_close(module.apply(variables, x, train=False), timm_logits(ref48, x))
  # Down as well as up (no antialiasing, as F.interpolate's default).
  grid = np.random.default_rng(0).normal(size=(1, 1 + 7 * 7, 5)).astype(np.float32)
  down = vit_import.resample_pos_embedding(grid, (1, 1 + 4 * 4, 5), "test")
  want = torch.nn.functional.interpolate(
    torch.from_numpy(grid[0, 1:].reshape(1, 7, 7, 5)).permute(0, 3, 1, 2),
    size=(4, 4),
    mode="bilinear",
    align_corners=False,
  )
  np.testing.assert_allclose(down[0, 1:], want.permute(0, 2, 3, 1).reshape(16, 5), atol=1e-6)
  np.testing.assert_array_equal(down[0, :1], grid[0, :1])


@pytest.mark.parametrize("big_vision", [False, True], ids=["original", "big_vision_scanned"])
def test_npz_in_the_original_layout_loads_to_the_same_logits(tmp_path, big_vision):
  ref = timm_vit("token", 32)
  path = original_npz(ref, tmp_path / "ViT-test.npz", big_vision=big_vision)
  module = flax_vit("token")
  variables = pretrained.load_pretrained(path, module, init_zeros(module, 32))
  x = images(32)
  assert_logits_close(module.apply(variables, x, train=False), timm_logits(ref, x))


def test_head_of_another_class_count_stays_fresh(tmp_path):
  ref = timm_vit("token", 32, classes=1000)
  path = save_timm(ref, tmp_path / "vit.safetensors")
  module = flax_vit("token", classes=7)
  fresh = module.init({"params": jax.random.key(3)}, jnp.zeros((1, 32, 32, 3)), train=False)
  fresh = jax.tree.map(lambda a: a + 0.5, fresh)  # distinguishable from any file tensor
  loaded = pretrained.load_pretrained(path, module, fresh)
  np.testing.assert_array_equal(
    loaded["params"]["head"]["kernel"], fresh["params"]["head"]["kernel"]
  )
  np.testing.assert_allclose(
    loaded["params"]["cls"], ref.cls_token.detach().numpy(), rtol=0, atol=0
  )


def test_tensors_that_do_not_fit_are_named(tmp_path):
  ref = timm_vit("token", 32)
  state = {k: v.contiguous() for k, v in ref.state_dict().items()}
  extra = dict(state, **{"blocks.0.ls1.gamma": torch.ones(WIDTH)})  # LayerScale: another variant
  save_file(extra, str(tmp_path / "extra.safetensors"))
  module = flax_vit("token")
  with pytest.raises(PretrainedError, match=r"unexpected tensors blocks\.0\.ls1\.gamma"):
    pretrained.load_pretrained(tmp_path / "extra.safetensors", module, init_zeros(module, 32))
  missing = {k: v for k, v in state.items() if k != "blocks.1.norm2.bias"}
  save_file(missing, str(tmp_path / "missing.safetensors"))
  with pytest.raises(
    PretrainedError, match=r"missing params/Transformer/encoderblock_1/LayerNorm_2"
  ):
    pretrained.load_pretrained(tmp_path / "missing.safetensors", module, init_zeros(module, 32))
  gap = flax_vit("gap")  # a class-token file for a GAP model: cls and encoder_norm have no place
  with pytest.raises(
    PretrainedError,
    match=r"missing params/fc_norm.*unexpected params/Transform.*wrong shape params/Transformer/",
  ):
    pretrained.load_pretrained(save_timm(ref, tmp_path / "v.safetensors"), gap, init_zeros(gap, 32))


def test_jaxsam_file_round_trips_and_auto_normalization_is_inception(tmp_path):
  ref = timm_vit("token", 32)
  path = save_timm(ref, tmp_path / "vit.safetensors")
  module = flax_vit("token")
  variables = pretrained.load_pretrained(path, module, init_zeros(module, 32))
  weight_files.save_variables(tmp_path / "mine.safetensors", variables, module, origin="timm")
  again = pretrained.load_pretrained(tmp_path / "mine.safetensors", module, init_zeros(module, 32))
  jax.tree.map(np.testing.assert_array_equal, again, variables)
  config = common.get_base_config()
  config.model.name = "vit_ti16"
  config.model.pretrained = str(path)
  norm = run_setup.normalization(config, data=None)
  assert norm == {"mean": (0.5,) * 3, "std": (0.5,) * 3, "bgr": False}


@pytest.mark.slow  # ~6 s on 2 CPU cores
def test_dropout_and_drop_path_draw_from_the_dropout_rng():
  cfg = ml_collections.ConfigDict(
    {"name": "vit_tiny", "dropout_rate": 0.1, "drop_connect_rate": 0.5}
  )
  module = models.create_model(cfg, 10)
  assert module.drop_path_rate == 0.5 and module.dropout_rate == 0.1
  x = jnp.asarray(images(16, seed=1))
  variables = module.init({"params": jax.random.key(0)}, x, train=False)
  variables = jiggle(variables)
  run = lambda k: module.apply(variables, x, train=True, rngs={"dropout": jax.random.key(k)})
  assert not np.allclose(run(0), run(1))
  np.testing.assert_array_equal(run(0), run(0))
  eval_a = module.apply(variables, x, train=False)
  np.testing.assert_array_equal(eval_a, module.apply(variables, x, train=False))


def test_bfloat16_forward_keeps_float32_params_and_is_close():
  module, module16 = flax_vit("token"), flax_vit("token", dtype=jnp.bfloat16)
  x = jnp.asarray(images(32))
  variables = module.init({"params": jax.random.key(0)}, x, train=False)
  variables = jiggle(variables)
  assert all(
    a.dtype == jnp.float32
    for a in jax.tree.leaves(module16.init({"params": jax.random.key(0)}, x, train=False))
  )
  y32 = module.apply(variables, x, train=False)
  y16 = module16.apply(variables, x, train=False)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(y16, np.float32), y32, rtol=0.05, atol=0.05 * np.abs(y32).max()
  )


def test_flax_leaf_names_are_the_original_vit_layout():
  module = flax_vit("token")
  variables = init_zeros(module, 32)
  names = set(flax.traverse_util.flatten_dict(variables["params"], sep="/"))
  assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in names
  assert {
    "cls",
    "embedding/kernel",
    "Transformer/posembed_input/pos_embedding",
    "head/bias",
  } <= names


def test_a_registered_vit_loads_by_its_config_as_launch_does(tmp_path):
  """`config.model` as the model reference (train.py's path): vit_tiny's heads split timm's qkv;
  jaxsam.convert writes a file that loads to the same logits, at the weights' own resolution."""
  size = vit.SIZES["vit_tiny"]
  torch.manual_seed(0)
  ref = timm.models.vision_transformer.VisionTransformer(
    img_size=16,
    patch_size=size.patch,
    num_classes=CLASSES,
    embed_dim=size.width,
    depth=size.depth,
    num_heads=size.heads,
  ).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.copy_(p + 0.1 * torch.randn_like(p))
  path = save_timm(ref, tmp_path / "tiny.safetensors")
  config = common.get_base_config()
  config.model.name = "vit_tiny"
  module = models.create_model(config.model, CLASSES)
  variables = pretrained.load_pretrained(path, config.model, init_zeros(module, 16))
  x = images(16)
  assert_logits_close(module.apply(variables, x, train=False), timm_logits(ref, x))
  converted = tmp_path / "tiny_converted.safetensors"
  assert (
    convert("vit_tiny", str(path), str(converted)) == len(ref.state_dict()) + 4 * size.depth
  )  # qkv: 2 -> 6
  again = pretrained.load_pretrained(converted, config.model, init_zeros(module, 16))
  assert_logits_close(module.apply(again, x, train=False), timm_logits(ref, x))
