"""The layer stack as one ``lax.scan`` (``scan_layers=True``) computes what the Python loop does.

Same parameter values (stacked [num_layers, ...] instead of one tree per layer), same outputs
and gradients, with and without remat and
its policies, for every call the trainer makes: the packed training pass (text + K blocks, the
frozen reference inside the differentiated function), prefill, and denoising over a read-only
cache with BAGEL's block markers. And the scanned program holds one layer body whatever the
depth, which is what keeps compile time flat in the number of layers.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unigrpo_jax.models.unified.kv_cache import KVCache
from unigrpo_jax.models.unified.config import ModelConfig, get_preset
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.models.unified import layout as layer_layout
from unigrpo_jax.testing.tiny_bagel import tiny_bagel_config
from unigrpo_jax.data.shapeworld.world import shapeworld_tokenizer


def _packed_loss_and_grads(cfg: ModelConfig):
  """Loss of a packed pass (text + 2 blocks) against a frozen reference, and its gradients.
  Both layouts initialise from the same per-layer draws, so the values are the same."""
  graphdef, state = nnx.split(UnifiedModel(cfg, nnx.Rngs(0)))
  ref_state = nnx.split(UnifiedModel(cfg, nnx.Rngs(1)))[1]
  b, lt, k = 2, 5, 2
  tokens = jnp.arange(b * lt, dtype=jnp.int32).reshape(b, lt) % cfg.vocab_size
  positions = jnp.broadcast_to(jnp.arange(lt), (b, lt))
  text_valid = jnp.array([[True] * lt, [True] * (lt - 1) + [False]])
  latents = jax.random.normal(jax.random.key(0), (b, k, cfg.num_image_tokens, cfg.latent_dim))
  times = jnp.array([[0.9, 0.5], [0.7, 0.3]])
  image_position = jnp.full((b,), lt)

  def loss(params, ref_params):
    kw = dict(text_valid=text_valid, latents=latents, times=times,
              image_position=image_position, stop_context_grad=True)
    out = nnx.merge(graphdef, params)(tokens, positions, **kw)
    ref = jax.lax.stop_gradient(nnx.merge(graphdef, ref_params)(tokens, positions, **kw))
    return (jnp.mean((out.velocity - ref.velocity) ** 2)
            + jnp.mean(jax.nn.log_softmax(out.logits)[..., 3]) + jnp.mean(out.text_k ** 2))

  return jax.jit(jax.value_and_grad(loss))(state, ref_state)


def test_stacked_layout_holds_the_same_values_and_round_trips():
  cfg = get_preset("tiny", num_layers=3)
  listed = nnx.state(UnifiedModel(cfg, nnx.Rngs(0)))
  stacked = nnx.state(UnifiedModel(cfg.replace(scan_layers=True), nnx.Rngs(0)))
  assert stacked["layers"]["und"]["q"][...].shape == (3,) + listed["layers"][0]["und"]["q"][
      ...].shape
  assert nnx.get_partition_spec(stacked)["layers"]["und"]["q"].get_value()[0] == "layers"
  converted = layer_layout.convert_state(listed, cfg, True, var_filter=...)
  for a, c in zip(jax.tree.leaves(converted), jax.tree.leaves(stacked)):
    np.testing.assert_array_equal(a, c)
  back = layer_layout.convert_state(stacked, cfg.replace(scan_layers=True), False,
                                    var_filter=...)
  for a, c in zip(jax.tree.leaves(back), jax.tree.leaves(listed)):
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("remat,policy", [(False, "nothing_saveable"),
                                          (True, "nothing_saveable"),
                                          (True, "dots_saveable")])
def test_scan_matches_loop_loss_and_grads(remat, policy):
  base = get_preset("tiny", num_layers=3, remat_policy=policy, remat=remat)
  loop_loss, loop_grads = _packed_loss_and_grads(base)
  scan_loss, scan_grads = _packed_loss_and_grads(base.replace(scan_layers=True))
  np.testing.assert_allclose(scan_loss, loop_loss, rtol=1e-6)
  loop_as_stacked = layer_layout.convert_state(loop_grads, base, True, var_filter=...)
  assert jax.tree.structure(scan_grads) == jax.tree.structure(loop_as_stacked)
  for a, b in zip(jax.tree.leaves(scan_grads), jax.tree.leaves(loop_as_stacked)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Every layer's parameters get a gradient (the scan really runs all layers).
  per_layer_q = scan_grads["layers"]["und"]["q"][...]
  assert all(float(jnp.max(jnp.abs(per_layer_q[i]))) > 0 for i in range(3))


def test_scan_matches_loop_prefill_and_denoise_over_cache_with_markers():
  cfg = tiny_bagel_config()
  loop_model = UnifiedModel(cfg, nnx.Rngs(0))
  scan_model = UnifiedModel(cfg.replace(scan_layers=True), nnx.Rngs(0))
  b, p = 2, 7
  tokens = jnp.arange(b * p, dtype=jnp.int32).reshape(b, p) % (cfg.vocab_size - 2)
  positions = jnp.broadcast_to(jnp.arange(p), (b, p))
  valid = jnp.array([[False, False] + [True] * (p - 2), [True] * p])
  outs = []
  for model in (loop_model, scan_model):
    pre = model(tokens, positions, valid)
    cache = KVCache.zeros(cfg, b, p + 3).write(pre.text_k, pre.text_v, 0, valid)
    lat = jax.random.normal(jax.random.key(2), (b, cfg.num_image_tokens, cfg.latent_dim))
    den = model(latents=lat, times=jnp.array([0.8, 0.4]), image_position=jnp.full((b,), p),
                cache=cache)
    outs.append((pre.logits, pre.text_k, den.velocity))
  for a, c in zip(*outs):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


def test_optimizer_labels_the_stacked_experts():
  from unigrpo_jax.rl import optim
  state = nnx.state(UnifiedModel(get_preset("tiny", scan_layers=True), nnx.Rngs(0)), nnx.Param)
  labels = optim.param_labels(state)
  assert labels["layers"]["und"]["q"] == "und" and labels["layers"]["gen"]["q"] == "gen"


def _count_dots(cfg: ModelConfig) -> int:
  model = UnifiedModel(cfg, nnx.Rngs(0))
  b, lt = 1, 4
  tokens = jnp.zeros((b, lt), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(lt), (b, lt))
  latents = jnp.zeros((b, 2, cfg.num_image_tokens, cfg.latent_dim))
  graphdef, state = nnx.split(model)

  def loss(state):
    out = nnx.merge(graphdef, state)(tokens, positions, latents=latents,
                                     times=jnp.full((b, 2), 0.5),
                                     image_position=jnp.full((b,), lt))
    return jnp.sum(out.velocity) + jnp.sum(out.logits)

  hlo = jax.jit(jax.grad(loss)).lower(state).as_text()
  return hlo.count("dot_general")


def test_scanned_program_has_one_layer_body_whatever_the_depth():
  """The loop's program grows with depth; the scan's does not (compile time follows)."""
  shallow, deep = (get_preset("tiny", num_layers=n, remat=True) for n in (2, 6))
  assert _count_dots(deep) > 2 * _count_dots(shallow)  # the loop unrolls every layer
  scan_shallow = _count_dots(shallow.replace(scan_layers=True))
  scan_deep = _count_dots(deep.replace(scan_layers=True))
  assert scan_deep == scan_shallow


def test_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match="remat_policy"):
    get_preset("tiny", remat_policy="everything")


def test_saved_model_is_per_layer_on_disk_and_loads_into_either_layout(tmp_path):
  from unigrpo_jax import checkpointing, config_defaults
  from unigrpo_jax.data.tokenizer import Tokenizer
  from unigrpo_jax.trainers import build
  tok = shapeworld_tokenizer()
  cfg = get_preset("tiny", vocab_size=tok.vocab_size, scan_layers=True)
  params = nnx.state(UnifiedModel(cfg, nnx.Rngs(3)), nnx.Param)
  checkpointing.save_model(str(tmp_path / "m"), params, cfg, tok.to_json())
  for scan in (False, True):
    config = config_defaults.base()
    config.init_checkpoint = str(tmp_path / "m")
    config.model.scan_layers = scan
    model_cfg, loaded = build.model_and_params(config, tok)
    assert model_cfg.scan_layers == scan
    want = params if scan else layer_layout.convert_state(params, cfg, False)
    for a, c in zip(jax.tree.leaves(loaded), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, c)
