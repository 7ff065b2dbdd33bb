"""A gs:// workdir against a real GCS JSON API on 127.0.0.1 (issue #26).

The server is ``gcp-storage-emulator`` (test extra), started here (``gcs_emulator.py``: in
memory, one bucket ``bkt``, plus the generation headers real GCS sends on downloads). The client libraries are pointed at it the way their sources say:

* ``etils.epath`` (``unigrpo_jax.paths`` and orbax's metadata files) picks ``tf.io.gfile`` for
  gs:// whenever TensorFlow is installed. TensorFlow's GCS filesystem has the endpoint
  ``https://www.googleapis.com/storage/v1/`` compiled in (no emulator variable; its ``GCS_*``
  options are timeouts, caches and retries), so it cannot reach an emulator. ``EPATH_USE_TF=false``
  makes epath use fsspec's gcsfs instead, which honours ``STORAGE_EMULATOR_HOST``;
  ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` skips gcsfs's bucket-type lookup on the storage
  control API (which the emulator does not serve), ``NO_GCE_CHECK=true`` its metadata-server probe.
* orbax writes arrays with tensorstore, whose GCS driver honours ``TENSORSTORE_GCS_HTTP_URL`` and
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING``.

TensorBoard is off in these runs: clu's writer uses TensorFlow's own GCS filesystem (see above).
On a TPU VM (no variables set) all of it goes to the real GCS: epath -> tf.io.gfile, tensorstore
-> storage.googleapis.com.
"""
import dataclasses
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import pytest

