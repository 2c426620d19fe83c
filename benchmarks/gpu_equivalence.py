"""On a CUDA device: every token layout against the per-image reference (fp32 and bf16).

    python benchmarks/gpu_equivalence.py > gpu_equivalence.json
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import images, p0_at_quantile, tiny_model  # noqa: E402

from dtop.models.blocks import varlen_kernel_available  # noqa: E402


def main() -> None:
    device = torch.device("cuda")
    results = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "varlen_kernel": varlen_kernel_available()}
    x = torch.cat([images(1, 96, 128, seed=s) * (0.5 + s) for s in range(4)]).to(device)
    for heads in [("atm", "atm", "atm"), ("atm", "linear", "mask")]:
        model = tiny_model(heads, cls_mode="segmenter" if "mask" in heads else "segvit", topk=1).to(device)
        model.set_p0([p0_at_quantile(model, x, 0.4), p0_at_quantile(model, x, 0.5, stage=1)])
        for dtype in (torch.float32, torch.bfloat16):
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                model.set_layout("per_image")
                ref = model(x)
                for layout in ("padded", "packed"):
                    model.set_layout(layout)
                    out = model(x)
                    key = f"{'+'.join(heads)}/{str(dtype)[6:]}/{layout}"
                    results[key] = {
                        "max_abs_score_diff": float((out.scores.float() - ref.scores.float()).abs().max()),
                        "exit_maps_equal": bool(torch.equal(out.exit_stage, ref.exit_stage)),
                        "tokens_equal": bool(torch.equal(out.tokens_per_block, ref.tokens_per_block)),
                    }
    results.update(empty_image(device, x))
    print(json.dumps(results, indent=1))


def empty_image(device: torch.device, x: torch.Tensor) -> dict:
    """Image 0 loses every token at the first exit (no prefix tokens): an empty sequence (a repeated offset)
    for the variable-length kernel. Packed against per_image, forward in fp32 and bf16 and a bf16 backward."""
    model = tiny_model(("atm", "atm", "atm"), topk=1).to(device)

    def first_image_leaves(stage: int, conf: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        exits = torch.zeros_like(valid)
        if stage == 0:
            exits[0], exits[1, ::2] = valid[0], valid[1, ::2]
        return exits

    model.force_exit = first_image_leaves
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            model.set_layout("per_image")
            ref = model(x)
            model.set_layout("packed")
            got = model(x)
        out[f"empty_image/{str(dtype)[6:]}/packed"] = {
            "max_abs_score_diff": float((got.scores.float() - ref.scores.float()).abs().max()),
            "finite": bool(torch.isfinite(got.scores.float()).all()),
            "exit_maps_equal": bool(torch.equal(got.exit_stage, ref.exit_stage)),
        }
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = sum(s.canvas.float().square().mean() for s in model(x).stages)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    out["empty_image/bfloat16/packed/train"] = {"loss_finite": bool(torch.isfinite(loss)),
                                                 "grads_finite": bool(torch.isfinite(grads).all())}
    return out


if __name__ == "__main__":
    main()
