"""Second warm-start stage: the first stage continued for 600 SFT steps whose images are drawn
from a nearby WRONG scene 30 % of the time while the trace is kept [ours, issue #22]. Its result
is the shipped ``package://shapes_sft``.

The first stage (``configs/shapes_sft.py``) draws every image from the scene its trace names, so
a group's images pass or fail together (the same blurred third object, the same unplaced
relation) and the image policy gets almost no GRPO signal. After this stage the image expert
draws the trace's scene most of the time but not always: the image-side analogue of the 30 %
wrong traces, and a mistake one SDE window can fix (docs/results.md).

    python -m unigrpo_jax.main --config=configs/shapes_sft.py --workdir=runs/sft   # ~15 min
    python -m unigrpo_jax.main --config=configs/shapes_sft_images.py --workdir=runs/sft_images
    # -> runs/sft_images/model (the shipped unigrpo_jax/assets/shapes_sft was made this way,
    #    from the earlier shipped first-stage checkpoint, 2026-12-06)
"""
from configs import shapes_sft


def get_config():
  c = shapes_sft.get_config()
  c.init_checkpoint = "runs/sft/model"  # the first stage's output
  c.sft.steps = 600
  c.sft.warmup_steps = 50
  c.sft.learning_rate = 3e-4
  c.sft.save_every = 200
  c.sft.wrong_image_prob = 0.15
  return c
