"""``aot.hlo`` / ``aot.comm`` / ``aot.time_model``: collectives, their loops and the time model.

A hand-written HLO module checks the parser form by form (async pairs, the three replica-group
syntaxes, a trip count from a fused loop condition, a nested loop, a multi-line custom call);
a shard_map compiled over the 8 fake CPU devices checks it on XLA's own output, with collectives
whose bytes and counts are known by construction.
"""
from functools import partial

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from unigrpo_jax.aot import comm, hlo, time_model, topology

HLO = """HloModule jit_f, entry_computation_layout={(f32[16,8]{1,0})->f32[16,8]{1,0}}, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner_body (p: (s32[], f32[16,8])) -> (s32[], f32[16,8]) {
  %p = (s32[], f32[16,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[16,8]{1,0} get-tuple-element(%p), index=1
  %ar = f32[16,8]{1,0} all-reduce(%x), channel_id=1, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[16,8]{1,0}) tuple(%j, %ar)
}

%inner_cond (p: (s32[], f32[16,8])) -> pred[] {
  %p = (s32[], f32[16,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%outer_body (q: (s32[], f32[16,8])) -> (s32[], f32[16,8]) {
  %q = (s32[], f32[16,8]{1,0}) parameter(0)
  %k = s32[] get-tuple-element(%q), index=0
  %y = f32[16,8]{1,0} get-tuple-element(%q), index=1
  %ag-start = (f32[16,8]{1,0}, f32[128,8]{1,0}) all-gather-start(%y), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, use_global_device_ids=true
  %ag-done = f32[128,8]{1,0} all-gather-done(%ag-start)
  %rs = f32[16,8]{1,0} reduce-scatter(%ag-done), channel_id=3, replica_groups=mesh['x'=2,'y'=4] {'x','y'}, dimensions={0}, to_apply=%add
  %w = f32[8,4]{1,0} parameter(1)
  %d = f32[16,4]{1,0} dot(%rs, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %zero = s32[] constant(0)
  %init = (s32[], f32[16,8]{1,0}) tuple(%zero, %rs)
  %loop = (s32[], f32[16,8]{1,0}) while(%init), condition=%inner_cond, body=%inner_body
  %z = f32[16,8]{1,0} get-tuple-element(%loop), index=1
  %one = s32[] constant(1)
  %k1 = s32[] add(%k, %one)
  ROOT %t = (s32[], f32[16,8]{1,0}) tuple(%k1, %z)
}

%fused_cmp (p0: s32[], p1: s32[]) -> pred[] {
  %p0 = s32[] parameter(0)
  %p1 = s32[] parameter(1)
  ROOT %c = pred[] compare(%p0, %p1), direction=LT
}

%outer_cond (q: (s32[], f32[16,8])) -> pred[] {
  %q = (s32[], f32[16,8]{1,0}) parameter(0)
  %k = s32[] get-tuple-element(%q), index=0
  %lim = s32[] constant(5)
  ROOT %f = pred[] fusion(%k, %lim), kind=kLoop, calls=%fused_cmp
}

ENTRY %main (x: f32[16,8]) -> f32[16,8] {
  %x = f32[16,8]{1,0} parameter(0)
  %a2a = f32[16,8]{1,0} all-to-all(%x), channel_id=4, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}
  %cp-start = (f32[16,8]{1,0}, f32[16,8]{1,0}, u32[], u32[]) collective-permute-start(%a2a), channel_id=5, source_target_pairs={{0,1},{1,2},{2,3}}
  %cp-done = f32[16,8]{1,0} collective-permute-done(%cp-start)
  %cc = f32[16,8]{1,0} custom-call(%cp-done), custom_call_target="tpu_custom_call", backend_config={"a":
"two lines"}
  %zero = s32[] constant(0)
  %init = (s32[], f32[16,8]{1,0}) tuple(%zero, %cc)
  %outer = (s32[], f32[16,8]{1,0}) while(%init), condition=%outer_cond, body=%outer_body, backend_config={"known_init_step":{"init":"0","step":"1"}}
  ROOT %r = f32[16,8]{1,0} get-tuple-element(%outer), index=1
}
"""
B = 16 * 8 * 4  # one f32[16,8]


