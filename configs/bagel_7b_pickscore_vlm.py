"""BAGEL-7B-MoT UniGRPO with PickScore (in-process, JAX) plus a VLM judge (HTTP), on GenEval.

An example of the reward setup on top of ``configs/bagel_7b.py`` (the paper's Table 3
settings); see docs/rewards.md.

  export VLM_JUDGE_TOKEN=...   # if the judge endpoint wants a bearer token
  python -m unigrpo_jax.main --config=configs/bagel_7b_pickscore_vlm.py --workdir=runs/bagel \
      --config.init_checkpoint=/path/to/BAGEL-7B-MoT \
      --config.reward_models.pickscore_dir=/path/to/PickScore_v1 \
      --config.remote_rewards.vlm_judge.url=http://JUDGE_HOST:8000/v1/chat/completions

The judge: any OpenAI-compatible server, e.g.
  vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 8000
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import bagel_7b  # noqa: E402


def get_config():
  c = bagel_7b.get_config()
  # Training prompts: GenEval's 553 (free text with metadata); evaluation on your own held-out
  # prompt file (--config.data.eval_prompt_file), which must not overlap them.
  c.data.prompt_file = "package://geneval/evaluation_metadata.jsonl"

  # reward = 1.0 * PickScore + 0.5 * judge score in [0, 1]. PickScore runs next to the policy
  # (rewards/clip.py, in JAX on the same chips); the judge runs behind HTTP.
  c.rewards = {"pickscore": 1.0, "vlm_judge": 0.5}
  j = c.remote_rewards.vlm_judge
  j.url = "http://127.0.0.1:8000/v1/chat/completions"  # override on the command line
  j.model = "Qwen/Qwen2.5-VL-7B-Instruct"
  j.token_env = "VLM_JUDGE_TOKEN"
  j.max_in_flight = 32  # one request per image: 768 images a step want many in flight
  j.timeout_s = 120.0
  j.max_failed_fraction = 0.05
  return c