# Checked without importing: gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when first imported,
# which must happen after the fixture has set it.
for _module in ("gcp_storage_emulator", "gcsfs"):
  if importlib.util.find_spec(_module) is None:
    pytest.skip(f"{_module} is in the test extra: pip install -e .[test]", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BUCKET = "bkt"


def _free_port() -> int:
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  return port


def _emulator_env(port: int) -> dict:
  url = f"http://127.0.0.1:{port}"
  return {"STORAGE_EMULATOR_HOST": url, "EPATH_USE_TF": "false",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true",
          "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}


@pytest.fixture(scope="module")
def gcs():
  """The emulator's env vars, set in this process for the module (and given to subprocesses)."""
  port = _free_port()
  proc = subprocess.Popen([sys.executable, os.path.join(HERE, "gcs_emulator.py"), str(port),
                           BUCKET], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    for _ in range(200):
      try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        break
      except OSError:
        time.sleep(0.1)
    else:
      pytest.fail("the storage emulator did not start")
    env = _emulator_env(port)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # etils.epath caches its backend choice (``gpath._is_tf_installed``): another test in this
    # process may have made it before EPATH_USE_TF was set, so make it again now and after.
    from etils.epath import gpath
    gpath._is_tf_installed.cache_clear()
    try:
      yield env
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
      gpath._is_tf_installed.cache_clear()
  finally:
    proc.terminate()
    proc.wait(timeout=10)


def _objects(env, prefix: str) -> list[str]:
  """Object names under ``gs://bkt/prefix`` straight from the JSON API (not through our code)."""
  import urllib.parse
  import urllib.request
  url = (f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/{BUCKET}/o?"
         + urllib.parse.urlencode({"prefix": prefix}))
  with urllib.request.urlopen(url) as resp:
    return sorted(o["name"] for o in json.load(resp).get("items", []))


def test_paths_round_trip_through_the_emulator(gcs, tmp_path, monkeypatch):
  from unigrpo_jax import paths
  monkeypatch.chdir(tmp_path)
  d = f"gs://{BUCKET}/roundtrip"
  paths.check_writable(d)
  paths.write_text(paths.join(d, "a.txt"), "one\n")
  assert paths.exists(paths.join(d, "a.txt")) and not paths.exists(paths.join(d, "b.txt"))
  assert paths.read_text(paths.join(d, "a.txt")) == "one\n"
  paths.rename(paths.join(d, "a.txt"), paths.join(d, "sub", "b.txt"))
  assert paths.listdir(d) == ["sub"] and paths.isdir(paths.join(d, "sub"))
  with paths.AppendFile(paths.join(d, "log.txt")) as f:
    f.write("python\n")
    os.write(f.fileno(), b"native\n")  # what fd 2 gets in console.route_logs
  with paths.AppendFile(paths.join(d, "log.txt")) as f:  # a restart appends
    f.write("again\n")
  assert paths.read_text(paths.join(d, "log.txt")) == "python\nnative\nagain\n"
  paths.remove(paths.join(d, "sub", "b.txt"))
  assert _objects(gcs, "roundtrip/") == ["roundtrip/log.txt"]
  assert os.listdir(tmp_path) == []  # no local "gs:" folder


def test_model_directory_in_the_bucket(gcs, tmp_path, monkeypatch):
  """checkpointing.save_model / read_meta / load_params (SFT's output, init_checkpoint)."""
  import numpy as np
  from flax import nnx
  from unigrpo_jax import checkpointing
  from unigrpo_jax.data.shapeworld.world import shapeworld_tokenizer
  from unigrpo_jax.models.unified.config import get_preset
  from unigrpo_jax.models.unified.model import UnifiedModel
  monkeypatch.chdir(tmp_path)
  cfg = get_preset("tiny")
  _, params = nnx.split(UnifiedModel(cfg, nnx.Rngs(0)), nnx.Param)
  d = f"gs://{BUCKET}/model"
  checkpointing.save_model(d, params, cfg, shapeworld_tokenizer().to_json(), {"x": 1})
  assert _objects(gcs, "model/") == ["model/meta.json", "model/params.msgpack"]
  meta = checkpointing.read_meta(d)
  as_json = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples come back as lists
  assert meta["extra"] == {"x": 1} and meta["model_config"] == as_json
  back = checkpointing.load_params(d, params)
  for a, b in zip(jax_leaves(params), jax_leaves(back)):
    np.testing.assert_array_equal(a, b)
  assert os.listdir(tmp_path) == []


def _upload(local_dir: str, remote_dir: str) -> None:
  from unigrpo_jax import paths
  for name in sorted(os.listdir(local_dir)):
    with open(os.path.join(local_dir, name), "rb") as f:
      paths.write_bytes(paths.join(remote_dir, name), f.read())


def test_a_bagel_directory_loads_from_the_bucket(gcs, tmp_path, monkeypatch):
  """The real-weights fixture (tests/fixtures/bagel_tiny, checked against an independent torch
  forward in tests/models/test_pretrained.py) read in place from gs://: sharded over 8 devices,
  bit-exact with the local load, each device slice fetched by a ranged read (no tensor fetched
  once per device, nothing written locally); the trainer's setup recognises the directory."""
  import jax
  import numpy as np
  from flax import nnx
  from unigrpo_jax import parallel
  from unigrpo_jax.models import safetensors_io
  from unigrpo_jax.models.unified.loading import load_bagel
  from unigrpo_jax.trainers import build
  local = os.path.join(REPO, "tests", "fixtures", "bagel_tiny")
  remote = f"gs://{BUCKET}/bagel_tiny"
  _upload(local, remote)
  monkeypatch.chdir(tmp_path)
  reads = []
  real_read = safetensors_io.TensorIndex._read_remote

  def counting_read(self, key, index):
    out = real_read(self, key, index)
    reads.append((key, out.nbytes, self.bytes_read))
    return out

  monkeypatch.setattr(safetensors_io.TensorIndex, "_read_remote", counting_read)
  markers = dict(vision_start_id=98, vision_end_id=99)
  mesh = parallel.make_mesh(data=1, fsdp=8, tensor=1)
  from_bucket = load_bagel(remote, image_size=48, mesh=mesh, **markers)
  from_disk = load_bagel(local, image_size=48, **markers)
  flat = lambda m: {".".join(map(str, p)): np.asarray(v.get_value())
                    for p, v in nnx.to_flat_state(nnx.state(m))}
  want = flat(from_disk)
  got = flat(from_bucket)
  assert sorted(got) == sorted(want)
  for name, value in got.items():
    np.testing.assert_array_equal(value, want[name], err_msg=name)
  q = nnx.state(from_bucket)["layers"][0]["gen"]["q"].get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp")
  # Slices, not whole tensors per device: more reads than tensors, and about one copy fetched.
  index = safetensors_io.TensorIndex.from_path(local, "ema.safetensors")
  used = {key for key, _, _ in reads}
  assert len(reads) > 2 * len(used)
  fetched = sum(n for _, n, _ in reads)
  assert fetched < 1.5 * index.nbytes(used), (fetched, index.nbytes(used))
  assert os.listdir(tmp_path) == []  # read in place: no local copy
  assert build.is_bagel_dir(remote) and not build.is_bagel_dir(f"gs://{BUCKET}/nothing")


def test_reward_model_and_vae_directories_in_the_bucket(gcs, tmp_path, monkeypatch):
  """A CLIP reward-model directory and a FLUX VAE file read in place from gs://, equal to the
  local loads (the same fixtures the real-weights tests check against transformers/diffusers)."""
  import numpy as np
  import jax
  from unigrpo_jax.models.clip.processor import CLIPTokenizer
  from unigrpo_jax.models.clip.weights import load_clip_state
  from unigrpo_jax.models.flux_vae.weights import load_flux_vae
  fixtures = os.path.join(REPO, "tests", "fixtures")
  for name in ("clip_tiny", "flux_vae_tiny"):
    _upload(os.path.join(fixtures, name), f"gs://{BUCKET}/{name}")
  monkeypatch.chdir(tmp_path)
  _, _, remote = load_clip_state(f"gs://{BUCKET}/clip_tiny")
  _, _, local = load_clip_state(os.path.join(fixtures, "clip_tiny"))
  for a, b in zip(jax.tree.leaves(remote), jax.tree.leaves(local)):
    np.testing.assert_array_equal(a, b)
  prompts = ["a red circle", "two blue squares"]
  ids_remote = CLIPTokenizer(f"gs://{BUCKET}/clip_tiny")(prompts)
  ids_local = CLIPTokenizer(os.path.join(fixtures, "clip_tiny"))(prompts)
  for a, b in zip(ids_remote, ids_local):
    np.testing.assert_array_equal(a, b)
  vae_remote = load_flux_vae(f"gs://{BUCKET}/flux_vae_tiny", num_groups=4).state
  vae_local = load_flux_vae(os.path.join(fixtures, "flux_vae_tiny"), num_groups=4).state
  for a, b in zip(jax.tree.leaves(vae_remote), jax.tree.leaves(vae_local)):
    np.testing.assert_array_equal(a, b)
  assert os.listdir(tmp_path) == []


def test_prompt_files_in_the_bucket(gcs, tmp_path, monkeypatch):
  """``data.prompt_file`` / ``eval_prompt_file`` may be gs://: validated and read in place."""
  from unigrpo_jax import config_defaults, paths
  from unigrpo_jax.config_validation import ConfigError, validate
  from unigrpo_jax.data.pipeline import PromptFileSource
  monkeypatch.chdir(tmp_path)
  path = f"gs://{BUCKET}/prompts/train.txt"
  paths.write_text(path, "draw a red circle left of two squares\ndraw a blue square\n")
  c = config_defaults.base()
  c.data.prompt_file = path
  validate(c)
  c.data.eval_prompt_file = f"gs://{BUCKET}/prompts/missing.txt"
  with pytest.raises(ConfigError, match="data.eval_prompt_file"):
    validate(c)
  source = PromptFileSource(path)
  assert [source[i]["prompt"] for i in range(len(source))] == [
      "draw a red circle left of two squares", "draw a blue square"]
  assert os.listdir(tmp_path) == []


def jax_leaves(tree):
  import jax
  import numpy as np
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _main(env, tmp_path, workdir, *extra, config=None):
  run_env = {**os.environ, **env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
             "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  cwd = tmp_path / "cwd"
  cwd.mkdir(exist_ok=True)
  cmd = [sys.executable, "-m", "unigrpo_jax.main",
         f"--config={config or os.path.join(REPO, 'configs', 'shapes_cpu.py')}",
         f"--workdir={workdir}", *extra]
  return subprocess.run(cmd, cwd=cwd, env=run_env, capture_output=True, text=True,
                        timeout=600), cwd


def test_a_missing_bucket_fails_at_start_up_and_writes_nothing_locally(gcs, tmp_path):
  proc, cwd = _main(gcs, tmp_path, "gs://no-such-bucket/run")
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: workdir gs://no-such-bucket/run is not writable"), proc.stderr
  assert os.listdir(cwd) == []  # no "gs:" folder, no log.txt


TINY_CONFIG = """
import sys
sys.path[:0] = [{tests!r}, {trainers!r}]
from test_trainer import tiny_config


def get_config():
  c = tiny_config(2)
  c.eval_every = 1
  return c
"""


@pytest.mark.slow
def test_a_run_writes_only_to_the_bucket_and_resumes_bit_exactly(gcs, tmp_path):
  config = tmp_path / "tiny.py"  # outside the run's cwd
  config.write_text(TINY_CONFIG.format(tests=os.path.join(REPO, "tests"),
                                       trainers=os.path.join(REPO, "tests", "trainers")))
  from unigrpo_jax import paths
  from unigrpo_jax.trainers.metrics import read_metrics
  # Uninterrupted: 2 steps.
  proc, cwd = _main(gcs, tmp_path, f"gs://{BUCKET}/ref", config=str(config))
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Interrupted: 1 step, then the same command with total_steps=2 resumes from the bucket.
  proc, _ = _main(gcs, tmp_path, f"gs://{BUCKET}/run", "--config.total_steps=1",
                  config=str(config))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [r["step"] for r in read_metrics(f"gs://{BUCKET}/run")] == [0, 1]
  proc, _ = _main(gcs, tmp_path, f"gs://{BUCKET}/run", config=str(config))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from gs://bkt/run/checkpoints at step 1" in proc.stdout + proc.stderr

  assert os.listdir(cwd) == []  # nothing on local disk: no "gs:" folder, no log.txt
  names = _objects(gcs, "run/")
  for want in ("run/log.txt", "run/metrics.jsonl", "run/samples_step_000000.png",
               "run/samples_step_000001.png", "run/samples_step_000002.png"):
    assert want in names, names
  assert any(n.startswith("run/checkpoints/2/") for n in names), names
  assert paths.read_text(f"gs://{BUCKET}/run/log.txt")  # the library log is in the bucket

  # Wall-clock times differ; hack/hist_distance is measured from the first step a process sees
  # (HackingMonitor's reference is not checkpointed), so a resumed run measures it afresh.
  skip = lambda k: k.startswith("perf/") or k == "hack/hist_distance"
  ref, resumed = read_metrics(f"gs://{BUCKET}/ref"), read_metrics(f"gs://{BUCKET}/run")
  assert [r["step"] for r in resumed] == [r["step"] for r in ref] == [0, 1, 2]
  for a, b in zip(resumed, ref):  # bit-exact: the same floats in the JSON
    differ = sorted(k for k in set(a) | set(b) if not skip(k) and a.get(k) != b.get(k))
    assert not differ, (a["step"], {k: (a.get(k), b.get(k)) for k in differ})
  assert paths.read_bytes(f"gs://{BUCKET}/run/samples_step_000002.png") == \
      paths.read_bytes(f"gs://{BUCKET}/ref/samples_step_000002.png")
