"""What convert and info report (issue 12 item 11): the MTP-copy note only when the bytes
differ, a mixed recipe's bits per kind of module, small sizes in MB, a model card without
the machine's paths."""

import json
from pathlib import Path

import pytest
from mlx_deepseek.convert.pipeline import convert
from mlx_deepseek.convert.plan import Options
from mlx_deepseek.convert.synthetic import write_checkpoint
from typer.testing import CliRunner

from mlx_deepseek.cli import app
from mlx_deepseek.loading import load_model
from mlx_deepseek.models.tiny import convertible_config


def flat(text: str) -> str:
    """CLI output without whitespace: rich wraps table cells wherever it likes."""
    return "".join(text.split())


@pytest.mark.parametrize("shards", [1, 3])
def test_mtp_copies_equal_to_the_main_ones_are_dropped_without_a_note(tmp_path, shards):
    # one shard: the MTP copy and the main tensor are read from the same file
    write_checkpoint(tmp_path / "src", convertible_config("deepseek_v3"), fmt="bf16", shards=shards)
    summary = convert(tmp_path / "src", tmp_path / "out", Options(bits=8))
    assert not any("differs" in n for n in summary.notes), summary.notes
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    mtp = {k for k, f in index["weight_map"].items() if f == "mtp.safetensors"}
    assert mtp and not any("embed_tokens" in k or "shared_head.head" in k for k in mtp)
    assert "embed_tokens" not in load_model(tmp_path / "out").mtp[0]


def test_mtp_copies_that_differ_in_the_same_file_get_the_note(tmp_path):
    write_checkpoint(
        tmp_path / "src", convertible_config("deepseek_v3"), fmt="bf16", mtp_copies=False
    )
    summary = convert(tmp_path / "src", tmp_path / "out", Options(bits=8))
    differs = [n for n in summary.notes if "differs" in n]
    assert len(differs) == 2 and "mtp.0.embed_tokens.weight" in differs[0] + differs[1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("reporting")
    write_checkpoint(root / "src", convertible_config("deepseek_v3"), fmt="bf16")
    for recipe in ("mixed", "uniform"):
        convert(root / "src", root / recipe, Options(bits=4, recipe=recipe))
    return root


def info(path: Path) -> str:
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    return flat(result.output)


def test_info_reports_a_mixed_recipes_bits_per_kind_of_module(converted):
    out = info(converted / "mixed")
    # routed experts at --bits, everything every token reads at 6 bits
    assert flat("routed experts 4-bit") in out
    six = out[out.index("4-bit;") + len("4-bit;") : out.index("6-bit")]
    for kind in ("attention", "shared experts", "dense MLP", "embedding", "lm_head"):
        assert flat(kind) in six, (kind, out)
    assert "routedexperts" not in six


def test_info_reports_a_uniform_recipe_in_one_figure(converted):
    out = info(converted / "uniform")
    assert flat("4-bit, group 64") in out and "6-bit" not in out


def test_info_shows_small_weights_in_mb(converted):
    out = info(converted / "uniform")
    weights = out[out.index("weights") : out.index("cache,4096tokens")]
    assert weights.endswith("MB") and "0.00GB" not in out
    mb = float(weights[len("weights") : -2])
    files = sum(f.stat().st_size for f in (converted / "uniform").glob("*.safetensors"))
    assert 0.5 * files / 1e6 < mb < 1.5 * files / 1e6


@pytest.mark.parametrize("spelling", ["absolute", "relative", "dotdot"])
def test_the_model_card_names_no_path_of_this_machine(converted, tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(converted)
    src = {
        "absolute": converted / "src",
        "relative": Path("src"),
        "dotdot": Path("mixed") / ".." / "src",
    }[spelling]
    result = CliRunner().invoke(app, ["convert", str(src), "-o", str(tmp_path / "card")])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "card" / "README.md").read_text()
    (line,) = [x for x in card.splitlines() if x.startswith("Converted from")]
    assert line.split("`")[1] == "src", line  # the folder's name, never its path
    assert str(converted) not in card and str(tmp_path) not in card
