"""How close to the machine's limit the rollout and the train step run.

    python benchmarks/run.py --quick --out bench_quick.json        # a few minutes on a CPU
    python benchmarks/run.py --out bench.json                      # both presets, full scaling
    python benchmarks/run.py --presets shapes_large --dtype bfloat16 --out bench_gpu.json
    python benchmarks/run.py --aot v5p-128 --aot-only --aot-flops-check \
        --out benchmarks/results/aot/bench_bagel_v5p-128.json   # TPU compile from this CPU

One process measures, in order: the machine's matmul rate and memory bandwidth (``probes``);
then per model preset: the rollout (whole, and its text part and flow scan alone), the train step,
their compile times, and (for the first preset) how the train step's time grows with batch,
reasoning length and image tokens. Model FLOPs are analytic (``flops``; formulas there) and the
train step's are checked against XLA's cost analysis.
``mfu = model FLOPs / seconds / peak matmul rate``.

The configuration is the real one (``configs/shapes_cpu.py`` through the trainer's own
``rollout_config`` / ``objective_config`` / ``optim_config``), with two benchmark choices: the
weights are a random init of the preset (costs do not depend on values), and the reasoning never
stops early, so every row decodes the full ``max_reasoning_len`` (the worst case, and the same
work every run): text is sampled from the preset's whole embedding table (``vocab_limit`` 0, in
the rollout and the train step alike) and the stop id is the first id past that table, which the
model can never sample. Tokens/s counts the tokens actually generated (mask sum).

``--tiny`` checks that every part runs (CI: under a minute on 2 cores): the ``tiny`` preset,
one timed run of each part, small probes, no scaling; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time

_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # `python benchmarks/run.py` puts benchmarks/ first, not the repo
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import flops as fl  # noqa: E402
from benchmarks import probes  # noqa: E402
from configs import shapes_cpu  # noqa: E402
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax import parallel  # noqa: E402
from unigrpo_jax.models.autoencoder import PatchAutoencoder  # noqa: E402
from unigrpo_jax.models.unified.model import count_params
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.rl import train_step as ts  # noqa: E402
from unigrpo_jax.rollout import flow, text as text_sampling  # noqa: E402
from unigrpo_jax.rollout.program import make_rollout, reasoning_context  # noqa: E402
from unigrpo_jax.rollout.trajectory import Trajectory, WindowRecord  # noqa: E402
from unigrpo_jax.data.shapeworld.world import shapeworld_tokenizer
from unigrpo_jax.trainers import build
from unigrpo_jax.rl import objective

FIRST_WORD_ID = 7  # ids below are the tokenizer's special tokens
# XLA's FLOP count is taken after the HLO passes; skipping the CPU backend's LLVM optimisations
# does not change it and compiles the cross-check ~3x faster.
COUNT_ONLY = {"xla_backend_optimization_level": 0}
_T0 = time.perf_counter()


def log(msg: str) -> None:
  """Progress on stderr (the report goes to stdout)."""
  print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Setup:
  """One preset's model and the real run configuration around it."""
  name: str
  cfg: object  # ModelConfig
  graphdef: object
  state: object
  rcfg: object  # RolloutConfig
  ocfg: object  # ObjectiveConfig
  optcfg: object  # OptimConfig
  mesh: object
  prompts: int
  prompt_len: int
  reps: dict

  @property
  def rows(self) -> int:
    return self.prompts * self.rcfg.group_size


def build_setup(preset: str, dtype: str, reps: dict, **model_overrides) -> Setup:
  """Model (random init, one device) + rollout / objective / optimizer configs of shapes_cpu."""
  config = shapes_cpu.get_config()
  tokenizer = shapeworld_tokenizer()
  cfg = get_preset(preset, dtype=dtype, param_dtype=config.model.param_dtype, **model_overrides)
  mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  graphdef, state = parallel.create_sharded_model(cfg, 0, mesh, model_fn=UnifiedModel)
  # Sampling over the whole table (vocab_limit 0) and a stop id one past it: the stop token is
  # never sampled and every row decodes all T tokens. (The run's vocab_limit, the tokenizer's
  # vocabulary, must exceed its stop id: RolloutConfig rejects a stop id it can never sample.)
  rcfg = dataclasses.replace(build.rollout_config(config, tokenizer), vocab_limit=0,
                             stop_id=cfg.vocab_size)
  ocfg = dataclasses.replace(build.objective_config(config, tokenizer), vocab_limit=0)
  return Setup(preset, cfg, graphdef, state, rcfg, ocfg, build.optim_config(config), mesh,
               config.rollout.prompts_per_batch, config.data.max_prompt_len, reps)


