"""The layer stack as one ``lax.scan`` (``scan_layers=True``) computes what the Python loop does.

Same parameters (one tree per layer), same outputs and gradients, with and without remat and
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

from unigrpo_jax.models import KVCache, ModelConfig, UnifiedModel, get_preset
from unigrpo_jax.models.tiny_bagel import tiny_bagel_config


def _packed_loss_and_grads(cfg: ModelConfig):
  """Loss of a packed pass (text + 2 blocks) against a frozen reference, and its gradients."""
  graphdef, state = nnx.split(UnifiedModel(cfg.replace(scan_layers=False, remat=False),
                                           nnx.Rngs(0)))
  _, ref_state = nnx.split(UnifiedModel(cfg.replace(scan_layers=False, remat=False),
                                        nnx.Rngs(1)))
  # The same parameters under the configuration being tested (scan / remat are call-time only).
  graphdef = nnx.split(UnifiedModel(cfg, nnx.Rngs(0)))[0]
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


@pytest.mark.parametrize("remat,policy", [(False, "nothing_saveable"),
                                          (True, "nothing_saveable"),
                                          (True, "dots_saveable")])
def test_scan_matches_loop_loss_and_grads(remat, policy):
  base = get_preset("tiny", num_layers=3, remat_policy=policy)
  loop_loss, loop_grads = _packed_loss_and_grads(base.replace(remat=remat))
  scan_loss, scan_grads = _packed_loss_and_grads(base.replace(remat=remat, scan_layers=True))
  np.testing.assert_allclose(scan_loss, loop_loss, rtol=1e-6)
  assert jax.tree.structure(scan_grads) == jax.tree.structure(loop_grads)
  for a, b in zip(jax.tree.leaves(scan_grads), jax.tree.leaves(loop_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Every layer's parameters get a gradient (the scan really runs all layers).
  layer_grads = nnx.State(scan_grads)["layers"]
  for i in range(3):
    assert float(jnp.max(jnp.abs(layer_grads[i]["und"]["q"][...]))) > 0


def test_scan_matches_loop_prefill_and_denoise_over_cache_with_markers():
  cfg = tiny_bagel_config()
  loop_model = UnifiedModel(cfg, nnx.Rngs(0))
  graphdef, state = nnx.split(loop_model)
  scan_model = nnx.merge(nnx.split(UnifiedModel(cfg.replace(scan_layers=True),
                                                nnx.Rngs(0)))[0], state)
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
