"""Analytic FLOP and byte counts of the unified model's calls, the rollout and the train step.

Only matrix multiplies are counted (``2 * m * n * k`` per ``[m, k] @ [k, n]``); norms, RoPE,
softmax, SiLU and the optimizer update are elementwise and left out (they are a few percent of
XLA's own count at the ``tiny`` preset and less at larger ones).

Notation: ``L`` layers, width ``d``, ``H`` query heads and ``Hkv`` kv heads of size ``hd``, MLP
width ``m``, vocab ``V``, ``N`` image tokens per block of ``Dl`` latent values, timestep feature
width ``F``. One expert of one layer multiplies each of its tokens by

    W = d * hd * (2 H + 2 Hkv)  [q, k, v, o]  +  3 * d * m  [SwiGLU gate, up, down]

weights, so a token costs ``2 W`` FLOPs per layer in the expert that owns it (text tokens use the
understanding expert, image tokens the generation expert: never both).

Attention is computed densely over every key slot (padding and future keys are masked, not
skipped), ``4 * Lq * Lk * H * hd`` per layer and sequence segment (``2`` for ``q k^T``, ``2`` for
``p v``):

* text queries: ``Lq = Lt`` (text segment), ``Lk = S + Lt`` (cached prefix S plus the segment);
* each image block: ``Lq = N``, ``Lk = S + Lt + N`` (the whole context plus the block itself).

Latent I/O per block: ``2 N Dl d`` (vae2llm) + ``2 (F d + d d)`` (timestep MLP) + ``2 N d Dl``
(llm2vae). LM head: ``2 Lt d V`` per row when logits are computed.

Dead code: when logits are not requested, the last layer's text output feeds nothing, so XLA drops
its q and o projections, its MLP and its text attention; only its k/v projections remain (they feed
the cache or the image blocks). ``forward`` counts exactly what is left.
"""
from __future__ import annotations

import collections
import dataclasses

from unigrpo_jax.models.unified.config import ModelConfig
from unigrpo_jax.rollout.text import attention_windows


@dataclasses.dataclass(frozen=True)
class Flops:
  """FLOPs of one call split by part (all plain Python floats)."""
  text_matmul: float = 0.0
  text_attention: float = 0.0
  image_matmul: float = 0.0
  image_attention: float = 0.0
  latent_io: float = 0.0
  lm_head: float = 0.0

  @property
  def total(self) -> float:
    return sum(dataclasses.astuple(self))

  def __add__(self, other: "Flops") -> "Flops":
    return Flops(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

  def scale(self, k: float) -> "Flops":
    return Flops(*(k * a for a in dataclasses.astuple(self)))

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "total": self.total}


def qkvo_weights(cfg: ModelConfig) -> tuple[int, int]:
  """(q + o weights, k + v weights) of one expert of one layer: ``2 d H hd``, ``2 d Hkv hd``."""
  d, hd = cfg.hidden, cfg.resolved_head_dim
  return 2 * d * cfg.num_heads * hd, 2 * d * cfg.num_kv_heads * hd


def expert_weights(cfg: ModelConfig) -> int:
  """W: matmul weights one token meets in one layer's expert (q, k, v, o and the SwiGLU MLP)."""
  qo, kv = qkvo_weights(cfg)
  return qo + kv + 3 * cfg.hidden * cfg.mlp_dim


def attention_flops(cfg: ModelConfig, lq: int, lk: int) -> float:
  """``4 * Lq * Lk * H * hd`` per layer (dense: masked slots cost the same as real ones)."""
  return 4.0 * lq * lk * cfg.num_heads * cfg.resolved_head_dim


def forward(cfg: ModelConfig, *, batch: int, text_len: int = 0, cache_len: int = 0,
            num_blocks: int = 0, logits: bool = True, logits_len: int | None = None) -> Flops:
  """FLOPs of one ``UnifiedModel.__call__`` over ``[cache S | text Lt | K image blocks]``.

  Args:
    batch: rows B. text_len: Lt text tokens per row (0: no text segment). cache_len: S slots of
    the read-only cache. num_blocks: K image blocks of ``cfg.num_image_tokens`` tokens per row.
    logits: the LM head runs (``compute_logits``), on ``logits_len`` positions per row
    (``logits_slice``; default all Lt).
  Returns:
    text: ``B Lt (2 W L)`` + ``B L 4 Lt (S + Lt) H hd``, minus the last layer's dead q/o/MLP and
    text attention when ``logits`` is False; image: ``B K N (2 W L)`` +
    ``B K L 4 N (S + Lt + N) H hd``; latent I/O and LM head as in the module docstring.
  """
  layers, w = cfg.num_layers, expert_weights(cfg)
  _, kv_w = qkvo_weights(cfg)
  out = Flops()
  if text_len:
    text_tokens = batch * text_len
    live_layers = layers if logits else layers - 1  # layers whose text output is used
    out += Flops(
        text_matmul=2.0 * text_tokens * (w * live_layers + kv_w * (layers - live_layers)),
        text_attention=batch * live_layers * attention_flops(cfg, text_len,
                                                             cache_len + text_len),
        lm_head=(2.0 * batch * (text_len if logits_len is None else logits_len) * cfg.hidden
                 * cfg.vocab_size if logits else 0.0))
  if num_blocks:
    n, d, dl = cfg.num_image_tokens, cfg.hidden, cfg.latent_dim
    blocks = batch * num_blocks
    out += Flops(
        image_matmul=2.0 * blocks * n * w * layers,
        image_attention=blocks * layers * attention_flops(cfg, n, cache_len + text_len + n),
        latent_io=blocks * (4.0 * n * dl * d + 2.0 * (cfg.timestep_freq_dim * d + d * d)))
  return out


