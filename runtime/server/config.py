"""What one server (or one Ray Serve replica) is configured with. Plain data, so it pickles to replicas;
it holds digests of the API keys, never the keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError


@dataclass(frozen=True)
class ServerConfig:
    artifacts: str
    backend: str = "auto"
    precision: str | None = None
    max_batch: int | None = None  # images per backend call (default: the backend's batch size)
    max_wait_ms: float = 5.0  # how long the first ready image waits for others to fill its batch
    max_queue: int = 64  # requests admitted and not yet answered; more get 503 + Retry-After
    max_body_mb: float = 64.0
    request_timeout_s: float = 300.0
    api_key_digests: tuple[bytes, ...] = field(default=(), repr=False)
    workers: int | None = None  # image decoding threads (default: cores, at most 8)
    threads: int | None = None  # backend CPU threads
    hash_check: str = "full"
    text_cache_file: str | None = None
    max_image_pixels: int | None = None

    def __post_init__(self) -> None:
        checks = {"max_batch": self.max_batch is None or self.max_batch >= 1, "max_wait_ms": self.max_wait_ms >= 0,
                  "max_queue": self.max_queue >= 1, "max_body_mb": self.max_body_mb > 0,
                  "request_timeout_s": self.request_timeout_s > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"server settings out of range: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    def scorer_options(self) -> dict[str, Any]:
        """Keyword arguments for PickScorer.load."""
        options: dict[str, Any] = {"backend": self.backend, "precision": self.precision, "batch_size": self.max_batch,
                                   "workers": self.workers, "threads": self.threads, "hash_check": self.hash_check,
                                   "text_cache_file": self.text_cache_file}
        if self.max_image_pixels:
            options["max_image_pixels"] = self.max_image_pixels
        return options
