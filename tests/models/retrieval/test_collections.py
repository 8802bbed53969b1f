"""CISI and Medline as data/README.md counts them; a damaged SMART file fails with file and line."""
from __future__ import annotations

import pytest

from bmray.models.retrieval.collections import DATA_DIR, load_cisi, load_medline, read_smart


def test_cisi_counts():
    c = load_cisi()
    assert len(c.documents) == 1460 and len(c.queries) == 112
    assert len(c.judged_queries) == 76
    assert sum(len(j) for j in c.qrels.values()) == 3114
    assert list(c.documents)[:2] == ["1", "2"] and list(c.queries)[-1] == "112"


def test_medline_counts():
    c = load_medline()
    assert len(c.documents) == 1033 and len(c.queries) == 30 and len(c.judged_queries) == 30
    assert sum(len(j) for j in c.qrels.values()) == 696
    per_query = [len(j) for j in c.qrels.values()]
    assert min(per_query) == 9 and max(per_query) == 39


@pytest.mark.parametrize("body,line,what", [
    (".I 1\n.W\nsome text\n.I x2\n.W\nmore\n", 4, "without a number"),
    ("stray text\n.I 1\n.W\nx\n", 1, "before the first .I"),
    (".I 1\n.W\nx\n.I 1\n.W\ny\n", 4, "appears twice"),
    (".I 1\n.W\nsister\xf0city\n", 3, "not ASCII"),
])
def test_corrupt_smart_names_file_and_line(tmp_path, body, line, what):
    path = tmp_path / "BROKEN.ALL"
    path.write_bytes(body.encode("latin-1"))
    with pytest.raises(ValueError, match=f"BROKEN.ALL:{line}: .*{what}"):
        read_smart(path)


def test_truncated_or_empty_smart(tmp_path):
    path = tmp_path / "EMPTY.ALL"
    path.write_text("")
    with pytest.raises(ValueError, match="EMPTY.ALL: no .I records"):
        read_smart(path)
    # the real file cut in the middle of the second record's marker line (".I 2" -> ".I")
    raw = (DATA_DIR / "cisi" / "CISI.ALL").read_bytes()
    cut = raw.index(b"\n.I 2") + 3
    lines = raw[:cut].count(b"\n") + 1
    path = tmp_path / "CISI.ALL"
    path.write_bytes(raw[:cut])
    with pytest.raises(ValueError, match=f"CISI.ALL:{lines}: a record marker without a number"):
        read_smart(path)
