"""Prompt-lookup drafting: guess the next tokens by finding the latest n-gram in the text so far.

When an answer copies from its prompt (a summary, an edit, code that is changed in a few
places), the tokens after the last few generated ones usually appeared before. The longest
recent n-gram (``NGRAM_MAX`` down to ``NGRAM_MIN`` tokens) that occurred earlier proposes
what followed its latest earlier occurrence; the model checks the proposal in one batch
(``llamacpp``), so greedy output is unchanged and only the number of passes drops.
"""

from __future__ import annotations

NGRAM_MAX, NGRAM_MIN = 4, 2  # one-token matches are too often wrong to pay for a batch
DRAFT_MAX = 8  # tokens proposed per step


class PromptLookup:
    """The tokens seen so far, indexed by each n-gram's latest start."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest occurrence ends (exclusive)
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            self.tokens.append(t)
            end = len(self.tokens)
            for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                if end > n:  # index the n-gram *before* the newest token, so a lookup never finds the suffix itself
                    self._last[tuple(self.tokens[end - 1 - n : end - 1])] = end - 1

    def draft(self, limit: int = DRAFT_MAX) -> list[int]:
        """Up to ``limit`` tokens that followed the longest suffix's latest earlier occurrence; [] when none did."""
        toks = self.tokens
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if len(toks) <= n:
                continue
            end = self._last.get(tuple(toks[-n:]))
            if end is not None:
                return toks[end : end + limit]
        return []