def random_prompts(setup: Setup, key):
  """[Bp, P] word ids of the tokenizer's vocabulary, all slots valid."""
  tok = jax.random.randint(key, (setup.prompts, setup.prompt_len), FIRST_WORD_ID,
                           shapeworld_tokenizer().vocab_size, jnp.int32)
  return tok, jnp.ones(tok.shape, bool)


def timed_call(setup: Setup, compiled, *args):
  """Median seconds of ``compiled(*args)`` (blocked), and its last output."""
  sec, times, out = probes.median_time(lambda: probes.block(compiled(*args)), **setup.reps)
  return sec, times, out


# ------------------------------------------------------------------------------ rollout
def text_part(setup: Setup):
  """Jitted text half of the rollout: prefill, G-fold repeat, AR decode, <vision_start>."""
  rcfg = setup.rcfg

  def fn(state, prompt_tokens, prompt_mask, key):
    model = nnx.merge(setup.graphdef, state)
    return reasoning_context(model, prompt_tokens, prompt_mask, key, rcfg.sampling,
                             rcfg.vision_start_id, rcfg.group_size)

  return jax.jit(fn)


def time_decode(setup: Setup, prompt_tokens, prompt_mask, key):
  """The decode loop alone on the rollout's B rows (each prompt repeated G times) and its cache
  of P + T + 1 slots: median seconds of the donated ``decode_fn``, a fresh (untimed) prefill
  before each call. Returns (seconds, times, compile seconds)."""
  g = setup.rcfg.group_size
  tokens, mask = jnp.repeat(prompt_tokens, g, axis=0), jnp.repeat(prompt_mask, g, axis=0)
  prefill_fn, decode_fn = text_sampling.make_prefill_decode(setup.graphdef, setup.rcfg.sampling)
  cache, last = probes.block(prefill_fn(setup.state, tokens, mask))
  compiled, compile_s = probes.compile_timed(decode_fn, setup.state, cache, last, mask, key)

  def once():
    cache, last = probes.block(prefill_fn(setup.state, tokens, mask))
    start = time.perf_counter()
    probes.block(compiled(setup.state, cache, last, mask, key))
    return time.perf_counter() - start

  for _ in range(setup.reps["warmup"]):
    once()
  times = [once() for _ in range(setup.reps["repeats"])]
  return float(np.median(times)), times, compile_s


def flow_part(setup: Setup):
  """Jitted image half of the rollout: the flow scan (ODE + SDE window) on a fixed text cache."""
  rcfg, mcfg = setup.rcfg, setup.cfg
  grid = flow.timesteps(rcfg.num_steps, rcfg.shift)

  def fn(state, cache, image_pos, key):
    model = nnx.merge(setup.graphdef, state)
    b = image_pos.shape[0]
    k_window, k_noise, k_flow = jax.random.split(key, 3)

    def velocity_fn(x, t):
      return model(latents=x, times=t, image_position=image_pos, cache=cache).velocity

    starts = flow.random_window_start(k_window, b, tuple(rcfg.window_range), rcfg.window_size)
    noise = jax.random.normal(k_noise, (b, mcfg.num_image_tokens, mcfg.latent_dim))
    return flow.sample_flow(velocity_fn, noise, grid, k_flow, noise_level=rcfg.noise_level,
                            sde_window=(starts, rcfg.window_size), sde_type=rcfg.sde_type)

  return jax.jit(fn)


