"""Bad input for training and prediction: every file gets a clear message naming it, or a reported skip.

The data-preparation checks (scanning a BUSI folder, a datalist naming missing files) are tested with
``tools/prepare_datalist.py`` and ``scripts.data`` in ``tests/test_data.py``; here are the loaders and the two
workflows. DICOM files are built with pydicom (ultrasound SOP classes, uncompressed, MONOCHROME2 and RGB, single-
and multi-frame).
"""

from __future__ import annotations

import csv
import functools
import gzip
import logging
import os
import re
import struct
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.bundle import ConfigParser
from monai.transforms import LoadImaged
from PIL import Image

from scripts.io import MAX_IMAGE_PIXELS, BundleImageReader, check_image_file, list_images
from scripts.transforms import LUMINANCE_WEIGHTS, SingleChannel2Dd

from .conftest import REPO_ROOT, predict, tiny_model_file

H, W = 40, 52
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
PIXEL_SPACING = (0.1, 0.2)  # DICOM order: between rows (y), between columns (x)
# RELIABILITY_EXAMPLES=2000 for a deeper search than the default 40 examples per property
HYPOTHESIS = settings(
    max_examples=int(os.environ.get("RELIABILITY_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------------------------------------------- file makers


def grey_image(seed: int = 0, shape=(H, W)) -> np.ndarray:
    """Smooth random uint8 image (so that the network sees structure, not only noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (shape[0] // 4 + 1, shape[1] // 4 + 1)).astype(np.uint8)
    return np.array(Image.fromarray(small).resize(shape[::-1], Image.BILINEAR))


def write_dicom(path: Path, frames: np.ndarray, rgb: bool = False, syntax: str | None = None) -> Path:
    """An uncompressed 8-bit ultrasound DICOM file: ``frames`` is (F, H, W[, 3]); F > 1 makes a cine loop."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    count = frames.shape[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_MULTIFRAME if count > 1 else US_IMAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName = "US", "Synthetic^Phantom"
    ds.Rows, ds.Columns = frames.shape[1], frames.shape[2]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelSpacing = [str(s) for s in PIXEL_SPACING]
    if count > 1:
        ds.NumberOfFrames = count
        ds.FrameTime = "33.3"
        ds.FrameIncrementPointer = pydicom.tag.Tag(0x0018, 0x1063)
    ds.PixelData = np.ascontiguousarray(frames, dtype=np.uint8).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_undecodable_dicom(path: Path, syntax: str) -> Path:
    """A DICOM whose header is fine but whose encapsulated pixel data is garbage (RLE or JPEG).

    GDCM (ITK) dies with SIGFPE on the RLE one, even when only reading the header.
    """
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    write_dicom(path, grey_image()[None])
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    garbage = bytes(64) + b"garbage" * 10 if syntax == RLELossless else b"\xff\xd8\xff" + bytes(99)
    ds.PixelData = encapsulate([garbage])
    ds["PixelData"].VR = "OB"
    ds.save_as(str(path))
    return path


def write_large_png(path: Path, width: int, height: int) -> Path:
    """A valid 8-bit grey PNG of black pixels, written row by row (20000 x 20000 takes 400 kB on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor, row, data = zlib.compressobj(9), b"\0" * (width + 1), bytearray()
    for _ in range(height):
        data += compressor.compress(row)
    data += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(data)) + chunk(b"IEND", b""))
    return path


def write_large_nrrd(path: Path, width: int, height: int) -> Path:
    """A 2D NRRD of black pixels with gzip encoding, written row by row."""
    header = f"NRRD0004\ntype: uint8\ndimension: 2\nsizes: {width} {height}\nencoding: gzip\n\n".encode()
    with open(path, "wb") as stream:
        stream.write(header)
        with gzip.GzipFile(fileobj=stream, mode="wb", compresslevel=1) as packed:
            row = bytes(width)
            for _ in range(height):
                packed.write(row)
    return path


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        image.save(Path(folder) / "x.png", **kwargs)
        return (Path(folder) / "x.png").read_bytes()


def corrupt_png(path: Path) -> Path:
    """A PNG whose compressed pixel data is overwritten in the middle."""
    data = bytearray(png_bytes(Image.fromarray(grey_image())))
    start = data.index(b"IDAT") + 20
    data[start : start + 40] = bytes(range(40))
    path.write_bytes(bytes(data))
    return path


def error_chain(error: BaseException) -> str:
    """All messages of an exception and its causes (MONAI wraps transform errors in RuntimeError)."""
    messages = []
    while error is not None:
        messages.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


# ----------------------------------------------------------------------------------------------- the inference run


def make_prediction_folder(folder: Path) -> tuple[set[str], set[str], set[str]]:
    """A folder with good images in every supported flavour, bad files and files that are no images.

    Returns:
        (files to predict, files to skip and report, files to leave out), relative to ``folder``.
    """
    from pydicom.uid import JPEGBaseline8Bit, RLELossless

    (folder / "sub dir (2)").mkdir(parents=True)
    grey = grey_image(1)
    rgb = np.stack([grey] * 3, -1)
    Image.fromarray(grey).save(folder / "benign (3) échographie.png")
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full_like(grey, 200)])).save(folder / "rgba.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "sixteen bit.png")
    Image.fromarray(rgb).quantize(colors=64).save(folder / "palette.png")
    Image.fromarray(grey).save(folder / "photo.jpg", quality=90)
    Image.fromarray(grey).save(folder / "sub dir (2)" / "ü.png")
    cine = np.stack([grey, 255 - grey, grey // 2])
    write_dicom(folder / "mono.dcm", grey[None])
    write_dicom(folder / "rgb.dcm", rgb[None], rgb=True)
    write_dicom(folder / "cine.dcm", cine)
    write_dicom(folder / "cine rgb.dcm", np.stack([rgb, 255 - rgb]), rgb=True)
    write_dicom(folder / "IM0001", grey[None])  # DICOM without a suffix, as scanners write them
    good = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}

    (folder / "empty.png").write_bytes(b"")
    (folder / "empty.dcm").write_bytes(b"")
    valid_png = (folder / "rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(valid_png[: len(valid_png) // 2])
    valid_jpg = (folder / "photo.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(valid_jpg[: len(valid_jpg) // 2])
    corrupt_png(folder / "corrupt.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(3000))
    valid_dcm = (folder / "mono.dcm").read_bytes()
    (folder / "truncated.dcm").write_bytes(valid_dcm[:-500])
    write_undecodable_dicom(folder / "rle garbage.dcm", RLELossless)
    write_undecodable_dicom(folder / "jpeg garbage.dcm", JPEGBaseline8Bit)
    (folder / "not dicom.dcm").write_text("hello")
    (folder / "text.png").write_text("not an image")
    write_large_png(folder / "huge 20000x20000.png", 20000, 20000)
    write_large_png(folder / "large 9000x9000.png", 9000, 9000)
    bad = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - good

    for name in (".hidden.png", ".DS_Store", "notes.txt", "report.pdf", "benign (3) échographie_mask.png"):
        (folder / name).write_bytes(valid_png)
    (folder / ".git").mkdir()
    (folder / ".git" / "x.png").write_bytes(valid_png)
    ignored = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - good - bad
    return good, bad, ignored


def test_prediction_skips_and_reports_every_bad_file(tmp_path):
    import itk

    inputs, out = tmp_path / "in", tmp_path / "out"
    good, bad, ignored = make_prediction_folder(inputs)
    result = predict(inputs, out, tiny_model_file(tmp_path / "model.pt"), rss_file=tmp_path / "rss")
    with open(out / "predictions.csv", newline="") as stream:
        rows = {Path(row["image"]).relative_to(inputs).as_posix(): row for row in csv.DictReader(stream)}
    assert set(rows) == good
    with open(out / "skipped.csv", newline="") as stream:
        skipped = {Path(row["file"]).relative_to(inputs).as_posix(): row["reason"] for row in csv.DictReader(stream)}
    assert set(skipped) == bad
    for name, reason in skipped.items():
        assert reason.startswith(str(inputs / name) + ": cannot read this image"), reason
    assert "empty" in skipped["empty.png"] and "empty" in skipped["empty.dcm"]
    assert "too large (9000 x 9000: 81,000,000 pixels, limit 67,108,864)" in skipped["large 9000x9000.png"]
    assert "400000000 pixels" in skipped["huge 20000x20000.png"]  # PIL's decompression-bomb guard
    assert "RLE" in skipped["rle garbage.dcm"]
    assert f"left out {len(ignored)} hidden, mask or non-image files" in result.stdout + result.stderr
    peak = int((tmp_path / "rss").read_text()) / 1024
    print(f"peak RSS of the prediction run over the bad-input folder: {peak:.0f} MiB")
    assert peak < 1500  # MiB: the 20000 x 20000 image was never decoded

    def label_map(name: str) -> np.ndarray:
        stem = out / name.rsplit(".", 1)[0] if "." in Path(name).name else out / name
        path = next(p for p in stem.parent.glob(f"{stem.name}_seg.*"))
        if path.suffix == ".png":
            return np.array(Image.open(path))
        return itk.array_from_image(itk.imread(str(path)))[0]  # (1, H, W): one frame

    for name in good:
        assert label_map(name).shape == (H, W), name
        assert Image.open(next((out / name).parent.glob(f"{Path(name).name.split('.')[0]}_overlay.png"))).size == (W, H)

    probabilities = {name: np.array([float(row[f"p_{c}"]) for c in ("normal", "benign", "malignant")])
                     for name, row in rows.items()}  # fmt: skip
    # a cine loop is predicted from its first frame, which is the image of mono.dcm and IM0001
    for name in ("cine.dcm", "IM0001"):
        np.testing.assert_array_equal(probabilities[name], probabilities["mono.dcm"], err_msg=name)
        np.testing.assert_array_equal(label_map(name), label_map("mono.dcm"), err_msg=name)
    np.testing.assert_array_equal(probabilities["benign (3) échographie.png"], probabilities["mono.dcm"])
    for name in ("rgb.dcm", "cine rgb.dcm", "rgb.png"):  # luminance of equal planes: equal up to rounding
        np.testing.assert_allclose(probabilities[name], probabilities["mono.dcm"], atol=1e-2, err_msg=name)
    # the label map of a cine loop is one frame with the loop's pixel spacing and origin
    written, source = itk.imread(str(out / "cine_seg.nrrd")), itk.imread(str(inputs / "cine.dcm"))
    assert tuple(written.GetLargestPossibleRegion().GetSize()) == (W, H, 1)
    assert tuple(written.GetSpacing())[:2] == pytest.approx(PIXEL_SPACING[::-1])
    assert tuple(written.GetOrigin()) == pytest.approx(tuple(source.GetOrigin()))


def test_prediction_on_an_empty_folder_fails_with_a_clear_message(tmp_path):
    (tmp_path / "empty folder").mkdir()
    result = predict(tmp_path / "empty folder", tmp_path / "out", tmp_path / "model.pt", ok=False)
    assert f"{tmp_path / 'empty folder'}: no readable image" in result.stdout + result.stderr


def test_list_images_leaves_out_non_images_and_reads_dicom_without_suffix(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".DS_Store").write_bytes(b"\0" * 200)
    with pytest.raises(ValueError, match="no readable image"):
        list_images(str(tmp_path))
    assert "left out 2 hidden, mask or non-image files: .DS_Store, notes.txt" in caplog.text
    write_dicom(tmp_path / "IM0001", grey_image()[None])
    assert [Path(e["image"]).name for e in list_images(str(tmp_path))] == ["IM0001"]


# ---------------------------------------------------------------------------------------------- training loaders


@pytest.fixture(scope="module")
def training_transform():
    """The training configuration's deterministic preprocessing (loading, label map, resizing, scaling)."""
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundle" / "configs" / "train.json"))
    parser["image_size"] = [64, 64]
    return parser.get_parsed_content("validate#preprocessing")


def _mask_variants(lesion: np.ndarray) -> dict[str, Image.Image]:
    on = lesion.astype(np.uint8)
    rgb = np.stack([on * 255] * 3, -1)
    return {
        "0-255.png": Image.fromarray(on * 255),
        "0-1.png": Image.fromarray(on),
        "rgb.png": Image.fromarray(rgb),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full_like(on, 255)])),
        "16bit.png": Image.fromarray(on.astype(np.uint16) * 65535),
        "palette.png": Image.fromarray(rgb).quantize(colors=2),
        "bilevel.png": Image.fromarray(on.astype(bool)),
    }


