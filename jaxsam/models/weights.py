"""Pretrained weights by name: the registry of published ImageNet weights and their download.

`config.model.pretrained` is one of
  a registered name    'torchvision/resnet50', 'keras/efficientnetb0' ... (`REGISTRY`)
  a hub id             'hf:timm/resnet50.tv_in1k' or 'hf:REPO@REVISION' (a safetensors file,
                       fetched by huggingface_hub into its own cache; a registered hub id is pinned)
  a URL with checksum  'https://host/file.safetensors#sha256=HEX' (http or https)
  a path               any file `weight_files.read_file` reads

`resolve` turns it into one local jaxsam weight file: it downloads (pooch: retries, progress bar,
atomic move into the cache; huggingface_hub for hub ids), checks the hash upstream publishes,
converts once (`pretrained.convert_file`) and keeps the converted file next to the download, keyed
by that hash, so the next launch reads one local file. The cache is `$JAXSAM_CACHE/weights`
(default ~/.cache/jaxsam/weights). `JAXSAM_OFFLINE=1` or `HF_HUB_OFFLINE=1` never touch the
network; `JAXSAM_WEIGHTS_MIRROR=BASE_URL` fetches every registered URL's file from BASE_URL
instead of its upstream host. In a multi-process run process 0 resolves first and the others then
find the file in the cache; a cache folder each host has for itself is filled once per host.
"""

import dataclasses
import hashlib
import json
import os
import re
import sys
import urllib.parse

import ml_collections

from jaxsam import caches, cli
from jaxsam import workdir as workdir_lib
from jaxsam.errors import PretrainedError
from jaxsam.models import MODELS, pretrained, weight_files

CACHE_ENV = caches.ENV
OFFLINE_ENV = "JAXSAM_OFFLINE"
MIRROR_ENV = "JAXSAM_WEIGHTS_MIRROR"
HASH_KINDS = {"sha256": 64, "sha256-prefix": 8, "md5": 32}  # kind -> hex digits
RETRIES = 2  # pooch retries a dropped connection or a bad checksum this many times


@dataclasses.dataclass(frozen=True)
class Weights:
  """One registered weight file: where it comes from, how to check it, what it fits.

  Either `url` (fetched with pooch) or `repo` + `filename` + `revision` (the Hugging Face hub). A
  hub file whose upstream publishes neither a hash nor a commit (timm's ViTs) is registered
  unpinned, `revision` and `hash` both '': it resolves at the hub's main branch and the run records
  the commit it got (weights.json). `hash` is 'KIND:HEX' with KIND one of HASH_KINDS: a full sha256;
  'sha256-prefix', the first 8 hex digits of the sha256 that torchvision's file names carry (checked
  as torch.hub does); or Keras' md5 (`WEIGHTS_HASHES`). `model` is the jaxsam `model.name` the file
  fits, `layout` its tensor layout ('keras' for a ResNet means `model.resnet_v1=True`), `origin` who
  trained it (`weight_files.ORIGINS`), which fixes the input normalisation.
  """

  name: str
  model: str
  layout: str
  origin: str
  hash: str
  url: str = ""
  repo: str = ""
  filename: str = ""
  revision: str = ""
  source: str = ""  # where the URL and hash were read (the upstream package's file)

  @property
  def file_name(self) -> str:
    """The upstream file's name (also its name in the cache and on a mirror)."""
    return self.filename or os.path.basename(urllib.parse.urlparse(self.url).path)

  @property
  def format(self) -> str:
    return os.path.splitext(self.file_name)[1].lower()

  @property
  def normalization(self) -> str:
    return weight_files.origin_normalization(self.origin, self.model)

  def model_config(self) -> ml_collections.ConfigDict:
    """The `config.model` keys this file needs (name, resnet_v1)."""
    v1 = self.layout == "keras" and self.model.startswith("resnet")
    return ml_collections.ConfigDict({"name": self.model, "resnet_v1": v1})


