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
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