def bench_rollout(setup: Setup, peak: float, membw: float):
  """Whole rollout, its text part and its flow scan, each compiled and timed on its own.

  Returns (results dict, the whole rollout's Trajectory for the train step)."""
  key = jax.random.key(1)
  prompt_tokens, prompt_mask = random_prompts(setup, jax.random.key(0))
  args = (setup.state, prompt_tokens, prompt_mask, key)
  ae = PatchAutoencoder.for_model(setup.cfg)
  rollout, compile_s = probes.compile_timed(make_rollout(setup.graphdef, setup.rcfg, ae), *args)
  log(f"{setup.name}: rollout compiled in {compile_s:.1f}s")
  sec, times, traj = timed_call(setup, rollout, *args)
  log(f"{setup.name}: rollout {sec:.3f}s")

  text, text_compile_s = probes.compile_timed(text_part(setup), *args)
  text_sec, _, (sample, image_pos) = timed_call(setup, text, *args)
  flow_args = (setup.state, sample.cache, image_pos, key)
  scan, flow_compile_s = probes.compile_timed(flow_part(setup), *flow_args)
  flow_sec, _, _ = timed_call(setup, scan, *flow_args)
  log(f"{setup.name}: text part {text_sec:.3f}s, flow scan {flow_sec:.3f}s")
  dec_sec, dec_times, dec_compile_s = time_decode(setup, prompt_tokens, prompt_mask, key)
  log(f"{setup.name}: decode loop {dec_sec:.3f}s")

  t = setup.rcfg.max_reasoning_len
  mask = np.asarray(traj.reasoning_mask)
  tokens, decode_steps = int(mask.sum()), int(mask.sum(axis=1).max())
  text_tokens = int(np.asarray(sample.mask).sum())
  f = fl.rollout(setup.cfg, prompts=setup.prompts, group_size=setup.rcfg.group_size,
                 prompt_len=setup.prompt_len, decode_steps=decode_steps, reasoning_len=t,
                 num_steps=setup.rcfg.num_steps)
  mem = fl.decode_bytes(setup.cfg, rows=setup.rows, prompt_len=setup.prompt_len,
                        reasoning_len=t, decode_steps=decode_steps)
  bound_s = mem["total"] / membw
  dec_bound_s = mem["decode_total"] / membw
  cache_len = setup.prompt_len + t + 1
  return {
      "seconds": sec, "times": times, "compile_s": compile_s, "rows": setup.rows,
      "images_per_s": setup.rows / sec, "reasoning_tokens": tokens,
      "reasoning_tokens_per_s": tokens / sec, "decode_steps": decode_steps,
      "flops": f, "mfu": f["total"] / sec / peak,
      "text": {"seconds": text_sec, "compile_s": text_compile_s, "tokens": text_tokens,
               "tokens_per_s": text_tokens / text_sec, "flops": f["text"],
               "mfu": f["text"] / text_sec / peak, "bytes": mem,
               "membw_bound_s": bound_s, "measured_over_bound": text_sec / bound_s},
      "decode": {"seconds": dec_sec, "times": dec_times, "compile_s": dec_compile_s,
                 "steps": decode_steps, "cache_len": cache_len,
                 "windows": text_sampling.attention_windows(setup.prompt_len, t, cache_len),
                 "flops": f["decode"], "membw_bound_s": dec_bound_s,
                 "measured_over_bound": dec_sec / dec_bound_s},
      "flow": {"seconds": flow_sec, "compile_s": flow_compile_s, "steps": setup.rcfg.num_steps,
               "flops": f["flow"], "mfu": f["flow"] / flow_sec / peak},
      "split": {"text": text_sec / (text_sec + flow_sec), "flow": flow_sec / (text_sec + flow_sec)},
  }, traj


