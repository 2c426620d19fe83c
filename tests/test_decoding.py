"""Images decoded as a viewer shows them, and label files read exactly in every mode users save."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_model
from dtop.apps.bench import load_images
from dtop.apps.predict import predict_paths
from dtop.data import FolderDataset, read_label_ids, read_label_rgb
from dtop.data.datasets import read_image  # the case scripts import it from here
from dtop.data.images import to_rgb
from dtop.errors import InputError

H, W = 64, 96
ORIENTATION = 0x0112


def displayed_picture() -> np.ndarray:
    """(H, W, 3): sky on top, road at the bottom, a tree on the left edge (no symmetry)."""
    img = np.zeros((H, W, 3), np.uint8)
    img[: H // 3] = (120, 170, 235)
    img[H // 3: 2 * H // 3] = (150, 90, 60)
    img[2 * H // 3:] = (90, 90, 90)
    img[:, : W // 8] = (30, 140, 30)
    return img


def save_sideways(shown: Image.Image, path, orientation=6, transpose=Image.Transpose.ROTATE_90) -> None:
    """Store ``shown`` turned so that EXIF ``orientation`` turns it back (as phones save portrait shots)."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    shown.transpose(transpose).save(path, exif=exif.tobytes())


# ------------------------------------------------------------------------------------------------ EXIF
@pytest.mark.parametrize("orientation,transpose", [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270),
                                                   (3, Image.Transpose.ROTATE_180),
                                                   (2, Image.Transpose.FLIP_LEFT_RIGHT)])
def test_read_image_applies_exif_orientation(tmp_path, orientation, transpose):
    shown = displayed_picture()
    save_sideways(Image.fromarray(shown), tmp_path / "photo.png", orientation, transpose)
    assert Image.open(tmp_path / "photo.png").size != (W, H) or orientation in (2, 3)  # stored differently
    np.testing.assert_array_equal(read_image(tmp_path / "photo.png"), shown)


