"""The project's text sampler against google-tunix's, on identical Qwen2 shapes.

tunix is an optional, benchmark-only dependency; keep it out of the project's environment::

    python -m venv --system-site-packages /work/venvs/tunix
    /work/venvs/tunix/bin/pip install google-tunix==0.1.7 --no-deps
    /work/venvs/tunix/bin/pip install --no-deps google-metrax tensorboardX jaxtyping \\
        wadler_lindig sentencepiece perfetto pandas   # what tunix's sampler/qwen2 import
    /work/venvs/tunix/bin/python benchmarks/peer_tunix.py --out benchmarks/results/peer_tunix.md

(``--system-site-packages`` reuses the project's jax/flax, so both samplers run on the same jax.)
The project-only time-vs-cache-length table (``scaling``) needs no tunix:
``python benchmarks/peer_tunix.py --points --out /tmp/scaling.md`` (a bare ``--points``).

What runs, per point (cache slots S, prompt P, new tokens T, batch B, layers L):

* the project: ``text.make_prefill_decode`` (prefill of the left-padded prompt over its own keys
  into a cache of S slots, then the donated decode loop of T steps);
* tunix: ``Sampler._compiled_prefill_fn`` then ``_compiled_decode_fn`` on the ``_SamplingState``
  of ``init_sample_state`` (what ``Sampler.__call__`` runs, minus tokenisation and detokenisation),
  with ``total_sampling_steps = P + T``: its prefill samples the first token and its loop runs T
  model passes (the last one's token falls off the buffer); the project's loop also runs T model
  passes (the T-th caches the last token, which the rollout's image part reads).

Both models: vocab 4096, hidden 256, 8 heads / 2 KV heads (head dim 32), MLP 1024, Qwen2 q/k/v
biases, no QK-norm, untied LM head, float32, one CPU device; random weights (time does not depend
on values). Greedy decoding on both sides (the project also computes each token's log-prob, as it
must for RL); the stop token is one neither can emit, so every row decodes all T tokens.

Protocol: two warm-up calls of each, then ``--repeats`` rounds alternating which sampler goes first;
each call is timed with its outputs blocked; medians are reported. The machine is usually shared:
the load average (``os.getloadavg``) is recorded before and after each point.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import sys
import time

_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import flops  # noqa: E402
from unigrpo_jax.models.unified.model import UnifiedModel  # noqa: E402
from unigrpo_jax.models.unified import attention
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.rollout import text  # noqa: E402

SHAPES = dict(vocab_size=4096, hidden=256, num_heads=8, num_kv_heads=2, mlp_dim=1024)


@dataclasses.dataclass(frozen=True)
class Point:
  """One comparison: cache slots, prompt length, new tokens, batch, layers."""
  cache: int
  prompt: int
  new: int
  batch: int
  layers: int

  def __post_init__(self):
    if self.cache < self.prompt + self.new:
      raise ValueError(f"S={self.cache} slots cannot hold P + T = {self.prompt + self.new}")

  @classmethod
  def parse(cls, text_: str) -> "Point":
    """``S:P:T:B:L``, e.g. ``1024:16:64:8:8``."""
    try:
      s, p, t, b, n = (int(x) for x in text_.split(":"))
    except ValueError:
      raise SystemExit(f"--points: {text_!r} is not S:P:T:B:L (five integers)") from None
    try:
      return cls(s, p, t, b, n)
    except ValueError as e:
      raise SystemExit(f"--points {text_}: {e}") from None

  @property
  def label(self) -> str:
    return f"S={self.cache} P={self.prompt} T={self.new} B={self.batch} L={self.layers}"


# Cache slots 64 / 97 (the project's default: P 32 + T 64 + 1) / 512 / 1,024, and 256 / 1,024 new
# tokens. Batch 8; the 1,024-token point has 4 layers to fit a shared 2-core CPU's time budget.
DEFAULT_POINTS = ("64:16:47:8:8", "97:32:64:8:8", "512:16:256:8:8", "1024:16:64:8:8",
                  "1041:16:1024:8:4")


def _block(tree):
  return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a,
                      tree)


def project_config(layers: int):
  return get_preset("tiny", num_layers=layers, qk_norm=False, qkv_bias=True,
                    tie_embeddings=False, **SHAPES)


class Project:
  """The project's sampler at one point."""

  def __init__(self, pt: Point, tokens, mask, min_window: int = text.MIN_WINDOW):
    self.cfg = cfg = project_config(pt.layers)
    self.graphdef, self.state = nnx.split(UnifiedModel(cfg, nnx.Rngs(0)))
    sampling = text.SamplingConfig(max_len=pt.new, stop_id=cfg.vocab_size, pad_id=0,
                                   greedy=True)
    self.prefill, self.decode = text.make_prefill_decode(self.graphdef, sampling,
                                                         cache_len=pt.cache,
                                                         min_window=min_window)
    self.tokens, self.mask = tokens, mask
    self.key = jax.random.key(0)

  def run(self):
    """(prefill s, decode s, generated tokens)."""
    t0 = time.perf_counter()
    cache, last = _block(self.prefill(self.state, self.tokens, self.mask))
    t1 = time.perf_counter()
    sample = _block(self.decode(self.state, cache, last, self.mask, self.key))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, int(sample.mask.sum())


