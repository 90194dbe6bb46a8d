"""The two CLIP towers as PyTorch modules with the runtime's IO contract (towers.py): what the torch
backends run, what `pickscore export` traces to ONNX and what the reference normalises with; and the ways
the torch backends run them (fp32 as the reference computes it on a GPU, torch.compile, CUDA graphs over
batch buckets). Imports torch: imported only by the torch backends and the export package, never on the
lean scoring path."""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .buckets import bucket_for, row_chunks
from .towers import TensorSpec, TowerSpec, tower_specs

log = logging.getLogger("pickscore")


def features(output: Any) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and a BaseModelOutputWithPooling in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True)  # as the model card writes it


class ClipTower(torch.nn.Module):
    """One tower with the runtime's IO contract: text input_ids [B, T] (pooled at argmax(input_ids), the
    first <|endoftext|>) or vision pixel_values [B, 3, S, S] -> L2-normalised embeddings [B, D], normalised
    in float32 whatever the compute precision."""

    def __init__(self, clip: Any, tower: str):
        super().__init__()
        if tower not in ("text", "vision"):
            raise ValueError(f"tower must be 'text' or 'vision', got {tower!r}")
        self.clip, self.tower = clip, tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.clip.get_text_features(input_ids=x) if self.tower == "text" else self.clip.get_image_features(pixel_values=x)
        return l2_normalise(features(out).float())


def tower_module(clip: Any, tower: str) -> ClipTower:
    return ClipTower(clip, tower).eval()


def clip_specs(clip: Any) -> dict[str, TowerSpec]:
    """The tower specs of a transformers CLIPModel, from its config (what its export declares)."""
    return tower_specs(int(clip.config.projection_dim), int(clip.config.vision_config.image_size))


def use_sdpa(clip: Any) -> Any:
    """`clip` with transformers' SDPA attention (torch.nn.functional.scaled_dot_product_attention, which
    picks a fused kernel per call), its default where torch has SDPA; set when the model was loaded with
    another. Changes the model in place, as `.to()` does."""
    current = getattr(clip.config, "_attn_implementation", None)
    if current != "sdpa" and hasattr(clip, "set_attn_implementation"):
        log.info("torch backend: attention %s -> sdpa", current)
        clip.set_attn_implementation("sdpa")
    return clip


# ---- fp32 as the reference computes it, on a GPU -------------------------------------------------
# torch's fp32 precision settings (torch >= 2.9): each holder's `fp32_precision`, "none" inheriting from
# its parent. The legacy flags (allow_tf32, float32 matmul precision) are the same state seen another
# way; torch raises when a legacy one is read while it disagrees with the new ones.
PRECISION_PARENTS = {"generic": None, "cuda": "generic", "mkldnn": "generic", "cuda.matmul": "cuda",
                     "cuda.conv": "cuda", "cuda.rnn": "cuda", "mkldnn.matmul": "mkldnn"}
# What make_exact and the legacy setters write; the parents are only read (and torch's setter of
# torch.backends.mkldnn.fp32_precision writes the generic one).
PRECISIONS_WRITTEN = ("cuda.matmul", "cuda.conv", "cuda.rnn", "mkldnn.matmul")


def precision_holder(name: str) -> Any:
    b = torch.backends
    return {"generic": b, "cuda": b.cudnn, "mkldnn": b.mkldnn, "cuda.matmul": b.cuda.matmul,
            "cuda.conv": b.cudnn.conv, "cuda.rnn": b.cudnn.rnn, "mkldnn.matmul": b.mkldnn.matmul}[name]