# ------------------------------------------------------------------------------ train step
def synthetic_trajectory(cfg, rcfg, rows: int, prompt_len: int, key) -> Trajectory:
  """A well-formed Trajectory of the given shapes (the step's cost depends on shapes only):
  full prompts and reasoning, window steps 0..K-1 of the real time grid with std 0.1."""
  t_len, k, n, dl = rcfg.max_reasoning_len, rcfg.window_size, cfg.num_image_tokens, cfg.latent_dim
  keys = jax.random.split(key, 4)
  grid = flow.timesteps(rcfg.num_steps, rcfg.shift)
  x_t = jax.random.normal(keys[0], (rows, k, n, dl))
  row_k = lambda v: jnp.broadcast_to(v, (rows, k)).astype(v.dtype)
  window = WindowRecord(
      x_t=x_t, x_next=x_t + 0.1 * jax.random.normal(keys[1], x_t.shape), mean=x_t,
      std=jnp.full((rows, k), 0.1), t=row_k(grid[:k]), t_next=row_k(grid[1:k + 1]),
      logp=jnp.zeros((rows, k)), step_index=row_k(jnp.arange(k, dtype=jnp.int32)))
  vocab = shapeworld_tokenizer().vocab_size
  return Trajectory(
      prompt_tokens=jax.random.randint(keys[2], (rows, prompt_len), FIRST_WORD_ID, vocab),
      prompt_mask=jnp.ones((rows, prompt_len), bool),
      reasoning_tokens=jax.random.randint(keys[3], (rows, t_len), FIRST_WORD_ID, vocab),
      reasoning_mask=jnp.ones((rows, t_len), bool),
      reasoning_logp=jnp.full((rows, t_len), -math.log(cfg.vocab_size)),
      truncated=jnp.ones((rows,), bool), window=window, latents=jnp.zeros((rows, n, dl)),
      images=jnp.zeros((rows, cfg.image_size, cfg.image_size, cfg.image_channels)))


def analytic_train_flops(setup: Setup, rows: int) -> dict:
  o = setup.ocfg
  return fl.train_step(setup.cfg, rows=rows, prompt_len=setup.prompt_len,
                       reasoning_len=setup.rcfg.max_reasoning_len,
                       window_size=setup.rcfg.window_size, ppo_epochs=setup.optcfg.ppo_epochs,
                       needs_reference=o.needs_reference, ref_logits=o.text_kl_coef > 0,
                       stop_context_grad=o.stop_context_grad)


def time_train_step(setup: Setup, traj: Trajectory):
  """Compiles and times the real jitted train step on ``traj``. Returns (dict, compiled)."""
  rows = traj.prompt_tokens.shape[0]
  adv = jax.random.normal(jax.random.key(5), (rows,))
  ref = jax.tree.map(jnp.copy, setup.state) if setup.ocfg.needs_reference else None
  state = ts.init_train_state(setup.state, setup.ocfg, setup.optcfg, setup.mesh)
  step = ts.make_train_step(setup.graphdef, setup.state, setup.ocfg, setup.optcfg, setup.mesh)
  key = jax.random.key(6)
  compiled, compile_s = probes.compile_timed(step, state, ref, traj, adv, key)
  log(f"{setup.name}: train step on {rows} rows compiled in {compile_s:.1f}s")
  holder = [state]  # the state is donated: feed each step the previous step's output

  def run():
    holder[0], metrics = compiled(holder[0], ref, traj, adv, key)
    return probes.block((holder[0], metrics))

  sec, times, _ = probes.median_time(run, **setup.reps)
  log(f"{setup.name}: train step {sec:.3f}s")
  return {"seconds": sec, "times": times, "compile_s": compile_s, "rows": rows}, compiled


def xla_minibatch_flops(setup: Setup, traj: Trajectory) -> float:
  """XLA's count of ONE loop iteration of the step: value_and_grad of ``loss_fn`` (policy
  fwd+bwd and reference fwd) on one minibatch. XLA counts a loop body once, whatever its trip
  count, so the step's total is this times ppo_epochs * num_minibatches."""
  rows = traj.prompt_tokens.shape[0] // setup.optcfg.num_minibatches
  mb = jax.tree.map(lambda x: x[:rows], traj.replace(images=None, latents=None))
  adv = jnp.zeros((rows,))
  ref = setup.state if setup.ocfg.needs_reference else None
  param_part, rest = ts.split_params(setup.state)

  def grads(p, rest, ref, mb, adv):
    loss = lambda q: objective.loss_fn(nnx.merge_state(q, rest), ref, setup.graphdef, mb, adv,
                                       setup.ocfg)
    return jax.value_and_grad(loss, has_aux=True)(p)

  lowered = jax.jit(grads).lower(param_part, rest, ref, mb, adv)
  return float(lowered.compile(COUNT_ONLY).cost_analysis()["flops"])


