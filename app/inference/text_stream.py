"""Token ids -> text deltas: incremental detokenization and stop strings.

Detokenization decodes a short window of recent ids and emits only text that can no longer change: a trailing
replacement character means a multi-byte character is still incomplete (byte-level tokenizers split them), so it
waits for the next token. The first window starts in the prompt's last tokens, so the completion is the text it
appends to the prompt: SentencePiece-style decoders (Mistral, Phi-3) strip the leading space of the text they
decode, and " Paris" after "The capital of France is" would otherwise come out as "Paris". A chat answer is
decoded on its own instead (see `GenerationRequest.continues_prompt`).

Stop strings may span tokens: text that could be the start of a stop string is held back until it is known not to
be one, so a client never receives part of a stop string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# Prompt tokens the first window starts with: enough for a decoder's leading-space rule to apply to them instead
# of to the completion, and for special tokens at the prompt's end (skipped when decoding) to leave some text.
CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    """Text of the ids added after `context` (the prompt's ids): what they append to the context's text. Without
    a context, their text decoded on its own (`tokenizer.decode` of them all)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, context: list[int] | None = None) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(context or [])[-CONTEXT_TOKENS:]
        if self._decode(self._ids).endswith("\ufffd"):  # a prompt ending inside a character: no context
            self._ids = []
        self._prefix = 0  # window start: ids before it are already text
        self._read = len(self._ids)  # ids up to here are already text

    def _decode(self, ids: list[int]) -> str:
        # One sequence of ids decodes to one string (the declared return type also covers a batch).
        text = self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return cast(str, text)

    def add(self, token_id: int) -> str:
        """Text completed by `token_id` (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still pending at the end (an incomplete character becomes U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :]


class StopStringFilter:
    """Cuts the completion before the first stop string and holds back possible stop-string prefixes."""

    def __init__(self, stop: list[str]) -> None:
        self._stop = [s for s in stop if s]
        self._text = ""
        self._emitted = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Text safe to emit after appending `delta`; sets `stopped` when a stop string appeared."""
        if self.stopped:
            return ""
        self._text += delta
        if not self._stop:
            return self._take(len(self._text))
        longest = max(len(s) for s in self._stop)
        search_from = max(0, self._emitted - longest + 1)
        hits = [i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._take(min(hits))
        return self._take(len(self._text) - self._held_back())

    def finish(self) -> str:
        """The held-back text once no more tokens come (it was not a stop string after all)."""
        return "" if self.stopped else self._take(len(self._text))

    def _held_back(self) -> int:
        # The longest suffix of the text that is a proper prefix of some stop string.
        for size in range(min(max(len(s) for s in self._stop) - 1, len(self._text) - self._emitted), 0, -1):
            tail = self._text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0

    def _take(self, end: int) -> str:
        end = max(end, self._emitted)
        piece = self._text[self._emitted : end]
        self._emitted = end
        return piece
