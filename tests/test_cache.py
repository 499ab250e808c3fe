"""utils/io.build_once: a cached directory is built once, whole, even when builders race."""

import threading

import pytest

from utils.errors import UserError
from utils.io import build_once


def _writer(tag: str, log: list | None = None):
    """A build function writing two files (meta.json last) that name the builder."""

    def build(work):
        if log is not None:
            log.append(tag)
        (work / "data.txt").write_text(tag)
        (work / "meta.json").write_text(tag)

    return build


def _entries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_built_once_then_reused(tmp_path):
    target, calls = tmp_path / "cache" / "data-abc", []
    assert build_once(target, _writer("first", calls), complete="meta.json") == (target, True)
    assert build_once(target, _writer("second", calls), complete="meta.json") == (target, False)
    assert calls == ["first"] and (target / "data.txt").read_text() == "first"
    assert _entries(tmp_path / "cache") == ["data-abc"]


def test_lost_race_returns_the_winners_directory_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "data-abc"

    def second(work):
        (work / "data.txt").write_text("second")
        # another builder of the same key finishes while this one is still building
        build_once(target, _writer("first"), complete="meta.json")
        (work / "meta.json").write_text("second")

    assert build_once(target, second, complete="meta.json") == (target, True)
    assert (target / "data.txt").read_text() == (target / "meta.json").read_text() == "first"
    assert _entries(tmp_path) == ["data-abc"]


def test_concurrent_builders_agree_on_one_whole_directory(tmp_path):
    target, both_built = tmp_path / "data-abc", threading.Barrier(2, timeout=10)
    results, errors = [], []

    def builder(tag):
        def build(work):
            _writer(tag)(work)
            both_built.wait()  # both have built before either renames: one of them must lose

        try:
            results.append(build_once(target, build, complete="meta.json"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=builder, args=(tag,)) for tag in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [(target, True)] * 2
    assert (target / "data.txt").read_text() == (target / "meta.json").read_text() in ("a", "b")
    assert _entries(tmp_path) == ["data-abc"]


def test_failing_build_leaves_nothing_and_can_be_retried(tmp_path):
    target = tmp_path / "data-abc"

    def failing(work):
        (work / "data.txt").write_text("half")
        raise ValueError("builder broke")

    with pytest.raises(ValueError, match="builder broke"):
        build_once(target, failing, complete="meta.json")
    assert _entries(tmp_path) == []
    assert build_once(target, _writer("retry"), complete="meta.json") == (target, True)
    assert (target / "data.txt").read_text() == "retry"


def test_unfinished_directory_in_the_way_is_an_error_not_a_lost_race(tmp_path):
    target = tmp_path / "data-abc"
    target.mkdir()
    (target / "stray.txt").write_text("not ours, not finished")
    with pytest.raises(UserError, match="data-abc holds an unfinished build"):
        build_once(target, _writer("new"), complete="meta.json")
    assert _entries(tmp_path) == ["data-abc"] and _entries(target) == ["stray.txt"]
