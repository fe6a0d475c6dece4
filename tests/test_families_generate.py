"""The generation loop on the newer families' checkpoints: greedy generation (chunked prefill,
cached decode) equals argmax of a full forward per token; V3.2's prompt is past index_topk."""

import mlx.core as mx
import pytest
from mlx_deepseek.convert.synthetic import write_checkpoint

import mlx_deepseek
from mlx_deepseek.bench.models import SHAPES
from mlx_deepseek.generation import stream_generate
from mlx_deepseek.models.tiny import tiny_v1_config

PROMPT = "A long prompt, well past the indexer's top-8, about dragons and their gold."


def greedy_reference(model, tokens: list[int], n: int) -> list[int]:
    out = list(tokens)
    for _ in range(n):
        out.append(int(mx.argmax(model(mx.array([out]))[0, -1]).item()))
    return out[len(tokens) :]


@pytest.mark.parametrize("family", ["deepseek_v32", "deepseek"])
def test_greedy_generation_equals_full_forward_argmax(tmp_path, family):
    config = SHAPES["tiny-v32"]().config if family == "deepseek_v32" else tiny_v1_config()
    write_checkpoint(tmp_path, config, fmt="f32", seed=3)
    model, tokenizer = mlx_deepseek.load(tmp_path, dtype="float32")
    prompt = tokenizer.encode(PROMPT)
    assert len(prompt) > 2 * 8
    out = list(stream_generate(model, tokenizer, prompt, max_tokens=8, prefill_step_size=7))
    assert [r.token for r in out] == greedy_reference(model, prompt, 8)


@pytest.mark.parametrize(
    "config,family,sampling,tail",
    [
        # DeepSeekMoE 16B Chat writes V2's turns ("User: ...\n\nAssistant:")
        ({"model_type": "deepseek"}, "v2", (0.3, 0.95), "User: hi\n\nAssistant:"),
        ({"model_type": "deepseek_v32"}, "v3.2", (1.0, 0.95), "hi<｜Assistant｜></think>"),
        ({"model_type": "kimi_k2"}, "kimi", (0.6, 1.0), "<|im_middle|>"),
        # K2.5 thinks by default (as K2-Thinking): Moonshot's sampling for it
        ({"model_type": "kimi_k25"}, "kimi-thinking", (1.0, 1.0), "<|im_middle|>"),
        # Moonlight is labelled deepseek_v3; its name (or its tiktoken files) says Kimi
        (
            {"model_type": "deepseek_v3", "_name_or_path": "moonshotai/Moonlight-16B-A3B"},
            "kimi",
            (0.6, 1.0),
            "<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>",
        ),
    ],
)
def test_the_chat_knows_each_family_without_a_template(config, family, sampling, tail):
    from mlx_deepseek.formats import chat_format

    fmt = chat_format(None, config)
    assert fmt.family == family and (fmt.temperature, fmt.top_p) == sampling
    assert fmt.render(None, [{"role": "user", "content": "hi"}]).endswith(tail)
