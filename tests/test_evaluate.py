"""byteify eval: bits per byte of a BLT and of its source model on the same documents, checked
against brute-force loops (one forward per document / window, -log p summed position by
position), patch statistics, default patching, the CLI, and the real SmolLM2 (slow)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import byteify.cli as cli
from byteify.convert.transplant import convert
from byteify.data.corpus import probe_text
from byteify.evaluate import evaluate, evaluate_blt, evaluate_source, load_eval_documents
from byteify.patching.patchers import build_patcher
from byteify.convert.presets import load_spec
from byteify.patching.spec import BLT_DEFAULT_THRESHOLD, PatchingSpec
from byteify.convert.sources import open_source
from helpers import smollm2_gguf, tiny_source_and_blt, tiny_tokenizer

DOCS = [
    "The if statement is used for conditional execution.",
    "for x in range(3):\n    print(x)  # déjà vu: naïve café \u2014 \u00fcber \U0001F600\n" * 2,
    "Short.",
    "The while statement is used for repeated execution as long as an expression is true.",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random Llama with a BOS-adding BPE tokenizer, its BLT, and a JSONL file of DOCS."""
    root = tmp_path_factory.mktemp("eval")
    src, blt = tiny_source_and_blt(root, layers=2, seed=3, verify=False)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return src, blt, data


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# ---- brute force ----------------------------------------------------------------------------
def brute_force_blt(model, docs: list[bytes], patcher, seq_len: int) -> tuple[float, int, int, int]:
    """(bits per byte, predicted bytes, patches, text patches): every document [BOS]+bytes+[EOS]
    alone, one forward per window of seq_len+1 ids (one per document when it fits), -log p summed
    per position; patches walked one by one."""
    nats, count, patches, text_patches = 0.0, 0, 0, 0
    for d in docs:
        ids = [1] + [b + 4 for b in d] + [2]
        for start in range(0, len(ids) - 1, seq_len):
            w = torch.tensor([ids[start: start + seq_len + 1]])
            x = w[:, :-1]
            lengths = patcher(x)
            assert int(lengths.sum()) == x.shape[1] + 1
            pos = 0
            for n in lengths[0].tolist():  # patches holding a real input byte (not the next-byte patch)
                if n > 0 and pos < x.shape[1]:
                    patches += 1
                    text_patches += int(x[0, pos]) >= 4  # not a BOS patch
                pos += n
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=x, patch_lengths=lengths).logits.double(), -1)[0]
            for t in range(x.shape[1]):
                nats -= float(logp[t, w[0, t + 1]])
                count += 1
    return nats / count / math.log(2), count, patches, text_patches


def token_bytes(tok, i: int) -> int:
    """UTF-8 bytes of one byte-level BPE token (0 for special tokens), from its vocabulary string
    (written in GPT-2's byte-to-character alphabet, rebuilt here)."""
    if i in tok.all_special_ids:
        return 0
    table = {}
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return len(bytes(table[c] for c in tok.convert_ids_to_tokens(i)))


def brute_force_source(model, tok, docs: list[bytes], seq_len: int) -> tuple[float, int]:
    """(bits per byte, bytes covered): each document tokenized alone, one forward per window,
    the NLL of every predicted token and the bytes of every predicted token summed one by one."""
    nats, covered = 0.0, 0
    for d in docs:
        ids = tok(d.decode()).input_ids
        for start in range(0, len(ids) - 1, seq_len):
            w = torch.tensor([ids[start: start + seq_len + 1]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=w[:, :-1]).logits.double(), -1)[0]
            for t in range(w.shape[1] - 1):
                nats -= float(logp[t, w[0, t + 1]])
                covered += token_bytes(tok, int(w[0, t + 1]))
    return nats / covered / math.log(2), covered


# ---- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,seq_len,batch_size", [("static", 512, 3), ("static", 40, 4), ("entropy", 512, 2)])
def test_blt_bits_per_byte_equals_brute_force(setup, mode, seq_len, batch_size):
    _, blt, data = setup
    model = load(blt)
    docs = load_eval_documents([str(data)])
    assert [d.decode() for d in docs] == DOCS
    patcher = build_patcher(PatchingSpec(mode=mode, patch_size=4), model)
    res = evaluate_blt(model, docs, patcher, seq_len=seq_len, batch_size=batch_size)
    bpb, count, patches, text_patches = brute_force_blt(model, docs, patcher, seq_len)
    n_bytes = sum(len(d) for d in docs)
    assert res.predicted == count == n_bytes + len(docs)  # every byte and each document's EOS
    assert res.bits_per_byte == pytest.approx(bpb, rel=1e-5, abs=0)
    assert res.patches == patches and res.text_patches == text_patches == patches - len(docs)
    assert res.mean_bytes_per_patch == pytest.approx(n_bytes / text_patches)
    assert res.global_steps_per_kb == pytest.approx(1024 * text_patches / n_bytes)
    if seq_len == 40:
        assert res.windows > len(docs)


