"""Test session setup: 8 forced CPU devices, set once before JAX initialises its backends."""

import os
import sys
import tempfile

# Must run before any jax import touches the backend; tests that need 1 device build a 1-device
# mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TF's oneDNN CPU kernels may pick a different summation order from run to run; the parity tests
# against Keras compare float32 logits and should see one answer.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# One persistent XLA compilation cache for the whole session, inherited by the launch.py
# subprocesses: the many tiny runs compile the same programs (a kill-and-resume pair, the two
# processes of a multi-host run...), and compiling dominates their cost on 2 CPU cores.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(tempfile.gettempdir(), f"jaxsam-tests-xla-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# torchvision imports triton (through torch._dynamo), whose bundled LLVM segfaults the process when
# TensorFlow was imported first; no CPU test uses triton, so make its import fail cleanly.
sys.modules.setdefault("triton", None)
