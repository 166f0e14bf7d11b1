"""edgepack: convert a language model into small, fast variants and run them offline.

The public API is small::

    import edgepack
    with edgepack.load("bundle-dir") as session:   # or a .gguf file, or an ONNX folder
        print(session.chat([{"role": "user", "content": "Hi"}]))

``import edgepack`` imports no backend library; ``load`` imports the one it needs.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import EdgepackError  # noqa: E402


def __getattr__(name: str):
    # Lazy so that importing edgepack stays cheap and backend-free.
    if name == "load":
        from .runtime import load

        return load
    if name == "convert":
        from .convert import convert

        return convert
    raise AttributeError(f"module 'edgepack' has no attribute {name!r}")


__all__ = ["EdgepackError", "__version__", "convert", "load"]