def test_every_mask_encoding_gives_the_same_label(tmp_path, training_transform):
    Image.fromarray(grey_image()).save(tmp_path / "img.png")
    lesion = np.zeros((H, W), bool)
    lesion[10:25, 12:30] = True
    labels = {}
    for name, mask in _mask_variants(lesion).items():
        mask.save(tmp_path / name)
        data = training_transform({"image": str(tmp_path / "img.png"), "masks": [str(tmp_path / name)], "class": 2})
        labels[name] = data["label"]
    reference = labels.pop("0-255.png")
    assert reference.shape == (1, 64, 64) and set(reference.unique().tolist()) == {0, 2}
    for name, label in labels.items():
        assert torch.equal(label, reference), name


@pytest.mark.parametrize(
    "case, expected",
    [
        ("image: missing", r"missing.png: cannot read this image \(no such file\)"),
        ("image: zero bytes", r"empty.png: cannot read this image \(the file is empty\)"),
        ("image: truncated PNG", r"truncated.png: cannot read this image"),
        ("image: corrupt PNG", r"corrupt.png: cannot read this image"),
        ("image: truncated JPG", r"truncated.jpg: cannot read this image"),
        ("image: text named .png", r"text.png: cannot read this image"),
        ("image: truncated DICOM", r"truncated.dcm: cannot read this image .*less than expected"),
        ("image: DICOM with corrupt RLE data", r"rle.dcm: cannot read this image"),
        ("image: 20000 x 20000 PNG", r"huge.png: cannot read this image .*exceeds limit"),
        ("image: 20000 x 20000 NRRD", r"huge.nrrd: cannot read this image \(the image is too large"),
        ("mask: missing", r"missing_mask.png: cannot read this image \(no such file\)"),
        ("mask: truncated", r"truncated_mask.png: cannot read this image"),
        ("mask: another size", r"small_mask.png: mask size \(30, 20\) differs from image .*img.png size \(52, 40\)"),
    ],
)
def test_bad_training_files_raise_a_clear_error_naming_the_file(tmp_path, training_transform, case, expected):
    from pydicom.uid import RLELossless

    Image.fromarray(grey_image()).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "mask.png")
    image, masks = tmp_path / "img.png", [tmp_path / "mask.png"]
    valid = (tmp_path / "img.png").read_bytes()
    what = case.split(": ")[1]
    if case.startswith("mask"):
        names = {"missing": "missing_mask.png", "truncated": "truncated_mask.png", "another size": "small_mask.png"}
        masks = [tmp_path / names[what]]
        if what == "truncated":
            masks[0].write_bytes(valid[:100])
        elif what == "another size":
            Image.fromarray(np.zeros((20, 30), np.uint8)).save(masks[0])
    else:
        image = tmp_path / {
            "missing": "missing.png", "zero bytes": "empty.png", "truncated PNG": "truncated.png",
            "corrupt PNG": "corrupt.png", "truncated JPG": "truncated.jpg", "text named .png": "text.png",
            "truncated DICOM": "truncated.dcm", "DICOM with corrupt RLE data": "rle.dcm",
            "20000 x 20000 PNG": "huge.png", "20000 x 20000 NRRD": "huge.nrrd",
        }[what]  # fmt: skip
        makers = {
            "empty.png": lambda p: p.write_bytes(b""),
            "truncated.png": lambda p: p.write_bytes(valid[: len(valid) // 2]),
            "corrupt.png": corrupt_png,
            "truncated.jpg": lambda p: p.write_bytes(png_bytes(Image.fromarray(grey_image()), format="JPEG")[:300]),
            "text.png": lambda p: p.write_text("not an image"),
            "truncated.dcm": lambda p: p.write_bytes(write_dicom(p, grey_image()[None]).read_bytes()[:-100]),
            "rle.dcm": lambda p: write_undecodable_dicom(p, RLELossless),
            "huge.png": lambda p: write_large_png(p, 20000, 20000),
            "huge.nrrd": lambda p: write_large_nrrd(p, 20000, 20000),
        }
        if image.name in makers:
            makers[image.name](image)
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as error:
        training_transform({"image": str(image), "masks": [str(m) for m in masks], "class": 1})
    assert re.search(expected, error_chain(error.value)), error_chain(error.value)
    assert time.perf_counter() - start < 10  # refused, not decoded


def test_cine_dicom_trains_on_its_first_frame(tmp_path, training_transform, caplog):
    grey = grey_image()
    write_dicom(tmp_path / "cine.dcm", np.stack([grey, 255 - grey, grey]))
    write_dicom(tmp_path / "one.dcm", grey[None])
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "mask.png")
    images = [
        training_transform({"image": str(tmp_path / name), "masks": [str(tmp_path / "mask.png")], "class": 0})["image"]
        for name in ("cine.dcm", "one.dcm")
    ]
    assert torch.equal(images[0], images[1])
    assert "cine.dcm: (3,) frames or slices, using the first one" in caplog.text


def test_images_over_the_pixel_limit_are_refused_from_their_header(tmp_path):
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((20000, 20000, 1))
    header.set_data_dtype(np.uint8)
    nib.save(nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), np.eye(4)), tmp_path / "small.nii")
    with open(tmp_path / "huge.nii", "wb") as stream:  # a header that promises 400 MB, and no data
        stream.write(header.binaryblock + b"\0" * 4)
    write_dicom(tmp_path / "huge.dcm", np.zeros((1, 2, 2), np.uint8))
    import pydicom

    ds = pydicom.dcmread(tmp_path / "huge.dcm")
    ds.Rows = ds.Columns = 20000
    ds.save_as(tmp_path / "huge.dcm")
    for name in ("huge.nii", "huge.dcm"):
        with pytest.raises(ValueError, match=rf"{name}: cannot read this image \(the image is too large"):
            check_image_file(str(tmp_path / name))
    assert MAX_IMAGE_PIXELS == 64 * 1024 * 1024
    check_image_file(str(tmp_path / "small.nii"))