def test_hand_written_module_bytes_loops_and_groups():
  a = comm.analyze(HLO)
  assert a.num_devices == 8
  outer, inner = a.loops["outer"], a.loops["loop"]
  assert (outer.trips, outer.trip_source, outer.parent, outer.entries) == (
      5, "condition_bound", None, 1.0)
  assert (inner.trips, inner.trip_source, inner.parent, inner.entries) == (
      3, "condition_bound", "outer", 5.0)
  by_name = {c.name: c for c in a.collectives}
  assert set(by_name) == {"ar", "ag-start", "rs", "a2a", "cp-start"}  # -done ops not counted
  assert by_name["ar"].groups == [[0, 1, 2, 3], [4, 5, 6, 7]]  # iota [2,4]<=[8]
  assert by_name["a2a"].groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert by_name["rs"].group_size == 8  # mesh form over both axes
  assert by_name["cp-start"].groups == [[0, 1], [1, 2], [2, 3]]
  # Convention: all-gather counts its operand (this chip's shard), reduce-scatter its input.
  assert (by_name["ag-start"].operand_bytes, by_name["rs"].operand_bytes) == (B, 8 * B)
  assert by_name["ar"].executions == 15 and by_name["ar"].loop == "loop"
  s = comm.summarize(a)
  assert s["per_call_bytes"] == {"all-reduce": 15 * B, "all-gather": 5 * B,
                                 "reduce-scatter": 5 * 8 * B, "all-to-all": B,
                                 "collective-permute": B}
  assert s["loops"]["outer"]["per_iteration_bytes"]["all-reduce"] == 3 * B  # inclusive
  assert s["loops"]["outer"]["per_iteration_total"] == 3 * B + B + 8 * B
  assert s["loops"]["loop"]["per_iteration_total"] == B
  # Ring wire bytes: all-reduce 2 (n-1)/n, all-gather (n-1) x shard, permute 1x.
  assert by_name["ar"].wire_bytes == pytest.approx(2 * 3 / 4 * B)
  assert by_name["ag-start"].wire_bytes == 7 * B
  assert by_name["cp-start"].wire_bytes == B


def test_hints_count_loops_xla_cannot():
  a = comm.analyze(HLO, hints={3: 2})  # keyed by the condition's bound
  assert (a.loops["loop"].trips, a.loops["loop"].trip_source) == (2, "hint")
  assert a.loops["outer"].trips == 5


def test_multiline_instruction_and_costs():
  comps = hlo.parse_module(HLO)
  assert any(i.opcode == "custom-call" for i in comps["main"].instructions)
  assert [i.name for i in comps["main"].instructions][-1] == "r"
  visits, loops = hlo.walk(comps)
  costs = time_model.hlo_costs(comps, visits, loops)
  assert costs["program"]["flops"] == 5 * 2 * 16 * 4 * 8  # the dot, once per outer iteration
  assert costs["loops"]["outer"]["flops"] == 2 * 16 * 4 * 8
  assert costs["program"]["custom_calls"] == 1


def test_on_chip_memory_is_not_hbm_traffic():
  t = "(bf16[4,4]{1,0:T(8,128)(2,1)S(1)}, f32[2]{0:T(128)})"
  assert hlo.array_bytes(t) == 4 * 4 * 2 + 8
  assert hlo.array_bytes(t, hbm_only=True) == 8
  prefetch = hlo.parse_instruction("  %cs = (bf16[64,64]{1,0:S(1)}, bf16[64,64]{1,0}, u32[]) "
                                   "copy-start(%w)")
  assert time_model.traffic(prefetch, {"w": "bf16[64,64]{1,0}"}, {}) == 64 * 64 * 2
  part = hlo.parse_instruction("  %ss = ((bf16[28,64]{1,0}), bf16[7,64]{1,0:S(1)}, s32[]{:S(2)}) "
                               "slice-start(%w), slice={[0:7], [0:64]}")
  assert time_model.traffic(part, {"w": "bf16[28,64]{1,0}"}, {}) == 7 * 64 * 2  # the slice read


