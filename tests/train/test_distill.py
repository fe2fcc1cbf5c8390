"""Source-aligned distillation: byte-marginal teacher targets equal brute-force enumeration; the
token-aligned batches line BLT patches up with teacher positions; the encoder and decoder losses
equal hand-computed references on a tiny model; the global transformer (and teacher) stay frozen
through a distillation stage."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from byteify.tokenizer import token_byte_strings
from byteify.train.distill import AlignedWindows, ByteTrie, distill_losses, teacher_states
from byteify.parts import part_of
from byteify.train.recipe import DistillSpec, load_recipe
from byteify.resolve import load_source_tokenizer
from byteify.train.teacher import load_teacher
from byteify.tokenizer import OFFSET
from helpers import SHORT_DOCS as DOCS
from helpers import checkpoint_state, tiny_source_and_blt, tiny_tokenizer, train_tiny

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_source_and_blt(tmp_path_factory.mktemp("distill"), layers=3, seed=5)


def brute_marginal(token_bytes, probs, tok, depth):
    prefix = token_bytes[tok][:depth]
    dist = torch.zeros(256, dtype=torch.float64)
    for v, b in enumerate(token_bytes):
        if b and len(b) > depth and b[:depth] == prefix:
            dist[b[depth]] += probs[v]
    return dist / dist.sum()


def test_byte_marginals_equal_brute_force_on_a_tiny_vocabulary():
    token_bytes = [b"a", b"ab", b"abc", b"abd", b"b", b"ba", b"c", None, b"\xc3\xa9", b"\xc3\xa8x", b"\xc3"]
    g = torch.Generator().manual_seed(0)
    trie = ByteTrie(token_bytes)
    queries = [(t, d) for t, b in enumerate(token_bytes) if b for d in range(len(b))]
    probs = torch.rand(len(queries), len(token_bytes), generator=g, dtype=torch.float64)
    probs /= probs.sum(1, keepdim=True)
    tokens, depths = torch.tensor([t for t, _ in queries]), torch.tensor([d for _, d in queries])
    got = trie.marginals(probs, tokens, depths)
    for i, (t, d) in enumerate(queries):
        torch.testing.assert_close(got[i], brute_marginal(token_bytes, probs[i], t, d), rtol=0, atol=1e-12)
    which = torch.randint(0, 3, (len(queries),), generator=g)  # queries sharing three distributions
    shared = trie.marginals(probs[:3], tokens, depths, which=which)
    for i, (t, d) in enumerate(queries):
        torch.testing.assert_close(shared[i], brute_marginal(token_bytes, probs[int(which[i])], t, d), rtol=0, atol=1e-12)
    # e.g. after "a": next byte b with mass p(ab)+p(abc)+p(abd); the token "a" itself ends and is excluded
    i = queries.index((1, 1))
    p = probs[i]
    assert got[i][ord("b")] == pytest.approx(1.0) and p[0] > 0


def test_token_byte_strings_match_the_tokenizer():
    tok = tiny_tokenizer(bos=True)
    strings = token_byte_strings(tok)
    assert strings[tok.bos_token_id] is None
    checked = 0
    for i, b in enumerate(strings):
        if b is None:
            continue
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert tok.decode([i]) == text
        checked += 1
    assert checked > 150 and sum(b is not None for b in strings) == 297


def test_aligned_windows_line_patches_up_with_teacher_positions(tiny):
    _, blt = tiny
    tok = load_source_tokenizer(blt)
    w = AlignedWindows(DOCS, tok, seq_len=48)
    assert len(w) >= 4
    b = w.batch(list(range(len(w))))
    for r, (data, ids, lens, nxt_tok, nxt_byte) in enumerate(w.windows):
        n = len(data)
        assert bytes(int(x) - OFFSET for x in b.input_ids[r, 1:n + 1]) == data
        assert b.patch_lengths[r, : len(ids) + 1].tolist() == [1] + lens[:-1] + [lens[-1] + 1]
        assert b.teacher_ids[r, 1: len(ids) + 1].tolist() == ids
        assert b"".join(strings_of(tok, ids)) == data  # each patch is exactly one source token
        for t in range(n):  # label byte t+1 is byte `depth` of token (patch+1)
            q, d = int(b.byte_patch[r, t]), int(b.byte_depth[r, t])
            assert strings_of(tok, [ids[q]])[0][d] == data[t]
    assert sum(len(x[0]) for x in w.windows) == sum(len(d) for d in DOCS)  # nothing dropped


def strings_of(tok, ids):
    s = token_byte_strings(tok)
    return [s[i] for i in ids]


def manual_reference(blt_model, teacher, batch, k):
    """Independent computation of the three losses with stock modules."""

    # teacher states via transformers' own outputs
    out = teacher.model(batch.teacher_ids, output_hidden_states=True)
    hk = out.hidden_states[k]
    norm = teacher.model.norm
    teacher.model.norm = torch.nn.Identity()
    last = teacher.model(batch.teacher_ids).last_hidden_state
    teacher.model.norm = norm
    logits_t = teacher.lm_head(norm(last))
    # decoder half: the stock forward with the global transformer's forward replaced
    gt = blt_model.model.global_transformer
    captured = {}
    real_forward = gt.forward

    def fake(inputs_embeds, **kw):
        captured["x"] = inputs_embeds
        return last

    gt.forward = fake
    try:
        logits = blt_model(input_ids=batch.input_ids, patch_lengths=batch.patch_lengths).logits
    finally:
        gt.forward = real_forward
    ce = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100, reduction="sum")
    # encoder half: a copy of the global transformer truncated to k layers, run on the patch inputs
    import copy

    trunc = copy.deepcopy(gt)
    trunc.layers = trunc.layers[:k]
    h = trunc(captured["x"])
    rel = ((h - hk).pow(2).sum(-1) / hk.pow(2).sum(-1)) * (batch.patch_lengths > 0)
    return ce, rel.sum(), logits, logits_t


def test_decoder_and_encoder_losses_equal_hand_computed_references(tiny):
    _, blt_dir = tiny
    from transformers import AutoModelForCausalLM

    blt = AutoModelForCausalLM.from_pretrained(str(blt_dir)).eval()
    teacher = load_teacher(blt_dir)
    tok = load_source_tokenizer(blt_dir)
    w = AlignedWindows(DOCS, tok, seq_len=40)
    batch = w.batch([0, 1, 2])
    k = 2
    spec = DistillSpec(encoder_layers=k, kl_weight=0.5, temperature=2.0)
    trie = ByteTrie(token_byte_strings(tok))
    hk, hl, dense = teacher_states(teacher, batch, k, trie, spec.temperature)
    with torch.no_grad():
        out = distill_losses(blt, batch, hk, hl, dense, spec)
        ce, enc, logits, logits_t = manual_reference(blt, teacher, batch, k)
    assert float(out["ce"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(out["enc"]) == pytest.approx(float(enc), rel=1e-4)
    # dense KL by brute force: every label byte with a known token
    strings = token_byte_strings(tok)
    total, n = 0.0, 0
    for r, t in itertools.product(range(batch.input_ids.shape[0]), range(batch.input_ids.shape[1])):
        q = int(batch.byte_patch[r, t])
        if q < 0 or int(batch.next_token[r, q]) < 0:
            continue
        p = (logits_t[r, q].double() / 2.0).softmax(-1)
        target = brute_marginal(strings, p, int(batch.next_token[r, q]), int(batch.byte_depth[r, t]))
        logq = F.log_softmax(logits[r, t, OFFSET:OFFSET + 256].double() / 2.0, -1)
        mask = target > 0
        total += float((target[mask] * (target[mask].log() - logq[mask])).sum()) * 4.0
        n += 1
    assert n > 50
    assert float(out["kl"]) == pytest.approx(total, rel=1e-4)
    assert out["n_bytes"] == int((batch.labels != -100).sum())


def test_distill_stage_keeps_the_global_frozen_and_learns(tiny, tmp_path):
    _, blt_dir = tiny
    summary, rows = train_tiny(blt_dir, tmp_path / "run", "[{name: distill, train: [local_encoder, hash_embeddings, "
                               "local_decoder], distill: {encoder_layers: 2}, steps: 6, batch_bytes: 256, lr: 3e-3}]", 6)
    # the logged loss is the objective the step minimised: ce + kl (kl_weight 1) per byte + encoder error
    for r in rows:
        assert r["loss"] == pytest.approx(r["distill_ce"] + r["distill_kl"] + r["encoder_rel_err"], rel=1e-5)
        assert r["bpb"] == pytest.approx(r["distill_ce"] / math.log(2), rel=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"] and "val_distill_bpb" in rows[-1] and "distill_kl" in rows[0]
    before = load_file(str(blt_dir / "model.safetensors"))
    after = load_file(str(Path(summary["checkpoint"]) / "model" / "model.safetensors"))
    changed = {part_of(k) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"local_encoder", "hash_embeddings", "local_decoder"}
    state = checkpoint_state(Path(summary["checkpoint"]))["optimizer"]
    assert {g["part"] for g in state["param_groups"]} == {"local_encoder", "hash_embeddings", "local_decoder"}


def test_resume_inside_a_distill_stage(tiny, tmp_path):
    # issue 10 bug 2: the saved aligned-window position was first loaded into the byte stream,
    # whose range check could reject it (with this data: more aligned windows than packed byte rows)
    _, blt_dir = tiny
    from byteify.train.trainer import Trainer

    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"The if statement number {i} is short."}) for i in range(60)))
    base = [f"model={blt_dir}", f"data.sources=[{{path: {docs}}}]", "data.val_fraction=0.1", "run.progress=false",
            "run.log_every=1", "stages.0.train=[local_decoder]", "stages.0.distill={encoder: false}", "stages.0.steps=24",
            "stages.0.batch_bytes=128", "run.save_every=100", "run.eval_every=100"]

    def train(out, *extra, resume=None):
        recipe, raw = load_recipe("tiny-cpu", base + [f"output_dir={out}", *extra])
        return Trainer(recipe, raw, resume=resume, log=lambda m: None).run()

    train(tmp_path / "full")
    train(tmp_path / "part", "run.stop_after=20")
    state = json.loads((tmp_path / "part" / "checkpoints" / "step-00000020" / "data.json").read_text())
    assert state["fingerprint"]["packer"]["packer"] == "WindowPacker"  # the aligned stream's position, not bytes
    train(tmp_path / "part", resume="auto")
    loss = {p: {json.loads(x)["step"]: json.loads(x)["loss"] for x in (tmp_path / p / "metrics.jsonl").read_text().splitlines()
                if '"step"' in x} for p in ("full", "part")}
    assert sorted(loss["part"]) == list(range(1, 25))
    assert all(abs(loss["full"][s] - loss["part"][s]) <= 1e-6 for s in range(1, 25))


def test_distill_stage_validation_errors():
    from byteify.errors import ByteifyError

    with pytest.raises(ByteifyError, match="keeps the global transformer frozen"):
        load_recipe("tiny-cpu", ["stages.0.distill={}"])
    with pytest.raises(ByteifyError, match="decoder and/or encoder"):
        load_recipe("tiny-cpu", ["stages.0.train=[local_decoder]", "stages.0.distill={decoder: false, encoder: false}"])
