"""Data package: dataset layouts, label mapping, errors, transforms, synthetic scenes, real CamVid."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtop.data import (ADE20K, DATASETS, CamVid, Cityscapes, COCOStuff10K, EvalTransform, FolderDataset,
                       PascalContext59, SyntheticScenes, TrainTransform, build_dataset, dataset_meta)
from dtop.data.synthetic import PERSON, POLE, ROAD, SKY
from dtop.errors import ConfigError, DToPError, InputError

CAMVID = Path(__file__).parents[2] / "shared/data/camvid"
MEAN = STD = (0.5, 0.5, 0.5)


# ------------------------------------------------------------------------------------------------ helpers
def write_image(path: Path, h: int = 12, w: int = 16, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def write_label(path: Path, label: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8), "L").save(path)
    return label


def ramp_label(h: int = 12, w: int = 16, hi: int = 4) -> np.ndarray:
    """Ids 0..hi-1 in vertical stripes."""
    return np.broadcast_to(np.arange(w) * hi // w, (h, w)).astype(np.uint8)


def make_ade(root: Path, n: int = 3) -> None:
    for split in ("training", "validation"):
        for i in range(n):
            write_image(root / "images" / split / f"ADE_{split}_{i:04d}.jpg", seed=i)
            write_label(root / "annotations" / split / f"ADE_{split}_{i:04d}.png", ramp_label())


def decode(image: torch.Tensor) -> np.ndarray:
    """Normalised (3, H, W) -> float (H, W, 3) in 0..255."""
    return (image.numpy().transpose(1, 2, 0) * np.asarray(STD) + np.asarray(MEAN)) * 255.0


# --------------------------------------------------------------------------------------------------- meta
def test_meta_sizes_and_unknown_name():
    sizes = {"ade20k": 150, "pascal_context59": 59, "coco_stuff10k": 171, "cityscapes": 19, "camvid": 11,
             "synthetic": 8}
    for name, k in sizes.items():
        meta = dataset_meta(name)
        assert len(meta.classes) == len(meta.palette) == k
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in meta.palette)
    assert dataset_meta("ade20k").classes[:3] == ("wall", "building", "sky")
    assert dataset_meta("cityscapes").palette[0] == (128, 64, 128)
    assert dataset_meta("camvid").palette[4] == (60, 40, 222)
    with pytest.raises(ConfigError, match="camvid"):
        dataset_meta("camvd")


# ----------------------------------------------------------------------------------------------- layouts
def test_ade20k_pairs_and_reduces_zero_label(tmp_path):
    make_ade(tmp_path / "ADEChallengeData2016")
    for root in (tmp_path / "ADEChallengeData2016", tmp_path):  # the folder itself or its parent
        ds = ADE20K(root, "val")
        assert len(ds) == 3 and ds.num_classes == 150 and ds.ignore_index == 255
        assert [s.name for s in ds.samples] == [f"ADE_validation_{i:04d}" for i in range(3)]
        image, label = ds.load(1)
        assert image.dtype == np.uint8 and image.shape == (12, 16, 3)
        assert label.dtype == np.int64
        raw = ramp_label().astype(np.int64)
        np.testing.assert_array_equal(label, np.where(raw == 0, 255, raw - 1))
    item = ADE20K(tmp_path, "train")[0]
    assert item["image"].shape == (3, 12, 16) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["name"] == "ADE_training_0000"


@pytest.mark.parametrize("nested", [True, False])
def test_pascal_context_split_file_and_root_forms(tmp_path, nested):
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    names = ["2008_000002", "2008_000003", "2008_000007"]
    for i, n in enumerate(names):
        write_image(voc / "JPEGImages" / f"{n}.jpg", seed=i)
        write_label(voc / "SegmentationClassContext" / f"{n}.png", np.full((12, 16), i, np.uint8))
    (voc / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (voc / "ImageSets" / "SegmentationContext" / "train.txt").write_text("2008_000007\n2008_000002\n")
    (voc / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000003\n")
    ds = PascalContext59(tmp_path if nested else voc, "train")
    assert [s.name for s in ds.samples] == ["2008_000007", "2008_000002"]  # split file order
    assert ds.num_classes == 59
    assert (ds.load(0)[1] == 1).all() and (ds.load(1)[1] == 255).all()  # 2 -> 1, background 0 -> 255
    assert len(PascalContext59(tmp_path, "val")) == 1


def test_coco_stuff_train_ids_suffix_and_val_split(tmp_path):
    for folder, n in (("train2014", 2), ("test2014", 1)):
        for i in range(n):
            stem = f"COCO_{folder}_{i:012d}"
            write_image(tmp_path / "images" / folder / f"{stem}.jpg")
            write_label(tmp_path / "annotations" / folder / f"{stem}_labelTrainIds.png",
                        np.array([[0, 170], [255, 3]], np.uint8).repeat(6, 0).repeat(8, 1))
    assert len(COCOStuff10K(tmp_path, "train")) == 2
    ds = COCOStuff10K(tmp_path, "val")
    assert len(ds) == 1 and ds.num_classes == 171 and ds.samples[0].image.parent.name == "test2014"
    assert set(np.unique(ds.load(0)[1])) == {0, 3, 170, 255}  # train ids unchanged


def test_cityscapes_pairs_across_city_folders(tmp_path):
    for city, k in (("aachen", 2), ("bremen", 1)):
        for i in range(k):
            base = f"{city}_{i:06d}_000019"
            write_image(tmp_path / "leftImg8bit" / "train" / city / f"{base}_leftImg8bit.png")
            write_label(tmp_path / "gtFine" / "train" / city / f"{base}_gtFine_labelTrainIds.png",
                        np.full((12, 16), 18, np.uint8))
    ds = Cityscapes(tmp_path, "train")
    assert ds.num_classes == 19
    assert [s.name for s in ds.samples] == ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019",
                                            "bremen/bremen_000000_000019"]
    assert all(s.label.name == s.image.name.replace("leftImg8bit", "gtFine_labelTrainIds") for s in ds.samples)
    assert (ds.load(2)[1] == 18).all()


def test_camvid_maps_unlabelled_to_ignore(tmp_path):
    label = np.arange(12 * 16).reshape(12, 16) % 12
    for split in ("train", "val"):
        write_image(tmp_path / split / "0001TP_000010.png")
        write_label(tmp_path / f"{split}annot" / "0001TP_000010.png", label)
    ds = CamVid(tmp_path, "val")
    _, got = ds.load(0)
    np.testing.assert_array_equal(got, np.where(label == 11, 255, label))
    assert ds.num_classes == 11 and ds.classes[0] == "sky"


def test_folder_ids_with_and_without_split_folders(tmp_path):
    write_image(tmp_path / "a" / "images" / "train" / "x.jpg")
    write_label(tmp_path / "a" / "labels" / "train" / "x.png", ramp_label(hi=3))
    ds = FolderDataset(tmp_path / "a", "train", num_classes=3)
    assert len(ds) == 1 and ds.classes == ("class_0", "class_1", "class_2") and len(ds.palette) == 3
    np.testing.assert_array_equal(ds.load(0)[1], ramp_label(hi=3))
    with pytest.raises(InputError, match="found train"):
        FolderDataset(tmp_path / "a", "val", num_classes=3)

    write_image(tmp_path / "b" / "img" / "p.png")
    write_image(tmp_path / "b" / "img" / "q.JPG")
    write_label(tmp_path / "b" / "ann" / "p.png", ramp_label(hi=3))
    write_label(tmp_path / "b" / "ann" / "q.png", ramp_label(hi=3))
    ds = FolderDataset(tmp_path / "b", "val", images="img", labels="ann", classes=["bg", "a", "b"],
                       reduce_zero_label=True)
    assert [s.name for s in ds.samples] == ["p", "q"] and ds.num_classes == 3
    assert set(np.unique(ds.load(1)[1])) == {0, 1, 255}


def test_folder_rgb_palette_mapping(tmp_path):
    palette = [(0, 0, 0), (255, 0, 0), (0, 128, 255)]
    ids = np.array([[0, 1, 2, 9]]).repeat(4, 0).repeat(4, 1)  # 9: a colour not in the palette
    colours = np.array(palette + [(1, 2, 3)], np.uint8)[np.minimum(ids, 3)]
    write_image(tmp_path / "images" / "m.jpg", 4, 16)
    (tmp_path / "labels").mkdir()
    Image.fromarray(colours).save(tmp_path / "labels" / "m.png")
    ds = FolderDataset(tmp_path, "train", label_mode="rgb", palette=palette)
    assert ds.num_classes == 3 and ds.palette == palette
    np.testing.assert_array_equal(ds.load(0)[1], np.where(ids == 9, 255, ids))


# ------------------------------------------------------------------------------------------------- errors
def test_missing_folder_names_it_and_the_layout(tmp_path):
    with pytest.raises(InputError, match=r"(?s)ADEChallengeData.*images.*Expected layout.*annotations"):
        ADE20K(tmp_path / "ADEChallengeData2016", "train")
    with pytest.raises(InputError, match="valannot"):
        (tmp_path / "val").mkdir()
        CamVid(tmp_path, "val")
    with pytest.raises(InputError, match="leftImg8bit"):
        Cityscapes(tmp_path / "nowhere", "train")


def test_image_without_label_names_both(tmp_path):
    make_ade(tmp_path)
    (tmp_path / "annotations" / "training" / "ADE_training_0001.png").unlink()
    with pytest.raises(InputError) as e:
        ADE20K(tmp_path, "train")
    assert "ADE_training_0001.jpg" in str(e.value) and "ADE_training_0001.png" in str(e.value)


def test_unknown_dataset_split_and_missing_arguments(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_dataset("ade20", "train", root=tmp_path)
    assert all(name in str(e.value) for name in DATASETS) and "ade20k" in str(e.value)
    with pytest.raises(ConfigError, match="split"):
        ADE20K(tmp_path, "trian")
    with pytest.raises(ConfigError, match="root"):
        build_dataset("camvid", "train")
    with pytest.raises(ConfigError, match="num_classes"):
        FolderDataset(tmp_path, "train")


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "trainannot").mkdir()
    with pytest.raises(InputError, match="no images"):
        CamVid(tmp_path, "train")


def test_corrupt_files_are_named_by_load(tmp_path):
    make_ade(tmp_path)
    bad_img = tmp_path / "images" / "training" / "ADE_training_0000.jpg"
    bad_img.write_bytes(b"not a jpeg")
    bad_lab = tmp_path / "annotations" / "training" / "ADE_training_0001.png"
    bad_lab.write_bytes(bad_lab.read_bytes()[:20])  # truncated PNG
    ds = ADE20K(tmp_path, "train")  # indexing does not decode
    with pytest.raises(InputError, match="ADE_training_0000.jpg"):
        ds.load(0)
    with pytest.raises(InputError, match="ADE_training_0001.png"):
        ds[1]
    assert ds.load(2)[0].shape == (12, 16, 3)


def test_out_of_range_label_ids_are_named(tmp_path):
    write_image(tmp_path / "train" / "a.png")
    write_label(tmp_path / "trainannot" / "a.png", np.array([[0, 11, 12, 30]]).repeat(12, 0).repeat(4, 1))
    with pytest.raises(InputError) as e:
        CamVid(tmp_path, "train").load(0)
    msg = str(e.value)
    assert "a.png" in msg and "12, 30" in msg and "0..10" in msg and issubclass(InputError, DToPError)


def test_label_size_mismatch_is_named(tmp_path):
    write_image(tmp_path / "train" / "a.png", 12, 16)
    write_label(tmp_path / "trainannot" / "a.png", np.zeros((10, 16), np.uint8))
    with pytest.raises(InputError, match="a.png"):
        CamVid(tmp_path, "train").load(0)


# --------------------------------------------------------------------------------------------- transforms
def striped_pair(h: int = 48, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric label (stripes of widths 3, 5, 7, 9 ...) and an image coloured by it."""
    widths = np.repeat(np.arange(4), [3, 5, 7, 9])
    col = np.resize(widths, w)
    col[: w // 3] = (col[: w // 3] + 1) % 4  # break any periodic symmetry
    label = np.broadcast_to(col, (h, w)).astype(np.int64)
    colours = np.array([[250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0]], np.uint8)
    return colours[label], label


def label_from_pixels(image: torch.Tensor) -> np.ndarray:
    colours = np.array([[250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0]], np.float32)
    d = ((decode(image)[:, :, None, :] - colours) ** 2).sum(-1)
    return d.argmin(-1)


def test_train_transform_shapes_padding_and_ignore():
    image, label = striped_pair(20, 30)
    label[:2] = 255
    t = TrainTransform(crop_size=(32, 40), scale=None, ratio_range=(0.8, 1.2), seed=0)
    for _ in range(5):
        x, y = t(image, label)
        assert x.shape == (3, 32, 40) and x.dtype == torch.float32
        assert y.shape == (32, 40) and y.dtype == torch.int64
        valid = y != 255
        assert set(torch.unique(y[valid]).tolist()) <= {0, 1, 2, 3}
        rows, cols = valid.any(1).nonzero().max() + 1, valid.any(0).nonzero().max() + 1
        assert rows <= 25 and cols <= 36 and (y[rows:] == 255).all() and (y[:, cols:] == 255).all()
        assert (x[:, rows:] == 0).all() and (x[:, :, cols:] == 0).all()  # padded after normalisation
        assert x.min() >= -1 and x.max() <= 1
    a, b = TrainTransform((16, 16), seed=3)(image, label), TrainTransform((16, 16), seed=3)(image, label)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_train_transform_scale_fits_image_in_scale_times_ratio():
    image, label = striped_pair(40, 80)
    t = TrainTransform(crop_size=(200, 200), scale=(100, 30), ratio_range=(2.0, 2.0), cat_max_ratio=1.0,
                       photometric=False, seed=0)
    _, y = t(image, label)
    valid = y != 255
    assert valid.any(1).sum() == 60 and valid.any(0).sum() == 120  # fits (200, 60): factor 1.5


def test_cat_max_ratio_is_respected_where_possible():
    label = np.zeros((20, 40), np.int64)
    label[:, 28:] = 1  # only crops with x0 in 14..20 have < 75% of one class (7 of 21 offsets)
    image = np.zeros((20, 40, 3), np.uint8)

    def compliant(ratio: float) -> int:
        t = TrainTransform((20, 20), scale=None, ratio_range=None, cat_max_ratio=ratio, flip_prob=0,
                           photometric=False, seed=0)
        ok = 0
        for _ in range(100):
            _, y = t(image, label)
            counts = torch.bincount(y.flatten(), minlength=2)
            ok += int(counts.max() < 0.75 * counts.sum())
        return ok

    assert compliant(0.75) > 85 and compliant(1.0) < 55


def test_cat_max_ratio_ignores_ignored_pixels():
    label = np.full((20, 40), 255, np.int64)
    label[:, 20:34], label[:, 34:] = 0, 1  # compliant crops (ignore not counted): x0 in {19, 20} only
    t = TrainTransform((20, 20), scale=None, ratio_range=None, flip_prob=0, photometric=False, seed=0)
    ignored = [float((t(np.zeros((20, 40, 3), np.uint8), label)[1] == 255).float().mean()) for _ in range(100)]
    # counting 255 as a class would favour half-ignored crops (x0 in 6..14) instead
    assert np.mean(np.asarray(ignored) > 0.25) < 0.5


def test_flip_keeps_image_and_label_aligned():
    image, label = striped_pair()
    flip = TrainTransform((48, 64), scale=None, ratio_range=None, flip_prob=1.0, photometric=False, seed=0)
    x, y = flip(image, label)
    np.testing.assert_array_equal(y.numpy(), label[:, ::-1])
    np.testing.assert_array_equal(label_from_pixels(x), y.numpy())
    rnd = TrainTransform((32, 32), scale=None, ratio_range=(0.75, 1.5), cat_max_ratio=1.0, photometric=False,
                         seed=1)
    for _ in range(12):
        x, y = rnd(image, label)
        valid = (y != 255).numpy()
        assert (label_from_pixels(x)[valid] == y.numpy()[valid]).mean() > 0.9  # resize blurs stripe edges


def test_photometric_changes_colours_not_labels():
    image, label = striped_pair()
    plain = TrainTransform((48, 64), scale=None, ratio_range=None, flip_prob=0, photometric=False, seed=0)
    photo = TrainTransform((48, 64), scale=None, ratio_range=None, flip_prob=0, photometric=True, seed=0)
    changed = 0
    for _ in range(6):
        (xa, ya), (xb, yb) = plain(image, label), photo(image, label)
        assert torch.equal(ya, yb)
        changed += int(not torch.allclose(xa, xb))
    assert changed >= 3


def test_eval_transform_keeps_label_size():
    image, label = striped_pair(40, 80)
    x, y = EvalTransform(scale=(64, 32))(image, label)
    assert tuple(x.shape[1:]) == (32, 64) and tuple(y.shape) == (40, 80) and y.dtype == torch.int64
    x, y = EvalTransform()(image, label)
    assert tuple(x.shape) == (3, 40, 80) and torch.equal(y, torch.from_numpy(label))
    np.testing.assert_allclose(decode(x), image, atol=1e-3)


class _Same(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform
        self.image, self.label = striped_pair()

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.transform(self.image, self.label)[1]


def test_train_transform_draws_differently_in_workers():
    torch.manual_seed(0)
    t = TrainTransform((16, 16), scale=None, ratio_range=(0.5, 2.0), cat_max_ratio=1.0, photometric=False)
    loader = torch.utils.data.DataLoader(_Same(t), batch_size=2, num_workers=2)
    a, b = list(loader)
    assert not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_varied():
    ds = SyntheticScenes(4, size=(64, 96), seed=5)
    a, b = ds.load(2), SyntheticScenes(4, size=(64, 96), seed=5).load(2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(ds.load(1)[0], a[0])
    assert not np.array_equal(SyntheticScenes(4, size=(64, 96), seed=5, split="val").load(2)[0], a[0])
    assert a[0].shape == (64, 96, 3) and a[0].dtype == np.uint8 and a[1].dtype == np.int64
    item = ds[0]
    assert item["image"].shape == (3, 64, 96) and item["label"].shape == (64, 96)
    assert isinstance(build_dataset("synthetic", "train", num_images=2), SyntheticScenes)
    with pytest.raises(IndexError):
        ds.load(4)


def test_synthetic_has_all_classes_large_regions_and_small_objects():
    ds = SyntheticScenes(6)
    seen = set()
    for i in range(len(ds)):
        image, label = ds.load(i)
        assert image.shape == (128, 192, 3)
        share = np.bincount(label.ravel(), minlength=8) / label.size
        seen |= set(np.flatnonzero(share).tolist())
        assert share[SKY] > 0.05 and share[ROAD] > 0.1 and share.max() > 0.2  # large easy regions
        assert share[POLE] < 0.03 and share[PERSON] < 0.03  # small hard objects
        poles = label == POLE
        if poles.any():  # thin: a few pixels per row (arms aside), several poles at most
            widths = poles.sum(1)
            assert np.median(widths[widths > 0]) <= 8
        assert image.reshape(-1, 3).std(0).min() > 10  # not flat colours
    assert seen == set(range(8))


def test_synthetic_is_fast():
    import time
    ds = SyntheticScenes(20)
    t = time.perf_counter()
    for i in range(20):
        ds.load(i)
    assert (time.perf_counter() - t) / 20 < 0.02  # < 5 ms when the machine is idle


# ----------------------------------------------------------------------------------------------- CamVid
@pytest.mark.skipif(not CAMVID.is_dir(), reason="shared CamVid data not present")
def test_real_camvid():
    train, val = CamVid(CAMVID, "train"), build_dataset("camvid", "val", root=CAMVID)
    assert len(train) == 367 and len(val) == 101
    for ds in (train, val):
        for s in ds.samples:
            label = ds.map_label(ds.read_label(s.label))
            ids = set(np.unique(label).tolist())
            assert ids <= set(range(11)) | {255}, (s.label, ids)
    image, label = val.load(0)
    assert image.shape == (360, 480, 3) and label.shape == (360, 480)
    item = CamVid(CAMVID, "train", transform=TrainTransform((240, 320), scale=None, seed=0))[0]
    assert item["image"].shape == (3, 240, 320) and item["label"].shape == (240, 320)


def test_train_crops_are_padded_to_whole_patches():
    """A 240 x 320 crop for a patch-14 backbone is padded to 252 x 322 (ignore labels, zero image)."""
    from dtop.data import TrainTransform

    t = TrainTransform(crop_size=(240, 320), scale=None, ratio_range=None, photometric=False, flip_prob=0.0, seed=0)
    t.size_divisor = 14
    rgb = np.full((240, 320, 3), 200, np.uint8)
    label = np.ones((240, 320), np.int64)
    image, lab = t(rgb, label)
    assert image.shape == (3, 252, 322) and lab.shape == (252, 322)
    assert (lab[240:] == 255).all() and (lab[:, 320:] == 255).all() and (lab[:240, :320] == 1).all()
    assert (image[:, 240:] == 0).all() and (image[:, :240, :320] != 0).all()


def test_normalisation_defaults_to_the_backbones_own():
    from dtop.config import load_config
    from dtop.engine.common import normalisation

    dinov2 = load_config(sets=["model.preset=segvit_dinov2_s14"])
    assert normalisation(dinov2) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert normalisation(load_config(sets=["model.preset=segvit_vit_t16"])) == ((0.5,) * 3, (0.5,) * 3)
    swapped = load_config(sets=["model.preset=segvit_vit_t16", "model.overrides={backbone: vit_small_patch14_dinov2}"])
    assert normalisation(swapped)[0] == (0.485, 0.456, 0.406)
    explicit = load_config(sets=["model.preset=segvit_dinov2_s14", "data.mean=[0.5, 0.5, 0.5]"])
    assert normalisation(explicit) == ((0.5,) * 3, (0.229, 0.224, 0.225))
