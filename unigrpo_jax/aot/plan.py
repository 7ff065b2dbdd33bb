"""Compiles a config's rollout and train step for a TPU slice and says whether they fit.

Everything is abstract: the model is ``nnx.eval_shape``d (no weights), the train state, reference
and batch are ShapeDtypeStructs carrying the trainer's shardings, and the mesh is laid over the
slice's compile-only devices. The two programs are the trainer's own (``build.build_programs``),
so what compiles and fits here is what ``python -m unigrpo_jax.main`` would run.
"""
from __future__ import annotations

import os
import time
from concurrent import futures
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unigrpo_jax import checkpointing, config_validation, parallel
from unigrpo_jax.aot import memory, time_model, topology
from unigrpo_jax.data.tokenizer import Tokenizer
from unigrpo_jax.models.autoencoder import PatchAutoencoder
from unigrpo_jax.models.unified.model import abstract_model, count_params
from unigrpo_jax.models.unified import attention, lora
from unigrpo_jax.rl.train_step import abstract_train_state
from unigrpo_jax.trainers import build
from unigrpo_jax.data.shapeworld.world import shapeworld_tokenizer

PROGRAMS = ("rollout", "train_step")


def _model_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer):
  """The model's shapes, as ``build.model_and_params`` gives them, without reading weights."""
  if config.init_checkpoint and not build.is_bagel_dir(config.init_checkpoint):
    runtime = {k: config.model[k] for k in build.RUNTIME_FIELDS if k in config.model}
    cfg = checkpointing.model_config_from_meta(checkpointing.read_meta(config.init_checkpoint),
                                               **runtime)
    return cfg.replace(attention_impl=attention.resolve_impl(cfg.attention_impl, "tpu",
                                                             cfg.compute_dtype))
  return build.model_and_params(config, tokenizer, platform="tpu")[0]  # TPU attention kernels