# torchvision 0.29.1's model builders: torchvision/models/resnet.py (ResNet*_Weights) and
# torchvision/models/efficientnet.py (EfficientNet_B*_Weights); `Weights.url` of each enum value.
# The 8 hex digits before '.pth' are the start of the file's sha256 (torch.hub's check_hash).
_TV = "https://download.pytorch.org/models/"
_TV_SOURCE = "torchvision/models/{}.py {}.IMAGENET1K_V{}"
_TORCHVISION = [
  ("resnet18", "resnet18-f37072fd.pth", "ResNet18_Weights", 1),
  ("resnet34", "resnet34-b627a593.pth", "ResNet34_Weights", 1),
  ("resnet50", "resnet50-0676ba61.pth", "ResNet50_Weights", 1),
  ("resnet50_v2", "resnet50-11ad3fa6.pth", "ResNet50_Weights", 2),
  ("resnet101", "resnet101-63fe2227.pth", "ResNet101_Weights", 1),
  ("resnet101_v2", "resnet101-cd907fc2.pth", "ResNet101_Weights", 2),
  ("resnet152", "resnet152-394f9c45.pth", "ResNet152_Weights", 1),
  ("resnet152_v2", "resnet152-f82ba261.pth", "ResNet152_Weights", 2),
  ("efficientnet_b0", "efficientnet_b0_rwightman-7f5810bc.pth", "EfficientNet_B0_Weights", 1),
  ("efficientnet_b1", "efficientnet_b1_rwightman-bac287d4.pth", "EfficientNet_B1_Weights", 1),
  ("efficientnet_b2", "efficientnet_b2_rwightman-c35c1473.pth", "EfficientNet_B2_Weights", 1),
  ("efficientnet_b3", "efficientnet_b3_rwightman-b3899882.pth", "EfficientNet_B3_Weights", 1),
  ("efficientnet_b4", "efficientnet_b4_rwightman-23ab8bcd.pth", "EfficientNet_B4_Weights", 1),
  ("efficientnet_b5", "efficientnet_b5_lukemelas-1a07897c.pth", "EfficientNet_B5_Weights", 1),
  ("efficientnet_b6", "efficientnet_b6_lukemelas-24a108a5.pth", "EfficientNet_B6_Weights", 1),
  ("efficientnet_b7", "efficientnet_b7_lukemelas-c5b4e57e.pth", "EfficientNet_B7_Weights", 1),
]


def _torchvision(name: str, file: str, enum: str, version: int) -> Weights:
  model = re.sub(r"_v\d$", "", name)
  module = "efficientnet" if model.startswith("efficientnet") else "resnet"
  return Weights(
    name=f"torchvision/{name}",
    model=f"{model}_torchvision" if module == "efficientnet" else model,
    layout="torchvision",
    origin="torchvision",
    hash="sha256-prefix:" + re.search(r"-([0-9a-f]{8})\.pth$", file)[1],
    url=_TV + file,
    source=_TV_SOURCE.format(module, enum, version),
  )


# Keras 3.15.1: keras/src/applications/resnet.py (BASE_WEIGHTS_PATH, WEIGHTS_HASHES['resnet50'][0],
# the file with the classifier) and keras/src/applications/efficientnet.py (BASE_WEIGHTS_PATH,
# WEIGHTS_HASHES['bN'][0]); Keras' get_file checks them as md5 (32 hex digits).
_KERAS_RESNET = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
_KERAS_EFFICIENTNET = "https://storage.googleapis.com/keras-applications/"
_KERAS_EFFICIENTNET_MD5 = {
  "b0": "902e53a9f72be733fc0bcb005b3ebbac",
  "b1": "1d254153d4ab51201f1646940f018540",
  "b2": "b15cce36ff4dcbd00b6dd88e7857a6ad",
  "b3": "ffd1fdc53d0ce67064dc6a9c7960ede0",
  "b4": "18c95ad55216b8f92d7e70b3a046e2fc",
  "b5": "ace28f2a6363774853a83a0b21b9421a",
  "b6": "165f6e37dce68623721b423839de8be5",
  "b7": "8c03f828fec3ef71311cd463b6759d99",
}


