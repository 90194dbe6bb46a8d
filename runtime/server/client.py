"""A small client for `pickscore serve`, and a reward function for RL trainers backed by it.

    client = PickScoreClient("http://127.0.0.1:8000", api_key=None)
    result = client.score("a cat astronaut", [pil_image, uint8_array, png_bytes])   # a PromptResult
    reward_fn = ServerReward("http://127.0.0.1:8000")
    rewards, info = reward_fn(images, prompts, metadata)                             # DDPO-style

Only the standard library, numpy and Pillow: trainers need nothing else. Images are encoded on the
client (PNG by default: lossless, so scores equal in-process scores of the same pixels; JPEG is
smaller). A 503 is retried after the server's Retry-After; keep-alive connections are kept per thread.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import pickle
import threading
import time
import urllib.parse
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import PickScoreError
from ..reward_base import RewardConventions, RewardFunction, prompts_for
from ..reward_queue import DEFAULT_MAX_PENDING
from ..tensor_images import host_uint8_batch, is_tensor_batch
from ..results import ImageScore, PromptResult
from .safe_pickle import safe_loads

DEFAULT_URL = "http://127.0.0.1:8000"


class LossyImageWarning(UserWarning):
    """Images are sent in a lossy format, so the scores are those of other pixels."""


class ServerError(PickScoreError):
    """The server refused or failed a request; `status` is the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(f"server answered {status}: {message}")
        self.status, self.message = status, message


def encode_image(item: Any, image_format: str = "PNG", quality: int = 95) -> bytes:
    """Encoded bytes for one image: bytes pass through, a (client-side) path is read, PIL images and
    uint8 arrays (HxW, HxWx3, HxWx4) are encoded."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        return Path(item).read_bytes()
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (HxW, HxWx3, HxWx4), got {item.dtype}")
        item = Image.fromarray(np.ascontiguousarray(item))
    if not isinstance(item, Image.Image):
        raise TypeError(f"cannot send a {type(item).__name__} as an image (use bytes, a PIL image or a uint8 array)")
    buffer = io.BytesIO()
    if image_format.upper() in ("JPEG", "JPG"):
        item.convert("RGB").save(buffer, "JPEG", quality=quality)
    else:
        item.save(buffer, image_format)
    return buffer.getvalue()


def image_items(images: Any, layout: str = "auto", quantize: str = "round") -> list[Any]:
    """A batch as a list of single images. A list passes through; a tensor batch (numpy, torch on any
    device, DLPack; uint8 or float in [0, 1]; NCHW or NHWC) is checked and quantised exactly as the
    in-process reward's exact mode does, so both score the same pixels and refuse the same tensors."""
    if not is_tensor_batch(images):
        return list(images)
    u8 = host_uint8_batch(images, layout, quantize)
    return list(u8[..., 0] if u8.shape[3] == 1 else u8)


def result_from_json(doc: dict) -> PromptResult:
    rows = [ImageScore(r["image"], r.get("score"), r.get("prob"), r.get("rank"), r.get("error")) for r in doc["results"]]
    return PromptResult(doc["prompt"], rows, doc["random_weights"], truncated=doc.get("truncated", False),
                        error=doc.get("error"), backend=doc.get("backend", ""), precision=doc.get("precision", ""))


