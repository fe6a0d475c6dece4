"""The distributed pieces that need no ranks: placement plans, sliced reads of safetensors,
the cost model (bytes per token, tok/s against published cluster numbers)."""

import itertools
import math
import random

import mlx.core as mx
import numpy as np
import pytest

from mlx_deepseek.distributed import checkpoint, costs
from mlx_deepseek.distributed.plan import (
    Plan,
    PlanError,
    Sizes,
    even,
    make_plan,
    split_layers,
    tensor_plan,
)
from mlx_deepseek.errors import CheckpointError
from mlx_deepseek.models.config import ModelArgs
from mlx_deepseek.models.tiny import tiny_config, tiny_v1_config

# ---- plans -----------------------------------------------------------------------------------


def brute_force(layer_bytes, first, last, memory):
    """The best max load over every contiguous split (reference for split_layers)."""
    L, N = len(layer_bytes), len(memory)
    best = math.inf
    for cuts in itertools.combinations(range(1, L), N - 1):
        bounds = [0, *cuts, L]
        loads = []
        for r in range(N):
            extra = (first if r == 0 else 0) + (last if r == N - 1 else 0)
            loads.append((sum(layer_bytes[bounds[r] : bounds[r + 1]]) + extra) / memory[r])
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_pipeline_split_is_the_best_contiguous_split_for_uneven_memory(seed):
    rng = random.Random(seed)
    L, N = rng.randint(4, 9), rng.randint(2, 4)
    layer_bytes = [rng.randint(50, 150) for _ in range(L)]
    memory = [rng.choice([64, 128, 192, 512]) for _ in range(N)]
    first, last = rng.randint(0, 200), rng.randint(0, 300)
    ranges = split_layers(layer_bytes, first, last, memory)
    assert ranges[0][0] == 0 and ranges[-1][1] == L and len(ranges) == N
    assert all(a < b for a, b in ranges) and all(
        b == c for (_, b), (c, _) in zip(ranges, ranges[1:], strict=False)
    )
    loads = [
        (sum(layer_bytes[a:b]) + (first if r == 0 else 0) + (last if r == N - 1 else 0)) / memory[r]
        for r, (a, b) in enumerate(ranges)
    ]
    assert max(loads) == pytest.approx(brute_force(layer_bytes, first, last, memory))


def test_pipeline_gives_the_bigger_mac_more_layers():
    ranges = split_layers([10] * 61, 0, 0, [512, 192])
    sizes = [b - a for a, b in ranges]
    assert sizes[0] > 2 * sizes[1] and sum(sizes) == 61


def test_uneven_head_counts_and_blocks():
    assert even(128, 3) == [(0, 43), (43, 86), (86, 128)]
    assert even(2048, 3, 64) == [(0, 704), (704, 1408), (1408, 2048)]  # whole groups of 64
    assert all(b % 64 == 0 for _, b in even(18432, 7, 64))
    with pytest.raises(PlanError, match="cannot be split over 5 ranks"):
        even(4, 5, 1, "num_attention_heads")


def test_tensor_plan_for_v3_on_three_ranks():
    args = ModelArgs.from_dict(
        tiny_config(
            "v3_noaux",
            num_attention_heads=128,
            n_routed_experts=256,
            n_group=8,
            topk_group=4,
            vocab_size=129280,
        )  # fmt: skip
    )
    plan = tensor_plan(args, 3)
    assert [b - a for a, b in plan.heads] == [43, 43, 42]
    assert [b - a for a, b in plan.experts] == [86, 85, 85]
    assert plan.vocab[-1][1] == 129280 and sum(b - a for a, b in plan.vocab) == 129280
    assert Plan.from_json(plan.to_json()) == plan


def test_quantized_splits_keep_whole_groups():
    # 4 heads of v_head_dim 32 in groups of 64: heads go in pairs, so 3 ranks cannot share them
    args = ModelArgs.from_dict(tiny_config("v3_noaux", v_head_dim=32, n_shared_experts=1))
    assert tensor_plan(args, 2, unit=64).heads == ((0, 2), (2, 4))
    with pytest.raises(PlanError, match="4 cannot be split over 3 ranks in blocks of 2"):
        tensor_plan(args, 3, unit=64)
    # a shared expert of one group (32 hidden units) cannot be cut: rank 0 runs it whole
    plan = tensor_plan(args, 2, unit=64)
    assert plan.shared == ((0, 32), (32, 32)) and plan.dense == ((0, 64), (64, 96))


