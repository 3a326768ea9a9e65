"""Loading every supported image flavour to one 2D channel, label maps, median filtering, consistent predictions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImage, LoadImaged, MedianSmoothd
from monai.utils import convert_to_dst_type
from PIL import Image

from scripts.io import BundleImageReader
from scripts.transforms import (
    LesionLabelMapd,
    LoadLesionLabeld,
    RandDepthAttenuationd,
    RandLesionFreeCropd,
    RandLesionZoomd,
    RandSpeckleNoised,
    SingleChannel2Dd,
    decide_class,
    pil_to_supported_mode,
    to_single_channel_2d,
)

from .conftest import BUNDLE_ROOT

H, W = 24, 32


@pytest.fixture
def grey() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (H, W), dtype=np.uint8)


def _load(path) -> torch.Tensor:
    load = LoadImaged("image", reader=BundleImageReader(), image_only=True, ensure_channel_first=True)
    data = load({"image": str(path)})
    return SingleChannel2Dd("image")(data)["image"]


def _save_variants(grey: np.ndarray, folder) -> dict[str, object]:
    rgb = np.stack([grey] * 3, -1)
    paths = {
        "grey.png": Image.fromarray(grey),
        "rgb.png": Image.fromarray(rgb),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((H, W), 128, np.uint8)])),
        "grey16.png": Image.fromarray(grey.astype(np.uint16) * 257),
        "palette.png": Image.fromarray(rgb).quantize(colors=256),
        "grey.bmp": Image.fromarray(grey),
        "grey alpha (1).png": Image.fromarray(np.dstack([grey, np.full((H, W), 255, np.uint8)]), mode="LA"),
    }
    for name, image in paths.items():
        image.save(folder / name)
    return paths


def test_every_png_flavour_becomes_one_channel_in_monai_axis_order(tmp_path, grey):
    _save_variants(grey, tmp_path)
    for name in ("grey.png", "rgb.png", "rgba.png", "grey.bmp", "grey alpha (1).png"):
        img = _load(tmp_path / name)
        assert img.shape == (1, W, H), name  # MONAI's PIL reader puts the image's x axis first
        np.testing.assert_allclose(img[0].numpy().T, grey, atol=1, err_msg=name)
    sixteen = _load(tmp_path / "grey16.png")
    np.testing.assert_allclose(sixteen[0].numpy().T, grey.astype(np.float32) * 257)
    palette = _load(tmp_path / "palette.png")
    assert palette.shape == (1, W, H)
    assert np.corrcoef(palette[0].numpy().T.ravel(), grey.ravel())[0, 1] > 0.95  # palette indices would not be


def test_jpeg_loads(tmp_path, grey):
    Image.fromarray(grey).save(tmp_path / "x.jpg", quality=95)
    img = _load(tmp_path / "x.jpg")
    assert img.shape == (1, W, H) and abs(float(img.mean()) - grey.mean()) < 2


def test_single_slice_volumes(tmp_path, grey):
    import itk
    import nibabel as nib

    volume = grey.T[:, :, None].astype(np.int16)  # (X, Y, 1)
    nib.save(nib.Nifti1Image(volume, np.diag([0.1, 0.1, 1.0, 1.0])), tmp_path / "slice.nii.gz")
    itk.imwrite(itk.image_from_array(grey[None].astype(np.int16)), str(tmp_path / "slice.nrrd"))
    for name in ("slice.nii.gz", "slice.nrrd"):
        img = _load(tmp_path / name)
        assert img.shape == (1, W, H), name
        np.testing.assert_allclose(img[0].numpy().T, grey, err_msg=name)


def test_cine_keeps_first_frame_and_rejects_bad_shapes():
    frames = torch.arange(2 * 4 * 5 * 3, dtype=torch.float32).reshape(1, 4, 5, 6)
    np.testing.assert_array_equal(to_single_channel_2d(frames), frames[..., 0])
    with pytest.raises(ValueError, match="cannot reduce 5 channels"):
        to_single_channel_2d(torch.zeros(5, 4, 4), source="odd.png")
    with pytest.raises(ValueError, match="tiny.png"):
        to_single_channel_2d(torch.zeros(1, 4), source="tiny.png")


def test_palette_and_bilevel_modes_convert():
    palette = Image.fromarray(np.zeros((4, 4, 3), np.uint8)).quantize(colors=4)
    assert pil_to_supported_mode(palette).mode == "RGB"
    assert pil_to_supported_mode(Image.new("1", (4, 4))).mode == "L"
    sixteen = Image.fromarray(np.zeros((4, 4), np.uint16))
    assert pil_to_supported_mode(sixteen).mode == sixteen.mode


def _mask(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return str(path)


def _label_transform():
    return LoadLesionLabeld(loader=LoadImage(reader=BundleImageReader(), image_only=True, ensure_channel_first=True))


def test_masks_are_merged_and_class_coded(tmp_path, grey):
    Image.fromarray(grey).save(tmp_path / "benign (1).png")
    first = np.zeros((H, W), np.uint8)
    first[2:6, 2:6] = 255
    second = np.zeros((H, W, 4), np.uint8)  # RGBA 0/255 with opaque alpha everywhere, as some BUSI masks
    second[..., 3] = 255
    second[10:12, 20:25, :3] = 255
    binary = np.zeros((H, W), np.uint8)
    binary[15:17, 3:5] = 1
    masks = [
        _mask(tmp_path / "benign (1)_mask.png", first),
        _mask(tmp_path / "benign (1)_mask_1.png", second, "RGBA"),
        _mask(tmp_path / "benign (1)_mask_2.png", binary),
    ]
    data = LoadImaged("image", reader=BundleImageReader(), image_only=True, ensure_channel_first=True)(
        {"image": str(tmp_path / "benign (1).png"), "masks": masks, "class": 2}
    )
    label = _label_transform()(SingleChannel2Dd("image")(data))["label"]
    expected = ((first > 0) | (second[..., 0] > 0) | (binary > 0)).astype(np.uint8) * 2
    assert label.shape == (1, W, H) and label.dtype == torch.uint8
    np.testing.assert_array_equal(label[0].numpy().T, expected)

    normal = _label_transform()({**data, "class": 0})["label"]
    assert int(normal.max()) == 0


def test_label_map_entries_and_their_errors(tmp_path, grey):
    Image.fromarray(grey).save(tmp_path / "img.png")
    label_map = np.zeros((H, W), np.uint8)
    label_map[3:7, 4:9] = 1
    loader = LoadImaged("image", reader=BundleImageReader(), image_only=True, ensure_channel_first=True)
    data = loader({"image": str(tmp_path / "img.png"), "label": _mask(tmp_path / "lab.png", label_map)})
    label = _label_transform()(data)["label"]
    np.testing.assert_array_equal(label[0].numpy().T, label_map)

    bad_values = loader({"image": str(tmp_path / "img.png"), "label": _mask(tmp_path / "lab255.png", label_map * 255)})
    with pytest.raises(ValueError, match="lab255.png.*0..2"):
        _label_transform()(bad_values)

    small = loader({"image": str(tmp_path / "img.png"), "masks": [_mask(tmp_path / "small mask.png", label_map[:10])],
                    "class": 1})
    with pytest.raises(ValueError, match="small mask.png.*differs"):
        _label_transform()(small)


def _inference_preprocessing(median_radius: int) -> list:
    """The transforms of inference.json's ``preprocessing``, with ``median_radius`` set."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser["median_radius"] = median_radius
    return parser.get_parsed_content("preprocessing").transforms


