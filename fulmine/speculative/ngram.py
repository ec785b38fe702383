"""Prompt-lookup drafts: continue the request's text the way it continued the last time its
current ending appeared (code edits, quotes, lists, structured output repeat a lot). No weights.

An index per request maps each n-gram (min_n <= n <= max_n) to where it last ended; it grows by
the request's new tokens only, so indexing and lookup cost O(new tokens + max_n) a proposal (the
caller's token list, Request.all_token_ids, is a copy of the context it builds).
"""

from __future__ import annotations


class NgramIndex:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.last_end: dict[tuple[int, ...], int] = {}  # n-gram -> end position of its latest occurrence
        self.indexed = 0  # n-grams ending at positions <= this are in the index

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the longest earlier occurrence of the text's ending."""
        end = len(tokens)
        # index every n-gram that ends before the current ending, so the ending never matches itself
        for stop in range(self.indexed + 1, end):
            for n in range(self.min_n, min(self.max_n, stop) + 1):
                self.last_end[tuple(tokens[stop - n : stop])] = stop
        self.indexed = max(self.indexed, end - 1)
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            start = self.last_end.get(tuple(tokens[end - n :]))
            if start is not None:
                return tokens[start : start + k]
        return []


class NgramProposer:
    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.indexes: dict[str, NgramIndex] = {}

    def propose(self, request_id: str, tokens: list[int], k: int) -> list[int]:
        index = self.indexes.get(request_id)
        if index is None:
            index = self.indexes[request_id] = NgramIndex(self.min_n, self.max_n)
        return index.propose(tokens, k) if k > 0 else []

    def release(self, request_id: str) -> None:
        self.indexes.pop(request_id, None)
