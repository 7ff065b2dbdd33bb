"""tensorflow-datasets builder for ShapeWorld (offline: everything is generated).

Examples of split s are pipeline.task_for(s, i) for i < size, with the image
shapeworld.render(spec, seed=i) -- the same prompt-hash train/test split as the grain
source. Sizes come from the BuilderConfig:

  builder = ShapeWorld(data_dir=d, config=ShapeWorldConfig(name="tiny", train_size=8,
                                                          test_size=4))
  builder.download_and_prepare(); ds = builder.as_dataset(split="test")
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from unigrpo_jax.data import pipeline
from unigrpo_jax.data.shapeworld import world as sw
from unigrpo_jax.data.shapeworld.render import render

IMAGE_SIZE = 32


@dataclasses.dataclass
class ShapeWorldConfig(tfds.core.BuilderConfig):
  train_size: int = 20_000
  test_size: int = 2_000
  image_size: int = IMAGE_SIZE


class ShapeWorld(tfds.core.GeneratorBasedBuilder):
  """ShapeWorld reasoning-to-image tasks with a rendered reference image."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ShapeWorldConfig(name="default", description="20k train / 2k test tasks at 32x32."),
      ShapeWorldConfig(name="tiny", train_size=64, test_size=16,
                       description="Small split sizes for tests and smoke runs."),
  ]
  DEFAULT_CONFIG_NAME = "default"

  # Nothing is downloaded, so there is no checksums file to locate. The base class's
  # lookup needs the `importlib_resources` backport, which tfds 4.9.10 does not declare.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "prompt": tfds.features.Text(),
            "reasoning": tfds.features.Text(),
            "category": tfds.features.Text(),
            "spec": tfds.features.Text(),  # shapeworld.Spec.to_json()
            "image": tfds.features.Image(shape=(s, s, 3)),  # uint8
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=None,
        homepage=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    return {"train": self._generate_examples("train", cfg.train_size),
            "test": self._generate_examples("test", cfg.test_size)}

  def _generate_examples(self, split: str, size: int):
    for i in range(size):
      task = pipeline.task_for(split, i)
      rec = pipeline.task_record(task, i)
      rec["image"] = render(task.spec, seed=i, size=self.builder_config.image_size)
      yield i, rec
