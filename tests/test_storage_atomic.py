"""segcore.atomic: a file written in place of another is the old one or the new one, never half,
and a failed write leaves nothing behind."""

import pytest

from segcore.atomic import replacing


def test_a_finished_write_replaces_the_file(tmp_path):
    final = tmp_path / "model.pt"
    final.write_text("old")
    with replacing(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".model.pt.tmp-")
        tmp.write_text("new")
        assert final.read_text() == "old"  # until the block ends
    assert final.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    final = tmp_path / "model.pt"
    final.write_text("old")
    with pytest.raises(RuntimeError), replacing(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert final.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
