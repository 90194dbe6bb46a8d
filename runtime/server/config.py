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
    request_timeout_s: float = 300.0  # from admission (the body has arrived) to the answer
    body_timeout_s: float = 60.0  # for the body to arrive in full (64 MiB at ~10 Mbit/s); 408 after it
    max_images: int = 1024  # images (and, separately, prompts) in one request; 413 above it
    reward_divide_by: float = 26.0  # the trainers' wire formats (/, cosmos-rl) answer score / this, as they divide
    result_ttl_s: float = 600.0  # cosmos-rl's pull: how long a ready result is kept
    api_key_digests: tuple[bytes, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        checks = {"max_wait_ms": self.max_wait_ms >= 0, "max_queue": self.max_queue >= 1, "max_body_mb": self.max_body_mb > 0,
                  "request_timeout_s": self.request_timeout_s > 0, "body_timeout_s": self.body_timeout_s > 0,
                  "max_images": self.max_images >= 1, "reward_divide_by": 0 < self.reward_divide_by < float("inf"),
                  "result_ttl_s": self.result_ttl_s > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"server settings out of range: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def drain_timeout_s(self) -> float:
        """How long a drain waits for the requests in flight: each reads its body, then is answered."""
        return self.body_timeout_s + self.request_timeout_s + 10


def base_url(host: str, port: int) -> str:
    """http://HOST:PORT, with an IPv6 literal in brackets (http://[::]:8000), as URLs write it."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
