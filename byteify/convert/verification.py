"""Numerical proof of a transplant: the source's decoder layers and the BLT global transformer,
run side by side on the same probe, must give the same hidden states.

The probe is the source's own input embeddings of real probe tokens, fed to the global
transformer as patch embeddings (the encoder projection bypassed, i.e. identity).  The check
runs layer by layer, holding one source layer and one BLT layer at a time, so it fits in memory
for any source size.  The reference reads the source independently of byteify's tensor map
(raw safetensors in HF layout, or transformers' own GGUF reader), so a wrong map or a wrong
RoPE permutation shows up as a large difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..modelfiles import SafetensorsDir
from ..resolve import SIDE_DIR
from .sources import SourceCheckpoint


@dataclass
class VerifyReport:
    max_abs: float
    max_rel: float
    tolerance: float
    n_tokens: int
    per_layer_rel: list[float] = field(default_factory=list)
    per_layer_abs: list[float] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tolerance

    def summary(self) -> str:
        worst = max(range(len(self.per_layer_rel)), key=self.per_layer_rel.__getitem__) if self.per_layer_rel else -1
        return (
            f"verify: {len(self.per_layer_rel)} layers on {self.n_tokens} probe tokens: "
            f"max abs diff {self.max_abs:.3e}, max rel diff {self.max_rel:.3e} "
            f"(tolerance {self.tolerance:.0e}; worst layer {worst}) -> {'PASS' if self.passed else 'FAIL'}"
        )


def probe_ids(source: SourceCheckpoint, n_tokens: int, model_dir: Path | None = None) -> torch.Tensor:
    from ..data.corpus import probe_text

    tok = None
    if model_dir is not None and (model_dir / SIDE_DIR / "tokenizer").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir / SIDE_DIR / "tokenizer"))
    ids = tok(probe_text(), add_special_tokens=False).input_ids[:n_tokens] if tok is not None else []
    if len(ids) < n_tokens:
        g = torch.Generator().manual_seed(0)
        ids = ids + torch.randint(0, source.config.vocab_size, (n_tokens - len(ids),), generator=g).tolist()
    return torch.tensor([ids])


def _causal_mask(n: int) -> torch.Tensor:
    m = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)
    return m[None, None]


def verify_transplant(source: SourceCheckpoint, model_dir: str | Path, *, tolerance: float = 1e-4,
                      n_tokens: int = 48, log=print) -> VerifyReport:
    from transformers import BltConfig
    from transformers.models.blt.modeling_blt import BltRotaryEmbedding, BltTransformerLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    model_dir = Path(model_dir)
    blt_cfg = BltConfig.from_pretrained(str(model_dir))
    gcfg = blt_cfg.global_config
    gcfg._attn_implementation = "eager"
    scfg = source.config.__class__.from_dict(source.config.to_dict())
    scfg._attn_implementation = "eager"
    for key in ("attention_bias", "mlp_bias"):  # absent from MistralConfig; the Llama layer reads them
        if not hasattr(scfg, key):
            setattr(scfg, key, False)
    out_dtype = blt_cfg.dtype if isinstance(blt_cfg.dtype, torch.dtype) else getattr(torch, str(blt_cfg.dtype or "float32"))

    blt = SafetensorsDir(model_dir)
    embed = SafetensorsDir(model_dir / SIDE_DIR, prefix="source_weights").get("embed_tokens.weight").float()
    ids = probe_ids(source, n_tokens, model_dir)
    h_ref = embed[ids]
    h_blt = h_ref.clone()
    pos = torch.arange(ids.shape[1])[None]
    mask = _causal_mask(ids.shape[1])
    pe_ref = LlamaRotaryEmbedding(scfg)(h_ref, pos)
    pe_blt = BltRotaryEmbedding(gcfg)(h_blt, pos)
    gguf_sd = source.source_state_dict_hf_layout() if source.format == "gguf" else None
    tmap = source.tensor_map

    per_layer, per_layer_abs = [], []
    with torch.no_grad():
        for i in range(scfg.num_hidden_layers):
            ref_layer = LlamaDecoderLayer(scfg, i).float().eval()
            ref_sd = {}
            for e in tmap["layer"]:
                hf_name = e["hf"].format(i=i)
                w = gguf_sd[hf_name] if gguf_sd is not None else source.read(hf_name)
                # Round like the output so the check isolates the transplant from the dtype cast.
                ref_sd[hf_name.removeprefix(f"model.layers.{i}.")] = torch.as_tensor(w).to(out_dtype).float()
            ref_layer.load_state_dict(ref_sd, strict=True)
            blt_layer = BltTransformerLayer(gcfg, i).float().eval()
            prefix = tmap["layer_target"].format(i=i)
            blt_layer.load_state_dict({e["blt"]: blt.get(prefix + e["blt"]).float() for e in tmap["layer"]}, strict=True)
            h_ref = ref_layer(h_ref, attention_mask=mask, position_ids=pos, position_embeddings=pe_ref)
            h_blt = blt_layer(h_blt, attention_mask=mask, position_ids=pos, position_embeddings=pe_blt)
            diff = (h_ref - h_blt).abs().max().item()
            per_layer.append(diff / max(h_ref.abs().max().item(), 1e-30))
            per_layer_abs.append(diff)
            del ref_layer, blt_layer
    report = VerifyReport(max_abs=max(per_layer_abs, default=0.0), max_rel=max(per_layer, default=0.0),
                          tolerance=tolerance, n_tokens=int(ids.shape[1]), per_layer_rel=per_layer,
                          per_layer_abs=per_layer_abs)
    log(report.summary())
    return report