def test_exif_rotated_jpeg_pairs_with_its_label_and_predicts_at_displayed_size(tmp_path):
    shown = displayed_picture()
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    save_sideways(Image.fromarray(shown), tmp_path / "images" / "photo.jpg")
    label = np.zeros((H, W), np.uint8)
    label[2 * H // 3:] = 2
    Image.fromarray(label).save(tmp_path / "labels" / "photo.png")
    image, lab = FolderDataset(tmp_path, num_classes=3).load(0)
    assert image.shape == (H, W, 3) and lab.shape == (H, W)
    assert np.abs(image[H - 2, W // 2].astype(int) - (90, 90, 90)).max() < 12  # the road is at the bottom
    model = tiny_model(("linear", "linear", "linear"))
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model": model.state_dict(), "model_config": model.cfg.to_dict()}, ckpt)
    result = predict_paths(str(ckpt), [str(tmp_path / "images" / "photo.jpg")], tmp_path / "out", device="cpu")
    assert (result["images"][0]["width"], result["images"][0]["height"]) == (W, H)
    for suffix in ("seg", "overlay"):
        assert Image.open(tmp_path / "out" / f"photo_{suffix}.png").size == (W, H)


def test_bench_reads_images_as_displayed(tmp_path):
    shown = displayed_picture()
    save_sideways(Image.fromarray(shown), tmp_path / "photo.png")
    x = load_images(str(tmp_path), (H, W), 1, mean=(0,) * 3, std=(1 / 255,) * 3)
    assert x.shape == (1, 3, H, W)
    top, bottom = x[0, :, 2, W // 2].tolist(), x[0, :, H - 2, W // 2].tolist()
    assert top == pytest.approx([120, 170, 235], abs=2) and bottom == pytest.approx([90, 90, 90], abs=2)


# ------------------------------------------------------------------------------------------------ image modes
def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32768, 65535]], np.uint16)
    want = np.array([[0, 1, 4, 128, 255]], np.uint8)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    got = read_image(tmp_path / "g16.png")
    assert got.shape == (1, 5, 3) and (got == want[..., None]).all()
    big_endian = Image.fromarray(values.astype(">u2"))
    assert big_endian.mode == "I;16B" and (to_rgb(big_endian)[..., 0] == want).all()
    (tmp_path / "g16.pgm").write_bytes(b"P5 5 1 65535\n" + values.astype(">u2").tobytes())  # opens as mode I
    assert Image.open(tmp_path / "g16.pgm").mode == "I" and (read_image(tmp_path / "g16.pgm")[..., 0] == want).all()


def test_float_grey_is_read_as_zero_to_one():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert f.mode == "F" and to_rgb(f)[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode,values", [("F", [0.0, 3.5]), ("F", [0.0, np.nan]), ("I", [0, 70000]), ("I", [-5, 10])])
def test_grey_outside_its_display_range_is_refused(mode, values):
    im = Image.fromarray(np.array([values], np.float32 if mode == "F" else np.int32))
    assert im.mode == mode
    with pytest.raises(InputError, match=f"mode {mode}"):
        to_rgb(im, "x.tif")


def test_alpha_is_dropped_not_composited():
    rgba = Image.fromarray(np.array([[[200, 100, 50, 0], [10, 20, 30, 255]]], np.uint8))
    assert to_rgb(rgba).tolist() == [[[200, 100, 50], [10, 20, 30]]]
    assert to_rgb(Image.new("LA", (1, 1), (77, 0))).tolist() == [[[77, 77, 77]]]
    p = Image.new("P", (1, 1), 1)
    p.putpalette([0, 0, 0, 9, 8, 7])
    p.info["transparency"] = 1
    assert to_rgb(p).tolist() == [[[9, 8, 7]]]
    pa = Image.new("PA", (1, 1), (1, 0))
    pa.putpalette([0, 0, 0, 9, 8, 7])
    assert to_rgb(pa).tolist() == [[[9, 8, 7]]]


def test_palette_cmyk_one_bit_and_lab_images(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 255, 0, 0])
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").tolist() == [[[0, 0, 0], [255, 0, 0]]]
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    assert to_rgb(one)[0, :, 0].tolist() == [0, 255]
    Image.new("CMYK", (1, 1), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    assert np.abs(read_image(tmp_path / "c.jpg")[0, 0].astype(int) - (255, 0, 0)).max() < 8
    red = to_rgb(Image.new("LAB", (1, 1), (136, 208, 195)))[0, 0]  # sRGB red in CIE L*a*b*
    assert red[0] > 230 and red[1] < 30 and red[2] < 30


def test_unknown_mode_names_the_mode():
    class Odd:
        mode = "XYZ;12"
    with pytest.raises(InputError, match="XYZ;12"):
        to_rgb(Odd(), "odd.tif")


# ------------------------------------------------------------------------------------------------ labels
def test_class_ids_are_read_exactly_from_every_id_mode(tmp_path):
    ids = np.array([[0, 1, 2, 255]], np.uint8)
    Image.fromarray(ids).save(tmp_path / "l.png")
    p = Image.fromarray(ids, mode="L").convert("P")  # palette index = id, whatever the palette's colours
    p.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
    p.save(tmp_path / "p.png")
    one = Image.new("1", (4, 1))
    one.putpixel((2, 0), 1)
    one.save(tmp_path / "one.png")
    Image.fromarray(np.array([[0, 1, 300, 846]], np.uint16)).save(tmp_path / "i16.png")
    Image.fromarray(np.stack([ids, np.full_like(ids, 255)], -1), mode="LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "p.png").mode == "P" and Image.open(tmp_path / "la.png").mode == "LA"
    assert read_label_ids(tmp_path / "l.png").tolist() == [[0, 1, 2, 255]]
    assert read_label_ids(tmp_path / "p.png").tolist() == [[0, 1, 2, 255]]
    assert read_label_ids(tmp_path / "one.png").tolist() == [[0, 0, 1, 0]]
    assert read_label_ids(tmp_path / "i16.png").tolist() == [[0, 1, 300, 846]]
    assert read_label_ids(tmp_path / "la.png").tolist() == [[0, 1, 2, 255]]
    assert read_label_ids(tmp_path / "l.png").dtype == np.int64


def test_ambiguous_labels_are_refused_with_the_mode_and_label_mode(tmp_path):
    Image.fromarray(np.array([[[255, 0, 0], [0, 0, 0]]], np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(InputError, match=r"mode RGB.*label_mode='rgb'"):
        read_label_ids(tmp_path / "colour.png")
    la = np.array([[[1, 255], [2, 0]]], np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    for read in (read_label_ids, lambda p: read_label_rgb(p, [(1, 1, 1), (2, 2, 2)])):
        with pytest.raises(InputError, match=r"mode LA.*not fully opaque.*label_mode"):
            read(tmp_path / "la.png")
    Image.fromarray(np.array([[0.0, 1.0]], np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(InputError, match=r"float \(mode F\).*label_mode"):
        read_label_ids(tmp_path / "f.tif")


def test_colour_masks_map_palette_files_through_their_own_palette(tmp_path):
    pal = [(0, 0, 100), (255, 0, 0), (0, 255, 0)]
    ids = np.array([[0, 1, 2, 1]])
    for name, order in (("a", [0, 1, 2]), ("b", [2, 0, 1])):  # same colours, palette order differs per file
        p = Image.fromarray(np.argsort(order)[ids].astype(np.uint8), mode="L").convert("P")
        p.putpalette([c for k in order for c in pal[k]])
        p.save(tmp_path / f"{name}.png")
        assert read_label_rgb(tmp_path / f"{name}.png", pal).tolist() == ids.tolist()
    rgb = np.asarray(pal, np.uint8)[ids]
    Image.fromarray(np.concatenate([rgb, np.full(ids.shape + (1,), 255, np.uint8)], -1)).save(tmp_path / "rgba.png")
    assert read_label_rgb(tmp_path / "rgba.png", pal).tolist() == ids.tolist()
    Image.fromarray(np.array([[9, 9, 9]], np.uint8)[None].repeat(2, 1)).save(tmp_path / "void.png")
    assert read_label_rgb(tmp_path / "void.png", pal).tolist() == [[255, 255]]  # other colours -> ignore


def test_greyscale_label_with_label_mode_rgb(tmp_path):
    Image.fromarray(np.array([[0, 255, 0]], np.uint8)).save(tmp_path / "bw.png")
    assert read_label_rgb(tmp_path / "bw.png", [(0, 0, 0), (255, 255, 255)]).tolist() == [[0, 1, 0]]
    Image.fromarray(np.array([[0, 1, 2]], np.uint8)).save(tmp_path / "ids.png")
    with pytest.raises(InputError, match=r"greyscale.*label_mode='ids'"):
        read_label_rgb(tmp_path / "ids.png", [(0, 0, 0), (255, 255, 255)])


def test_folder_dataset_rgb_mode_reads_palette_files_by_colour(tmp_path):
    pal = [(0, 0, 100), (255, 0, 0)]
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    p = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="L").convert("P")
    p.putpalette([255, 0, 0, 0, 0, 100])  # index 0 is red = class 1
    p.save(tmp_path / "labels" / "a.png")
    _, lab = FolderDataset(tmp_path, label_mode="rgb", palette=pal).load(0)
    assert lab.tolist() == [[1, 0], [0, 1]]
    _, lab = FolderDataset(tmp_path, label_mode="ids", num_classes=2).load(0)
    assert lab.tolist() == [[0, 1], [1, 0]]  # ids mode: the palette index


def test_label_with_exif_orientation_is_turned_like_its_image(tmp_path):
    label = np.zeros((H, W), np.uint8)
    label[:, : W // 8] = 1
    save_sideways(Image.fromarray(label), tmp_path / "lab.png")
    np.testing.assert_array_equal(read_label_ids(tmp_path / "lab.png"), label)


# ------------------------------------------------------------------------------- held-back inputs of kinds 2-3
def write_png16(path, samples: np.ndarray) -> None:
    """A 16-bit-per-sample PNG from uint16 (H, W, C): C = 2 grey+alpha, 3 RGB, 4 RGBA (Pillow cannot write
    these; GIMP, OpenCV and scanners do)."""
    import struct
    import zlib

    h, w, c = samples.shape
    colour_type = {2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("orientation,transpose", [(5, Image.Transpose.TRANSPOSE), (7, Image.Transpose.TRANSVERSE),
                                                   (4, Image.Transpose.FLIP_TOP_BOTTOM)])
@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_exif_orientation_of_png_and_webp_files_is_applied(tmp_path, orientation, transpose, suffix):
    shown = displayed_picture()
    path = tmp_path / f"photo{suffix}"
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(shown).transpose(transpose).save(path, exif=exif.tobytes(), lossless=True)
    np.testing.assert_array_equal(read_image(path), shown)


def test_sixteen_bit_colour_and_grey_alpha_labels_are_refused_not_cut_to_their_high_byte(tmp_path):
    ids = np.array([[0, 1], [2, 300]], np.uint16)  # Pillow would read 0, 0, 0, 1
    write_png16(tmp_path / "la16.png", np.stack([ids, np.full_like(ids, 65535)], -1))
    write_png16(tmp_path / "rgb16.png", np.repeat(ids[..., None], 3, -1))
    assert Image.open(tmp_path / "la16.png").mode == "RGBA" and Image.open(tmp_path / "rgb16.png").mode == "RGB"
    with pytest.raises(InputError, match=r"la16.png stores 16-bit samples \(LA;16B: 16-bit grey\+alpha\).*I;16"):
        read_label_ids(tmp_path / "la16.png")
    with pytest.raises(InputError, match=r"rgb16.png stores 16-bit samples \(RGB;16B"):
        read_label_ids(tmp_path / "rgb16.png")
    colours = np.array([[[65535, 0, 0], [0, 0, 25700]]], np.uint16)  # 16-bit colour masks keep their colours
    write_png16(tmp_path / "mask16.png", colours)
    assert read_label_rgb(tmp_path / "mask16.png", [(0, 0, 100), (255, 0, 0)]).tolist() == [[1, 0]]
    assert read_image(tmp_path / "mask16.png")[0].tolist() == [[255, 0, 0], [0, 0, 100]]  # images: scaled, kept


def test_palette_image_with_per_index_transparency_decodes_without_a_pillow_warning(tmp_path, recwarn):
    rgb = displayed_picture()
    p = Image.fromarray(rgb).quantize(8)
    p.save(tmp_path / "p.png", transparency=bytes([0, 128] + [255] * 6))
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), np.asarray(p.convert("RGBA"))[..., :3])
    assert not [w for w in recwarn if "Palette images with Transparency" in str(w.message)]


def test_colours_missing_from_the_palette_are_reported_once(tmp_path, monkeypatch):
    from dtop.data import labels

    monkeypatch.setattr(labels, "_WARNED_PALETTES", set())
    pal = [(1, 2, 3), (200, 0, 0), (0, 200, 0)]
    rgb = np.asarray(pal, np.uint8)[np.array([[0, 1, 2, 2]])]
    rgb[0, 3] = (0, 0, 200)  # a class the palette forgot
    Image.fromarray(rgb).save(tmp_path / "a.png")
    with pytest.warns(UserWarning, match=r"1 of 4 pixels .* \(0, 0, 200\) x 1.*ignore id 255.*data.options.palette"):
        assert read_label_rgb(tmp_path / "a.png", pal).tolist() == [[0, 1, 2, 255]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="FolderDataset: .* has no split folders")  # not this test's
        read_label_rgb(tmp_path / "a.png", pal)  # once per palette
        # reduce_zero_label drops stored id 0's colour on purpose: not reported
        (tmp_path / "images").mkdir()
        (tmp_path / "labels").mkdir()
        Image.fromarray(np.zeros((1, 3, 3), np.uint8)).save(tmp_path / "images" / "b.png")
        Image.fromarray(rgb[:, :3]).save(tmp_path / "labels" / "b.png")
        ds = FolderDataset(tmp_path, label_mode="rgb", palette=pal, reduce_zero_label=True)
        assert ds.load(0)[1].tolist() == [[255, 0, 1]]