def bench_train_step(setup: Setup, traj: Trajectory, peak: float) -> dict:
  """The train step on the rollout's own trajectory: time, analytic and XLA FLOPs, MFU."""
  res, compiled = time_train_step(setup, traj)
  analytic = analytic_train_flops(setup, res["rows"])
  iterations = setup.optcfg.ppo_epochs * setup.optcfg.num_minibatches
  xla = xla_minibatch_flops(setup, traj) * iterations
  log(f"{setup.name}: XLA cost analysis done")
  raw = compiled.cost_analysis().get("flops")
  res.update({
      "flops": analytic, "mfu": analytic["total"] / res["seconds"] / peak,
      "xla_flops": xla, "analytic_over_xla": analytic["total"] / xla,
      "mfu_xla": xla / res["seconds"] / peak,
      "xla_flops_step_raw": raw,  # loop bodies counted once: not the step's total
      "ppo_epochs": setup.optcfg.ppo_epochs, "num_minibatches": setup.optcfg.num_minibatches})
  return res


# ------------------------------------------------------------------------------ scaling
def scaling_points(cfg, quick: bool) -> list[tuple[str, int, int, dict]]:
  """(label, batch factor, reasoning-length factor, model overrides). The image point takes
  image_size x1.5 (rounded to the patch tile: 32 -> 48), i.e. about 2.25x the image tokens; the
  report gives the exact token ratio."""
  points = [("batch x2", 2, 1, {})]
  if not quick:
    tile = cfg.vae_downsample * cfg.patch_size
    size = max(tile, round(1.5 * cfg.image_size / tile) * tile)
    points += [("batch x4", 4, 1, {}), ("reasoning x2", 1, 2, {}),
               (f"image_size {size}", 1, 1, {"image_size": size})]
  return points


def bench_scaling(setup: Setup, base: dict, dtype: str, peak: float, quick: bool) -> list[dict]:
  """Train-step time vs the 1x point (``base``) at larger batch / reasoning / image tokens."""
  base_flops = base["flops"]["total"]
  rows = [{"label": "1x", "rows": base["rows"], "reasoning_len": setup.rcfg.max_reasoning_len,
           "image_tokens": setup.cfg.num_image_tokens, "seconds": base["seconds"],
           "compile_s": base["compile_s"], "flops": base_flops, "time_ratio": 1.0,
           "image_tokens_ratio": 1.0,
           "flops_ratio": 1.0, "mfu": base["mfu"]}]
  for label, batch_x, reason_x, overrides in scaling_points(setup.cfg, quick):
    point = build_setup(setup.name, dtype, setup.reps, **overrides) if overrides else setup
    rcfg = dataclasses.replace(setup.rcfg,
                               max_reasoning_len=setup.rcfg.max_reasoning_len * reason_x)
    point = dataclasses.replace(point, rcfg=rcfg, prompts=setup.prompts * batch_x)
    traj = synthetic_trajectory(point.cfg, rcfg, point.rows, point.prompt_len,
                                jax.random.key(7))
    res, _ = time_train_step(point, traj)
    f = analytic_train_flops(point, point.rows)["total"]
    rows.append({"label": label, "rows": point.rows, "reasoning_len": rcfg.max_reasoning_len,
                 "image_tokens": point.cfg.num_image_tokens, "seconds": res["seconds"],
                 "compile_s": res["compile_s"], "flops": f,
                 "time_ratio": res["seconds"] / base["seconds"], "flops_ratio": f / base_flops,
                 "image_tokens_ratio": point.cfg.num_image_tokens / setup.cfg.num_image_tokens,
                 "mfu": f / res["seconds"] / peak})
  return rows


