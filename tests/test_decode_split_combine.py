"""The one-launch split decode attention (`DecodePlan.fuse_reduce`): the split program that
arrives last at its (sequence, KV head) counter combines the partials. Against native attention
and against the two-launch reduce (the same arithmetic: equal bits), over several launches in a
row on one counter workspace (a counter left non-zero would leave the next launch's output
unwritten), with padding rows of length 0, GQA groups 1/2/4 and head sizes 16/64."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import attention
from runtime.forward_context import AttentionMetadata
from runtime.kernels import triton_kernels
from runtime.kv_cache import AttentionSpec, LayerKVCache, allocate_kv_caches
from tests.kernels.helpers import GPU_TOLERANCES, TOLERANCES

if attention.decode_attention is not None:
    from runtime.kernels import attention_jit, decode_attention
    from runtime.kernels.decode_attention import DecodePlan, DecodeTuning, decode_plan

pytestmark = pytest.mark.skipif(
    attention.attention_jit is None or not triton_kernels.supports(torch.device("cpu"),
                                                                   torch.float32),
    reason="needs Triton (interpreted on CPU)")


@dataclasses.dataclass
class Layout:
    """`batch` real sequences (sequence b owns slots b*max_len..) then `padding` rows of length
    0 and slot -1, as a captured step's static buffers hold them."""

    spec: AttentionSpec
    lengths: list[int]
    padding: int
    device: str
    max_len: int = 0  # slots per sequence; 0: two more than the longest

    def __post_init__(self) -> None:
        self.max_len = self.max_len or max(self.lengths) + 2

    @property
    def rows(self) -> int:
        return len(self.lengths) + self.padding

    def real(self) -> AttentionMetadata:
        batch, max_len = len(self.lengths), self.max_len
        tables = torch.arange(batch * max_len, device=self.device).view(batch, max_len)
        slots = torch.tensor([b * max_len + n - 1 for b, n in enumerate(self.lengths)],
                             device=self.device)
        return AttentionMetadata(tuple(range(batch + 1)), tuple(self.lengths), slots, tables)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tables, lengths, slots) over every row, padding included."""
        real, pad = self.real(), self.padding
        tables = torch.cat((real.slot_tables, real.slot_tables.new_zeros(pad, self.max_len)))
        lengths = torch.tensor(self.lengths + [0] * pad, dtype=torch.int32, device=self.device)
        slots = torch.cat((real.slot_mapping, real.slot_mapping.new_full((pad,), -1)))
        return tables, lengths, slots

    def cache(self, history: torch.Tensor) -> LayerKVCache:
        cache = allocate_kv_caches({"l": self.spec}, history.shape[0], 0, history.dtype,
                                   self.device)["l"]
        cache.key.copy_(history)
        cache.value.copy_(history.flip(0) * 0.5)
        return cache


def _launches(layout: Layout, plans: dict[str, DecodePlan], calls: int, dtype: torch.dtype,
              tolerances: dict) -> None:
    """`calls` launches in a row of each plan, each on fresh query/key/value rows: the fused
    plan equals the two-launch one (bit for bit where interpreted) and native within tolerance,
    padding rows are zero, the caches agree, and the counters are all zero after every launch."""
    spec, device, batch = layout.spec, layout.device, len(layout.lengths)
    history = torch.randn(batch * layout.max_len, spec.num_kv_heads, spec.head_size,
                          device=device).to(dtype)
    expected_cache = layout.cache(history)
    caches = {name: layout.cache(history) for name in plans}
    tables, lengths, slots = layout.padded()
    width, kv_width = spec.num_heads * spec.head_size, spec.num_kv_heads * spec.head_size
    for _ in range(calls):
        query = torch.randn(layout.rows, width, device=device).to(dtype)
        key, value = (torch.randn(layout.rows, kv_width, device=device).to(dtype)
                      for _ in range(2))
        expected = torch.full_like(query[:batch], float("nan"))
        attention.native_attention(query[:batch], key[:batch], value[:batch], expected,
                                   expected_cache, layout.real())
        outputs = {}
        for name, plan in plans.items():
            outputs[name] = torch.full_like(query, float("nan"))
            decode_attention.launch_decode(query, key, value, outputs[name], caches[name],
                                           tables, lengths, slots, layout.rows, plan)
        fused = outputs["fused"]
        rtol, atol = tolerances[dtype]
        if device == "cpu":  # interpreted, the shared arithmetic gives the same bits
            assert torch.equal(fused, outputs["separate"])
        else:  # on the GPU the two launches' warp counts may order the sums differently
            torch.testing.assert_close(fused, outputs["separate"], rtol=rtol, atol=atol)
        torch.testing.assert_close(fused[:batch], expected, rtol=rtol, atol=atol)
        assert torch.all(fused[batch:] == 0)
        for cache in caches.values():
            assert torch.equal(cache.key, expected_cache.key)
            assert torch.equal(cache.value, expected_cache.value)
        counters = decode_attention.arrival_counters(fused.device, 0)
        assert counters is not None and not torch.any(counters)


def _plans(spec: AttentionSpec, splits: int, block_n: int) -> dict[str, DecodePlan]:
    group = spec.num_heads // spec.num_kv_heads
    fused = DecodePlan(splits, block_n, 2, max(16, triton_kernels._next_power_of_2(group)),
                       max(16, triton_kernels._next_power_of_2(spec.head_size)), True)
    return {"fused": fused, "separate": dataclasses.replace(fused, fuse_reduce=False)}


@pytest.mark.slow  # interpreted: about 10 s; the failure test below is the quick check
@settings(max_examples=8)
@given(group=st.sampled_from([1, 2, 4]), kv_heads=st.integers(1, 2),
       head_size=st.sampled_from([16, 64]),
       lengths=st.lists(st.integers(1, 40), min_size=1, max_size=2),
       padding=st.integers(0, 2), splits=st.integers(2, 5), block_n=st.sampled_from([8, 16]),
       seed=st.integers(0, 2**16))
def test_fused_combine_equals_the_reduce_kernel_and_native(
        group: int, kv_heads: int, head_size: int, lengths: list[int], padding: int,
        splits: int, block_n: int, seed: int) -> None:
    torch.manual_seed(seed)
    spec = AttentionSpec(group * kv_heads, kv_heads, head_size, head_size ** -0.5)
    layout = Layout(spec, lengths, padding, "cpu")
    _launches(layout, _plans(spec, splits, block_n), 2, torch.float32, TOLERANCES)


def test_a_launch_that_fails_part_way_leaves_the_counters_zero(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first combining program raises (its counter has reached `splits`, not yet reset):
    the launcher zeroes the workspace, so the next launch still combines every query group."""
    torch.manual_seed(0)
    spec = AttentionSpec(4, 2, 16, 0.25)
    layout = Layout(spec, [30, 5], 1, "cpu")
    combine = attention_jit._combine_head

    def failing(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected failure in the combining split")

    monkeypatch.setattr(attention_jit, "_combine_head", failing)
    plans = _plans(spec, 3, 8)
    query = torch.randn(layout.rows, 64)
    tables, lengths, slots = layout.padded()
    cache = layout.cache(torch.randn(2 * layout.max_len, 2, 16))
    with pytest.raises(Exception, match="injected failure"):  # the interpreter wraps it
        decode_attention.launch_decode(query, query[:, :32], query[:, 32:], query.clone(),
                                       cache, tables, lengths, slots, layout.rows,
                                       plans["fused"])
    monkeypatch.setattr(attention_jit, "_combine_head", combine)
    _launches(layout, plans, 2, torch.float32, TOLERANCES)


def test_plans_take_the_reduce_form_from_the_tuning() -> None:
    spec = AttentionSpec(32, 8, 64, 0.125)
    fused = DecodeTuning(block_n=64, num_warps=4, programs_per_processor=2, max_splits=32,
                         fuse_reduce=True)
    separate = dataclasses.replace(fused, fuse_reduce=False)
    assert decode_plan(spec, 1, 132, fused).fuse_reduce
    assert not decode_plan(spec, 1, 132, separate).fuse_reduce
    assert not decode_plan(spec, 1, 132).fuse_reduce  # the default, as measured: the reduce launch


def test_the_counter_workspace_is_allocated_once_per_device_and_grows_only_on_demand() -> None:
    cpu = torch.device("cpu")
    first = decode_attention.arrival_counters(cpu, 1)
    assert first is not None and first.dtype == torch.int32
    # sized for any tuning's split grid: splits > 1 needs rows x KV heads <= SMs x per SM / 2
    most = max(t.programs_per_processor for t in decode_attention.DECODE_TUNING.values())
    assert first.numel() >= triton_kernels.device_processors(cpu) * most
    assert decode_attention.arrival_counters(cpu, first.numel()) is first
    larger = decode_attention.arrival_counters(cpu, first.numel() + 1)
    assert larger is not None and larger.numel() > first.numel() and not torch.any(larger)
    assert decode_attention.arrival_counters(cpu, 1) is larger


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(32, 8, 64), (32, 8, 128), (16, 16, 64)])  # 1B, 8B, BART
@pytest.mark.parametrize("batch", [1, 8])
def test_fused_combine_on_gpu(shape: tuple[int, int, int], batch: int) -> None:
    """The device's own plans (132 SMs: many splits) and a forced 64-way split, in bfloat16 and
    float32, three launches in a row, two padding rows."""
    heads, kv_heads, head_size = shape
    spec = AttentionSpec(heads, kv_heads, head_size, head_size ** -0.5)
    lengths = torch.randint(1, 2049, (batch,), generator=torch.Generator().manual_seed(batch))
    layout = Layout(spec, lengths.tolist(), 2, "cuda")
    rows = layout.rows
    own = decode_plan(spec, rows, triton_kernels.device_processors(torch.device("cuda")))
    for plan in (own, dataclasses.replace(own, splits=64)):
        if plan.splits == 1:
            continue
        plans = {"fused": dataclasses.replace(plan, fuse_reduce=True),
                 "separate": dataclasses.replace(plan, fuse_reduce=False)}
        for dtype in (torch.bfloat16, torch.float32):
            _launches(layout, plans, 3, dtype, GPU_TOLERANCES)


