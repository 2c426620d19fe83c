"""torch.compile of the blocks and heads (Segmentor.compile): dynamic token counts reuse compiled code, and the
compiled model equals the eager one in every layout."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import images, tiny_model
from torch._dynamo.utils import counters

from dtop.apps.bench import forced_exits


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_new_kept_counts_do_not_recompile_without_bound():
    """20 batches of random exit patterns (dynamo with the eager backend: the guards and graphs are what
    inductor would compile): a bounded number of graphs, outputs equal to the uncompiled model."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = tiny_model(heads=("atm", "atm", "atm"), blocks=(1, 2, 3), p0=0.5).eval()
    x = images(4)
    eager = {}
    gen = torch.Generator().manual_seed(0)
    patterns = [torch.rand(4, generator=gen).tolist() for _ in range(20)]
    for i, fr in enumerate(patterns):
        model.force_exit = forced_exits(fr, seed=i)
        with torch.no_grad():
            eager[i] = model(x).scores
    model.compile(backend="eager")
    seen = []
    for i, fr in enumerate(patterns):
        model.force_exit = forced_exits(fr, seed=i)
        with torch.no_grad():
            out = model(x).scores
        torch.testing.assert_close(out, eager[i], atol=0, rtol=0)
        seen.append(_graphs())
    # new graphs only for new size classes (dynamo specialises sizes 0 and 1: an image keeping 0 or 1 tokens),
    # never one per kept-token count: far fewer graphs than batches
    assert seen[-1] <= 12 and len(set(seen)) <= 4, seen


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["packed"])
def test_inductor_compiled_model_equals_eager(layout):
    """Inductor (the default backend) on a tiny model: DToP in the packed layout and the dense forward
    within 1e-4 of eager (fp32)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_model(heads=("linear", "linear"), blocks=(0, 1), p0=0.5, depth=2).eval()
    model.set_layout(layout)
    x = images(3, 32, 48)
    model.force_exit = forced_exits([0.2, 0.5, 0.8])
    with torch.no_grad():
        ref, ref_dense = model(x), model.forward_dense(x)
        model.compile()
        out, dense = model(x), model.forward_dense(x)
    torch.testing.assert_close(out.scores, ref.scores, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dense, ref_dense, atol=1e-4, rtol=1e-4)
    assert torch.equal(out.exit_stage, ref.exit_stage)
    assert torch.equal(out.tokens_per_block, ref.tokens_per_block)
