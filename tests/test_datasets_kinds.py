"""Folder datasets as users have them: palettes with reduce_zero_label (names, colours and ids aligned from
training to ``dtop predict``), a configurable ignore id that never collides with a class, and the layouts
(split folders, nested collections, split files) with a report of what paired and what was skipped."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dtop.apps.demo import demo_config
from dtop.apps.predict import predict_paths
from dtop.checkpoint import load_checkpoint
from dtop.config import load_config
from dtop.data import CamVid, FolderDataset, SyntheticScenes, TrainTransform, build_dataset
from dtop.data.meta import dataset_meta, folder_classes, trained_display_meta
from dtop.engine import train
from dtop.engine.common import experiment_dataset
from dtop.engine.evaluate import update_histogram
from dtop.engine.losses import segmentation_loss
from dtop.errors import ConfigError, InputError
from dtop.models.outputs import StageOutput

PAL = [(0, 0, 100), (255, 0, 0), (0, 255, 0), (255, 255, 0)]  # background, car, grass, person


def write_image(path: Path, h: int = 8, w: int = 12, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def write_ids(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint16 if ids.max() > 255 else np.uint8)).save(path)


def scene_ids(h: int = 8, w: int = 12) -> np.ndarray:
    """Stored ids 0 (background), 1 (car), 2 (grass), 3 (person) in blocks."""
    ids = np.zeros((h, w), np.int64)
    ids[:, w // 3: 2 * w // 3], ids[:, 2 * w // 3:], ids[: h // 4] = 1, 2, 3
    return ids


# ------------------------------------------------------------------------ kind 4: palettes and class shifts
def test_rgb_masks_with_reduce_zero_label_drop_the_first_colour(tmp_path):
    ids = scene_ids()
    write_image(tmp_path / "images" / "val" / "a.png")
    (tmp_path / "labels" / "val").mkdir(parents=True)
    Image.fromarray(np.asarray(PAL, np.uint8)[ids]).save(tmp_path / "labels" / "val" / "a.png")
    ds = build_dataset("folder", split="val", root=tmp_path, label_mode="rgb", palette=PAL, reduce_zero_label=True,
                       classes=["background", "car", "grass", "person"])
    _, lab = ds.load(0)
    assert ds.num_classes == 3 and ds.classes == ("car", "grass", "person") and ds.palette == PAL[1:]
    np.testing.assert_array_equal(lab, np.where(ids == 0, 255, ids - 1))
    car = int(lab[ids == 1][0])
    assert ds.palette[car] == (255, 0, 0) and ds.classes[car] == "car"


def test_id_masks_with_reduce_zero_label_drop_the_first_colour_too(tmp_path):
    ids = scene_ids()
    write_image(tmp_path / "images" / "a.png")
    write_ids(tmp_path / "labels" / "a.png", ids)
    ds = FolderDataset(tmp_path, "val", palette=PAL, reduce_zero_label=True, classes=["car", "grass", "person"])
    _, lab = ds.load(0)
    assert ds.num_classes == 3 and ds.palette == PAL[1:]
    person = int(lab[ids == 3][0])
    assert ds.palette[person] == (255, 255, 0) and ds.classes[person] == "person"
    assert (lab[ids == 0] == 255).all()


def test_palette_and_class_counts_that_disagree_under_reduce_zero_label_are_refused():
    with pytest.raises(ConfigError, match=r"reduce_zero_label.*4 colours give 3 classes"):
        folder_classes(PAL, reduce_zero_label=True, num_classes=4)
    with pytest.raises(ConfigError, match="classes gives 2"):
        folder_classes(PAL, reduce_zero_label=True, classes=["car", "grass"])
    with pytest.raises(ConfigError, match="id 0's colour"):
        folder_classes(PAL[:1], reduce_zero_label=True)
    with pytest.raises(ConfigError, match=r"palette\[1\]"):
        folder_classes([(0, 0, 0), (300, 0, 0)])
    assert folder_classes(PAL, num_classes=4)[1] == PAL  # without reduce_zero_label nothing is dropped


def test_display_meta_follows_the_record_then_the_folder_options_then_the_name():
    record = {"classes": ["x", "y"], "palette": [[1, 2, 3], [4, 5, 6]]}
    folder = {"name": "folder", "options": {"palette": [list(c) for c in PAL], "reduce_zero_label": True}}
    assert trained_display_meta(folder, 2, record) == ([(1, 2, 3), (4, 5, 6)], ["x", "y"])
    assert trained_display_meta(folder, 3) == (PAL[1:], ["class_0", "class_1", "class_2"])
    assert trained_display_meta(folder, 3, {"classes": ["x"], "palette": [[1, 2, 3]]})[0] == PAL[1:]
    colours, names = trained_display_meta({"name": "camvid", "options": {}}, 11)
    assert colours == dataset_meta("camvid").palette and names[0] == "sky"


def _tiny_folder_run(tmp_path: Path) -> Path:
    """A folder dataset of RGB masks with reduce_zero_label, trained for one iteration."""
    for i in range(2):
        write_image(tmp_path / "data" / "images" / f"im{i}.png", 32, 32, seed=i)
        (tmp_path / "data" / "labels").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(PAL, np.uint8)[scene_ids(32, 32)]).save(tmp_path / "data" / "labels" / f"im{i}.png")
    cfg = demo_config(str(tmp_path / "run"), fast=True)
    cfg.data.name, cfg.data.root = "folder", str(tmp_path / "data")
    cfg.data.options = {"label_mode": "rgb", "palette": [list(c) for c in PAL], "reduce_zero_label": True}
    cfg.data.val_options = {}
    cfg.data.crop_size, cfg.data.ratio_range = [32, 32], [1.0, 1.0]
    cfg.train.iters, cfg.train.ckpt_interval, cfg.train.batch_size = 1, 1, 2
    return train(cfg)


def test_training_records_classes_and_palette_and_predict_colours_with_them(tmp_path):
    ckpt = _tiny_folder_run(tmp_path)
    record = load_checkpoint(ckpt)["dataset"]
    assert record["palette"] == [list(c) for c in PAL[1:]] and record["ignore_index"] == 255
    assert record["classes"] == ["class_0", "class_1", "class_2"]
    # the record wins over whatever the config says (here: a palette that would give other colours)
    state = torch.load(ckpt, weights_only=False)
    state["dataset"]["palette"] = [[7, 7, 7], [8, 8, 8], [9, 9, 9]]
    torch.save(state, tmp_path / "edited.pt")
    write_image(tmp_path / "x.png", 32, 32)
    for path, allowed in ((ckpt, PAL[1:]), (tmp_path / "edited.pt", [(7, 7, 7), (8, 8, 8), (9, 9, 9)])):
        predict_paths(str(path), [str(tmp_path / "x.png")], tmp_path / "out", device="cpu", linear="aten")
        seg = np.asarray(Image.open(tmp_path / "out" / "x_seg.png").convert("RGB")).reshape(-1, 3)
        assert {tuple(c) for c in np.unique(seg, axis=0).tolist()} <= set(allowed)


def test_predict_on_an_old_checkpoint_uses_the_config_folder_palette(tmp_path):
    ckpt = _tiny_folder_run(tmp_path)
    state = torch.load(ckpt, weights_only=False)
    del state["dataset"]  # a checkpoint from before the record: the config's folder palette still applies
    torch.save(state, tmp_path / "old.pt")
    write_image(tmp_path / "x.png", 32, 32)
    predict_paths(str(tmp_path / "old.pt"), [str(tmp_path / "x.png")], tmp_path / "out", device="cpu",
                  linear="aten")
    seg = np.asarray(Image.open(tmp_path / "out" / "x_seg.png").convert("RGB")).reshape(-1, 3)
    assert {tuple(c) for c in np.unique(seg, axis=0).tolist()} <= set(PAL[1:])


# ---------------------------------------------------------------------------- kind 5: the ignore id
def _k847(tmp_path: Path) -> np.ndarray:
    write_image(tmp_path / "images" / "a.png", 4, 160)
    lab = np.repeat(np.arange(250, 260), 16)[None].repeat(4, 0)
    lab[0, :3] = 65535
    write_ids(tmp_path / "labels" / "a.png", lab)
    return lab


def test_more_classes_than_the_ignore_id_is_refused_naming_both_and_the_key(tmp_path):
    _k847(tmp_path)
    with pytest.raises(ConfigError) as e:
        build_dataset("folder", split="val", root=tmp_path, num_classes=847)
    assert all(s in str(e.value) for s in ("847", "255", "data.ignore_index"))
    with pytest.raises(ConfigError, match="ignore id 3"):
        build_dataset("synthetic", split="val", num_images=1, ignore_index=3)


def test_a_configured_ignore_id_keeps_class_255(tmp_path):
    lab = _k847(tmp_path)
    t = TrainTransform(crop_size=(8, 200), scale=None, ratio_range=None, photometric=False)
    ds = build_dataset("folder", split="val", root=tmp_path, num_classes=847, ignore_index=65535, transform=t)
    _, got = ds.load(0)
    np.testing.assert_array_equal(got, lab)
    assert int((got == 255).sum()) == 4 * 16 and ds.ignore_index == 65535
    _, y = ds.transform(*ds.load(0))
    assert t.ignore_index == 65535 and (y[4:] == 65535).all()  # padding uses the dataset's ignore id


def test_label_ids_beyond_the_classes_name_both_numbers_and_the_key(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    write_ids(tmp_path / "labels" / "a.png", np.full((8, 12), 255))
    with pytest.raises(InputError) as e:
        FolderDataset(tmp_path, "val", num_classes=4, ignore_index=1000).load(0)
    assert all(s in str(e.value) for s in ("255", "0..3", "4 classes", "ignore id 1000", "data.ignore_index"))


def test_named_datasets_give_their_ignored_pixels_the_configured_id(tmp_path):
    write_image(tmp_path / "val" / "a.png", 4, 4)
    write_ids(tmp_path / "valannot" / "a.png", np.array([[0, 11, 255, 3]]).repeat(4, 0))
    _, got = CamVid(tmp_path, "val", ignore_index=1000).load(0)
    np.testing.assert_array_equal(got[0], [0, 1000, 1000, 3])
    with pytest.raises(ConfigError, match="one of the 11 class ids"):
        CamVid(tmp_path, "val", ignore_index=10)
    assert build_dataset("synthetic", num_images=1, ignore_index=300).ignore_index == 300


def test_loss_and_metrics_leave_out_the_configured_ignore_id():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 2)
    stage = StageOutput(canvas=logits, presence=None, logits=logits, valid=torch.ones(1, 2, 2, dtype=torch.bool))
    out = SimpleNamespace(stages=[stage])  # segmentation_loss reads only the stages
    label = torch.tensor([[[0, 1], [2, 300]]])
    loss, _ = segmentation_loss(out, label, ignore_index=300)
    want = torch.nn.functional.cross_entropy(logits.flatten(2)[0, :, :3].T, label.flatten()[:3])
    assert torch.allclose(loss, want)
    hist = torch.zeros(3, 3, dtype=torch.long)
    update_histogram(hist, torch.tensor([0, 1, 2, 0]), label.flatten(), ignore_index=300)
    assert int(hist.sum()) == 3


def test_config_ignore_index_reaches_dataset_and_transform(tmp_path):
    _k847(tmp_path)
    cfg = load_config(sets=["data.name=folder", f"data.root={tmp_path}", "data.options={num_classes: 847}",
                            "data.ignore_index=65535"])
    ds = experiment_dataset(cfg, "val", train=True)
    assert ds.ignore_index == 65535 and ds.transform.ignore_index == 65535
    cfg.data.options["ignore_index"] = 7
    with pytest.raises(ConfigError, match="data.ignore_index"):
        experiment_dataset(cfg, "val", train=False)


# ------------------------------------------------------------------------------- kind 9: folder layouts
def test_nested_collections_pair_by_relative_path_and_stem(tmp_path, capsys):
    for region, stems in (("Region 1", ["a", "b"]), ("Region 2", ["sub/a"])):
        for i, stem in enumerate(stems):
            write_image(tmp_path / region / "images" / f"{stem}{'.JPEG' if i else '.jpg'}")  # any image suffix
            write_ids(tmp_path / region / "masks" / f"{stem}.png", np.zeros((8, 12), np.int64))
    write_image(tmp_path / "Region 1" / "images" / "lonely.webp")  # no mask
    write_ids(tmp_path / "Region 2" / "masks" / "orphan.png", np.zeros((8, 12), np.int64))  # no image
    (tmp_path / "Region 1" / "images" / "notes.txt").write_text("x")
    (tmp_path / "Region 1" / "images" / "._a.jpg").write_bytes(b"macOS metadata")  # hidden: left out
    ds = FolderDataset(tmp_path, "train", num_classes=2)
    assert [s.name for s in ds.samples] == ["Region 1/a", "Region 1/b", "Region 2/sub/a"]
    assert ds.samples[1].label == tmp_path / "Region 1" / "masks" / "b.png"
    assert [s.image.name for s in ds.pairing.unpaired] == ["lonely.webp"]
    skipped = {p.name: why for p, why in ds.pairing.skipped}
    assert set(skipped) == {"orphan.png", "notes.txt"} and "without an image" in skipped["orphan.png"]
    err = capsys.readouterr().err
    assert "paired 3" in err and "lonely.webp" in err and "orphan.png" in err and "notes.txt" in err
    FolderDataset(tmp_path, "train", num_classes=2)
    assert capsys.readouterr().err == ""  # the summary is printed once


def test_split_files_select_by_stem_or_relative_path(tmp_path):
    for stem in ("train/a", "train/b", "val/c", "val/d"):
        write_image(tmp_path / "images" / f"{stem}.png")
        write_ids(tmp_path / "labels" / f"{stem}.png", np.zeros((8, 12), np.int64))
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "mine.txt").write_text("# my split\nd\n./train/a.png\n\nimages/val/c\n")
    ds = FolderDataset(tmp_path, "splits/mine.txt", num_classes=1)
    assert [s.name for s in ds.samples] == ["val/d", "train/a", "val/c"]
    (tmp_path / "splits" / "bad.txt").write_text("a\nzzz\n")
    with pytest.raises(InputError, match=r"1 of 2 entries name no image.*'zzz'"):
        FolderDataset(tmp_path, "splits/bad.txt", num_classes=1)
    write_image(tmp_path / "images" / "val" / "a.png")
    write_ids(tmp_path / "labels" / "val" / "a.png", np.zeros((8, 12), np.int64))
    with pytest.raises(InputError, match="names 2 images"):
        FolderDataset(tmp_path, "splits/bad.txt", num_classes=1)
    with pytest.raises(InputError, match="split file 'splits/none.txt' not found"):
        FolderDataset(tmp_path, "splits/none.txt", num_classes=1)


def test_nothing_pairing_names_the_folders_and_an_unpaired_file_of_each_side(tmp_path):
    write_image(tmp_path / "images" / "val" / "a.jpg")
    write_ids(tmp_path / "labels" / "val" / "a_mask.png", np.zeros((8, 12), np.int64))
    with pytest.raises(InputError) as e:
        FolderDataset(tmp_path, "val", num_classes=2)
    msg = str(e.value)
    assert "images/val <-> labels/val" in msg and "images/val/a.jpg" in msg and "labels/val/a.png" in msg
    assert "labels/val/a_mask.png" in msg
    with pytest.raises(InputError, match="no folder named 'images'"):
        FolderDataset(tmp_path / "labels", "val", num_classes=2)


def test_split_folders_still_win_and_images_without_labels_are_skipped(tmp_path):
    for split in ("train", "val"):
        write_image(tmp_path / "images" / split / "a.png")
        write_ids(tmp_path / "labels" / split / "a.png", np.zeros((8, 12), np.int64))
    write_image(tmp_path / "images" / "val" / "b.png")
    ds = FolderDataset(tmp_path, "val", num_classes=1)
    assert [s.name for s in ds.samples] == ["a"] and ds.samples[0].image.parent.name == "val"
    assert [s.name for s in ds.pairing.unpaired] == ["b"]
    with pytest.raises(InputError, match="found train, val"):
        FolderDataset(tmp_path, "test", num_classes=1)
    assert isinstance(SyntheticScenes(num_images=1).ignore_index, int)


# ------------------------------------------------------------------------------- held-back inputs of kinds 4 and 9
def test_predict_palette_option_is_a_known_dataset_with_enough_classes(tmp_path, capsys):
    from conftest import tiny_model

    model = tiny_model(("linear", "linear", "linear"), num_classes=11)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model": model.state_dict(), "model_config": model.cfg.to_dict()}, ckpt)
    write_image(tmp_path / "x.png", 32, 32)
    run = lambda palette: predict_paths(str(ckpt), [str(tmp_path / "x.png")], tmp_path / "out",  # noqa: E731
                                        palette=palette, device="cpu", linear="aten")
    with pytest.raises(ConfigError, match=r"camvdi.*did you mean camvid"):
        run("camvdi")  # a typo used to fall back to random colours without a word
    with pytest.raises(ConfigError, match=r"palette 'synthetic' has 8 classes but the model predicts 11"):
        run("synthetic")
    result = run("cityscapes")  # 19 colours for 11 classes: the first 11, with a warning
    assert "palette 'cityscapes' has 19 classes, the model 11" in capsys.readouterr().err
    names = dataset_meta("cityscapes").classes[:11]
    assert all(part.rsplit(" ", 1)[0] in names for part in result["images"][0]["top_classes"].split(", "))
    seg = np.asarray(Image.open(tmp_path / "out" / "x_seg.png").convert("RGB")).reshape(-1, 3)
    assert {tuple(c) for c in np.unique(seg, axis=0).tolist()} <= set(dataset_meta("cityscapes").palette[:11])


def test_split_file_with_byte_order_mark_crlf_and_suffixed_relative_paths(tmp_path):
    for stem, suffix in (("Region 1/a", ".JPG"), ("Region 1/sub/b", ".jpeg"), ("Region 2/a", ".webp"),
                         ("Region 2/c", ".jfif")):
        write_image(tmp_path / stem.split("/")[0] / "images" / f"{stem.split('/', 1)[1]}{suffix}")
        write_ids(tmp_path / stem.split("/")[0] / "masks" / f"{stem.split('/', 1)[1]}.png", np.zeros((8, 12)))
    (tmp_path / "val.txt").write_bytes("\ufeffRegion 1/images/sub/b.jpeg\r\nRegion 2/a.webp\r\n"
                                       "./Region 1/a.jpg\r\nRegion 2/c\r\n".encode("utf-8"))
    ds = FolderDataset(tmp_path, "val.txt", num_classes=1)
    assert [s.name for s in ds.samples] == ["Region 1/sub/b", "Region 2/a", "Region 1/a", "Region 2/c"]
    assert ds.samples[3].image.suffix == ".jfif"  # any suffix Pillow reads
    (tmp_path / "missing.txt").write_text("Region 1/a\nRegion 2/zzz.jpg\n")
    with pytest.raises(InputError, match=r"1 of 2 entries name no image.*'Region 2/zzz.jpg'"):
        FolderDataset(tmp_path, "missing.txt", num_classes=1)


def test_split_file_naming_an_image_whose_label_is_misnamed_says_so(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    write_ids(tmp_path / "labels" / "a.png", np.zeros((8, 12)))
    write_image(tmp_path / "images" / "i.png")
    write_ids(tmp_path / "labels" / "i_mask.png", np.zeros((8, 12)))
    (tmp_path / "val.txt").write_text("i\n")
    with pytest.raises(InputError) as e:
        FolderDataset(tmp_path, "val.txt", num_classes=1)
    assert "images/i.png (expected labels/i.png)" in str(e.value)
    assert "rename i_mask.png to i.png" in str(e.value) and "no label files found" not in str(e.value)


def test_pascal_context_split_file_with_suffixes_and_byte_order_mark(tmp_path):
    from dtop.data import PascalContext59

    voc = tmp_path / "VOCdevkit" / "VOC2010"
    for stem in ("2008_000002", "2008_000003"):
        write_image(voc / "JPEGImages" / f"{stem}.jpg")
        write_ids(voc / "SegmentationClassContext" / f"{stem}.png", np.full((8, 12), 3))
    (voc / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    split = voc / "ImageSets" / "SegmentationContext" / "val.txt"
    split.write_bytes(b"\xef\xbb\xbf2008_000002.jpg\r\n2008_000003\r\n")
    ds = PascalContext59(tmp_path, "val")
    assert [s.name for s in ds.samples] == ["2008_000002", "2008_000003"]
    assert set(np.unique(ds.load(0)[1]).tolist()) == {2}  # reduce-zero-label: stored 3 -> class 2


def test_collection_without_split_folders_warns_that_every_split_shares_its_images(tmp_path):
    """Training images silently evaluated as validation ones: now a warning naming the folder and the fix."""
    for stem in ("a", "b"):
        write_image(tmp_path / "Region 9" / "images" / f"{stem}.png")
        write_ids(tmp_path / "Region 9" / "masks" / f"{stem}.png", np.zeros((8, 12), np.int64))
    with pytest.warns(UserWarning, match="no split folders.*same images for training and evaluation"):
        ds = FolderDataset(tmp_path, "val", num_classes=1)
    assert len(ds) == 2
