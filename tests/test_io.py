"""Input listing and output writing of the inference workflow."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from scripts.common import remove_stale_temporaries
from scripts.io import atomic_write, label_map_suffix, list_images, save_label_map, save_overlay


def _png(path, size=(20, 30)):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)).save(path)
    return path


def test_list_images_filters_and_reports(tmp_path):
    (tmp_path / "sub dir").mkdir()
    _png(tmp_path / "a (1).png")
    _png(tmp_path / "sub dir" / "b é.png")
    _png(tmp_path / "a (1)_mask.png")
    _png(tmp_path / ".hidden.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    data = (tmp_path / "a (1).png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    images = list_images(str(tmp_path), output_dir=str(out))
    assert [p["image"].split("/")[-1] for p in images] == ["a (1).png", "b é.png"]
    with open(out / "skipped.csv", newline="") as stream:
        skipped = {row["file"].split("/")[-1]: row["reason"] for row in csv.DictReader(stream)}
    assert set(skipped) == {"empty.png", "truncated.png"}
    assert "empty" in skipped["empty.png"]
    with pytest.raises(ValueError, match="empty.png"):
        list_images(str(tmp_path), skip_invalid=False)
    assert len(list_images(str(tmp_path / "a (1).png"))) == 1


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no readable image"):
        list_images(str(tmp_path))


def test_png_label_map_keeps_size_and_orientation(tmp_path):
    source = _png(tmp_path / "x.png", size=(20, 30))  # 20 rows, 30 columns
    label = np.zeros((30, 20), np.uint8)  # MONAI order: columns (x) first
    label[25, 3] = 2
    path = save_label_map(label, str(source), tmp_path / f"x_seg{label_map_suffix(str(source))}")
    saved = np.array(Image.open(path))
    assert saved.shape == (20, 30) and saved[3, 25] == 2 and saved.sum() == 2


def test_nifti_and_nrrd_label_maps_copy_geometry(tmp_path):
    import itk
    import nibabel as nib

    affine = np.array([[0.2, 0, 0, 5], [0, 0.3, 0, -7], [0, 0, 1, 2], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.zeros((30, 20, 1), np.int16), affine), tmp_path / "s.nii.gz")
    label = np.zeros((30, 20), np.uint8)
    label[4, 6] = 1
    out = nib.load(save_label_map(label, str(tmp_path / "s.nii.gz"), tmp_path / "s_seg.nii.gz"))
    assert out.shape == (30, 20, 1) and np.allclose(out.affine, affine) and out.get_fdata()[4, 6, 0] == 1

    volume = itk.image_from_array(np.zeros((1, 20, 30), np.int16))
    volume.SetSpacing((0.2, 0.3, 1.0))
    volume.SetOrigin((5.0, -7.0, 2.0))
    itk.imwrite(volume, str(tmp_path / "s.nrrd"))
    written = itk.imread(str(save_label_map(label, str(tmp_path / "s.nrrd"), tmp_path / "s_seg.nrrd")))
    assert tuple(written.GetSpacing()) == pytest.approx((0.2, 0.3, 1.0))
    assert tuple(written.GetOrigin()) == pytest.approx((5.0, -7.0, 2.0))
    assert itk.array_from_image(written)[0, 6, 4] == 1


def test_overlay_is_rgb_at_image_size(tmp_path):
    label = np.zeros((30, 20), np.uint8)
    label[5:10, 5:10] = 2
    path = save_overlay(np.random.rand(30, 20), label, tmp_path / "o.png", caption="malignant 0.90")
    overlay = np.array(Image.open(path))
    assert overlay.shape == (20, 30, 3)
    assert overlay[7, 7, 0] > overlay[7, 7, 1]  # malignant is drawn red


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")

    def failing(temporary):
        with open(temporary, "w") as stream:
            stream.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    names = [f".model.{pid}.tmp.pt" for pid in (int(finished.stdout), os.getppid(), os.getpid())] + ["model.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])  # running writers' files are kept
