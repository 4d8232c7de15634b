import csv

import pytest

from relret import captions as cap


def test_clotho_rows_keep_line_numbers_and_problems(tmp_path):
    """Rows come back with their starting line; unusable rows carry the reason instead of failing the file."""
    path = tmp_path / "c.csv"
    path.write_bytes(
        b"file_name,caption_1,caption_2\r\n"
        b'a.wav,"one, with a comma",two\r\n'
        b'b.wav,"spans\ntwo lines",x\r\n'
        b"c.wav,only one field too few\r\n"
        b"d.wav,,empty first\r\n"
        b"e.wav,caf\xe9 latin-1,ok\r\n"
        b"\r\n"
        b"f.wav,last,row\r\n"
    )
    rows = cap.read_caption_rows(path)
    assert [(r.line, r.file_name) for r in rows] == [
        (2, "a.wav"),
        (3, "b.wav"),
        (5, ""),
        (6, "d.wav"),
        (7, "e.wav"),
        (9, "f.wav"),
    ]
    assert rows[0].captions == ["one, with a comma", "two"] and rows[0].problem is None
    assert rows[1].captions == ["spans\ntwo lines", "x"]
    assert rows[2].problem == "c.csv:5: 2 fields, the header has 3"
    assert rows[3].problem == "caption 1 is empty"
    assert rows[4].problem == "caption 1 is not valid UTF-8"
    assert cap.read_caption_table(path)["d.wav"] == ["empty first"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"name,caption_1\na.wav,x\n", r"c\.csv:1: header lacks column\(s\) file_name"),
        (b"file_name,text\na.wav,x\n", r"c\.csv:1: header has no caption_1\.\.caption_k columns"),
        (b"", r"c\.csv:1: empty file"),
        (b'file_name,caption_1\na.wav,x\nb.wav,"unterminated\n', r"c\.csv:3: not a readable CSV file"),
        (b'file_name,caption_1\na.wav,x\n\nb.wav,"quoted"junk\n', r"c\.csv:4: not a readable CSV file"),
    ],
)
def test_unreadable_caption_files_fail_naming_file_and_line(tmp_path, content, match):
    """A file that is not a Clotho-style CSV raises ValueError with the file name and the offending line."""
    path = tmp_path / "c.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        cap.read_caption_rows(path)


def test_real_clotho_table_matches_csv_module(shared_data):
    """The real Clotho evaluation captions read the same as a plain csv.DictReader parse (5 per clip, 1045 clips)."""
    path = shared_data / "clotho/clotho_captions_evaluation.csv"
    with path.open(encoding="utf-8", newline="") as fh:
        reference = {r["file_name"]: [r[f"caption_{i}"] for i in range(1, 6)] for r in csv.DictReader(fh)}
    table = cap.read_caption_table(path)
    assert len(table) == 1045
    assert table == reference
    assert all(r.problem is None for r in cap.read_caption_rows(path))


def test_caption_problem():
    """Clips need at least one caption, every caption non-empty text and valid UTF-8."""
    assert cap.caption_problem(["a", "b"]) is None
    assert cap.caption_problem([]) == "no captions"
    assert cap.caption_problem(["a", "  "]) == "caption 2 is empty"
    assert cap.caption_problem(["a", None]) == "caption 2 is NoneType, not text"
    assert cap.caption_problem([b"\xff".decode("utf-8", "surrogateescape")]) == "caption 1 is not valid UTF-8"
