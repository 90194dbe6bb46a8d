"""`pickscore serve`: PickScore as a service for RL loops and other programs.

    app      the ASGI app (FastAPI): /v1/score (JSON), /v1/rewards (restricted pickle), /v1/embeddings
             (OpenAI), /v1/rerank (vLLM / Jina / Cohere), /healthz, /readyz, /metrics
    service  lifecycle, bounded admission queue, per-request timeout
    batcher  dynamic batching across requests over the runtime's stages (one backend call at a time)
    protocols, safe_pickle, auth, metrics, config, http_errors
    command  the CLI command (uvicorn, graceful drain) and ray_serve (replicas across GPUs and nodes)
    client   PickScoreClient and ServerReward, a DDPO-style reward_fn (stdlib + numpy + Pillow only)

Importing this package brings in no server framework: fastapi, uvicorn, prometheus_client and ray are
imported by the modules that serve, through the runtime's optional-dependency gate.
"""

from ..errors import RewardError
from .client import PickScoreClient, ServerError, ServerReward, encode_image
from .config import ServerConfig

__all__ = ["PickScoreClient", "RewardError", "ServerConfig", "ServerError", "ServerReward", "encode_image"]