def test_convolution_flops_ignore_padding_taps():
  """XLA on TPU writes [768, 56] x [56, 28, 128] as a convolution with the 28 heads as a padded
  spatial window: only one tap meets real input."""
  types = {"l": "bf16[768,56,1]", "r": "bf16[56,28,128]"}
  conv = hlo.parse_instruction("  %c = bf16[768,28,128]{2,0,1} convolution(%l, %r), "
                               "window={size=28 pad=27_27 rhs_reversal=1}, dim_labels=bf0_i0o->b0f")
  assert time_model.flops(conv, types) == 2 * 768 * 28 * 128 * 56
  vae = hlo.parse_instruction("  %v = bf16[1,64,64,512] convolution(%l, %r), "
                              "window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f")
  types = {"l": "bf16[1,64,64,256]", "r": "bf16[3,3,256,512]"}
  assert time_model.flops(vae, types) == 2 * 64 * 64 * 512 * 256 * 9


def test_group_bandwidth_follows_the_dimensions_spanned():
  coords = [(x, y, z) for z in range(2) for y in range(2) for x in range(2)]  # a 2x2x2 torus
  assert time_model.group_fraction([[0, 1], [2, 3]], coords) == pytest.approx(1 / 3)
  assert time_model.group_fraction([[0, 1, 2, 3]], coords) == pytest.approx(2 / 3)
  assert time_model.group_fraction([list(range(8))], coords) == 1.0
  assert time_model.group_fraction([[0, 1]], None) == 1.0
  t = time_model.terms(1.0, 3.0, 2.0)
  assert (t["bound_s"], t["binds"], t["serial_s"]) == (3.0, "hbm", 6.0)


def test_chip_ici_figures():
  c = topology.CHIPS
  assert c["v5p"].ici_bandwidth == 600e9 and c["v5e"].ici_bandwidth == 200e9
  assert c["v6e"].ici_bandwidth == 400e9 and c["v4"].ici_bandwidth == pytest.approx(268.6e9,
                                                                                      rel=1e-3)


def test_cpu_compile_psum_in_nested_fori_loops():
  """8 fake CPU devices as a (2, 4) mesh; per chip f32[8, 8] = 256 bytes. An inner loop of 3
  psums over "b" (groups of 4) inside an outer loop of 5 with a psum over "a" (groups of 2),
  then one all_gather over "a" outside both: 15 + 5 all-reduces and 1 all-gather."""
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

  @jax.jit
  @partial(jax.shard_map, mesh=mesh, in_specs=P("a", "b"), out_specs=P("a", "b"))
  def f(x):
    def inner(i, x):
      return jax.lax.psum(x, "b") * 0.25 + jax.lax.axis_index("b").astype(x.dtype)

    def outer(j, x):
      x = jax.lax.fori_loop(0, 3, inner, x)
      return jax.lax.psum(x, "a") * 0.5 + jax.lax.axis_index("a").astype(x.dtype)

    x = jax.lax.fori_loop(0, 5, outer, x)
    return jax.lax.all_gather(x, "a").sum(0) + jax.lax.axis_index("b").astype(x.dtype)

  text = f.lower(jnp.ones((16, 32), jnp.float32)).compile().as_text()
  a = comm.analyze(text)
  s = comm.summarize(a)
  assert s["per_call_bytes"]["all-reduce"] == (15 + 5) * 256
  assert s["per_call_bytes"]["all-gather"] == 256
  loops = sorted(a.loops.values(), key=lambda lp: lp.trips)
  assert [(lp.trips, lp.entries) for lp in loops] == [(3, 5.0), (5, 1.0)]
  assert loops[0].parent == loops[1].name
  per_iter = {lp.trips: s["loops"][lp.name]["per_iteration_bytes"]["all-reduce"] for lp in loops}
  assert per_iter == {3: 256, 5: 256 + 3 * 256}
  sizes = sorted((c.group_size, c.executions) for c in a.collectives)
  assert sizes == [(2, 1.0), (2, 5.0), (4, 15.0)]
