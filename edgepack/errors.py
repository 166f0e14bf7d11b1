"""Every error edgepack raises.

Each class mixes in the builtin it behaves like, so callers that catch
``ValueError`` or ``FileNotFoundError`` keep working, and each message ends
with what the user can do next. The CLI prints ``str(error)`` on one line;
``--debug`` (or ``EDGEPACK_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations


class EdgepackError(Exception):
    """Root of the hierarchy: the CLI turns any of these into one line and exit code 1."""

    exit_code = 1


class UsageError(EdgepackError, ValueError):
    """An argument or option is wrong, e.g. ``unknown GGUF type 'Q9_X': choose one of ...``.

    Options appear in the message by their Python names in backticks (`` `target_size` ``); ``option``
    names the one at fault. The CLI shows each as the flag that sets it (``--target-size``).
    """

    exit_code = 2

    def __init__(self, message: str, *, option: str | None = None) -> None:
        self.option = option
        super().__init__(message)


class SourceNotFoundError(EdgepackError, FileNotFoundError):
    """A model reference names nothing: ``no model at 'foo': give a hub id (org/name), a folder, a .gguf file or a recipe name (edgepack pull --list)``."""


class OfflineError(EdgepackError, ConnectionError):
    """The hub is needed but cannot be reached: ``HF_HUB_OFFLINE is set and 'org/name' is not in the cache: unset it or pull while online``."""


class HubAuthError(EdgepackError, PermissionError):
    """The hub needs a token that is missing or refused: ``no Hugging Face token: run `hf auth login` or set HF_TOKEN ...``."""


class PublishError(EdgepackError, ConnectionError):
    """An upload to the hub failed; the hub's or the network's message is included: ``the hub refused the upload to org/name (...)``."""


class ClusterError(EdgepackError, ConnectionError):
    """A Ray cluster cannot be reached or cannot run the plan: ``Ray node 10.0.0.7 cannot read /data/edgepack/stages:
    put EDGEPACK_HOME (and the model and bundle) on storage every node mounts at the same path``."""


class InvalidModelError(EdgepackError, ValueError):
    """A file or folder is not a usable model (missing config.json, corrupt header, pickle-only weights)."""


class UnsupportedArchitectureError(EdgepackError, NotImplementedError):
    """The architecture has no converter: the message lists the supported ones."""

    def __init__(self, architecture: str, supported: list[str], hint: str = "") -> None:
        self.architecture = architecture
        self.supported = supported
        tail = f" {hint}" if hint else ""
        super().__init__(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported)}.{tail}"
        )


class BundleError(EdgepackError, ValueError):
    """A bundle's manifest is missing, malformed, or does not match its files: re-run the conversion or pass --verify to see which file."""


class SignatureError(BundleError):
    """A bundle fails its signature check, naming the first thing that differs:
    ``variants/gguf-q4_k_m/model.gguf differs from what acme (key 3f9a...) signed: get the bundle again from its maker``.

    ``path`` is the bundle-relative file at fault (``edgepack.json`` for the manifest), None when no file is
    (an unsigned bundle, a signer nobody trusts).
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class KeyFileError(EdgepackError, ValueError):
    """A signing or public key file is missing, malformed or of the wrong kind: ``key.pub is a public key: sign with
    the private key (the file without .pub)``."""


class CalibrationError(EdgepackError, ValueError):
    """Calibration or evaluation text is missing or too short for what was asked."""


class MissingDependencyError(EdgepackError, ImportError):
    """An optional library is not installed: the message names the extra (``pip install 'edgepack[gptq]'``)."""

    def __init__(self, package: str, extra: str | None = None, purpose: str = "") -> None:
        self.package = package
        self.extra = extra
        what = f" for {purpose}" if purpose else ""
        fix = f"pip install 'edgepack[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{package} is needed{what} but is not installed: {fix}")


class BackendError(EdgepackError, RuntimeError):
    """A runtime backend failed to load or run a model; the backend's own message is included."""


class ContextOverflowError(EdgepackError, ValueError):
    """A prompt does not fit the context window: raise n_ctx, shorten the prompt, or choose truncate='left'."""

    def __init__(self, needed: int, n_ctx: int, message: str | None = None) -> None:
        self.needed = needed
        self.n_ctx = n_ctx
        super().__init__(
            message
            or f"prompt plus generation needs {needed} tokens but the context holds {n_ctx}: "
            "raise n_ctx, shorten the prompt or max_tokens, or pass truncate='left'"
        )


class DiskFullError(EdgepackError, OSError):
    """Writing ran out of space; nothing that looks finished was left behind: free space and re-run."""