def test_plans_refuse_what_cannot_fit_or_split():
    args = ModelArgs.from_dict(tiny_config("v2_greedy", num_hidden_layers=3))
    s = Sizes([100, 100, 100], embed=10, head=10)
    with pytest.raises(PlanError, match="4 ranks for 3 layers"):
        make_plan("pipeline", args, s, [1000] * 4)
    with pytest.raises(PlanError, match=r"rank 1 would hold .* GB of weights .* but has"):
        make_plan("pipeline", args, s, [10_000, 50])
    with pytest.raises(PlanError, match="choose one of pipeline, tensor, auto"):
        make_plan("ring", args, s, [1000, 1000])


def test_auto_prefers_pipeline_when_memory_is_uneven():
    args = ModelArgs.from_dict(tiny_config("v3_noaux", num_hidden_layers=4))
    s = Sizes([1000] * 4, embed=100, head=100)
    # an even share (2,100+) does not fit the small rank: only a pipeline sized by memory does
    assert make_plan("auto", args, s, [10_000, 1_500]).kind == "pipeline"


# ---- sliced reads ----------------------------------------------------------------------------


def test_rows_and_columns_are_read_exactly(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "bf16": mx.array(rng.standard_normal((6, 10)).astype(np.float32)).astype(mx.bfloat16),
        "f32": mx.array(rng.standard_normal((4, 3, 8)).astype(np.float32)),
        "u32": mx.array(rng.integers(0, 2**32 - 1, (5, 7), dtype=np.uint32)),
    }
    mx.save_safetensors(str(tmp_path / "model.safetensors"), tensors)
    (tmp_path / "config.json").write_text("{}")
    infos = checkpoint.scan(tmp_path)
    for name, t in tensors.items():
        info = infos[name]
        assert mx.array_equal(checkpoint.read(info), t).item()
        assert mx.array_equal(checkpoint.read(info, rows=(1, 3)), t[1:3]).item()
        got = checkpoint.read(info, rows=(1, 4), cols=(2, 5))
        assert got.dtype == t.dtype and mx.array_equal(got, t[1:4, ..., 2:5]).item()
    with pytest.raises(CheckpointError, match="rows 2:9 outside"):
        checkpoint.read(infos["u32"], rows=(2, 9))


def test_truncated_and_fp8_files_are_named(tmp_path):
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"w": mx.zeros((64, 64))})
    (tmp_path / "config.json").write_text("{}")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'w' ends at byte 16384 "
                       r"of a 16284-byte data section \(the file is truncated"):  # fmt: skip
        checkpoint.scan(tmp_path)
    header = b'{"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}'
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"xx")
    with pytest.raises(CheckpointError, match="F8_E4M3: convert the checkpoint first"):
        checkpoint.scan(tmp_path)


# ---- the cost model --------------------------------------------------------------------------


def test_shapes_match_the_published_parameter_counts():
    # (total, active) in billions: DeepSeek-V3 report, Kimi K2 card, families-2026.md
    published = {
        "v3": (671, 37),
        "kimi-k2": (1030, 32),
        "v4-flash": (284, 13),
        "v4-pro": (1600, 49),
    }
    for key, (total, active) in published.items():
        shape = costs.SHAPES[key]
        assert shape.total_params / 1e9 == pytest.approx(total, rel=0.03), key
        assert shape.active_params / 1e9 == pytest.approx(active, rel=0.03), key


def test_expected_busiest_rank_matches_a_simulation():
    rng = np.random.default_rng(0)
    for k, n in ((8, 4), (6, 8), (8, 2), (1, 3)):
        draws = rng.integers(0, n, (40_000, k))
        counts = np.stack([(draws == r).sum(1) for r in range(n)], 1).max(1).mean()
        assert costs.expected_max_share(k, n) == pytest.approx(counts, rel=0.02)


