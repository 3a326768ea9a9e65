"""Data preparation (tools/prepare_datalist.py): validation, duplicate grouping, stratified grouped split and the
saved datalist; and the bundle's reading of it (scripts.data)."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import prepare_datalist  # tools/, on sys.path (conftest.py)
import pytest
from PIL import Image
from prepare_datalist import (
    DEFAULT_SIMILARITY_THRESHOLD,
    create_datalist,
    group_duplicates,
    scan_dataset,
    thumbnail_descriptors,
    thumbnail_similarity,
)

from scripts import io as scripts_io
from scripts.common import CLASS_NAMES
from scripts.data import DatasetError, load_datalist

SIZE = (48, 64)  # rows, columns


def _image(seed: int) -> np.ndarray:
    """A distinct smooth random image (smooth, so that its perceptual hash is stable under small changes)."""
    noise = np.random.default_rng(seed).random((6, 8)).astype(np.float32)
    big = np.array(Image.fromarray((noise * 255).astype(np.uint8)).resize(SIZE[::-1], Image.BICUBIC))
    return big


def _write_case(root: Path, cls: str, index: int, image: np.ndarray, lesion: bool | None = None) -> Path:
    folder = root / cls
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{cls} ({index}).png")
    mask = np.zeros(image.shape[:2], np.uint8)
    if lesion if lesion is not None else cls != "normal":
        mask[10:20, 10:30] = 255
    Image.fromarray(mask).save(folder / f"{cls} ({index})_mask.png")
    return folder / f"{cls} ({index}).png"


def _dataset(root: Path, per_class: int = 4, start_seed: int = 0) -> Path:
    seed = start_seed
    for cls in CLASS_NAMES:
        for index in range(1, per_class + 1):
            _write_case(root, cls, index, _image(seed))
            seed += 1
    return root


def test_scan_merges_mask_files_and_accepts_formats(tmp_path):
    root = _dataset(tmp_path / "ds", per_class=2)
    rgba = np.zeros((*SIZE, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[30:35, 5:9, :3] = 255
    Image.fromarray(rgba, mode="RGBA").save(root / "benign" / "benign (1)_mask_1.png")
    Image.fromarray(np.stack([_image(50)] * 3, -1)).save(root / "benign" / "benign (2).png")  # RGB image
    Image.fromarray(_image(51).astype(np.uint16) * 257).save(root / "malignant" / "malignant (2).png")  # 16-bit
    Image.fromarray(np.stack([_image(52)] * 3, -1)).quantize(64).save(root / "normal" / "normal (2).png")  # palette
    (root / "benign" / "notes.txt").write_text("not an image")
    Image.fromarray(_image(53)).save(root / "benign" / ".hidden.png")
    cases, skipped = scan_dataset(str(root))
    by_image = {c["image"]: c for c in cases}
    assert len(cases) == 6 and not skipped
    assert by_image["benign/benign (1).png"]["masks"] == ["benign/benign (1)_mask.png", "benign/benign (1)_mask_1.png"]
    assert by_image["malignant/malignant (1).png"]["class"] == 2


@pytest.mark.parametrize(
    "break_it, file, reason",
    [
        (lambda r: (r / "benign" / "benign (1).png").write_bytes(b""), "benign (1).png", "empty"),
        (lambda r: _truncate(r / "benign" / "benign (1).png"), "benign (1).png", "cannot read image"),
        (lambda r: (r / "malignant" / "malignant (1)_mask.png").unlink(), "malignant (1).png", "no mask"),
        (lambda r: Image.new("L", (10, 10)).save(r / "normal" / "normal (1)_mask.png"), "normal (1)_mask.png", "size"),
        (lambda r: (r / "benign" / "benign (2)_mask.png").write_bytes(b"junk"), "benign (2)_mask.png", "cannot read"),
    ],
)
def test_each_bad_input_is_named_and_can_be_skipped(tmp_path, break_it, file, reason):
    root = _dataset(tmp_path / "ds", per_class=2)
    break_it(root)
    with pytest.raises(DatasetError, match=re.escape(file) + ".*" + reason):
        scan_dataset(str(root))
    cases, skipped = scan_dataset(str(root), skip_invalid=True)
    assert len(cases) == 5 and len(skipped) == 1


def _truncate(path: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        scan_dataset(str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="no class folder"):
        scan_dataset(str(tmp_path))
    (tmp_path / "benign").mkdir()
    with pytest.raises(DatasetError, match="no valid image"):
        scan_dataset(str(tmp_path))


def test_names_with_spaces_parentheses_and_non_ascii(tmp_path):
    _write_case(tmp_path, "benign", 1, _image(0))
    image = tmp_path / "benign" / "benign (1).png"
    image.rename(tmp_path / "benign" / "bénin (1) x.png")
    (tmp_path / "benign" / "benign (1)_mask.png").rename(tmp_path / "benign" / "bénin (1) x_mask.png")
    cases, _ = scan_dataset(str(tmp_path))
    assert cases[0]["image"] == "benign/bénin (1) x.png"


def test_near_duplicates_are_grouped_across_classes(tmp_path):
    root = _dataset(tmp_path / "ds", per_class=6)
    original = _image(100)
    _write_case(root, "benign", 7, original)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(original.astype(int) + 3, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    _write_case(root, "malignant", 7, np.array(Image.open(buffer)))  # re-encoded, brighter copy, other class
    datalist = create_datalist(str(root), str(tmp_path / "datalist.json"), seed=3)
    conflicting = [g for g in datalist["duplicate_groups"] if g["conflicting"]]
    assert [sorted(g["members"]) for g in conflicting] == [["benign/benign (7).png", "malignant/malignant (7).png"]]
    assert len(datalist["duplicate_groups"]) == 1  # distinct images are not merged
    split_of = {e["image"]: s for s in ("training", "validation", "test") for e in datalist[s]}
    assert split_of["benign/benign (7).png"] == split_of["malignant/malignant (7).png"]


def test_group_duplicates_is_transitive():
    a = np.zeros(63, bool)
    b, c = a.copy(), a.copy()
    b[:4] = True
    c[:8] = True  # 8 bits from a, 4 from b
    assert group_duplicates([a, b, c, ~a], threshold=4) == [0, 0, 0, 1]


def _texture(seed: int, shape: tuple[int, int] = (240, 320)) -> np.ndarray:
    """A distinct random texture with structure at three scales, grey levels 40 to 220."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    for cells, weight in ((6, 1.0), (20, 0.5), (60, 0.25)):
        noise = rng.random((cells, cells * 4 // 3)).astype(np.float32)
        image += weight * np.asarray(Image.fromarray(noise).resize(shape[::-1], Image.BICUBIC))
    return (40 + 180 * (image - image.min()) / (image.max() - image.min())).astype(np.uint8)


def _copies(image: np.ndarray) -> dict[str, np.ndarray]:
    """Altered copies of one frame, as found in BUSI."""
    height, width = image.shape
    rows, columns = np.mgrid[:height, :width]
    corner = np.where(rows + columns < 80, 0, image).astype(np.uint8)  # black corner
    marked = image.copy()
    marked[100:103, 40:70] = marked[85:118, 55:58] = 255  # a caliper cross
    marked[200:215, 200:290] = 230  # a text label
    return {
        "black corner": corner,
        "central crop": image[:, width // 8 : width - width // 8],  # as a sector image cropped to its middle
        "black frame": np.pad(image, ((20, 30), (15, 15))),
        "rescaled": np.asarray(Image.fromarray(image).resize((width * 3 // 5, height * 3 // 5), Image.BILINEAR)),
        "calipers and text": marked,
        "contrast": np.clip(image * 0.8 + 30, 0, 255).astype(np.uint8),
    }


def test_thumbnail_similarity_finds_altered_copies_and_not_other_images():
    original = thumbnail_descriptors(_texture(0))[None]
    for name, copy in _copies(_texture(0)).items():
        score = thumbnail_similarity(original, thumbnail_descriptors(copy)[None])[0, 0]
        assert score >= DEFAULT_SIMILARITY_THRESHOLD, name
    others = np.stack([thumbnail_descriptors(_texture(seed)) for seed in range(1, 40)])
    scores = thumbnail_similarity(others, others)
    np.testing.assert_allclose(scores, scores.T, atol=1e-9)
    np.testing.assert_allclose(np.diag(scores), 1.0, atol=1e-6)
    assert (scores[~np.eye(len(others), dtype=bool)] < DEFAULT_SIMILARITY_THRESHOLD - 0.15).all()
    assert (thumbnail_similarity(original, others) < DEFAULT_SIMILARITY_THRESHOLD - 0.15).all()


def test_group_duplicates_unites_hash_and_thumbnail_pairs(monkeypatch):
    monkeypatch.setattr(prepare_datalist, "SIMILARITY_BLOCK", 2)  # pairs within and across blocks
    copies = _copies(_texture(0))
    images = [_texture(1), copies["black corner"], _texture(2), _texture(3), copies["central crop"], _texture(1)]
    thumbnails = [thumbnail_descriptors(image) for image in images]
    hashes = list(np.eye(len(images), dtype=bool))  # all 2 bits apart
    assert group_duplicates(hashes, 1) == [0, 1, 2, 3, 4, 5]
    assert group_duplicates(hashes, 1, thumbnails) == [0, 1, 2, 3, 1, 0]
    hashes[3] = hashes[2]  # a hash pair as well
    assert group_duplicates(hashes, 1, thumbnails) == [0, 1, 2, 2, 1, 0]


def test_split_is_stratified_grouped_and_deterministic(tmp_path):
    root = _dataset(tmp_path / "ds", per_class=40)
    first = create_datalist(str(root), str(tmp_path / "a.json"), seed=0)
    create_datalist(str(root), str(tmp_path / "b.json"), seed=0)
    other = create_datalist(str(root), str(tmp_path / "c.json"), seed=1)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert first["test"] != other["test"]
    for split, fraction in (("training", 0.70), ("validation", 0.15), ("test", 0.15)):
        counts = Counter(e["class_name"] for e in first[split])
        for cls in CLASS_NAMES:
            assert abs(counts[cls] - fraction * 40) <= 1, (split, cls, counts)
    images = [e["image"] for s in ("training", "validation", "test") for e in first[s]]
    assert len(images) == len(set(images)) == 120


def test_datalist_is_loaded_with_absolute_paths_and_checked(tmp_path):
    root = _dataset(tmp_path / "ds", per_class=8)
    path = tmp_path / "datalist.json"
    with pytest.raises(DatasetError, match=re.escape(str(path)) + " not found.*tools/prepare_datalist.py"):
        load_datalist(str(root), str(path))
    create_datalist(str(root), str(path))
    training = load_datalist(str(root), str(path), split="training")
    assert all(Path(e["image"]).is_absolute() and Path(e["image"]).is_file() for e in training)
    saved = json.loads(path.read_text())
    assert not Path(saved["training"][0]["image"]).is_absolute()  # the saved split holds relative names only
    assert [e["class_name"] for e in training] == [e["class_name"] for e in saved["training"]]
    (root / saved["test"][0]["image"]).unlink()
    with pytest.raises(DatasetError, match="missing.*prepare_datalist"):
        load_datalist(str(root), str(path), split="training")
    with pytest.raises(ValueError, match="split must be"):
        load_datalist(str(root), str(path), split="train")


def test_command_line_writes_the_datalist(tmp_path, capsys):
    root = _dataset(tmp_path / "ds", per_class=4)
    prepare_datalist.main(str(root), str(tmp_path / "datalist.json"))
    counts = json.loads((tmp_path / "datalist.json").read_text())["counts"]
    assert sum(sum(per_class.values()) for per_class in counts.values()) == 12
    assert capsys.readouterr().out.startswith(json.dumps(counts, indent=1))


def test_datalist_write_is_atomic(tmp_path, monkeypatch):
    root = _dataset(tmp_path / "ds", per_class=2)
    path = tmp_path / "datalist.json"
    path.write_text("previous")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(scripts_io.os, "replace", fail)  # the new file is written, then cannot be moved in place
    with pytest.raises(OSError):
        create_datalist(str(root), str(path))
    assert path.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["datalist.json", "ds"]
