"""Paper Fig. 5 on a reward the images can game: ShapeWorld plus JPEG compressibility.

    python -m unigrpo_jax.main --config=configs/ablations/hackable.py:velocity_mse --workdir=...
    python -m unigrpo_jax.main --config=configs/ablations/hackable.py:latent_kl --workdir=...
    python -m unigrpo_jax.main --config=configs/ablations/hackable.py:none --workdir=...
    bash launch/hacking.sh runs/hacking 30      # all three, 5 seeds, then the table and picture

The reward is ``shapeworld + 5 * jpeg_compressibility`` (negative kB of a quality-95 JPEG).
On the 32 px world a blank image takes 0.64 kB and the warm start's rollout images ~1.3 kB, so
a flat, grey image earns up to ~+3 of JPEG reward and costs at most the ~0.4-0.6 of ShapeWorld
partial credit: the training reward pays for washing the images out. Two choices make the hack
reachable in a short run (pilots, seed 0, no regulariser, 40 steps, docs/results.md):
  * weight 5, not 1.5: at 1.5 the ShapeWorld term dominates each group's spread and the JPEG
    size did not move (-1.33 -> -1.35 kB at lr_gen 1e-4);
  * one x_1 per ROW (the default shares one per group): with a shared x_1 a group's images
    share their layout and their JPEG sizes barely differ, so there is no JPEG spread to learn.
The held-out evaluation scores ShapeWorld alone, and the hacking monitor's ``hack/saturation``
and ``hack/blank_frac`` show the images drifting. Only the image policy trains (the text policy
is frozen), so what the images do is the image policy's and its regulariser's doing.
"""
from configs import shapes_cpu
from configs.ablations import reg_latent_kl, reg_none

JPEG_WEIGHT = 5.0
# regulariser -> the config that sets it (and its weight) on the default run
REGULARIZERS = {"velocity_mse": shapes_cpu, "latent_kl": reg_latent_kl, "none": reg_none}


def get_config(regularizer: str = "velocity_mse"):
  if regularizer not in REGULARIZERS:
    raise ValueError(f"hackable.py:{regularizer}: choose one of {sorted(REGULARIZERS)}")
  c = REGULARIZERS[regularizer].get_config()
  c.rewards.jpeg_compressibility = JPEG_WEIGHT
  c.objective.train_text = False
  c.rollout.group_initial_noise = False  # per-row x_1: a JPEG spread inside each group
  return c