def _autoencoder(model_cfg):
  """-> (autoencoder, note). Pixel-latent models get the trainer's PatchAutoencoder. FLUX-latent
  models (BAGEL) get an abstract FLUX VAE (FLUX-dev shape, float32 weights as ``load_flux_vae``
  gives them, no values), so the rollout's figures include decoding every row's image."""
  if model_cfg.vae_downsample == 1:
    return PatchAutoencoder.for_model(model_cfg), "pixel patches (as the trainer)"
  from unigrpo_jax.models.flux_vae.autoencoder import FluxAutoencoder
  from unigrpo_jax.models.flux_vae.model import FluxVAE, FluxVAEConfig
  vae_cfg = FluxVAEConfig(z_channels=model_cfg.image_channels)
  if vae_cfg.downsample != model_cfg.vae_downsample:
    raise ValueError(f"the model's latents are {model_cfg.vae_downsample}x down; the FLUX VAE "
                     f"is {vae_cfg.downsample}x")
  vae = nnx.eval_shape(lambda: FluxVAE(vae_cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
  return (FluxAutoencoder(vae, image_size=model_cfg.image_size),
          "FLUX VAE decoder (FLUX-dev shape, float32 weights), as a BAGEL directory's")


def _with_sharding(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      shardings)


def _analytic(config, model_cfg, ocfg) -> dict:
  """Model FLOPs per call of both programs (all chips): ``benchmarks/flops.py``'s formulas,
  worst case (every row decodes all T reasoning tokens)."""
  try:
    from benchmarks import flops
  except ImportError as e:
    raise RuntimeError("unigrpo_jax.aot reads benchmarks/flops.py: run it from the repository "
                       "root") from e
  r, p = config.rollout, config.data.max_prompt_len
  roll = flops.rollout(model_cfg, prompts=r.prompts_per_batch, group_size=r.group_size,
                       prompt_len=p, decode_steps=r.max_reasoning_len,
                       reasoning_len=r.max_reasoning_len, num_steps=r.num_steps)
  train = flops.train_step(model_cfg, rows=r.prompts_per_batch * r.group_size, prompt_len=p,
                           reasoning_len=r.max_reasoning_len, window_size=r.window_size,
                           ppo_epochs=config.optim.ppo_epochs,
                           needs_reference=ocfg.needs_reference,
                           ref_logits=ocfg.text_kl_coef > 0,
                           stop_context_grad=ocfg.stop_context_grad,
                           remat=model_cfg.remat)
  decode = flops.decode_bytes(model_cfg, rows=r.prompts_per_batch * r.group_size, prompt_len=p,
                              reasoning_len=r.max_reasoning_len,
                              decode_steps=r.max_reasoning_len)
  return {"rollout": roll["total"], "train_step": train["total"], "decode_bytes": decode,
          "executed": {"rollout": roll["total"], "train_step": train["executed"]}}


def _roofline(name, cost, topo, config, analytic) -> tuple:
  """(compute, HBM) seconds per call if the chips ran at peak, per chip.

  Compute: executed FLOPs (model FLOPs plus the remat recompute) / (chips * peak bf16). HBM
  traffic per chip: the train step's is XLA's ``bytes accessed`` of one loop iteration times
  ``ppo_epochs * num_minibatches * grad_accum`` iterations (nearly all of the step is inside the
  loop; XLA counts a loop body once, so with ``scan_layers`` this undercounts the layers'
  traffic: the train step is compute-bound at these batch sizes either way). The rollout's is
  every model pass reading the gathered weights (FSDP: each chip holds all of a layer's weights
  while it runs it) and each decode pass reading this chip's share of the KV cache
  (``flops.decode_bytes``), plus ``num_steps`` denoising passes over the weights.
  """
  chip = topo.chip
  compute_s = analytic["executed"][name] / (topo.num_chips * chip.peak_flops)
  if name == "train_step":
    o = config.optim
    traffic = cost["bytes_accessed"] * o.ppo_epochs * o.num_minibatches * o.grad_accum
  else:
    d = analytic["decode_bytes"]
    traffic = ((d["passes"] + config.rollout.num_steps) * d["weight_bytes_per_pass"]
               + (d["passes"] - 1) * d["kv_cache_bytes"] / topo.num_chips)
  return compute_s, traffic / chip.hbm_bandwidth


def decode_hints(config) -> dict:
  """{condition bound: trips} of the rollout's decode loops, which XLA cannot count (they stop
  early when every row is done): one ``while`` per attention window (``text.decode``), window j
  running steps [last_{j-1}, last_j) with last_j = min(T, W_j - P); worst case, all T steps."""
  from unigrpo_jax.rollout import text
  p, t = config.data.max_prompt_len, config.rollout.max_reasoning_len
  hints, done = {}, 0
  for width in text.attention_windows(p, t, p + t + 1):
    last = min(t, width - p)
    hints[last], done = last - done, last
  return hints


def _time_entry(name, compiled_text, cost, topo, config, analytic, coords) -> dict:
  """The program's three-term time model (``time_model``) and its communication by loop."""
  compute_s, hbm_analytic_s = _roofline(name, cost, topo, config, analytic)
  tm = time_model.analyze(compiled_text, topo.chip, coords,
                          decode_hints(config) if name == "rollout" else None)
  # HBM: the HLO's own traffic with every loop counted its trip count times (XLA's "bytes
  # accessed" counts a loop body once; ``_roofline``'s estimate is kept as hbm_analytic_s).
  hbm_s = tm["hlo_costs"]["bytes"] / topo.chip.hbm_bandwidth
  out = {"roofline_s": max(compute_s, hbm_analytic_s),
         "time_model": {**time_model.terms(compute_s, hbm_s, tm["ici_s"]),
                        "hbm_analytic_s": hbm_analytic_s,
                        "loops_bound_s": tm["loops_bound_s"],
                        "hlo_flops_per_chip": tm["hlo_costs"]["flops"],
                        "hlo_hbm_bytes_per_chip": tm["hlo_costs"]["bytes"]},
         "comm": tm["comm"]}
  decode = [lp for lp in tm["comm"]["loops"].values() if lp["trip_source"] == "hint"]
  if decode:  # bytes and time of one decode step (the largest window's, per chip)
    step = max(decode, key=lambda lp: lp["per_iteration_total"])
    out["decode_step"] = {"steps": sum(lp["trips"] for lp in decode),
                          "collective_bytes": step["per_iteration_bytes"],
                          "collective_bytes_total": step["per_iteration_total"],
                          "wire_bytes": step["per_iteration_wire_bytes"],
                          "collectives": step["collectives_per_iteration"],
                          "time": step["time_per_iteration"]}
  return out


def _oom_entry(error, args, topo, seconds, flops) -> dict:
  """Report entry of a program the TPU compiler refused for lack of HBM."""
  need = memory.parse_oom(str(error))
  total = need["required"] or 0
  return {"bytes_per_chip": {"total": total, "compiler_message": str(error)[:4000]},
          "flops": flops, "compile_s": round(seconds, 2), "fits": False,
          "headroom": 1.0 - total / topo.chip.hbm_bytes,
          "over_by_bytes": total - topo.chip.hbm_bytes if total else None,
          "largest_temporaries": [], "largest_arguments": memory.largest_arguments(args)}


def abstract_inputs(config, programs, params_abstract, state_abstract, ocfg, mesh):
  """ShapeDtypeStructs (with shardings) of both programs' arguments, as the trainer passes them:
  prompts in ``programs.prompt_sharding``; trajectory and advantages in the batch sharding."""
  bp, p = config.rollout.prompts_per_batch, config.data.max_prompt_len
  repl = parallel.replicated(mesh)
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=repl)
  tokens = jax.ShapeDtypeStruct((bp, p), jnp.int32, sharding=programs.prompt_sharding)
  mask = jax.ShapeDtypeStruct((bp, p), jnp.bool_, sharding=programs.prompt_sharding)
  rollout_args = (state_abstract.params, tokens, mask, key)
  traj = jax.eval_shape(programs.rollout, *rollout_args)
  traj = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                     sharding=programs.batch_sharding), traj)
  rows = bp * config.rollout.group_size
  adv = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=programs.batch_sharding)
  # LoRA: the reference is the frozen base inside the train state (no second copy).
  ref = (params_abstract if ocfg.needs_reference and not lora.has_adapters(params_abstract)
         else None)
  return {"rollout": rollout_args, "train_step": (state_abstract, ref, traj, adv, key)}


