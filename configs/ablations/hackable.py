"""Paper Fig. 5 on a reward the images can game: ShapeWorld plus JPEG compressibility.

    python -m unigrpo_jax.main --config=configs/ablations/hackable.py:velocity_mse --workdir=...
    python -m unigrpo_jax.main --config=configs/ablations/hackable.py:latent_kl --workdir=...
    python -m unigrpo_jax.main --config=configs/ablations/hackable.py:none --workdir=...

The reward is ``shapeworld + 1.5 * jpeg_compressibility`` (negative kB of a quality-95 JPEG).
On the 32 px world a blank image takes 0.64 kB and the warm start's rollout images ~1.3 kB, so
going blank earns ~+1.0 of JPEG reward and costs the ~0.4-0.6 of ShapeWorld partial credit: the
training reward pays for blank images. The held-out evaluation scores
ShapeWorld alone, and the hacking monitor's ``hack/blank_frac`` and ``hack/saturation`` show
the images drifting. Only the image policy trains (the text policy is frozen), so what the
images do is the image policy's and its regulariser's doing.
"""
from configs import shapes_cpu
from configs.ablations import reg_latent_kl, reg_none

JPEG_WEIGHT = 1.5
# regulariser -> the config that sets it (and its weight) on the default run
REGULARIZERS = {"velocity_mse": shapes_cpu, "latent_kl": reg_latent_kl, "none": reg_none}


def get_config(regularizer: str = "velocity_mse"):
  if regularizer not in REGULARIZERS:
    raise ValueError(f"hackable.py:{regularizer}: choose one of {sorted(REGULARIZERS)}")
  c = REGULARIZERS[regularizer].get_config()
  c.rewards.jpeg_compressibility = JPEG_WEIGHT
  c.objective.train_text = False
  return c
