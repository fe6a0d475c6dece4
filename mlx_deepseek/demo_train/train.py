"""Train the demo model: ``python -m mlx_deepseek.demo_train.train [--out DIR]``.

Trains mlx_deepseek.models.deepseek_v3.Model (the product's own model class) with the
config in config.py on the CPU with a fixed seed: next-token loss on the assistant's tokens
plus 0.3 x the MTP module's next-next-token loss, AdamW, and DeepSeek-V3's
auxiliary-loss-free load balancing. Two phases, as DeepSeek builds its long context:

1. short: plain rope, rows of up to SHORT_CONTEXT tokens (a mix of lengths);
2. long: YaRN on (factor 4 over SHORT_CONTEXT), rows of up to LONG_CONTEXT tokens.

Writes the Hugging Face layout (export.py) to --out; then convert it with
``mlx-deepseek convert`` and evaluate with evaluate.py (see README.md here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from functools import partial
from pathlib import Path

# (mlx_deepseek/__init__ has already preloaded OpenBLAS: this module lives inside it)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .arch import ARCHS
from .config import LONG_CONTEXT, SHORT_CONTEXT
from .dialogues import Drills, parse_boost
from .packing import Packer, Renderer, corpus
from .routing import LoadBalancer, moe_layers
from .tokenizer import save_tokenizer, train_tokenizer
from .tools import vocab_pieces
from .v4 import index_loss, init_model, training_cache

SEED = 0
DEFAULTS = dict(
    steps=3900,
    long_steps=300,  # the last steps, with YaRN on long rows
    tokens=1024,  # per step (rows x row length)
    lr=3e-3,
    min_lr=2e-4,
    warmup=150,
    weight_decay=0.05,
    mtp_weight=0.3,
    bias_gamma=1e-3,
    clip=1.0,
    init="",  # an earlier demo package to start from (warmstart.py); "": from scratch
    tool_focus=0.0,  # share of steps that are tool-focused SHORT_CONTEXT rows (stage 3)
    arch="v3",  # arch.ARCHS: "v3" (the demo package) or "v4" (demo-v4)
    index_weight=0.1,  # V4: the indexer's loss (v4.index_loss)
    boost="",  # task weight factors, "sub2=2,add2=1.5" (dialogues.TASKS' names)
    splice=0.0,  # share of echo texts and made-up meanings of spliced words (tools.spliced)
    token_text=0.0,  # share of them of random vocabulary pieces (tools.token_text)
    phrase=0.0,  # share of them of short words in random order (tools.phrase_text)
    punct=0.0,  # share of those three kinds with commas and semicolons (tools.punctuate)
)
# (row length, share of steps, tools allowed): the tools block alone is ~260 tokens
SHORT_MIX = [(128, 0.3, False), (256, 0.35, False), (SHORT_CONTEXT, 0.35, True)]
LONG_MIX = [(LONG_CONTEXT, 0.5, True), (SHORT_CONTEXT, 0.25, True), (256, 0.25, False)]


def resumable(saved: dict, hp: dict) -> bool:
    """Whether a checkpoint written with `saved` continues as `hp`: the same values, an
    option the checkpoint predates taken at its default (every option's default draws what
    the data drew before it existed, so --punct 0 resumes a run from before --punct)."""
    return {**DEFAULTS, **saved} == hp


def phase_config(long: bool, arch: str = "v3") -> dict:
    """The short phase's config has plain rope over SHORT_CONTEXT; the long one is CONFIG."""
    return ARCHS[arch].phase_config(long)


def build_model(config: dict, arch: str = "v3"):
    model = ARCHS[arch].model(config)
    if arch == "v4":
        return init_model(model, SEED)
    # The router starts from zeros in the model class (weights come from checkpoints); a
    # trained router needs a random start, scaled like a Linear layer's.
    for _, moe in moe_layers(model):
        w = moe.gate.weight
        moe.gate.weight = mx.random.uniform(-1, 1, w.shape) / math.sqrt(w.shape[1])
    return model


