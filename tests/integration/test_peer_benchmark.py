"""benchmarks/peer_tunix.py's project-only parts (no tunix needed): the scaling table and its
read-only reference decode."""
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import peer_tunix
from unigrpo_jax.models.unified import attention


def _decode_inputs(b=2, h=4, hkv=2, d=8, s=16):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, 1, h, d))
  k = jax.random.normal(keys[1], (b, hkv, d, s))
  v = jax.random.normal(keys[2], (b, hkv, s, d))
  return q, k, v, jnp.ones((b, 1, s), bool)


def test_read_only_attention_reads_every_slot_and_is_undone_on_exit():
  real = attention.text_attention
  q, k, v, mask = _decode_inputs()
  with pytest.raises(RuntimeError):
    with peer_tunix.decode_attention_reads_only():
      out = attention.text_attention(q, k, v, mask, True)
      sums = k.sum(axis=3) + v.sum(axis=2)  # [B, Hkv, D]
      np.testing.assert_allclose(out, q + 1e-6 * jnp.repeat(sums, 2, axis=1)[:, None],
                                 rtol=1e-6)
      # Every slot is read: changing the last key slot or the first value slot changes the output.
      assert not np.allclose(attention.text_attention(q, k.at[..., -1].add(1.0), v, mask, True), out,
                             rtol=0, atol=1e-9)
      assert not np.allclose(attention.text_attention(q, k, v.at[:, :, 0].add(1.0), mask, True), out,
                             rtol=0, atol=1e-9)
      # Prefill-shaped calls (several queries, [S, D] keys) keep the real attention.
      qp = jnp.repeat(q, 3, axis=1)
      kp = jnp.swapaxes(k, 2, 3)
      np.testing.assert_array_equal(attention.text_attention(qp, kp, v, jnp.ones((2, 3, 16), bool)),
                                    real(qp, kp, v, jnp.ones((2, 3, 16), bool)))
      raise RuntimeError("leave the context by an error")
  assert attention.text_attention is real


def test_scaling_times_the_model_and_its_read_only_decode():
  rows = peer_tunix.scaling([24, 48], prompt=4, new=3, batch=2, layers=1, repeats=2,
                            read_floor=True)
  assert [r["cache"] for r in rows] == [24, 48]
  assert rows[0]["time_ratio"] == rows[0]["bytes_ratio"] == rows[0]["read_time_ratio"] == 1.0
  assert rows[1]["bytes_per_step"] > rows[0]["bytes_per_step"]
  for r in rows:
    assert len(r["decode_times"]) == len(r["read_decode_times"]) == 2
    assert r["ms_per_step"] > 0 and r["read_ms_per_step"] > 0
  md = peer_tunix.scaling_markdown(rows, prompt=4, new=3, batch=2, layers=1)
  assert "read-only ms/step" in md and md.count("\n| 24 |") == 1


def test_a_decode_compiled_in_the_read_only_context_keeps_the_stand_in():
  """The reference decode is traced inside the context; calls after it still run the stand-in,
  and a decode built afterwards runs the real attention."""
  point = peer_tunix.Point(24, 4, 3, 2, 1)
  tokens = jax.random.randint(jax.random.key(1), (2, 4), 1, 4000, jnp.int32)
  mask = jnp.ones(tokens.shape, bool)

  def logprobs(project):
    cache, last = project.prefill(project.state, tokens, mask)
    return np.asarray(project.decode(project.state, cache, last, mask, project.key).logp)

  with peer_tunix.decode_attention_reads_only():
    read = peer_tunix.Project(point, tokens, mask, min_window=0)
    read_first = logprobs(read)
  model = peer_tunix.Project(point, tokens, mask, min_window=0)
  np.testing.assert_array_equal(logprobs(read), read_first)
  assert not np.allclose(logprobs(model), read_first)


def test_the_scaling_table_alone_runs_without_tunix(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tunix", None)  # importing tunix would fail
  out = tmp_path / "scaling.md"
  peer_tunix.main(["--points", "--scaling", "96", "--scaling-batch", "1", "--scaling-repeats",
                   "1", "--out", str(out)])
  md = out.read_text()
  assert "vs cache length" in md and "\n| 96 |" in md and "read-only ms/step" in md
  saved = json.loads(out.with_suffix(".json").read_text())
  assert saved["meta"]["tunix"] is None and saved["rows"] == []
  assert [r["cache"] for r in saved["scaling"]] == [96]


@pytest.mark.parametrize("argv, message", [
    (["--points", "--scaling"], "nothing to run"),
    (["--points", "--scaling", "40"], "--scaling 40: S=40 slots cannot hold P + T = 80"),
    (["--points", "40:32:16:8:8"], "--points 40:32:16:8:8: S=40 slots cannot hold P + T = 48"),
    (["--points", "97:32:64:8"], "not S:P:T:B:L"),
    (["--scaling"], "tunix is not importable"),
])
def test_bad_arguments_stop_before_any_compile(argv, message, monkeypatch):
  monkeypatch.setitem(sys.modules, "tunix", None)

  def must_not_run(*args, **kwargs):
    raise AssertionError("a benchmark started despite bad arguments")

  monkeypatch.setattr(peer_tunix, "compare", must_not_run)
  monkeypatch.setattr(peer_tunix, "scaling", must_not_run)
  monkeypatch.setattr(peer_tunix, "Project", must_not_run)
  with pytest.raises(SystemExit, match=re.escape(message)):
    peer_tunix.main(argv)