@pytest.mark.parametrize("median_radius", [1, 0])
def test_preprocessing_median_filters_as_opencv_3x3_or_not_at_all(tmp_path, median_radius):
    """``median_radius`` 1: the configs' speckle reduction is OpenCV's 3 x 3 median (the filter of the shipped
    weights' training); 0: the image passes that step unchanged."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 80), dtype=np.uint8)).save(tmp_path / "img.png")
    transforms = _inference_preprocessing(median_radius)
    position = next(k for k, t in enumerate(transforms) if isinstance(t, MedianSmoothd))
    before, after = Compose(transforms[:position]), Compose(transforms[position + 1:])
    resized = before({"image": str(tmp_path / "img.png")})
    plane = resized["image"][0].numpy().astype(np.float32)
    filtered = cv2.medianBlur(plane, 3) if median_radius else plane
    assert median_radius == 0 or not np.array_equal(filtered, plane)
    expected = after({**resized, "image": convert_to_dst_type(filtered[None], resized["image"])[0]})["image"]
    found = Compose(transforms)({"image": str(tmp_path / "img.png")})["image"]
    torch.testing.assert_close(found, expected, rtol=0, atol=0)


@pytest.mark.parametrize("scan_threshold", [0.04, 0.0], ids=["crop", "off"])
def test_black_display_margins_are_cropped_before_the_resize_and_restored_on_the_map(tmp_path, scan_threshold):
    """An export with black margins around the scan reaches the network as the scan alone; the inverted map has the
    export's size, empty over the margins. ``scan_threshold`` 0 turns the crop off."""
    scan = np.random.default_rng(0).integers(20, 256, (96, 80), dtype=np.uint8)
    Image.fromarray(scan).save(tmp_path / "scan.png")
    Image.fromarray(np.pad(scan, ((20, 12), (16, 16)))).save(tmp_path / "export.png")
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser["scan_threshold"] = scan_threshold
    preprocessing = parser.get_parsed_content("preprocessing")
    alone, export = (preprocessing({"image": str(tmp_path / name)}) for name in ("scan.png", "export.png"))
    assert torch.equal(alone["image"], export["image"]) is bool(scan_threshold)
    export["pred"] = MetaTensor(torch.ones(1, *export["image"].shape[1:]), meta=export["image"].meta,
                                applied_operations=export["image"].applied_operations)  # fmt: skip
    inverted = Invertd("pred", preprocessing, orig_keys="image", nearest_interp=True)(export)["pred"]
    assert tuple(inverted.shape[1:]) == (80 + 32, 96 + 32)  # the export's size (PNGs load as width x height)
    inside = inverted[0, 16:-16, 20:-12]
    assert bool(inside.bool().all()) and int(inverted.sum()) == (inside.numel() if scan_threshold else inverted.numel())


