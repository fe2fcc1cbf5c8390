"""Cached generation: greedy bytes equal the stock model's full recompute, byte for byte; the
per-byte work is bounded (one cached step per stack, global steps only when a patch closes);
sampling, stop strings and UTF-8 streaming behave."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import byteify.cli as cli
from byteify.convert.transplant import convert
from byteify.generate import CachedBltGenerator, Utf8Stream, WindowCache, generate_ids
from byteify.convert.presets import load_spec
from byteify.convert.sources import open_source
from byteify.tokenizer import encode_bytes
from helpers import checkpoint_state, checkpoint_weights, smollm2_gguf

PROMPT = encode_bytes(b"The if statement is used for conditional execution: ")


@pytest.fixture(scope="module")
def blt_dir(tiny_converted) -> Path:
    return tiny_converted


def load(blt_dir, **config):
    model = AutoModelForCausalLM.from_pretrained(str(blt_dir), dtype=torch.float32).eval()
    for k, v in config.items():
        setattr(model.config, k, v)
    if "local_attention_window_len" in config:
        model.config.encoder_config.sliding_window = config["local_attention_window_len"]
    return model


def stock_greedy(model, prompt, n):
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
    return out


def recompute_greedy(model, prompt, n, max_len):
    """Full recompute with the stock forward, patch lengths given explicitly by BLT's rules:
    positions 0, 1 start; t+1 starts if H[t] > threshold or the patch reached max_len; lengths
    cover T+1 positions (the next byte included)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            ent = model.model.patcher(torch.tensor([ids]))[0][0].tolist()
            starts, run = [], 0
            for t in range(len(ids) + 1):
                s = t <= 1 or ent[t - 1] > model.config.patching_threshold or run >= max_len
                run = 1 if s else run + 1
                starts.append(t if s else None)
            starts = [t for t in starts if t is not None] + [len(ids) + 1]
            lengths = torch.tensor([[b - a for a, b in zip(starts, starts[1:])]])
            nxt = int(model(torch.tensor([ids]), patch_lengths=lengths).logits[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
    return out


def entropy_quantile(model, q):
    with torch.no_grad():
        ent = model.model.patcher(torch.tensor([PROMPT]))[0]
    return float(ent.quantile(q))


@pytest.mark.parametrize("q, max_len, window", [(0.5, None, None), (0.3, 3, None), (0.6, None, 12), (1.1, None, None)])
def test_greedy_equals_stock_full_recompute(blt_dir, q, max_len, window):
    model = load(blt_dir)
    threshold = entropy_quantile(model, q) if q <= 1 else 100.0  # 100 nats: one patch only
    cfg = {"patching_threshold": threshold, "max_patch_length": max_len}
    if window:
        cfg["local_attention_window_len"] = window
    model = load(blt_dir, **cfg)
    ours = generate_ids(model, PROMPT, 40, suppress_special=False, stop_at_eos=False)
    if max_len is None:
        assert ours == stock_greedy(model, PROMPT, 40)
    else:
        # transformers' process_patch_lengths drops the zero-length "next patch" marker, so the
        # stock forward never lets the last byte read the patch that just closed when
        # max_patch_length is set; byteify keeps BLT's rule, checked with the stock forward.
        assert ours == recompute_greedy(model, PROMPT, 40, max_len)
    gen = CachedBltGenerator(model)
    gen.prefill(PROMPT)
    n_patches = len(gen.state.patch_starts)
    if q > 1:
        assert n_patches == 2  # a threshold above every entropy: BOS, then one patch (positions 0 and 1 always start)
    else:
        assert 1 < n_patches < len(PROMPT)  # patching is not trivial in these cases
    if max_len:
        starts = gen.state.patch_starts + [len(PROMPT)]
        assert max(b - a for a, b in zip(starts, starts[1:])) <= max_len


def test_monotonic_rule_equals_a_full_recompute_with_byteifys_patcher(blt_dir):
    """After 'byteify calibrate --monotonic' generation patches with BLT's relative rule: greedy
    bytes equal a stock forward given EntropyPatcher(monotonic) lengths at every step."""
    from byteify.patching.patchers import EntropyPatcher
    from byteify.patching.spec import PatchingSpec

    model = load(blt_dir)
    with torch.no_grad():
        ent = model.model.patcher(torch.tensor([PROMPT]))[0][0]
    thr = float((ent[1:] - ent[:-1]).quantile(0.6))
    spec = PatchingSpec(mode="entropy", monotonic=True, threshold=thr)
    ours = generate_ids(model, PROMPT, 24, suppress_special=False, stop_at_eos=False, patching=spec)
    patcher, ids, ref = EntropyPatcher(model.model.patcher, thr, monotonic=True), list(PROMPT), []
    with torch.no_grad():
        for _ in range(24):
            t = torch.tensor([ids])
            ref.append(int(model(t, patch_lengths=patcher(t)).logits[0, -1].argmax()))
            ids.append(ref[-1])
    assert ours == ref
    gen = CachedBltGenerator(model, spec)
    gen.prefill(PROMPT)
    starts = patcher.starts(torch.tensor([PROMPT]))[0]
    assert gen.state.patch_starts == torch.nonzero(starts).flatten().tolist()
    assert 3 < len(gen.state.patch_starts) < len(PROMPT) - 3  # the rule is not trivial here


def test_per_byte_work_is_bounded(blt_dir):
    window = 8
    model = load(blt_dir, local_attention_window_len=window, patching_threshold=entropy_quantile(load(blt_dir), 0.5))
    model.config.patcher_config.sliding_window = window
    calls = {"global": 0, "encoder": 0, "decoder": 0}
    q_lens = []

    def counter(name):
        def hook(mod, args, kwargs):
            calls[name] += 1
            q_lens.append(args[0].shape[1])
        return hook

    m = model.model
    m.global_transformer.layers[0].register_forward_pre_hook(counter("global"), with_kwargs=True)
    m.local_encoder.layers[0].register_forward_pre_hook(counter("encoder"), with_kwargs=True)
    m.local_decoder.layers[0].register_forward_pre_hook(counter("decoder"), with_kwargs=True)
    gen = CachedBltGenerator(model)
    logits = gen.prefill(PROMPT)
    patches_after_prompt = len(gen.state.patch_starts)
    q_lens.clear()
    for k in calls:
        calls[k] = 0
    steps = 60
    for _ in range(steps):
        logits = gen.step(int(logits.argmax()))
        for cache in (gen.encoder_cache, gen.decoder_cache, gen.patcher_cache):
            assert cache.length() <= window - 1  # bounded attention windows
    assert calls["encoder"] == calls["decoder"] == steps
    closed = len(gen.state.patch_starts) - patches_after_prompt + (1 if gen.state.next_starts_patch else 0)
    assert calls["global"] <= closed + 1 and calls["global"] < steps
    assert set(q_lens) == {1}  # every stack runs one new position per call


def test_window_cache_keeps_last_positions():
    c = WindowCache(4)
    for i in range(6):
        k = torch.full((1, 1, 1, 2), float(i))
        full_k, _ = c.update(k, k, 0)
        assert full_k.shape[2] == min(i + 1, 4)
    assert c.k[0][0, 0, :, 0].tolist() == [3.0, 4.0, 5.0]


def test_sampling_is_seeded_and_top_k_1_is_greedy(blt_dir):
    model = load(blt_dir)
    a = generate_ids(model, PROMPT, 20, temperature=1.0, seed=3)
    b = generate_ids(model, PROMPT, 20, temperature=1.0, seed=3)
    c = generate_ids(model, PROMPT, 20, temperature=1.0, seed=4)
    assert a == b and a != c
    greedy = generate_ids(model, PROMPT, 20)
    assert generate_ids(model, PROMPT, 20, temperature=0.7, top_k=1, seed=9) == greedy
    assert all(i >= 4 or i == 2 for i in a)  # BOE/BOS/PAD are never sampled


def test_utf8_stream_never_splits_a_character():
    out = []
    s = Utf8Stream(out.append)
    data = "é日本🙂".encode()
    emitted_at = []
    for i, b in enumerate(data):
        s(b)
        emitted_at.append(len(out))
    s.close()
    assert "".join(out) == "é日本🙂"
    assert emitted_at == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4]
    out.clear()
    s = Utf8Stream(out.append)
    for b in b"a\xff\xc3":
        s(b)
    s.close()
    assert "".join(out) == "a\ufffd\ufffd"


def test_cli_generate_streams_and_stops(blt_dir):
    runner = CliRunner()
    args = ["generate", str(blt_dir), "Hello", "--max-bytes", "30", "--temperature", "1", "--seed", "0"]
    res = runner.invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    ids = generate_ids(load(blt_dir), b"Hello", 30, temperature=1.0, seed=0)
    raw = bytes(i - 4 for i in ids if i >= 4)
    assert res.output == raw.decode("utf-8", errors="replace") + "\n"
    k = next(i for i in range(2, len(raw)) if 33 <= raw[i] < 127)  # an ASCII stop character
    stop = chr(raw[k])
    res = runner.invoke(cli.app, [*args, "--stop", stop])
    assert res.exit_code == 0 and res.output == raw[: raw.index(raw[k]) + 1].decode("utf-8", errors="replace") + "\n"
    res = runner.invoke(cli.app, ["generate", str(blt_dir), "Hello", "--top-p", "1.5"])
    assert res.exit_code == 2 and "--top-p" in res.output
    res = runner.invoke(cli.app, ["generate", str(blt_dir / "nope"), "Hello"])
    assert res.exit_code == 2 and "not found (expected a training run, a checkpoint or a BLT model directory)" in res.output


def test_generate_on_a_lora_checkpoint_uses_the_adapter(tiny_converted, tmp_path):
    # issue 10 bug 4: the checkpoint's model/ has the adapter stripped; generate used the base
    from byteify.train.recipe import load_recipe
    from byteify.train.trainer import Trainer

    recipe, raw = load_recipe("tiny-cpu", [
        f"model={tiny_converted}", f"output_dir={tmp_path / 'run'}", "run.progress=false", "stages.0.train=[]",
        "stages.0.lora={rank: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj, up_proj, down_proj]}",
        "stages.0.lr=0.05", "stages.0.steps=4", "stages.0.warmup_steps=0", "run.stop_after=3"])
    ckpt = Path(Trainer(recipe, raw, log=lambda m: None).run()["checkpoint"])
    assert not (ckpt / "model").exists()  # mid-stage: only the shards, the adapter among them
    base = load(tiny_converted)
    base.load_state_dict(checkpoint_weights(ckpt))  # the base weights (frozen: LoRA trains only adapters)
    merged = load(tiny_converted)
    sd = checkpoint_weights(ckpt)
    lora = {k: v for k, v in checkpoint_state(ckpt)["model"].items() if "lora_" in k}
    for k in [k for k in lora if ".lora_A." in k]:  # W + B @ A * alpha / r, by hand
        name = k.split("base_model.model.", 1)[1].replace(".lora_A.default.weight", ".weight")
        sd[name] = sd[name] + lora[k.replace("lora_A", "lora_B")] @ lora[k] * (16 / 8)
    merged.load_state_dict(sd)
    want = generate_ids(merged, b"The if", 48)
    assert want != generate_ids(base, b"The if", 48)  # the adapter changes what is generated
    for where in (ckpt, tmp_path / "run"):  # the checkpoint, and the run (its newest checkpoint)
        res = CliRunner().invoke(cli.app, ["generate", str(where), "The if", "--max-bytes", "48"])
        assert res.exit_code == 0, res.output
        assert res.output == bytes(i - 4 for i in want if i >= 4).decode("utf-8", errors="replace") + "\n"


@pytest.mark.slow
def test_smollm2_greedy_equals_stock(tmp_path):
    gguf = smollm2_gguf()
    out = tmp_path / "blt"
    convert(open_source(gguf), out, load_spec("auto"), progress=False, verify=False, log=lambda m: None)
    model = load(out)
    model = load(out, patching_threshold=entropy_quantile(model, 0.7))
    ours = generate_ids(model, PROMPT, 16, suppress_special=False, stop_at_eos=False)
    assert ours == stock_greedy(model, PROMPT, 16)