# ------------------------------------------------------------------------------ report
def bench_preset(name: str, args, peak: float, membw: float, with_scaling: bool) -> dict:
  reps = ({"warmup": 1, "repeats": 1} if args.tiny else {"warmup": 1, "repeats": 3} if args.quick
          else {"warmup": 2, "repeats": 5, "slow_s": 10.0})
  setup = build_setup(name, args.dtype, reps)
  if args.tiny:  # 2 prompts x group_size rows: every part runs, compiles stay small
    setup = dataclasses.replace(setup, prompts=2)
  rollout, traj = bench_rollout(setup, peak, membw)
  train = bench_train_step(setup, traj, peak)
  out = {"model": {"preset": name, "dtype": setup.cfg.dtype, "param_dtype": setup.cfg.param_dtype,
                   "params": count_params(setup.state),
                   "params_per_expert_layer": fl.expert_weights(setup.cfg)},
         "shapes": {"prompts": setup.prompts, "group_size": setup.rcfg.group_size,
                    "rows": setup.rows, "prompt_len": setup.prompt_len,
                    "max_reasoning_len": setup.rcfg.max_reasoning_len,
                    "image_tokens": setup.cfg.num_image_tokens,
                    "flow_steps": setup.rcfg.num_steps, "window_size": setup.rcfg.window_size},
         "rollout": rollout, "train_step": train,
         "compile_s": {"rollout": rollout["compile_s"], "train_step": train["compile_s"]}}
  if with_scaling:
    out["scaling"] = bench_scaling(setup, train, args.dtype, peak, args.quick)
  return out


def _g(x: float) -> str:
  return f"{x / 1e9:9.3f}"


def format_report(res: dict) -> str:
  m, pk, bw = res["machine"], res["peak_matmul"], res["peak_membw"]
  lines = [f"machine: {m['platform']} ({m['device_kind']}), {m['cpu_count']} cpus, "
           f"jax {m['jax_version']}",
           f"peak matmul {pk['flops_per_s'] / 1e9:.1f} GFLOP/s ({pk['dtype']} {pk['n']}^2), "
           f"memory bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s"]
  for name, p in res["presets"].items():
    s, r, t = p["shapes"], p["rollout"], p["train_step"]
    tx, fw = r["text"], r["flow"]
    lines += ["", f"== {name}: {p['model']['params'] / 1e6:.2f}M params, {p['model']['dtype']}; "
              f"B={s['rows']} rows ({s['prompts']}x{s['group_size']}), P={s['prompt_len']}, "
              f"T={s['max_reasoning_len']}, N={s['image_tokens']}, steps={s['flow_steps']}, "
              f"K={s['window_size']}",
              f"{'part':<22}{'seconds':>9}{'GFLOP':>10}{'GFLOP/s':>10}{'MFU':>8}  notes"]
    row = lambda label, sec, f, note: lines.append(
        f"{label:<22}{sec:9.3f}{_g(f)}{_g(f / sec)}{100 * f / sec / pk['flops_per_s']:7.2f}%  "
        f"{note}")
    row("rollout", r["seconds"], r["flops"]["total"],
        f"{r['images_per_s']:.1f} img/s, {r['reasoning_tokens_per_s']:.0f} reasoning tok/s, "
        f"compile {r['compile_s']:.1f}s")
    row("  text (alone)", tx["seconds"], tx["flops"],
        f"{100 * r['split']['text']:.0f}% of text+flow; {tx['tokens_per_s']:.0f} tok/s; "
        f"membw bound {tx['membw_bound_s']:.3f}s (measured/bound {tx['measured_over_bound']:.1f})")
    dc = r["decode"]
    row("  decode loop (alone)", dc["seconds"], dc["flops"],
        f"{dc['steps']} steps, {dc['cache_len']}-slot cache read in windows {dc['windows']}; "
        f"membw bound {dc['membw_bound_s']:.3f}s (measured/bound {dc['measured_over_bound']:.1f})")
    row("  flow scan (alone)", fw["seconds"], fw["flops"],
        f"{100 * r['split']['flow']:.0f}% of text+flow; {fw['steps']} steps")
    row("train step", t["seconds"], t["flops"]["total"],
        f"XLA {t['xla_flops'] / 1e9:.3f} GFLOP (analytic/XLA {t['analytic_over_xla']:.3f}), "
        f"compile {t['compile_s']:.1f}s")
    if "scaling" in p:
      lines += ["  scaling of the train step:",
                f"  {'point':<15}{'rows':>5}{'T':>5}{'N':>5}{'x N':>6}{'seconds':>9}{'x time':>8}"
                f"{'x FLOPs':>9}{'MFU':>8}{'compile':>9}"]
      for sc in p["scaling"]:
        lines.append(f"  {sc['label']:<15}{sc['rows']:>5}{sc['reasoning_len']:>5}"
                     f"{sc['image_tokens']:>5}{sc['image_tokens_ratio']:6.2f}{sc['seconds']:9.3f}"
                     f"{sc['time_ratio']:8.2f}"
                     f"{sc['flops_ratio']:9.2f}{100 * sc['mfu']:7.2f}%{sc['compile_s']:8.1f}s")
  lines += ["", f"peak host memory {res['peak_host_memory_bytes'] / 2**20:.0f} MiB; "
            f"total {res['wall_s']:.0f}s"]
  return "\n".join(lines)


