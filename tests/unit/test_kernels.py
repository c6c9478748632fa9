"""The thin-input linear path used while decoding: same numbers as F.linear, used only where it may be."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from personalign.kernels import MAX_ROWS, fast_decode, padded_rows, thin_linear


@pytest.mark.parametrize(("rows", "expected"), [(1, 4), (3, 4), (4, 4), (5, 8), (8, 8), (9, 16), (16, 16),
                                                 (17, 32), (33, 48), (128, 128)])
def test_padded_rows(rows, expected):
    assert padded_rows(rows) == expected


def test_padded_rows_rejects_zero():
    with pytest.raises(ValueError, match="at least 1"):
        padded_rows(0)


@pytest.mark.parametrize("shape", [(1, 24), (3, 24), (2, 5, 24), (4, 1, 24), (130, 24), (24,)])
@pytest.mark.parametrize("bias", [True, False])
def test_thin_linear_equals_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    x = torch.randn(*shape, generator=g)
    got = thin_linear(x, w, b)
    assert got.shape == F.linear(x, w, b).shape
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_thin_linear_empty_rows():
    w = torch.randn(6, 4)
    assert thin_linear(torch.zeros(0, 4), w).shape == (0, 6)


def test_fast_decode_routes_linear_layers_and_restores():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    want = model(x).detach()
    calls = []
    import personalign.kernels as kernels

    original = kernels.thin_linear

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return original(*a, **kw)

    kernels.thin_linear = spy
    try:
        with torch.no_grad(), fast_decode(model):
            got = model(x)
    finally:
        kernels.thin_linear = original
    assert len(calls) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all("forward" not in m.__dict__ for m in model.modules())  # back to the class's forward


def test_fast_decode_leaves_training_alone():
    model = nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with fast_decode(model):
        out = model(x)  # gradients on, weight requires grad: plain path, backward works
        out.sum().backward()
    assert model.weight.grad is not None
    torch.testing.assert_close(model.weight.grad, x.sum(0).expand(4, 8))


def test_fast_decode_skips_many_rows_and_other_dtypes(monkeypatch):
    import personalign.kernels as kernels

    seen = []
    monkeypatch.setattr(kernels, "thin_linear", lambda *a, **k: seen.append(1) or F.linear(*a, **k))
    model = nn.Linear(8, 4)
    with torch.no_grad(), fast_decode(model):
        model(torch.randn(MAX_ROWS + 1, 8))
        model(torch.randn(1, 1, 8))  # one row: a matrix-vector product, left to the plain path
        model.to(torch.float64)(torch.randn(2, 8, dtype=torch.float64))
    assert seen == []


def test_fast_decode_nested_and_disabled(monkeypatch):
    model = nn.Linear(8, 4)
    with fast_decode(model):
        inner_forward = model.__dict__["forward"]
        with fast_decode(model):
            assert model.__dict__["forward"] is inner_forward
        assert model.__dict__["forward"] is inner_forward  # the inner block did not undo the outer one
    assert "forward" not in model.__dict__
    monkeypatch.setenv("PERSONALIGN_FAST_LINEAR", "0")
    with fast_decode(model):
        assert "forward" not in model.__dict__


def test_fast_decode_greedy_generation_unchanged(tiny):
    model, tok = tiny
    tok.padding_side = "left"
    enc = tok(["Explain photosynthesis to me.", "Hi"], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        plain = model.generate(**enc, **kw)
        with fast_decode(model):
            fast = model.generate(**enc, **kw)
            logits_fast = model(**enc).logits
        logits = model(**enc).logits
    assert torch.equal(plain, fast)
    torch.testing.assert_close(logits_fast, logits, rtol=1e-5, atol=1e-5)
