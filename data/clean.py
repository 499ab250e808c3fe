"""Text cleaning applied to every document before tokenization.

The tokenizer (SentencePiece with NFKC normalisation) maps every run of
whitespace to one word boundary, so cleaning collapses whitespace, newlines
included; documents stay separated by an end-of-text token instead.
"""

from __future__ import annotations

import re
import unicodedata

# Control and format characters (Unicode categories Cc, Cf, Cs, Co, Cn) other
# than whitespace: NULs, escape sequences, zero-width marks, lone surrogates.
_INVISIBLE = frozenset(("Cc", "Cf", "Cs", "Co", "Cn"))
_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str, lowercase: bool = False) -> str:
    """Normalise `text` to NFKC, drop control characters, collapse whitespace.

    Args:
        text: raw document text.
        lowercase: also lowercase (after normalisation).

    Returns:
        The cleaned text, stripped; empty if nothing printable was left.
    """
    text = unicodedata.normalize("NFKC", text)
    if not text.isprintable():
        text = "".join(
            " " if ch.isspace() else ch
            for ch in text
            if ch.isspace() or unicodedata.category(ch) not in _INVISIBLE
        )
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower() if lowercase else text