def bench_aot(topology: str, layers: int, flops_check: bool = False) -> dict:
  """Compiles the BAGEL-7B-MoT train step of ``configs/tpu_v5.py`` (layer scan, remat, splash
  attention, the paper's batch) for a TPU slice (``unigrpo_jax.aot``; needs libtpu) with
  ``layers`` of its 28 layers (0: all), so that a change that grows memory or compile time shows
  up in the results history.

  ``flops_check``: also checks the analytic FLOPs against XLA's count. XLA counts a loop body
  once, so the check compiles the same step without the layer scan and with the dense ("xla")
  attention (no chunk loop, no kernel whose FLOPs XLA cannot see) at 2 and 4 layers, scales
  its PPO-loop body by ``ppo_epochs * num_minibatches * grad_accum``, and extrapolates both
  counts linearly to 28 layers (each layer adds the same work). Compared with the analytic
  *executed* FLOPs (model FLOPs plus the remat recompute).
  """
  from configs import tpu_v5
  from unigrpo_jax.aot import plan

  def compile_train(num_layers: int, **model):
    config = tpu_v5.get_config()
    if num_layers:
      config.model.num_layers = num_layers
    config.model.update(model)
    log(f"AOT: bagel_7b_mot train step, {num_layers or 'all'} layers, {topology}, {model or ''}")
    return config, plan.plan(config, topology, programs=("train_step",), log=log)

  config, rep = compile_train(layers)
  t = rep["programs"]["train_step"]
  out = {"topology": topology, "num_chips": rep["num_chips"], "preset": "bagel_7b_mot",
         "config": "configs/tpu_v5.py", "num_layers": rep["model"]["num_layers"],
         "model": rep["model"], "params": rep["params"], "batch": rep["batch"],
         "hbm_bytes_per_chip": rep["hbm_bytes_per_chip"], "bytes_per_chip": t["bytes_per_chip"],
         "fits": t["fits"], "headroom": t["headroom"], "flops": t["flops"],
         "executed_flops": t.get("executed_flops"), "compile_s": t["compile_s"],
         "roofline_s": t.get("roofline_s")}
  if flops_check:
    o = config.optim
    loops = o.ppo_epochs * o.num_minibatches * o.grad_accum
    points = {}
    for n in (2, 4):
      _, r = compile_train(n, scan_layers=False, attention_impl="xla")
      p = r["programs"]["train_step"]
      xla = p["xla_flops_per_chip"] * r["num_chips"] * loops
      points[n] = {"analytic_executed": p["executed_flops"], "xla": xla,
                   "analytic_over_xla": p["executed_flops"] / xla, "compile_s": p["compile_s"],
                   "bytes_per_chip": p["bytes_per_chip"]["total"]}
    full = rep["model"]["num_layers"] if layers else 28
    per_layer = {k: (points[4][k] - points[2][k]) / 2 for k in ("analytic_executed", "xla")}
    at_full = {k: points[4][k] + (full - 4) * per_layer[k] for k in per_layer}
    out["flops_check"] = {"points": points, "extrapolated_layers": full,
                          "analytic_executed": at_full["analytic_executed"],
                          "xla": at_full["xla"],
                          "analytic_over_xla": at_full["analytic_executed"] / at_full["xla"]}
  return out


