"""The byte stages' ``patch_norm``: a penalty on the norm of the patch vectors the encoder hands
the global transformer (keeps the encoder from drowning the transplanted layers)."""

from __future__ import annotations

import math

import pytest
import torch

from byteify.errors import ByteifyError
from byteify.evaluate import encoder_patch_vectors
from byteify.patching.patchers import StaticPatcher
from byteify.resolve import load_blt
from byteify.train.model import patch_norm_penalty
from byteify.train.recipe import load_recipe

from helpers import train_tiny


def test_penalty_is_zero_up_to_max_norm_then_the_squared_log_excess():
    v = torch.zeros(1, 3, 4)
    v[0, 0, 0] = 1.5  # below max_norm: free
    v[0, 1, :] = 2000.0  # norm 4000 = 2000 x max_norm
    v[0, 2, 0] = 1e6  # an empty patch: not counted
    got = patch_norm_penalty(v, torch.tensor([[3, 4, 0]]), max_norm=2.0)
    assert got.item() == pytest.approx(math.log(2000.0) ** 2, rel=1e-6)


def mean_patch_norm(model_dir) -> float:
    _, model = load_blt(model_dir, torch.float32, torch.device("cpu"))
    ids = torch.randint(4, 260, (2, 64), generator=torch.Generator().manual_seed(0))
    return float(encoder_patch_vectors(model, ids, StaticPatcher(4)(ids))[:, 1:].norm(dim=-1).mean())


def test_stage_with_patch_norm_shrinks_the_global_input(tiny_converted, tmp_path):
    start = mean_patch_norm(tiny_converted)
    stage = ("[{name: s, train: [local_encoder, hash_embeddings, local_decoder, global], steps: 8, "
             "batch_bytes: 256, lr: 3e-3%s}]")
    train_tiny(tiny_converted, tmp_path / "plain", stage % "", 8)
    _, rows = train_tiny(tiny_converted, tmp_path / "bounded", stage % f", patch_norm: {{max_norm: {start / 4}}}", 8)
    plain = mean_patch_norm(tmp_path / "plain" / "checkpoints" / "step-00000008" / "model")
    bounded = mean_patch_norm(tmp_path / "bounded" / "checkpoints" / "step-00000008" / "model")
    assert rows[0]["patch_norm_penalty"] > 0 and rows[-1]["patch_norm_penalty"] < 0.7 * rows[0]["patch_norm_penalty"]
    assert bounded < 0.8 * min(start, plain), (start, plain, bounded)


def test_patch_norm_is_refused_where_it_cannot_apply():
    with pytest.raises(ByteifyError, match="patch_norm"):
        load_recipe("tiny-cpu", ["stages.0.train=[entropy_model]", "stages.0.patch_norm={max_norm: 6}"])
    with pytest.raises(ByteifyError, match="max_norm"):
        load_recipe("tiny-cpu", ["stages.0.patch_norm={weight: 1}"])
