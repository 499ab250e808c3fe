"""Text cleaning."""

from data.clean import clean_text


def test_normalises_and_collapses_whitespace():
    assert (
        clean_text("  \uff28\uff45\uff4c\uff4c\uff4f,\t\tworld\n\n  again  ")
        == "Hello, world again"
    )


def test_removes_control_and_invisible_characters():
    assert clean_text("a\x00b\x1b[0mc\u200bd\ufeffe") == "ab[0mcde"


def test_lowercase_is_optional():
    assert clean_text("Mixed CASE") == "Mixed CASE"
    assert clean_text("Mixed CASE", lowercase=True) == "mixed case"


def test_nothing_printable_gives_empty():
    assert clean_text("\x00\x01 \n\t\u200b") == ""
