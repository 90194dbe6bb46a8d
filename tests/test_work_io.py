"""Work in: every problem with an input row is an error row naming its line, and reading goes on;
command-line selections take literal paths first and never come back empty."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pickscore_runtime.errors import InputError
from pickscore_runtime.work_io import expand_images, read_rows, read_work


def rows_of(path):
    return list(read_rows(path))


def test_jsonl_bad_lines_are_rows_and_the_rest_is_read(tmp_path):
    lines = [
        json.dumps({"prompt": "a cat", "image": "a.png"}),
        "{not json",
        "null",
        "[1, 2]",
        json.dumps({"image": "b.png"}),
        json.dumps({"prompt": "a dog"}),
        json.dumps({"prompt": 7, "image": "c.png"}),
        json.dumps({"prompt": "a dog", "images": []}),
        json.dumps({"prompt": "   ", "image": "d.png"}),
        json.dumps({"prompt": "a dog", "images": ["e.png", 3]}),
        "",
        json.dumps({"prompt": "a dog", "images": ["f.png", "g.png"]}),
    ]
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows = rows_of(path)
    assert [r.row for r in rows] == list(range(1, 12)) and [r.id for r in rows] == [str(i) for i in range(1, 12)]
    errors = [r.error for r in rows]
    assert errors[0] is None and errors[-1] is None and rows[-1].images == ["f.png", "g.png"]
    expected = ["line 2: not valid JSON", "line 3: expected a JSON object, got null", "line 4: expected a JSON object, got list",
                "line 5: no 'prompt' value", "line 6: no 'image' or 'images' value", "line 7: prompt must be a string, got int",
                "line 8: the image list is empty", "line 9: prompt is empty",
                "line 10: an image must be a non-empty path string, got 3"]
    for got, want in zip(errors[1:10], expected):
        assert got.startswith(want), (got, want)


def test_csv_unbalanced_quote_costs_one_row(tmp_path):
    path = tmp_path / "w.csv"
    path.write_text('prompt,image\na cat,a.png\n"a broken quote,b.png\na dog,c.png\n"multi\nline prompt",d.png\nx,y,z\n')
    rows = rows_of(path)
    assert rows[0].prompt == "a cat" and rows[0].error is None
    # the stray quote closes at line 5's opening quote, and what follows it is not CSV
    assert rows[1].error == "line 3: malformed CSV (',' expected after '\"')"
    assert (rows[2].prompt, rows[2].images, rows[2].line) == ("a dog", ["c.png"], 4)
    assert rows[3].prompt == "multi\nline prompt" and rows[3].images == ["d.png"] and rows[3].line == 5
    assert rows[4].error.startswith("line 7: 3 fields where the header has 2")
    path.write_text('prompt,image\na cat,a.png\n"oops,b.png\na dog,c.png\n')
    rows = rows_of(path)
    assert rows[1].error == "line 3: an unbalanced quote runs to the end of the file"
    assert (rows[2].prompt, rows[2].line) == ("a dog", 4) and len(rows) == 3


def test_csv_quote_swallowing_many_lines_is_cut_short(tmp_path):
    body = "".join(f"prompt {i},img{i}.png\n" for i in range(200))
    path = tmp_path / "w.csv"
    path.write_text('prompt,image\n"oops,bad.png\n' + body)
    rows = rows_of(path)
    assert "unbalanced quote" in rows[0].error and rows[0].line == 2
    assert len(rows) == 201 and [r.prompt for r in rows[1:]] == [f"prompt {i}" for i in range(200)]


def test_csv_bom_and_latin1(tmp_path):
    path = tmp_path / "w.csv"
    path.write_bytes("\ufeffprompt,image\r\na café,a.png\r\n".encode() + "une crème,b.png\n".encode("latin-1") +
                     b"a dog,c.png\n")
    rows = rows_of(path)
    assert rows[0].prompt == "a café" and rows[0].error is None  # the BOM did not eat the 'prompt' column
    assert rows[1].error.startswith("line 3: not UTF-8 (byte 0xe8 at column 7); save the file as UTF-8")
    assert rows[2].prompt == "a dog" and rows[2].error is None


def test_parquet_types(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "w.parquet"
    pq.write_table(pa.table({"id": [10, 11, 12], "group": [1, 1, 2], "prompt": ["a", "b", "c"],
                             "image": ["a.png", None, "c.png"]}), path)
    rows = rows_of(path)
    assert [r.id for r in rows] == ["10", "11", "12"] and rows[0].group == "1"  # groups compare as written
    assert rows[1].error == "row 2: no 'image' or 'images' value"


def test_ids_duplicates_and_missing_columns(tmp_path):
    path = tmp_path / "w.csv"
    path.write_text("id,prompt,image\na,p,1.png\nb,p,2.png\na,p,3.png\n,p,4.png\n")
    rows = rows_of(path)
    assert [r.id for r in rows] == ["a", "b", "a#row3", "4"]
    assert rows[2].error == "line 4: duplicate id 'a' (first at row 1)"
    assert rows[3].error == "line 5: the id is empty"
    bad = tmp_path / "bad.csv"
    bad.write_text("text,picture\nx,y\n")
    with pytest.raises(InputError, match="need a 'prompt' column and an 'image'"):
        rows_of(bad)
    with pytest.raises(InputError, match="unknown file type '.txt'"):
        rows_of(tmp_path / "w.txt")
    with pytest.raises(InputError, match="not found"):
        rows_of(tmp_path / "missing.csv")


def test_read_work_groups_consecutive_rows_and_keeps_bad_ones_apart(tmp_path):
    path = tmp_path / "w.jsonl"
    records = [{"prompt": "a", "image": "1"}, {"prompt": "a", "image": "2"}, "{bad", {"prompt": "a", "image": "3"},
               {"prompt": "a", "group": "g", "image": "4"}, {"prompt": "b", "images": ["5", "6"]}]
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    items = list(read_work(read_rows(path)))
    assert [(i.prompt, list(i.images), i.error is not None) for i in items] == [
        ("a", ["1", "2"], False), (None, [], True), ("a", ["3"], False), ("a", ["4"], False), ("b", ["5", "6"], False)]
    assert [[r.row for r in i.key] for i in items] == [[1, 2], [3], [4], [5], [6]]
    skipped = list(read_work(read_rows(path), skip=lambda row: row.row <= 3))
    assert [[r.row for r in i.key] for i in skipped] == [[4], [5], [6]]


def test_literal_paths_win_over_globs(tmp_path):
    (tmp_path / "img[1].png").write_bytes(b"x")
    (tmp_path / "img1.png").write_bytes(b"y")
    assert expand_images([str(tmp_path / "img[1].png")]).images == [str(tmp_path / "img[1].png")]
    assert expand_images([str(tmp_path / "img[0-9].png")]).images == [str(tmp_path / "img1.png")]


def test_folders_list_what_they_cannot_score_and_nothing_is_an_error(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(b"x")
    (folder / "sub" / "b.JPG").write_bytes(b"x")
    (folder / "notes.txt").write_text("hi")
    (folder / ".hidden.png").write_bytes(b"x")
    selection = expand_images([str(folder), str(tmp_path / "nothing*.png")])
    assert selection.images == [str(folder / "a.png"), str(folder / "sub" / "b.JPG")]
    assert selection.problems == {str(folder / "notes.txt"): "not an image file type (.txt)",
                                  str(tmp_path / "nothing*.png"): "pattern matches no files"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images to score .*directory holds no image files"):
        expand_images([str(tmp_path / "empty")])
    with pytest.raises(InputError, match="pattern matches no files"):
        expand_images([str(tmp_path / "*.webp")])


def test_unreadable_subfolder_is_listed(tmp_path):
    import shutil
    import tempfile

    # Root reads any directory: as root, the listing runs in a forked child that has dropped to `nobody`
    # (the modules are already loaded, so the child reads no file but the folder under test).
    base = Path(tempfile.mkdtemp()) if os.geteuid() == 0 else tmp_path
    base.chmod(0o755)
    locked = base / "imgs" / "locked"
    locked.mkdir(parents=True)
    (base / "imgs" / "a.png").write_bytes(b"x")
    locked.chmod(0)
    try:
        problems = list_as_nobody(lambda: expand_images([str(base / "imgs")]).problems) if os.geteuid() == 0 \
            else expand_images([str(base / "imgs")]).problems
    finally:
        locked.chmod(0o755)
        if base != tmp_path:
            shutil.rmtree(base)
    selection = type("Selection", (), {"problems": problems})
    assert "cannot read directory" in selection.problems[str(locked)]


def list_as_nobody(listing):
    """listing() in a forked child running as user 65534; its result comes back pickled through a pipe."""
    import pickle

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, list, report, exit without running the parent's cleanup
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, pickle.dumps(listing()))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)


def test_a_repeated_csv_column_is_refused_by_name(tmp_path):
    path = tmp_path / "w.csv"
    path.write_text("id,prompt,image,prompt\na,p,1.png,q\n")
    with pytest.raises(InputError, match="names the column 'prompt' more than once"):
        rows_of(path)


def test_groups_compare_as_written(tmp_path):
    path = tmp_path / "w.jsonl"
    records = [{"prompt": "a", "group": 1, "image": "1"}, {"prompt": "a", "group": "1", "image": "2"},
               {"prompt": "a", "group": 2, "image": "3"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    items = list(read_work(read_rows(path)))
    assert [(list(i.images), [r.group for r in i.key]) for i in items] == [(["1", "2"], ["1", "1"]), (["3"], ["2"])]


def test_made_up_ids_never_collide_with_literal_ones(tmp_path):
    path = tmp_path / "w.csv"
    path.write_text("id,prompt,image\na#row3,p,0.png\na,p,1.png\na,p,2.png\na#row3#row3,p,3.png\n,p,4.png\n5,p,5.png\n")
    rows = rows_of(path)
    ids = [r.id for r in rows]
    assert len(set(ids)) == len(ids)
    assert ids == ["a#row3", "a", "a#row3#row3", "a#row3#row3#row4", "5", "5#row6"]
    assert rows[2].error == "line 4: duplicate id 'a' (first at row 2)"
    assert rows[3].error == "line 5: id 'a#row3#row3' was already given to row 3 (a repeat of id 'a')"
    assert rows[4].error == "line 6: the id is empty"
    assert rows[5].error == "line 7: id '5' was already given to row 5 (its id is empty)"
