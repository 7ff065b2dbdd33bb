"""The text policy's sampling distribution: one definition for the sampler and the train step.

The rollout draws each reasoning token from ``pi(. | context)`` and records ``log pi(token)``;
the train step rescores the same tokens under new parameters. Both go through
``masked_logits`` below with the same four knobs, so the first-epoch importance ratio is 1 for
every setting of them (scoring with a different distribution than the one that sampled makes
the text update off-policy from its first step: with top_k = 20 the ratio was 0.3-0.5).

``pi = softmax(masked_logits(logits))`` where, in this order:

1. ``vocab_limit > 0``: ids ``>= vocab_limit`` are removed (the embedding table may have more
   rows than the tokenizer has words: such ids decode to nothing and must never be sampled).
2. ``temperature``: logits are divided by it.
3. ``top_k > 0``: only the k largest survive (ties at the k-th value all survive).
4. ``top_p < 1``: only the smallest most-probable prefix whose mass reaches ``top_p`` survives.

The most probable allowed id always survives, so the distribution is never empty.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def check_knobs(where: str, *, temperature: float, top_k: int, top_p: float,
                vocab_limit: int) -> None:
  """Raises ValueError naming ``where.<field>`` for an invalid knob."""
  if not temperature > 0:
    raise ValueError(f"{where}.temperature must be > 0, got {temperature}")
  if not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"{where}.top_k must be an int >= 0, got {top_k!r}")
  if not 0 < top_p <= 1:
    raise ValueError(f"{where}.top_p must be in (0, 1], got {top_p}")
  if not isinstance(vocab_limit, int) or vocab_limit < 0:
    raise ValueError(f"{where}.vocab_limit must be an int >= 0 (0 = the whole table), got "
                     f"{vocab_limit!r}")


def masked_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, vocab_limit: int = 0) -> jax.Array:
  """Raw logits ``[..., V]`` -> float32 ``[..., V]`` logits of ``pi`` (-inf outside its support).

  The knobs are static Python values (see the module docstring for their order and meaning).
  """
  x = logits.astype(jnp.float32)
  v = x.shape[-1]
  if 0 < vocab_limit < v:
    x = jnp.where(jnp.arange(v) < vocab_limit, x, -jnp.inf)
  if temperature != 1.0:
    x = x / temperature
  if 0 < top_k < v:
    kth = jax.lax.top_k(x, top_k)[0][..., -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if top_p < 1.0:
    sorted_x = jnp.flip(jnp.sort(x, axis=-1), axis=-1)  # descending; -inf entries last
    probs = jax.nn.softmax(sorted_x, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Keep the smallest prefix whose mass reaches top_p: entries whose preceding mass < top_p.
    threshold = jnp.min(jnp.where(mass_before < top_p, sorted_x, jnp.inf), axis=-1,
                        keepdims=True)
    x = jnp.where(x < threshold, -jnp.inf, x)
  return x


def sampling_log_probs(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, vocab_limit: int = 0) -> jax.Array:
  """Raw logits ``[..., V]`` -> float32 ``[..., V]`` log-probs of ``pi`` (-inf outside it)."""
  return jax.nn.log_softmax(
      masked_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                    vocab_limit=vocab_limit), axis=-1)


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: Optional[float] = None,
                   *, top_k: int = 0, top_p: float = 1.0, vocab_limit: int = 0) -> jax.Array:
  """``log pi(targets)``: logits ``[B, L, V]``, targets ``[B, L]`` int -> ``[B, L]`` float32.

  The train step's rescoring of sampled tokens (and, with the defaults, the plain
  ``log_softmax(logits / temperature)`` of SFT). Each target is kept in the support it is
  scored against: the rollout and the train step compute the logits in different programs
  (KV-cache decode vs one packed forward, ~1e-6 apart), and a sampled token lying exactly on
  the top-k / top-p boundary could otherwise drop out and score -inf. When the target is inside
  the support (always, up to such ties) the value is exactly ``sampling_log_probs[target]``.
  """
  temperature = 1.0 if temperature is None else temperature
  x = masked_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                    vocab_limit=vocab_limit)
  if top_k > 0 or top_p < 1.0:
    # Only top-k / top-p may be undone for the target: vocab_limit is exact, not a near-tie.
    unfiltered = masked_logits(logits, temperature=temperature, vocab_limit=vocab_limit)
    is_target = jnp.arange(x.shape[-1]) == targets[..., None]
    x = jnp.where(is_target, unfiltered, x)
  logp = jax.nn.log_softmax(x, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