def test_static_patch_statistics_are_what_static_patching_gives(setup):
    _, blt, data = setup
    model = load(blt)
    docs = [b"abcdefghij" * 10]  # 100 bytes: ids BOS + 100 bytes (+EOS as the last target)
    res = evaluate_blt(model, docs, build_patcher(PatchingSpec(mode="static", patch_size=4), model), seq_len=1024)
    # BOS alone, then byte 1 alone (positions 0 and 1 always start), then 4-byte patches over 100 bytes
    assert res.patches == 1 + 25 and res.text_patches == 25 and res.mean_bytes_per_patch == 4.0
    assert res.input_positions == 101 and res.patching == {"mode": "static", "patch_size": 4}
    assert res.global_steps_per_kb == 256.0


@pytest.mark.parametrize("bos,seq_len", [(True, 512), (False, 512), (True, 13), (False, 13)])
def test_source_bits_per_byte_equals_brute_force(setup, tmp_path, bos, seq_len):
    from transformers import AutoModelForCausalLM

    src, _, data = setup
    tok = tiny_tokenizer(bos)
    tok.save_pretrained(str(tmp_path / "tok"))
    tok = open_source(src).load_tokenizer() if bos else type(tok).from_pretrained(str(tmp_path / "tok"))
    assert (tok("x").input_ids[0] == 1) == bos  # the source's own BOS behaviour, through a save/load
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    docs = load_eval_documents([str(data)])
    res = evaluate_source(model, tok, docs, seq_len=seq_len, batch_size=3)
    bpb, covered = brute_force_source(model, tok, docs, seq_len)
    n_bytes = sum(len(d) for d in docs)
    assert res.bytes_covered == covered
    assert (covered == n_bytes) == bos  # without a BOS, the first token of each document is not scored
    assert res.bits_per_byte == pytest.approx(bpb, rel=1e-5, abs=0)
    assert res.adds_bos == bos and res.text_bytes == n_bytes