@pytest.mark.gpu
def test_fused_combine_replays_in_a_cuda_graph() -> None:
    """One captured launch replayed over changing contexts (the static buffers rewritten between
    replays, as a decode step does): every replay matches native, padding rows are zero, the
    cache writes agree and the counters stay zero."""
    spec = AttentionSpec(32, 8, 64, 0.125)
    static = Layout(spec, [300, 300], 2, "cuda")
    plan = decode_plan(spec, static.rows, 132)
    assert plan.splits > 1 and plan.fuse_reduce
    history = torch.randn(2 * static.max_len, 8, 64, device="cuda")
    cache, expected_cache = static.cache(history), static.cache(history)
    tables, lengths, slots = static.padded()
    query = torch.randn(static.rows, 32 * 64, device="cuda")
    key, value = (torch.randn(static.rows, 8 * 64, device="cuda") for _ in range(2))
    output = torch.empty_like(query)

    def launch() -> None:
        decode_attention.launch_decode(query, key, value, output, cache, tables, lengths,
                                       slots, static.rows, plan)

    launch()  # warm-up: compiles, allocates the counters outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    for real in ([300, 40], [1, 299], [17, 2], [300, 300]):
        step = Layout(spec, real, 2, "cuda", static.max_len)
        for buffer, values in zip((tables, lengths, slots), step.padded()):
            buffer.copy_(values)
        for buffer in (query, key, value):
            buffer.normal_()
        graph.replay()
        expected = torch.empty_like(query[:2])
        attention.native_attention(query[:2], key[:2], value[:2], expected, expected_cache,
                                   step.real())
        torch.testing.assert_close(output[:2], expected, rtol=1e-5, atol=1e-5)
        assert torch.all(output[2:] == 0)
        assert torch.equal(cache.key, expected_cache.key)
    counters = decode_attention.arrival_counters(output.device, 0)
    assert counters is not None and not torch.any(counters)
