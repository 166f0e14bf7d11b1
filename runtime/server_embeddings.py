"""``POST /v1/embeddings`` of ``edgepack serve``, in OpenAI's wire format.

``input`` is a string, an array of strings, an array of token ids or an array of
such arrays; ``encoding_format`` is ``float`` or ``base64`` (little-endian float32,
what the official clients ask for by default); ``dimensions`` is accepted only as
the model's own size, since a decoder's hidden states cannot be shortened the way
Matryoshka-trained embedding models' can. Vectors have unit length.

Embedding runs on a worker thread beside the generation queue, never in it: the
session embeds on a context of its own (``Session.embed``), so a long generation
does not hold embeddings back, nor they it.
"""

from __future__ import annotations

import asyncio
import base64
import numpy as np
from starlette.responses import JSONResponse

from ..errors import ContextOverflowError
from .base import Session
from .server_protocol import ApiError, _get, _kind

MAX_INPUTS = 2048  # OpenAI's own limit on the array


def parse_input(body: dict) -> list[str] | list[list[int]]:
    """``input`` as a list of texts or of token-id lists; 400 naming what is wrong."""
    x = body.get("input")
    if isinstance(x, str) or (isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)):
        x = [x]
    if not isinstance(x, list) or not x:
        raise ApiError(400, f"'input' must be a non-empty string, array of strings, or array of token-id arrays, got {_kind(x)}", param="input")
    if len(x) > MAX_INPUTS:
        raise ApiError(400, f"'input' has {len(x)} entries; send at most {MAX_INPUTS} per request", param="input")
    text = isinstance(x[0], str)  # the first entry sets the kind; OpenAI takes no mixed arrays
    for i, t in enumerate(x):
        if not (isinstance(t, str) if text else isinstance(t, list) and all(type(v) is int for v in t)):
            what = ("a string" if text else "an array of token ids") + (" like input[0]" if i else "")
            raise ApiError(400, f"input[{i}] must be {what}, got {_kind(t)}", param="input")
        if not t:
            raise ApiError(400, f"input[{i}] is empty: give some text", param="input")
    return x


async def embed_body(session: Session, body: dict, model_id: str) -> JSONResponse:
    """The response to one request (OpenAI's ``list`` of ``embedding`` objects with usage)."""
    _get(body, "model", str, "a string")
    _get(body, "user", str, "a string")
    fmt = _get(body, "encoding_format", str, "a string", "float")
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"'encoding_format' must be float or base64, got {fmt!r}", param="encoding_format")
    dimensions = _get(body, "dimensions", int, "an integer")
    inputs = parse_input(body)

    def run() -> tuple[np.ndarray, int]:
        tokens = [session.tokenize(t, add_special=True) if isinstance(t, str) else t for t in inputs]
        for i, t in enumerate(tokens):
            if len(t) > session.n_ctx:
                raise ContextOverflowError(len(t), session.n_ctx, f"input[{i}] has {len(t)} tokens but the context holds {session.n_ctx}")
        return session.embed(tokens), sum(map(len, tokens))

    try:
        vectors, used = await asyncio.to_thread(run)
    except ContextOverflowError as e:
        raise ApiError(400, f"{e}: shorten or split it, or restart edgepack serve with a larger --n-ctx", param="input", code="context_length_exceeded") from e
    if dimensions is not None and dimensions != vectors.shape[1]:
        raise ApiError(400, f"this model's embeddings have {vectors.shape[1]} dimensions, not {dimensions}: leave 'dimensions' out", param="dimensions")
    if fmt == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        data = vectors.tolist()
    return JSONResponse({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(data)],
        "model": model_id,
        "usage": {"prompt_tokens": used, "total_tokens": used},
    })