def test_cli_eval_reports_both_models_side_by_side(setup):
    src, blt, data = setup
    runner = CliRunner()
    res = runner.invoke(cli.app, ["eval", str(blt), "--data", str(data), "--seq-len", "256", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    # the source recorded in byteify.json is evaluated by default
    assert out["source"] is not None and out["source"]["source"] == str(src.resolve())
    api = evaluate(blt, [str(data)], seq_len=256)
    assert out["blt"]["bits_per_byte"] == pytest.approx(api.blt.bits_per_byte, rel=1e-6)
    assert out["source"]["bits_per_byte"] == pytest.approx(api.source.bits_per_byte, rel=1e-6)
    # the model's own patching (what stock transformers does): entropy at BLT's default threshold, noted
    assert out["blt"]["patching"] == {"mode": "entropy", "threshold": BLT_DEFAULT_THRESHOLD, "monotonic": False}
    assert "uncalibrated" in out["notes"][0]
    assert out["bits_per_byte_gap"] == pytest.approx(out["blt"]["bits_per_byte"] - out["source"]["bits_per_byte"])
    assert out["documents"] == len(DOCS)

    res = runner.invoke(cli.app, ["eval", str(blt), "--data", str(data), "--seq-len", "256", "--no-source"])
    assert res.exit_code == 0, res.output
    assert f"{api.blt.bits_per_byte:.4f}" in res.output and "gap" not in res.output
    res = runner.invoke(cli.app, ["eval", str(blt), "--data", str(data), "--seq-len", "256", "--source", str(src)])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.strip().startswith("bits per byte"))
    assert line.split()[-2:] == [f"{api.blt.bits_per_byte:.4f}", f"{api.source.bits_per_byte:.4f}"]
    assert "gap: BLT" in res.output


def test_default_patching_follows_a_calibrated_entropy_model(setup, tmp_path):
    _, blt, data = setup
    calibrated = tmp_path / "calibrated"
    shutil.copytree(blt, calibrated)
    meta = json.loads((calibrated / "byteify.json").read_text())
    meta["calibration"] = {"threshold": 2.5, "monotonic": False, "target_bytes_per_patch": 4.0}  # what 'byteify calibrate' records
    (calibrated / "byteify.json").write_text(json.dumps(meta))
    cfg = json.loads((calibrated / "config.json").read_text())
    cfg["patching_threshold"] = 2.5
    (calibrated / "config.json").write_text(json.dumps(cfg))
    r = evaluate(calibrated, [str(data)], seq_len=256, use_recorded_source=False)
    assert r.blt.patching["mode"] == "entropy" and r.blt.patching["threshold"] == 2.5
    assert not r.notes
    plain = evaluate(blt, [str(data)], seq_len=256, use_recorded_source=False)
    assert plain.blt.patching["mode"] == "entropy" and plain.blt.patching["threshold"] == BLT_DEFAULT_THRESHOLD
    assert "byteify calibrate" in plain.notes[0]
    static = evaluate(blt, [str(data)], seq_len=256, use_recorded_source=False, patching="static", patch_size=6)
    assert static.blt.patching == {"mode": "static", "patch_size": 6} and not static.notes
    forced = evaluate(blt, [str(data)], seq_len=256, use_recorded_source=False, patching="entropy", threshold=2.5)
    assert forced.blt.patching["threshold"] == 2.5
    assert forced.blt.bits_per_byte == pytest.approx(r.blt.bits_per_byte, rel=1e-6)
    assert forced.blt.patches == r.blt.patches


def test_max_bytes_caps_text_at_a_character_boundary(setup, tmp_path):
    _, blt, data = setup
    first = len(DOCS[0].encode())
    docs = load_eval_documents([str(data)], max_bytes=first + 25)
    assert len(docs) == 2 and docs[0] == DOCS[0].encode()
    assert DOCS[1].encode().startswith(docs[1]) and len(docs[1]) <= 25
    docs[1].decode("utf-8")  # not cut inside a character
    full = DOCS[1].encode()
    cut_in_char = full.index("é".encode()) + 1  # a cap that falls between the two bytes of 'é'
    capped = load_eval_documents([str(data)], max_bytes=first + cut_in_char)
    assert capped[1] == full[: cut_in_char - 1]
    r = evaluate(blt, [str(data)], seq_len=256, max_bytes=first + 25, use_recorded_source=False)
    assert r.text_bytes == sum(map(len, docs)) and r.blt.predicted == r.text_bytes + 2


def test_bad_inputs_are_one_line_errors_with_exit_2(setup, tmp_path):
    src, blt, data = setup
    cases = [
        (["eval", str(tmp_path / "nope"), "--data", str(data)], "not found"),
        (["eval", str(src), "--data", str(data)], "not a BLT model directory"),
        (["eval", str(blt), "--data", str(tmp_path / "missing.txt")], "no such file"),
        (["eval", str(blt), "--data", str(data), "--patching", "magic"], "--patching 'magic'"),
        (["eval", str(blt), "--data", str(data), "--dtype", "int8"], "--dtype 'int8'"),
        (["eval", str(blt), "--data", str(data), "--source", str(tmp_path / "nosrc")], "source not found"),
    ]
    for args, msg in cases:
        res = CliRunner().invoke(cli.app, args)
        assert res.exit_code == 2, (args, res.output)
        assert msg in res.output and res.output.count("\n") == 1, (args, res.output)


# ---- the real SmolLM2 -------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_source_and_untrained_blt(tmp_path):
    gguf = smollm2_gguf()
    out = tmp_path / "blt"
    convert(open_source(gguf), out, load_spec("auto"), progress=False, verify=False, log=lambda m: None)
    text = tmp_path / "probe.txt"
    text.write_text(probe_text())
    res = CliRunner().invoke(cli.app, ["eval", str(out), "--data", str(text), "--max-bytes", "4096",
                                       "--source", str(gguf), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)  # stderr has transformers' GGUF progress bar
    print(json.dumps({k: r[k] for k in ("blt", "source", "bits_per_byte_gap")}, indent=2))
    assert 0.5 < r["source"]["bits_per_byte"] < 1.2, r["source"]
    assert r["blt"]["bits_per_byte"] > r["source"]["bits_per_byte"] + 2.0, r["blt"]
    assert r["text_bytes"] <= 4096 and r["source"]["bytes_covered"] >= r["text_bytes"] - 16
