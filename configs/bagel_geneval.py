"""BAGEL-7B-MoT UniGRPO with GenEval's detector as the reward, evaluated per GenEval category.

The paper's Table 3 settings (``configs/bagel_7b.py``) with:
- reward: ``geneval``, GenEval's object detector behind the reward protocol (docs/rewards.md);
  every prompt must carry GenEval metadata (``tag``, ``include``, ``exclude``);
- training prompts: a GenEval-format JSONL of your own (``--config.data.prompt_file``), e.g.
  the generated training set Flow-GRPO uses; they must not overlap the evaluation prompts;
- evaluation: GenEval's 553 prompts (``package://geneval/evaluation_metadata.jsonl``), reported
  as ``eval/geneval/<category>`` accuracy (the detector's per-image ``correct`` detail) and
  ``eval/geneval/overall`` (the mean over the six categories, GenEval's summary score).

  python -m unigrpo_jax.main --config=configs/bagel_geneval.py \\
      --config.init_checkpoint=/path/to/BAGEL-7B-MoT \\
      --config.data.prompt_file=/path/to/geneval_train.jsonl \\
      --config.remote_rewards.geneval.url=http://DETECTOR_HOST:8000/score --workdir=gs://B/run

The prompts need BAGEL's Qwen2.5 tokenizer (the directory's ``tokenizer.json``): the toy
ShapeWorld tokenizer rejects GenEval's words ("photo") with an error naming the line.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import bagel_7b  # noqa: E402


def get_config():
  c = bagel_7b.get_config()
  c.data.prompt_file = ""  # required: GenEval-format training prompts (JSONL with metadata)
  c.data.eval_prompt_file = "package://geneval/evaluation_metadata.jsonl"  # GenEval's 553
  c.rewards = {"geneval": 1.0}
  g = c.remote_rewards.geneval
  g.url = ""  # required: the detector server's /score URL
  g.chunk_size = 16  # 1024 px PNGs are ~1-3 MB each: 16 per request
  g.max_in_flight = 8
  g.timeout_s = 300.0
  g.total_timeout_s = 900.0
  g.max_response_bytes = 1 << 20
  return c