def backward(cfg: ModelConfig, fwd: Flops, *, batch: int, text_len: int, num_blocks: int,
             stop_context_grad: bool) -> Flops:
  """Backward of a packed forward: 2x its forward (input and weight gradients of every matmul).

  Exception: with ``stop_context_grad`` the image blocks' queries get no gradient path into the
  context keys/values, so the context half of their attention (``4 N (S + Lt)`` per layer and
  block) needs only ``dq`` and ``dp`` (1x, not 2x) in the backward pass.
  """
  bwd = fwd.scale(2.0)
  if stop_context_grad and num_blocks:
    ctx_part = batch * num_blocks * cfg.num_layers * attention_flops(
        cfg, cfg.num_image_tokens, text_len)
    bwd = dataclasses.replace(bwd, image_attention=bwd.image_attention - ctx_part)
  return bwd


# ----------------------------------------------------------------------------- the train step
def remat_recompute(cfg: ModelConfig, fwd: Flops) -> Flops:
  """What a rematerialised (``nothing_saveable``) backward re-runs of the forward ``fwd``: every
  layer up to, not including, its last matmul. The MLP down projection's output only feeds the
  residual sum, which is the next layer's input (the one thing remat keeps), so its backward
  needs its input and the incoming gradient but never its output. The LM head is outside the
  rematerialised layers."""
  w = expert_weights(cfg)
  keep = (w - cfg.hidden * cfg.mlp_dim) / w
  return dataclasses.replace(fwd, lm_head=0.0, text_matmul=keep * fwd.text_matmul,
                             image_matmul=keep * fwd.image_matmul)


def train_step(cfg: ModelConfig, *, rows: int, prompt_len: int, reasoning_len: int,
               window_size: int, ppo_epochs: int, needs_reference: bool, ref_logits: bool,
               stop_context_grad: bool, remat: bool = False) -> dict:
  """Model FLOPs of one ``train_step`` call on a rollout of B = ``rows`` trajectories.

  The step loops ``ppo_epochs`` x ``num_minibatches``; each iteration takes B / num_minibatches
  rows and runs (``loss_fn``):

    * ONE policy forward over ``[context Lt = P + T + 1 | K = window_size blocks]`` with logits,
      and its backward (``backward``: 2x forward, ~3x in total);
    * ONE frozen-reference forward of the same packed sequence (no backward; logits only if
      the text KL needs them) when ``needs_reference``.

  Since every row is seen once per epoch, the step costs
  ``ppo_epochs * [fwd_pol(B) + bwd_pol(B) + fwd_ref(B)]`` whatever the minibatching (gradient
  accumulation does not change it either). The LM head runs on the T + 1 reasoning slots
  only (``logits_slice``). Returns per-part Flops dicts, ``total`` (model FLOPs: what MFU
  counts) and ``executed`` (what the chips run: with ``remat`` the backward pass first
  recomputes the policy's layer stack, ``remat_recompute``).
  """
  lt = prompt_len + reasoning_len + 1
  shape = dict(batch=rows, text_len=lt, num_blocks=window_size)
  fwd = forward(cfg, logits=True, logits_len=reasoning_len + 1, **shape)
  bwd = backward(cfg, fwd, stop_context_grad=stop_context_grad, **shape)
  ref = forward(cfg, logits=ref_logits, logits_len=reasoning_len + 1,
                **shape) if needs_reference else Flops()
  recompute = remat_recompute(cfg, fwd) if remat else Flops()
  per_epoch = fwd + bwd + ref
  return {"policy_forward": fwd.as_dict(), "policy_backward": bwd.as_dict(),
          "reference_forward": ref.as_dict(), "remat_recompute": recompute.as_dict(),
          "per_epoch": per_epoch.total, "ppo_epochs": ppo_epochs,
          "total": ppo_epochs * per_epoch.total,
          "executed": ppo_epochs * (per_epoch + recompute).total}


