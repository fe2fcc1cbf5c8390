"""BLT's byte tokenizer: ids 0 BOE, 1 BOS, 2 EOS, 3 PAD, byte b -> b + 4; any bytes round-trip
(invalid UTF-8 and NUL included), and the Hugging Face files agree with byteify's own encoder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from byteify.tokenizer import (BOE_ID, BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, decode_bytes, encode_bytes,
                               save_byte_tokenizer)

SPECIAL_STRINGS = ["<s>", "</s>", "<pad>", "<boe>"]


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, written out independently of byteify."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_TO_CHAR = gpt2_bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    save_byte_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d))


def test_id_scheme():
    assert (BOE_ID, BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE) == (0, 1, 2, 3, 260)
    assert encode_bytes(b"\x00A\xff") == [1, 4, 65 + 4, 259]
    assert encode_bytes(b"hi", bos=False, eos=True) == [104 + 4, 105 + 4, 2]
    assert encode_bytes(b"", bos=False) == []
    assert decode_bytes([0, 1, 4, 2, 3, 259]) == b"\x00\xff"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans(), st.booleans())
def test_bytes_round_trip(data, bos, eos):
    ids = encode_bytes(data, bos=bos, eos=eos)
    assert len(ids) == len(data) + bos + eos
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert decode_bytes(ids) == data


def test_invalid_utf8_and_nul_round_trip():
    data = b"\x00\x80\xc3(\xff\xfe\xed\xa0\x80\x00"
    ids = encode_bytes(data, eos=True)
    assert decode_bytes(ids) == data
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")


def test_hf_tokenizer_ids(hf_tok):
    assert len(hf_tok) == VOCAB_SIZE
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert hf_tok.convert_tokens_to_ids(["<boe>", "<s>", "</s>", "<pad>"]) == [0, 1, 2, 3]
    assert hf_tok("").input_ids == [BOS_ID]
    assert hf_tok("ab", add_special_tokens=False).input_ids == [97 + 4, 98 + 4]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), st.sampled_from(SPECIAL_STRINGS)), max_size=6).map("".join))
def test_hf_tokenizer_encodes_text_like_encode_bytes(hf_tok, text):
    """Any valid text (NUL, astral characters and special-token look-alikes included) encodes to
    exactly BOS + its UTF-8 bytes; text never produces a special id."""
    assert hf_tok(text).input_ids == encode_bytes(text.encode("utf-8"))
    assert hf_tok.decode(hf_tok(text).input_ids, skip_special_tokens=True) == text


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100))
def test_hf_tokens_map_back_to_bytes(hf_tok, data):
    """``convert_ids_to_tokens`` gives GPT-2 byte-level characters, which map back to the bytes,
    whether or not they are valid UTF-8."""
    tokens = hf_tok.convert_ids_to_tokens(encode_bytes(data, bos=False))
    assert all(len(t) == 1 for t in tokens)
    assert bytes(CHAR_TO_BYTE[t] for t in tokens) == data


def test_vocab_is_the_byte_level_table(hf_tok):
    vocab = hf_tok.get_vocab()
    for b, ch in BYTE_TO_CHAR.items():
        assert vocab[ch] == b + 4
    assert hf_tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<boe>", "<s>", "</s>", "<pad>"]


def test_padding_uses_pad_id(hf_tok):
    batch = hf_tok(["a", "abc"], padding=True)
    assert batch.input_ids == [[1, 101, 3, 3], [1, 101, 102, 103]]
    assert batch.attention_mask == [[1, 1, 0, 0], [1, 1, 1, 1]]
