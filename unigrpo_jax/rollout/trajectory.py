"""The Trajectory pytree and the one layout of the text context shared by rollout and training.

Context slots (identical in the rollout's KV cache and in the train step's packed sequence):

    [ prompt (P slots, left-padded) | reasoning (T slots, valid up to and incl. the stop token)
      | <vision_start> (1 slot) ]                      followed by the image block(s)

Position ids are contiguous over *valid* tokens only, so padding never shifts RoPE: prompt token
j of a row with p real tokens has position j - (P - p); reasoning token t has position p + t; the
``<vision_start>`` token sits at p + r (r = number of valid reasoning tokens) and every image
token shares position p + r + 1.

BAGEL-format models (``ModelConfig.block_markers``) carry ``<|vision_start|>`` and
``<|vision_end|>`` inside the image block instead (the model adds them): the last context slot
is then an invalid padding slot (kept so both layouts have the same shapes) and the whole block,
markers included, sits at position p + r.
"""
from __future__ import annotations


import flax.struct
import jax
import jax.numpy as jnp

# The one definition of a token log-prob (sampler and train step), re-exported for callers here.
from unigrpo_jax.rollout.distribution import token_logprobs  # noqa: F401


@flax.struct.dataclass
class WindowRecord:
  """The SDE-window steps of each trajectory (K = window size), recorded during the rollout.

  x_t, x_next, mean: [B, K, N, Dl] float32 state before the step, sampled next state and the
  Gaussian mean of the step; std: [B, K] transition std; t, t_next: [B, K] times; logp: [B, K]
  element-mean log-density of x_next; step_index: [B, K] int32 index in the time grid.
  """
  x_t: jax.Array
  x_next: jax.Array
  mean: jax.Array
  std: jax.Array
  t: jax.Array
  t_next: jax.Array
  logp: jax.Array
  step_index: jax.Array


@flax.struct.dataclass
class Trajectory:
  """Everything the train step needs from one rollout of B = prompts x group_size rows.

  prompt_tokens / prompt_mask: [B, P] int32 / bool, left-padded.
  reasoning_tokens / reasoning_mask / reasoning_logp: [B, T] sampled ids, validity (incl. the stop
    token), and the sampler's log-probs of the distribution actually sampled from (0 where
    invalid). truncated: [B] bool, no stop token within T.
  window: WindowRecord. latents: [B, N, Dl] final x0. images: [B, H, W, C] float in [-1, 1].
  """
  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  reasoning_tokens: jax.Array
  reasoning_mask: jax.Array
  reasoning_logp: jax.Array
  truncated: jax.Array
  window: WindowRecord
  latents: jax.Array
  images: jax.Array


@flax.struct.dataclass
class ContextLayout:
  """tokens/positions/valid: [B, P + T + 1]; image_position: [B]; reasoning_slice: static."""
  tokens: jax.Array
  positions: jax.Array
  valid: jax.Array
  image_position: jax.Array


def prompt_positions(prompt_mask: jax.Array) -> jax.Array:
  """[B, P] bool (left-padded) -> [B, P] int32 positions, 0 at padding."""
  return jnp.maximum(jnp.cumsum(prompt_mask.astype(jnp.int32), axis=1) - 1, 0)


def context_layout(prompt_tokens: jax.Array, prompt_mask: jax.Array,
                   reasoning_tokens: jax.Array, reasoning_mask: jax.Array,
                   vision_start_id: int, pad_id: int = 0,
                   block_markers: bool = False) -> ContextLayout:
  """Packs prompt, reasoning and ``<vision_start>`` into the shared slot layout.

  Args:
    prompt_tokens, prompt_mask: [B, P] left-padded prompt.
    reasoning_tokens, reasoning_mask: [B, T] sampled reasoning (valid prefix per row).
    block_markers: the model's ``cfg.block_markers`` (BAGEL): the last slot is padding and the
      image block sits at p + r (``vision_start_id`` is then unused).
  Returns:
    ContextLayout with [B, P + T + 1] arrays and [B] image positions.
  """
  b = prompt_tokens.shape[0]
  prompt_len = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)  # [B]
  reasoning_len = jnp.sum(reasoning_mask, axis=1, dtype=jnp.int32)
  t = reasoning_tokens.shape[1]
  reasoning_pos = prompt_len[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  vs_pos = prompt_len + reasoning_len
  last_id, last_pos = ((pad_id, jnp.zeros_like(vs_pos)) if block_markers
                       else (vision_start_id, vs_pos))
  tokens = jnp.concatenate([
      jnp.where(prompt_mask, prompt_tokens, pad_id),
      jnp.where(reasoning_mask, reasoning_tokens, pad_id),
      jnp.full((b, 1), last_id, jnp.int32)], axis=1).astype(jnp.int32)
  positions = jnp.concatenate([prompt_positions(prompt_mask), reasoning_pos, last_pos[:, None]],
                              axis=1)
  valid = jnp.concatenate([prompt_mask, reasoning_mask, jnp.full((b, 1), not block_markers)],
                          axis=1)
  return ContextLayout(tokens, positions, valid, vs_pos if block_markers else vs_pos + 1)


def reasoning_slice(prompt_len_slots: int, reasoning_len_slots: int) -> slice:
  """Slots of the reasoning tokens in the context layout (static)."""
  return slice(prompt_len_slots, prompt_len_slots + reasoning_len_slots)