def _builtin() -> list[Weights]:
  entries = [_torchvision(*row) for row in _TORCHVISION]
  entries.append(
    Weights(
      name="keras/resnet50",
      model="resnet50",
      layout="keras",
      origin="keras",
      hash="md5:2cb95161c43110f7111970584f804107",
      url=_KERAS_RESNET + "resnet50_weights_tf_dim_ordering_tf_kernels.h5",
      source="keras/src/applications/resnet.py WEIGHTS_HASHES['resnet50'][0]",
    )
  )
  for variant, md5 in _KERAS_EFFICIENTNET_MD5.items():
    entries.append(
      Weights(
        name=f"keras/efficientnet{variant}",
        model=f"efficientnet_{variant}",
        layout="keras",
        origin="keras",
        hash=f"md5:{md5}",
        url=f"{_KERAS_EFFICIENTNET}efficientnet{variant}.h5",
        source=f"keras/src/applications/efficientnet.py WEIGHTS_HASHES['{variant}'][0]",
      )
    )
  return entries + _timm_vits()


# timm 1.x: timm/models/vision_transformer.py default_cfgs (hf_hub_id 'timm/', mean = std = 0.5):
# the SAM-trained ViTs (google-research/vision_transformer's sam/ViT-B_16.npz, ViT-B_32.npz) and
# the AugReg ones. The hub repos publish no hash and timm pins no commit: registered unpinned.
_TIMM_VITS = {
  "vit_b16": ("vit_base_patch16_224", ("sam_in1k", "augreg_in21k_ft_in1k", "augreg_in1k")),
  "vit_b32": ("vit_base_patch32_224", ("sam_in1k", "augreg_in21k_ft_in1k", "augreg_in1k")),
  "vit_s16": ("vit_small_patch16_224", ("augreg_in21k_ft_in1k", "augreg_in1k")),
  "vit_ti16": ("vit_tiny_patch16_224", ("augreg_in21k_ft_in1k",)),
  "vit_l16": ("vit_large_patch16_224", ("augreg_in21k_ft_in1k",)),
}


def _timm_vits() -> list[Weights]:
  return [
    Weights(
      name=f"timm/{arch}.{tag}",
      model=model,
      layout="vit",
      origin="timm",
      hash="",
      repo=f"timm/{arch}.{tag}",
      filename="model.safetensors",
      source=f"timm/models/vision_transformer.py default_cfgs['{arch}.{tag}']",
    )
    for model, (arch, tags) in _TIMM_VITS.items()
    for tag in tags
  ]


REGISTRY: dict[str, Weights] = {}


def problems(entry: Weights) -> list[str]:
  """What is wrong with a registry entry (empty when it is well formed)."""
  out = []
  if not re.fullmatch(r"[a-z0-9_]+/[A-Za-z0-9_.\-]+", entry.name):
    out.append(f"name {entry.name!r} is not 'source/model'")
  if bool(entry.url) == bool(entry.repo):
    out.append("needs exactly one of url or repo")
  if entry.url and urllib.parse.urlparse(entry.url).scheme not in ("http", "https"):
    out.append(f"url {entry.url!r} is not http(s)")
  if entry.repo and not entry.filename:
    out.append("a hub entry needs a filename")
  if entry.repo and bool(entry.revision) != bool(entry.hash):
    out.append("a hub entry is pinned by revision and hash, or unpinned with neither")
  kind, _, value = entry.hash.partition(":")
  if entry.repo and not entry.hash:
    pass  # unpinned: huggingface_hub's main branch, the commit recorded per run
  elif kind not in HASH_KINDS or not re.fullmatch(f"[0-9a-f]{{{HASH_KINDS.get(kind, 0)}}}", value):
    out.append(f"hash {entry.hash!r} is not KIND:HEX with KIND one of {', '.join(HASH_KINDS)}")
  if entry.model not in MODELS:
    out.append(f"model {entry.model!r} is not a jaxsam model")
  elif weight_files.model_layout(entry.model_config())[1] != entry.layout:
    out.append(f"layout {entry.layout!r} is not {entry.model}'s")
  if entry.origin not in weight_files.ORIGINS:
    out.append(f"origin {entry.origin!r} is not one of {', '.join(weight_files.ORIGINS)}")
  if entry.format not in weight_files.SUFFIXES:
    out.append(f"file {entry.file_name!r} is of no format jaxsam reads")
  return out


