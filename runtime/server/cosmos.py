"""cosmos-rl's reward service, as its trainer (`cosmos_rl/reward/remote_calculator.py`) speaks it:

- `POST /api/reward/enqueue`, body `<JSON header>\\n<.npy file>`: the header `{"prompts": [str], "reward_fn":
  {"pickscore": weight}, "media_type": "image"}`, the array uint8 [B, H, W, 3] (or [B, 3, H, W]) written by
  `np.save(..., allow_pickle=False)` -> `{"uuid": str}`. Unlike cosmos-rl's own service, which parses after
  answering and drops a malformed request silently, the request is checked before the uuid is given:
  a bad one is a 400 naming the problem.
- `POST /api/reward/pull`, form fields `uuid=...&type=pickscore` (JSON is accepted too) -> while the
  batch is being scored 400 `{"message": "Not found scores for <uuid>"}` (the trainer retries on it), then
  200 `{"scores": {"pickscore": [score / --reward-divide-by, null where failed]}, "errors": [...],
  "input_info", "duration", "decoded_duration", "type": "pickscore"}`. An unknown or expired uuid is 404.

Results are kept `--result-ttl-s` after they are ready (pulled or not), and at most MAX_RESULTS of them.
"""

from __future__ import annotations

import io
import json
import math
import threading
import time
import urllib.parse
from collections import OrderedDict
from typing import Any

import numpy as np

from .batcher import EmbedJob
from .http_errors import BadRequest, NotFound, RequestRefused
from .protocols import Context, Parsed, check_count, field_of, group_by_prompt, json_type, reward_rows, served_by

ENQUEUE_PATH, PULL_PATH = "/api/reward/enqueue", "/api/reward/pull"
REWARD_TYPE = "pickscore"
MAX_RESULTS = 10_000


def parse_enqueue(body: bytes, max_images: int) -> Parsed:
    cut = body.find(b"\n")
    if cut < 0:
        raise BadRequest("the body must be a JSON header, a newline, then the images as an .npy file "
                         "(np.save(buffer, uint8 [B, H, W, 3], allow_pickle=False)), as cosmos-rl sends it")
    try:
        header = json.loads(body[:cut])
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"malformed JSON header (before the first newline): {e}") from None
    prompts = field_of(header, "prompts", (list, str))
    prompts = [prompts] if isinstance(prompts, str) else prompts
    wanted = field_of(header, "reward_fn", dict, required=False)
    if wanted is not None:
        asked = [name for name, weight in wanted.items() if not isinstance(weight, (int, float)) or weight > 0]
        if REWARD_TYPE not in asked:
            raise BadRequest(f"reward_fn asks for {', '.join(map(repr, asked)) or 'nothing'}; this server computes "
                             f"{REWARD_TYPE!r} only")
    media = header.get("media_type") if isinstance(header, dict) else None
    if media != "image":
        raise BadRequest(f"media_type must be \"image\" (decoded images), got {json_type(media) if media is None else repr(media)}: "
                         "latents and video are not scored here")
    batch = npy_array(body[cut + 1:])
    check_count(batch.shape[0], "images", "the .npy batch", max_images)
    if batch.shape[3] != 3:
        batch = batch.transpose(0, 2, 3, 1)  # cosmos-rl's service takes either layout
    parsed = Parsed(images=[np.ascontiguousarray(image) for image in batch], image_index=list(range(batch.shape[0])))
    group_by_prompt(parsed, prompts)
    parsed.extra.update(started=time.perf_counter(), input_info={
        "shape": list(batch.shape), "dtype": "uint8", "min": f"{batch.min():.3f}", "max": f"{batch.max():.3f}"})
    return parsed


