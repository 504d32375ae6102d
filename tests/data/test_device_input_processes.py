"""The device pipeline over several processes: 2 local CPU processes (gloo on 127.0.0.1) with 2
devices each hold the train split once per process, split over their own devices, and the batches
their devices get together equal the single-process ones, bit for bit, across an epoch boundary.

Each process runs this file as a script (`main`): it builds the device train input of the digits
split on the 4-device mesh, gathers + augments a few steps and saves its own devices' rows.
"""

import itertools
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a script too
STEPS = ((0, 2), (21, 3))  # (first step, count): the first batches, and across the epoch end (22)
TIMEOUT_S = 300


def _config():
  from configs import common  # pylint: disable=import-outside-toplevel

  config = common.use_randaugment(common.get_base_config(), num_ops=2, magnitude=9)
  config.dataset.name = "digits"
  config.dataset.pipeline = "device"
  config.batch_size = 64
  config.seed = 3
  config.augment.crop_padding, config.augment.flip, config.augment.cutout_size = 4, True, 8
  return config


def device_batches(mesh, process_index: int, process_count: int, main: bool = False):
  """{(start, i): this process's rows of that step's batch} as the loop makes them, and the
  input (for its start-up line and layout)."""
  from jaxsam import parallel  # pylint: disable=import-outside-toplevel
  from jaxsam.data import datasource  # pylint: disable=import-outside-toplevel

  config = _config()
  train = datasource.load(config, main=False).train_input(config, size=32, mesh=mesh, main=main)
  out = {}
  for start, count in STEPS:
    rows = itertools.islice(train(start, process_index, process_count), count)
    for i, batch in enumerate(parallel.DevicePrefetch(rows, mesh, transform=train.on_device)):
      for key, value in batch.items():  # this process's devices' rows, in the data axis's order
        shards = sorted(value.addressable_shards, key=lambda s: s.index[0].start)
        out[f"{key}_{start}_{i}"] = np.concatenate([np.asarray(s.data) for s in shards])
  return out, train


def main(port: int, process_id: int, out_path: str) -> None:
  from jaxsam import distributed, parallel  # pylint: disable=import-outside-toplevel

  distributed.initialize(distributed.ProcessSpec(f"127.0.0.1:{port}", 2, process_id), timeout_s=120)
  batches, train = device_batches(parallel.make_mesh(), process_id, 2, main=process_id == 0)
  shards = train.images.addressable_shards
  np.savez(
    out_path,
    **batches,
    local_rows=np.asarray([s.data.shape[0] for s in shards]),
    split_rows=np.asarray(train.images.shape[0]),
  )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_hold_the_split_once_each_and_get_the_single_process_batches(tmp_path):
  from jaxsam import parallel  # pylint: disable=import-outside-toplevel
  from support import devices  # pylint: disable=import-outside-toplevel  (a script too)

  port = _free_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env.update(
    XLA_FLAGS=devices.xla_flags(2),
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]),
    TF_CPP_MIN_LOG_LEVEL="2",
  )
  procs = []
  for p in range(2):
    command = [sys.executable, __file__, str(port), str(p), str(tmp_path / f"p{p}.npz")]
    procs.append(
      subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    )
  try:
    outputs = [proc.communicate(timeout=TIMEOUT_S) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for proc, (_, err) in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, err.decode()[-3000:]
  line = next(l for l in outputs[0][0].decode().splitlines() if "input pipeline device" in l)
  assert "replicated once per process (2 copies: any step may take any row)" in line, line
  assert "sharded over each process's 2 device(s)" in line, line

  import jax  # pylint: disable=import-outside-toplevel

  expected, _ = device_batches(parallel.make_mesh(jax.devices()[:4]), 0, 1)
  got = [np.load(tmp_path / f"p{p}.npz") for p in range(2)]
  for p in range(2):  # each process: its 2 devices each hold half the (padded) split
    assert list(got[p]["local_rows"]) == [int(got[p]["split_rows"]) // 2] * 2
  assert set(expected) == set(got[0].files) - {"local_rows", "split_rows"}
  for key, value in expected.items():
    assert value.shape[0] == 64
    np.testing.assert_array_equal(np.concatenate([got[0][key], got[1][key]]), value, err_msg=key)
  assert not np.array_equal(expected["image_21_0"], expected["image_21_1"])  # the epoch turned


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
