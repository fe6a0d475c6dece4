"""DeepSeek-V3's MTP layer loads from the checkpoint's layer `num_hidden_layers` and computes
the same function as transformers' decoder layer wrapped in DeepSeek's MTP equations."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import add_mtp_layer, build_hf_model, save_hf_checkpoint

import mlx_deepseek

TOKENS = np.random.RandomState(3).randint(2, 320, size=(2, 10))


def rms(x, w, eps=1e-6):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def torch_mtp_reference(hf, mtp, n, hidden, next_tokens):
    """DeepSeek's MTP equations around transformers' own DeepseekV3DecoderLayer."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    config = hf.config
    config._attn_implementation = "eager"
    layer = DeepseekV3DecoderLayer(config, layer_idx=n).eval()
    p = f"model.layers.{n}."
    state = {}
    for name in layer.state_dict():
        if name == "mlp.experts.gate_up_proj":
            E = config.n_routed_experts
            state[name] = torch.stack(
                [
                    torch.cat(
                        [
                            torch.from_numpy(mtp[f"{p}mlp.experts.{e}.{w}.weight"])
                            for w in ("gate_proj", "up_proj")
                        ]
                    )
                    for e in range(E)
                ]
            )
        elif name == "mlp.experts.down_proj":
            E = config.n_routed_experts
            state[name] = torch.stack(
                [torch.from_numpy(mtp[f"{p}mlp.experts.{e}.down_proj.weight"]) for e in range(E)]
            )
        else:
            state[name] = torch.from_numpy(mtp[p + name])
    layer.load_state_dict(state)
    t = lambda k: torch.from_numpy(mtp[p + k])  # noqa: E731
    with torch.no_grad():
        emb = torch.nn.functional.embedding(next_tokens, t("embed_tokens.weight"))
        x = (
            torch.cat([rms(emb, t("enorm.weight")), rms(hidden, t("hnorm.weight"))], -1)
            @ t("eh_proj.weight").T
        )
        L = x.shape[1]
        pos = torch.arange(L)[None]
        mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
        x = layer(
            x,
            attention_mask=mask,
            position_ids=pos,
            position_embeddings=hf.model.rotary_emb(x, pos),
        )
        return rms(x, t("shared_head.norm.weight")) @ t("shared_head.head.weight").T


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    hf = build_hf_model("v3_noaux")
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp("mtp"))
    mtp = add_mtp_layer(path)
    return hf, path, mtp


def test_mtp_layer_loads_without_duplicate_copies(mtp_checkpoint):
    _, path, _ = mtp_checkpoint
    model = mlx_deepseek.load_model(path)
    assert len(model.mtp) == 1
    assert "embed_tokens" not in model.mtp[0] and "head" not in model.mtp[0].shared_head


def test_mtp_forward_matches_reference(mtp_checkpoint):
    hf, path, mtp = mtp_checkpoint
    model = mlx_deepseek.load_model(path, dtype="float32")
    logits, hidden = model.forward_with_hidden(mx.array(TOKENS))
    np.testing.assert_allclose(
        np.array(logits), hf(torch.tensor(TOKENS)).logits.detach().numpy(), rtol=1e-4, atol=1e-4
    )
    # MTP at position i sees h_i and token i+1
    h, nxt = hidden[:, :-1], mx.array(TOKENS[:, 1:])
    out, _ = model.mtp_forward(h, nxt)
    n = model.args.num_hidden_layers
    ref = torch_mtp_reference(
        hf, mtp, n, torch.from_numpy(np.array(h)), torch.from_numpy(TOKENS[:, 1:])
    ).numpy()
    err = np.abs(np.array(out) - ref).max() / np.abs(ref).max()
    assert err < 1e-4, err


def test_mtp_cached_decode_equals_full(mtp_checkpoint):
    _, path, _ = mtp_checkpoint
    model = mlx_deepseek.load_model(path)
    _, hidden = model.forward_with_hidden(mx.array(TOKENS))
    h, nxt = hidden[:, :-1], mx.array(TOKENS[:, 1:])
    full, _ = model.mtp_forward(h, nxt)
    cache = model.make_mtp_cache()[0]
    parts = [model.mtp_forward(h[:, :3], nxt[:, :3], cache=cache)[0]]
    for i in range(3, h.shape[1]):
        parts.append(model.mtp_forward(h[:, i : i + 1], nxt[:, i : i + 1], cache=cache)[0])
    stepped = np.concatenate([np.array(p) for p in parts], axis=1)
    assert np.abs(stepped - np.array(full)).max() / np.abs(np.array(full)).max() < 1e-5


def test_mtp_layer_with_its_own_head(tmp_path):
    hf = build_hf_model("v3_noaux")
    path = save_hf_checkpoint(hf, tmp_path / "m")
    add_mtp_layer(path, same_copies=False)
    model = mlx_deepseek.load_model(path)
    assert "embed_tokens" in model.mtp[0] and "head" in model.mtp[0].shared_head
    _, hidden = model.forward_with_hidden(mx.array(TOKENS))
    out, _ = model.mtp_forward(hidden[:, :-1], mx.array(TOKENS[:, 1:]))
    assert out.shape == (2, 9, 320) and np.isfinite(np.array(out)).all()
