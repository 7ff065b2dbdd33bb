"""Second warm-start stage: the shipped ``shapes_sft`` continued for 600 SFT steps whose images
are drawn from a nearby WRONG scene 30 % of the time while the trace is kept [ours, issue #22].

The first stage (``configs/shapes_sft.py``) draws every image from the scene its trace names, so
a group's images pass or fail together and the image policy gets almost no GRPO signal. After
this stage the image expert draws the trace's scene most of the time but not always: the
image-side analogue of the 30 % wrong traces.

    python -m unigrpo_jax.main --config=configs/shapes_sft_images.py --workdir=runs/sft_images
"""
from configs import shapes_sft


def get_config():
  c = shapes_sft.get_config()
  c.init_checkpoint = "package://shapes_sft"
  c.sft.steps = 600
  c.sft.warmup_steps = 50
  c.sft.learning_rate = 3e-4
  c.sft.save_every = 200
  c.sft.wrong_image_prob = 0.3
  return c
