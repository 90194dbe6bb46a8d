"""What one server (or one Ray Serve replica) is configured with: the scorer's options (the same type
`score` and the Ray job use) and the serving limits. Plain data, so it pickles to replicas; it holds
digests of the API keys, never the keys."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError
from ..options import ScorerOptions


@dataclass(frozen=True)
class ServerConfig:
    artifacts: str
    scorer: ScorerOptions = field(default_factory=ScorerOptions)  # batch_size: images per call, across requests
    max_wait_ms: float = 5.0  # how long the first ready image waits for others to fill its batch
    max_queue: int = 64  # requests admitted and not yet answered; more get 503 + Retry-After
    max_body_mb: float = 64.0
    request_timeout_s: float = 300.0
    api_key_digests: tuple[bytes, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        checks = {"max_wait_ms": self.max_wait_ms >= 0, "max_queue": self.max_queue >= 1, "max_body_mb": self.max_body_mb > 0,
                  "request_timeout_s": self.request_timeout_s > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"server settings out of range: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)