def npy_array(data: bytes) -> np.ndarray:
    """The .npy file's uint8 array, its header checked against the bytes that follow before anything is
    allocated (np.load would size its buffer by the header's shape); never a pickled object."""
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f".npy format version {version[0]}.{version[1]} (np.save writes 1.0 or 2.0 for uint8)")
        shape, fortran, dtype = read_header[version](buffer)
    except Exception as e:  # noqa: BLE001 - whatever numpy's header reader meets in a hostile body: a 400
        raise BadRequest(f"after the first newline the body must be an .npy file (np.save, allow_pickle=False): {e}") from None
    if dtype != np.uint8:
        raise BadRequest(f"the images must be uint8 (0..255), as cosmos-rl's trainer sends them, got dtype {dtype}")
    if len(shape) != 4 or min(shape) < 1 or (shape[3] != 3 and shape[1] != 3):
        raise BadRequest(f"the images must be uint8 [B, H, W, 3] or [B, 3, H, W], none of them empty, got shape {list(shape)}")
    raw = data[buffer.tell():]
    if len(raw) != math.prod(shape):
        raise BadRequest(f"the .npy header says shape {list(shape)} ({math.prod(shape)} bytes) but {len(raw)} bytes follow it")
    array = np.frombuffer(raw, dtype=np.uint8)
    return array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)


def render_result(parsed: Parsed, job: EmbedJob, ctx: Context) -> bytes:
    scores, errors = reward_rows(parsed, job, ctx)
    rewards = [None if x != x else x / ctx.reward_divide_by for x in scores]  # JSON has no NaN: null where failed
    doc = {"scores": {REWARD_TYPE: rewards}, "errors": errors, "raw_scores": [None if x != x else x for x in scores],
           "input_info": parsed.extra["input_info"], "duration": f"{time.perf_counter() - parsed.extra['started']:.2f}",
           "decoded_duration": "0.00", "type": REWARD_TYPE, "divide_by": ctx.reward_divide_by, **served_by(ctx)}
    return json.dumps(doc, allow_nan=False).encode()


def pull_fields(body: bytes, content_type: str) -> tuple[str, str | None]:
    """(uuid, type) from the form fields cosmos-rl's trainer posts, or from a JSON object."""
    if content_type.split(";")[0].strip() == "application/json":
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"malformed JSON: {e}") from None
        uuid, kind = field_of(doc, "uuid", str), field_of(doc, "type", str, required=False)
    else:
        try:
            form = urllib.parse.parse_qs(body.decode("utf-8"), strict_parsing=bool(body), max_num_fields=8)
        except (UnicodeDecodeError, ValueError) as e:
            raise BadRequest(f"send the form fields uuid=...&type=pickscore: {e}") from None
        if "uuid" not in form:
            raise BadRequest("uuid is missing (send the form fields uuid=...&type=pickscore)")
        uuid, kind = form["uuid"][0], form.get("type", [None])[0]
    if kind not in (None, REWARD_TYPE):
        raise BadRequest(f"type {kind!r}: this server computes {REWARD_TYPE!r} only")
    return uuid, kind


class PendingResult(RequestRefused):
    """Not scored yet: 400 with the message cosmos-rl's service gives, on which its trainer retries."""

    status, kind = 400, "not_ready"

    def body(self) -> dict:
        return dict(super().body(), message=self.message)


class ResultStore:
    """uuid -> the finished answer (status, JSON body), kept `ttl_s` after it is ready; uuids being scored
    are pending. Thread-safe."""

    def __init__(self, ttl_s: float, max_results: int = MAX_RESULTS):
        self.ttl_s, self.max_results = ttl_s, max_results
        self._results: OrderedDict[str, tuple[float, int, bytes] | None] = OrderedDict()
        self._lock = threading.Lock()

    def add_pending(self, uuid: str) -> None:
        with self._lock:
            self._results[uuid] = None

    def finish(self, uuid: str, status: int, body: bytes) -> None:
        with self._lock:
            self._results[uuid] = (time.monotonic(), status, body)
            self._results.move_to_end(uuid)
            self._expire()

    def get(self, uuid: str) -> tuple[int, bytes]:
        with self._lock:
            self._expire()
            if uuid not in self._results:
                raise NotFound(f"no result for uuid {uuid[:64]!r}: never enqueued here, or kept only "
                               f"{self.ttl_s:g} s after it was ready (--result-ttl-s)")
            entry = self._results[uuid]
        if entry is None:
            raise PendingResult(f"Not found scores for {uuid}")
        return entry[1], entry[2]

    def _expire(self) -> None:
        now = time.monotonic()
        finished = [(u, e) for u, e in self._results.items() if e is not None]
        excess = len(finished) - self.max_results
        for u, (at, _, _) in finished:
            if excess > 0 or now - at > self.ttl_s:
                del self._results[u]
                excess -= 1
