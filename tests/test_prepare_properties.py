"""Property test: any text or bytes through data/prepare.py either prepares validly or fails cleanly."""

import pathlib
import tempfile

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from data.prepare import EOS_ID, prepare
from utils.config import DataConfig
from utils.errors import UserError

paragraph = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=80)
text_files = st.lists(paragraph, min_size=0, max_size=60).map(
    lambda ps: "\n\n".join(ps).encode("utf-8")
)
byte_files = st.binary(min_size=0, max_size=2000)
plain_words = st.lists(
    st.sampled_from("alpha beta gamma delta epsilon zeta eta theta".split()),
    min_size=3,
    max_size=12,
).map(" ".join)
many_paragraphs = st.lists(plain_words, min_size=40, max_size=120).map(
    lambda ps: "\n\n".join(ps).encode()
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.one_of(text_files, byte_files, many_paragraphs), vocab_size=st.integers(16, 40))
def test_prepare_succeeds_validly_or_fails_cleanly(content, vocab_size):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "input.txt").write_bytes(content)
        cfg = DataConfig(
            path=str(tmp / "input.txt"), vocab_size=vocab_size, prepared_dir=str(tmp / "prepared")
        )
        try:
            prepared = prepare(cfg, progress=False, log=lambda *_: None)
        except UserError as e:
            event(f"clean failure: {str(e).split(':')[-1][:40]}")
            assert str(e) and "\n" not in str(e)
            leftovers = list((tmp / "prepared").iterdir()) if (tmp / "prepared").exists() else []
            assert leftovers == []  # nothing half-written
            return
        event("prepared")
        meta = prepared.meta
        for split in ("train", "val", "test"):
            tokens = np.asarray(prepared.tokens(split))
            assert len(tokens) == meta["tokens"][split] > 0
            assert (
                tokens.max() < meta["vocab_size"]
                and (tokens == EOS_ID).sum() == meta["documents"][split]
            )
        assert [p.name for p in (tmp / "prepared").iterdir()] == [prepared.dir.name]
