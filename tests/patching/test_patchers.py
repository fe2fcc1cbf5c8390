"""Patchers: each rule on hand-made inputs, BOS as its own patch, the incremental property
(patching a prefix gives the full text's boundaries up to there, the next-byte decision
included) for every incremental patcher, the source-token patcher's offsets and its refusal
for generation, and agreement with stock ``BltForCausalLM`` entropy patching."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from byteify.errors import ByteifyError
from byteify.patching.patchers import (BytePatcher, EntropyPatcher, SourceTokenPatcher, SpacePatcher, StaticPatcher,
                                       build_patcher, entropy_starts, lengths_from_starts, starts_from_lengths)
from byteify.resolve import load_source_tokenizer
from byteify.patching.spec import PatchingSpec
from byteify.tokenizer import BOE_ID, BOS_ID, EOS_ID, encode_bytes
from patching_helpers import one_thread, corpus_texts, tiny_patcher_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


class FixedEntropies(torch.nn.Module):
    """Stands in for a BltPatcher: returns given entropies (for hand-made rules)."""

    def __init__(self, ent):
        super().__init__()
        self.ent = torch.as_tensor(ent, dtype=torch.float32)

    def forward(self, ids):
        return self.ent[: ids.shape[0], : ids.shape[1]], None, None


def ids_of(text: bytes | str, **kw) -> torch.Tensor:
    return torch.tensor([encode_bytes(text.encode() if isinstance(text, str) else text, **kw)])


def pieces(patcher, text: str) -> list[str]:
    """The patches of [BOS] + text as strings (BOS patch dropped)."""
    ids = ids_of(text)
    s = patcher.starts(ids)[0].tolist()
    b = text.encode()
    idx = [i for i in range(1, len(s)) if s[i]] + [len(s)]
    return [b[x - 1: y - 1].decode() for x, y in zip(idx[:-1], idx[1:])]


def where(mask) -> list[int]:
    return [i for i, v in enumerate(mask.tolist()) if v]


# ---- lengths -----------------------------------------------------------------------------
def test_lengths_sum_to_t_plus_one_and_round_trip():
    starts = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    lengths = lengths_from_starts(starts)
    assert lengths.tolist() == [[1, 2, 4, 2, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 2]]
    assert (lengths.sum(1) == 9).all()
    assert torch.equal(starts_from_lengths(lengths, 8), starts | torch.tensor([[0, 1] + [0] * 6] * 2, dtype=torch.bool))
    # the next byte as a patch of its own: a last patch of length 1
    nxt = lengths_from_starts(starts, torch.tensor([True, False]))
    assert nxt[0].tolist()[:5] == [1, 2, 4, 1, 1] and (nxt.sum(1) == 9).all()


# ---- entropy rules -----------------------------------------------------------------------
def test_entropy_global_rule_on_hand_made_entropies():
    ent = torch.tensor([[3.0, 1.0, 3.0, 1.0, 1.0, 2.0, 3.0]])
    # byte t starts a patch iff H[t-1] > threshold; 0 and 1 always start
    assert where(entropy_starts(ent, 1.5)[0]) == [0, 1, 3, 6]
    assert where(entropy_starts(ent, 1.5, include_next=True)[0]) == [0, 1, 3, 6, 7]
    assert where(entropy_starts(ent, 2.5)[0]) == [0, 1, 3]


def test_entropy_monotonic_rule_on_hand_made_entropies():
    ent = torch.tensor([[3.0, 1.0, 3.0, 1.0, 1.0, 2.0, 3.0]])
    # byte t starts a patch iff H[t-1] - H[t-2] > threshold
    assert where(entropy_starts(ent, 0.5, monotonic=True, include_next=True)[0]) == [0, 1, 3, 6, 7]
    assert where(entropy_starts(ent, 1.5, monotonic=True, include_next=True)[0]) == [0, 1, 3]
    # a high but flat entropy does not start patches under the relative rule
    flat = torch.full((1, 6), 4.0)
    assert where(entropy_starts(flat, 0.1, monotonic=True)[0]) == [0, 1]
    assert where(entropy_starts(flat, 0.1)[0]) == [0, 1, 2, 3, 4, 5]


def test_entropy_patcher_max_patch_length_and_bos():
    # ids: BOS a b c d e f g h i; entropies all low except H[4] -> byte 5 starts
    ent = [[0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    ids = ids_of("abcdefghi")
    p = EntropyPatcher(FixedEntropies(ent), threshold=1.0)
    assert where(p.starts_with_next(ids)[0]) == [0, 1, 5]
    capped = EntropyPatcher(FixedEntropies(ent), threshold=1.0, max_patch_length=3)
    # patches split into 3-byte pieces from each start: 1-3 | 4 | 5-7 | 8-9 (+ next byte: 8, 9, 10 -> 11)
    assert where(capped.starts_with_next(ids)[0]) == [0, 1, 4, 5, 8]
    assert capped(ids).tolist() == [[1, 3, 1, 3, 3]]
    # transformers' process_patch_lengths splits the same way
    from transformers.models.blt.modeling_blt import process_patch_lengths

    stock = process_patch_lengths(torch.tensor([[1, 4, 5]]), 3)
    assert where(starts_from_lengths(stock, 10)[0]) == [0, 1, 4, 5, 8]


def test_bos_is_its_own_patch_in_packed_documents():
    ids = torch.tensor([encode_bytes(b"abcdef", eos=True) + encode_bytes(b"ghijkl", eos=True)])
    bos2 = 8
    assert ids[0, bos2] == BOS_ID and ids[0, bos2 - 1] == EOS_ID
    low = torch.zeros(1, ids.shape[1])
    for p in (StaticPatcher(100), SpacePatcher(), EntropyPatcher(FixedEntropies(low), 1.0)):
        s = p.starts_with_next(ids)[0]
        assert s[0] and s[1] and s[bos2] and s[bos2 + 1], p.name
        assert s[-1], p.name  # after the final EOS the next byte starts a patch
    # and the BOS of a row that does not start with one
    ids = torch.tensor([[ord("x") + 4, ord("y") + 4, BOS_ID, ord("z") + 4, ord("w") + 4]])
    s = StaticPatcher(100).starts(ids)[0]
    assert where(s) == [0, 1, 2, 3]


# ---- static, byte, space -----------------------------------------------------------------
def test_static_and_byte():
    assert pieces(StaticPatcher(4), "hello, world") == ["hell", "o, w", "orld"]
    assert pieces(StaticPatcher(4, max_patch_length=3), "hello, world") == ["hel", "lo,", " wo", "rld"]
    assert pieces(BytePatcher(), "abc") == ["a", "b", "c"]
    assert StaticPatcher(4)(ids_of("hello, world")).tolist() == [[1, 4, 4, 4, 1]]  # next byte starts


def test_space_rule_on_hand_made_bytes():
    # a patch starts after the first byte of every run of non-word bytes
    assert pieces(SpacePatcher(), "hello, world") == ["hello,", " world"]
    assert pieces(SpacePatcher(), "a  b-c d") == ["a ", " b-", "c ", "d"]
    assert pieces(SpacePatcher(), "x=1\n\ny") == ["x=", "1\n", "\ny"]
    # bytes >= 0x80 are word bytes: multi-byte characters are never split
    assert pieces(SpacePatcher(), "naïve 中文 ok") == ["naïve ", "中文 ", "ok"]
    assert pieces(SpacePatcher(max_patch_length=4), "wonderful day") == ["wond", "erfu", "l ", "day"]
    # the next byte starts a patch right after a space
    assert SpacePatcher().starts_with_next(ids_of("hi "))[0, -1]
    assert not SpacePatcher().starts_with_next(ids_of("hi"))[0, -1]


# ---- incremental property ----------------------------------------------------------------
@pytest.fixture(scope="module")
def entropy_model():
    return tiny_patcher_model()


def gap_threshold(values: torch.Tensor, q: float) -> float:
    """A threshold near quantile q, in the middle of a gap between entropy values that is wide
    compared with float noise (prefix and full-text entropies agree to ~1e-5, not bitwise)."""
    v = torch.unique(values.flatten().double())
    if v.numel() < 2:
        return float(v[0]) + 1.0
    gaps = v[1:] - v[:-1]
    i = int(q * (v.numel() - 2))
    wide = torch.nonzero(gaps > 1e-3).flatten()
    if wide.numel() == 0:
        return float(v[-1]) + 1.0
    j = int(wide[(wide - i).abs().argmin()])
    return float(v[j] + v[j + 1]) / 2


byte_text = st.binary(min_size=0, max_size=60)
docs_strategy = st.lists(st.one_of(byte_text, st.text(alphabet=" ab,.\n-xyz\u00e9\u4e2d", max_size=60).map(str.encode)),
                         min_size=1, max_size=4)


def packed(docs: list[bytes], lead: int) -> torch.Tensor:
    """Documents framed and packed as in training; the row may start mid-document."""
    ids = [i for d in docs for i in encode_bytes(d, eos=True)]
    return torch.tensor([ids[lead % max(1, len(ids) - 1):] or ids])


PATCHERS = ["static", "space", "byte", "entropy-global", "entropy-global-max", "entropy-monotonic",
            "entropy-monotonic-max"]


@pytest.mark.parametrize("kind", PATCHERS)
def test_incremental_prefix_property(kind, entropy_model):
    @settings(max_examples=300 if kind.startswith("entropy") else 500, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(docs=docs_strategy, lead=st.integers(0, 50), cut=st.floats(0, 1), q=st.floats(0.05, 0.95),
           size=st.integers(1, 7))
    def check(docs, lead, cut, q, size):
        ids = packed(docs, lead)
        T = ids.shape[1]
        if kind == "static":
            p = StaticPatcher(size)
        elif kind == "space":
            p = SpacePatcher(max_patch_length=size if size > 3 else None)
        elif kind == "byte":
            p = BytePatcher()
        else:
            monotonic = "monotonic" in kind
            ent = EntropyPatcher(entropy_model, 0.0).entropies(ids)
            values = ent[:, 1:] - ent[:, :-1] if monotonic else ent
            p = EntropyPatcher(entropy_model, gap_threshold(values, q), monotonic,
                               max_patch_length=size + 1 if kind.endswith("max") else None)
        full = p.starts_with_next(ids)
        k = max(1, min(T, int(round(cut * T))))
        prefix = p.starts_with_next(ids[:, :k])
        assert torch.equal(prefix[0], full[0, : k + 1]), (kind, k, ids.tolist())
        # and the lengths the model gets agree on every complete patch
        assert (p(ids).sum(1) == T + 1).all()

    check()


def test_entropy_batching_is_row_independent(entropy_model):
    torch.manual_seed(1)
    ids = torch.randint(4, 260, (5, 40))
    ids[:, 0] = BOS_ID
    ids[3, 20:] = BOE_ID  # a padded row
    p = EntropyPatcher(entropy_model, 1.0, batch_size=2)
    batched = p.entropies(ids)
    single = torch.cat([EntropyPatcher(entropy_model, 1.0, batch_size=1).entropies(ids[i: i + 1]) for i in range(5)])
    assert torch.allclose(batched, single, atol=1e-5)
    # the padded row's real positions are those of the unpadded prefix (causal)
    alone = p.entropies(ids[3:4, :20])
    assert torch.allclose(batched[3, :20], alone[0], atol=1e-5)


# ---- source tokens -----------------------------------------------------------------------
def test_source_token_patcher_matches_the_tokenizer(tiny_entropy_blt):
    tok = load_source_tokenizer(tiny_entropy_blt)
    p = build_patcher(PatchingSpec(mode="source_tokens"), model_dir=tiny_entropy_blt)
    assert isinstance(p, SourceTokenPatcher)
    text = "The if statement is used for conditional execution: naïve café, 中文!"
    got = pieces(p, text)
    assert "".join(got) == text and got[:4] == ["The", " if", " statement", " is"]
    # a boundary at every token's start (byte-level tokens that split a character share its start)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = {len(text[:a].encode()) for a, b in enc["offset_mapping"] if b > a}
    s = p.starts(ids_of(text))[0, 1:]
    assert {i for i, v in enumerate(s.tolist()) if v} == starts
    # not incremental: flagged, never announces the next byte, and refused for generation
    assert p.incremental is False and not p.starts_with_next(ids_of(text))[0, -1]
    with pytest.raises(ByteifyError, match="generation"):
        build_patcher(PatchingSpec(mode="source_tokens"), model_dir=tiny_entropy_blt, for_generation=True)
    for mode in ("static", "space", "byte"):
        assert build_patcher(PatchingSpec(mode=mode), for_generation=True).incremental


def test_source_token_patcher_segments_and_invalid_utf8(tiny_entropy_blt):
    p = SourceTokenPatcher(load_source_tokenizer(tiny_entropy_blt))
    ids = torch.tensor([encode_bytes(b"ab\xff\xfe cd", eos=True) + encode_bytes(b"hello world") + [BOE_ID] * 3])
    s = p.starts_with_next(ids)[0]
    assert s.shape[0] == ids.shape[1] + 1
    eos = 8
    assert s[eos + 1] and s[eos + 2]  # BOS and the first byte after it
    assert s[3] and s[4]  # each invalid byte is its own token (U+FFFD)
    assert not s[-3:].any()  # BOE padding: no starts, and no next-byte start
    with pytest.raises(ByteifyError, match="not a BLT model directory"):
        build_patcher(PatchingSpec(mode="source_tokens"), model_dir=tiny_entropy_blt.parent / "src")


def test_build_patcher_errors():
    with pytest.raises(ByteifyError, match="entropy model"):
        build_patcher(PatchingSpec(mode="entropy"))
    with pytest.raises(ByteifyError, match="monotonic"):
        build_patcher(PatchingSpec(mode="entropy", monotonic=True), entropy_model=tiny_patcher_model())
    p = build_patcher(PatchingSpec(mode="entropy", threshold=2.0, max_patch_length=5), entropy_model=tiny_patcher_model())
    assert isinstance(p, EntropyPatcher) and p.threshold == 2.0 and p.max_patch_length == 5


# ---- stock transformers agreement --------------------------------------------------------
def stock_texts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = [torch.cat([torch.tensor([BOS_ID]), torch.randint(4, 260, (n,), generator=g)])[None] for n in (5, 37, 120)]
    out += [ids_of(t[:n].encode()[:n]) for t, n in zip(corpus_texts(3, offset=10), (60, 150, 240))]
    return out


def test_stock_blt_patches_like_byteify(tiny_entropy_blt):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_entropy_blt)).eval()
    stock_patcher = model.model.patcher
    cfg = model.config
    assert cfg.patch_in_forward and cfg.patching_mode == "entropy"
    for ids in stock_texts():
        T = ids.shape[1]
        ent = EntropyPatcher(stock_patcher, 0.0).entropies(ids)
        for q in (0.2, 0.5, 0.8):
            thr = gap_threshold(ent[:, 1:], q)
            for mpl in (None, 3, 6):
                ours = EntropyPatcher(stock_patcher, thr, max_patch_length=mpl)
                _, stock_lengths, _ = stock_patcher(ids, patch_size=cfg.patch_size, threshold=thr, max_patch_length=mpl)
                assert torch.equal(ours.starts(ids), starts_from_lengths(stock_lengths, T)), (T, q, mpl)
                # the stock forward patches by itself from the config: same logits as ours
                cfg.patching_threshold, cfg.max_patch_length = thr, mpl
                with torch.no_grad():
                    stock_logits = model(ids).logits
                    our_logits = model(ids, patch_lengths=ours(ids)).logits
                if mpl is None:
                    torch.testing.assert_close(our_logits, stock_logits, rtol=1e-5, atol=1e-5)
                else:
                    # transformers' process_patch_lengths drops the empty next-byte patch, so the
                    # last position can differ; every other position agrees
                    torch.testing.assert_close(our_logits[:, :-1], stock_logits[:, :-1], rtol=1e-5, atol=1e-5)


def test_logits_of_a_prefix_equal_the_full_texts(tiny_entropy_blt):
    """The next-byte decision makes the BLT's last-position logits those of the longer text:
    what incremental generation needs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_entropy_blt)).eval()
    ids = ids_of(corpus_texts(1, offset=20)[0][:80].encode()[:80])
    ent = EntropyPatcher(model.model.patcher, 0.0).entropies(ids)
    for patcher in (EntropyPatcher(model.model.patcher, gap_threshold(ent, 0.5)), StaticPatcher(4), SpacePatcher()):
        with torch.no_grad():
            full = model(ids, patch_lengths=patcher(ids)).logits
            for k in (9, 10, 11, 12, 40):
                part = model(ids[:, :k], patch_lengths=patcher(ids[:, :k])).logits
                torch.testing.assert_close(part[:, -1], full[:, k - 1], rtol=1e-4, atol=1e-4)
