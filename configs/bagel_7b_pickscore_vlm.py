"""BAGEL-7B-MoT UniGRPO with PickScore (in-process, JAX) plus a VLM judge (HTTP), on GenEval.

An example of the reward setup; see docs/rewards.md. It is based on ``config_defaults.base()``
rather than ``configs/bagel_7b.py`` (written on another branch): once that lands, start from
its ``get_config()`` instead and keep only the reward lines below.

  export VLM_JUDGE_TOKEN=...   # if the judge endpoint wants a bearer token
  python -m unigrpo_jax.main --config=configs/bagel_7b_pickscore_vlm.py --workdir=runs/bagel \
      --config.remote_rewards.vlm_judge.url=http://JUDGE_HOST:8000/v1/chat/completions

The judge: any OpenAI-compatible server, e.g.
  vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 8000
"""
from unigrpo_jax import config_defaults


def get_config():
  c = config_defaults.base()
  c.model.preset = "bagel_7b_mot"
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.rollout.group_size = 24  # [paper]
  c.rollout.num_steps = 25  # [paper]
  c.data.prompt_file = "package://geneval/evaluation_metadata.jsonl"  # GenEval's 553 prompts
  c.data.max_prompt_len = 64

  # reward = 1.0 * PickScore + 0.5 * judge score in [0, 1]. PickScore runs next to the policy
  # (rewards/pickscore, another branch); the judge runs behind HTTP.
  c.rewards = {"pickscore": 1.0, "vlm_judge": 0.5}
  j = c.remote_rewards.vlm_judge
  j.url = "http://127.0.0.1:8000/v1/chat/completions"  # override on the command line
  j.model = "Qwen/Qwen2.5-VL-7B-Instruct"
  j.token_env = "VLM_JUDGE_TOKEN"
  j.max_in_flight = 32  # one request per image: 768 images a step want many in flight
  j.timeout_s = 120.0
  j.max_failed_fraction = 0.05
  c.total_steps = 1000
  c.eval_every = 50
  c.checkpoint_every = 50
  return c
