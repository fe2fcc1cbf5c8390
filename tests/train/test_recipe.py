"""Recipe validation and the recipes subcommands: every bad recipe fails before anything runs,
with one line naming the key, and exit code 2."""

from __future__ import annotations

import itertools

import pytest
import yaml
from typer.testing import CliRunner

import byteify.cli as cli
from byteify.errors import ByteifyError
from byteify.train.recipe import load_recipe, shipped_recipes

runner = CliRunner()


def train(*args):
    return runner.invoke(cli.app, ["train", *args])


@pytest.mark.parametrize("override, expected", [
    ("stages.0.stpes=3", r"unknown key 'stages.0.stpes'; did you mean 'stages.0.steps'\?"),
    ("data.seqlen=64", r"unknown key 'data.seqlen'; did you mean 'data.seq_len'\?"),
    ("stages.0.lr=-1", r"'stages.0.lr': Input should be greater than 0"),
    ("stages.0.steps=many", r"'stages.0.steps': Input should be a valid integer"),
    ("stages.0.batch_bytes=64", r"batch_bytes 64 is smaller than one sequence \(data.seq_len 128\)"),
    ("stages.0.train=[]", r"stage 'adapt' trains nothing"),
    ("stages.0.train=[decoder]", r"'stages.0.train.0': Input should be 'local_encoder'"),
    ("stages.0.lora={rank: 4}", r"'global' cannot also be in 'train'"),
    ("stages.5.steps=3", r"'5' is not a valid index into a list of 1"),
    ("stages=[]", r"'stages': List should have at least 1 item"),
])
def test_bad_recipes_fail_with_one_line_and_exit_2(override, expected, tmp_path):
    res = train("tiny-cpu", override, f"output_dir={tmp_path / 'r'}")
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output
    import re

    assert re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "r").exists()


def test_missing_recipe_and_missing_model(tmp_path):
    res = train("tiny-cpuu")
    assert res.exit_code == 2 and "did you mean 'tiny-cpu'" in res.output
    res = train("tiny-cpu", f"model={tmp_path / 'nope'}", "--dry-run")
    assert res.exit_code == 2 and "nope: not found (expected a training run" in res.output


def test_overrides_and_resolved_recipe():
    recipe, raw = load_recipe("tiny-cpu", ["stages.0.steps=7", "run.log_every=3", "data.sources.0.weight=2.5"])
    assert recipe.stages[0].steps == 7 and recipe.run.log_every == 3 and recipe.data.sources[0].weight == 2.5
    assert raw["stages"][0]["steps"] == 7 and raw["stages"][0]["lora"] is None
    with pytest.raises(ByteifyError, match="expected key=value"):
        load_recipe("tiny-cpu", ["stages.0.steps"])


def test_shipped_recipes_start_with_runnable_commands():
    names = set(shipped_recipes())
    assert names == {"tiny-cpu", "smollm2-135m", "entropy-model", "llama-3.2-1b", "llama-3.1-8b"}
    for name, path in shipped_recipes().items():
        text = path.read_text()
        header = "\n".join(itertools.takewhile(lambda line: line.startswith("#"), text.splitlines()))
        assert "byteify train" in header or "torchrun" in header, name
        recipe, _ = load_recipe(str(path))  # valid as shipped
        assert yaml.safe_load(text)["stages"]
        if recipe.patching is not None and recipe.patching.mode == "entropy":  # training needs a calibrated patcher:
            assert f"output_dir={recipe.model}" in header, name  # the header's entropy-model run makes `model`


def test_recipes_ls_and_cp(tmp_path):
    res = runner.invoke(cli.app, ["recipes", "ls"])
    assert res.exit_code == 0 and "smollm2-135m" in res.output and "tiny-cpu" in res.output
    res = runner.invoke(cli.app, ["recipes", "cp", "tiny-cpu", str(tmp_path)])
    assert res.exit_code == 0 and (tmp_path / "tiny-cpu.yaml").read_text() == shipped_recipes()["tiny-cpu"].read_text()
    res = runner.invoke(cli.app, ["recipes", "cp", "tiny-cpu", str(tmp_path)])
    assert res.exit_code == 2 and "exists" in res.output
