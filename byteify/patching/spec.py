"""The one patching spec (a recipe's ``patching:``, a preset's ``patching:``, the ``--patching``
options) and the one rule for each command's default patcher.

**Defaults** (:func:`default_patching`): ``eval``, ``generate``, ``patch`` and training stages
without a ``patching:`` section all patch a model the way stock transformers patches it, from the
model's ``config.json``: entropy patching with ``patching_threshold`` (or, after
``byteify calibrate --monotonic``, byteify's ``patching_monotonic_threshold``) and
``max_patch_length`` when ``patch_in_forward`` and ``patching_mode: entropy``; otherwise static
patches of the config's ``patch_size``.  A threshold that ``byteify calibrate`` never set is
BLT's default (:data:`BLT_DEFAULT_THRESHOLD`); ``eval`` notes it, and ``train`` refuses to learn
from such patches (:func:`require_calibrated`).  ``generate`` needs entropy patching (its cache
decides patches byte by byte), so it refuses a model without an entropy model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..errors import ByteifyError
from ..schema import Strict

MODES = ("static", "entropy", "space", "source_tokens", "byte")
# transformers' BltConfig default patching_threshold (from the released BLT-1B), in nats; what
# a converted model's config carries until 'byteify calibrate' sets its own.
BLT_DEFAULT_THRESHOLD = 1.335442066192627


class PatchingSpec(Strict):
    mode: Literal["static", "entropy", "space", "source_tokens", "byte"] = "entropy"
    patch_size: int = Field(4, ge=1)  # static: bytes per patch
    threshold: float | None = None  # entropy: None = the model config's (BLT's default in a fresh conversion)
    monotonic: bool = False  # entropy: BLT's relative rule (byteify only; stock transformers uses the global rule)
    max_patch_length: int | None = Field(None, ge=1)


def calibration_record(meta: dict) -> tuple[dict | None, bool]:
    """(record, monotonic) of ``byteify calibrate`` in byteify.json, or (None, False)."""
    for key, monotonic in (("calibration", False), ("calibration_monotonic", True)):
        rec = meta.get(key)
        if isinstance(rec, dict) and rec:
            return rec, monotonic
    return None, False


def default_patching(config, meta: dict | None = None) -> PatchingSpec:
    """What stock transformers does with this config (see the module docstring); a monotonic
    calibration recorded in byteify.json selects byteify's monotonic rule."""
    _, monotonic = calibration_record(meta or {})
    if getattr(config, "patch_in_forward", False) and getattr(config, "patching_mode", None) == "entropy":
        return PatchingSpec(mode="entropy", monotonic=monotonic, max_patch_length=config.max_patch_length)
    return PatchingSpec(mode="static", patch_size=getattr(config, "patch_size", None) or 4,
                        max_patch_length=getattr(config, "max_patch_length", None))


def config_threshold(config, monotonic: bool = False) -> float | None:
    """The threshold a model config carries: ``patching_threshold`` (global rule, what stock
    transformers uses) or byteify's ``patching_monotonic_threshold`` (monotonic rule)."""
    if monotonic:
        return getattr(config, "patching_monotonic_threshold", None)
    return getattr(config, "patching_threshold", None)


def uncalibrated(spec: PatchingSpec, meta: dict) -> bool:
    """Entropy patching under the config's threshold where no calibration was ever recorded (a
    fresh conversion's: BLT's default threshold over a random entropy model); an explicit
    ``threshold`` in the spec is the user's say-so."""
    return spec.mode == "entropy" and spec.threshold is None and calibration_record(meta)[0] is None


def require_calibrated(spec: PatchingSpec, meta: dict, model: str, stage: str) -> None:
    """Refuse to *train* on :func:`uncalibrated` entropy patches (their lengths are noise and the
    run would learn from them); ``eval`` only notes them."""
    if uncalibrated(spec, meta):
        raise ByteifyError(f"stage '{stage}': entropy patching with {model}, whose entropy model was never trained "
                           "and calibrated (byteify.json has no calibration); train it first with 'byteify train "
                           f"entropy-model model={model} output_dir=...' and start from that run, or set "
                           "patching.threshold (or patching.mode=static)")