def test_predicted_map_agrees_with_predicted_class():
    seg = torch.zeros(3, 4, 4)
    seg[0] = 1.0
    seg[0, 1:3, 1:3], seg[1, 1:3, 1:3] = 0.2, 0.8  # a lesion in the middle
    transform = LesionLabelMapd()
    malignant = transform({"pred": seg, "cls": torch.tensor([0.1, 0.2, 0.7])})
    assert malignant["seg_pred"].unique().tolist() == [0, 2] and int(malignant["cls_pred"]) == 2
    assert int((malignant["seg_pred"] > 0).sum()) == 4
    normal = transform({"pred": seg, "cls": torch.tensor([0.6, 0.3, 0.1])})
    assert int(normal["seg_pred"].max()) == 0 and int(normal["cls_pred"]) == 0


def test_speckle_noise_is_multiplicative_and_seeded():
    image = torch.zeros(1, 32, 24)
    image[:, :, 12:] = 0.8
    speckle = RandSpeckleNoised("image", prob=1.0, std=(0.2, 0.2), grain=(1.0, 1.0))
    speckle.set_random_state(0)
    first = speckle({"image": image})["image"]
    assert first.shape == image.shape
    assert torch.equal(first[:, :, :12], image[:, :, :12]), "black stays black: the noise scales the echo"
    assert 0.1 < float((first[:, :, 12:] / 0.8).std()) < 0.3
    assert float(first.min()) >= 0.0
    speckle.set_random_state(0)
    assert torch.equal(speckle({"image": image})["image"], first)
    assert torch.equal(RandSpeckleNoised("image", prob=0.0)({"image": image})["image"], image)


