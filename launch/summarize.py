"""Results table (markdown) and reward-curve picture from ablation run directories.

python launch/summarize.py runs/ablations   # expects runs/ablations/<variant>/seed<k>/metrics.jsonl

Columns are mean ± sample std (ddof 1) over seeds. The paper's Table 1 targets follow the table:
each comparison "A > B" holds when mean(A) - mean(B) >= 2 x the pooled seed std
sqrt((s_A^2 + s_B^2) / 2) of the held-out eval reward.
"""
import glob
import json
import os
import sys

import numpy as np


def rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_table(root, lines):
  """Prints the markdown ``lines`` and writes them to <root>/table.md."""
  print("\n".join(lines))
  with open(os.path.join(root, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def pyplot():
  """matplotlib.pyplot on the Agg backend, or None (and a line saying so) when not installed."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not installed: no picture")
    return None
  return plt


SFT = "SFT (step 0)"


def _runs(table, name) -> np.ndarray:
  """[runs, 3] (eval reward, strict, reasoning) of a method; SFT once per seed (every variant
  of a seed starts from the same step-0 evaluation)."""
  vals = np.array(table[name])
  return np.unique(vals, axis=0) if name == SFT else vals


def _std(x):
  return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


TARGETS = (("image_only", SFT), ("text_only", SFT),
           ("joint", "text_only"), ("joint", "image_only"))


def targets(table) -> list:
  """Markdown rows of the Table 1 targets on the eval reward (see the module docstring)."""
  out = ["| target | mean difference | 2 x pooled std | holds |", "|---|---|---|---|"]
  for a, b in TARGETS:
    if a not in table or b not in table:
      continue
    ra, rb = _runs(table, a)[:, 0], _runs(table, b)[:, 0]
    diff = ra.mean() - rb.mean()
    bar = 2 * np.sqrt((_std(ra) ** 2 + _std(rb) ** 2) / 2)
    out.append(f"| {a} > {b} | {diff:+.3f} | {bar:.3f} | {'yes' if diff >= bar else 'NO'} |")
  return out


def main(root):
  table, curves, eval_curves, per_seed = {}, {}, {}, []
  for metrics in sorted(glob.glob(os.path.join(root, "*", "seed*", "metrics.jsonl"))):
    variant, seed = metrics.split(os.sep)[-3], metrics.split(os.sep)[-2]
    data = rows(metrics)
    evals = [r for r in data if "eval/reward_mean" in r]
    if len(evals) < 2:
      continue
    first, last = evals[0], evals[-1]
    table.setdefault(SFT, []).append((first["eval/reward_mean"],
                                                 first["eval/strict_accuracy"],
                                                 first["eval/reasoning_accuracy"]))
    table.setdefault(variant, []).append((last["eval/reward_mean"], last["eval/strict_accuracy"],
                                          last["eval/reasoning_accuracy"]))
    per_seed.append(f"| {variant} | {seed} | {first['eval/reward_mean']:.3f} -> "
                    f"{last['eval/reward_mean']:.3f} | {first['eval/strict_accuracy']:.3f} -> "
                    f"{last['eval/strict_accuracy']:.3f} | {first['eval/reasoning_accuracy']:.3f}"
                    f" -> {last['eval/reasoning_accuracy']:.3f} | {last['step']} |")
    eval_curves.setdefault(variant, []).append([(r["step"], r["eval/reward_mean"]) for r in evals])
    curves.setdefault(variant, []).append([(r["step"], r["train/reward_mean"]) for r in data
                                           if "train/reward_mean" in r])
  lines = ["| method | eval reward | strict accuracy | reasoning accuracy | runs |",
           "|---|---|---|---|---|"]
  for name in [SFT, "text_only", "image_only", "joint"]:
    if name not in table:
      continue
    vals = _runs(table, name)
    cells = [f"{vals[:, i].mean():.3f} ± {_std(vals[:, i]):.3f}" for i in range(3)]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(vals)} |")
  lines += ["", *targets(table)]
  lines += ["", "| variant | seed | eval reward | strict accuracy | reasoning accuracy | steps |",
            "|---|---|---|---|---|---|", *per_seed]
  write_table(root, lines)
  plt = pyplot()
  if plt is None:
    return
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  for ax, data, label in ((axes[0], curves, "train reward"),
                          (axes[1], eval_curves, "held-out eval reward")):
    for variant, runs in sorted(data.items()):
      length = min(len(r) for r in runs)
      steps = [s for s, _ in runs[0][:length]]
      mean = np.mean([[v for _, v in r[:length]] for r in runs], axis=0)
      ax.plot(steps, mean, marker="o" if data is eval_curves else None, markersize=3,
              label=f"{variant} ({len(runs)} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{label} (mean over seeds)")
    ax.grid(alpha=0.3)
  axes[1].legend()
  fig.tight_layout()
  plt.savefig(os.path.join(root, "reward_curve.png"), dpi=120)


if __name__ == "__main__":
  main(sys.argv[1])
