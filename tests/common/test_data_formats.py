"""One reader per data format: each fault is caught, and caught through every loader that reads that format."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from client.site_data import load_site_data
from common.benchmarks import BENCHMARKS, load_benchmark
from common.config import BENCHMARK_CLASS_COUNTS, DATASETS, build_run_config
from common.data_formats import Split, UnreadableImageError, check_labels, empty_classes, read_image, read_image_file, read_npz
from common.errors import ConfigError, DataError
from server.central_eval import load_eval_arrays

CLASSES = "a,b,c"


# --- MedMNIST-style .npz: the site loader, the server's held-out set, the npz benchmark ---------------


def _site(path, tmp_path):
    return load_site_data(path, build_run_config(classes=CLASSES))


def _server(path, tmp_path):
    return load_eval_arrays(path)


def _benchmark(path, tmp_path):
    return load_benchmark(build_run_config(dataset="npz", dataset_path=str(path), classes=CLASSES), tmp_path / "data")


NPZ_LOADERS = [  # (loader, the split it reads that the fault is put in)
    pytest.param(_site, "train", id="site-train"),
    pytest.param(_site, "val", id="site-val"),
    pytest.param(_server, "test", id="server-test"),
    pytest.param(_benchmark, "train", id="benchmark-train"),
    pytest.param(_benchmark, "val", id="benchmark-val"),
    pytest.param(_benchmark, "test", id="benchmark-test"),
]


def _arrays(num_labels: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", 12), ("val", 6), ("test", 6)):
        arrays[f"{prefix}_images"] = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        arrays[f"{prefix}_labels"] = np.arange(n) % num_labels
    return arrays


def _negative(labels):
    labels = labels.copy()
    labels[0] = -1
    return labels


NPZ_FAULTS = [  # (array changed: None removes it, how, what the error says; {p} is the split)
    pytest.param("labels", lambda a: a[:-1], r"\d+ '{p}_images' but \d+ '{p}_labels'", id="misaligned"),
    pytest.param("labels", lambda a: a.astype(np.float64), r"'{p}_labels' has dtype float64; expected integer class indices", id="float-labels"),
    pytest.param("labels", _negative, r"'{p}_labels' has 1 negative labels \(lowest -1\)", id="negative-labels"),
    pytest.param("labels", None, r"has '{p}_images' but no '{p}_labels'", id="images-without-labels"),
    pytest.param("images", None, r"has '{p}_labels' but no '{p}_images'", id="labels-without-images"),
    pytest.param("images", lambda a: a.astype(np.float32), r"'{p}_images' has dtype float32; expected uint8", id="float-images"),
    pytest.param("images", lambda a: a.reshape(len(a), -1), r"'{p}_images' has shape \(\d+, 64\)", id="images-rank-2"),
    pytest.param("labels", lambda a: np.stack([a, a], axis=1), r"'{p}_labels' has shape \(\d+, 2\); expected one class index", id="labels-2-d"),
]


@pytest.mark.parametrize(("array", "change", "message"), NPZ_FAULTS)
@pytest.mark.parametrize(("loader", "prefix"), NPZ_LOADERS)
def test_an_npz_fault_is_refused_by_every_loader(tmp_path, loader, prefix, array, change, message):
    arrays = _arrays()
    key = f"{prefix}_{array}"
    if change is None:
        del arrays[key]
    else:
        arrays[key] = change(arrays[key])
    path = tmp_path / "faulty.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message.format(p=prefix)) as caught:
        loader(path, tmp_path)
    assert "faulty.npz" in str(caught.value)  # names the file


@pytest.mark.parametrize(
    ("loader", "prefix"),
    [NPZ_LOADERS[0], NPZ_LOADERS[2], NPZ_LOADERS[3], NPZ_LOADERS[5]],  # the splits each loader requires
)
def test_a_required_split_that_is_missing_is_named(tmp_path, loader, prefix):
    arrays = {k: v for k, v in _arrays().items() if not k.startswith(prefix)}
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(DataError, match=f"must hold '{prefix}_images' and '{prefix}_labels' arrays; it has \\["):
        loader(tmp_path / "partial.npz", tmp_path)


@pytest.mark.parametrize("loader", [p.values[0] for p in NPZ_LOADERS[::2]], ids=["site", "server", "benchmark"])
@pytest.mark.parametrize("content", ["text", "npy"])
def test_a_file_that_is_not_an_npz_is_refused_by_every_loader(tmp_path, loader, content):
    path = tmp_path / "not-an-archive.npz"
    if content == "text":
        path.write_text("train_images,train_labels\n")
    else:
        with open(path, "wb") as out:
            np.save(out, np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"not-an-archive\.npz' is not an \.npz archive \(not a zip of \.npy arrays\)"):
        loader(path, tmp_path)


def test_n_by_1_labels_are_read_by_every_loader(tmp_path):
    arrays = {k: (v[:, None] if k.endswith("labels") else v) for k, v in _arrays().items()}
    np.savez(tmp_path / "medmnist.npz", **arrays)
    site = _site(tmp_path / "medmnist.npz", tmp_path)
    assert (len(site.train), len(site.val)) == (12, 6) and site.train.labels.shape == (12,)
    images, labels = _server(tmp_path / "medmnist.npz", tmp_path)
    assert images.shape == (6, 8, 8) and labels.shape == (6,)
    bench = _benchmark(tmp_path / "medmnist.npz", tmp_path)
    assert bench.train_images.shape == (18, 8, 8) and bench.classes == ("a", "b", "c")


def test_read_npz_returns_only_the_splits_present(tmp_path):
    arrays = {k: v for k, v in _arrays().items() if not k.startswith("val")}
    np.savez(tmp_path / "no-val.npz", **arrays)
    assert sorted(read_npz(tmp_path / "no-val.npz")) == ["test", "train"]


def test_an_empty_class_is_a_warning_not_a_refusal(tmp_path):
    np.savez(tmp_path / "two.npz", **_arrays(num_labels=2))
    assert any("(c)" in note for note in _site(tmp_path / "two.npz", tmp_path).warnings)
    assert any("(c)" in note for note in _benchmark(tmp_path / "two.npz", tmp_path).warnings)
    assert empty_classes(Split([], torch.tensor([0, 1, 1])), ("a", "b", "c")) == ["c"]


def test_labels_outside_the_classes_name_the_range_and_the_fix():
    split = Split([], torch.tensor([0, 1, 5]))
    with pytest.raises(DataError, match=r"test labels range 0..5, but the run has 3 classes \(labels 0..2\); check"):
        check_labels(split, 3, "test")


# --- image files and folders: the site loader and the image-folder benchmark --------------------------


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise(size: int) -> np.ndarray:
    return np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _image_root(tmp_path, *, faulty: tuple[str, bytes] | None = None, empty_class: bool = False):
    """``train/`` and ``test/`` with classes a, b, c of 16x16 PNGs; ``faulty`` is put in train/a/."""
    root = tmp_path / "images"
    for split, per_class in (("train", 4), ("test", 2)):
        for c, name in enumerate(("a", "b", "c")):
            (root / split / name / "nested").mkdir(parents=True)
            if empty_class and split == "train" and name == "c":
                continue
            for i in range(per_class):
                (root / split / name / "nested" / f"{i}.png").write_bytes(_png(_noise(16 + c)[:16, :16]))
    (root / "train" / "a" / "._0.png").write_bytes(b"AppleDouble metadata, hidden: ignored")
    (root / "train" / "a" / "notes.txt").write_text("not an image suffix: ignored")
    if faulty:
        (root / "train" / "a" / faulty[0]).write_bytes(faulty[1])
    return root


def _via_site(root, tmp_path):
    site = load_site_data(root, build_run_config(classes=CLASSES, val_fraction=0.0))
    return site.skipped, site.warnings, site.train


def _via_benchmark(root, tmp_path):
    cfg = build_run_config(dataset="image-folder", dataset_path=str(root), image_size=16)
    bench = load_benchmark(cfg, tmp_path / "data")
    assert bench.classes == ("a", "b", "c") and bench.train_images.shape[1:] == (16, 16, 3)
    return bench.skipped, bench.warnings, Split(list(bench.train_images), bench.train_labels)


FOLDER_LOADERS = [pytest.param(_via_site, id="site"), pytest.param(_via_benchmark, id="benchmark")]
_TRUNCATED = _png(_noise(16))


@pytest.mark.parametrize("loader", FOLDER_LOADERS)
@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        pytest.param("bomb.png", _png(_noise(40)), "decompression bomb", id="bomb-warning-size"),
        pytest.param("bomb.png", _png(_noise(64)), "decompression bomb", id="bomb-error-size"),
        pytest.param("cut.png", _TRUNCATED[: len(_TRUNCATED) // 2], "truncated or corrupt", id="truncated-png"),
        pytest.param("text.png", b"this is not a PNG", "not an image file", id="text-named-png"),
    ],
)
def test_an_unreadable_image_is_skipped_and_counted_by_every_loader(tmp_path, monkeypatch, loader, name, content, reason):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 > 1000 (PIL warns), 64x64 > 2000 (PIL raises)
    skipped, _, train = loader(_image_root(tmp_path, faulty=(name, content)), tmp_path)
    assert [(s.path.endswith(name), reason in s.reason) for s in skipped] == [(True, True)]
    assert len(train) == 12  # the readable ones, and none of the ignored files


@pytest.mark.parametrize("loader", FOLDER_LOADERS)
def test_an_empty_class_folder_is_reported(tmp_path, loader):
    skipped, warnings, train = loader(_image_root(tmp_path, empty_class=True), tmp_path)
    assert skipped == [] and len(train) == 8
    assert any("(c)" in note for note in warnings)


@pytest.mark.parametrize("loader", FOLDER_LOADERS)
def test_a_class_folder_outside_the_classes_is_refused(tmp_path, loader):
    root = _image_root(tmp_path)
    (root / ("train" if loader is _via_site else "test") / "zebra").mkdir()  # a benchmark's classes are train/'s
    with pytest.raises(DataError, match=r"\['zebra'\].*rename them"):
        loader(root, tmp_path)


@pytest.mark.parametrize("loader", FOLDER_LOADERS)
def test_a_sixteen_bit_png_is_rescaled_from_its_own_range(tmp_path, loader):
    root = _image_root(tmp_path, empty_class=True)
    ramp = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 15).astype(np.uint16)  # 0..3825, 12-bit-like
    Image.fromarray(ramp).save(root / "train" / "c" / "ct.png")
    _, _, train = loader(root, tmp_path)
    image = np.asarray(next(img for img, label in zip(train.images, train.labels) if int(label) == 2))
    assert image.min() == 0 and image.max() == 255 and len(np.unique(image)) > 200


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("LA", 1), ("1", 1), ("P", 3), ("RGBA", 3), ("RGB", 3)])
def test_greyscale_stays_one_channel_and_colour_becomes_rgb(tmp_path, mode, channels):
    Image.new(mode, (5, 4)).save(tmp_path / "x.png")
    assert tuple(read_image_file(tmp_path / "x.png").shape) == (channels, 4, 5)


@pytest.mark.parametrize(
    ("name", "fmt", "sniffed"),
    [
        *[pytest.param(f"x{suffix}", fmt, False, id=suffix) for suffix, fmt in
          ((".png", "PNG"), (".PNG", "PNG"), (".jpg", "JPEG"), (".jpeg", "JPEG"), (".bmp", "BMP"), (".gif", "GIF"), (".webp", "WEBP"))],
        *[pytest.param(name, fmt, True, id=name) for name, fmt in
          (("x.tif", "TIFF"), ("x.tiff", "TIFF"), ("IM0001", "PNG"), ("x.img", "PNG"), ("1.2.840.113619", "JPEG"))],
    ],
)
def test_only_a_tiff_or_an_unknown_name_is_looked_at_for_dicom_s_marker_before_decoding(tmp_path, monkeypatch, name, fmt, sniffed):
    """A PNG or JPEG costs one open (a ClientApp rereads its data every round); a DICOM file can hide only in the others."""
    import common.data_formats
    from common.dicom import looks_like_dicom

    looked: list[str] = []
    monkeypatch.setattr(common.data_formats, "looks_like_dicom", lambda path: looked.append(str(path)) or looks_like_dicom(path))
    Image.new("L", (5, 4), 90).save(tmp_path / name, format=fmt)
    image, kind = read_image(tmp_path / name)
    assert tuple(image.shape[1:]) == (4, 5) and kind.format == fmt
    assert looked == ([str(tmp_path / name)] if sniffed else [])


def test_a_bomb_is_an_error_only_inside_the_reader(tmp_path, monkeypatch):
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    (tmp_path / "bomb.png").write_bytes(_png(_noise(40)))
    with pytest.raises(UnreadableImageError, match="decompression bomb"):
        read_image_file(tmp_path / "bomb.png")
    with warnings.catch_warnings(record=True) as seen:  # the global filters are as they were
        warnings.simplefilter("always")
        Image.open(tmp_path / "bomb.png").close()
    assert [w.category for w in seen] == [Image.DecompressionBombWarning]


def test_an_unknown_benchmark_lists_the_valid_names(tmp_path):
    cfg = dataclasses.replace(build_run_config(), dataset="cifar-10")
    with pytest.raises(ConfigError, match="'cifar-10'.*fashion-mnist, digits, npz, image-folder"):
        load_benchmark(cfg, tmp_path)
    assert set(BENCHMARKS) == set(DATASETS)


def test_the_fixed_class_counts_that_simulate_checks_are_the_loaded_benchmarks(tmp_path):
    from common.benchmarks import DEBIAN_FASHION_MNIST

    for name, count in BENCHMARK_CLASS_COUNTS.items():
        if name == "fashion-mnist" and not DEBIAN_FASHION_MNIST.is_dir():
            continue  # `make test` installs it; without it the loader would download
        bench = load_benchmark(build_run_config(dataset=name), tmp_path / "data")
        assert len(bench.classes) == count == len(set(bench.train_labels.tolist()) | set(bench.test_labels.tolist()))


def test_an_npz_whose_header_claims_a_huge_array_is_refused_not_a_memory_error(tmp_path):
    import zipfile

    header = io.BytesIO()  # 93 GiB claimed, 100 bytes held
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (100_000, 1000, 1000)})
    labels = io.BytesIO()
    np.save(labels, np.zeros(3, dtype=np.int64))
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("train_images.npy", header.getvalue() + b"\0" * 100)
        archive.writestr("train_labels.npy", labels.getvalue())
    with pytest.raises(DataError, match="too large to load into memory|cannot read"):
        read_npz(path, prefixes=("train",), required=("train",))
