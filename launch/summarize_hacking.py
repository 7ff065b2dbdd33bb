"""Fig. 5 in miniature: table and picture from the hackable-reward runs (launch/hacking.sh).

python launch/summarize_hacking.py runs/hacking   # expects runs/hacking/<regulariser>/seed<k>/

Per regulariser, the mean over seeds at the start -> at the end ± the end's sample std (ddof 1)
over seeds, of:
  * the training reward (ShapeWorld + w x JPEG compressibility) and its two components, the mean
    of the first and of the last ``WINDOW`` steps (one step's reward is noisy);
  * the held-out ShapeWorld evaluation (reward and strict accuracy) at step 0 and at the end;
  * the hacking monitor's image statistics over the last ``WINDOW`` steps: mean saturation and
    the fraction of blank images (unigrpo_jax/trainers/hacking_monitor.py).
The picture (hacking_curves.png) has four panels over steps, one line per regulariser: training
reward, JPEG component (negative kB), mean saturation, held-out strict accuracy.
"""
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # launch/, run as a script or not
from summarize import pyplot, rows, write_table  # noqa: E402

WINDOW = 10
ORDER = ("velocity_mse", "latent_kl", "none")
JPEG = "train/reward_component/jpeg_compressibility"
SHAPES = "train/reward_component/shapeworld"


def _cell(values, fmt="{:.3f}"):
  x = np.asarray(values, np.float64)
  std = np.std(x, ddof=1) if len(x) > 1 else 0.0
  return f"{fmt.format(x.mean())} ± {fmt.format(std)}"


def run_summary(data: list[dict]) -> dict | None:
  """Scalars of one run (None while it has fewer than two evaluations)."""
  train = [r for r in data if "train/reward_mean" in r]
  evals = [r for r in data if "eval/reward_mean" in r]
  if len(evals) < 2 or len(train) < 2 * WINDOW:
    return None
  first, last = train[:WINDOW], train[-WINDOW:]
  mean = lambda rs, k: float(np.mean([r[k] for r in rs]))
  return {
      "reward_first": mean(first, "train/reward_mean"), "reward_last": mean(last, "train/reward_mean"),
      "jpeg_first": mean(first, JPEG), "jpeg_last": mean(last, JPEG),
      "shapes_first": mean(first, SHAPES), "shapes_last": mean(last, SHAPES),
      "eval_first": evals[0]["eval/reward_mean"], "eval_last": evals[-1]["eval/reward_mean"],
      "strict_first": evals[0]["eval/strict_accuracy"],
      "strict_last": evals[-1]["eval/strict_accuracy"],
      "saturation_first": mean(first, "hack/saturation"),
      "saturation_last": mean(last, "hack/saturation"),
      "blank_last": mean(last, "hack/blank_frac"), "steps": train[-1]["step"],
  }


def table(summaries: dict) -> list[str]:
  """Markdown rows: one per regulariser, each cell 'first -> last ± std', means over seeds (the
std of the last value over seeds)."""
  out = ["| regulariser | seeds | train reward | JPEG (-kB) | ShapeWorld (train) | "
         "held-out reward | held-out strict | saturation | blank frac (last) |",
         "|---|---|---|---|---|---|---|---|---|"]
  for name in [n for n in ORDER if n in summaries] + sorted(set(summaries) - set(ORDER)):
    runs = summaries[name]
    pair = lambda k: (f"{np.mean([r[k + '_first'] for r in runs]):.3f} -> "
                      f"{_cell([r[k + '_last'] for r in runs])}")
    out.append(f"| {name} | {len(runs)} | {pair('reward')} | {pair('jpeg')} | {pair('shapes')} | "
               f"{pair('eval')} | {pair('strict')} | {pair('saturation')} | "
               f"{_cell([r['blank_last'] for r in runs])} |")
  return out


def main(root):
  summaries, curves = {}, {}
  for path in sorted(glob.glob(os.path.join(root, "*", "seed*", "metrics.jsonl"))):
    name, seed = path.split(os.sep)[-3], path.split(os.sep)[-2]
    data = rows(path)
    summary = run_summary(data)
    if summary is None:
      print(f"skipped {name}/{seed}: unfinished")
      continue
    summaries.setdefault(name, []).append(summary)
    curves.setdefault(name, []).append(data)
  if not summaries:
    sys.exit(f"no finished runs under {root}/<regulariser>/seed<k>/metrics.jsonl")
  lines = table(summaries)
  lines += ["", f"train columns: mean of the first -> last {WINDOW} steps; held-out columns: "
            "step 0 -> last evaluation (ShapeWorld alone)."]
  write_table(root, lines)
  plt = pyplot()
  if plt is None:
    return
  panels = (("train/reward_mean", "train reward (ShapeWorld + w x JPEG)"),
            (JPEG, "JPEG component (-kB, before the weight)"),
            ("hack/saturation", "mean saturation of rollout images"),
            ("eval/strict_accuracy", "held-out strict accuracy"))
  fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
  for ax, (key, label) in zip(axes, panels):
    for name in [n for n in ORDER if n in curves] + sorted(set(curves) - set(ORDER)):
      runs = [[(r["step"], r[key]) for r in data if key in r] for data in curves[name]]
      length = min(len(r) for r in runs)
      steps = np.array([s for s, _ in runs[0][:length]])
      vals = np.array([[v for _, v in r[:length]] for r in runs])
      if key.startswith("train") or key.startswith("hack"):  # smooth the per-step noise
        kernel = np.ones(min(5, length)) / min(5, length)
        vals = np.array([np.convolve(v, kernel, mode="valid") for v in vals])
        steps = steps[len(steps) - vals.shape[1]:]
      mean, std = vals.mean(0), vals.std(0)
      ax.plot(steps, mean, marker="o" if key.startswith("eval") else None, markersize=3,
              label=f"{name} ({len(runs)} seeds)")
      ax.fill_between(steps, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("step")
    ax.set_title(label, fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  plt.savefig(os.path.join(root, "hacking_curves.png"), dpi=120)
  print(f"wrote {os.path.join(root, 'table.md')} and hacking_curves.png")


if __name__ == "__main__":
  main(sys.argv[1])
