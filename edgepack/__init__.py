"""edgepack: convert a language model into small, fast variants and run them offline.

The public API is small::

    import edgepack
    with edgepack.load("bundle-dir") as session:   # or a .gguf file, or an ONNX folder
        print(session.chat([{"role": "user", "content": "Hi"}]))

``import edgepack`` imports no backend library; ``load`` imports the one it needs.
"""

from __future__ import annotations

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


def __getattr__(name: str):
    # Lazy so that importing edgepack stays cheap and backend-free.
    if name == "load":
        from .runtime import load

        return load
    raise AttributeError(f"module 'edgepack' has no attribute {name!r}")


__all__ = ["EdgepackError", "__version__", "load"]