class _IdTokenizer:
  """The token-id interface tunix's TokenizerAdapter needs (no text is ever tokenised here)."""

  def __init__(self, vocab: int):
    self.vocab = vocab

  def encode(self, s):
    return [int(x) for x in s.split()]

  def decode(self, ids):
    return " ".join(str(i) for i in ids)

  def bos_id(self):
    return None

  def eos_id(self):
    return self.vocab  # never emitted: every row decodes all its tokens

  def pad_id(self):
    return self.vocab - 1


class Tunix:
  """tunix 0.1.7's Qwen2 and Sampler at one point."""

  def __init__(self, pt: Point, tokens):
    from tunix.generate import sampler as tsampler
    from tunix.models.qwen2 import model as tq

    cfg = tq.ModelConfig(num_layers=pt.layers, vocab_size=SHAPES["vocab_size"],
                         embed_dim=SHAPES["hidden"], hidden_dim=SHAPES["mlp_dim"],
                         num_heads=SHAPES["num_heads"],
                         head_dim=SHAPES["hidden"] // SHAPES["num_heads"],
                         num_kv_heads=SHAPES["num_kv_heads"], rope_theta=1_000_000,
                         norm_eps=1e-6, use_tied_embedding=False)
    model = tq.Qwen2(cfg, rngs=nnx.Rngs(0))
    self.sampler = tsampler.Sampler(model, _IdTokenizer(SHAPES["vocab_size"]),
                                    tsampler.CacheConfig(cache_size=pt.cache,
                                                         num_layers=pt.layers,
                                                         num_kv_heads=cfg.num_kv_heads,
                                                         head_dim=cfg.head_dim))
    self.sampler.eos_ids = jnp.array([SHAPES["vocab_size"]])
    self.tokens, self.steps = tokens, pt.prompt + pt.new

  def run(self):
    s = self.sampler
    state = s.init_sample_state(self.tokens, total_sampling_steps=self.steps,
                                include_logits=False, forbidden_token_ids=None,
                                temperature=0.0, top_p=None, top_k=None,
                                seed=jax.random.key(0), beam_size=None)
    params = s._flattened_transformer_state
    t0 = time.perf_counter()
    state = _block(s._compiled_prefill_fn(params, state, None, echo=False))
    t1 = time.perf_counter()
    state = _block(s._compiled_decode_fn(params, state))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, int(state.decoding_step) - self.tokens.shape[1]  # loop passes


