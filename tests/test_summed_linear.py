"""The MKL bf16 gemm taken from libtorch_cpu, and the fallback where a torch build lacks it."""

from __future__ import annotations

import ctypes
import logging

import pytest
import torch

from defenses.gradient_restoration.engine import summed_linear
from defenses.gradient_restoration.engine.candidates import SignedCandidate


@pytest.mark.parametrize("mkl", [True, False])
def test_weight_gradient_sums_are_close_to_fp32_with_and_without_mkl(monkeypatch, mkl):
    """A low_memory candidate's summed weight gradient (three batches of dy^T x, bf16 factors) is
    the fp32 sum: to fp32 rounding through MKL, to bf16 rounding of each product without it."""
    if mkl and summed_linear.MKL_GEMM_BF16 is None:
        pytest.skip("this torch carries no MKL bf16 gemm")
    if not mkl:
        monkeypatch.setattr(summed_linear, "MKL_GEMM_BF16", None)
    g = torch.Generator().manual_seed(0)
    factors = [
        (torch.randn(37, 11, generator=g).bfloat16(), torch.randn(37, 5, generator=g).bfloat16()) for _ in range(3)
    ]
    exact = sum(dy.double().t() @ x.double() for dy, x in factors)
    c = SignedCandidate("w", torch.nn.Parameter(torch.zeros(11, 5)), grad_buffer=torch.empty(11, 5))
    for dy, x in factors:
        c.add_product(dy, x)
    assert c.grad.dtype == torch.float32 and c.grad.data_ptr() == c.grad_buffer.data_ptr()
    tolerance = 1e-5 if mkl else 2e-2
    torch.testing.assert_close(c.grad.double(), exact, atol=tolerance, rtol=tolerance)


def test_missing_mkl_symbol_is_logged_once_and_declined(monkeypatch, caplog):
    """Where libtorch_cpu has no cblas_gemm_bf16bf16f32 the lookup answers None with one log
    line, and add_product then declines (its callers add the bf16 product themselves)."""

    class NoSymbol:
        def __init__(self, path):
            pass

        def __getattr__(self, name):
            raise AttributeError(name)

    monkeypatch.setattr(ctypes, "CDLL", NoSymbol)
    with caplog.at_level(logging.INFO, logger=summed_linear.__name__):
        assert summed_linear._mkl_gemm_bf16() is None
    assert len(caplog.records) == 1 and "cblas_gemm_bf16bf16f32" in caplog.records[0].getMessage()
    monkeypatch.setattr(summed_linear, "MKL_GEMM_BF16", None)
    dy, x = torch.ones(3, 2).bfloat16(), torch.ones(3, 4).bfloat16()
    assert not summed_linear.add_product(torch.zeros(2, 4), dy, x, accumulate=False)
