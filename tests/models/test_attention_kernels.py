"""Memory-lean implementations of ``attention.block_attention`` against the dense reference.

"chunked" and "splash" (in the Pallas interpreter) must give the dense "xla" outputs and
gradients; "chunked" must not hold the [N, S + N] scores (CPU compiled temp bytes); "splash" must
AOT-compile for a TPU with far fewer temp bytes than dense (skipped where libtpu cannot load).
"cudnn" needs a GPU: here only its key reordering (through XLA's implementation) and tracing run.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unigrpo_jax import parallel
from unigrpo_jax.aot import topology
from unigrpo_jax.models.unified import attention
from unigrpo_jax.models.unified.config import get_preset

# B rows, K blocks of N queries (not a multiple of 128: exercises padding), S context slots.
B, K, N, S, H, HKV, D = 2, 2, 130, 40, 4, 2, 32


@pytest.fixture(scope="module")
def inputs():
  ks = jax.random.split(jax.random.key(0), 6)
  q = jax.random.normal(ks[0], (B, K, N, H, D))
  ctx_k, ctx_v = (jax.random.normal(k, (B, HKV, S, D)) for k in ks[1:3])
  blk_k, blk_v = (jax.random.normal(k, (B, K, N, HKV, D)) for k in ks[3:5])
  # Invalid context slots differ per row: scattered in row 0, a left-padded prefix in row 1.
  slots = jnp.arange(S)
  ctx_valid = jnp.stack([slots % 3 != 0, slots >= 12])
  return q, ctx_k, ctx_v, ctx_valid, blk_k, blk_v


def _value_and_grads(inputs, fn):
  """Output and grads of a fixed random projection of it wrt q, ctx_k, ctx_v, blk_k, blk_v."""
  q, ctx_k, ctx_v, ctx_valid, blk_k, blk_v = inputs
  w = jax.random.normal(jax.random.key(1), q.shape)

  def loss(q, ctx_k, ctx_v, blk_k, blk_v):
    out = fn(q, ctx_k, ctx_v, ctx_valid, blk_k, blk_v)
    return jnp.sum(w * out.astype(jnp.float32)), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(
      q, ctx_k, ctx_v, blk_k, blk_v)
  return out, grads


@pytest.fixture(scope="module")
def dense(inputs):
  return _value_and_grads(inputs, attention.block_attention)  # impl="xla" by default


def _assert_close(got, want, rtol, atol):
  out, grads = got
  np.testing.assert_allclose(out, want[0], rtol=rtol, atol=atol)
  for name, g, w in zip(("q", "ctx_k", "ctx_v", "blk_k", "blk_v"), grads, want[1]):
    assert float(jnp.max(jnp.abs(w))) > 0, name
    # Relative to the gradient's scale: sums over many keys have large absolute entries.
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * float(jnp.max(jnp.abs(w))),
                               err_msg=f"d/d{name}")


@pytest.mark.parametrize("chunk", [64, 1000])  # 3 chunks with N padded to 192; one chunk > N
def test_chunked_matches_dense(inputs, dense, chunk):
  got = _value_and_grads(inputs, lambda *a: attention.block_attention(*a, impl="chunked",
                                                                      chunk=chunk))
  _assert_close(got, dense, rtol=1e-5, atol=1e-5)


def test_splash_interpret_matches_dense(inputs, dense):
  """The TPU kernel in the Pallas interpreter: N=130 -> 256 padded queries, S+N=170 -> 256 keys;
  GQA (4 query heads on 2 kv heads); invalid context slots masked by segment ids."""
  got = _value_and_grads(inputs, lambda *a: attention.block_attention(*a, impl="splash",
                                                                      interpret=True))
  _assert_close(got, dense, rtol=2e-3, atol=2e-3)


def test_splash_interpret_other_block_sizes(inputs, dense):
  out = attention.block_attention(*inputs, impl="splash", interpret=True,
                                  splash_blocks=attention.splash_block_sizes(256, 256))
  np.testing.assert_allclose(out, dense[0], rtol=2e-3, atol=2e-3)


def test_splash_sharded_matches_dense(inputs, dense):
  """Under a (data, fsdp, tensor) mesh the kernel runs in a shard_map (XLA cannot partition a
  Pallas call): one row and one kv head (two query heads) per shard."""
  mesh = parallel.make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
  got = _value_and_grads(inputs, lambda *a: attention.block_attention(
      *a, impl="splash", interpret=True, mesh=mesh))
  _assert_close(got, dense, rtol=2e-3, atol=2e-3)


def test_cudnn_key_order_matches_dense(inputs, dense):
  """The cudnn path's reordering (block keys, then valid context first, masked by lengths), run
  through jax.nn.dot_product_attention's XLA implementation: the cuDNN kernel needs a GPU."""
  got = _value_and_grads(inputs, lambda *a: attention._block_attention_cudnn(
      *a, implementation="xla"))
  _assert_close(got, dense, rtol=1e-5, atol=1e-5)


def test_cudnn_traces_and_rejects_float32(inputs):
  bf16 = [jax.ShapeDtypeStruct(x.shape, jnp.bfloat16 if x.dtype == jnp.float32 else x.dtype)
          for x in inputs]

  def loss(q, ctx_k, ctx_v, ctx_valid, blk_k, blk_v, implementation):
    return jnp.sum(attention._block_attention_cudnn(
        q, ctx_k, ctx_v, ctx_valid, blk_k, blk_v, implementation=implementation
    ).astype(jnp.float32))

  grads = jax.eval_shape(jax.grad(lambda *a: loss(*a, implementation=None), argnums=0), *bf16)
  assert grads.shape == (B, K, N, H, D) and grads.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="bf16/fp16"):
    attention.block_attention(*inputs, impl="cudnn")  # float32 inputs


