"""How the ensemble layers run their matmuls: members split over CPU threads, operands in bf16.

Two settings, each set around a region by a context manager and read by the layers' autograd
Functions (poh_tune.ensemble) when they run:
- the CPU split (`cpu_split`): on CPU a batched matmul gives each thread whole members, so whole
  rounds of members go through one bmm and the remainder through plain matmuls that use every
  thread;
- the precision (`matmul_precision`): precision=bf16 computes every matmul from bfloat16
  operands; products, gradients, softmax and norms stay FP32. On CPU that is oneDNN's bf16 mode
  for FP32 matmuls (`onednn_bf16`, no casts); on CUDA the layers cast their operands
  (`matmul_dtype`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Below this many multiply-adds per member, a matmul is too small for the split to pay for its
# Python overhead (about 0.1 ms a call, forward and backward): d -> 1 scores, c -> H router.
SPLIT_MIN_MACS = 1 << 21

# The threshold in force (None: the split is off, every member goes through one bmm); set by
# `cpu_split`.
_split_min_macs: int | None = SPLIT_MIN_MACS

# precision (TrialConfig.precision) -> the matmul operand dtype (None: FP32 throughout)
MATMUL_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}

# The dtype of the matmul operands in force, None for FP32. Read by every Function's forward and
# kept on its ctx for the backward; set around a model's forward pass by `matmul_dtype`. Autocast
# does not reach inside custom Functions, so the casts are explicit there: operands cast,
# products and every returned gradient in FP32 (softmax and norms in FP32 too).
_operand_dtype: torch.dtype | None = None
# Weights cast to the operand dtype, once per forward pass: the PoH block's weights serve every
# iteration. Keyed by id, holding the FP32 tensor too, so that no id is reused while cached.
_CAST: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


@contextlib.contextmanager
def cpu_split(min_macs: int | None = SPLIT_MIN_MACS) -> Iterator[None]:
    """Split the CPU matmuls of at least `min_macs` multiply-adds per member (0: every one;
    None: none, every member through one bmm); the threshold in force before is restored after."""
    global _split_min_macs
    saved, _split_min_macs = _split_min_macs, min_macs
    try:
        yield
    finally:
        _split_min_macs = saved


def split_point(S: int, device: torch.device, rows: int, d_in: int, d_out: int) -> int:
    """How many leading members go through one batched matmul; the rest go one at a time.

    On CPU a batched matmul gives each thread whole batch items, so S items over T threads cost
    ceil(S/T) rounds: 5 members on 2 threads cost as much as 6. Whole rounds of members go
    through bmm, and the remainder through plain matmuls that use every thread.
    """
    if (device.type != "cpu" or S == 1 or _split_min_macs is None
            or rows * d_in * d_out < _split_min_macs):
        return S
    T = torch.get_num_threads()
    return S - S % T if T > 1 else S


def _split_bmm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """out[s] = a[s] @ b[s]: members [0, n) in one bmm, the rest one matmul each."""
    if n == a.shape[0]:
        return torch.bmm(a, b, out=out)
    if n:
        torch.bmm(a[:n], b[:n], out=out[:n])
    for s in range(n, a.shape[0]):
        torch.mm(a[s], b[s], out=out[s])
    return out


def member_bmm(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """a[s] @ b[s] for every member, the first n through one bmm (`split_point`). A plain bmm
    allocates its own output (an explicit empty would be one more aten call)."""
    if n == a.shape[0]:
        return torch.bmm(a, b)
    out = torch.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=a.dtype, device=a.device)
    return _split_bmm(out, a, b, n)


@contextlib.contextmanager
def matmul_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Run the ensemble layers' matmuls in `dtype` (None: FP32, the layers' own path)."""
    global _operand_dtype
    saved, _operand_dtype = _operand_dtype, dtype
    try:
        yield
    finally:
        _operand_dtype = saved
        _CAST.clear()


@contextlib.contextmanager
def onednn_bf16() -> Iterator[None]:
    """FP32 matmuls on CPU computed by oneDNN from bf16-rounded operands (AMX where the CPU has
    it), accumulated and returned in FP32: bf16's matrix units without a single cast call.
    A global torch setting, restored after."""
    mm = torch.backends.mkldnn.matmul
    saved, mm.fp32_precision = mm.fp32_precision, "bf16"
    try:
        yield
    finally:
        mm.fp32_precision = saved


def matmul_precision(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The matmul setting of a TrialConfig.precision on `device`; fp32 leaves it as it is.

    bf16 on CPU is oneDNN's bf16 mode for FP32 matmuls (`onednn_bf16`): measured side by side
    with explicit casts (`python -m poh_tune.bench --precision-reference`), the casts cost more
    aten calls than the faster matmuls save. Elsewhere (CUDA) the layers cast their operands
    (`matmul_dtype`). The backward needs the setting as much as the forward: on CPU the trainer
    sets it around the backward pass too; explicit casts keep their dtype on the autograd ctx.
    """
    dtype = MATMUL_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype == torch.bfloat16:
        return onednn_bf16()
    return matmul_dtype(dtype)


def operand_dtype() -> torch.dtype | None:
    """The matmul operand dtype in force (None: FP32)."""
    return _operand_dtype


def cast_weight(w: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """w in dtype dt, cast once per forward pass (`matmul_dtype` clears the cache)."""
    hit = _CAST.get(id(w))
    if hit is None or hit[0] is not w:
        hit = _CAST[id(w)] = (w, w.to(dt))
    return hit[1]
