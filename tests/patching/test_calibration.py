"""Threshold calibration: bisection on hand-made and real entropies hits its target, the default
target is the source tokenizer's bytes/token on the same text (byteify.json's number without a
tokenizer), the result lands in config.json atomically (stock transformers then patches with
it), the entropy-model recipe trains, logs validation bits-per-byte and calibrates at the end,
and ``byteify calibrate`` reports errors in one line with exit code 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from byteify.data.streams import pack_rows
from byteify.patching.calibration import (calibrate, calibrate_model_dir, find_threshold, held_out_windows,
                                          limit_windows, patch_stats)
from byteify.patching.patchers import load_entropy_model
from byteify.errors import ByteifyError
from byteify.patching.patchers import EntropyPatcher, build_patcher
from byteify.resolve import load_source_tokenizer
from byteify.patching.spec import PatchingSpec
from byteify.train.recipe import load_recipe
from byteify.tokenizer import BOS_ID
from patching_helpers import one_thread, corpus_texts, make_tiny_blt, read_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def test_find_threshold_on_hand_made_entropies():
    # 4 windows of [BOS] + 99 bytes; entropies alternate so every threshold step is clear
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 260, (4, 100), generator=g)
    ids[:, 0] = BOS_ID
    ent = torch.rand(4, 100, generator=g) * 4
    for target in (1.5, 3.0, 6.0):
        for monotonic in (False, True):
            thr, ok = find_threshold(ent, ids, target, monotonic)
            p = EntropyPatcher(None, thr, monotonic)
            b, n, _ = patch_stats(ids, p.starts_from_entropies(ids, ent))
            assert ok and abs(b / n - target) / target < 0.05, (target, monotonic, b / n)
    # with max_patch_length the mean cannot pass it: the closest reachable, flagged
    thr, ok = find_threshold(ent, ids, 8.0, max_patch_length=4)
    b, n, _ = patch_stats(ids, EntropyPatcher(None, thr, max_patch_length=4).starts_from_entropies(ids, ent))
    assert not ok and 3.5 < b / n <= 4.0


@pytest.fixture(scope="module")
def held_out():
    rows = pack_rows([t.encode() for t in corpus_texts(12, offset=60)], 128)
    return limit_windows(torch.from_numpy(rows[:, :-1].astype("int64")), 12288)


def test_calibration_hits_the_source_tokenizers_bytes_per_token(tiny_entropy_blt, held_out):
    model, _ = load_entropy_model(tiny_entropy_blt)
    tok = load_source_tokenizer(tiny_entropy_blt)
    cal = calibrate(model, held_out, tokenizer=tok)
    assert cal.target_from == "source tokenizer on the data" and cal.reachable
    assert cal.target_bytes_per_patch == pytest.approx(cal.source_bytes_per_token)
    assert 2.0 < cal.source_bytes_per_token < 8.0
    assert abs(cal.mean_bytes_per_patch - cal.target_bytes_per_patch) / cal.target_bytes_per_patch < 0.05
    assert cal.std_bytes_per_patch > 0 and cal.windows == held_out.shape[0]
    # the threshold reproduces the reported mean through the patcher itself
    p = EntropyPatcher(model, cal.threshold)
    b, n, _ = patch_stats(held_out, p.starts(held_out))
    assert b / n == pytest.approx(cal.mean_bytes_per_patch, rel=1e-3)
    # a given target, the monotonic rule, max_patch_length
    for kw in ({"target": 3.0}, {"target": 5.0, "monotonic": True}, {"target": 2.5, "max_patch_length": 6}):
        c = calibrate(model, held_out, tokenizer=tok, **kw)
        assert abs(c.mean_bytes_per_patch - kw["target"]) / kw["target"] < 0.05, (kw, c)


def test_calibrate_model_dir_writes_config_in_place_and_stock_uses_it(tiny_entropy_blt, held_out, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_entropy_blt, model_dir)
    before = read_config(model_dir)
    cal = calibrate_model_dir(model_dir, held_out, target=3.5, max_patch_length=12)
    cfg = read_config(model_dir)
    assert cfg["patching_threshold"] == pytest.approx(cal.threshold) and cfg["patching_mode"] == "entropy"
    assert cfg["patch_in_forward"] is True and cfg["max_patch_length"] == 12
    assert {k: v for k, v in cfg.items() if k not in ("patching_threshold", "max_patch_length")} == \
        {k: v for k, v in before.items() if k not in ("patching_threshold", "max_patch_length")}
    assert not list(model_dir.glob(".*.tmp"))  # the temporary files were renamed away
    meta = json.loads((model_dir / "byteify.json").read_text())
    assert meta["calibration"]["threshold"] == pytest.approx(cal.threshold)
    # plain transformers patches by itself with the calibrated threshold; byteify reads it too
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    p = build_patcher(PatchingSpec(mode="entropy", max_patch_length=12), model)
    assert p.threshold == pytest.approx(cal.threshold)
    ids = held_out[:1, :100]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[:, :-1], model(ids, patch_lengths=p(ids)).logits[:, :-1],
                                   rtol=1e-5, atol=1e-5)
    # monotonic: its own config key, the stock threshold untouched
    mono = calibrate_model_dir(model_dir, held_out, target=3.5, monotonic=True)
    cfg2 = read_config(model_dir)
    assert cfg2["patching_threshold"] == cfg["patching_threshold"]
    assert cfg2["patching_monotonic_threshold"] == pytest.approx(mono.threshold)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert build_patcher(PatchingSpec(mode="entropy", monotonic=True), model).threshold == pytest.approx(mono.threshold)
    # --out: a calibrated copy, the original untouched
    out = tmp_path / "copy"
    calibrate_model_dir(model_dir, held_out, target=2.5, out=out)
    assert read_config(out)["patching_threshold"] != cfg2["patching_threshold"]
    assert read_config(model_dir) == cfg2
    with pytest.raises(ByteifyError, match="not empty"):
        calibrate_model_dir(model_dir, held_out, target=2.5, out=out)


def test_target_falls_back_to_byteify_json(tiny_entropy_blt, held_out, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_entropy_blt, model_dir)
    shutil.rmtree(model_dir / "byteify_source" / "tokenizer")
    meta = json.loads((model_dir / "byteify.json").read_text())
    meta["source_bytes_per_token"] = 3.25
    (model_dir / "byteify.json").write_text(json.dumps(meta))
    cal = calibrate_model_dir(model_dir, held_out, write=False)
    assert cal.target_from.startswith("byteify.json") and cal.target_bytes_per_patch == 3.25
    assert abs(cal.mean_bytes_per_patch - 3.25) / 3.25 < 0.05
    meta["source_bytes_per_token"] = None
    (model_dir / "byteify.json").write_text(json.dumps(meta))
    with pytest.raises(ByteifyError, match="target"):
        calibrate_model_dir(model_dir, held_out, write=False)


def test_entropy_recipe_trains_logs_bpb_and_calibrates(tmp_path):
    from byteify.train.trainer import Trainer

    plain = make_tiny_blt(tmp_path / "plain", patcher_scale=1.0)  # the converted init: ~8 bits/byte
    out = tmp_path / "run"
    recipe, raw = load_recipe("entropy-model", [
        f"model={plain}", f"output_dir={out}", "data.seq_len=128", "stages.0.steps=6", "stages.0.warmup_steps=1",
        "stages.0.batch_bytes=512", "run.eval_every=3", "run.eval_batches=1", "run.progress=false", "run.log_every=1",
        "run.device=cpu", "calibration.max_bytes=4096"])
    summary = Trainer(recipe, raw, log=lambda m: None).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r]
    assert steps[-1]["val_bpb"] < steps[0]["bpb"] and 1.0 < steps[-1]["val_bpb"] < 9.0
    cal = summary["calibration"]
    assert cal["target_from"] == "source tokenizer on the data"
    assert abs(cal["mean_bytes_per_patch"] - cal["target_bytes_per_patch"]) / cal["target_bytes_per_patch"] < 0.05
    assert any("calibration" in r for r in rows)
    model_dir = out / "checkpoints" / "step-00000006" / "model"
    assert read_config(model_dir)["patching_threshold"] == pytest.approx(cal["threshold"])
    # the checkpoint trains on with entropy patching (threshold from its config)
    from byteify.resolve import load_blt

    _, model = load_blt(model_dir)
    p = build_patcher(PatchingSpec(mode="entropy"), model)
    assert p.threshold == pytest.approx(cal["threshold"])
    # source-token patching finds the converted model's tokenizer through byteify.json
    assert build_patcher(PatchingSpec(mode="source_tokens"), model, model_dir=model_dir).tokenizer is not None


def test_recipe_rejects_calibration_after_a_non_entropy_stage():
    with pytest.raises(ByteifyError, match="calibration"):
        load_recipe("tiny-cpu", ["calibration={}"])
    recipe, _ = load_recipe("entropy-model")
    assert recipe.calibration is not None and recipe.calibration.target_bytes_per_patch is None


def test_held_out_windows_from_sources(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"hello world " * 100)
    ids = held_out_windows([str(f)], 64)
    assert ids.shape[1] == 64 and ids[0, 0] == BOS_ID
    assert held_out_windows([str(f)], 64, max_bytes=128).numel() <= 128


# ---- CLI ---------------------------------------------------------------------------------
def cli(*args):
    from byteify.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_calibrate(tiny_entropy_blt, tmp_path):
    data = tmp_path / "held.txt"
    data.write_text("\n\n".join(corpus_texts(3, offset=70)))
    out = tmp_path / "cal"
    r = cli("calibrate", tiny_entropy_blt, "--data", data, "--seq-len", 128, "--out", out, "--target-bytes-per-patch", 4)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "bytes/patch" in r.stdout and read_config(out)["patching_threshold"] != read_config(tiny_entropy_blt)["patching_threshold"]
    r = cli("calibrate", tiny_entropy_blt, "--data", data, "--patching", "space", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["source_bytes_per_token"] > 1
    for args, msg in [((tmp_path / "nope", "--data", data), "nope: not found"),
                      ((tiny_entropy_blt, "--data", data, "--patching", "bogus"), "bogus"),
                      ((tiny_entropy_blt, "--data", tmp_path / "missing.txt"), "missing.txt"),
                      ((tiny_entropy_blt, "--data", data, "--target-bytes-per-patch", 0.5), "> 1"),
                      ((tiny_entropy_blt, "--data", data, "--out", out), "not empty")]:
        r = cli("calibrate", *args)
        assert r.exit_code == 2, (args, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], (args, r.stderr)
