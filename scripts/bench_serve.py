"""Benchmark `mlx-deepseek serve` on the V2-Lite bench shape (mlx_deepseek/bench/models.py),
over HTTP, in one run on this machine:

1. aggregate decode tokens/s with 8 concurrent streams vs 1;
2. the same against `mlx_lm.server` serving the same bf16 source quantized by mlx-lm, with
   mlx-lm's own model class (its BatchGenerator batching concurrent requests);
3. time to first token for a repeated 2K-token prefix vs cold (the prefix cache);
4. a load test: 64 requests at concurrency 8, none lost, p50/p99 latency;
5. a fuzz of the malformed requests from tests/test_serve_errors.py: all 4xx, server alive.

The synthetic checkpoints have random weights and no tokenizer: a word-level tokenizer with
one word per id ("w123") is written beside them, so any generated id decodes. Every number
is printed; the machine is shared, so each timing is repeated and the spread shown.

    .venv/bin/python scripts/bench_serve.py [--tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def word_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "w0",
        "eos_token": "w1",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": "{% for m in messages %}w3 {{ m['content'] }} {% endfor %}w4",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def serving_folder(checkpoint: Path, vocab: int) -> Path:
    """The checkpoint's files hard-linked (or copied) into a temporary folder, plus the
    tokenizer: not symlinked, as the loader refuses shards that lead out of their folder."""
    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    for f in checkpoint.iterdir():
        if not f.name.startswith("tokenizer"):
            try:
                os.link(f, folder / f.name)
            except OSError:  # another file system
                shutil.copy2(f, folder / f.name)
    word_tokenizer(folder, vocab)
    return folder


def post(url: str, body: dict, timeout: float = 3600) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def first_token_time(url: str, body: dict) -> float:
    """Seconds until the first content chunk of a streamed completion."""
    req = urllib.request.Request(url, json.dumps(body | {"stream": True}).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=3600) as r:
        for line in r:
            if line.startswith(b"data: {") and b'"text": "' in line and b'"text": ""' not in line:
                first = time.perf_counter() - t0
                for _ in r:  # drain
                    pass
                return first
    raise RuntimeError("no token came back")


def prompt_ids(n: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(5, 16000)}" for _ in range(n))


def aggregate(url: str, model: str, streams: int, tokens: int, seed: int) -> tuple[float, int]:
    """(decode tokens/s over all streams, tokens generated) for `streams` concurrent
    completions of `tokens` tokens each (short prompts: the time is decode)."""

    def one(i: int) -> int:
        body = {"model": model, "prompt": prompt_ids(8, seed + i), "max_tokens": tokens}
        body["temperature"] = 0.0
        status, out = post(url + "/v1/completions", body)
        if status != 200:
            raise RuntimeError(f"status {status}: {out}")
        return out["usage"]["completion_tokens"]

    with ThreadPoolExecutor(streams) as pool:
        t0 = time.perf_counter()
        counts = list(pool.map(one, range(streams)))
        wall = time.perf_counter() - t0
    return sum(counts) / wall, sum(counts)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"


def wait_up(url: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def throughput(url: str, model: str, args: argparse.Namespace, label: str) -> dict:
    aggregate(url, model, 2, 4, 999)  # warm-up (compiles, allocations)
    one, eight = [], []
    for r in range(args.repeats):
        one.append(aggregate(url, model, 1, args.tokens, 100 * r)[0])
        eight.append(aggregate(url, model, 8, args.tokens, 100 * r + 10)[0])
    print(f"  {label}: 1 stream  {spread(one)} tok/s")
    print(f"  {label}: 8 streams {spread(eight)} tok/s aggregate")
    return {"one": one, "eight": eight}


def time_to_first_token(url: str, args: argparse.Namespace) -> list[float]:
    """Part 3: a 2K-token prompt cold, then the same prefix with a new ending."""
    print("3. time to first token, 2K-token prompt")
    cold, warm = [], []
    for r in range(args.repeats):
        prefix = prompt_ids(2048, 7000 + r)
        body = {"model": "v2-lite", "prompt": prefix + " w5", "max_tokens": 2}
        cold.append(first_token_time(url + "/v1/completions", body))
        body["prompt"] = prefix + " w6 w7"
        warm.append(first_token_time(url + "/v1/completions", body))
    ratio = [w / c for w, c in zip(warm, cold, strict=True)]
    print(f"  cold {spread(cold)} s; repeated prefix {spread(warm)} s; ratio {spread(ratio)}")
    return ratio


def load_test(url: str) -> None:
    """Part 4: 64 requests at concurrency 8, none lost; p50 / p99 latency."""
    print("4. load test: 64 requests, concurrency 8")
    latencies: list[float] = []

    def timed(i: int) -> int:
        t0 = time.perf_counter()
        body = {"model": "v2-lite", "prompt": prompt_ids(16 + i % 5 * 30, i), "max_tokens": 16}
        status, out = post(url + "/v1/completions", body)
        latencies.append(time.perf_counter() - t0)
        return status if status != 200 else (200 if out["choices"][0]["text"] else 0)

    with ThreadPoolExecutor(8) as pool:
        t0 = time.perf_counter()
        statuses = list(pool.map(timed, range(64)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    ok = statuses.count(200)
    print(
        f"  {ok}/64 answered 200 in {wall:.1f} s; latency p50 {statistics.median(lat):.2f} s,"
        f" p99 {p99:.2f} s, max {lat[-1]:.2f} s"
    )


def fuzz(url: str) -> None:
    """Part 5: the malformed requests of tests/test_serve_errors.py; each must be a 4xx that
    names the field (a request this model accepts, e.g. one only too long for the tests' tiny
    context, is cut short by the timeout and listed)."""
    print("5. fuzz of malformed requests")
    from test_serve_errors import BAD

    codes = []
    for path, body, field in BAD:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(url + path, data, method="POST")
        req.add_header("Content-Type", "application/json")
        try:
            urllib.request.urlopen(req, timeout=60)
            codes.append((200, field, None))
        except urllib.error.HTTPError as e:
            codes.append((e.code, field, json.loads(e.read())["error"]["param"]))
        except TimeoutError:
            codes.append((0, field, None))
    named = sum(1 for c, f, p in codes if 400 <= c < 500 and p == f)
    bad4xx = sum(1 for c, _, _ in codes if 400 <= c < 500)
    alive = post(url + "/v1/completions", {"prompt": "w5", "max_tokens": 2})[0] == 200
    print(f"  {bad4xx}/{len(codes)} got 4xx, {named} named the field; server alive: {alive}")
    accepted = [f for c, f, _ in codes if not 400 <= c < 500]
    if accepted:
        print(f"  accepted by this model (not 4xx): {', '.join(accepted)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32, help="tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-mlx-lm", action="store_true")
    ap.add_argument("--parts", default="1,2,3,4,5", help="which of the numbered parts to run")
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",")}

    from mlx_deepseek.bench.models import prepare, v2_lite_shape
    from mlx_deepseek.cli.generate import load_checkpoint
    from mlx_deepseek.serve.server import BackgroundServer, make_state

    shape = v2_lite_shape()
    ckpts = prepare(shape)
    vocab = shape.config["vocab_size"]
    ours_dir = serving_folder(ckpts.ours, vocab)
    print(f"V2-Lite bench shape ({'; '.join(shape.scaled)}), 4-bit; {os.cpu_count()} CPUs")
    print(f"load average at start: {os.getloadavg()}")

    model, tok, fmt, _ = load_checkpoint(str(ours_dir), quiet=True)
    state = make_state(model, tok, fmt, "v2-lite", max_batch=8, max_queue=128)
    print(f"engine: batched forward = {state.engine.batched}")
    results = {}
    with BackgroundServer(state) as server:
        url = server.url
        if 1 in parts:
            print("1. throughput (completions of", args.tokens, "tokens, greedy)")
            results["ours"] = throughput(url, "v2-lite", args, "mlx-deepseek")
        if 3 in parts:
            ratio = time_to_first_token(url, args)
        if 4 in parts:
            load_test(url)
        if 5 in parts:
            fuzz(url)

    if 2 in parts and not args.skip_mlx_lm:
        print("2. mlx_lm.server on the same source (mlx-lm's quantization and model class)")
        lm_dir = serving_folder(ckpts.mlx_lm, vocab)
        port = 18000 + os.getpid() % 1000
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlx_lm",
                "server",
                "--model",
                str(lm_dir),
                "--port",
                str(port),
                "--decode-concurrency",
                "8",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            lm_url = f"http://127.0.0.1:{port}"
            wait_up(lm_url)
            results["mlx_lm"] = throughput(lm_url, str(lm_dir), args, "mlx_lm.server")
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print("summary")
    if "ours" in results:
        ours = results["ours"]
        s1, s8 = statistics.median(ours["one"]), statistics.median(ours["eight"])
        print(f"  8 streams vs 1 (ours): {s8 / s1:.2f}x (target >= 3x)")
        if "mlx_lm" in results:
            lm8 = statistics.median(results["mlx_lm"]["eight"])
            print(f"  ours vs mlx_lm.server at 8 streams: {s8 / lm8:.2f}x (target >= 1x)")
    if 3 in parts:
        print(f"  TTFT repeated 2K prefix / cold: {statistics.median(ratio):.3f} (target <= 0.1)")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