# ----------------------------------------------------------------------------- the rollout
def decode_widths(prompt_len: int, reasoning_len: int, decode_steps: int,
                  cache_len: int) -> list[int]:
  """Cache slots each decode step attends over: step t runs in the first attention window W of
  ``text.attention_windows`` with P + t < W (its own slot included)."""
  widths = attention_windows(prompt_len, reasoning_len, cache_len)
  return [next(w for w in widths if prompt_len + t < w) for t in range(decode_steps)]


def rollout(cfg: ModelConfig, *, prompts: int, group_size: int, prompt_len: int,
            decode_steps: int, reasoning_len: int, num_steps: int) -> dict:
  """Model FLOPs of one rollout of B = prompts * G rows (cache of S = P + T + 1 slots).

    text  = prefill (Bp rows, Lt = P, logits)
          + decode_steps x decode step (B rows, one token over the W slots of its attention
            window, ``decode_widths``; W = S for caches of up to ``text.MIN_WINDOW`` slots)
          + <vision_start> append (B rows, Lt = 1 over S slots, no logits)
    flow  = num_steps x velocity call (B rows, one block of N tokens over S slots)

  ``decode_steps`` is how many while-loop iterations ran (every row computes in each of them,
  finished or not), normally T when some row never stops.
  """
  b = prompts * group_size
  s = prompt_len + reasoning_len + 1
  prefill = forward(cfg, batch=prompts, text_len=prompt_len, logits_len=1)  # last slot only
  decode = Flops()
  for w, count in collections.Counter(
      decode_widths(prompt_len, reasoning_len, decode_steps, s)).items():
    # The token's own key is one of the W slots: W - 1 cached slots plus the token.
    decode += forward(cfg, batch=b, text_len=1, cache_len=w - 1).scale(count)
  step = decode.scale(1.0 / max(decode_steps, 1))
  append = forward(cfg, batch=b, text_len=1, cache_len=s, logits=False)
  text = prefill + decode + append
  flow = forward(cfg, batch=b, num_blocks=1, cache_len=s).scale(num_steps)
  return {"prefill": prefill.total, "decode_step": step.total, "decode": decode.total,
          "text": text.total, "flow_step": flow.total / num_steps, "flow": flow.total,
          "total": text.total + flow.total}


def decode_bytes(cfg: ModelConfig, *, rows: int, prompt_len: int, reasoning_len: int,
                 decode_steps: int) -> dict:
  """HBM/DRAM bytes the text part must at least read (its memory-bandwidth bound).

  Each model pass (1 prefill + ``decode_steps`` decode steps + 1 append) reads the weights a
  text token uses once: ``L`` understanding experts (``W`` matmul weights plus biases and norms),
  the final norm and the LM head (``d V``), in ``param_dtype``. Each decode step also reads the
  KV cache slots it attends over, ``2 L B W Hkv hd`` values in the compute dtype, W the cache
  length in use: the step's attention window (``decode_widths``; the whole cache of
  S = P + T + 1 slots when S <= ``text.MIN_WINDOW``); the append pass reads all S slots.
  Embedding rows (B per step) and cache writes (one slot per layer) are negligible; the copies
  between attention windows (once per window, not per step) are not counted.

  Returns per-part bytes, ``total`` (the text part) and ``decode_total`` (the decode loop alone:
  ``decode_steps`` passes of weights plus their cache reads).
  """
  itemsize = lambda name: {"float32": 4, "bfloat16": 2, "float16": 2}[name]
  d, hd, hkv = cfg.hidden, cfg.resolved_head_dim, cfg.num_kv_heads
  per_layer = expert_weights(cfg) + 2 * d + cfg.num_heads * hd + 2 * hkv * hd + 2 * hd
  weights = (cfg.num_layers * per_layer + d + d * cfg.vocab_size) * itemsize(cfg.param_dtype)
  s = prompt_len + reasoning_len + 1
  per_slot = 2 * cfg.num_layers * rows * hkv * hd * itemsize(cfg.dtype)
  kv_cache = per_slot * s
  kv_decode = per_slot * sum(decode_widths(prompt_len, reasoning_len, decode_steps, s))
  passes = decode_steps + 2
  decode_total = decode_steps * weights + kv_decode
  total = passes * weights + kv_decode + kv_cache
  return {"weight_bytes_per_pass": weights, "kv_cache_bytes": kv_cache,
          "kv_decode_bytes": kv_decode, "passes": passes, "decode_total": decode_total,
          "total": total}
