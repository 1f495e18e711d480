"""What a document is in each local format (docs/guide.md, "Your data"): a JSON record or parquet row (its text
field, its domain field), and in a .txt file a paragraph, a line or the whole file (`dataset.txt_split`)."""

from __future__ import annotations

import json

import pytest

from effitrain.config.blocks.dataset import LocalParams
from effitrain.data.build import build_local
from effitrain.data.inspect import check_local

ROWS = [{"body": f"document {i} about {'cats' if i % 2 else 'dogs'}\nsecond line {i}", "src": "a" if i % 2 else "b"}
        for i in range(12)]


def _texts(dd):
    return sorted(list(dd["train"]["text"]) + list(dd["eval"]["text"]))


def _build(tmp_path, **kw):
    return build_local(LocalParams(eval_examples_per_domain=2, **kw), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_a_record_is_a_document_with_its_text_and_domain_fields(fmt, tmp_path):
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    dd = _build(tmp_path, path=str(path), text_field="body", domain_field="src")
    assert _texts(dd) == sorted(r["body"] for r in ROWS)
    assert sorted(set(list(dd["train"]["domain"]))) == ["a", "b"]
    assert dd["eval"].num_rows == 4   # two per domain held out


TEXT = "First paragraph,\nhard-wrapped.\n\nSecond paragraph.\n\n\nThird one\nalso wrapped.\n"


@pytest.mark.parametrize("mode, expected", [
    ("blank_line", ["First paragraph,\nhard-wrapped.", "Second paragraph.", "Third one\nalso wrapped."]),
    ("line", ["First paragraph,", "hard-wrapped.", "Second paragraph.", "Third one", "also wrapped."]),
    ("file", [TEXT]),
])
def test_a_txt_file_is_cut_into_documents_by_txt_split(mode, expected, tmp_path):
    files = []
    for i in range(4):   # several files, so the one-document-per-file mode has documents to hold out
        path = tmp_path / f"part{i}.txt"
        path.write_text(TEXT)
        files.append(str(path))
    dd = build_local(LocalParams(path=files, txt_split=mode, eval_examples_per_domain=1), cache_dir=tmp_path / "c")
    texts = sorted(t.strip("\n") for t in _texts(dd))
    assert texts == sorted(e.strip("\n") for e in expected * 4)
    # the pre-flight reader counts documents the same way (it is what `effitrain check` uses)
    inv = check_local(LocalParams(path=files, txt_split=mode, eval_examples_per_domain=1), deep=True)
    assert inv.documents == len(expected) * 4


def test_one_document_per_line_no_longer_fails_the_hold_out(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"sentence number {i}\n" for i in range(40)))
    with pytest.raises(Exception, match="eval_examples_per_domain|hold"):
        _build(tmp_path, path=str(path))   # one blank-line paragraph: nothing to hold out
    dd = _build(tmp_path, path=str(path), txt_split="line")
    assert dd["train"].num_rows + dd["eval"].num_rows == 40
