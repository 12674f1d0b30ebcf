"""Incremental detokenisation for streaming: emit only text that will not change with later tokens.

Each push decodes a short window instead of everything generated so far (which costs O(n) per
token, O(n^2) per request): the tokens not yet emitted, plus the tokens of the last emitted delta
as context, because some tokenizers decode a token differently at the start of a string
(SentencePiece drops the leading space). The delta is the window's text after the context's text.
Fast tokenizers without space clean-up are decoded by their Rust backend directly: the same text
(transformers' `decode` adds nothing then) for a third of the cost, which is most of an
understanding step's host time at 64 rows.
"""

from __future__ import annotations


class IncrementalDecoder:
    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        plain = getattr(tokenizer, "clean_up_tokenization_spaces", True) is False
        self._backend = backend if plain and hasattr(backend, "decode") else None
        self._ids: list[int] = []
        self._context = 0  # window start: the tokens of the last delta, decoded again for context only
        self._unread = 0  # first token whose text has not been emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the newly settled text (may be empty while a UTF-8 sequence is open)."""
        self._ids.append(token_id)
        context = self._decode(self._ids[self._context:self._unread])
        text = self._decode(self._ids[self._context:])
        # A trailing U+FFFD is an unfinished byte sequence; a window that does not extend its context
        # (rare normalisation effects) waits for more tokens, and the final text covers anything left.
        if text.endswith("\ufffd") or len(text) <= len(context) or not text.startswith(context):
            return ""
        self._context, self._unread = self._unread, len(self._ids)
        return text[len(context):]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def text(self) -> str:
        return self._decode(self._ids)