def register(entry: Weights) -> Weights:
  """Adds `entry` to the registry (again with the same fields is a no-op); returns it."""
  found = problems(entry)
  if found:
    raise ValueError(f"weight entry {entry.name!r}: {'; '.join(found)}")
  if REGISTRY.get(entry.name, entry) != entry:
    raise ValueError(f"weight name {entry.name!r} is registered with other fields")
  REGISTRY[entry.name] = entry
  return entry


for _entry in _builtin():
  register(_entry)


# ------------------------------------------------------------------------------- what a spec is


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A weight spec made local: the file to load and what it was trained on."""

  spec: str  # config.model.pretrained as given
  file: str  # the local file to load (a converted jaxsam file, or the user's path)
  origin: str  # one of weight_files.ORIGINS, or ''
  normalization: str  # 'imagenet' or 'caffe'
  source: str  # the URL, hub file or path it came from


def cache_dir(environ=None) -> str:
  return caches.folder("weights", environ)


def offline(environ=None) -> bool:
  environ = os.environ if environ is None else environ
  return any(environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in _OFFLINE_VARS)


_OFFLINE_VARS = (OFFLINE_ENV, "HF_HUB_OFFLINE")
_URL_SPEC = re.compile(r"(https?://[^#\s]+)#sha256=([0-9a-fA-F]{64})")


def is_url(spec: str) -> bool:
  return bool(re.match(r"https?://", spec))


def url_entry(spec: str) -> tuple[str, str]:
  """(url, sha256) of 'URL#sha256=HEX'; PretrainedError when the checksum is absent."""
  m = _URL_SPEC.fullmatch(spec)
  if not m:
    raise PretrainedError(
      f"model.pretrained={spec!r}: a weight URL needs its checksum, as "
      "https://host/file.safetensors#sha256=<64 hex digits> (http or https)"
    )
  suffix = os.path.splitext(urllib.parse.urlparse(m[1]).path)[1].lower()
  if suffix not in weight_files.SUFFIXES:
    raise PretrainedError(
      f"model.pretrained={spec!r}: unknown weight file type {suffix!r}; accepted: "
      f"{', '.join(weight_files.SUFFIXES)}"
    )
  return m[1], m[2].lower()


def hub_spec(spec: str) -> tuple[str, str]:
  """(repo, revision) of 'hf:REPO[@REVISION]' ('' = the registered one, else 'main')."""
  repo, _, revision = spec.removeprefix("hf:").partition("@")
  if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo):
    raise PretrainedError(f"model.pretrained={spec!r}: a hub id looks like hf:OWNER/REPO[@REV]")
  return repo, revision


def registered(spec: str) -> Weights | None:
  """The registry entry a spec names (a name, or a registered hub id), else None."""
  if spec in REGISTRY:
    return REGISTRY[spec]
  if spec.startswith("hf:"):
    repo, revision = hub_spec(spec)
    for entry in REGISTRY.values():
      if entry.repo == repo and revision in ("", entry.revision):
        return entry
  return None


def check_fits(entry: Weights, model_config) -> None:
  """PretrainedError when the run's model is not the one the registered file fits."""
  name, layout = weight_files.model_layout(model_config)
  if (name, layout) != (entry.model, entry.layout):
    v1 = " and model.resnet_v1=True" if entry.model_config().resnet_v1 else ""
    cifar = " and model.cifar_stem=False" if entry.model.startswith("resnet") else ""
    raise PretrainedError(
      f"model.pretrained={entry.name!r} holds {entry.model} weights ({entry.layout} layout); "
      f"set model.name={entry.model}{v1}{cifar} (the config has model.name={name}, "
      f"layout {layout})"
    )


def _unknown_name(spec: str) -> PretrainedError:
  return PretrainedError(
    f"model.pretrained={spec!r} is neither a registered weight name nor an existing file; "
    f"registered: {', '.join(sorted(REGISTRY))} (or hf:OWNER/REPO, URL#sha256=HEX, a path)"
  )


