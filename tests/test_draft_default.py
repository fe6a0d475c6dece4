"""How many tokens the MTP head drafts when the user does not say (speculative.py's
`default_draft_tokens`): two for float weights on the CPU, one otherwise, through every
entry point that takes `draft_tokens`."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from checkpoints import add_mtp_layer, build_hf_model, save_hf_checkpoint

import mlx_deepseek
from mlx_deepseek import speculative
from mlx_deepseek.errors import ArgumentValueError
from mlx_deepseek.serve.engine import Engine
from mlx_deepseek.speculative import Drafting, default_draft_tokens, mtp_step_fn


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = save_hf_checkpoint(build_hf_model("v3_noaux"), tmp_path_factory.mktemp("drafts"))
    add_mtp_layer(path)
    return path


def test_float_weights_on_the_cpu_draft_two_tokens(path):
    model = mlx_deepseek.load_model(path)
    assert default_draft_tokens(model) == 2
    decoder = mtp_step_fn(model, model.make_cache(), None, None, None)
    assert decoder.draft_tokens == 2
    # what the user says wins
    assert mtp_step_fn(model, model.make_cache(), None, 1, None).draft_tokens == 1
    assert mtp_step_fn(model, model.make_cache(), None, 3, None).draft_tokens == 3


def test_quantized_weights_or_a_gpu_draft_one(path, monkeypatch):
    model = mlx_deepseek.load_model(path)
    nn.quantize(
        model,
        32,
        4,
        class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 32 == 0,
    )
    assert default_draft_tokens(model) == 1
    assert mtp_step_fn(model, model.make_cache(), None, None, None).draft_tokens == 1
    model = mlx_deepseek.load_model(path)
    monkeypatch.setattr(speculative.mx, "default_device", lambda: mx.Device(mx.gpu))
    assert default_draft_tokens(model) == 1


def test_the_server_engine_resolves_the_default_once(path):
    model = mlx_deepseek.load_model(path)
    assert Engine(model).draft_tokens == 2
    assert Engine(model, draft_tokens=1).draft_tokens == 1


def test_drafting_accepts_none_and_still_checks_numbers():
    assert Drafting().draft_tokens is None
    assert Drafting(draft_tokens=None).validated().draft_tokens is None
    for bad in (0, 9):
        with pytest.raises(ArgumentValueError, match=f"draft_tokens={bad}"):
            Drafting(draft_tokens=bad).validated()
