"""``Loader``: one model's variants, loaded one at a time with fixed settings, for apps that switch mid-session.

``edgepack chat`` holds one; a desktop app can do the same::

    loader = Loader("bundle-dir", n_ctx=4096)
    session, error = loader.switch(None, loader.first)      # the start-up load
    session, error = loader.switch(session, "onnx-int4")    # F2 in the chat
"""

from __future__ import annotations

import os

from .. import library
from ..bundle import MANIFEST, Bundle, Variant
from ..errors import EdgepackError
from . import registry
from .base import Session


class Loader:
    """Loads ``path`` (a bundle or a lone model) by variant id, always with the same device, context, threads, KV cache type, draft and batch invariance.

    ``path`` may name a bundle (``edgepack list``). ``variants`` lists the bundle's variants a registered backend runs (empty for a lone model); ``first`` is the
    variant asked for at start (None: ``load``'s own pick). Raises BundleError when
    ``path`` is a bundle whose manifest does not open.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        variant: str | None = None,
        backend: str = "auto",
        device: str = "auto",
        n_ctx: int | None = None,
        threads: int | None = None,
        kv_type: str = "f16",
        draft: str | None = None,
        batch_invariant: bool = False,
    ) -> None:
        self.path = library.resolve(path)
        self.first = variant
        self.backend, self.device, self.n_ctx, self.threads = backend, device, n_ctx, threads
        self.kv_type, self.draft, self.batch_invariant = kv_type, draft, batch_invariant
        listed = Bundle.open(self.path).variants if (self.path / MANIFEST).is_file() else []
        self.variants: list[Variant] = [v for v in listed if registry.for_format(v.format) is not None]

    def open(self, variant: str | None) -> Session:
        """Load ``variant``; raises what ``edgepack.load`` raises."""
        from . import load  # the package imports this module first

        # The backend asked for steers the first pick only; a variant picked later brings its own backend.
        backend = self.backend if variant == self.first else "auto"
        return load(
            self.path, backend=backend, device=self.device, n_ctx=self.n_ctx, threads=self.threads, variant=variant, kv_type=self.kv_type, draft=self.draft,
            batch_invariant=self.batch_invariant,
        )

    def switch(self, old: Session | None, variant: str | None) -> tuple[Session | None, EdgepackError | None]:
        """Close ``old``, then load ``variant``; when that fails, load ``old``'s variant again.

        The old model is freed first because two may not fit an edge box. Returns the
        session now loaded (None when nothing could be) and the error of the failed load.
        """
        fallback = old.info.variant if old is not None else None
        if old is not None:
            old.close()
        try:
            return self.open(variant), None
        except EdgepackError as e:
            if old is None:
                return None, e
            try:
                return self.open(fallback), e
            except EdgepackError:
                return None, e
