"""A request's output text as its tokens arrive.

Decoding the whole output again at every token costs time that grows with the output
(quadratic over a generation, and paid per request of a batch at every step). Where
the tokenizer's decode is its tokenizers backend's own (no clean-up pass after it), each
request gets a ``tokenizers`` DecodeStream, which decodes a few tokens per step and holds back
a character whose bytes are not all there yet; its pieces join into the whole output's decode
(where they cannot, as in a byte-fallback tokenizer's invalid run of bytes, the stream says so
and the request is decoded whole from then on), and a request's last text is the whole decode.
Other tokenizers decode the whole output at every token, as before. The engine looks for stop
strings only where one could end in the new text.
"""
from __future__ import annotations

from typing import Optional

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class _Stream:
    __slots__ = ("decoder", "fed", "text")

    def __init__(self):
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.fed = 0            # tokens of the output given to the decoder
        self.text = ""


class Detokenizer:
    """Output text for an engine's requests (``text``), incrementally where the tokenizer allows."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        clean_up = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self.backend: Optional[Tokenizer] = backend if isinstance(backend, Tokenizer) and not clean_up else None

    def text(self, req, whole: bool = False) -> tuple[str, int]:
        """The text of ``req.out`` (special tokens skipped) and where the text it had before ends
        (0 where decoded whole). ``whole``: its last text, decoded whole (bytes that never made a
        character are then replacement characters, as they are in the whole output's decode)."""
        state = req.decoded
        before = len(state.text) if isinstance(state, _Stream) else 0
        if self.backend is not None and state is not False and not whole:
            if state is None or state.fed > len(req.out):     # new, or its output changed under it
                state = req.decoded = _Stream()
                before = 0
            try:
                for tok in req.out[state.fed:]:
                    piece = state.decoder.step(self.backend, tok)
                    state.fed += 1
                    if piece:
                        state.text += piece
                return state.text, before
            except Exception:  # noqa: BLE001 - a token the backend cannot decode: the whole decode from now
                req.decoded, before = False, 0
        return self.tokenizer.decode(req.out, skip_special_tokens=True), before