def _looks_like_name(spec: str) -> bool:
  return os.path.splitext(spec)[1].lower() not in weight_files.SUFFIXES and not os.path.exists(spec)


def input_normalization(model_config, workdir: str | None = None) -> str:
  """The normalisation `model.normalization=auto` picks for `model_config.pretrained`.

  A run folder's record answers first (resume, eval and analysis never need the weight file
  again), then the registry (no download needed), else the file itself (downloaded if needed).
  """
  spec = model_config.pretrained
  recorded = read_record(workdir) if workdir else None
  if recorded and recorded.get("pretrained") == spec and recorded.get("normalization"):
    return recorded["normalization"]
  entry = registered(spec)
  if entry is not None:
    return entry.normalization
  if spec.startswith("hf:"):  # an unregistered hub file: a timm state dict
    return weight_files.origin_normalization("timm", weight_files.model_layout(model_config)[0])
  if is_url(spec):
    return resolve(spec, model_config).normalization
  if _looks_like_name(spec):
    raise _unknown_name(spec)
  return weight_files.input_normalization(spec, model_config)


# ------------------------------------------------------------------------------------- resolving


def resolve(spec: str, model_config) -> Resolved:
  """The local weight file for `spec` (see the module docstring), fetched and converted if needed.

  Process 0 resolves first, the others after it (a barrier), so a shared cache downloads once.
  """
  from jaxsam import parallel  # here: only fetching needs the process layout

  with parallel.main_process_first("jaxsam_weights"):
    return _resolve(spec, model_config)


def _resolve(spec: str, model_config) -> Resolved:
  entry = registered(spec)
  if entry is not None:
    check_fits(entry, model_config)
    if entry.repo and not entry.revision:  # unpinned: main, keyed by the commit it resolves to
      return _hub_resolved(spec, entry.repo, entry.filename, "main", entry.model_config(), "timm")
    if entry.repo:
      file = _hub_file(entry.name, entry.repo, entry.filename, entry.revision, entry.hash)
      local = os.path.join(
        cache_dir(), "hf", *entry.repo.split("/"), entry.revision, entry.filename
      )
      converted = _converted(lambda: file, local, entry.hash, entry.model_config(), entry.origin)
      return Resolved(spec, converted, entry.origin, entry.normalization, _hub_url(entry))
    url = mirrored(entry.url)
    folder = os.path.join(cache_dir(), *entry.name.split("/"))
    converted = _converted(
      lambda: _fetch_url(entry.name, url, entry.hash, folder, entry.file_name),
      os.path.join(folder, entry.file_name),
      entry.hash,
      entry.model_config(),
      entry.origin,
    )
    return Resolved(spec, converted, entry.origin, entry.normalization, url)
  if spec.startswith("hf:"):
    repo, revision = hub_spec(spec)
    return _hub_resolved(spec, repo, "model.safetensors", revision or "main", model_config, "timm")
  if is_url(spec):
    url, sha256 = url_entry(spec)
    name = os.path.basename(urllib.parse.urlparse(url).path)
    folder = os.path.join(cache_dir(), "url", sha256[:16])
    converted = _converted(
      lambda: _fetch_url(spec, url, f"sha256:{sha256}", folder, name),
      os.path.join(folder, name),
      f"sha256:{sha256}",
      model_config,
      "",  # the file's own: Keras for .h5, torchvision for a torch state dict, a jaxsam file's
    )
    origin = weight_files.weights_origin(converted)
    return Resolved(
      spec, converted, origin, weight_files.input_normalization(converted, model_config), url
    )
  if _looks_like_name(spec):
    raise _unknown_name(spec)
  origin = weight_files.weights_origin(spec)
  return Resolved(spec, spec, origin, weight_files.input_normalization(spec, model_config), spec)


def _hub_resolved(spec, repo, filename, revision, model_config, origin) -> Resolved:
  """A hub file at a revision, converted once per commit it resolves to; the source names it."""
  file = _hub_file(spec, repo, filename, revision, "")
  commit = os.path.basename(os.path.dirname(file))  # huggingface_hub's snapshots/<commit>/
  local = os.path.join(cache_dir(), "hf", *repo.split("/"), commit, filename)
  converted = _converted(lambda: file, local, f"commit:{commit}", model_config, origin)
  norm = weight_files.origin_normalization(origin, weight_files.model_layout(model_config)[0])
  return Resolved(spec, converted, origin, norm, f"hf:{repo}@{commit}/{filename}")


