"""``remat=True`` must give the same loss and gradients as ``remat=False``, including when a
second (frozen reference) model runs inside the differentiated function, as in the train step."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.models.unified.config import get_preset


def _loss_and_grads(remat: bool):
  cfg = get_preset("tiny", remat=remat)
  graphdef, state = nnx.split(UnifiedModel(cfg, nnx.Rngs(0)))
  ref_graphdef, ref_state = nnx.split(UnifiedModel(cfg, nnx.Rngs(1)))
  b, lt, k = 2, 5, 2
  tokens = jnp.arange(b * lt, dtype=jnp.int32).reshape(b, lt) % cfg.vocab_size
  positions = jnp.broadcast_to(jnp.arange(lt), (b, lt))
  latents = jax.random.normal(jax.random.key(0), (b, k, cfg.num_image_tokens, cfg.latent_dim))
  times = jnp.array([[0.9, 0.5], [0.7, 0.3]])
  image_position = jnp.full((b,), lt)

  def loss(params, ref_params):
    kw = dict(latents=latents, times=times, image_position=image_position,
              stop_context_grad=True)
    out = nnx.merge(graphdef, params)(tokens, positions, **kw)
    # The reference runs inside the differentiated function, as in rl/train_step.loss_fn.
    ref = jax.lax.stop_gradient(nnx.merge(ref_graphdef, ref_params)(tokens, positions, **kw))
    return (jnp.mean((out.velocity - ref.velocity) ** 2)
            + jnp.mean(jax.nn.log_softmax(out.logits)[..., 3]))

  return jax.jit(jax.value_and_grad(loss))(state, ref_state)


def test_remat_matches_plain_with_reference_inside_grad():
  plain_loss, plain_grads = _loss_and_grads(remat=False)
  remat_loss, remat_grads = _loss_and_grads(remat=True)
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(remat_grads))