def compare(pt: Point, repeats: int) -> dict:
  """Warm-up, then ``repeats`` alternating rounds; medians of prefill / decode / total."""
  load_before = os.getloadavg()
  tokens = jax.random.randint(jax.random.key(1), (pt.batch, pt.prompt), 1,
                              SHAPES["vocab_size"] - 1, jnp.int32)
  runners = {"project": Project(pt, tokens, jnp.ones(tokens.shape, bool)),
             "tunix": Tunix(pt, tokens)}
  for _ in range(2):  # compile, then one more warm-up call (first calls run slow)
    passes = {name: r.run()[2] for name, r in runners.items()}
  passes["project"] //= pt.batch  # generated tokens of B rows, one per pass
  if passes["project"] != pt.new or passes["tunix"] != pt.new:
    raise RuntimeError(f"{pt.label}: decode passes {passes}, expected T={pt.new} on both sides")
  times = {name: [] for name in runners}
  for i in range(repeats):
    order = list(runners) if i % 2 == 0 else list(runners)[::-1]
    for name in order:
      times[name].append(runners[name].run()[:2])
  med = {name: {"prefill_s": statistics.median(t[0] for t in ts),
                "decode_s": statistics.median(t[1] for t in ts),
                "total_s": statistics.median(t[0] + t[1] for t in ts),
                "decode_times": [t[1] for t in ts], "decode_passes": passes[name]}
         for name, ts in times.items()}
  ratio = {k: med["project"][k] / med["tunix"][k] for k in ("prefill_s", "decode_s", "total_s")}
  return {"point": dataclasses.asdict(pt), "label": pt.label, "results": med, "ratio": ratio,
          "load_before": load_before, "load_after": os.getloadavg()}


