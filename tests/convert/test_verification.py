"""The transplant check's report: per-layer relative and absolute differences, and the maxima it
reports (and records) are the maxima over layers."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from byteify.convert.sources import open_source
from byteify.convert.verification import verify_transplant


def test_reported_maxima_are_over_all_layers(converted, tmp_path):
    # issue 10 bug 5: max_abs was the last layer's difference, not the maximum over layers
    src, out, _ = converted("gqa-tied-fp32")  # 3 layers
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    sd = load_file(str(broken / "model.safetensors"))
    sd["model.global_transformer.layers.0.self_attn.o_proj.weight"] += 5.0  # a wrong first layer
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    rep = verify_transplant(open_source(src.path), broken, log=lambda m: None)
    assert len(rep.per_layer_abs) == len(rep.per_layer_rel) == 3
    assert rep.max_abs == max(rep.per_layer_abs) and rep.max_rel == max(rep.per_layer_rel)
    assert not rep.passed
    good = verify_transplant(open_source(src.path), Path(out), log=lambda m: None)
    assert good.passed and good.max_abs == max(good.per_layer_abs) < 1e-4
