"""score_many: order, keys, per-item errors, batching across items, bounded memory, the overlap seam,
and the progress line on a terminal."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pickscore_export.samples import synthetic_image
from pickscore_runtime import ImagePreparer, ScoringPipeline, WorkItem


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpegs")
    for i in range(14):
        synthetic_image(300 + 10 * i, 240, seed=100 + i).save(folder / f"img{i:02d}.jpg", "JPEG")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return folder


def test_score_many_keeps_order_keys_and_errors_and_matches_the_reference(tiny_scorer, tiny_reference, jpeg_folder,
                                                                          tolerances):
    good = sorted(str(p) for p in jpeg_folder.glob("img*.jpg"))
    broken = str(jpeg_folder / "broken.jpg")
    items = [WorkItem("a cat", good[:5], key="k0"), ("", good[5:7], "k1"), WorkItem("a dog", [], key=("k", 2)),
             ("a dog", good[7:] + [broken], "k3"), ("a cat", good[:1])]
    results = list(tiny_scorer.score_many(iter(items), batch_size=3, workers=2))
    assert [r.key for r in results] == ["k0", "k1", ("k", 2), "k3", None]
    assert [r.prompt for r in results] == ["a cat", "", "a dog", "a dog", "a cat"]
    assert results[1].error and "prompt #1 is empty" in results[1].error
    assert results[2].results == [] and results[2].error is None
    assert "cannot decode" in results[3].results[-1].error
    tol = tolerances["fp32"]["max_abs_score_diff"]
    for result, (prompt, images) in ((results[0], ("a cat", good[:5])), (results[3], ("a dog", good[7:])),
                                     (results[4], ("a cat", good[:1]))):
        want, _ = tiny_reference.calc_probs(tiny_reference.text_embeddings([prompt])[0],
                                            tiny_reference.image_embeddings(images))
        got = result.scores[: len(images)]
        assert np.abs(got - want).max() <= tol
        assert [r.rank for r in result.results[: len(images)]] == list(np.argsort(np.argsort(-want)) + 1)


class CountingPreparer(ImagePreparer):
    """The real preparer, counting images prepared but not yet embedded (and failing on request)."""

    def __init__(self, inner: ImagePreparer, fail_on: str | None = None):
        super().__init__(inner.preprocessor)
        self.fail_on, self.lock, self.in_flight, self.peak = fail_on, threading.Lock(), 0, 0

    def __call__(self, item, name):
        if name == self.fail_on:
            raise RuntimeError("decoder bug")
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        return super().__call__(item, name)

    def embedded(self, n: int) -> None:
        with self.lock:
            self.in_flight -= n


def pipeline_with(scorer, preparer, backend=None, batch_size=2, workers=2, on_done=None):
    pool = ThreadPoolExecutor(workers)
    return ScoringPipeline(scorer.text, preparer, backend or scorer.backend, scorer.assembler, pool, workers,
                           batch_size, on_done or preparer.embedded), pool


def test_memory_is_bounded_by_pending_images(tiny_scorer, jpeg_folder):
    """A long lazy stream: never more than max_in_flight images prepared and not yet embedded."""
    preparer = CountingPreparer(tiny_scorer.images)
    pipeline, pool = pipeline_with(tiny_scorer, preparer)
    path = str(next(jpeg_folder.glob("img*.jpg")))
    pulled = [0]

    def stream():
        for i in range(60):
            pulled[0] += 1
            yield f"prompt {i % 3}", [path, path]

    assert sum(1 for _ in pipeline.run(stream())) == 60 and pulled[0] == 60
    assert 0 < preparer.peak <= pipeline.max_in_flight
    pool.shutdown()


def test_unexpected_decoder_failure_costs_one_image(tiny_scorer, jpeg_folder):
    good = sorted(str(p) for p in jpeg_folder.glob("img*.jpg"))[:3]
    pipeline, pool = pipeline_with(tiny_scorer, CountingPreparer(tiny_scorer.images, fail_on=good[1]))
    (result,) = pipeline.run([("a cat", good)])
    assert result.results[1].error == "unexpected RuntimeError: decoder bug"
    assert result.results[0].score is not None and result.results[2].score is not None
    pool.shutdown()


class QueueingBackend:
    """A backend whose submit returns before computing, as a GPU's does: records submit/collect order."""

    def __init__(self, inner):
        self.inner, self.events = inner, []
        self.name, self.precision, self.device, self.batch_size, self.queue_depth = inner.name, inner.precision, "cuda", 2, 2

    def embed_text(self, ids):
        return self.inner.embed_text(ids)

    def submit_images(self, pixels):
        k = sum(1 for e in self.events if e[0] == "submit")
        self.events.append(("submit", k))
        backend = self

        class Pending:
            def result(self):
                backend.events.append(("collect", k))
                return backend.inner.embed_images(pixels)
        return Pending()


def test_gpu_style_backend_gets_the_next_batch_before_the_last_is_collected(tiny_scorer, jpeg_folder):
    images = sorted(str(p) for p in jpeg_folder.glob("img*.jpg"))[:7]
    backend = QueueingBackend(tiny_scorer.backend)
    pipeline, pool = pipeline_with(tiny_scorer, tiny_scorer.images, backend=backend, on_done=lambda n: None)
    (overlapped,) = pipeline.run([("a cat", images)])
    assert backend.events[:3] == [("submit", 0), ("submit", 1), ("collect", 0)]
    assert sorted(backend.events) == sorted([("submit", k) for k in range(4)] + [("collect", k) for k in range(4)])
    np.testing.assert_allclose(overlapped.scores, tiny_scorer.score("a cat", images).scores, atol=1e-6)
    pool.shutdown()


def _score_folder(tiny_artifacts, jpeg_folder, stderr_fd):
    return subprocess.run([sys.executable, "-m", "pickscore_runtime.cli", "score", "--artifacts", str(tiny_artifacts),
                           "--hash-check", "size", "--prompt", "a cat", "--json", str(jpeg_folder)],
                          stdout=subprocess.PIPE, stderr=stderr_fd, timeout=300)


def test_progress_line_on_a_terminal_and_not_when_piped(tiny_artifacts, jpeg_folder):
    leader, follower = pty.openpty()
    out = _score_folder(tiny_artifacts, jpeg_folder, follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    terminal = b"".join(chunks).decode()
    assert out.returncode == 1  # broken.jpg
    assert "\r" in terminal and "15/15 img" in terminal and "img/s" in terminal
    piped = _score_folder(tiny_artifacts, jpeg_folder, subprocess.PIPE)
    assert "\r" not in piped.stderr.decode() and "img/s" not in piped.stderr.decode()
