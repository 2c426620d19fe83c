"""oneDNN-packed linear layers for fp32 CPU inference (dtop.models.packed)."""
import copy
import io

import pytest
import torch
from torch import nn

from conftest import HEAD_SETS, gflops, images, tiny_model
from dtop.apps.bench import PeakTensorMemory, forced_exits
from dtop.errors import ConfigError
from dtop.models.packed import PackedLinear, onednn_available, use_linear_kernel

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear")


def _pair(bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(48, 40, bias=bias)
    return lin, PackedLinear.from_linear(lin)


@needs_onednn
@pytest.mark.parametrize("shape", [(5, 48), (2, 7, 48), (2, 3, 4, 48), (1, 0, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_linear(shape, bias):
    lin, packed = _pair(bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        y = packed(x)
        assert packed._packed is not None  # the oneDNN path ran
        torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 48, 9).transpose(1, 2)  # not contiguous
    with torch.no_grad():
        torch.testing.assert_close(packed(x), lin(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packed_linear_repacks_when_the_weight_changes():
    lin, packed = _pair()
    x = torch.randn(3, 48)
    with torch.no_grad():
        packed(x)
        lin.weight.mul_(2)  # in place, as an optimizer step or load_state_dict does
        torch.testing.assert_close(packed(x), lin(x), rtol=1e-5, atol=1e-5)
        packed.load_state_dict({"weight": torch.zeros(40, 48), "bias": torch.ones(40)})
        torch.testing.assert_close(packed(x), torch.ones(3, 40))


def test_packed_linear_trains_like_linear():
    """With autograd on, the plain kernel runs: gradients are those of nn.Linear."""
    lin, packed = _pair()
    ref = copy.deepcopy(lin)
    x = torch.randn(4, 48, requires_grad=True)
    packed(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    ref(x2).square().sum().backward()
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad)
    torch.testing.assert_close(x.grad, x2.grad)
    assert packed._packed is None


def test_packed_linear_leaves_other_dtypes_to_torch():
    lin, packed = _pair()
    with torch.no_grad():
        x = torch.randn(3, 48, dtype=torch.float64)
        lin.double()
        torch.testing.assert_close(packed(x), lin(x))
        lin.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert packed(torch.randn(3, 48)).dtype == torch.bfloat16
    assert packed._packed is None


@needs_onednn
def test_use_linear_kernel_swaps_and_restores():
    model = tiny_model(("atm", "linear", "mask"))
    keys = list(model.state_dict())
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert use_linear_kernel(model, "auto", torch.device("cpu")) == "onednn"
    assert sum(type(m) is PackedLinear for m in model.modules()) == n_linear
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        model(images())
    # the packed copies do not travel: deep copies and whole-model pickles still work
    clone = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    assert all(m._packed is None for m in clone.modules() if isinstance(m, PackedLinear))
    assert use_linear_kernel(model, "aten") == "aten"
    assert sum(type(m) is nn.Linear for m in model.modules()) == n_linear
    assert use_linear_kernel(model, "auto", torch.device("cuda")) == "aten"  # auto: oneDNN on CPU only
    with pytest.raises(ConfigError, match="unknown linear kernel 'mkl'"):
        use_linear_kernel(model, "mkl")


@needs_onednn
@pytest.mark.parametrize("heads", list(HEAD_SETS.values()), ids=list(HEAD_SETS))
def test_packed_model_matches_plain_model(heads):
    """The whole model with packed linears: the same logits as torch's kernels (to rounding), the same
    FLOPs, and with no exit DToP still equals the dense forward."""
    model = tiny_model(heads, p0=1.0)
    x = images(3)
    with torch.no_grad():
        ref_dense, ref = model.forward_dense(x), model(x)
        use_linear_kernel(model, "onednn")
        dense, out = model.forward_dense(x), model(x)
    torch.testing.assert_close(dense, ref_dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.scores, ref.scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.scores, dense, rtol=1e-5, atol=1e-5)
    assert torch.equal(gflops(model, out), gflops(model, ref))


@needs_onednn
def test_peak_memory_of_a_packed_model():
    """The packed weights are opaque oneDNN tensors without storage; the memory probe skips them."""
    model = tiny_model()
    use_linear_kernel(model, "onednn")
    model.set_p0(0.5)
    model.force_exit = forced_exits([0.5, 0.5])
    x = images()
    with torch.no_grad():
        model(x)  # packs
        with PeakTensorMemory() as mode:
            model(x)
    assert mode.peak > x.numel() * 4