def mirrored(url: str, environ=None) -> str:
  """`url` fetched from $JAXSAM_WEIGHTS_MIRROR (its base URL + the upstream file name) when set."""
  base = (os.environ if environ is None else environ).get(MIRROR_ENV, "")
  if not base:
    return url
  return base.rstrip("/") + "/" + os.path.basename(urllib.parse.urlparse(url).path)


def _hub_url(entry: Weights) -> str:
  return f"hf:{entry.repo}@{entry.revision}/{entry.filename}"


def file_hash_ok(path: str, expected: str) -> bool:
  """Whether the file's hash is `expected` ('KIND:HEX'; a sha256-prefix compares the start)."""
  kind, _, value = expected.partition(":")
  if kind == "commit":  # huggingface_hub's own cache, checked by huggingface_hub
    return True
  if kind == "md5":  # Keras' published hashes
    import pooch

    return pooch.file_hash(path, alg="md5") == value.lower()
  return _sha256(path).startswith(value.lower())


def _remove(*paths: str) -> None:
  for path in paths:
    if os.path.lexists(path):
      os.remove(path)


def _lock(path: str):
  import filelock  # several processes of one host share the cache: one of them fetches

  os.makedirs(os.path.dirname(path), exist_ok=True)
  return filelock.FileLock(path + ".lock")


def _fetch_url(what: str, url: str, expected: str, folder: str, name: str) -> str:
  """`folder/name`, downloaded from `url` unless a copy with the expected hash is there."""
  path = os.path.join(folder, name)
  with _lock(path):
    if os.path.isfile(path):
      if file_hash_ok(path, expected):
        return path
      print(
        f"warning: cached weight file {path} does not match its {expected}; downloading again",
        file=sys.stderr,
        flush=True,
      )
      _remove(path)
    if offline():
      raise PretrainedError(
        f"weight {what} is not cached and the network is off ({OFFLINE_ENV}/HF_HUB_OFFLINE): "
        f"place {name} (from {url}) at {path}"
      )
    # pooch checks a full hash itself; a sha256 prefix is checked here, retried as pooch would.
    for _ in range(1 + RETRIES):
      _download(what, url, expected, folder, name)
      if file_hash_ok(path, expected):
        return path
      _remove(path)
    raise PretrainedError(
      f"weight {what}: download of {url} failed after {RETRIES + 1} tries: checksum mismatch "
      f"(the file's sha256 does not start with {expected.partition(':')[2]}); nothing kept in "
      f"{folder}, rerun to retry"
    )
  return path


def _download(what: str, url: str, expected: str, folder: str, name: str) -> None:
  """pooch's fetch: a temporary file in `folder`, moved in only when complete and verified."""
  import pooch
  import requests

  kind, _, value = expected.partition(":")
  known = f"{kind}:{value}" if kind in ("sha256", "md5") else None
  fetcher = pooch.create(
    path=folder, base_url="", registry={name: known}, urls={name: url}, retry_if_failed=RETRIES
  )
  progress = sys.stderr.isatty()
  downloader = pooch.HTTPDownloader(progressbar=progress, timeout=60)
  print(f"jaxsam: downloading weight {what} from {url}", file=sys.stderr, flush=True)
  logger = pooch.get_logger()
  level = logger.level
  logger.setLevel("WARNING")  # pooch's INFO lines suggest a known_hash for prefix-checked files
  try:
    fetcher.fetch(name, downloader=downloader)
  except ValueError as e:  # pooch's hash mismatch
    what_happened = f"checksum mismatch ({weight_files.one_line(e)})"
  except requests.exceptions.HTTPError as e:
    what_happened = f"HTTP error {e.response.status_code if e.response is not None else ''}".strip()
  except (requests.exceptions.RequestException, OSError) as e:
    what_happened = f"connection failed ({weight_files.one_line(e)})"
  else:
    return
  finally:
    logger.setLevel(level)
  _remove(os.path.join(folder, name))
  raise PretrainedError(
    f"weight {what}: download of {url} failed after {RETRIES + 1} tries: {what_happened}; "
    f"nothing kept in {folder}, rerun to retry"
  )


