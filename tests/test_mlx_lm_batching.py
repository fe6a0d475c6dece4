"""mlx-lm's batched generation drives mlx-deepseek's model: `mlx_lm.batch_generate` and
`mlx_lm.server` (its BatchGenerator) left-pad the rows and give each its own offset, which
the model must honour in the mask and the RoPE positions; each sequence must then get exactly
its single-sequence output. mlx-lm's `kv_bits` (its QuantizedKVCache) is refused in one line.
"""

from __future__ import annotations

import json
import threading
import urllib.request

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import batch_generate
from mlx_lm.generate import generate as lm_generate
from mlx_lm.models.cache import QuantizedKVCache
from mlx_lm.models.mla import MultiLinear
from tiny_chat import tiny_checkpoint

import mlx_deepseek
from mlx_deepseek import ops
from mlx_deepseek.errors import DeepSeekError
from mlx_deepseek.ops import cpu

# different lengths: the batch is left-padded, every row at its own offset
PROMPTS = [
    "Hello, how are you today?",
    "Tell me a story about a dragon who lived in a cave by the sea.",
    "def add(a, b):",
]
MAX_TOKENS = 10


@pytest.fixture
def model_and_tokenizer():
    model, tokenizer = mlx_deepseek.load(tiny_checkpoint())  # a fresh copy: tests change it
    for i, layer in enumerate(model.layers):  # the checkpoint's routers are zeros: all ties
        if hasattr(layer.mlp, "gate"):
            shape = layer.mlp.gate.weight.shape
            layer.mlp.gate.weight = mx.random.normal(shape, key=mx.random.key(i))
    nn.quantize(  # 4-bit, as users run it (the MoE kernels take only quantized experts)
        model,
        32,
        4,
        class_predicate=lambda _, m: (
            hasattr(m, "to_quantized")
            and not isinstance(m, MultiLinear)  # W_uk / W_uv: 16-wide rows, under a group
            and m.weight.shape[-1] % 32 == 0
        ),
    )
    mx.eval(model.parameters())  # a graph built here cannot be evaluated in a server's thread
    return model, tokenizer


def singles(model, tokenizer, ids: list[list[int]]) -> list[list[int]]:
    """Greedy token ids per prompt, one sequence at a time, by mlx-deepseek's own loop."""
    out = []
    for prompt in ids:
        steps = mlx_deepseek.stream_generate(model, tokenizer, prompt, MAX_TOKENS, mtp=False)
        out.append([r.token for r in steps])
    return out


@pytest.mark.parametrize(
    "backend", ["mlx", "cpu-split", pytest.param("metal", marks=pytest.mark.emulator)]
)
def test_batch_generate_equals_one_sequence_at_a_time(backend, model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    ids = [tokenizer.encode(p) for p in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids)
    expected = singles(model, tokenizer, ids)
    name = backend
    if backend == "cpu-split":  # every matmul, MoE and attention split over 3 streams
        monkeypatch.setattr(cpu, "MIN_PART_BYTES", 1)
        monkeypatch.setenv(cpu.ENV_THREADS, "3")
        name = "cpu"
    if backend == "metal":  # the kernels that apply to a batch (the emulator on a CPU)
        from kernel_support import metal

        context = metal(monkeypatch, "norm", "router", "moe")
    else:
        context = ops.use(name)
    with context:
        if backend == "cpu-split":
            assert cpu.prepare(model) > 0
        got = batch_generate(model, tokenizer, ids, max_tokens=MAX_TOKENS, return_token_ids=True)
    assert got.token_ids == expected
    # and mlx-lm's own single-sequence loop over our model agrees
    text = lm_generate(model, tokenizer, ids[1], max_tokens=MAX_TOKENS)
    assert text == tokenizer.decode(expected[1])


def test_mlx_lm_server_batches_our_model(model_and_tokenizer, monkeypatch):
    """mlx_lm.server with mlx-deepseek's model (its loader swapped for ours), three requests
    at once: each completion equals the single-sequence greedy one."""
    from http.server import ThreadingHTTPServer

    from mlx_lm import server

    model, tokenizer = model_and_tokenizer
    path = str(tiny_checkpoint())

    def load(model_path, **kwargs):
        assert model_path == path
        config = json.loads((tiny_checkpoint() / "config.json").read_text())
        return (model, tokenizer, config) if kwargs.get("return_config") else (model, tokenizer)

    monkeypatch.setattr(server, "load", load)
    # mlx_lm.server's own command line, defaults and all, up to the point it would serve
    providers = []
    monkeypatch.setattr(server, "run", lambda host, port, provider: providers.append(provider))
    argv = ["mlx_lm.server", "--model", path, "--temp", "0", "--max-tokens", str(MAX_TOKENS)]
    monkeypatch.setattr("sys.argv", argv)
    server.main()
    (provider,) = providers
    cache = server.LRUPromptCache(10)
    generator = server.ResponseGenerator(provider, cache)
    httpd = ThreadingHTTPServer(
        ("127.0.0.1", 0),
        lambda *a, **k: server.APIHandler(generator, *a, **k),
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        body = {"prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "temperature": 0.0}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            results[i] = json.loads(response.read())["choices"][0]["text"]

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert provider.is_batchable  # so the three were decoded as one batch
    finally:
        httpd.shutdown()
        generator.stop_and_join()
    ids = [tokenizer.encode(p) for p in PROMPTS]
    expected = [tokenizer.decode(t) for t in singles(model, tokenizer, ids)]
    assert [results.get(i) for i in range(len(PROMPTS))] == expected


def test_mlx_lm_kv_bits_is_refused_in_one_line(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode(PROMPTS[1])
    with pytest.raises(DeepSeekError, match="kv_bits") as e:
        lm_generate(model, tokenizer, prompt, max_tokens=4, kv_bits=4, quantized_kv_start=0)
    assert "\n" not in str(e.value)
    # a cache quantized by mlx-lm's own class (e.g. one loaded from a prompt-cache file)
    cache = model.make_cache()
    cache[:] = [QuantizedKVCache(group_size=32, bits=8) for _ in cache]
    with pytest.raises(DeepSeekError, match="kv_bits"):
        model(mx.array([prompt]), cache=cache)
