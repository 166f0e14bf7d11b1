"""edgepack: convert a language model into small, fast variants and run them offline.

The public API is small::

    import edgepack
    with edgepack.load("bundle-dir") as session:   # or a .gguf file, an ONNX folder, a GPTQ checkpoint
        print(session.chat([{"role": "user", "content": "Hi"}]))

``import edgepack`` imports no backend library; ``load`` imports the one it needs.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

import logging  # noqa: E402

from .errors import EdgepackError  # noqa: E402


class _TorchaoEnumNotice(logging.Filter):
    """Drops torch's notice that registering an Enum as a pytree constant is deprecated, and nothing else.

    torchao (imported by transformers' loaders and by GPTQModel when installed) registers two
    Enums at import time and torch 2.14 logs a "W... is an Enum subclass ... deprecated" line for
    each: a note to torchao's authors that would otherwise open every convert's output.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("%s is an Enum subclass and is now natively supported")


logging.getLogger("torch.utils._pytree").addFilter(_TorchaoEnumNotice())


def load(
    path,
    *,
    backend: str = "auto",
    device: str = "auto",
    n_ctx: int | None = None,
    threads: int | None = None,
    variant: str | None = None,
    ram: str | int | None = None,
    kv_type: str = "f16",
    draft: str | os.PathLike | bool | None = None,
    trusted_keys=None,
    batch_invariant: bool = False,
):
    """Load a bundle or a lone model (a .gguf file, an ONNX folder, a GPTQ checkpoint) and return a ``Session``.

    The arguments but ``ram`` and ``trusted_keys`` are ``edgepack.runtime.load``'s. ``ram`` (``"4GB"``; GPU memory
    when ``device="cuda"``) picks the bundle variant and n_ctx that fit it, lowest KLD first,
    by the rule of ``edgepack recommend``. ``trusted_keys`` (a .pub file, a list of them, or ``ed25519 ...``
    lines) loads only a bundle one of those keys signed whose files are what it signed (``edgepack.trust.verify``);
    without it, signatures are not looked at. Raises what ``runtime.load`` raises, SignatureError (naming the first
    file that differs) and KeyFileError, and UsageError when ``ram`` is given for a lone model or nothing fits it.
    """
    # Imports inside, so that importing edgepack stays cheap and backend-free.
    from .bundle import MANIFEST
    from .runtime import load as load_session

    if trusted_keys is not None or ram is not None:
        from .library import locate

        p = locate(path)
    if trusted_keys is not None:
        from .errors import SignatureError
        from .trust import verify

        if not (p / MANIFEST).is_file():
            raise SignatureError(f"{p} is not a bundle, and only bundles carry signatures: load a signed bundle, or drop trusted_keys")
        verify(p, trusted_keys)
    if ram is not None:
        from .errors import UsageError

        if not (p / MANIFEST).is_file():
            raise UsageError(f"ram={ram!r} chooses among a bundle's variants, but {p} is not a bundle: pass n_ctx instead")
        if variant is None:
            from .recommend import pick

            variant, fitting_ctx = pick(p, ram, device="cpu" if device == "auto" else device, kv_type=kv_type)
            n_ctx = n_ctx or fitting_ctx
    return load_session(
        path, backend=backend, device=device, n_ctx=n_ctx, threads=threads, variant=variant, kv_type=kv_type, draft=draft, batch_invariant=batch_invariant
    )


__all__ = ["EdgepackError", "__version__", "load"]
