"""The wire formats: each protocol parses a request body into prompts + encoded images for the batcher,
and renders the finished job with the runtime's ResultAssembler (scores, probs, ranks, errors).

- /v1/score: JSON `{"prompt", "images": [base64 or data URL]}` or `{"items": [...]}` ->
  PromptResult.to_json() (a list for items), as `pickscore score --json`; a bad image is its row's error.
- /v1/rewards: the pickle convention of DDPO/GRPO-style reward servers, unpickled by a restricted
  unpickler: `{"images": [bytes], "prompts": [str], ...}`, one prompt per image -> pickled
  `{"scores": [float], "errors": [str | None], ...}`; a bad image has a NaN score and its error.
- / and /score: the same pickled request as trainers' reward servers take it (flow_grpo, DDPO, verl-omni:
  prompts may be a numpy str array) -> pickled `{"scores": [float], "outputs": [float], "errors": [...],
  "raw_scores": [...]}`, scores / --reward-divide-by (26 by default, as those trainers divide).
- /api/reward/enqueue and /api/reward/pull: cosmos-rl's reward service (cosmos.py).
- /v1/embeddings: OpenAI `{"model", "input": [text or image data URL], "encoding_format"}` ->
  `{"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model", "usage"}`.
- /v1/rerank: vLLM / Jina / Cohere `{"query", "documents": [image data URLs], "top_n", "return_documents"}`
  -> `{"id", "model", "usage", "results": [{"index", "relevance_score", "prob"}]}`, best first.
  These two protocols have no per-item errors: a bad image is a 400 naming it, and an input a tower
  returned NaN or Inf for is a 422 naming it.

JSON answers never hold NaN or Infinity (json.dumps with allow_nan=False: a slip is a loud 500).

Images travel only as bytes, base64 or data URLs: the server never opens a path or fetches a URL.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import PromptError
from ..images import image_name
from ..results import TEXT_NONFINITE, VISION_NONFINITE, PromptResult, ResultAssembler, finite_rows
from ..tokenizer import ClipTokenizer, check_prompt
from .batcher import EmbedJob
from .http_errors import BadRequest, NonFiniteOutput, PayloadTooLarge
from .safe_pickle import dumps, safe_loads

JSON = "application/json"
PICKLE = "application/octet-stream"


@dataclass
class Parsed:
    """What the batcher needs (prompts, images) and how to put the answer back together."""

    prompts: list[str] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # encoded bytes, or uint8 arrays (cosmos-rl)
    image_index: list[int] = field(default_factory=list)  # each image's name: its position in its own item
    groups: list[tuple[int, list[int]]] = field(default_factory=list)  # (prompt, its images) per comparison
    extra: dict[str, Any] = field(default_factory=dict)

    def add_group(self, prompt: str, images: Sequence[bytes]) -> None:
        start = len(self.images)
        self.prompts.append(prompt)
        self.images += images
        self.image_index += range(len(images))
        self.groups.append((len(self.prompts) - 1, list(range(start, start + len(images)))))


@dataclass(frozen=True)
class Context:
    assembler: ResultAssembler
    tokenizer: ClipTokenizer
    model: str
    embed_dim: int
    reward_divide_by: float = 1.0  # the trainers' wire formats answer score / this (--reward-divide-by)


@dataclass(frozen=True)
class Protocol:
    name: str
    path: str
    media_type: str
    parse: Callable[[bytes, int], Parsed]  # (body, max_images)
    render: Callable[[Parsed, EmbedJob, Context], bytes]
    aliases: tuple[str, ...] = ()  # more paths that serve it


# ---- fields ---------------------------------------------------------------------------------------
def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"malformed JSON: {e}") from None


def field_of(doc: Any, name: str, kind: type | tuple[type, ...], where: str = "", required: bool = True) -> Any:
    if not isinstance(doc, dict):
        raise BadRequest(f"{where or 'the body'} must be a JSON object, got {json_type(doc)}")
    value = doc.get(name)
    label = f"{where}.{name}" if where else name
    if value is None:
        if required:
            raise BadRequest(f"{label} is missing")
        return None
    if not isinstance(value, kind) or isinstance(value, bool):  # no field here is a boolean; True is an int
        raise BadRequest(f"{label} must be {describe(kind)}, got {json_type(value)}")
    return value


TYPE_NAMES = {dict: "an object", list: "an array", tuple: "an array", str: "a string", bool: "a boolean",
              int: "an integer", float: "a number", type(None): "null", bytes: "bytes", bytearray: "bytes"}


def json_type(value: Any) -> str:
    """What a value is, as a JSON user would say it; scalars with their value (`a number (2.5)`, `a boolean
    (true)`), so that "must be an integer, got a number" says which number."""
    name = TYPE_NAMES.get(type(value), type(value).__name__)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"{name} of {value.bit_length()} bits"  # a huge pickled int: never turned into its digits
    if isinstance(value, (bool, int, float)):
        shown = json.dumps(value)  # true, 2.5, NaN: as the client wrote it
        return f"{name} ({shown[:40]})"
    return name


def check_count(n: int, what: str, where: str, limit: int) -> None:
    """Refuse a request of more than `limit` images or prompts before any of them is decoded."""
    if n > limit:
        raise PayloadTooLarge(f"{where}: {n} {what} in one request, over the limit of {limit} per request "
                              "(--max-images); send them in several requests")


def describe(kind: type | tuple[type, ...]) -> str:
    return " or ".join(dict.fromkeys(TYPE_NAMES[k] for k in (kind if isinstance(kind, tuple) else (kind,))))


def prompt_at(value: Any, where: str) -> str:
    try:
        return check_prompt(value)
    except PromptError as e:
        raise BadRequest(str(e) if where == "prompt" else f"{where}: {e}") from None


def image_bytes(value: Any, where: str) -> bytes:
    """An image sent as bytes, base64 or a base64 data URL. Strings are never read as paths or URLs."""
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value
        if text.startswith("data:"):
            header, comma, text = text.partition(",")
            if not comma or not header.endswith(";base64"):
                raise BadRequest(f"{where}: a data URL must be base64 (data:image/png;base64,...)")
        elif "://" in text[:16]:
            raise BadRequest(f"{where}: URLs are not fetched; send the image itself (base64 or a data URL)")
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRequest(f"{where}: bad base64 ({e}); images are sent as base64 or data URLs, never as paths") from None
    else:
        raise BadRequest(f"{where} must be a base64 string or a data URL, got {json_type(value)}")
    if not data:
        raise BadRequest(f"{where}: the image is empty (0 bytes)")
    return data


def image_list(value: Any, where: str, limit: int) -> list[bytes]:
    if not isinstance(value, (list, tuple)):
        raise BadRequest(f"{where} must be an array of images, got {json_type(value)}")
    if not value:
        raise BadRequest(f"{where} is empty: send at least one image")
    check_count(len(value), "images", where, limit)
    return [image_bytes(x, f"{where}[{j}]") for j, x in enumerate(value)]


def comparison(parsed: Parsed, job: EmbedJob, ctx: Context, group: int) -> PromptResult:
    p, rows = parsed.groups[group]
    names = [image_name(job.images[k], job.image_index[k]) for k in rows]
    errors = {i: job.errors[k] for i, k in enumerate(rows) if k in job.errors}
    return ctx.assembler.assemble(parsed.prompts[p], names, job.image_embs[rows], errors, job.text.embeddings[p],
                                  job.text.truncated[p])


# ---- /v1/score --------------------------------------------------------------------------------------
def parse_score(body: bytes, max_images: int) -> Parsed:
    doc = parse_json(body)
    parsed = Parsed()
    if isinstance(doc, dict) and "items" in doc:
        items = field_of(doc, "items", list)
        if not items:
            raise BadRequest("items is empty: send at least one {\"prompt\", \"images\"} item")
        check_count(len(items), "prompts", "items", max_images)
        check_count(sum(len(item["images"]) for item in items if isinstance(item, dict) and isinstance(item.get("images"), list)),
                    "images", "items", max_images)
        for i, item in enumerate(items):
            where = f"items[{i}]"
            parsed.add_group(prompt_at(field_of(item, "prompt", str, where), f"{where}.prompt"),
                             image_list(field_of(item, "images", list, where), f"{where}.images", max_images))
        parsed.extra["items"] = True
    else:
        parsed.add_group(prompt_at(field_of(doc, "prompt", str), "prompt"),
                         image_list(field_of(doc, "images", list), "images", max_images))
    return parsed


def render_score(parsed: Parsed, job: EmbedJob, ctx: Context) -> bytes:
    results = [comparison(parsed, job, ctx, g).to_json() for g in range(len(parsed.groups))]
    return json.dumps(results if parsed.extra.get("items") else results[0], ensure_ascii=False, allow_nan=False).encode()


# ---- /v1/rewards (pickle) ---------------------------------------------------------------------------
def parse_rewards(body: bytes, max_images: int) -> Parsed:
    """A pickled {"images": [bytes], "prompts": [str] (a numpy str array too), ...}: other keys (metadata)
    are ignored."""
    doc = safe_loads(body)
    if not isinstance(doc, dict):
        raise BadRequest(f"the pickled request must be a dict with images and prompts, got {json_type(doc)}")
    images, prompts = doc.get("images"), doc.get("prompts")
    for name, value in (("images", images), ("prompts", prompts)):
        if not isinstance(value, (list, tuple)):
            raise BadRequest(f"{name} must be a list, got {'nothing' if value is None else json_type(value)}"
                             + (" (PickScore scores each image against its prompt: send one per image)"
                                if name == "prompts" and value is None else ""))
    if not images:
        raise BadRequest("images is empty: send at least one image")
    check_count(len(images), "images", "images", max_images)  # a pickle repeats one reference cheaply: count first
    parsed = Parsed(images=[image_bytes(x, f"images[{j}]") for j, x in enumerate(images)],
                    image_index=list(range(len(images))))
    group_by_prompt(parsed, prompts)
    return parsed


def group_by_prompt(parsed: Parsed, prompts: Sequence[Any]) -> None:
    """One prompt per image (parsed.images): each distinct prompt once, with the images it scores."""
    if len(prompts) != len(parsed.images):
        raise BadRequest(f"one prompt per image: {len(parsed.images)} images but {len(prompts)} prompts")
    by_prompt: dict[str, list[int]] = {}
    for j, p in enumerate(prompts):
        by_prompt.setdefault(prompt_at(p, f"prompts[{j}]"), []).append(j)
    for p, rows in by_prompt.items():
        parsed.prompts.append(p)
        parsed.groups.append((len(parsed.prompts) - 1, rows))


def reward_rows(parsed: Parsed, job: EmbedJob, ctx: Context) -> tuple[list[float], list[str | None]]:
    """Per image, in request order: its PickScore score (NaN where it failed) and its error (None)."""
    scores, errors = [math.nan] * len(parsed.images), [None] * len(parsed.images)
    for g, (_, rows) in enumerate(parsed.groups):
        result = comparison(parsed, job, ctx, g)
        for k, row in zip(rows, result.results):
            if row.score is not None:
                scores[k] = row.score
            errors[k] = result.error or row.error  # a prompt the text tower failed on: say so, per image
    return scores, errors


def served_by(ctx: Context) -> dict[str, Any]:
    return {"random_weights": ctx.assembler.random_weights, "backend": ctx.assembler.backend,
            "precision": ctx.assembler.precision, "model": ctx.model}


def render_rewards(parsed: Parsed, job: EmbedJob, ctx: Context) -> bytes:
    scores, errors = reward_rows(parsed, job, ctx)
    return dumps({"scores": scores, "errors": errors, **served_by(ctx)})


# ---- / and /score: the reward-server convention (flow_grpo, DDPO, verl-omni) ---------------------------
def render_reward_server(parsed: Parsed, job: EmbedJob, ctx: Context) -> bytes:
    """Rewards as those trainers' clients read them: "scores" (verl-omni) and "outputs" (flow_grpo's and
    DDPO's reward servers), each score / --reward-divide-by; a failed image is NaN there, its reason in
    "errors" (never a made-up 0.0); "raw_scores" undivided."""
    scores, errors = reward_rows(parsed, job, ctx)
    rewards = [x / ctx.reward_divide_by for x in scores]
    return dumps({"scores": rewards, "outputs": rewards, "errors": errors, "raw_scores": scores,
                  "divide_by": ctx.reward_divide_by, **served_by(ctx)})


# ---- /v1/embeddings (OpenAI) ------------------------------------------------------------------------
def parse_embeddings(body: bytes, max_images: int) -> Parsed:
    doc = parse_json(body)
    inputs = field_of(doc, "input", (str, list))
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not inputs:
        raise BadRequest("input is empty: send at least one text or image data URL")
    check_count(len(inputs), "inputs", "input", max_images)
    fmt = field_of(doc, "encoding_format", str, required=False) or "float"
    if fmt not in ("float", "base64"):
        raise BadRequest(f"encoding_format must be float or base64, got {fmt!r}")
    parsed = Parsed(extra={"format": fmt, "kinds": []})
    for i, x in enumerate(inputs):
        where = f"input[{i}]"
        if isinstance(x, str) and x.startswith("data:"):
            parsed.extra["kinds"].append(("image", len(parsed.images)))
            parsed.images.append(image_bytes(x, where))
            parsed.image_index.append(i)
        elif isinstance(x, str):
            parsed.extra["kinds"].append(("text", len(parsed.prompts)))
            parsed.prompts.append(prompt_at(x, where))
        else:
            raise BadRequest(f"{where} must be a text or an image data URL (token-id input is not supported), "
                             f"got {json_type(x)}")
    parsed.extra["dimensions"] = field_of(doc, "dimensions", int, required=False)
    return parsed


def render_embeddings(parsed: Parsed, job: EmbedJob, ctx: Context) -> bytes:
    wanted = parsed.extra["dimensions"]
    if wanted is not None and wanted != ctx.embed_dim:
        raise BadRequest(f"dimensions: this model's embeddings have {ctx.embed_dim} dimensions, not {wanted}")
    data = []
    for index, (kind, k) in enumerate(parsed.extra["kinds"]):
        if kind == "image" and k in job.errors:
            raise BadRequest(f"input[{index}]: {job.errors[k].reason}")
        vector = (job.text.embeddings if kind == "text" else job.image_embs)[k].astype("<f4")
        if not finite_rows(vector[None])[0]:
            raise NonFiniteOutput(f"input[{index}]: {TEXT_NONFINITE if kind == 'text' else VISION_NONFINITE}")
        encoded = base64.b64encode(vector.tobytes()).decode() if parsed.extra["format"] == "base64" else vector.tolist()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = int(ctx.tokenizer(parsed.prompts).lengths.sum()) if parsed.prompts else 0
    return json.dumps({"object": "list", "data": data, "model": ctx.model,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                       "random_weights": ctx.assembler.random_weights}, allow_nan=False).encode()


# ---- /v1/rerank (vLLM / Jina / Cohere) ----------------------------------------------------------------
def document_image(doc: Any, where: str) -> str | bytes:
    """The image in one rerank document: a data URL string (vLLM / Cohere style), {"image": ...} (Jina),
    or an OpenAI content part {"type": "image_url", "image_url": {"url": ...}} (vLLM multi-modal)."""
    if isinstance(doc, str):
        if not doc.startswith("data:"):
            raise BadRequest(f"{where}: PickScore reranks images; send each document as an image data URL "
                             "(data:image/png;base64,...)")
        return doc
    if isinstance(doc, dict):
        if "image" in doc:
            return doc["image"]
        url = doc.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if url is not None:
            return url
        if "text" in doc:
            raise BadRequest(f"{where}: a text document cannot be scored; PickScore reranks images")
    raise BadRequest(f"{where} must be an image data URL, {{\"image\": ...}} or an image_url content part, "
                     f"got {json_type(doc)}")


def parse_rerank(body: bytes, max_images: int) -> Parsed:
    doc = parse_json(body)
    query = prompt_at(field_of(doc, "query", str), "query")
    documents = field_of(doc, "documents", (list, dict))
    if isinstance(documents, dict):  # vLLM's multi-modal form {"content": [parts]}
        documents = field_of(documents, "content", list, "documents")
        where = "documents.content"
    else:
        where = "documents"
    if not documents:
        raise BadRequest(f"{where} is empty: send at least one image")
    check_count(len(documents), "images", where, max_images)
    top_n = field_of(doc, "top_n", int, required=False) or 0
    if top_n < 0:
        raise BadRequest(f"top_n must be 0 (all) or more, got {top_n}")
    parsed = Parsed(extra={"top_n": top_n, "return_documents": bool(doc.get("return_documents")), "documents": documents})
    parsed.add_group(query, [image_bytes(document_image(d, f"{where}[{j}]"), f"{where}[{j}]") for j, d in enumerate(documents)])
    return parsed


def render_rerank(parsed: Parsed, job: EmbedJob, ctx: Context) -> bytes:
    if job.errors:
        k, error = min(job.errors.items())
        raise BadRequest(f"documents[{k}]: {error.reason}")
    result = comparison(parsed, job, ctx, 0)
    if result.error is not None:
        raise NonFiniteOutput(f"query: {result.error}")
    for j, row in enumerate(result.results):
        if row.error is not None:
            raise NonFiniteOutput(f"documents[{j}]: {row.error}")
    order = sorted(range(len(result.results)), key=lambda j: result.results[j].rank)
    top = order[: parsed.extra["top_n"] or None]
    rows = []
    for j in top:
        row = {"index": j, "relevance_score": result.results[j].score, "prob": result.results[j].prob}
        if parsed.extra["return_documents"]:
            row["document"] = parsed.extra["documents"][j]
        rows.append(row)
    tokens = int(ctx.tokenizer([parsed.prompts[0]]).lengths.sum())
    return json.dumps({"id": f"rerank-{uuid.uuid4().hex}", "model": ctx.model,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "results": rows,
                       "random_weights": ctx.assembler.random_weights}, allow_nan=False).encode()


PROTOCOLS = {p.name: p for p in (
    Protocol("score", "/v1/score", JSON, parse_score, render_score),
    Protocol("rewards", "/v1/rewards", PICKLE, parse_rewards, render_rewards),
    Protocol("reward_server", "/", PICKLE, parse_rewards, render_reward_server, aliases=("/score",)),
    Protocol("embeddings", "/v1/embeddings", JSON, parse_embeddings, render_embeddings),
    Protocol("rerank", "/v1/rerank", JSON, parse_rerank, render_rerank),
)}