def _hub_file(what: str, repo: str, filename: str, revision: str, expected: str) -> str:
  """huggingface_hub's download (its own cache, HF_HUB_OFFLINE, revision pinning)."""
  import huggingface_hub
  from huggingface_hub import errors as hf_errors

  try:
    path = huggingface_hub.hf_hub_download(
      repo,
      filename,
      revision=revision,
      cache_dir=os.environ.get("HF_HUB_CACHE") or None,  # read now, not at huggingface_hub's import
      local_files_only=offline(),
    )
  except hf_errors.LocalEntryNotFoundError as e:
    raise PretrainedError(
      f"weight {what} is not in huggingface_hub's cache and the network is off or unreachable: "
      f"run once with network, or place {filename} of {repo}@{revision} there "
      f"(`hf download {repo} {filename} --revision {revision}`)"
    ) from e
  except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
    raise PretrainedError(
      f"weight {what}: download of {filename} from the hub repo {repo}@{revision} failed: "
      f"{weight_files.one_line(e)}"
    ) from e
  if expected and not file_hash_ok(path, expected):
    raise PretrainedError(
      f"weight {what}: {path} does not match its {expected}; delete it and rerun to download "
      "it again"
    )
  return path


def _converted(fetch, download: str, key: str, model_config, origin: str) -> str:
  """The jaxsam file converted from the download at `download` (made by `fetch()` when needed),
  next to it and keyed by the download's hash and the model; converted once.

  A sidecar holds the converted file's sha256, so a damaged converted file is made again rather
  than loaded; a valid one is all a later launch reads. `origin` '' takes the file's own.
  """
  name, layout = weight_files.model_layout(model_config)
  model = ml_collections.ConfigDict({"name": name, "resnet_v1": layout == "keras"})
  tag = key.partition(":")[2][:16]
  out = f"{download}.{tag}.{name}.jaxsam.safetensors"
  sidecar = out + ".sha256"
  with _lock(out):
    if os.path.isfile(out) and os.path.isfile(sidecar):
      with open(sidecar) as f:
        if file_hash_ok(out, "sha256:" + f.read().strip()):
          return out
      print(f"warning: converted weights {out} are damaged; converting again", file=sys.stderr)
    _remove(out, sidecar)
    file = fetch()
    tmp = out + ".tmp.safetensors"
    try:
      pretrained.convert_file(file, tmp, model, origin or weight_files.weights_origin(file))
      with open(sidecar + ".tmp", "w") as f:
        f.write(_sha256(tmp))
      os.replace(tmp, out)
      os.replace(sidecar + ".tmp", sidecar)
    finally:
      _remove(tmp, sidecar + ".tmp")
  return out


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


# --------------------------------------------------------------------------- the run's own record


def write_record(workdir: str, resolved: Resolved) -> None:
  """`<workdir>/weights.json`: the weights a run started from and the normalisation they gave.

  Resume, eval and analysis read the normalisation here, so they never need the weight file.
  """
  record = dataclasses.asdict(resolved)
  record["pretrained"] = record.pop("spec")
  path = workdir_lib.RunDir(workdir).weights
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def read_record(workdir: str) -> dict | None:
  path = workdir_lib.RunDir(workdir).weights
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


# ---------------------------------------------------------------------------------- command line


@cli.entry
def main(argv: list[str] | None = None) -> int:
  """`python -m jaxsam.models.weights [NAME ...]`: fetch registered weights into the cache (to
  copy to a machine without network), or list the registered names."""
  names = sys.argv[1:] if argv is None else argv
  if not names:
    for entry in REGISTRY.values():
      print(f"{entry.name}\t{entry.model}\t{entry.origin}\t{entry.url or _hub_url(entry)}")
    return 0
  for name in names:
    entry = registered(name)
    if entry is None:
      raise _unknown_name(name)
    print(f"{name}: {resolve(name, entry.model_config()).file}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
