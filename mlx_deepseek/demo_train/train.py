"""Train the demo model: ``python -m mlx_deepseek.demo_train.train [--out DIR]``.

Trains mlx_deepseek.model.Model (the product's own model class) with the config in
config.py on the CPU with a fixed seed: next-token loss on the assistant's tokens plus
0.3 x the MTP module's next-next-token loss, AdamW, and DeepSeek-V3's auxiliary-loss-free
load balancing. Writes the Hugging Face layout (export.py) to --out; then convert it with
``mlx-deepseek convert`` and evaluate with evaluate.py (see README.md here).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

# (mlx_deepseek/__init__ has already preloaded OpenBLAS: this module lives inside it)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_deepseek.models.config import ModelArgs
from mlx_deepseek.models.deepseek_v3 import Model

from .config import CONFIG, TRAIN_CONTEXT, count_parameters
from .data import make_split
from .evaluate import arithmetic_accuracy
from .export import export_hf
from .packing import Packer
from .routing import LoadBalancer, moe_layers
from .tokenizer import save_tokenizer, train_tokenizer

SEED = 0
DEFAULTS = dict(
    steps=8000,
    batch=4,
    lr=3e-3,
    min_lr=2e-4,
    warmup=150,
    weight_decay=0.05,
    mtp_weight=0.3,
    bias_gamma=1e-3,
    clip=1.0,
)


def build_model(args: ModelArgs) -> Model:
    model = Model(args)
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


def make_loss(mtp_weight: float):
    def loss_fn(model: Model, ids: mx.array, mask: mx.array):
        x = ids[:, :-1]  # [B, L]
        logits, h = model.forward_with_hidden(x)
        main, main_ok = masked_ce(logits, ids[:, 1:], mask[:, 1:])
        # MTP: from h_i and token i+1, predict token i+2
        mtp_logits, _ = model.mtp_forward(h[:, :-1], x[:, 1:])
        mtp, mtp_ok = masked_ce(mtp_logits, ids[:, 2:], mask[:, 2:])
        return main + mtp_weight * mtp, (main, mtp, main_ok, mtp_ok)

    return loss_fn


def lr_schedule(step: int, hp: dict) -> float:
    if step < hp["warmup"]:
        return hp["lr"] * (step + 1) / hp["warmup"]
    t = (step - hp["warmup"]) / max(1, hp["steps"] - hp["warmup"])
    return hp["min_lr"] + 0.5 * (hp["lr"] - hp["min_lr"]) * (1 + math.cos(math.pi * t))


def train(out: Path, hp: dict, log_every: int = 100, eval_every: int = 1000) -> dict:
    random.seed(SEED)
    np.random.seed(SEED)
    mx.random.seed(SEED)
    t_start = time.time()

    tok = train_tokenizer()
    save_tokenizer(tok, out)
    split = make_split()
    packer = Packer(tok, TRAIN_CONTEXT + 1)
    rng = random.Random(SEED)

    args = ModelArgs.from_dict(CONFIG)
    model = build_model(args)
    balancer = LoadBalancer(model, hp["bias_gamma"])
    total, mtp_params, active = count_parameters()
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    if n != total + mtp_params:
        raise RuntimeError(f"model has {n} parameters, count_parameters says {total + mtp_params}")
    print(f"parameters: {total:,} main (+{mtp_params:,} MTP), {active:,} active per token")

    hf_tok = _hf_tokenizer(out)
    opt = optim.AdamW(learning_rate=hp["lr"], betas=[0.9, 0.95], weight_decay=hp["weight_decay"])
    loss_and_grad = nn.value_and_grad(model, make_loss(hp["mtp_weight"]))
    history = []
    window: list[list[float]] = []
    t_train = time.time()
    for step in range(hp["steps"]):
        ids_np, mask_np = packer.batch(rng, split, hp["batch"])
        ids, mask = mx.array(ids_np), mx.array(mask_np)
        opt.learning_rate = lr_schedule(step, hp)
        (loss, (main, mtp, main_ok, mtp_ok)), grads = loss_and_grad(model, ids, mask)
        grads, _ = optim.clip_grad_norm(grads, hp["clip"])
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss, main_ok, mtp_ok)
        real = ids_np[:, :-1] != packer.pad
        loads = balancer.update(
            {
                name: real if name.startswith("model.") else real[:, 1:]
                for name, _ in balancer.layers
            }
        )
        n_main, n_mtp = mask_np[:, 1:].sum(), mask_np[:, 2:].sum()
        window.append([main.item(), mtp.item(), main_ok.item() / n_main, mtp_ok.item() / n_mtp])
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
                max_expert_load=round(worst, 3),
                s_per_step=round(elapsed / (step + 1), 3),
                elapsed_s=round(elapsed),
            )
            history.append(row)
            print(json.dumps(row), flush=True)
        if eval_every and (step + 1) % eval_every == 0:
            acc = arithmetic_accuracy(model, hf_tok, split, limit=64)
            print(json.dumps({"step": step + 1, "heldout_sample_acc": acc}), flush=True)

    train_s = time.time() - t_train
    export_hf(model, CONFIG, out)
    summary = dict(
        train_seconds=round(train_s),
        total_seconds=round(time.time() - t_start),
        steps=hp["steps"],
        tokens_per_step=hp["batch"] * TRAIN_CONTEXT,
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
    p.add_argument("--eval-every", type=int, default=1000, help="0: no evaluation while training")
    a = p.parse_args()
    hp = {k: getattr(a, k) for k in DEFAULTS}
    a.out.mkdir(parents=True, exist_ok=True)
    train(a.out, hp, eval_every=a.eval_every)


if __name__ == "__main__":
    main()