class PickScoreClient:
    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, *, timeout: float = 300.0,
                 retries: int = 5, image_format: str = "PNG"):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server URL must be http(s)://host[:port], got {url!r}")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/").removesuffix("/v1")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout, self.retries, self.image_format = timeout, retries, image_format
        if image_format.upper() in ("JPEG", "JPG"):
            warnings.warn(LossyImageWarning(
                "image_format='JPEG' is lossy: the server scores the JPEG's pixels, not yours, so rewards differ from "
                "in-process ones (by how much on your weights: pickscore_runtime.rewards.jpeg_score_shift; measured "
                "figures in docs/rl-rewards.md#jpeg). PNG (the default) is lossless"), stacklevel=2)
        self._local = threading.local()

    # ---- transport ---------------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = kind(self.host, self.port, timeout=self.timeout)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> tuple[int, bytes]:
        """(status, body); retries a 503 after Retry-After and a dropped keep-alive connection once."""
        headers = dict(self.headers, **({"Content-Type": content_type} if content_type else {}))
        busy, dropped = 0, 0
        while True:
            try:
                conn = self._connection()
                conn.request(method, self.prefix + path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                self._drop_connection()
                dropped += 1
                if dropped > 1:
                    raise
                continue
            if response.status == 503 and busy < self.retries:
                busy += 1
                time.sleep(min(30.0, float(response.getheader("Retry-After") or 1)))
                continue
            return response.status, data

    def _post(self, path: str, body: bytes, content_type: str) -> bytes:
        status, data = self.request("POST", path, body, content_type)
        if status != 200:
            try:
                message = json.loads(data)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = data[:500].decode(errors="replace")
            raise ServerError(status, message)
        return data

    # ---- protocols ---------------------------------------------------------------------------------
    def _b64(self, images: Sequence[Any]) -> list[str]:
        return [base64.b64encode(encode_image(x, self.image_format)).decode() for x in images]

    def score(self, prompt: str, images: Sequence[Any]) -> PromptResult:
        """One prompt against its images (/v1/score); per-image errors are kept in the result."""
        body = json.dumps({"prompt": prompt, "images": self._b64(images)}).encode()
        return result_from_json(json.loads(self._post("/v1/score", body, "application/json")))

    def score_batch(self, prompts: Sequence[str], image_lists: Sequence[Sequence[Any]]) -> list[PromptResult]:
        items = [{"prompt": p, "images": self._b64(imgs)} for p, imgs in zip(prompts, image_lists, strict=True)]
        docs = json.loads(self._post("/v1/score", json.dumps({"items": items}).encode(), "application/json"))
        return [result_from_json(d) for d in docs]

    def rewards(self, images: Any, prompts: str | Sequence[str], *, layout: str = "auto", quantize: str = "round") -> dict:
        """The pickle protocol (/v1/rewards): {"scores": [float, NaN where failed], "errors": [...], ...}.
        images: what the in-process reward takes (a list of images, or one numpy / torch batch, float in
        [0, 1] or uint8, NCHW or NHWC, quantised by `quantize`); prompts: one per image, or one str for all."""
        items = image_items(images, layout, quantize)
        payload = {"images": [encode_image(x, self.image_format) for x in items],
                   "prompts": plain_prompts(prompts_for(prompts, len(items)))}
        return safe_loads(self._post("/v1/rewards", pickle.dumps(payload, protocol=4), "application/octet-stream"))

    def ready(self) -> bool:
        try:
            return self.request("GET", "/readyz")[0] == 200
        except OSError:
            return False

    def close(self) -> None:
        self._drop_connection()

    def __enter__(self) -> "PickScoreClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plain_prompts(prompts: Sequence[Any]) -> list[str]:
    """Prompts as plain str (numpy's str_ would pickle as a numpy class, which the server refuses)."""
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt #{i} must be a string, got {type(p).__name__}")
        out.append(str.__str__(p))
    return out


class ServerReward(RewardFunction):
    """`reward_fn(images, prompts, metadata) -> (rewards, info)` and `reward_fn.submit(...)` backed by a
    PickScore server, with the in-process PickScoreReward's signature, conventions, info and submit.
    Tensor batches are quantised here as the in-process reward quantises them and sent losslessly (PNG),
    so both score the same pixels. Large batches go as concurrent chunks, which the server batches
    together."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, conventions: RewardConventions | str | None = None,
                 *, quantize: str | None = None, chunk: int = 32, concurrency: int = 4, image_format: str = "PNG",
                 on_error: str = "raise", timeout: float = 300.0, max_pending: int = DEFAULT_MAX_PENDING):
        super().__init__(conventions, on_error, max_pending, quantize=quantize)
        if self.conventions.mode != "exact":
            raise ValueError("a server decodes the images it is sent, as PIL does: its mode is 'exact', not "
                             f"{self.conventions.mode!r}")
        self.client = PickScoreClient(url, api_key, timeout=timeout, image_format=image_format)
        self.chunk = max(1, chunk)
        self.pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="pickscore-reward")  # keeps connections

    def score_raw(self, images: Any, prompts: str | Sequence[str]) -> tuple[np.ndarray, list[str | None], dict]:
        items = image_items(images, self.conventions.layout, self.conventions.quantize)
        prompts = prompts_for(prompts, len(items))
        spans = [(at, at + self.chunk) for at in range(0, len(items), self.chunk)]
        answers = list(self.pool.map(lambda s: self.client.rewards(items[s[0]:s[1]], prompts[s[0]:s[1]]), spans))
        scores = np.array([x for a in answers for x in a["scores"]], dtype=np.float32)
        errors = [e for a in answers for e in a["errors"]]
        first = answers[0] if answers else {}
        return scores, errors, {"backend": first.get("backend"), "precision": first.get("precision"),
                                "random_weights": first.get("random_weights")}

    def close(self) -> None:
        super().close()
        self.pool.shutdown(wait=True)
        self.client.close()
