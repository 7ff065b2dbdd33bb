"""Paper Fig. 5 on a reward the images can game: ShapeWorld plus JPEG compressibility.

    python -m unigrpo_jax.main --config=configs/ablations/hackable.py:velocity_mse --workdir=...
    python -m unigrpo_jax.main --config=configs/ablations/hackable.py:latent_kl --workdir=...
    python -m unigrpo_jax.main --config=configs/ablations/hackable.py:none --workdir=...

The reward is ``shapeworld + 1.5 * jpeg_compressibility`` (negative kB of a quality-95 JPEG).
On the 32 px world a blank image takes 0.64 kB and a typical warm-start image ~1.2 kB, so
going blank earns +0.9 of JPEG reward and costs the ~0.66 of ShapeWorld partial credit: a
policy that follows the training reward far enough hacks it. The held-out evaluation scores
ShapeWorld alone, and the hacking monitor's ``hack/blank_frac`` and ``hack/saturation`` show
the images drifting. Only the image policy trains (the text policy is frozen), so what the
images do is the image policy's and its regulariser's doing.
"""
from configs import shapes_cpu

JPEG_WEIGHT = 1.5
REGULARIZERS = {"velocity_mse": 1.5e-5, "latent_kl": 0.04, "none": 0.0}  # name -> weight


def get_config(regularizer: str = "velocity_mse"):
  if regularizer not in REGULARIZERS:
    raise ValueError(f"hackable.py:{regularizer}: choose one of {sorted(REGULARIZERS)}")
  c = shapes_cpu.get_config()
  c.rewards.jpeg_compressibility = JPEG_WEIGHT
  c.objective.train_text = False
  c.objective.regularizer = regularizer
  c.objective.reg_weight = REGULARIZERS[regularizer]
  return c
