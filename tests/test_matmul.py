"""The matmul settings of precision=bf16 on CPU: oneDNN's bf16 mode for FP32 matmuls."""

from __future__ import annotations

import pytest
import torch

from poh_tune.bench import cpu_has_amx
from poh_tune.matmul import matmul_precision, onednn_bf16, operand_dtype

CPU = torch.device("cpu")


def cpu_has_bf16() -> bool:
    """AMX or AVX-512 bf16: the CPUs where oneDNN computes FP32 matmuls from bf16 operands."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return cpu_has_amx() or "avx512_bf16" in flags


def test_bf16_on_cpu_is_onednns_mode_set_for_the_region_only():
    mm = torch.backends.mkldnn.matmul
    before = mm.fp32_precision
    with matmul_precision("bf16", CPU):
        assert mm.fp32_precision == "bf16"
        assert operand_dtype() is None  # FP32 tensors: no cast calls
    assert mm.fp32_precision == before
    with pytest.raises(RuntimeError), onednn_bf16():
        raise RuntimeError("a failing step")
    assert mm.fp32_precision == before
    with matmul_precision("fp32", CPU):
        assert mm.fp32_precision == before


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 matmul support")
def test_onednn_bf16_multiplies_bf16_rounded_operands_in_fp32():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 64, 128, generator=g), torch.randn(3, 128, 96, generator=g)
    exact = torch.bmm(a.double(), b.double())
    rounded = torch.bmm(a.bfloat16().double(), b.bfloat16().double())  # bf16 operands, exact sum
    with onednn_bf16():
        y = torch.bmm(a, b)
    assert y.dtype == torch.float32
    assert (y.double() - rounded).abs().max() < 1e-3  # only FP32 accumulation differs
    assert (y.double() - exact).abs().max() > 1e-2  # it did round the operands
    with onednn_bf16():
        y2 = torch.baddbmm(torch.zeros(3, 1, 96), a, b)
    assert (y2.double() - rounded).abs().max() < 1e-3
