"""The benchmarks' character corpus: built once, then read from the prepared-data cache."""

import numpy as np

from bench.common import CHAR_VOCAB, char_tokens
from data.sources import StdlibDocstrings


def test_char_tokens_are_built_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the prepared-data directory is relative to the working dir
    first = char_tokens(max_chars=20_000)
    assert first.dtype == np.uint16 and len(first) >= 20_000
    assert first.min() >= 1 and first.max() < CHAR_VOCAB  # id 0 (padding) never occurs
    (cached,) = (tmp_path / "prepared").glob("bench-char-tokens-*")

    def no_parsing(self):
        raise AssertionError("the standard library was parsed again")

    monkeypatch.setattr(StdlibDocstrings, "documents", no_parsing)
    np.testing.assert_array_equal(char_tokens(max_chars=20_000), first)
    assert list((tmp_path / "prepared").iterdir()) == [cached]
