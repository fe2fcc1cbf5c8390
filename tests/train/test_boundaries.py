"""The entropy model can learn where the source tokenizer starts tokens (stage ``boundaries``):
its causal entropy patching then agrees with the source-token boundaries far better than the
byte-LM-trained entropy model at the same bytes per patch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from byteify.errors import ByteifyError
from byteify.patching.calibration import boundary_agreement, held_out_windows
from byteify.patching.patchers import EntropyPatcher, load_entropy_model
from byteify.resolve import load_source_tokenizer
from byteify.train.recipe import load_recipe
from byteify.train.trainer import Trainer
from patching_helpers import make_tiny_blt


def train(blt: Path, out: Path, *extra: str) -> dict:
    recipe, raw = load_recipe("entropy-model", [
        f"model={blt}", f"output_dir={out}", "stages.0.steps=40", "data.seq_len=256", "stages.0.batch_bytes=2048",
        "run.progress=false", "run.eval_every=1000", "calibration.max_bytes=16384", *extra])
    return Trainer(recipe, raw, log=lambda m: None).run()


def test_boundary_training_makes_entropy_patches_land_on_token_starts(tmp_path):
    blt = make_tiny_blt(tmp_path / "m", patcher_scale=1.0)  # the converted init
    ids = held_out_windows(["default"], 256, 0.05, 0, max_bytes=32768)
    tok = load_source_tokenizer(blt)
    f1 = {}
    for mode, extra in (("lm", ("stages.0.boundaries=null",)), ("boundaries", ())):  # the recipe trains boundaries
        summary = train(blt, tmp_path / mode, *extra)
        cal = summary["calibration"]  # calibrated to the source's bytes per token, as always
        assert cal["boundaries"] is not None
        model, cfg = load_entropy_model(Path(summary["checkpoint"]) / "model")
        starts = torch.cat([EntropyPatcher(model, cfg.patching_threshold).starts(c) for c in ids.split(8)])
        agreement = boundary_agreement(ids, starts, tok)
        assert agreement["f1"] == pytest.approx(cal["boundaries"]["f1"], abs=0.05)  # held-out text either way
        f1[mode] = agreement["f1"]
    assert f1["boundaries"] > f1["lm"] + 0.1, f1  # measured: 0.47 -> 0.60 after 40 steps


def test_boundaries_need_the_entropy_model_in_train():
    with pytest.raises(ByteifyError, match="boundaries"):
        load_recipe("tiny-cpu", ["stages.0.boundaries={}"])