def test_predictions_against_published_cluster_numbers():
    v3, rdma, tcp = costs.SHAPES["v3"], costs.LINKS["tb5-rdma"], costs.LINKS["tb5-tcp"]
    ultra, mini = costs.MACHINES["m3-ultra-512"], costs.MACHINES["m4-pro-64"]
    # the anchor the efficiency is fitted to: V3 4-bit on one M3 Ultra, ~20 tok/s
    assert costs.predict(v3, 4, ultra, 1, "pipeline", rdma).tokens_per_s == pytest.approx(20, 0.05)
    # exo: V3.1 8-bit on 4 M3 Ultras over TB5 RDMA, tensor parallel, ~25 tok/s
    tp = costs.predict(v3, 8, ultra, 4, "tensor", rdma)
    assert tp.fits and tp.tokens_per_s == pytest.approx(25, rel=0.2)
    # exo: V3 4-bit on 8 M4 Pro minis (pipeline over Thunderbolt), 5.4 tok/s
    pp = costs.predict(v3, 4, mini, 8, "pipeline", tcp)
    assert pp.fits and pp.tokens_per_s == pytest.approx(5.4, rel=0.25)
    # V3 does not fit 4 minis at 4 bits; tensor parallel over 10 GbE loses to a pipeline
    assert not costs.predict(v3, 4, mini, 4, "pipeline", tcp).fits
    eth = costs.LINKS["10gbe"]
    slow = costs.predict(v3, 4, ultra, 8, "tensor", eth).tokens_per_s
    assert slow < costs.predict(v3, 4, ultra, 8, "pipeline", eth).tokens_per_s


def test_step_bytes_follow_the_collectives():
    shape = costs.SHAPES["v3"]
    D, V, L = 7168, 129280, 61
    # pipeline over 4: each stage but the last sends (h, m) in bf16; all add the logits
    logits = 2 * 3 * V * 2 // 4
    assert costs.step_bytes(shape, 4, "pipeline") == [2 * D * 2 + logits] * 3 + [logits]
    # tensor over 2: an all_sum of D after the embedding and twice per layer, then the
    # logits gathered (half the vocabulary from the other rank)
    assert costs.step_bytes(shape, 2, "tensor") == [(2 * L + 1) * D * 2 + V // 2 * 2] * 2


def test_v4_tensor_plan_cuts_heads_in_whole_output_groups():
    """wo_a projects each output group's heads on its own: a rank holds whole groups (64
    heads in 8 groups on 3 ranks: 3 + 3 + 2 groups); fewer groups than ranks is one line."""
    from mlx_deepseek.distributed.plan import v4_tensor_plan
    from mlx_deepseek.models.v4_config import ModelArgs as V4Args

    flash = V4Args(num_attention_heads=64, o_groups=8, n_routed_experts=256)
    plan = v4_tensor_plan(flash, 3)
    assert plan.heads == ((0, 24), (24, 48), (48, 64))
    assert plan.experts == ((0, 86), (86, 171), (171, 256))
    tiny = V4Args(num_attention_heads=4, o_groups=2, n_routed_experts=6)
    assert v4_tensor_plan(tiny, 2).heads == ((0, 2), (2, 4))
    with pytest.raises(PlanError) as e:
        v4_tensor_plan(tiny, 3)
    assert str(e.value) == (
        "num_attention_heads of 4 cannot be split over 3 ranks in blocks of 2: use fewer "
        "ranks or --parallel pipeline"
    )


def test_families_without_a_split_are_refused_in_one_line(tmp_path):
    """DeepSeekMoE 16B (multi-head attention) has no stage or shard model: every kind is one
    line, before any rank reads a tensor (no weights are even written here)."""
    import json

    from mlx_deepseek.distributed import load_part

    (tmp_path / "config.json").write_text(json.dumps(tiny_v1_config()))
    for kind in ("pipeline", "tensor", "auto"):
        with pytest.raises(PlanError) as e:
            load_part(tmp_path, kind, world=None)
        message = str(e.value)
        assert "\n" not in message
        assert message.startswith("--parallel: model_type deepseek cannot be split yet")
        assert "run it in one process" in message