def test_depth_attenuation_darkens_with_depth():
    image = torch.ones(1, 20, 50)  # (1, X, Y): Y is depth
    attenuate = RandDepthAttenuationd("image", prob=1.0, attenuation=(1.0, 1.0))
    out = attenuate({"image": image})["image"]
    torch.testing.assert_close(out[0, :, 0], torch.ones(20))
    torch.testing.assert_close(out[0, :, -1], torch.full((20,), float(np.exp(-1.0))))
    assert torch.all(out[0, 0, 1:] < out[0, 0, :-1]), "monotone in depth"
    assert torch.equal(out[0, 0], out[0, -1]), "constant across the width"


def _coordinates(shape: tuple[int, int]) -> torch.Tensor:
    """A ``(1, X, Y)`` image whose pixels are their own flat index, to see where a crop came from."""
    return torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(1, *shape)


def _source_window(cropped: torch.Tensor, width: int) -> tuple[slice, slice]:
    """Where a crop ``(X', Y')`` of :func:`_coordinates` of ``width`` columns was cut from."""
    first, (rows, cols) = int(cropped[0, 0]), cropped.shape
    return slice(first // width, first // width + rows), slice(first % width, first % width + cols)


@pytest.mark.parametrize("box", [(30, 34, 50, 57), (0, 3, 0, 4), (5, 75, 10, 20), (0, 80, 0, 120)])
def test_lesion_zoom_keeps_the_whole_lesion_in_a_window_of_the_image_aspect(box):
    x0, x1, y0, y1 = box
    label = torch.zeros(1, 80, 120, dtype=torch.uint8)
    label[0, x0:x1, y0:y1] = 2
    image = _coordinates((80, 120))
    zoom = RandLesionZoomd(["image", "label"], prob=1.0, margin=(1.5, 4.0), min_fraction=0.3)
    zoom.set_random_state(0)
    for _ in range(20):
        out = zoom({"image": image, "label": label})
        cropped, lesion = out["image"][0], out["label"]
        assert int(lesion.sum()) == int(label.sum()), "every lesion pixel stays in the window"
        rows, cols = cropped.shape
        assert 0.3 * 80 - 1 <= rows <= 80 and 0.3 * 120 - 1 <= cols <= 120
        assert abs(rows / cols - 80 / 120) < 0.05, "the window keeps the image's aspect"
        window = _source_window(cropped, 120)
        assert torch.equal(cropped, image[0][window]), "image and label are cut from the same window"
        assert torch.equal(lesion[0].bool(), (label[0] > 0)[window])
    if (x1 - x0, y1 - y0) == (80, 120):
        assert out["image"].shape == image.shape, "a lesion filling the image leaves nothing to zoom"


def test_lesion_zoom_varies_the_window_of_normal_images_and_is_seeded():
    label, image = torch.zeros(1, 60, 90, dtype=torch.uint8), _coordinates((60, 90))
    zoom = RandLesionZoomd(["image", "label"], prob=1.0, min_fraction=0.4)
    zoom.set_random_state(1)
    shapes = [tuple(zoom({"image": image, "label": label})["image"].shape) for _ in range(30)]
    assert len(set(shapes)) > 5, "random window sides"
    assert all(24 - 1 <= rows <= 60 and abs(rows / cols - 60 / 90) < 0.05 for _, rows, cols in shapes)
    assert int(zoom({"image": image, "label": label})["label"].sum()) == 0
    zoom.set_random_state(1)
    assert [tuple(zoom({"image": image, "label": label})["image"].shape) for _ in range(30)] == shapes
    untouched = RandLesionZoomd(["image", "label"], prob=0.0)({"image": image, "label": label})
    assert untouched["image"] is image and untouched["label"] is label
    with pytest.raises(ValueError, match="min_fraction"):
        RandLesionZoomd("image", min_fraction=0.0)
    with pytest.raises(ValueError, match="margin"):
        RandLesionZoomd("image", margin=(0.5, 2.0))


@pytest.mark.parametrize("box", [(30, 40, 20, 30), (0, 6, 0, 8), (60, 80, 100, 120), (35, 45, 0, 5)])
def test_lesion_free_crop_keeps_clear_of_the_lesion_and_what_lies_deeper(box):
    x0, x1, y0, y1 = box
    label = torch.zeros(1, 80, 120, dtype=torch.uint8)
    label[0, x0:x1, y0:y1] = 1
    image = _coordinates((80, 120))
    crop = RandLesionFreeCropd(["image", "label"], prob=1.0, min_fraction=0.25, max_fraction=0.5, gap=0.5, tries=30)
    crop.set_random_state(0)
    widen_x, widen_y = round(0.5 * (x1 - x0)), round(0.5 * (y1 - y0))
    keep_out = torch.zeros(80, 120, dtype=torch.bool)
    keep_out[max(x0 - widen_x, 0) : x1 + widen_x, max(y0 - widen_y, 0) :] = True  # widened, and deeper to the end
    cropped_count = 0
    for _ in range(20):
        out = crop({"image": image, "label": label})
        if out["image"].shape == image.shape:
            continue
        cropped_count += 1
        cropped = out["image"][0]
        rows, cols = cropped.shape
        assert 0.25 * 80 - 1 <= rows <= 0.5 * 80 + 1 and abs(rows / cols - 80 / 120) < 0.05
        window = _source_window(cropped, 120)
        assert torch.equal(cropped, image[0][window]), "image and label are cut from the same window"
        assert int(out["label"].sum()) == 0, "the window shows no lesion, so the image counts as normal"
        assert not keep_out[window].any(), "nor the lesion's surroundings or its posterior region"
    assert cropped_count > 5, "there is room beside or above each of these lesions"


def test_lesion_free_crop_leaves_an_image_whole_where_no_window_fits_and_crops_normal_images_at_random():
    label, image = torch.zeros(1, 60, 90, dtype=torch.uint8), _coordinates((60, 90))
    crop = RandLesionFreeCropd(["image", "label"], prob=1.0, min_fraction=0.3, max_fraction=0.6)
    crop.set_random_state(1)
    shapes = [tuple(crop({"image": image, "label": label})["image"].shape) for _ in range(30)]
    assert len(set(shapes)) > 5 and all(18 - 1 <= rows <= 36 + 1 for _, rows, _ in shapes)
    crop.set_random_state(1)
    assert [tuple(crop({"image": image, "label": label})["image"].shape) for _ in range(30)] == shapes, "seeded"
    label[0, 20:40, 2:10] = 2  # near the top and wide: neither beside it nor above it is there room
    out = crop({"image": image, "label": label})
    assert out["image"] is image and out["label"] is label, "no room: the lesion image stays as it is"
    untouched = RandLesionFreeCropd(["image", "label"], prob=0.0)({"image": image, "label": torch.zeros_like(label)})
    assert untouched["image"] is image
    for bad in ({"min_fraction": 0.0}, {"min_fraction": 0.7, "max_fraction": 0.5}, {"gap": -0.1}, {"tries": 0}):
        with pytest.raises(ValueError, match="min_fraction"):
            RandLesionFreeCropd("image", **bad)


@pytest.mark.parametrize("lesion_zoom_prob, lesion_free_crop_prob", [(0.0, 0.0), (0.3, 0.0), (0.0, 0.3), (0.3, 0.3)])
def test_training_crops_windows_before_resizing_and_only_when_asked(lesion_zoom_prob, lesion_free_crop_prob):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser["lesion_zoom_prob"] = lesion_zoom_prob
    parser["lesion_free_crop_prob"] = lesion_free_crop_prob
    names = [type(t).__name__ for t in parser.get_parsed_content("train#preprocessing").transforms]
    assert names.index("Resized") < names.index("RandAffined")
    if lesion_zoom_prob or lesion_free_crop_prob:
        assert names.index("RandLesionZoomd") == names.index("Resized") - 1
    else:
        assert "RandLesionZoomd" not in names, "off: the resized images are cached as before"
    if lesion_free_crop_prob:
        assert names.index("RandLesionFreeCropd") == names.index("RandLesionZoomd") - 1, "free window, then zoom"
    else:
        assert "RandLesionFreeCropd" not in names, "off: the lesion-zoom recipe is unchanged, random streams included"


@pytest.mark.parametrize("scan_speckle_prob, lesion_zoom_prob", [(0.0, 0.0), (0.5, 0.0), (0.5, 0.3)])
def test_scan_speckle_lands_between_the_resize_and_the_median_filter(scan_speckle_prob, lesion_zoom_prob):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser["scan_speckle_prob"] = scan_speckle_prob
    parser["lesion_zoom_prob"] = lesion_zoom_prob
    transforms = parser.get_parsed_content("train#preprocessing").transforms
    names = [type(t).__name__ for t in transforms]
    resized, median = names.index("Resized"), names.index("MedianSmoothd")
    speckles = [i for i, name in enumerate(names) if name == "RandSpeckleNoised"]
    if scan_speckle_prob:
        assert names[resized + 1 : median] == ["RandSpeckleNoised"]
        assert transforms[resized + 1].prob == scan_speckle_prob
        assert len(speckles) == 2, "the augmentation's own speckle, after the filter, stays"
    else:
        assert names[resized + 1] == "MedianSmoothd" and len(speckles) == 1
        deterministic = [type(t).__name__ for t in parser.get_parsed_content("deterministic_transforms")]
        assert names[: len(deterministic)] == deterministic, "off: the resized images are cached as before"
    assert (names.index("RandLesionZoomd") == resized - 1) if lesion_zoom_prob else "RandLesionZoomd" not in names


@pytest.mark.parametrize(
    "probs, normal_threshold, malignant_threshold, expected",
    [
        ([0.5, 0.2, 0.3], None, None, 0),  # arg-max
        ([0.2, 0.45, 0.35], None, None, 1),
        ([0.5, 0.2, 0.3], None, 0.25, 2),  # malignant once p(malignant) reaches its threshold
        ([0.2, 0.5, 0.3], None, 0.3, 2),
        ([0.2, 0.5, 0.3], None, 0.31, 1),  # not reached: benign unless normal is likelier than benign
        ([0.5, 0.2, 0.3], None, 0.35, 0),
        ([0.5, 0.2, 0.3], 0.6, None, 2),  # normal only above its threshold, else the likelier lesion class
        ([0.7, 0.2, 0.1], 0.6, None, 0),
        ([0.5, 0.2, 0.3], 0.6, 0.35, 1),
        ([0.3, 0.1, 0.6], 0.2, 0.9, 0),
    ],
)
def test_decide_class(probs, normal_threshold, malignant_threshold, expected):
    assert decide_class(torch.tensor(probs), normal_threshold, malignant_threshold) == expected


def test_label_map_follows_the_thresholded_class():
    seg = torch.zeros(3, 4, 4)
    seg[0] = 1.0
    seg[0, :2, :2], seg[2, :2, :2] = 0.1, 0.9
    cls = torch.tensor([0.2, 0.6, 0.2])
    argmax = LesionLabelMapd()({"pred": seg, "cls": cls})
    sensitive = LesionLabelMapd(malignant_threshold=0.15)({"pred": seg, "cls": cls})
    assert int(argmax["cls_pred"]) == 1 and int(sensitive["cls_pred"]) == 2
    assert set(argmax["seg_pred"].unique().tolist()) == {0, 1}
    assert set(sensitive["seg_pred"].unique().tolist()) == {0, 2}
    assert torch.equal(argmax["seg_pred"] > 0, sensitive["seg_pred"] > 0)
