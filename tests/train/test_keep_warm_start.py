"""``keep_warm_start``: a byte stage that trains the local side only in the warm start's free
coordinates, so the global transformer reads the converted patch vectors at every step."""

from __future__ import annotations

import pytest
import torch

from byteify.errors import ByteifyError
from byteify.parts import HASH_TABLE
from byteify.patching.patchers import StaticPatcher
from byteify.resolve import load_blt
from byteify.train.recipe import load_recipe

from helpers import checkpoint_state, checkpoint_weights, tiny_warm_blt, train_tiny

FREE = 8  # of the tiny preset's 32 encoder coordinates
BYTES = "model.local_encoder.embed_tokens.weight"
STAGE = ("[{name: s, train: [local_encoder, hash_embeddings, local_decoder, global], steps: 6, batch_bytes: 256, "
         "lr: 1e-2, weight_decay: 0.1, keep_warm_start: %s}]")


@pytest.fixture(scope="module")
def warm_blt(tiny_warm):
    return tiny_warm  # FREE of its 32 encoder coordinates free


@torch.no_grad()
def patch_vectors(model_dir, ids: torch.Tensor) -> torch.Tensor:
    """What the global transformer reads: the encoder's patch vectors on 4-byte patches."""
    from byteify.train.model import blt_forward

    _, blt = load_blt(model_dir, torch.float32, torch.device("cpu"))
    box = {}
    blt_forward(blt.eval(), ids, StaticPatcher(4).lengths(ids), global_fn=lambda x: box.setdefault("x", x))
    return box["x"]


@pytest.fixture(scope="module")
def trained(warm_blt, tmp_path_factory):
    """The same 6 steps with and without keep_warm_start: {flag: (summary, rows, weights, model dir)}."""
    out = {}
    for keep in (True, False):
        run = tmp_path_factory.mktemp(f"keep-{keep}") / "run"
        summary, rows = train_tiny(warm_blt, run, STAGE % str(keep).lower(), 6)
        out[keep] = (summary, rows, checkpoint_weights(summary["checkpoint"]), f"{summary['checkpoint']}/model")
    return out


def test_the_written_entries_stay_and_the_free_ones_train(warm_blt, trained):
    """With keep_warm_start the written columns of the byte and hash tables, the zero rows of the
    encoder's residual branches, the pooling and the projection are bit for bit as converted
    (weight decay 0.1 included), while the free coordinates, the decoder and the global move."""
    _, before = load_blt(warm_blt, torch.float32, torch.device("cpu"))
    before = before.state_dict()
    after = trained[True][2]
    c = before[BYTES].shape[1] - FREE
    for name in (HASH_TABLE, BYTES):
        assert torch.equal(after[name][:, :c], before[name][:, :c]), name
        assert not torch.equal(after[name][:, c:], before[name][:, c:]), name
    for name in ("model.local_encoder.layers.0.self_attn.o_proj.weight", "model.local_encoder.layers.0.mlp.down_proj.weight"):
        assert torch.equal(after[name][:c], torch.zeros_like(after[name][:c])), name
        assert after[name][c:].abs().max() > 0, name
    fixed = [k for k in before if k.startswith("model.local_encoder.cross_attn_layers.")] + \
        ["model.local_encoder.patch_embedding_projection.weight"]
    for name in fixed:
        assert torch.equal(after[name], before[name]), name
    for name in ("model.global_transformer.layers.0.self_attn.q_proj.weight", "model.local_decoder.layers.0.mlp.up_proj.weight"):
        assert not torch.equal(after[name], before[name]), name
    # the fixed entries get no gradient (clipping does not count them; their AdamW moments stay 0)
    state = checkpoint_state(trained[True][0]["checkpoint"])["optimizer"]["state"]
    moments = next(v["exp_avg"] for k, v in state.items() if k.endswith(HASH_TABLE))
    assert float(moments[:, :c].abs().max()) == 0 and float(moments[:, c:].abs().max()) > 0


def test_the_global_reads_the_converted_patch_vectors(warm_blt, trained):
    """The patch vectors after training equal the converted model's exactly with keep_warm_start,
    and move without it; both runs learn (validation below the first step's loss)."""
    ids = torch.randint(4, 260, (2, 64), generator=torch.Generator().manual_seed(0))
    start = patch_vectors(warm_blt, ids)
    assert torch.equal(patch_vectors(trained[True][3], ids), start)
    moved = patch_vectors(trained[False][3], ids)
    assert float((moved - start).norm() / start.norm()) > 0.05
    for keep in (True, False):
        rows = trained[keep][1]
        assert rows[-1]["val_bpb"] < 0.9 * rows[0]["bpb"], (keep, rows[0]["bpb"], rows[-1]["val_bpb"])


def test_keep_warm_start_needs_a_warm_started_model(tiny_converted, tmp_path):
    with pytest.raises(ByteifyError, match="keep_warm_start needs a model converted with the vocabulary warm start"):
        train_tiny(tiny_converted, tmp_path / "run", STAGE % "true", 6)
    with pytest.raises(ByteifyError, match="keep_warm_start"):
        load_recipe("tiny-cpu", ["stages.0.train=[entropy_model]", "stages.0.keep_warm_start=true"])


def test_keep_warm_start_needs_free_coordinates_to_train_the_encoder(tmp_path):
    """A warm start with free_dims 0 leaves keep_warm_start nothing to train in the encoder and the
    tables: a stage that lists them is refused by name before anything runs; without them it runs."""
    blt = tiny_warm_blt(tmp_path / "m", free_dims=0)
    with pytest.raises(ByteifyError, match="stage 's': keep_warm_start fixes every coordinate .* "
                                           "hash_embeddings and local_encoder cannot train; convert with --preset warm-kept"):
        train_tiny(blt, tmp_path / "run", STAGE % "true", 6)
    assert not (tmp_path / "run").exists()
    summary, _ = train_tiny(blt, tmp_path / "run2", STAGE.replace("local_encoder, hash_embeddings, ", "") % "true", 6)
    assert summary["steps"] == 6