def plan(config: ml_collections.ConfigDict, topology_name: str,
         programs: Sequence[str] = PROGRAMS, log=print) -> dict:
  """Compiles ``programs`` of ``config`` for the slice ``topology_name``; returns the report.

  Raises ValueError (bad config, unknown topology, mesh or batch that does not divide the slice)
  or RuntimeError (libtpu missing) before compiling anything.
  """
  config_validation.validate(config)
  topo = topology.parse(topology_name)
  for name in programs:
    if name not in PROGRAMS:
      raise ValueError(f"unknown program {name!r}; known: {PROGRAMS}")
  tokenizer = shapeworld_tokenizer()
  model_cfg = _model_config(config, tokenizer)
  rcfg = build.rollout_config(config, tokenizer)
  ocfg, optcfg = build.objective_config(config, tokenizer), build.optim_config(config)
  devices = topology.devices(topo)
  mesh, rules = build.mesh_and_rules(config, devices)
  coords = [getattr(d, "coords", None) for d in mesh.devices.flat]
  coords = coords if all(c is not None for c in coords) else None
  bp = config.rollout.prompts_per_batch
  rows = bp * config.rollout.group_size
  n_mb = config.optim.num_minibatches * config.optim.grad_accum
  if rows % n_mb:
    raise ValueError(f"rollout batch {rows} is not divisible by num_minibatches * grad_accum = "
                     f"{n_mb}")
  log(f"{topo.name}: {topo.num_chips} {topo.chip.generation} chips ({topo.topology_name}), "
      f"mesh {dict(mesh.shape)}, {topo.chip.hbm_bytes / 1e9:.2f} GB usable HBM per chip")

  graphdef, abstract = nnx.split(abstract_model(model_cfg))
  params_abstract = _with_sharding(abstract, parallel.state_shardings(abstract, mesh, rules))
  state_abstract = abstract_train_state(params_abstract, ocfg, optcfg, mesh, rules)
  autoencoder, autoencoder_note = _autoencoder(model_cfg)
  progs = build.build_programs(config, graphdef, params_abstract, model_cfg, mesh, rules,
                                 rcfg, ocfg, optcfg, autoencoder)
  t0 = time.perf_counter()
  # This traces the rollout (its output shapes are the train step's inputs): that tracing is
  # part of the rollout's compile, which then reuses the trace.
  args = abstract_inputs(config, progs, params_abstract, state_abstract, ocfg, mesh)
  traced_before = {"rollout": time.perf_counter() - t0}
  analytic = _analytic(config, model_cfg, ocfg)
  n_params = count_params(nnx.split_state(abstract, nnx.Param, ...)[0])
  report = {"topology": topo.name, "topology_name": topo.topology_name,
            "num_chips": topo.num_chips, "chip": topo.chip.generation,
            "hbm_bytes_per_chip": topo.chip.hbm_bytes, "mesh": dict(mesh.shape),
            "params": n_params, "model": {"num_layers": model_cfg.num_layers,
                                          "dtype": model_cfg.dtype,
                                          "param_dtype": model_cfg.param_dtype,
                                          "remat": model_cfg.remat,
                                          "remat_policy": model_cfg.remat_policy,
                                          "scan_layers": model_cfg.scan_layers,
                                          "attention_impl": model_cfg.attention_impl},
            "batch": {"prompts": bp, "rows": rows, "prompt_len": config.data.max_prompt_len,
                      "reasoning_len": config.rollout.max_reasoning_len,
                      "num_steps": config.rollout.num_steps,
                      "window_size": config.rollout.window_size},
            "autoencoder": autoencoder_note, "programs": {}}
  fn = {"rollout": progs.rollout, "train_step": progs.train_step}
  # Python tracing holds the GIL, so the programs are lowered one after another; XLA's TPU
  # compile releases it and generates kernels on a thread pool, yet alone a second core makes
  # one program only 1.7-1.8x faster (v6e-8 one-host plan, idle 2-core VM: train step 353 s on
  # one core, 211 s on two). So the programs compile side by side (v6e-8: 336 s for both
  # instead of 211 + 194 s one after another).
  lowered, lower_s, started = {}, {}, {}
  for name in programs:
    log(f"tracing and lowering {name} ...")
    started[name] = time.perf_counter() - traced_before.get(name, 0.0)
    lowered[name] = fn[name].lower(*args[name])  # Python tracing + StableHLO
    lower_s[name] = time.perf_counter() - started[name]
    log(f"  {name}: traced and lowered in {lower_s[name]:.1f} s")
  workers = max(1, min(len(programs), os.cpu_count() or 1))
  log(f"XLA compile of {', '.join(programs)} ({workers} at a time) ...")

  def compile_one(name):  # -> (compiled or None, out-of-memory error or None, XLA seconds)
    t = time.perf_counter()
    try:
      return lowered.pop(name).compile(), None, time.perf_counter() - t
    except Exception as e:  # the TPU compiler itself refuses what cannot fit: report it
      if not memory.is_oom(e):
        raise
      return None, e, time.perf_counter() - t

  with futures.ThreadPoolExecutor(max_workers=workers) as pool:
    results = {name: pool.submit(compile_one, name) for name in programs}
    results = {name: r.result() for name, r in results.items()}
  # What the user waits for: tracing, lowering and the side-by-side compiles.
  report["compile_wall_s"] = round(time.perf_counter() - t0, 2)
  for name in programs:
    compiled, error, xla_s = results.pop(name)
    compile_s = lower_s[name] + xla_s
    if error is not None:
      report["programs"][name] = _oom_entry(error, args[name], topo, compile_s, analytic[name])
      log(f"{name} does not fit: {str(error).splitlines()[0][:300]}")
      continue
    log(f"  {name}: compiled in {compile_s:.1f} s")
    mem, cost = memory.memory_stats(compiled), memory.cost_stats(compiled)
    fits = mem["total"] <= topo.chip.hbm_bytes
    text = compiled.as_text()
    entry = {"bytes_per_chip": mem, "flops": analytic[name],
             "executed_flops": analytic["executed"][name],
             "xla_flops_per_chip": cost["flops"],
             "xla_bytes_accessed_per_chip": cost["bytes_accessed"],
             **_time_entry(name, text, cost, topo, config, analytic, coords),
             "compile_s": round(compile_s, 2), "lower_s": round(lower_s[name], 2),
             "fits": bool(fits),
             "headroom": 1.0 - mem["total"] / topo.chip.hbm_bytes}
    if not fits:
      entry["over_by_bytes"] = mem["total"] - topo.chip.hbm_bytes
      entry["largest_temporaries"] = memory.largest_values(text)
      entry["largest_arguments"] = memory.largest_arguments(args[name])
    report["programs"][name] = entry
    del compiled
  timed = [p["time_model"] for p in report["programs"].values() if "time_model" in p]
  report["step_bound_s"] = sum(t["bound_s"] for t in timed)  # lower bound per UniGRPO step
  report["fits"] = all(p["fits"] for p in report["programs"].values())
  return report