def _grad_program(impl, shapes, sharding=None, **kw):
  """Compiled grad of sum(out^2) wrt all float inputs, for abstract inputs of ``shapes``."""
  def loss(q, ctx_k, ctx_v, ctx_valid, blk_k, blk_v):
    out = attention.block_attention(q, ctx_k, ctx_v, ctx_valid, blk_k, blk_v, impl=impl, **kw)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  args = [jax.ShapeDtypeStruct(s, dt, sharding=sharding) for s, dt in shapes]
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4, 5))).lower(*args).compile()


def _shapes(b, k, n, s, h, hkv, d, dtype):
  return [((b, k, n, h, d), dtype), ((b, hkv, s, d), dtype), ((b, hkv, s, d), dtype),
          ((b, s), jnp.bool_), ((b, k, n, hkv, d), dtype), ((b, k, n, hkv, d), dtype)]


def test_chunked_never_holds_full_scores():
  """Under grad, dense holds [N, S+N] float32 scores (several); chunked only [256, S+N] tiles."""
  n, s = 2048, 64
  shapes = _shapes(1, 2, n, s, 4, 2, 32, jnp.float32)
  dense = _grad_program("xla", shapes)
  chunked = _grad_program("chunked", shapes, chunk=256)
  full = re.compile(rf"\b{n},({n + s}|{n}|{s})\]")  # any [.., N, S+N] / [N, N] / [N, S] array
  assert full.search(dense.as_text())
  assert not full.search(chunked.as_text())
  dense_temp = dense.memory_analysis().temp_size_in_bytes
  chunked_temp = chunked.memory_analysis().temp_size_in_bytes
  # Measured: dense 558 MB, chunked 76 MB (one [2, 4, 2048, 2112] f32 scores array: 138 MB).
  assert chunked_temp * 3 < dense_temp, (chunked_temp, dense_temp)


@pytest.fixture(scope="module")
def tpu_device():
  try:
    return topology.devices(topology.parse("v5e-1"))[0]
  except RuntimeError as e:
    pytest.skip(f"libtpu cannot load, TPU AOT test skipped: {e}")


def test_splash_compiles_for_tpu(tpu_device):
  """Forward + grad of splash compile for a v5e chip (compile-only device, from this CPU), use
  the splash kernels (forward, dq, dkv) and need far fewer temp bytes than dense."""
  shapes = _shapes(1, 2, 1026, 200, 8, 2, 128, jnp.bfloat16)
  sharding = jax.sharding.SingleDeviceSharding(tpu_device)
  splash = _grad_program("splash", shapes, sharding)
  dense = _grad_program("xla", shapes, sharding)
  hlo = splash.as_text()
  for kernel in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
    assert kernel in hlo, kernel
  splash_temp = splash.memory_analysis().temp_size_in_bytes
  dense_temp = dense.memory_analysis().temp_size_in_bytes
  # Measured (libtpu, v5e): splash 0 B of HBM temporaries (its small padded copies live in
  # VMEM), dense 123 MB.
  assert splash_temp * 3 < dense_temp, (splash_temp, dense_temp)


def test_splash_compiles_sharded_for_tpu(tpu_device):
  """On 4 chips without ``mesh`` the Mosaic kernel cannot be partitioned; with it, it compiles."""
  devices = topology.devices(topology.parse("v5e-4"))
  mesh = parallel.make_mesh(data=1, fsdp=2, tensor=2, devices=devices)
  shapes = _shapes(2, 2, 258, 64, 4, 2, 128, jnp.bfloat16)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.BATCH_AXES))
  with pytest.raises(NotImplementedError, match="shard_map"):
    _grad_program("splash", shapes, rows)
  hlo = _grad_program("splash", shapes, rows, mesh=mesh).as_text()
  assert "splash_mha_fwd" in hlo


@pytest.mark.parametrize("impl,platform,dtype,want", [
    ("auto", "tpu", jnp.bfloat16, "splash"),
    ("auto", "tpu", None, "splash"),
    ("auto", "gpu", jnp.bfloat16, "cudnn"),
    ("auto", "cuda", jnp.float16, "cudnn"),
    ("auto", "gpu", jnp.float32, "chunked"),
    ("auto", "gpu", None, "chunked"),
    ("auto", "cpu", jnp.bfloat16, "chunked"),
    ("xla", "tpu", None, "xla"),
    ("chunked", "tpu", None, "chunked"),
    ("splash", "cpu", None, "splash"),
    ("cudnn", "cpu", jnp.float32, "cudnn"),
])
def test_resolve_impl(impl, platform, dtype, want):
  assert attention.resolve_impl(impl, platform, dtype) == want


def test_unknown_impl_lists_known(inputs):
  with pytest.raises(ValueError, match="unknown attention impl 'flash'; known: auto, xla, "
                                       "chunked, splash, cudnn"):
    attention.resolve_impl("flash", "tpu")
  with pytest.raises(ValueError, match="resolve 'auto'"):
    attention.block_attention(*inputs, impl="auto")


def test_config_validates_attention_fields():
  assert get_preset("tiny").attention_impl == "auto"
  assert get_preset("tiny", attention_impl="chunked", attention_chunk=64).attention_chunk == 64
  with pytest.raises(ValueError, match=r"ModelConfig.attention_impl='flash' is not one of "
                                       r"auto, xla, chunked, splash, cudnn"):
    get_preset("tiny", attention_impl="flash")
  with pytest.raises(ValueError, match="ModelConfig.attention_chunk must be positive"):
    get_preset("tiny", attention_chunk=0)
