"""The unified MoT model: masks, cache, routing, shapes of the real presets, bad configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unigrpo_jax.models.unified.kv_cache import KVCache
from unigrpo_jax.models.unified.model import UnifiedModel, count_params
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.models.autoencoder import PatchAutoencoder
from unigrpo_jax.models.unified.latent_io import sincos_2d

TOL = dict(rtol=2e-5, atol=2e-5)


def random_model(cfg=None, seed=0) -> UnifiedModel:
  """A tiny model whose params are all perturbed (llm2vae is zero at init: velocity would be 0)."""
  cfg = cfg or get_preset("tiny")
  model = UnifiedModel(cfg, nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [l + 0.1 * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def _tokens(cfg, b, length, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, length), 0, cfg.vocab_size)


def _positions(b, length):
  return jnp.broadcast_to(jnp.arange(length), (b, length))


def _latents(cfg, shape_prefix, seed=0):
  return jax.random.normal(jax.random.key(seed), (*shape_prefix, cfg.num_image_tokens,
                                                  cfg.latent_dim))


@pytest.fixture(scope="module")
def model():
  return random_model()


def test_text_is_causal(model):
  cfg = model.cfg
  tok = _tokens(cfg, 2, 9)
  changed = tok.at[:, 6].set((tok[:, 6] + 1) % cfg.vocab_size)
  a = model(tok, _positions(2, 9)).logits
  b = model(changed, _positions(2, 9)).logits
  np.testing.assert_allclose(a[:, :6], b[:, :6], **TOL)
  assert np.abs(np.asarray(a[:, 6:] - b[:, 6:])).max() > 1e-3


def test_left_padding_does_not_change_outputs(model):
  cfg = model.cfg
  tok = _tokens(cfg, 1, 5)
  plain = model(tok, _positions(1, 5)).logits
  padded_tok = jnp.concatenate([jnp.zeros((1, 3), tok.dtype), tok], axis=1)
  valid = jnp.array([[False] * 3 + [True] * 5])
  pos = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  padded = model(padded_tok, pos, valid).logits
  np.testing.assert_allclose(plain, padded[:, 3:], **TOL)


def test_text_does_not_see_image_and_blocks_are_isolated(model):
  cfg = model.cfg
  tok, pos = _tokens(cfg, 2, 6), _positions(2, 6)
  x = _latents(cfg, (2, 3))
  t = jnp.array([[0.9, 0.5, 0.2]] * 2)
  out = model(tok, pos, latents=x, times=t, image_position=jnp.full((2,), 6))
  text_only = model(tok, pos).logits
  np.testing.assert_allclose(out.logits, text_only, **TOL)
  # Changing block 1 leaves blocks 0 and 2 untouched, and changes block 1.
  x2 = x.at[:, 1].add(1.0)
  out2 = model(tok, pos, latents=x2, times=t, image_position=jnp.full((2,), 6))
  np.testing.assert_allclose(out.velocity[:, [0, 2]], out2.velocity[:, [0, 2]], **TOL)
  assert np.abs(np.asarray(out.velocity[:, 1] - out2.velocity[:, 1])).max() > 1e-3
  # Each packed block equals that block run alone against the same context.
  for k in range(3):
    alone = model(tok, pos, latents=x[:, k], times=t[:, k], image_position=jnp.full((2,), 6))
    np.testing.assert_allclose(out.velocity[:, k], alone.velocity, **TOL)


def test_image_block_is_bidirectional_and_reads_context(model):
  cfg = model.cfg
  tok, pos = _tokens(cfg, 1, 6), _positions(1, 6)
  x = _latents(cfg, (1,))
  args = dict(times=jnp.array([0.5]), image_position=jnp.array([6]))
  base = model(tok, pos, latents=x, **args).velocity
  # Changing the LAST image token changes the FIRST one's output (bidirectional).
  changed = model(tok, pos, latents=x.at[:, -1].add(1.0), **args).velocity
  assert np.abs(np.asarray(base[:, 0] - changed[:, 0])).max() > 1e-4
  # The context matters.
  other = model(_tokens(cfg, 1, 6, seed=5), pos, latents=x, **args).velocity
  assert np.abs(np.asarray(base - other)).max() > 1e-4


def test_kv_cache_decode_matches_full_forward(model):
  cfg = model.cfg
  b, prompt_len, total = 2, 5, 9
  tok, pos = _tokens(cfg, b, total), _positions(b, total)
  full = model(tok, pos)
  cache = KVCache.zeros(cfg, b, total)
  pre = model(tok[:, :prompt_len], pos[:, :prompt_len])
  cache = cache.write(pre.text_k, pre.text_v, 0, jnp.ones((b, prompt_len), bool))
  np.testing.assert_allclose(pre.logits, full.logits[:, :prompt_len], **TOL)
  for i in range(prompt_len, total):
    step = model(tok[:, i:i + 1], pos[:, i:i + 1], cache=cache)
    np.testing.assert_allclose(step.logits[:, 0], full.logits[:, i], **TOL)
    cache = cache.write(step.text_k, step.text_v, i, jnp.ones((b, 1), bool))
  # In-place mode (the decode loop's): each layer writes its slot, then attends; same logits and
  # the same cache as read-then-write.
  inplace = KVCache.zeros(cfg, b, total).write(pre.text_k, pre.text_v, 0,
                                               jnp.ones((b, prompt_len), bool))
  for i in range(prompt_len, total):
    step = model(tok[:, i:i + 1], pos[:, i:i + 1], cache=inplace, cache_slot=i)
    assert step.text_k is None
    np.testing.assert_allclose(step.logits[:, 0], full.logits[:, i], **TOL)
    inplace = step.cache
  for got, want in zip(inplace.stacked(), cache.stacked()):
    np.testing.assert_allclose(got, want, **TOL)
  np.testing.assert_array_equal(inplace.valid, cache.valid)
  # The image block against the cache equals the packed forward, and does not touch the cache.
  x = _latents(cfg, (b,))
  t, ipos = jnp.array([0.7, 0.3]), jnp.full((b,), total)
  cached_k = cache.k
  via_cache = model(latents=x, times=t, image_position=ipos, cache=cache)
  packed = model(tok, pos, latents=x, times=t, image_position=ipos).velocity
  np.testing.assert_allclose(via_cache.velocity, packed, **TOL)
  assert cache.k is cached_k and via_cache.cache is None


def test_mot_routing(model):
  cfg = model.cfg
  tok, pos = _tokens(cfg, 2, 6), _positions(2, 6)
  x, t = _latents(cfg, (2,)), jnp.array([0.5, 0.5])
  before = model(tok, pos, latents=x, times=t, image_position=jnp.full((2,), 6))
  gen_state = nnx.state(model.layers[0].gen, nnx.Param)
  saved = jax.tree.map(lambda a: a, gen_state)
  nnx.update(model.layers[0].gen, jax.tree.map(lambda a: a + 0.5, gen_state))
  after = model(tok, pos, latents=x, times=t, image_position=jnp.full((2,), 6))
  nnx.update(model.layers[0].gen, saved)
  np.testing.assert_array_equal(before.logits, after.logits)
  np.testing.assert_array_equal(before.text_k, after.text_k)
  assert np.abs(np.asarray(before.velocity - after.velocity)).max() > 1e-3


def test_mot_off_shares_one_expert():
  cfg = get_preset("tiny", mot=False)
  model = random_model(cfg)
  assert model.layers[0].gen is None and model.gen_norm is None
  with_mot = count_params(random_model(get_preset("tiny")))
  without = count_params(model)
  per_layer = count_params(nnx.state(model.layers[0].und, nnx.Param))
  assert with_mot - without == cfg.num_layers * per_layer + cfg.hidden
  out = model(_tokens(cfg, 1, 4), _positions(1, 4), latents=_latents(cfg, (1,)),
              times=jnp.array([0.5]), image_position=jnp.array([4]))
  assert out.velocity.shape == (1, cfg.num_image_tokens, cfg.latent_dim)


def test_fresh_model_predicts_zero_velocity():
  cfg = get_preset("tiny")
  model = UnifiedModel(cfg, nnx.Rngs(0))
  v = model(latents=_latents(cfg, (1,)), times=jnp.array([0.5]), image_position=jnp.array([0]),
            tokens=_tokens(cfg, 1, 3), positions=_positions(1, 3)).velocity
  assert np.all(np.asarray(v) == 0.0)


def test_every_param_has_logical_axes(model):
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert len(leaves) == len(params)
  for spec, p in zip(leaves, params):
    assert isinstance(spec, jax.sharding.PartitionSpec) and len(spec) == p.ndim
  names = {n for s in leaves for n in s if n}
  assert {"embed", "mlp", "heads", "kv_heads", "vocab"} <= names


def test_bf16_compute_runs_and_tracks_float32():
  cfg32 = get_preset("tiny")
  m32 = random_model(cfg32)
  m16 = random_model(cfg32.replace(dtype="bfloat16"))
  tok, pos = _tokens(cfg32, 1, 5), _positions(1, 5)
  a, b = m32(tok, pos).logits, m16(tok, pos).logits
  assert b.dtype == jnp.float32
  assert np.abs(np.asarray(a - b)).max() < 0.1 * np.abs(np.asarray(a)).max()


@pytest.mark.parametrize("field, overrides", [
    ("num_heads", dict(hidden=64, num_heads=5, num_kv_heads=1)),
    ("num_kv_heads", dict(num_heads=4, num_kv_heads=3)),
    ("image_size", dict(image_size=18, patch_size=4)),
    ("dtype", dict(dtype="float8")),
    ("mlp_dim", dict(mlp_dim=0)),
])
def test_bad_config_names_the_field(field, overrides):
  with pytest.raises(ValueError, match=field):
    get_preset("tiny", **overrides)


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown model preset"):
    get_preset("gpt5")


def test_real_preset_param_counts():
  # Qwen2.5-0.5B: 494,032,768 parameters (tied embeddings); without the latent I/O, MoT off.
  qwen = nnx.eval_shape(lambda: UnifiedModel(get_preset("qwen2_5_0_5b_mot", mot=False),
                                             nnx.Rngs(0)))
  assert count_params(qwen, exclude=("latent_io",)) == 494_032_768
  # BAGEL-7B-MoT: about 14B parameters with both experts.
  bagel = nnx.eval_shape(lambda: UnifiedModel(get_preset("bagel_7b_mot"), nnx.Rngs(0)))
  n = count_params(bagel)
  assert 13.9e9 < n < 14.4e9, n


def test_patch_autoencoder_round_trip_and_position_table():
  ae = PatchAutoencoder(16, 4)
  img = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  tokens = ae.encode(img)
  assert tokens.shape == (2, 16, 48)
  np.testing.assert_array_equal(ae.decode(tokens), img)
  # Token 1 is the patch right of token 0.
  np.testing.assert_array_equal(tokens[:, 1].reshape(2, 4, 4, 3), img[:, :4, 4:8])
  table = sincos_2d(4, 64)
  assert table.shape == (16, 64)
  assert len({tuple(np.round(r, 5)) for r in table}) == 16  # every grid cell distinct
  with pytest.raises(ValueError, match="patch_size"):
    PatchAutoencoder(18, 4)
