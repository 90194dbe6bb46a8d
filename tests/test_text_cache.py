"""Text-embedding cache: LRU, persistent SQLite (WAL) shared by processes, invalidation, and every way a
cache file can fail: only real corruption moves a file aside; anything else leaves it as it is and the
run goes on, saying so once."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from helpers import load_quietly, mounted_tmpfs
from pickscore_runtime.text_cache import CacheCorruptWarning, CacheWarning, SqliteVectorStore, TextEmbeddingCache, cache_stats

PROMPTS = ["a cat", "a dog", "A  CAT", "a red car at night", "a cat"]


class CountingBackend:
    """Wraps the real backend to count the prompts that reach the text tower."""

    def __init__(self, inner):
        self.inner, self.text_rows = inner, 0
        self.batch_size = inner.batch_size

    def embed_text(self, ids):
        self.text_rows += len(ids)
        return self.inner.embed_text(ids)


def counted(scorer) -> CountingBackend:
    scorer.text.backend = counting = CountingBackend(scorer.text.backend)
    return counting


def test_cache_returns_what_the_tower_computes_and_skips_it_after(tiny_artifacts, tiny_reference):
    scorer = load_quietly(tiny_artifacts)
    counting = counted(scorer)
    first = scorer.embed_text(PROMPTS)
    # "a cat" and "A  CAT" tokenise identically (lower-casing, whitespace): one tower row for both, and the repeat
    assert counting.text_rows == 3
    np.testing.assert_allclose(first, tiny_reference.text_embeddings(PROMPTS), atol=1e-5)
    again = scorer.embed_text(PROMPTS)
    assert counting.text_rows == 3 and scorer.text_cache.hits >= 3
    np.testing.assert_array_equal(again, first)


def test_a_cached_prompt_never_reaches_the_tower_again(tiny_artifacts, tmp_path):
    """What makes a cached prompt cheap; its time is measured by `pickscore bench --stages text-cached`."""
    scorer = load_quietly(tiny_artifacts, text_cache_file=tmp_path / "c.sqlite")
    scorer.embed_text(["a cached prompt"])
    counting = counted(scorer)
    for _ in range(50):
        scorer.embed_text(["a cached prompt"])
    assert counting.text_rows == 0 and scorer.text_cache.hits >= 50


def test_lru_capacity_evicts_oldest():
    cache = TextEmbeddingCache("ns", dim=4, capacity=2)
    vec = np.ones(4, np.float32)
    cache.put_many({b"a": vec, b"b": vec})
    cache.get_many([b"a"])  # a is now most recent
    cache.put_many({b"c": vec})
    assert set(cache.get_many([b"a", b"b", b"c"])) == {b"a", b"c"}


def test_persistent_cache_survives_processes_and_counts(tiny_artifacts, tmp_path):
    path = tmp_path / "text.sqlite"
    scorer = load_quietly(tiny_artifacts, text_cache_file=path)
    first = scorer.embed_text(PROMPTS)
    scorer.text_cache.close()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    fresh = load_quietly(tiny_artifacts, text_cache_file=path)  # a new scorer: empty LRU, warm file
    counting = counted(fresh)
    np.testing.assert_array_equal(fresh.embed_text(PROMPTS), first)
    assert counting.text_rows == 0
    fresh.embed_text(["something new"])  # a write flushes the counters
    fresh.text_cache.close()
    (ns,) = cache_stats(path)["namespaces"]
    assert ns["entries"] == 4 and ns["hits"] >= 3 and ns["misses"] >= 4


def test_changed_artifacts_never_get_old_entries(tiny_artifacts, tmp_path):
    path = tmp_path / "text.sqlite"
    original = load_quietly(tiny_artifacts, text_cache_file=path)
    original.embed_text(["a cat"])
    original.text_cache.close()
    changed = shutil.copytree(tiny_artifacts, tmp_path / "changed")
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["logit_scale"] = 1.0  # a different fingerprint, as any re-export gives
    (changed / "manifest.json").write_text(json.dumps(manifest))
    other = load_quietly(changed, text_cache_file=path)
    counting = counted(other)
    other.embed_text(["a cat"])
    assert counting.text_rows == 1
    assert original.text_cache.namespace != other.text_cache.namespace


def test_corrupt_cache_file_is_moved_aside_with_a_warning(tiny_artifacts, tmp_path):
    path = tmp_path / "text.sqlite"
    made = load_quietly(tiny_artifacts, text_cache_file=path)
    made.embed_text(["a cat"])
    made.close()
    damaged = b"not a database\0\0" + path.read_bytes()[16:]  # our cache, its SQLite magic overwritten
    path.write_bytes(damaged)
    with pytest.warns(CacheCorruptWarning, match="moved to"):
        scorer = load_quietly(tiny_artifacts, text_cache_file=path)
    plain = load_quietly(tiny_artifacts)
    np.testing.assert_allclose(scorer.embed_text(PROMPTS), plain.embed_text(PROMPTS), atol=1e-6)
    (aside,) = tmp_path.glob("text.sqlite.corrupt-*")
    assert aside.read_bytes() == damaged  # kept, not deleted
    assert cache_stats(path)["namespaces"][0]["entries"] == 3  # "a cat" and "A  CAT" share a key


def test_a_file_that_is_not_a_cache_is_never_moved_or_replaced(tiny_artifacts, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not a database at all" * 100)
    scorer, messages = _no_cache_warnings_but(CacheWarning, lambda: load_quietly(tiny_artifacts, text_cache_file=path))
    assert "not a text cache; it was left untouched" in messages[0]
    assert scorer.embed_text(["a cat"]).shape == (1, scorer.embed_dim)
    assert path.read_bytes() == b"this is not a database at all" * 100 and not list(tmp_path.glob("*.corrupt-*"))


@pytest.mark.integration
def test_cli_refuses_a_text_cache_that_is_the_input_the_output_or_another_file(tiny_artifacts, sample_images, tmp_path):
    from helpers import run_cli

    work = tmp_path / "in.jsonl"
    work.write_text(json.dumps({"prompt": "a cat", "image": str(sample_images[0])}) + "\n")
    out = tmp_path / "out.jsonl"
    notes = tmp_path / "notes.db"
    notes.write_bytes(b"my notes, not SQLite")
    app = tmp_path / "app.sqlite"
    conn = sqlite3.connect(app)
    conn.execute("CREATE TABLE customers (name TEXT)")
    conn.commit()
    conn.close()
    cases = [(work, "is the --input file"), (out, "is the --output file"),
             (tmp_path / "out.jsonl.parts" / "c.sqlite", "is --output's parts directory"),
             (notes, "not a text cache (not an SQLite database)"), (app, "another application's SQLite database")]
    before = {p: p.read_bytes() for p in (work, notes, app)}
    for cache, message in cases:
        done = run_cli("score", "--artifacts", str(tiny_artifacts), "--hash-check", "size", "--input", str(work),
                       "--output", str(out), "--text-cache", str(cache), "-q")
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (cache, done.stderr)
    assert {p: p.read_bytes() for p in before} == before
    assert not out.exists() and not list(tmp_path.glob("*.corrupt-*"))
    fine = run_cli("score", "--artifacts", str(tiny_artifacts), "--hash-check", "size", "--input", str(work),
                   "--output", str(out), "--text-cache", str(tmp_path / "text.sqlite"))
    assert fine.returncode == 0, fine.stderr[-2000:]


def test_damaged_row_is_a_miss_not_a_wrong_vector(tiny_artifacts, tmp_path):
    path = tmp_path / "text.sqlite"
    scorer = load_quietly(tiny_artifacts, text_cache_file=path)
    want = scorer.embed_text(["a cat"])
    scorer.text_cache.close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE embeddings SET vector = x'00'")
    conn.commit()
    conn.close()
    fresh = load_quietly(tiny_artifacts, text_cache_file=path)
    np.testing.assert_allclose(fresh.embed_text(["a cat"]), want, atol=1e-6)


def _healthy_cache(tiny_artifacts, path) -> bytes:
    scorer = load_quietly(tiny_artifacts, text_cache_file=path)
    scorer.embed_text(["a cat", "a dog"])
    scorer.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path.read_bytes()


def _no_cache_warnings_but(kind, fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    ours = [w for w in caught if issubclass(w.category, CacheWarning)]
    assert ours and all(w.category is kind for w in ours), [str(w.message) for w in caught]
    return result, [str(w.message) for w in ours]


def test_foreign_database_is_left_alone(tiny_artifacts, tmp_path):
    path = tmp_path / "app.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (name TEXT)")
    conn.execute("INSERT INTO customers VALUES ('alice')")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    scorer, messages = _no_cache_warnings_but(CacheWarning, lambda: load_quietly(tiny_artifacts, text_cache_file=path))
    assert "another application" in messages[0]
    scorer.embed_text(PROMPTS)
    scorer.close()
    assert path.read_bytes() == before and not list(tmp_path.glob("*.corrupt-*"))


def test_a_directory_is_not_renamed(tiny_artifacts, tmp_path):
    folder = tmp_path / "cache_dir"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    scorer, messages = _no_cache_warnings_but(CacheWarning, lambda: load_quietly(tiny_artifacts, text_cache_file=folder))
    assert "is a directory" in messages[0]
    assert scorer.embed_text(["a cat"]).shape == (1, scorer.embed_dim)
    assert (folder / "keep.txt").read_text() == "mine" and not list(tmp_path.glob("*.corrupt-*"))


def test_locked_cache_degrades_and_keeps_the_file(tiny_artifacts, tmp_path):
    path = tmp_path / "text.sqlite"
    before = _healthy_cache(tiny_artifacts, path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holding the write lock for as long as it likes
    try:
        cache = TextEmbeddingCache("ns", 64, path=path, busy_timeout_s=0.2)
        _, messages = _no_cache_warnings_but(CacheWarning, lambda: cache.put_many({b"k": np.ones(64, np.float32)}))
        assert "locked by another process" in messages[0]
        assert set(cache.get_many([b"k"])) == {b"k"}  # still served from memory
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert path.read_bytes()[:16] == before[:16] and not list(tmp_path.glob("*.corrupt-*"))


def test_read_only_cache_is_read_not_replaced(tiny_artifacts, tmp_path):
    with mounted_tmpfs(tmp_path / "fs", "1m") as fs:
        if fs is None and os.geteuid() == 0:
            pytest.skip("needs a read-only file: root ignores file modes and this machine cannot mount")
        path = (fs or tmp_path) / "text.sqlite"
        want = load_quietly(tiny_artifacts).embed_text(["a cat"])
        _healthy_cache(tiny_artifacts, path)
        if fs is not None:
            subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        else:
            path.chmod(0o444)
            path.parent.chmod(0o555)
        try:
            scorer, messages = _no_cache_warnings_but(CacheWarning, lambda: load_quietly(tiny_artifacts, text_cache_file=path))
            assert "used read-only" in messages[0]
            assert scorer.text_cache.store.readable and not scorer.text_cache.store.writable
            counting = counted(scorer)
            np.testing.assert_allclose(scorer.embed_text(["a cat"]), want, atol=1e-6)
            assert counting.text_rows == 0  # read from the file
            scorer.embed_text(["a new prompt"])  # computed, not kept, no error
            scorer.close()
        finally:
            if fs is None:
                path.parent.chmod(0o755)


def test_full_disk_stops_persisting_and_the_run_goes_on(tiny_artifacts, tmp_path):
    with mounted_tmpfs(tmp_path / "fs", "64k") as fs:
        if fs is None:
            pytest.skip("cannot mount a small tmpfs here")
        cache = TextEmbeddingCache("ns", 1024, path=fs / "text.sqlite")
        vec = np.ones(1024, np.float32)

        def fill():
            for i in range(200):  # 200 x 4 KB: more than the 64 KB file system holds
                cache.put_many({f"k{i}".encode(): vec})
        _, messages = _no_cache_warnings_but(CacheWarning, fill)
        assert "disk is full" in messages[0] or "failed on write" in messages[0]
        assert not cache.store.writable
        assert set(cache.get_many([b"k199"])) == {b"k199"}  # the LRU still has it


def test_several_processes_share_one_cache(tiny_artifacts, tmp_path):
    path = tmp_path / "shared.sqlite"
    code = textwrap.dedent(f"""
        import sys, warnings
        from pickscore_runtime import PickScorer, RandomWeightsWarning
        warnings.simplefilter("ignore", RandomWeightsWarning)
        s = PickScorer.load({str(tiny_artifacts)!r}, backend="onnx-cpu", hash_check="size", text_cache_file={str(path)!r})
        worker = int(sys.argv[1])
        for round in range(5):
            prompts = [f"prompt {{(worker * 7 + round * 3 + k) % 40}}" for k in range(8)]
            s.embed_text(prompts)
        s.close()
        print("OK")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 and "OK" in o for p, (o, _) in zip(procs, outs)), [e[-2000:] for _, e in outs]
    stats = cache_stats(path)["namespaces"][0]
    assert stats["entries"] == 40
    assert stats["hits"] + stats["misses"] == 4 * 5 * 8
    # every stored vector is the one the tower computes
    cached = load_quietly(tiny_artifacts, text_cache_file=path).embed_text([f"prompt {k}" for k in range(40)])
    np.testing.assert_allclose(cached, load_quietly(tiny_artifacts).embed_text([f"prompt {k}" for k in range(40)]), atol=1e-6)


def test_cache_stats_cli(tiny_artifacts, tmp_path):
    from pickscore_runtime.cli import main

    path = tmp_path / "c.sqlite"
    assert main(["cache", "stats", str(path)]) == 2  # missing file: clear error
    path.write_bytes(b"garbage" * 100)
    assert main(["cache", "stats", str(path)]) == 2  # not a database: clear error, file untouched
    assert path.read_bytes() == b"garbage" * 100
    path.unlink()
    s = load_quietly(tiny_artifacts, text_cache_file=path)
    s.embed_text(["x", "y"])
    s.close()
    assert main(["cache", "stats", str(path)]) == 0


def test_store_reports_what_it_can_do(tmp_path):
    store = SqliteVectorStore(tmp_path / "new.sqlite", 4)
    assert store.readable and store.writable
    store.close()
    assert not store.readable
