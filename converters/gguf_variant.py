"""The ``gguf:TYPE`` format of ``edgepack convert``: the stages a GGUF variant is made of, in order.

``validate``, ``validate_options`` and ``build`` are the format contract of
``edgepack/convert.py``. ``f32``, ``f16``, ``bf16`` and ``q8_0`` come
straight from the writer (``gguf.py``'s ``gguf-write`` stage). Any other
llama.cpp type is made from the same source checkpoint in this order:

1. ``gguf-write`` to f16, the quantizer's input; a size target
   (``--target-size``/``--target-bpw``) is checked against its tensor sizes
   before any calibration stage runs;
2. ``imatrix``: the importance matrix from calibration text (or the user's
   ``--imatrix`` file, or none with ``--no-imatrix``);
3. ``sensitivity``, for a size target only: what each tensor's rounding to
   each candidate type costs;
4. ``quantize``: llama.cpp's own quantizer (``quantize.py``).

The importance matrix and sensitivity table are kept in the bundle's
``calibration/``.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from ..bundle import Variant
from ..errors import UsageError
from ..stages import Artifact
from .gguf import WRITER_TYPES, GGUFWrite


def validate(arg: str) -> None:
    """Check a ``gguf:TYPE`` argument before any work; raises UsageError listing the types."""
    if arg.lower() not in WRITER_TYPES:
        from . import quantize

        quantize.file_type(arg)


# ``convert(..., options=...)`` keys that steer llama.cpp's quantizer, with the flag that sets each.
# The writer's own types (f32, f16, bf16, q8_0) take none of them.
QUANT_OPTIONS = {
    "imatrix": "--imatrix/--no-imatrix",
    "calibration_tokens": "--calibration-tokens",
    "tensor_types": "--tensor-type",
    "output_type": "--output-type",
    "token_embedding_type": "--token-embedding-type",
    "target_size": "--target-size",
    "target_bpw": "--target-bpw",
    "target_types": "--target-types",
}
MIN_CALIBRATION_TOKENS = 512  # one window of the imatrix and sensitivity stages


def validate_options(options: dict[str, Any], args: list[str]) -> None:
    """Check the GGUF options for the ``gguf:`` arguments ``args`` before any work.

    Raises UsageError (a bad value, options no requested type uses, a type that
    needs the importance matrix ``--no-imatrix`` turns off) or CalibrationError
    (an ``--imatrix`` file that is not one).
    """
    from . import quantize

    fields = quant_fields(options)
    given = _given(options)
    quantized = [quantize.file_type(a) for a in args if a.lower() not in WRITER_TYPES]
    if given and not quantized:
        raise UsageError(
            f"{', '.join(given)}: only for types llama.cpp's quantizer makes, and the writer makes "
            f"{', '.join('gguf:' + a for a in args)} directly: add one, e.g. --to gguf:Q4_K_M"
        )
    if ("target_size" in fields or "target_bpw" in fields) and len(quantized) > 1:
        raise UsageError(
            f"a size target makes one mix, the type only labels it: give one quantized gguf: variant, not {', '.join(quantized)}"
        )
    if options.get("imatrix") is False:
        chosen = [k for _, k in quantize.parse_tensor_types(fields.get("tensor_types", []))]
        chosen += [fields[k] for k in ("output_type", "token_embedding_type") if k in fields]
        needs = sorted({n for ftype in quantized for n in quantize.imatrix_needed(ftype, chosen)})
        if needs:
            raise UsageError(f"--no-imatrix: {', '.join(needs)} cannot be made without an importance matrix; drop --no-imatrix")
    elif options.get("imatrix") is not None:
        _imatrix_file(options["imatrix"])


def quant_fields(options: dict[str, Any]) -> dict[str, Any]:
    """The ``quantize.Quantize.Config`` fields that ``options`` set, parsed and checked; raises UsageError.

    Sizes may be text (``"100MB"``), type lists a comma-separated string.
    """
    from . import quantize

    out: dict[str, Any] = {}
    if items := _listed(options.get("tensor_types")):
        quantize.parse_tensor_types(items)
        out["tensor_types"] = items
    for key in ("output_type", "token_embedding_type"):
        if options.get(key):
            out[key] = _flagged(QUANT_OPTIONS[key], quantize.tensor_type, options[key])
    if options.get("target_size") is not None:
        size = _flagged("--target-size", quantize.parse_size, options["target_size"])
        if size <= 0:
            raise UsageError(f"--target-size {options['target_size']!r}: give a size above zero, e.g. 100MB")
        out["target_size"] = size
    if options.get("target_bpw") is not None:
        try:
            bpw = float(options["target_bpw"])
        except (TypeError, ValueError):
            bpw = math.nan
        if not 0 < bpw <= 32:
            raise UsageError(f"--target-bpw {options['target_bpw']!r}: give bits per weight between 0 and 32, e.g. 4.5")
        out["target_bpw"] = bpw
    if "target_size" in out and "target_bpw" in out:
        raise UsageError("give --target-size or --target-bpw, not both")
    if types := _listed(options.get("target_types")):
        if "target_size" not in out and "target_bpw" not in out:
            raise UsageError("--target-types lists the types a size target may use: add --target-size or --target-bpw")
        out["target_types"] = [_flagged("--target-types", quantize.tensor_type, t) for t in types]
    tokens = options.get("calibration_tokens")
    if tokens is not None and (not str(tokens).isdigit() or int(tokens) < MIN_CALIBRATION_TOKENS):
        raise UsageError(f"--calibration-tokens {tokens!r}: give a number of tokens of at least {MIN_CALIBRATION_TOKENS} (one window)")
    return out


def _given(options: dict[str, Any]) -> list[str]:
    """Flags of the quantizer options that ``options`` set."""
    return [flag for key, flag in QUANT_OPTIONS.items() if options.get(key) not in (None, "", [], ())]


def _listed(value) -> list[str]:
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(i).strip() for i in items if str(i).strip()]


def _flagged(flag: str, parse: Callable[[Any], Any], value: Any) -> Any:
    """``parse(value)``, its UsageError prefixed with the flag it came from."""
    try:
        return parse(value)
    except UsageError as e:
        raise UsageError(f"{flag}: {e}") from e


def variant_id(arg: str, target_size: int | None = None, target_bpw: float | None = None) -> str:
    """``gguf-q4_k_m``; a size-targeted mix adds its target: ``gguf-q4_k_m-100mb``, ``gguf-q4_k_m-4.5bpw``."""
    vid = f"gguf-{arg.lower()}"
    if target_size:
        return f"{vid}-{round(target_size / 1e6, 2):g}mb"
    if target_bpw:
        return f"{vid}-{target_bpw:g}bpw"
    return vid


def build(arg: str, source: Artifact, ctx) -> Variant:
    """Make the ``gguf:TYPE`` variant of ``source`` in ``ctx``'s bundle.

    f32/f16/bf16/q8_0 come straight from the writer. Any other llama.cpp type
    is quantized by llama.cpp from the writer's f16 file (``quantize.Quantize``)
    with an importance matrix computed from calibration text on ``source``
    (``imatrix.Imatrix``). ``ctx.options`` may hold:

    ``imatrix``       False for none, or the path of an existing llama.cpp imatrix file
    ``calibration``   calibration preset (default ``builtin``) for the importance matrix and sensitivity
    ``calibration_tokens``  tokens of calibration text for both (default: each stage's own)
    ``tensor_types``, ``output_type``, ``token_embedding_type``: passed to the quantize stage
    ``target_size`` / ``target_bpw`` (+ ``target_types``): measure every tensor's sensitivity on
    ``source`` (``sensitivity.Sensitivity``) and let the quantize stage choose the mix that fits.

    Raises UsageError for bad options, and whatever the stages raise.
    """
    validate(arg)
    outtype = arg.lower()
    if outtype in WRITER_TYPES:
        if given := _given(ctx.options):
            ctx.log(f"gguf:{arg} comes straight from the writer, without {', '.join(given)}")
        art = ctx.run(GGUFWrite(), source, GGUFWrite.Config(outtype=outtype))
        meta = {k: art.meta[k] for k in ("outtype", "n_params", "f16_fallbacks", "warnings") if k in art.meta}
        return _variant(ctx, f"gguf-{outtype}", art, meta)
    from . import quantize

    config = quantize.Quantize.Config(type=quantize.file_type(arg), **quant_fields(ctx.options))
    base = ctx.run(GGUFWrite(), source, GGUFWrite.Config(outtype="f16"))
    target = bool(config.target_size or config.target_bpw)
    if target:
        quantize.check_target(base.path, config)
    config.imatrix = _imatrix(source, ctx)
    if target:
        config.sensitivity = _sensitivity(source, config.imatrix, ctx)
    art = ctx.run(quantize.Quantize(), base, config)
    return _variant(ctx, variant_id(arg, config.target_size, config.target_bpw), art, dict(art.meta))


def _imatrix_file(choice: str | os.PathLike) -> str:
    """Resolved path of a user's imatrix file, read once to check it is one; raises UsageError, CalibrationError."""
    from .imatrix import ImatrixFile

    path = Path(choice).expanduser()
    if not path.is_file():
        raise UsageError(f"--imatrix {choice}: no such file; give a llama.cpp imatrix file or leave it out to compute one")
    ImatrixFile.load(path)
    return str(path.resolve())


def _calibration_fields(ctx) -> dict[str, Any]:
    fields: dict[str, Any] = {"calibration": ctx.options.get("calibration") or "builtin"}
    if ctx.options.get("calibration_tokens"):
        fields["tokens"] = int(ctx.options["calibration_tokens"])
    return fields


def _imatrix(source: Artifact, ctx) -> str | None:
    """Path of the importance matrix for ``source`` (computed once, kept in the bundle's calibration/)."""
    choice = ctx.options.get("imatrix")
    if choice is False:
        return None
    if choice is not None:
        return _imatrix_file(choice)
    from . import imatrix

    art = ctx.run(imatrix.Imatrix(), source, imatrix.Imatrix.Config(**_calibration_fields(ctx)))
    ctx.bundle.add_calibration(art.meta["calibration"])
    _keep(ctx, art.path)
    return str(art.path)


def _sensitivity(source: Artifact, imatrix: str | None, ctx) -> str:
    """Path of the sensitivity table for ``source`` under ``imatrix`` (computed once, kept in the bundle's calibration/)."""
    from . import sensitivity

    config = sensitivity.Sensitivity.Config(imatrix=imatrix, **_calibration_fields(ctx))
    art = ctx.run(sensitivity.Sensitivity(), source, config)
    ctx.bundle.add_calibration(art.meta["calibration"])
    _keep(ctx, art.path)
    return str(art.path)


def _keep(ctx, path: Path) -> None:
    """Link (or copy) a calibration output into the bundle, where llama.cpp's tools and the report can find it."""
    kept = ctx.bundle.root / "calibration" / path.name
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.unlink(missing_ok=True)
    try:
        os.link(path, kept)
    except OSError:
        shutil.copy2(path, kept)


def _variant(ctx, vid: str, art: Artifact, meta: dict[str, Any]) -> Variant:
    path = ctx.place(art, vid)
    rel = path.relative_to(ctx.bundle.root).as_posix()
    return Variant(vid, "gguf", "llama.cpp", rel, ctx.files(path), art.meta.get("bits_per_weight"), meta)