def masked_ce(logits: mx.array, targets: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """(mean cross-entropy over mask, number of correct argmax predictions over mask)."""
    ce = nn.losses.cross_entropy(logits, targets) * mask
    correct = ((logits.argmax(-1) == targets) * mask).sum()
    return ce.sum() / mx.maximum(mask.sum(), 1), correct


def make_loss(mtp_weight: float, index_weight: float = 0.0):
    """Next-token CE + mtp_weight x the MTP module's next-next-token CE (+ index_weight x the
    V4 indexer's loss, v4.index_loss)."""

    def loss_fn(model, ids: mx.array, mask: mx.array):
        x = ids[:, :-1]  # [B, L]
        cache = training_cache(model)  # V4: fresh caches, its inference path
        logits, h = model.forward_with_hidden(x, cache)
        main, main_ok = masked_ce(logits, ids[:, 1:], mask[:, 1:])
        # MTP: from h_i and token i+1, predict token i+2
        mtp_cache = None if cache is None else cache.mtp[0]
        mtp_logits, _ = model.mtp_forward(h[:, :-1], x[:, 1:], cache=mtp_cache)
        mtp, mtp_ok = masked_ce(mtp_logits, ids[:, 2:], mask[:, 2:])
        index = index_loss(cache)
        loss = main + mtp_weight * mtp + index_weight * index
        return loss, (main, mtp, main_ok, mtp_ok, index)

    return loss_fn


def lr_schedule(step: int, hp: dict) -> float:
    if step < hp["warmup"]:
        return hp["lr"] * (step + 1) / hp["warmup"]
    t = (step - hp["warmup"]) / max(1, hp["steps"] - hp["warmup"])
    return hp["min_lr"] + 0.5 * (hp["lr"] - hp["min_lr"]) * (1 + math.cos(math.pi * t))


class Trainer:
    """One model, its optimiser and load balancer; `extend()` switches YaRN on.

    A step (loss, gradients, clipping, AdamW) is one mx.compile'd function over the model's
    and the optimiser's state; the routers' choices come out of it for the load balancer.
    """

    def __init__(self, hp: dict, long: bool = False, checkpoint: Path | None = None):
        self.hp = hp
        self.model = build_model(phase_config(long, hp["arch"]), hp["arch"])
        self.opt = optim.AdamW(
            learning_rate=hp["lr"], betas=[0.9, 0.95], weight_decay=hp["weight_decay"]
        )
        if checkpoint is not None:
            self.model.load_weights(str(checkpoint / "model.safetensors"))
            state = mx.load(str(checkpoint / "optimizer.safetensors"))
            self.opt.state = tree_unflatten(list(state.items()))
        self._attach()

    def _attach(self) -> None:
        model, opt, hp = self.model, self.opt, self.hp
        self.balancer = balancer = LoadBalancer(model, hp["bias_gamma"])
        names = [name for name, _ in balancer.layers]
        opt.init(model.trainable_parameters())  # the compiled step's state exists up front
        loss_fn = make_loss(hp["mtp_weight"], hp["index_weight"])

        def with_choices(model, ids: mx.array, mask: mx.array):
            loss, aux = loss_fn(model, ids, mask)
            return loss, (aux, [balancer.chosen[n] for n in names])

        loss_and_grad = nn.value_and_grad(model, with_choices)
        state = [model.state, opt.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(ids: mx.array, mask: mx.array):
            (_, (aux, chosen)), grads = loss_and_grad(model, ids, mask)
            grads, _ = optim.clip_grad_norm(grads, hp["clip"])
            opt.update(model, grads)
            return aux, chosen

        self._step, self._names, self._state = step, names, state

    def extend(self) -> None:
        """The long phase: the same weights in a model whose rope is YaRN-scaled."""
        weights = tree_flatten(self.model.parameters())
        self.model = ARCHS[self.hp["arch"]].model(phase_config(True, self.hp["arch"]))
        self.model.load_weights(weights)
        self._attach()

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(
            str(folder / "model.safetensors"), dict(tree_flatten(self.model.parameters()))
        )
        mx.save_safetensors(
            str(folder / "optimizer.safetensors"), dict(tree_flatten(self.opt.state))
        )

    def step(self, ids_np: np.ndarray, mask_np: np.ndarray, lr: float, pad: int):
        self.opt.learning_rate = lr
        aux, chosen = self._step(mx.array(ids_np), mx.array(mask_np))
        mx.eval(self._state, aux, chosen)
        main, mtp, main_ok, mtp_ok, index = aux
        self.balancer.chosen = dict(zip(self._names, chosen, strict=True))
        real = ids_np[:, :-1] != pad
        loads = self.balancer.update(
            {name: real if name.startswith("model.") else real[:, 1:] for name in self._names}
        )
        n_main, n_mtp = max(mask_np[:, 1:].sum(), 1), max(mask_np[:, 2:].sum(), 1)
        stats = [main.item(), mtp.item(), main_ok.item() / n_main, mtp_ok.item() / n_mtp]
        stats.append(index.item())
        return stats, loads


def _pick(rng: random.Random, mix: list) -> tuple[int, bool]:
    length, _, tools = rng.choices(mix, weights=[w for _, w, _ in mix])[0]
    return length, tools


def _save_checkpoint(
    folder: Path, trainer: Trainer, rng: random.Random, hp: dict, step: int, history: list,
    t_train: float, cpu_train: float,
) -> None:  # fmt: skip
    """Weights, optimiser state and the data stream's position: --resume continues exactly."""
    tmp = folder.with_name(folder.name + ".tmp")
    trainer.save(tmp)
    version, state, gauss = rng.getstate()
    progress = dict(
        step=step, hp=hp, rng=[version, list(state), gauss], history=history,
        seconds=time.time() - t_train, cpu_seconds=time.process_time() - cpu_train,
    )  # fmt: skip
    (tmp / "progress.json").write_text(json.dumps(progress))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def train(
    out: Path,
    hp: dict,
    log_every: int = 50,
    eval_every: int = 500,
    ckpt_every: int = 250,
    resume: bool = False,
) -> dict:
    from .evaluate import arithmetic_accuracy

    random.seed(SEED)
    np.random.seed(SEED)
    mx.random.seed(SEED)
    t_start, cpu_start = time.time(), time.process_time()

    arch = ARCHS[hp["arch"]]
    tok = train_tokenizer(corpus(arch=arch.name), added=arch.added)
    save_tokenizer(tok, out, arch.chat_template)
    renderer = Renderer(
        arch=arch.name,
        boost=parse_boost(hp["boost"]),
        drills=Drills(
            splice=hp["splice"],
            token_share=hp["token_text"],
            pieces=tuple(vocab_pieces(tok)) if hp["token_text"] else (),
            phrase=hp["phrase"],
            punct=hp["punct"],
        ),
    )
    packer = Packer(tok, renderer)
    rng = random.Random(SEED)

    ckpt = out / "checkpoint"
    progress = {"step": 0, "seconds": 0.0, "cpu_seconds": 0.0, "history": []}
    long_from = hp["steps"] - hp["long_steps"]
    if resume and (ckpt / "progress.json").exists():
        progress = json.loads((ckpt / "progress.json").read_text())
        if not resumable(progress["hp"], hp):
            raise RuntimeError(f"{ckpt} was written with other hyperparameters: {progress['hp']}")
        version, state, gauss = progress["rng"]
        rng.setstate((version, tuple(state), gauss))
        trainer = Trainer(hp, progress["step"] > long_from, ckpt)
        print(f"resumed from {ckpt} at step {progress['step']}")
    else:
        trainer = Trainer(hp)
        if hp["init"]:
            from .warmstart import warm_start

            counts = warm_start(trainer.model, Path(hp["init"]), out / "tokenizer.json")
            print(f"warm start from {hp['init']}: {counts}")
    total, mtp_params, active = arch.count_parameters()
    n = sum(v.size for _, v in tree_flatten(trainer.model.parameters()))
    if n != total + mtp_params:
        raise RuntimeError(f"model has {n} parameters, count_parameters says {total + mtp_params}")
    print(f"parameters: {total:,} main (+{mtp_params:,} MTP), {active:,} active per token")

    hf_tok = _hf_tokenizer(out)
    history = progress["history"]
    window: list[list[float]] = []
    t_train = time.time() - progress["seconds"]
    cpu_train = time.process_time() - progress["cpu_seconds"]
    for step in range(progress["step"], hp["steps"]):
        if step == long_from:
            trainer.extend()
            print(json.dumps({"step": step, "phase": "long: YaRN on"}), flush=True)
        # tool-focused rows (dialogues.FOCUS_TASKS); no draw at all without them
        focus = bool(hp["tool_focus"]) and rng.random() < hp["tool_focus"]
        if focus:
            length, tools = SHORT_CONTEXT, True
        else:
            length, tools = _pick(rng, LONG_MIX if step >= long_from else SHORT_MIX)
        rows = max(1, hp["tokens"] // length)
        ids_np, mask_np = packer.batch(rng, rows, length + 1, tools, tool_focus=focus)
        stats, loads = trainer.step(ids_np, mask_np, lr_schedule(step, hp), packer.pad)
        window.append(stats)
        if (step + 1) % log_every == 0 or step == hp["steps"] - 1:
            m = np.mean(window, axis=0)
            window.clear()
            elapsed = time.time() - t_train
            worst = max(float(v.max()) for v in loads.values())
            row = dict(
                step=step + 1,
                loss=round(float(m[0]), 4),
                mtp_loss=round(float(m[1]), 4),
                acc=round(float(m[2]), 4),
                mtp_acc=round(float(m[3]), 4),
                index_loss=round(float(m[4]), 4),
                max_expert_load=round(worst, 3),
                s_per_step=round(elapsed / (step + 1), 3),
                elapsed_s=round(elapsed),
                cpu_s=round(time.process_time() - cpu_train),
                load=round(os.getloadavg()[0], 1),
            )
            history.append(row)
            print(json.dumps(row), flush=True)
        if eval_every and (step + 1) % eval_every == 0:
            acc = arithmetic_accuracy(trainer.model, hf_tok, limit=48)
            acc.pop("misses")
            print(json.dumps({"step": step + 1, "heldout_sample": acc}), flush=True)
        if ckpt_every and (step + 1) % ckpt_every == 0 and step + 1 < hp["steps"]:
            _save_checkpoint(ckpt, trainer, rng, hp, step + 1, history, t_train, cpu_train)

    train_s, cpu_s = time.time() - t_train, time.process_time() - cpu_train
    arch.export(trainer.model, arch.config, out)
    summary = dict(
        train_seconds=round(train_s),
        train_cpu_seconds=round(cpu_s),
        total_seconds=round(time.time() - t_start),
        total_cpu_seconds=round(time.process_time() - cpu_start),
        steps=hp["steps"],
        tokens_per_step=hp["tokens"],
        parameters_main=total,
        parameters_mtp=mtp_params,
        parameters_active_per_token=active,
        hyperparameters=hp,
        history=history,
    )
    with open(out / "training_log.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"trained in {train_s / 60:.1f} min; Hugging Face layout written to {out}")
    return summary


def _hf_tokenizer(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo_hf"), help="output folder (HF layout)")
    for k, v in DEFAULTS.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    p.add_argument("--eval-every", type=int, default=500, help="0: no evaluation while training")
    p.add_argument("--ckpt-every", type=int, default=250, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint/")
    a = p.parse_args()
    hp = {k: getattr(a, k) for k in DEFAULTS}
    try:
        parse_boost(hp["boost"])
    except ValueError as e:
        p.error(str(e))
    a.out.mkdir(parents=True, exist_ok=True)
    train(a.out, hp, eval_every=a.eval_every, ckpt_every=a.ckpt_every, resume=a.resume)


if __name__ == "__main__":
    main()
