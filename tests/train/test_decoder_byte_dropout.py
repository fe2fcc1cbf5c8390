"""The byte stages' ``decoder_byte_dropout``: bytes whose encoder state is withheld from the local
decoder in training, so that they must be predicted through the global transformer's states."""

from __future__ import annotations

import pytest
import torch

from byteify.errors import ByteifyError
from byteify.patching.patchers import StaticPatcher
from byteify.resolve import load_blt
from byteify.train.model import TrainModule, drop_bytes
from byteify.train.recipe import load_recipe

from helpers import train_tiny


def test_drop_bytes_zeroes_whole_bytes_and_scales_the_rest():
    x = torch.randn(4, 20_000, 8) + 3.0  # no coordinate is 0 by chance
    ids = torch.randint(4, 260, (4, 20_000), generator=torch.Generator().manual_seed(0))
    y = drop_bytes(x, 0.25, ids)
    dropped = (y == 0).all(dim=-1)
    assert ((y == 0).any(dim=-1) == dropped).all()  # a byte goes whole or not at all
    assert abs(float(dropped.float().mean()) - 0.25) < 0.01
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.75, rtol=1e-6, atol=0)
    # the mask is the rows' own: the same row draws the same bytes wherever it sits in a batch
    again = drop_bytes(x[[2, 0]], 0.25, ids[[2, 0]])
    assert torch.equal((again == 0).all(dim=-1), dropped[[2, 0]])
    assert not torch.equal(dropped[0], dropped[1])


def decoder_inputs(module: TrainModule, ids: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """(what the local decoder received, the summed BLT loss) for one forward with dropout ``p``."""
    box = {}

    def capture(_module, _args, kwargs, _out):  # after every pre-hook: what forward received
        box["x"] = kwargs["inputs_embeds"].detach()

    hook = module.blt.model.local_decoder.register_forward_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            out = module(ids, ids.roll(-1, 1), patcher=StaticPatcher(4), decoder_byte_dropout=p)
    finally:
        hook.remove()
    return box["x"], float(out.blt)


def test_the_decoder_gets_withheld_bytes_in_training_only(tiny_converted):
    _, model = load_blt(tiny_converted, torch.float32, torch.device("cpu"))
    module = TrainModule(model)
    ids = torch.randint(4, 260, (2, 64), generator=torch.Generator().manual_seed(0))
    module.eval()
    plain, plain_loss = decoder_inputs(module, ids, 0.0)
    evaluated, eval_loss = decoder_inputs(module, ids, 0.5)  # eval mode: nothing withheld
    assert torch.equal(evaluated, plain) and eval_loss == plain_loss
    module.train()
    got, train_loss = decoder_inputs(module, ids, 0.5)
    dropped = (got == 0).all(dim=-1)
    assert 0.3 < float(dropped.float().mean()) < 0.7
    torch.testing.assert_close(got[~dropped], 2.0 * plain[~dropped], rtol=1e-5, atol=1e-6)
    assert train_loss != pytest.approx(plain_loss, rel=1e-4)


def test_stage_with_decoder_byte_dropout_trains(tiny_converted, tmp_path):
    stage = ("[{name: s, train: [local_encoder, hash_embeddings, local_decoder, global], steps: 8, "
             "batch_bytes: 256, lr: 3e-3, decoder_byte_dropout: 0.3}]")
    summary, rows = train_tiny(tiny_converted, tmp_path / "run", stage, 8)
    assert rows[-1]["val_bpb"] < 0.9 * rows[0]["bpb"], (rows[0]["bpb"], rows[-1]["val_bpb"])
    assert summary["steps"] == 8


def test_decoder_byte_dropout_is_refused_where_it_cannot_apply():
    with pytest.raises(ByteifyError, match="decoder_byte_dropout"):
        load_recipe("tiny-cpu", ["stages.0.train=[entropy_model]", "stages.0.decoder_byte_dropout=0.3"])
    with pytest.raises(ByteifyError, match="decoder_byte_dropout"):
        load_recipe("tiny-cpu", ["stages.0.decoder_byte_dropout=1.0"])
