"""Byte tokenizer: BLT's id scheme, the Hugging Face tokenizer files that encode it, and the bytes
each token of a source (subword) tokenizer stands for.

BLT ids: 0 BOE (beginning of example, also the padding used in packing), 1 BOS, 2 EOS,
3 PAD/BPE delimiter, and byte ``b`` is id ``b + 4`` (vocabulary 260).  The files written by
:func:`save_byte_tokenizer` load with plain ``AutoTokenizer.from_pretrained`` (a ``tokenizers``
byte-level model with no merges), so users need no byteify code to tokenize.
"""

from __future__ import annotations

import json
from pathlib import Path

BOE_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
OFFSET = 4
IGNORE_INDEX = -100  # label of positions no loss is computed on (padding), as torch's cross_entropy default
VOCAB_SIZE = 256 + OFFSET
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
SPECIAL_TOKENS = {"<boe>": BOE_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<pad>": PAD_ID}


def encode_bytes(data: bytes, bos: bool = True, eos: bool = False) -> list[int]:
    """Bytes (any, not necessarily UTF-8) to BLT ids."""
    ids = [b + OFFSET for b in data]
    return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])


def decode_bytes(ids) -> bytes:
    """BLT ids to raw bytes; special ids are dropped, so invalid UTF-8 round-trips exactly."""
    return bytes(int(i) - OFFSET for i in ids if OFFSET <= int(i) < VOCAB_SIZE)


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-in character for each byte (what the ByteLevel pre-tokenizer emits)."""
    from tokenizers.pre_tokenizers import ByteLevel

    table = ByteLevel.alphabet()
    # ``alphabet`` is unordered; rebuild the canonical byte -> char table (bytes_to_unicode).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    assert set(chars.values()) == set(table)
    return [chars[b] for b in range(256)]


def build_hf_tokenizer():
    """A ``PreTrainedTokenizerFast`` with BLT's ids; adds BOS like Llama tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIAL_TOKENS)
    for b, ch in enumerate(byte_level_alphabet()):
        vocab[ch] = b + OFFSET
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token=None,
        additional_special_tokens=["<boe>"],
        model_max_length=1 << 30,
        clean_up_tokenization_spaces=False,
        # Text is bytes: '<s>' or '</s>' inside a document (HTML, code) must stay bytes, never
        # turn into BOS/EOS.  Special ids come only from the template (BOS) and explicit ids.
        split_special_tokens=True,
    )


def save_byte_tokenizer(out_dir: str | Path) -> None:
    build_hf_tokenizer().save_pretrained(str(out_dir))
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def token_byte_strings(tokenizer) -> list[bytes | None]:
    """The bytes each vocabulary entry stands for (None for special/control tokens)."""
    from tokenizers import decoders

    vocab = tokenizer.get_vocab()
    specials = set(tokenizer.all_special_ids)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
    if byte_level:
        inverse = {ch: b for b, ch in enumerate(byte_level_alphabet())}
    out: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    for piece, idx in vocab.items():
        if idx in specials:
            continue
        if byte_level:
            try:
                out[idx] = bytes(inverse[c] for c in piece)
            except KeyError:
                out[idx] = None
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            out[idx] = bytes([int(piece[3:5], 16)])
        else:
            out[idx] = piece.replace("\u2581", " ").encode("utf-8")
    return out
