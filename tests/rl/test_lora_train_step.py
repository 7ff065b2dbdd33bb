"""The train step with LoRA: gradients reach only the adapters, the optimizer holds moments for
the adapters only, and the velocity-MSE reference is the frozen base (no reference passed)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unigrpo_jax import parallel as par
from unigrpo_jax.models.autoencoder import PatchAutoencoder
from unigrpo_jax.models.unified import lora, lora_io
from unigrpo_jax.models.unified.config import get_preset
from unigrpo_jax.models.unified.model import UnifiedModel
from unigrpo_jax.rl import objective, optim
from unigrpo_jax.rl import train_step as ts
from unigrpo_jax.rollout.program import RolloutConfig, make_rollout

STOP, PAD, VS = 1, 0, 2
FAST = {"xla_backend_optimization_level": 0}


def _flat(state):
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_only_adapters_move_and_the_base_is_the_reference():
  mesh = par.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  base_cfg = get_preset("tiny")
  graphdef, base = par.create_sharded_model(base_cfg, 0, mesh, model_fn=UnifiedModel,
                                            compiler_options=FAST)
  kernel = base["latent_io"]["llm2vae_kernel"]  # zero-initialised: every velocity would be 0
  kernel.set_value(0.1 * jax.random.normal(jax.random.key(1), kernel.get_value().shape))
  cfg = base_cfg.replace(lora_rank=4, lora_alpha=8.0)
  graphdef, params = lora_io.with_adapters((graphdef, base), cfg, seed=1, mesh=mesh)
  rcfg = RolloutConfig(group_size=4, max_reasoning_len=5, stop_id=STOP, pad_id=PAD,
                       vision_start_id=VS, num_steps=4, noise_level=0.8, window_range=(0, 3),
                       window_size=2)
  rollout = make_rollout(graphdef, rcfg, PatchAutoencoder.for_model(cfg))
  prompts = jax.random.randint(jax.random.key(2), (2, 4), 3, cfg.vocab_size)
  mask = jnp.ones((2, 4), bool)
  traj = rollout.lower(params, prompts, mask, jax.random.key(3)).compile(FAST)(
      params, prompts, mask, jax.random.key(3))
  adv = jnp.array([1.0, -0.5, 0.3, -0.8, 1.2, -1.1, 0.4, -0.5], jnp.float32)
  obj = objective.ObjectiveConfig(vision_start_id=VS, pad_id=PAD, noise_level=0.8,
                                  regularizer="velocity_mse", reg_weight=0.5)
  assert obj.needs_reference
  opt = optim.OptimConfig(ppo_epochs=2, num_minibatches=2, lr_und=1e-2, lr_gen=1e-2)
  state = ts.init_train_state(params, obj, opt, mesh, compiler_options=FAST)
  # Moments exist for the adapters only: the optimizer state is the adapters' size x 2 (+ counts).
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert n_opt == 2 * lora.adapter_count(params)
  step = ts.make_train_step(graphdef, params, obj, opt, mesh, compiler_options=FAST)
  before = _flat(params)
  new_state, metrics = step(state, None, traj, adv, jax.random.key(5))  # no reference copy
  after = _flat(new_state.params)
  adapters = {k for k, v in nnx.to_flat_state(params) if isinstance(v, nnx.LoRAParam)}
  moved = {k for k in before if not np.array_equal(before[k], after[k])}
  assert moved and moved <= {".".join(map(str, k)) for k in adapters}
  assert any(k.endswith("_b") for k in moved)  # B leaves zero: the adapters learn
  assert float(metrics["onpolicy/flow_logp_maxdiff"]) < 1e-5  # rollout == train forward
  # The reference is the base, not the moving policy: 0 before the first update (B = 0), then
  # positive once the adapters have moved (a reference tracking the policy would stay 0).
  assert float(metrics["onpolicy/flow/velocity_mse"]) == 0.0
  assert float(metrics["reg/velocity_mse"]) > 0.0