def format_aot(a: dict) -> str:
  m = a["bytes_per_chip"]
  line = (f"AOT {a['preset']} train step ({a['config']}: scan={a['model']['scan_layers']}, "
          f"attention={a['model']['attention_impl']}), {a['num_layers']} layers, {a['topology']} "
          f"({a['num_chips']} chips): {m['total'] / 1e9:.2f} GB/chip of "
          f"{a['hbm_bytes_per_chip'] / 1e9:.2f}, fits={a['fits']}, {a['flops'] / 1e12:.1f} model "
          f"TFLOP, compile {a['compile_s']:.0f}s")
  if "arguments" in m:
    line += f" (args {m['arguments'] / 1e9:.2f}, temps {m['temporaries'] / 1e9:.2f} GB)"
  if "flops_check" in a:
    fc = a["flops_check"]
    pts = ", ".join(f"{n} layers {p['analytic_over_xla']:.3f}" for n, p in fc["points"].items())
    line += (f"\n  analytic executed FLOPs / XLA: {pts}; extrapolated to "
             f"{fc['extrapolated_layers']} layers {fc['analytic_over_xla']:.3f}")
  return line


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="shapes only, 3 timed runs, scaling at 1x/2x batch only")
  ap.add_argument("--tiny", action="store_true",
                  help="a smoke run that every part works (CI): the tiny preset, one timed run "
                       "each, small probes, no scaling; the numbers mean nothing")
  ap.add_argument("--presets", default=None,
                  help="comma-separated model presets (default: shapes,shapes_large; "
                       "--quick: shapes; --tiny: tiny); the train-step scaling runs on the "
                       "first one (not with --tiny)")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="model compute dtype (and of the matmul probe); bfloat16 for GPU/TPU")
  ap.add_argument("--out", default=None, help="write the results as JSON here")
  ap.add_argument("--aot", default=None, metavar="TOPOLOGY",
                  help="also compile the bagel_7b_mot train step for this TPU slice (e.g. "
                       "v5p-128; needs libtpu) and record bytes per chip, FLOPs, compile time")
  ap.add_argument("--aot-layers", type=int, default=0,
                  help="layers of bagel_7b_mot to compile (0: all 28; the layer scan keeps "
                       "compile time flat in depth)")
  ap.add_argument("--aot-flops-check", action="store_true",
                  help="also check analytic vs XLA FLOPs (unscanned 2- and 4-layer compiles)")
  ap.add_argument("--aot-only", action="store_true", help="only the --aot section")
  return ap.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()
  if args.aot_only:
    if not args.aot:
      raise SystemExit("error: --aot-only needs --aot=TOPOLOGY")
    res = {"aot": bench_aot(args.aot, args.aot_layers, args.aot_flops_check),
           "wall_s": time.perf_counter() - start}
    print(format_aot(res["aot"]), flush=True)
    if args.out:
      pathlib.Path(args.out).write_text(json.dumps(res, indent=1, default=float))
      print(f"wrote {args.out}")
    return res
  default = "tiny" if args.tiny else "shapes" if args.quick else "shapes,shapes_large"
  presets = (args.presets or default).split(",")
  small = {"warmup": 1, "repeats": 1} if args.tiny else {}
  pk = probes.peak_matmul(jnp.dtype(args.dtype), **small, **({"size": 256} if args.tiny else {}))
  bw = probes.peak_membw(**small, **({"num_bytes": 2**22} if args.tiny else {}))
  log(f"peak matmul {pk['flops_per_s'] / 1e9:.1f} GFLOP/s, "
      f"membw {bw['bytes_per_s'] / 1e9:.1f} GB/s")
  res = {"machine": probes.machine_info(), "dtype": args.dtype, "quick": args.quick,
         "tiny": args.tiny,
         "peak_matmul": pk, "peak_matmul_flops": pk["flops_per_s"], "peak_membw": bw,
         "peak_membw_bytes_s": bw["bytes_per_s"], "presets": {}}
  for i, name in enumerate(presets):
    res["presets"][name] = bench_preset(name, args, pk["flops_per_s"], bw["bytes_per_s"],
                                        with_scaling=i == 0 and not args.tiny)
  if args.aot:
    res["aot"] = bench_aot(args.aot, args.aot_layers, args.aot_flops_check)
  res["peak_host_memory_bytes"] = probes.peak_host_memory_bytes()
  res["wall_s"] = time.perf_counter() - start
  print(format_report(res), flush=True)
  if args.aot:
    print(format_aot(res["aot"]), flush=True)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {args.out}")
  return res


if __name__ == "__main__":
  main()