def format_report(report: dict) -> str:
  """A human-readable table of ``plan``'s report."""
  gb = lambda b: f"{b / 1e9:8.2f}"
  hbm = report["hbm_bytes_per_chip"]
  lines = [f"{report['topology']} ({report['topology_name']}): {report['num_chips']} "
           f"{report['chip']} chips, mesh {report['mesh']}, {report['params'] / 1e9:.3f} B params, "
           f"usable HBM {hbm / 1e9:.2f} GB/chip",
           f"{'program':<11} {'args':>8} {'outputs':>8} {'temps':>8} {'aliased':>8} "
           f"{'total':>8}  {'fits':<4} {'headroom':>8} {'TFLOP/call':>11} {'roofline s':>10} "
           f"{'compile s':>9}"]
  for name, p in report["programs"].items():
    m = p["bytes_per_chip"]
    if "compiler_message" in m:  # refused by the compiler: only its total is known
      lines.append(f"{name:<11} {'':>8} {'':>8} {'':>8} {'':>8} {gb(m['total'])}  NO   "
                   f"{100 * p['headroom']:7.1f}% {p['flops'] / 1e12:11.2f} {'':>10} "
                   f"{p['compile_s']:9.1f}")
      continue
    lines.append(f"{name:<11} {gb(m['arguments'])} {gb(m['outputs'])} {gb(m['temporaries'])} "
                 f"{gb(m['aliased'])} {gb(m['total'])}  {'yes' if p['fits'] else 'NO':<4} "
                 f"{100 * p['headroom']:7.1f}% {p['flops'] / 1e12:11.2f} "
                 f"{p['roofline_s']:10.3f} {p['compile_s']:9.1f}")
  lines.append("(GB per chip; FLOPs are model FLOPs per call over all chips; roofline = max of "
               "FLOPs at peak bf16 and HBM traffic at peak bandwidth)")
  if "compile_wall_s" in report:
    lines.append(f"compile: {report['compile_wall_s']:.1f} s wall for tracing, lowering and the "
                 "programs' XLA compiles side by side")
  lines += time_model.format_lines(report)
  for name, p in report["programs"].items():
    if p["fits"]:
      continue
    if "compiler_message" in p["bytes_per_chip"]:
      lines.append(f"{name} does NOT fit (the TPU compiler refused it): "
                   f"{p['bytes_per_chip']['compiler_message'][:2000]}")
    else:
      lines.append(f"{name} does NOT fit: needs {p['bytes_per_chip']['total'] / 1e9:.2f} GB, "
                   f"{p['over_by_bytes'] / 1e9:.2f} GB over.")
    lines.append("  largest temporaries (per chip):")
    for v in p["largest_temporaries"]:
      lines.append(f"  {v['bytes'] / 1e9:8.3f} GB  {v['shape']:<28} {v['opcode']:<14} "
                   f"{v['op_name'][-90:]}")
    lines.append("  largest argument shards (per chip):")
    for a in p["largest_arguments"]:
      lines.append(f"  {a['bytes'] / 1e9:8.3f} GB  {a['dtype']}{a['shape']}  {a['path'][:90]}")
  return "\n".join(lines)