@contextlib.contextmanager
def decode_attention_reads_only():
  """Within: decode attention (one query per row, the loop's ``[B, Hkv, D, S]`` keys) only reads.

  The stand-in sums every key and value slot of the layer's cache and adds a trace of it to the
  queries: it reads exactly the bytes the real attention reads, with one add per element instead
  of the two contractions and the softmax. A decode traced inside this context therefore costs
  the rest of the model plus one plain read of the cache per step: the floor that "time grows
  with the bytes read" is measured against (``scaling(read_floor=True)``). Prefill and the image
  path keep the real attention. Timing only: its tokens are meaningless.
  """
  real = attention.text_attention

  def read_only(q, k, v, mask, keys_transposed=False):
    if not keys_transposed or q.shape[1] != 1:
      return real(q, k, v, mask, keys_transposed)
    b, _, h, d = q.shape
    sums = jnp.sum(k, axis=3) + jnp.sum(v, axis=2)  # [B, Hkv, D]: every slot read once
    return q + 1e-6 * jnp.repeat(sums, h // k.shape[1], axis=1)[:, None]

  attention.text_attention = read_only
  try:
    yield
  finally:
    attention.text_attention = real


def scaling(caches: list[int], prompt: int, new: int, batch: int, layers: int,
            repeats: int, read_floor: bool = False) -> list[dict]:
  """The project's decode time per step against the bytes a step must read, as the cache grows.

  One attention window over the whole cache (``min_window=0``), so every step reads all S slots:
  time per step should grow no faster than ``bytes per step = weights + 2 L B S Hkv D * 4``.
  All cache lengths are compiled and warmed first, then timed in ``repeats`` interleaved rounds
  (each round visits every length, starting from a different one), so a slow spell of a shared
  machine lands on all lengths alike rather than on whichever was being timed; medians.

  With ``read_floor``, each length also gets a decode whose attention only reads the cache
  (``decode_attention_reads_only``), timed in the same rounds: the rows gain ``read_ms_per_step``
  and ``read_time_ratio``, how fast a step that reads the same bytes and does no attention
  arithmetic grows on this machine.
  """
  tokens = jax.random.randint(jax.random.key(1), (batch, prompt), 1,
                              SHAPES["vocab_size"] - 1, jnp.int32)
  mask = jnp.ones(tokens.shape, bool)
  runners = {}
  for s in caches:
    runners[("model", s)] = Project(Point(s, prompt, new, batch, layers), tokens, mask,
                                    min_window=0)
    if read_floor:
      with decode_attention_reads_only():  # traced and compiled (first call) inside the context
        runners[("read", s)] = Project(Point(s, prompt, new, batch, layers), tokens, mask,
                                       min_window=0)
        runners[("read", s)].run()
  for runner in runners.values():
    for _ in range(2):
      runner.run()
  order = list(runners)  # each length's runners side by side
  per_length = len(order) // len(caches)
  times = {key: [] for key in runners}
  for i in range(repeats):
    shift = i * per_length % len(order)
    for key in order[shift:] + order[:shift]:
      times[key].append(runners[key].run()[1])
  rows = []
  for s in caches:
    cfg = runners[("model", s)].cfg
    sec = statistics.median(times[("model", s)])
    weights = flops.decode_bytes(cfg, rows=batch, prompt_len=prompt, reasoning_len=new,
                                 decode_steps=new)["weight_bytes_per_pass"]
    kv = 2 * layers * batch * s * cfg.num_kv_heads * cfg.resolved_head_dim * 4
    row = {"cache": s, "decode_s": sec, "ms_per_step": 1e3 * sec / new,
           "decode_times": times[("model", s)], "bytes_per_step": weights + kv,
           "load": os.getloadavg()[0]}
    if read_floor:
      row["read_ms_per_step"] = 1e3 * statistics.median(times[("read", s)]) / new
      row["read_decode_times"] = times[("read", s)]
    rows.append(row)
  for r in rows:
    r["time_ratio"] = r["ms_per_step"] / rows[0]["ms_per_step"]
    r["bytes_ratio"] = r["bytes_per_step"] / rows[0]["bytes_per_step"]
    if read_floor:
      r["read_time_ratio"] = r["read_ms_per_step"] / rows[0]["read_ms_per_step"]
  return rows


def scaling_markdown(rows: list[dict], prompt: int, new: int, batch: int, layers: int) -> str:
  read = "read_ms_per_step" in rows[0]
  lines = ["", f"## Decode time per step vs cache length (project, one window over the whole "
               f"cache; P={prompt} T={new} B={batch} L={layers})", ""]
  if read:
    lines += ["\"read-only\": the same decode with its attention replaced by a plain sum over every "
              "key and value slot (`decode_attention_reads_only`): the same bytes, no attention "
              "arithmetic.", ""]
  head = "| cache slots | ms/step | MB read/step | time ratio | bytes ratio |"
  rule = "|---|---|---|---|---|"
  if read:
    head += " read-only ms/step | read-only time ratio |"
    rule += "---|---|"
  lines += [head + " load |", rule + "---|"]
  for r in rows:
    line = (f"| {r['cache']} | {r['ms_per_step']:.2f} | {r['bytes_per_step'] / 1e6:.1f} | "
            f"{r['time_ratio']:.2f} | {r['bytes_ratio']:.2f} |")
    if read:
      line += f" {r['read_ms_per_step']:.2f} | {r['read_time_ratio']:.2f} |"
    lines.append(line + f" {r['load']:.1f} |")
  return "\n".join(lines) + "\n"


def to_markdown(rows: list[dict], meta: dict) -> str:
  lines = [
      "# Text sampler: the project vs google-tunix " + meta["tunix"],
      "",
      f"Machine: {meta['machine']}; jax {meta['jax']}, flax {meta['flax']}; {meta['date']}.",
      "Shapes: vocab 4096, hidden 256, 8 heads / 2 KV heads, MLP 1024, float32, one CPU device;",
      "S cache slots, P prompt tokens, T new tokens (T model passes in each decode loop), B rows,",
      f"L layers. Greedy. Medians of {meta['repeats']} alternating rounds after 2 warm-up calls; ratio =",
      "project / tunix (below 1: the project is faster). Load = 1-minute load average before /",
      "after the point (the machine is shared; timings are noisy).",
      "",
      "| point | project decode s | tunix decode s | decode ratio | prefill ratio | total ratio "
      "| ms/step project | ms/step tunix | load |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    p, t, pt = r["results"]["project"], r["results"]["tunix"], r["point"]
    per = lambda x: 1e3 * x["decode_s"] / pt["new"]
    lines.append(
        f"| {r['label']} | {p['decode_s']:.3f} | {t['decode_s']:.3f} | "
        f"**{r['ratio']['decode_s']:.2f}** | {r['ratio']['prefill_s']:.2f} | "
        f"{r['ratio']['total_s']:.2f} | {per(p):.2f} | {per(t):.2f} | "
        f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--points", nargs="*", default=list(DEFAULT_POINTS),
                  help="S:P:T:B:L (cache slots, prompt, new tokens, batch, layers); none "
                       "(a bare --points): only the scaling table, which needs no tunix")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=None, help="write a markdown table here (and .json beside)")
  ap.add_argument("--scaling", nargs="*", type=int, default=[128, 256, 512, 1024, 2048],
                  help="cache lengths of the project-only time-vs-bytes table (none: skip it)")
  ap.add_argument("--scaling-batch", type=int, default=8, help="rows B of the scaling table")
  ap.add_argument("--scaling-repeats", type=int, default=15,
                  help="interleaved rounds of the scaling table (medians)")
  ap.add_argument("--read-floor", action=argparse.BooleanOptionalAction, default=True,
                  help="time a read-only-attention decode beside each cache length of the "
                       "scaling table (the cost of reading the same bytes)")
  args = ap.parse_args(argv)
  points = [Point.parse(p) for p in args.points]  # bad input fails before any compile
  shape = dict(prompt=16, new=64, batch=args.scaling_batch, layers=8)
  if not points and not args.scaling:
    raise SystemExit("nothing to run: give --points or --scaling lengths")
  for s in args.scaling:
    try:
      Point(s, **shape)
    except ValueError as e:
      raise SystemExit(f"--scaling {s}: {e}") from None
  tunix_version = None
  if points:
    try:
      import tunix  # noqa: F401
      from importlib.metadata import version
      tunix_version = version("google-tunix")
    except ImportError as e:
      raise SystemExit(f"tunix is not importable ({e}); see this file's docstring to install "
                       "it into a separate venv, or run only the scaling table (a bare "
                       "--points)") from None
  import flax
  meta = {"tunix": tunix_version, "jax": jax.__version__, "flax": flax.__version__,
          "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
                     f"{jax.devices()[0].platform}",
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeats": args.repeats}
  rows = []
  for pt in points:
    row = compare(pt, args.repeats)
    rows.append(row)
    print(f"{pt.label}: decode ratio {row['ratio']['decode_s']:.2f} "
          f"(project {row['results']['project']['decode_s']:.3f}s, "
          f"tunix {row['results']['tunix']['decode_s']:.3f}s), prefill ratio "
          f"{row['ratio']['prefill_s']:.2f}, load {row['load_before'][0]:.1f}", flush=True)
  md = to_markdown(rows, meta) if rows else (
      f"# The project's text decode vs cache length\n\nMachine: {meta['machine']}; jax "
      f"{meta['jax']}, flax {meta['flax']}; {meta['date']}.\n")
  scale_rows = []
  if args.scaling:
    scale_rows = scaling(args.scaling, repeats=args.scaling_repeats,
                         read_floor=args.read_floor, **shape)
    md += scaling_markdown(scale_rows, **shape)
  print(md)
  if args.out:
    out = pathlib.Path(args.out)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                    "scaling": scale_rows}, indent=1))
  return rows


if __name__ == "__main__":
  main()
