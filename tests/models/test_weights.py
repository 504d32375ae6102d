"""Pretrained weights by name, fetched from a real HTTP server on 127.0.0.1.

The server (stdlib http.server in a thread) stands in for every weight host through
JAXSAM_WEIGHTS_MIRROR; it can serve the file, wrong bytes, half the file then a closed connection,
or HTTP 404, and counts its requests. The weights are a random-weight ResNet-18 written by torch
as torchvision writes its files, registered by the test under a test-only name with the sha256
prefix in its file name, as torchvision's entries are.
"""

import dataclasses
import hashlib
import http.server
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading

import jax
import ml_collections
import numpy as np
import pytest

from jaxsam import models
from jaxsam.errors import PretrainedError
from jaxsam.models import pretrained, weight_files, weights
from support import devices
from support.paths import ROOT
from support.runs import failure

sys.modules.setdefault("triton", None)  # see tests/models/test_pretrained.py
torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

REPO = pathlib.Path(ROOT)
TEST_NAME = "test/resnet18"


class WeightServer:
  """A threaded http.server serving {name: bytes}; `mode` picks ok / wrong / drop / 404."""

  def __init__(self, files: dict[str, bytes]):
    self.files = files
    self.mode = "ok"
    self.requests: list[str] = []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        name = self.path.lstrip("/")
        server.requests.append(name)
        data = server.files.get(name)
        if data is None or server.mode == "404":
          self.send_error(404)
          return
        if server.mode == "wrong":
          data = bytes(255 - b for b in data[:1024]) + data[1024:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if server.mode == "drop":  # half the promised bytes, then the connection closes
          self.wfile.write(data[: len(data) // 2])
          self.wfile.flush()
          self.close_connection = True
          return
        self.wfile.write(data)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def stop(self):
    self.httpd.shutdown()
    self.httpd.server_close()


def torchvision_file(seed: int = 0, nan_tensor: str | None = None) -> tuple[str, bytes]:
  """(torchvision-style file name, bytes) of a random-weight ResNet-18 state dict."""
  import io

  torch.manual_seed(seed)
  model = torchvision.models.resnet18()
  with torch.no_grad():  # non-trivial BN statistics, so a mis-mapped buffer would show
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 1.5)
  state = model.state_dict()
  if nan_tensor:
    state[nan_tensor].view(-1)[3] = float("nan")
  buffer = io.BytesIO()
  torch.save(state, buffer)
  data = buffer.getvalue()
  return f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth", data


@pytest.fixture(scope="module")
def resnet18():
  """(file name, bytes, registry entry) of the test-only registered ResNet-18."""
  name, data = torchvision_file()
  entry = weights.register(
    weights.Weights(
      name=TEST_NAME,
      model="resnet18",
      layout="torchvision",
      origin="torchvision",
      hash=f"sha256-prefix:{name[9:17]}",
      url=f"https://weights.invalid/models/{name}",  # no such host: only the mirror answers
      source="tests/models/test_weights.py",
    )
  )
  return name, data, entry


@pytest.fixture
def server(resnet18, monkeypatch, tmp_path):
  """The mirror serving the test weights, with an empty cache under tmp_path."""
  name, data, _ = resnet18
  srv = WeightServer({name: data})
  monkeypatch.setenv("JAXSAM_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("JAXSAM_WEIGHTS_MIRROR", srv.url + "/")
  for var in ("JAXSAM_OFFLINE", "HF_HUB_OFFLINE"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
  monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
  yield srv
  srv.stop()


def model_config(name="resnet18", pretrained=TEST_NAME, **kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {"name": name, "pretrained": pretrained, "resnet_v1": False, "cifar_stem": False, **kw}
  )


def cached_files(tmp_path) -> list[str]:
  """Every file in the weight cache except the lock files."""
  root = tmp_path / "cache"
  return sorted(
    str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".lock"
  )


def test_fetch_verifies_converts_then_the_cache_serves_without_the_server(
  resnet18, server, tmp_path, monkeypatch
):
  name, data, _ = resnet18
  resolved = weights.resolve(TEST_NAME, model_config())
  assert server.requests == [name]  # the mirror got the upstream file name
  assert resolved.file.endswith(".jaxsam.safetensors") and os.path.isfile(resolved.file)
  assert (resolved.origin, resolved.normalization) == ("torchvision", "imagenet")
  assert resolved.source == f"{server.url}/{name}"
  download = os.path.join(os.path.dirname(resolved.file), name)
  assert pathlib.Path(download).read_bytes() == data
  # The converted file holds the torch tensors under the Flax names.
  module = models.create_model(model_config(), 1000)
  shapes = jax.eval_shape(
    lambda: module.init({"params": jax.random.key(0)}, np.zeros((1, 32, 32, 3)), train=False)
  )
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  loaded = pretrained.load_pretrained(resolved.file, model_config(), zeros)
  state = torch.load(download, weights_only=True)
  np.testing.assert_array_equal(
    np.asarray(loaded["params"]["conv1"]["kernel"]),
    state["conv1.weight"].numpy().transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    np.asarray(loaded["batch_stats"]["layer1_0"]["bn1"]["var"]),
    state["layer1.0.bn1.running_var"].numpy(),
  )
  # Second time: the converted file alone, no request, even with the server gone and offline.
  server.stop()
  monkeypatch.setenv("JAXSAM_OFFLINE", "1")
  assert weights.resolve(TEST_NAME, model_config()).file == resolved.file
  assert server.requests == [name]


@pytest.mark.parametrize(
  "mode, what",
  [("wrong", "checksum mismatch"), ("drop", "connection failed"), ("404", "HTTP error 404")],
)
def test_bad_downloads_leave_nothing_and_a_rerun_retries(resnet18, server, tmp_path, mode, what):
  name, _, _ = resnet18
  server.mode = mode
  with pytest.raises(PretrainedError) as e:
    weights.resolve(TEST_NAME, model_config())
  message = str(e.value)
  assert "\n" not in message
  assert TEST_NAME in message and f"{server.url}/{name}" in message and what in message
  assert "rerun to retry" in message
  assert cached_files(tmp_path) == []  # no partial or unverified file
  assert len(server.requests) == 1 + weights.RETRIES  # pooch retried
  server.mode = "ok"
  assert os.path.isfile(weights.resolve(TEST_NAME, model_config()).file)


def test_offline_with_an_empty_cache_names_the_weight_the_file_and_where(
  resnet18, server, tmp_path, monkeypatch
):
  name, _, _ = resnet18
  monkeypatch.setenv("JAXSAM_OFFLINE", "1")
  with pytest.raises(PretrainedError) as e:
    weights.resolve(TEST_NAME, model_config())
  message = str(e.value)
  place = os.path.join(str(tmp_path / "cache"), "weights", "test", "resnet18", name)
  assert "\n" not in message and TEST_NAME in message and place in message
  assert server.requests == []


def test_a_cached_file_whose_hash_changed_is_downloaded_again(resnet18, server, tmp_path):
  name, data, _ = resnet18
  first = weights.resolve(TEST_NAME, model_config()).file
  download = os.path.join(os.path.dirname(first), name)
  # A damaged converted file is converted again from the (verified) download: no request.
  with open(first, "r+b") as f:
    f.seek(-8, os.SEEK_END)
    f.write(b"\0" * 8)
  assert weights.resolve(TEST_NAME, model_config()).file == first
  assert len(server.requests) == 1
  # A damaged download (and no converted file) is fetched again, not loaded.
  os.remove(first)
  with open(download, "r+b") as f:
    f.write(b"\0" * 16)
  weights.resolve(TEST_NAME, model_config())
  assert len(server.requests) == 2
  assert pathlib.Path(download).read_bytes() == data


def test_a_url_with_its_sha256(server, tmp_path):
  name, data = torchvision_file(seed=1)
  server.files[name] = data
  sha = hashlib.sha256(data).hexdigest()
  url = f"{server.url}/{name}"
  resolved = weights.resolve(f"{url}#sha256={sha}", model_config(pretrained=""))
  assert resolved.source == url and resolved.normalization == "imagenet"
  assert weights.input_normalization(model_config(pretrained=f"{url}#sha256={sha}")) == "imagenet"
  bad = "0" * 64
  with pytest.raises(PretrainedError, match="checksum mismatch"):
    weights.resolve(f"{url}#sha256={bad}", model_config(pretrained=""))
  assert [f for f in cached_files(tmp_path) if bad[:16] in f] == []
  with pytest.raises(PretrainedError, match=r"needs its checksum"):
    weights.resolve(url, model_config(pretrained=""))


def test_a_weight_file_holding_nan_is_refused_naming_the_tensor(server, tmp_path):
  name, data = torchvision_file(seed=2, nan_tensor="layer2.1.conv2.weight")
  server.files[name] = data
  spec = f"{server.url}/{name}#sha256={hashlib.sha256(data).hexdigest()}"
  with pytest.raises(PretrainedError, match=r"non-finite .* 'layer2\.1\.conv2\.weight' \(1 of"):
    weights.resolve(spec, model_config(pretrained=spec))
  assert not [f for f in cached_files(tmp_path) if f.endswith(".jaxsam.safetensors")]


def test_unknown_names_and_models_the_weights_do_not_fit(resnet18):
  with pytest.raises(PretrainedError, match=r"neither a registered .* torchvision/resnet50"):
    weights.resolve("torchvision/resnet51", model_config())
  with pytest.raises(PretrainedError, match=r"set model\.name=resnet50 and model\.resnet_v1=True"):
    weights.resolve("keras/resnet50", model_config("resnet50"))
  with pytest.raises(PretrainedError, match=r"model\.cifar_stem=False"):
    weights.resolve(TEST_NAME, model_config(cifar_stem=True))
  with pytest.raises(PretrainedError, match="hf:OWNER/REPO"):
    weights.resolve("hf:not a repo", model_config())


def test_hub_id_offline_and_not_cached_is_one_line(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("JAXSAM_CACHE", str(tmp_path / "cache"))
  spec = "hf:jaxsam-tests/no-such-repo"
  with pytest.raises(PretrainedError) as e:
    weights.resolve(spec, model_config(pretrained=spec))
  assert "\n" not in str(e.value) and spec in str(e.value) and "model.safetensors" in str(e.value)


def test_register_refuses_malformed_entries_and_renaming(resnet18):
  _, _, entry = resnet18
  assert weights.register(entry) is entry  # the same fields again: a no-op
  with pytest.raises(ValueError, match="registered with other fields"):
    weights.register(weights.Weights(**{**dataclasses.asdict(entry), "origin": "timm"}))
  with pytest.raises(ValueError, match="hash"):
    weights.register(
      weights.Weights(**{**dataclasses.asdict(entry), "name": "test/x", "hash": "md5:00"})
    )


def test_mirror_keeps_the_upstream_file_name():
  env = {"JAXSAM_WEIGHTS_MIRROR": "http://mirror.local/weights/"}
  url = weights.REGISTRY["keras/efficientnetb3"].url
  assert weights.mirrored(url, env) == "http://mirror.local/weights/efficientnetb3.h5"
  assert weights.mirrored(url, {}) == url


BUILTIN = sorted(n for n, e in weights.REGISTRY.items() if e.source.split("/")[0] != "tests")


@pytest.mark.parametrize(
  "name",
  [  # B1..B7 trace for seconds each: slow tier; B0 of each layout and the ResNets stay fast
    pytest.param(n, marks=pytest.mark.slow) if re.search(r"efficientnet_?b[1-7]$", n) else n
    for n in BUILTIN
  ],
)
def test_every_registry_entry_is_well_formed_and_its_layout_builds(name):
  entry = weights.REGISTRY[name]
  assert weights.problems(entry) == []
  assert (entry.url.startswith("https://") or entry.repo) and entry.source
  kind, _, value = entry.hash.partition(":")
  assert (entry.repo and not entry.hash) or len(value) == weights.HASH_KINDS[kind]
  if kind == "sha256-prefix":  # torchvision's file names carry the prefix they are checked by
    assert entry.file_name.endswith(f"-{value}.pth")
  module = models.create_model(entry.model_config(), 1000)
  shapes = jax.eval_shape(
    lambda: module.init({"params": jax.random.key(0)}, np.zeros((1, 64, 64, 3)), train=False)
  )
  assert weight_files.model_layout(module)[1] == entry.layout
  assert shapes["params"]


def keras_constants(module: str) -> dict:
  """BASE_WEIGHTS_PATH and WEIGHTS_HASHES of an installed keras.applications module, read from its
  source (importing Keras would import TensorFlow)."""
  import ast
  import importlib.util

  folder = importlib.util.find_spec("keras").submodule_search_locations[0]
  path = os.path.join(folder, "src", "applications", f"{module}.py")
  if not os.path.isfile(path):
    pytest.skip(f"Keras sources not installed ({path})")
  out = {}
  for node in ast.parse(pathlib.Path(path).read_text()).body:
    target = node.targets[0] if isinstance(node, ast.Assign) else None
    if isinstance(target, ast.Name) and target.id in ("BASE_WEIGHTS_PATH", "WEIGHTS_HASHES"):
      out[target.id] = ast.literal_eval(node.value)
  return out


def test_registry_urls_and_hashes_are_the_upstream_packages():
  """The torchvision URLs are the installed torchvision's; Keras' md5s the installed Keras'."""
  for name, entry in weights.REGISTRY.items():
    if name.startswith("torchvision/"):
      enum, _, version = entry.source.split()[1].partition(".IMAGENET1K_V")
      assert getattr(torchvision.models, enum)[f"IMAGENET1K_V{version}"].url == entry.url
  effnet = keras_constants("efficientnet")
  for variant, (md5, _) in effnet["WEIGHTS_HASHES"].items():
    entry = weights.REGISTRY[f"keras/efficientnet{variant}"]
    assert entry.hash == f"md5:{md5}"
    assert entry.url == f"{effnet['BASE_WEIGHTS_PATH']}efficientnet{variant}.h5"
  resnet = keras_constants("resnet")
  entry = weights.REGISTRY["keras/resnet50"]
  assert entry.hash == f"md5:{resnet['WEIGHTS_HASHES']['resnet50'][0]}"
  assert entry.url == resnet["BASE_WEIGHTS_PATH"] + "resnet50_weights_tf_dim_ordering_tf_kernels.h5"


def test_the_readme_weight_table_lists_every_registered_name():
  readme = (REPO / "README.md").read_text()
  for name in BUILTIN:
    assert f"`{name}`" in readme, name


# ----------------------------------------------------------------------------- launches (slow)


# launch.py with the test-only entry registered first (registration lives in the process).
_LAUNCH = """
import json, os, runpy, sys
from jaxsam.models import weights
weights.register(weights.Weights(**json.loads(os.environ["JAXSAM_TEST_ENTRY"])))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
TINY = [
  f"--config={REPO / 'configs' / 'quickstart.py'}",
  "--config.model.name=resnet18",
  f"--config.model.pretrained={TEST_NAME}",
  "--config.model.image_size=32",
  "--config.batch_size=16",
  "--config.eval_batch_size=64",
  "--config.sam.rho=0.0",
  "--config.augment.randaugment.num_ops=0",
  "--config.progress_bar=false",
]


def run(args: list[str], entry=None, **env) -> subprocess.CompletedProcess:
  """A subprocess (launch.py, or a module) in a clean CPU environment; `entry` registered first."""
  full_env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **env}
  if entry is not None:
    full_env["JAXSAM_TEST_ENTRY"] = json.dumps(dataclasses.asdict(entry))
    args = ["-c", _LAUNCH, *args]
  proc = subprocess.run(
    [sys.executable, *args], env=full_env, capture_output=True, text=True, timeout=600, check=False
  )
  return proc


@pytest.mark.slow
def test_launch_fetches_trains_then_resume_eval_and_analysis_need_no_weight_file(
  resnet18, server, tmp_path
):
  name, _, entry = resnet18
  launch = str(REPO / "launch.py")
  first = tmp_path / "first"
  proc = run([launch, *TINY, "--config.max_steps=2", f"--workdir={first}"], entry)
  assert proc.returncode == 0, failure(proc)
  assert server.requests == [name] and "done in" in proc.stdout
  record = json.loads((first / "weights.json").read_text())
  assert record["pretrained"] == TEST_NAME and record["normalization"] == "imagenet"
  # The server stops: a second launch trains from the cache.
  server.stop()
  proc = run([launch, *TINY, "--config.max_steps=2", f"--workdir={tmp_path / 'second'}"], entry)
  assert proc.returncode == 0, failure(proc)
  assert server.requests == [name]
  # The weights move away and the network is off: the run's own checkpoint is enough. No entry is
  # registered here either: eval, analysis and resume never look the name up.
  shutil.move(tmp_path / "cache", tmp_path / "moved")
  proc = run([launch, "--mode=eval", f"--workdir={first}"], JAXSAM_OFFLINE="1")
  assert proc.returncode == 0, failure(proc)
  assert json.loads((first / "eval.json").read_text())["step"] == 2
  analysis = ["--what=landscape", "--num_examples=32", "--batch_size=16", "--grid_1d=3"]
  analysis += ["--grid_2d=3", "--no_progress", "--no_wandb", f"--workdir={first}"]
  proc = run(["-m", "jaxsam.analyze", *analysis], JAXSAM_OFFLINE="1")
  assert proc.returncode == 0, failure(proc)
  proc = run([launch, *TINY, "--config.max_steps=4", f"--workdir={first}"], JAXSAM_OFFLINE="1")
  assert proc.returncode == 0, failure(proc)
  assert "resuming at step 2" in proc.stdout
  assert json.loads((first / "summary.json").read_text())["steps"] == 4
  # A fresh run does need the file, and says so in one line.
  third = tmp_path / "third"
  proc = run([launch, *TINY, f"--workdir={third}"], entry, JAXSAM_OFFLINE="1")
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and TEST_NAME in errors[0] and "not cached" in errors[0]


_WORKER = """
import json, sys
from jaxsam import distributed
spec = json.loads(sys.argv[1])
distributed.initialize(
  distributed.resolve(spec["address"], 2, spec["process_id"], env={}), timeout_s=120
)
import ml_collections
from jaxsam.models import weights
weights.register(weights.Weights(**spec["entry"]))
config = ml_collections.ConfigDict(
  {"name": "resnet18", "resnet_v1": False, "cifar_stem": False, "pretrained": spec["entry"]["name"]}
)
print("FILE", weights.resolve(spec["entry"]["name"], config).file, flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False], ids=["shared_cache", "cache_per_host"])
def test_two_processes_download_once_per_cache(resnet18, server, tmp_path, shared):
  import socket

  _, _, entry = resnet18
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  procs = []
  for pid in range(2):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=devices.xla_flags(1),
      PYTHONPATH=str(REPO),
      JAXSAM_CACHE=str(tmp_path / ("cache" if shared else f"cache{pid}")),
    )
    spec = {"address": address, "process_id": pid, "entry": dataclasses.asdict(entry)}
    procs.append(
      subprocess.Popen(
        [sys.executable, "-c", _WORKER, json.dumps(spec)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=300)
    finally:
      if p.poll() is None:
        p.kill()
    assert p.returncode == 0, err[-2000:]
    outs.append(next(line.split()[1] for line in out.splitlines() if line.startswith("FILE ")))
  assert len(server.requests) == (1 if shared else 2)
  assert all(os.path.isfile(f) for f in outs)
  assert (outs[0] == outs[1]) == shared


def test_command_line_fetches_names_and_fails_in_one_line(resnet18, server, capsys):
  assert weights.main([TEST_NAME]) == 0
  assert capsys.readouterr().out.startswith(f"{TEST_NAME}: ")
  assert weights.main(["torchvision/resnet51"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "torchvision/resnet51" in err
  assert weights.main([]) == 0
  assert "keras/resnet50\tresnet50\tkeras\thttps://" in capsys.readouterr().out


@pytest.mark.slow
def test_launch_with_a_bad_download_exits_2_in_one_line_and_writes_nothing(server, tmp_path):
  name, data = torchvision_file(seed=3)
  server.files[name] = data
  server.mode = "wrong"
  spec = f"{server.url}/{name}#sha256={hashlib.sha256(data).hexdigest()}"
  workdir = tmp_path / "run"
  quickstart = f"--config={REPO / 'configs' / 'quickstart.py'}"
  args = [quickstart, "--config.model.name=resnet18", f"--config.model.pretrained={spec}"]
  proc = run([str(REPO / "launch.py"), *args, f"--workdir={workdir}"])
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and f"{server.url}/{name}" in errors[0]
  assert "checksum mismatch" in errors[0] and "rerun to retry" in errors[0]
  assert not workdir.exists() and cached_files(tmp_path) == []


def hub_cache(root: pathlib.Path, repo: str, commit: str, data: bytes) -> None:
  """huggingface_hub's cache layout, as a download leaves it: refs/main -> snapshots/<commit>/."""
  folder = root / f"models--{repo.replace('/', '--')}"
  (folder / "refs").mkdir(parents=True)
  (folder / "refs" / "main").write_text(commit)
  blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
  blob.parent.mkdir()
  blob.write_bytes(data)
  (folder / "snapshots" / commit).mkdir(parents=True)
  (folder / "snapshots" / commit / "model.safetensors").symlink_to(blob)


def test_hub_ids_read_a_timm_safetensors_file_without_torch(monkeypatch, tmp_path):
  from safetensors.numpy import save_file

  torch.manual_seed(4)
  state = {k: v.numpy() for k, v in torchvision.models.resnet18().state_dict().items()}
  buffer = tmp_path / "model.safetensors"
  save_file(state, str(buffer))
  data = buffer.read_bytes()
  commit = "0123456789abcdef0123456789abcdef01234567"
  hub_cache(tmp_path / "hub", "jaxsam-tests/resnet18.tv_in1k", commit, data)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("JAXSAM_CACHE", str(tmp_path / "cache"))
  spec = "hf:jaxsam-tests/resnet18.tv_in1k"
  resolved = weights.resolve(spec, model_config(pretrained=spec))
  assert (resolved.origin, resolved.normalization) == ("timm", "imagenet")
  assert commit in resolved.source
  module = models.create_model(model_config(), 1000)
  shapes = jax.eval_shape(
    lambda: module.init({"params": jax.random.key(0)}, np.zeros((1, 32, 32, 3)), train=False)
  )
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  loaded = pretrained.load_pretrained(resolved.file, model_config(), zeros)
  np.testing.assert_array_equal(np.asarray(loaded["params"]["fc"]["kernel"]), state["fc.weight"].T)
  # Pinned by revision; a registered hub row also checks the file's sha256.
  assert weights.resolve(f"{spec}@{commit}", model_config()).file == resolved.file
  row = {
    "model": "resnet18",
    "layout": "torchvision",
    "origin": "timm",
    "repo": "jaxsam-tests/resnet18.tv_in1k",
    "filename": "model.safetensors",
    "revision": commit,
    "source": "tests/models/test_weights.py",
  }
  good = weights.register(
    weights.Weights(
      name="test/hub_resnet18", hash=f"sha256:{hashlib.sha256(data).hexdigest()}", **row
    )
  )
  assert weights.registered(spec) is good
  assert weights.resolve("test/hub_resnet18", model_config()).normalization == "imagenet"
  weights.register(weights.Weights(name="test/hub_bad", hash=f"sha256:{'0' * 64}", **row))
  with pytest.raises(PretrainedError, match="does not match its sha256"):
    weights.resolve("test/hub_bad", model_config())


def test_timm_vit_names_are_timms_own_configs():
  """Each registered timm ViT is a pretrained config of the installed timm: its hub repo, mean = std
  = 0.5 (what `auto` picks), 1000 classes, and the patch, width and depth of its jaxsam model."""
  import timm  # pylint: disable=import-outside-toplevel

  from jaxsam.models import vit  # pylint: disable=import-outside-toplevel

  names = [n for n in BUILTIN if n.startswith("timm/")]
  assert {"timm/vit_base_patch16_224.sam_in1k", "timm/vit_base_patch32_224.sam_in1k"} <= set(names)
  for name in names:
    entry = weights.REGISTRY[name]
    cfg = timm.models.get_pretrained_cfg(name.removeprefix("timm/"))
    assert cfg.hf_hub_id == entry.repo and cfg.num_classes == 1000
    assert cfg.mean == cfg.std == (0.5, 0.5, 0.5) and entry.normalization == "inception"
    with torch.device("meta"):
      ref = timm.create_model(cfg.architecture, pretrained=False)
    size = vit.SIZES[entry.model]
    assert (ref.patch_embed.patch_size[0], ref.embed_dim, len(ref.blocks)) == (
      size.patch,
      size.width,
      size.depth,
    ), name


def test_an_unpinned_hub_name_resolves_at_main_and_records_the_commit(monkeypatch, tmp_path):
  """A registered hub file without a published hash or commit: read from the hub's main branch,
  converted once per commit, and the commit named in the source a run records."""
  import timm  # pylint: disable=import-outside-toplevel
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel

  torch.manual_seed(3)
  ref = timm.models.vision_transformer.VisionTransformer(
    img_size=16, patch_size=4, num_classes=10, embed_dim=96, depth=4, num_heads=3
  )
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "m.st"))
  commit = "89abcdef0123456789abcdef0123456789abcdef"
  hub_cache(tmp_path / "hub", "jaxsam-tests/vit_tiny", commit, (tmp_path / "m.st").read_bytes())
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("JAXSAM_CACHE", str(tmp_path / "cache"))
  weights.register(
    weights.Weights(
      name="test/hub_vit_unpinned",
      model="vit_tiny",
      layout="vit",
      origin="timm",
      hash="",
      repo="jaxsam-tests/vit_tiny",
      filename="model.safetensors",
      source="tests/models/test_weights.py",
    )
  )
  config = model_config("vit_tiny", "test/hub_vit_unpinned")
  assert weights.input_normalization(config) == "inception"  # from the registry, no download
  resolved = weights.resolve("test/hub_vit_unpinned", config)
  assert resolved.source == f"hf:jaxsam-tests/vit_tiny@{commit}/model.safetensors"
  assert resolved.normalization == "inception" and commit in resolved.file
  module = models.create_model(config, 10)
  zeros = jax.tree.map(
    lambda s: np.zeros(s.shape, s.dtype),
    jax.eval_shape(
      lambda: module.init({"params": jax.random.key(0)}, np.zeros((1, 16, 16, 3)), train=False)
    ),
  )
  loaded = pretrained.load_pretrained(resolved.file, config, zeros)
  pos = loaded["params"]["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_array_equal(np.asarray(pos), ref.state_dict()["pos_embed"].numpy())
  with pytest.raises(PretrainedError, match="holds vit_tiny weights"):
    weights.resolve("test/hub_vit_unpinned", model_config("vit_ti4", "test/hub_vit_unpinned"))