# ------------------------------------------------------------------------------------------------ property tests


def _load_2d(path: Path) -> torch.Tensor:
    load = LoadImaged("image", reader=BundleImageReader(), image_only=True, ensure_channel_first=True)
    data = load({"image": str(path)})
    return SingleChannel2Dd("image")(data)["image"]


def _expected_intensity(image: Image.Image) -> np.ndarray:
    """What one channel should hold: grey values, or the luminance of the colour channels (alpha ignored)."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("1", "LA"):
        image = image.convert("L")
    array = np.asarray(image).astype(np.float64)
    if array.ndim == 3:
        array = array[..., :3] @ np.asarray(LUMINANCE_WEIGHTS)
    return array


@HYPOTHESIS
@given(
    height=st.integers(1, 48),
    width=st.integers(1, 48),
    mode=st.sampled_from(["L", "I;16", "RGB", "RGBA", "LA", "P", "1"]),
    seed=st.integers(0, 2**16),
)
def test_any_png_becomes_one_channel_with_its_intensities(height, width, mode, seed):
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "I;16": 1, "RGB": 3, "RGBA": 4, "LA": 2, "P": 3, "1": 1}[mode]
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    else:
        array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        base = Image.fromarray(array[..., 0] if channels == 1 else array[..., :3] if mode == "P" else array,
                               mode={"1": "L", "P": "RGB"}.get(mode, mode))  # fmt: skip
        image = base.quantize(colors=16) if mode == "P" else base.convert("1") if mode == "1" else base
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.png"
        image.save(path)
        loaded = _load_2d(path)
        expected = _expected_intensity(Image.open(path))
    assert loaded.shape == (1, width, height) and loaded.dtype == torch.float32
    values = loaded[0].numpy().T
    assert np.isfinite(values).all()
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-3)


SUFFIXES = [".png", ".jpg", ".bmp", ".tif", ".dcm", ".nii.gz", ".nii", ".nrrd", ".mha"]
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"BM", b"II*\0", b"\0" * 128 + b"DICM", b"NRRD0004\n",
         b"\x1f\x8b\x08\0", b"\\\x01\0\0"]  # fmt: skip


@HYPOTHESIS
@given(suffix=st.sampled_from(SUFFIXES), magic=st.sampled_from(MAGIC), body=st.binary(max_size=600))
def test_random_bytes_give_a_value_error_naming_the_file(suffix, magic, body):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"random bytes{suffix}"
        path.write_bytes(magic + body)
        for load in (lambda file: BundleImageReader().get_data([str(file)]), _load_2d):  # list_images' check, loading
            try:
                load(path)
            except ValueError as error:
                assert str(error).startswith(f"{path}: "), error
            # any other exception type fails the test; a crash of the process fails the run


@functools.lru_cache
def valid_file_bytes() -> dict[str, bytes]:
    """The bytes of small valid PNG, JPG, DICOM (single frame and cine) and NIfTI files of one 24 x 30 image."""
    import nibabel as nib

    grey = grey_image(2, (24, 30))
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        Image.fromarray(grey).save(folder / "a.png")
        Image.fromarray(grey).save(folder / "a.jpg")
        write_dicom(folder / "a.dcm", grey[None])
        write_dicom(folder / "cine.dcm", np.stack([grey, grey]))
        write_dicom(folder / "rgb.dcm", np.stack([grey] * 3, -1)[None], rgb=True)
        nib.save(nib.Nifti1Image(grey.T[:, :, None].astype(np.int16), np.eye(4)), folder / "a.nii.gz")
        return {p.name: p.read_bytes() for p in folder.iterdir()}


@HYPOTHESIS
@given(
    name=st.sampled_from(["a.png", "a.jpg", "a.dcm", "cine.dcm", "rgb.dcm", "a.nii.gz"]),
    fraction=st.floats(0.0, 1.0, exclude_max=True),
)
def test_truncated_files_load_fully_or_give_a_value_error_naming_the_file(name, fraction):
    data = valid_file_bytes()[name]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"cut {name}"
        path.write_bytes(data[: int(len(data) * fraction)])
        try:
            image = _load_2d(path)
        except ValueError as error:
            assert str(error).startswith(f"{path}: "), error
        else:
            assert image.shape == (1, 30, 24)  # only the last bytes (e.g. PNG's IEND chunk) were cut