def read_or_none(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except RuntimeError:  # a legacy flag read while the caller's new-API settings disagree with it
        return None


@dataclass(frozen=True)
class Fp32Flags:
    """torch's process-global flags that decide how fp32 matmuls, convolutions and attention run on a GPU,
    as read now (`current`), and written back as they were (`restore`)."""

    matmul_precision: str | None  # torch.get_float32_matmul_precision(); None: unreadable (mixed APIs)
    cudnn_tf32: bool | None  # torch.backends.cudnn.allow_tf32; None likewise
    precisions: tuple[tuple[str, str], ...]  # (holder, fp32_precision as it resolves); empty before torch 2.9
    sdpa: tuple[bool, bool, bool, bool]  # flash, mem-efficient, cuDNN, math kernels enabled

    @classmethod
    def current(cls) -> "Fp32Flags":
        cuda = torch.backends.cuda
        has_new_api = hasattr(cuda.matmul, "fp32_precision")
        return cls(read_or_none(torch.get_float32_matmul_precision),
                   read_or_none(lambda: torch.backends.cudnn.allow_tf32),
                   tuple((n, precision_holder(n).fp32_precision) for n in PRECISION_PARENTS) if has_new_api else (),
                   (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.cudnn_sdp_enabled(),
                    cuda.math_sdp_enabled()))

    def make_exact(self) -> None:
        """TF32 off for cuBLAS matmuls and cuDNN convolutions, and SDPA's math kernel only (plain fp32
        matmuls; the fused kernels' fp32 paths are not the reference's arithmetic)."""
        # The legacy setters write the legacy and the new state alike (set_float32_matmul_precision: oneDNN's
        # CPU matmuls too, for the scope), so the legacy getters, which dynamo and inductor read, keep working;
        # where the caller's state already mixes the two, only the new one is written (its legacy matmul
        # flag is then already "highest"), and a mixed cuDNN state stays mixed.
        if self.matmul_precision is not None:
            torch.set_float32_matmul_precision("highest")
        if self.cudnn_tf32 is not None:
            torch.backends.cudnn.allow_tf32 = False
        for name in ("cuda.matmul", "cuda.conv", "cuda.rnn") if self.precisions else ():
            precision_holder(name).fp32_precision = "ieee"  # explicit: "none" would inherit a "tf32" parent
        self.write_sdpa((False, False, False, True))

    def restore(self) -> None:
        if self.matmul_precision is not None:
            torch.set_float32_matmul_precision(self.matmul_precision)
        if self.cudnn_tf32 is not None:
            torch.backends.cudnn.allow_tf32 = self.cudnn_tf32
        resolved = dict(self.precisions)
        for name in PRECISIONS_WRITTEN if resolved else ():
            # the getters resolve "none": a value equal to the parent's is written back as inheriting it
            value, parent = resolved[name], resolved[PRECISION_PARENTS[name]]
            precision_holder(name).fp32_precision = "none" if value == parent else value
        self.write_sdpa(self.sdpa)

    @staticmethod
    def write_sdpa(enabled: tuple[bool, bool, bool, bool]) -> None:
        cuda = torch.backends.cuda
        for enable, on in zip((cuda.enable_flash_sdp, cuda.enable_mem_efficient_sdp, cuda.enable_cudnn_sdp,
                               cuda.enable_math_sdp), enabled):
            enable(on)


class ExactFp32Scope:
    """`with EXACT_FP32:` runs the calls inside in fp32 as the reference computes it (Fp32Flags.make_exact)
    and then gives the caller back its own settings, so a trainer that imports the reward keeps TF32 for
    its own work. The flags are process-global: work other threads run meanwhile sees them too, and
    overlapping scopes (several threads scoring) share one change, restored when the last one leaves."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders = 0
        self.saved: Fp32Flags | None = None

    def __enter__(self) -> "ExactFp32Scope":
        with self.lock:
            if self.holders == 0:
                saved = Fp32Flags.current()
                try:
                    saved.make_exact()
                except BaseException:
                    saved.restore()
                    raise
                self.saved = saved
            self.holders += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.holders -= 1
            if self.holders == 0:
                self.saved.restore()
                self.saved = None


EXACT_FP32 = ExactFp32Scope()


def numerics(device: str, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """The scope a tower call runs in: EXACT_FP32 for fp32 on a GPU, nothing otherwise (fp16 and bf16 run
    their own dtypes: the caller's TF32 settings, which only affect fp32 work, are left alone)."""
    return EXACT_FP32 if precision == "fp32" and torch.device(device).type == "cuda" else contextlib.nullcontext()


# ---- compiled towers and fixed batch buckets ------------------------------------------------------
def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` with zero rows appended up to `rows` (every tower computes each row on its own)."""
    return x if len(x) == rows else torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))])


class CompiledTower:
    """A tower through torch.compile (inductor, default mode), traced once for every batch size: the
    input's dynamic axes (towers.py: batch, and text's sequence) are marked dynamic, so a new batch size
    or prompt length does not recompile. A batch of one runs padded to two rows: dynamo specialises a
    size-1 axis, which would be a second graph. The graph always gets an ordinary tensor outside
    inference mode (dynamo guards on the difference; an inference tensor is copied) and a fresh alias of
    the caller's tensor is marked, never the caller's; nothing global is changed (dynamo's and
    inductor's configs are left as they are)."""

    def __init__(self, tower: ClipTower, spec: TensorSpec):
        self.tower = tower
        self.compiled = torch.compile(tower)
        self.dynamic_axes = tuple(spec.dynamic_axes())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        with torch.inference_mode(False), torch.no_grad():
            x = pad_rows(x.clone() if x.is_inference() else x.detach(), max(n, 2))
            for axis in self.dynamic_axes:
                # a hint, not a constraint: where a compiled graph's guards narrow an axis (a cached graph
                # brings its own), dynamo compiles again instead of raising
                torch._dynamo.maybe_mark_dynamic(x, axis)
            return self.compiled(x)[:n]


Runner = Callable[[], torch.Tensor]  # runs a tower on one bucket's static input, returns its static output


class BucketedTower:
    """A tower run on fixed batch shapes: a batch is copied into the static input of the smallest bucket
    holding it (rows past it keep what they held: each row is computed on its own), the bucket's runner
    runs, and the batch's rows of its static output are cloned (the next run overwrites it; with batches in
    flight, the previous batch's result may not be read yet). Larger batches go through in chunks of the
    largest bucket. `prepare(tower, static_input)` makes a bucket's runner on its first use; runs are one at
    a time (one set of static buffers per bucket), and on a GPU each waits for the previous one's work on
    the device, whichever stream queued it. Device-agnostic: on the CPU (tests) with `eager_runner`."""

    def __init__(self, tower: Callable[[torch.Tensor], torch.Tensor], buckets: Sequence[int],
                 prepare: Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], Runner]):
        self.tower, self.buckets, self.prepare = tower, tuple(sorted(set(buckets))), prepare
        self.lock = threading.Lock()
        self.runners: dict[int, tuple[torch.Tensor, Runner]] = {}
        self.last_run: Any = None  # a torch.cuda.Event after the last run's work on a GPU

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        chunks = row_chunks(len(x), self.buckets[-1])
        return torch.cat([self.run_bucket(x[rows]) for rows in chunks]) if len(chunks) > 1 else self.run_bucket(x)

    def run_bucket(self, x: torch.Tensor) -> torch.Tensor:
        n, bucket = len(x), bucket_for(len(x), self.buckets)
        with self.lock:
            if self.last_run is not None:
                self.last_run.wait()  # the current stream waits: the static buffers are free again
            if bucket not in self.runners:
                static_input = x.new_zeros((bucket, *x.shape[1:]))
                self.runners[bucket] = static_input, self.prepare(self.tower, static_input)
            static_input, run = self.runners[bucket]
            static_input[:n].copy_(x)
            out = run()[:n].clone()
            if out.is_cuda:
                self.last_run = torch.cuda.Event()
                self.last_run.record()
        return out


def eager_runner(tower: Callable[[torch.Tensor], torch.Tensor], static_input: torch.Tensor) -> Runner:
    return lambda: tower(static_input)


class CudaGraphRunners:
    """`prepare` for BucketedTower on a GPU: one CUDA graph per bucket, captured on its first use after a
    warm-up call on a side stream (lazy initialisation, a compiled tower's first compilation and cuBLAS
    workspaces must not happen inside a capture), in one memory pool the buckets share. Sharing is safe
    here because replays never overlap (BucketedTower runs one at a time, each after the last) and each
    graph's static output stays allocated, so only scratch memory is reused between graphs. Captured in
    thread-local mode: other threads may keep queueing work meanwhile. Not run on a GPU yet."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, tower: Callable[[torch.Tensor], torch.Tensor], static_input: torch.Tensor) -> Runner:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            tower(static_input)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            static_output = tower(static_input)

        def replay() -> torch.Tensor:
            graph.replay()
            return static_output

        return replay

