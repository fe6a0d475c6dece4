"""The bench's other ways to reach a context, and MTP drafting.

Modes (how a decode at context C is reached; "cache" is harness.py's own):
- "cache": each runtime's cache filled with random values up to C (no prefill);
- "prefill": C random tokens really prefilled (in chunks), then decoding from there;
- "mlx-first": as "cache", in a child process whose first line is `import mlx.core`, before
  anything of mlx-deepseek (the habit of mlx-lm users' scripts): shows whether the CPU
  speed-ups hold whatever was imported first (mlx_deepseek/_blas.py).

MTP (a model with an MTP layer, mlx-deepseek only): after a real prefill, greedy decoding
plainly and with one draft per step, with the MTP head's own drafts (random weights in a
synthetic model: rarely right) and with perfect drafts (the head's logits plus a large bonus
on the main model's greedy token: its cost, the acceptance of a well-trained head).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import mlx.core as mx

from .. import compiled
from . import metrics
from .runtimes import Runtime, decode_step, decode_tok_s

MODES = ("cache", "prefill", "mlx-first")
PREFILL_CHUNK = 512
MTP_PROMPT = 128
MTP_MIN_TOKENS = 8
PERFECT_BONUS = 1e4  # added to the logit of the main model's greedy token


def _order(runtimes: list[Runtime], rep: int):
    for rt in runtimes if rep % 2 == 0 else runtimes[::-1]:
        yield rt.activate()


def prefilled_cache(rt: Runtime, tokens: mx.array) -> list[Any]:
    """rt's cache after prefilling `tokens` [1, L] in chunks of PREFILL_CHUNK."""
    cache = rt.make_cache()
    for lo in range(0, tokens.shape[1], PREFILL_CHUNK):
        rt.model(tokens[:, lo : lo + PREFILL_CHUNK], cache=cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()
    return cache


def decode_after_prefill(
    runtimes: list[Runtime], ctx: int, tokens: int, repeats: int, log
) -> dict[str, dict[str, Any]]:
    """Decode tok/s per runtime from a cache really prefilled with ctx random tokens."""
    vocab = min(rt.config["vocab_size"] for rt in runtimes)
    prompt = mx.random.randint(2, vocab, (1, ctx), key=mx.random.key(2))
    caches = {}
    for rt in _order(runtimes, 0):
        log(f"  prefill mode: {rt.name} prefills {ctx} tokens")
        t = time.perf_counter()
        caches[rt.name] = prefilled_cache(rt, prompt)
        log(f"    {ctx / (time.perf_counter() - t):.1f} tok/s")
        mx.eval(decode_step(rt, mx.array([[1]]), caches[rt.name]))  # warm up
    samples: dict[str, list[float]] = {rt.name: [] for rt in runtimes}
    for rep in range(repeats):
        for rt in _order(runtimes, rep):
            samples[rt.name].append(decode_tok_s(rt, caches[rt.name], ctx, tokens))
        log(
            f"  decode at {ctx} after prefill ({rep + 1}/{repeats}): "
            + ", ".join(f"{n} {s[-1]:.2f} tok/s" for n, s in samples.items())
        )
    del caches
    mx.clear_cache()
    return {name: metrics.summary(s) for name, s in samples.items()}


# ---- a process that imported mlx first ---------------------------------------------------------

CHILD = "import mlx.core\nfrom mlx_deepseek.bench.child import child_main\nchild_main()\n"


def decode_in_mlx_first_process(
    checkpoints: dict[str, str], dtype: str, contexts: list[int], tokens: int, repeats: int, log
) -> dict[str, Any]:
    """Decode tok/s per runtime and context ("cache" mode) measured in a child process that
    imported mlx.core before mlx_deepseek; also which BLAS MLX called there."""
    job = dict(checkpoints=checkpoints, dtype=dtype, contexts=contexts, tokens=tokens,
               repeats=repeats)  # fmt: skip
    log("  mlx-first mode: a child process that imports mlx.core first")
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in out.stderr.splitlines():
        if line.startswith("  "):
            log(line)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the mlx-first child process failed: {tail[0]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- MTP ---------------------------------------------------------------------------------------


def measure_mtp(rt: Runtime, tokens: int, repeats: int, draft_tokens: int, log) -> dict[str, Any]:
    """Plain vs MTP greedy decoding (mlx-deepseek with an MTP layer): tok/s, acceptance and
    tokens per step, with the head's own drafts and with perfect ones."""
    from mlx_deepseek.decoding import StepOptions, decode_steps
    from mlx_deepseek.sampling import greedy
    from mlx_deepseek.speculative import MTPDecoder

    model = rt.activate().model
    n = max(tokens, MTP_MIN_TOKENS)
    prompt = mx.random.randint(2, rt.config["vocab_size"], (MTP_PROMPT,), key=mx.random.key(3))

    def decode(step_fn) -> tuple[list[int], float]:
        cache = model.make_cache()
        steps = step_fn(model, prompt, cache, StepOptions(greedy, [], n))
        out = [next(steps).token]  # after the prefill
        t = time.perf_counter()
        out += [s.token for s in steps]
        return out, (len(out) - 1) / (time.perf_counter() - t)

    plain_tokens, _ = decode(decode_steps)  # warm up, and the greedy answer
    sequence = prompt.tolist() + plain_tokens
    samples: dict[str, list[float]] = {"plain": [], "own": [], "perfect": []}
    stats: dict[str, Any] = {}
    identical = True
    for rep in range(repeats):
        _, tps = decode(decode_steps)
        samples["plain"].append(tps)
        for kind in ("own", "perfect"):
            decoder = MTPDecoder(draft_tokens)
            with _perfect_drafts(model, sequence) if kind == "perfect" else _nothing():
                out, tps = decode(decoder)
            identical &= out == plain_tokens
            samples[kind].append(tps)
            stats[kind] = decoder.stats
        log(
            f"  MTP ({rep + 1}/{repeats}): plain {samples['plain'][-1]:.2f}, own drafts "
            f"{samples['own'][-1]:.2f}, perfect drafts {samples['perfect'][-1]:.2f} tok/s"
        )
    result: dict[str, Any] = {
        "draft_tokens": draft_tokens,
        "prompt_tokens": MTP_PROMPT,
        "decode_tokens": n,
        "identical_to_plain": identical,
        "plain_tok_s": metrics.summary(samples["plain"]),
    }
    for kind in ("own", "perfect"):
        result[kind] = {
            "tok_s": metrics.summary(samples[kind]),
            "acceptance": stats[kind].acceptance_rate,
            "tokens_per_step": stats[kind].tokens_per_step,
            "speedup": _median_ratio(samples[kind], samples["plain"]),
        }
    return result


def _median_ratio(a: list[float], b: list[float]) -> float:
    import statistics

    return statistics.median(x / y for x, y in zip(a, b, strict=True))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _perfect_drafts:
    """model.mtp_logits plus a bonus on the main model's greedy token at each position (the
    real head still runs: its cost is measured, its acceptance is a perfect head's). In array
    operations on the MTP cache's offset, so that it also works inside a compiled round
    (compiled.py: there the offset is an array)."""

    def __init__(self, model, sequence: list[int]):
        self.model, self.sequence = model, sequence

    def __enter__(self):
        model, seq = self.model, self.sequence
        real_logits, real_hidden = type(model).mtp_logits, type(model).mtp_hidden
        vocab = model.args.vocab_size
        targets = mx.array(list(seq) + [0] * 64)
        state = {"cache": None}

        def mtp_hidden(hidden, next_tokens, depth=0, cache=None):
            state["cache"] = cache
            return real_hidden(model, hidden, next_tokens, depth, cache)

        def mtp_logits(h, depth=0):
            logits = real_logits(model, h, depth)
            pos = mx.array(state["cache"].offset + 1)  # MTP entry i pairs h_i with token i + 1
            pos = mx.minimum(pos, targets.size - 1)
            return logits + mx.where(mx.arange(vocab) == targets[pos], PERFECT_BONUS, 0.0)

        model.mtp_logits, model.mtp_hidden = mtp_logits, mtp_hidden
        compiled.forget(model)  # traces made with the real head
        return self

    def __exit__(self, *exc):
        compiled.forget(self.model)
        del self.model.mtp_logits, self.model.mtp_hidden
        return False
