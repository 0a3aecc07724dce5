"""Image data sets as float tensors in [0, 1], [N, C, H, W], with integer labels and class names.

``corpus`` spellings for image recipes:
- ``cifar10:PATH``: the official "CIFAR-10 python version" batches (a folder with data_batch_1..5 and test_batch, or
  its .tar.gz), or an image-folder layout (``train/<class>/*.jpg``, ``test/<class>/*.jpg``) as a folder or a .zip
  holding ``train/`` (a train.zip beside a test.zip works too).
- ``fashion_mnist[:PATH]``: the idx files (gzip or not); PATH defaults to the Debian package's folder
  (``apt-get install dataset-fashion-mnist``).
- ``digits``: scikit-learn's bundled 8×8 digits (for tests and quick runs).

Decoded image folders and zips are cached once as safetensors under ``~/.cache/infusion_lm/datasets`` (keyed by the
source's path, size and mtime), because decoding 50,000 JPEGs takes a while. The training split is then divided into
train and validation by a seeded permutation (the paper used 45k/5k), so the same seed always gives the same split.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..errors import ConfigError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


@dataclass
class ImageData:
    """A labelled image set: ``images`` float32 [N, C, H, W] in [0, 1], ``labels`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: List[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "ImageData":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageData(self.images[idx], self.labels[idx], self.classes)

    @property
    def channel_stats(self) -> Tuple[List[float], List[float]]:
        x = self.images.transpose(0, 1).reshape(self.images.shape[1], -1).double()
        return x.mean(1).tolist(), x.std(1).clamp_min(1e-3).tolist()


@dataclass
class ImageSplits:
    train: ImageData
    validation: ImageData
    test: Optional[ImageData]
    source: str


def parse_corpus(spec: str) -> Tuple[str, Optional[str]]:
    name, _, path = spec.partition(":")
    name = name.strip().lower().replace("-", "_")
    if name not in {"cifar10", "fashion_mnist", "digits"}:
        raise ConfigError(f"Image corpus {spec!r} is not one of cifar10:PATH, fashion_mnist[:PATH], digits.")
    if name == "cifar10" and not path:
        raise ConfigError("corpus cifar10 needs a path: `cifar10:/path/to/cifar-10-batches-py` (or an image folder / zip).")
    return name, (path or None)


def load_image_splits(spec: str, validation_size: Optional[int], seed: int, max_train: Optional[int] = None) -> ImageSplits:
    """Loads the corpus and splits its training part into train / validation with a seeded permutation
    (``validation_size`` None: 10%)."""
    name, path = parse_corpus(spec)
    if name == "digits":
        train, test = _digits()
    elif name == "fashion_mnist":
        train, test = _fashion_mnist(Path(path or FASHION_MNIST_DIR))
    else:
        train, test = _cifar10(Path(path))
    if validation_size is None:
        validation_size = len(train) // 10
    if not 0 <= validation_size < len(train):
        raise ConfigError(f"validation_size={validation_size} must be in [0, {len(train)}) for {spec}.")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val, tr = perm[:validation_size].sort().values, perm[validation_size:].sort().values
    if max_train:
        tr = tr[:max_train]
    return ImageSplits(train.subset(tr), train.subset(val), test, spec)


# ---------------------------------------------------------------------------------------------------- sources


def _digits() -> Tuple[ImageData, ImageData]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    data = ImageData(x, y, [str(i) for i in range(10)])
    cut = 1500  # the last 297 digits are the test set
    return data.subset(range(cut)), data.subset(range(cut, len(y)))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype != 0x08:
            raise ConfigError(f"{path} is not an idx file of unsigned bytes.")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.is_file():
            return cand
    raise ConfigError(f"{folder} has no {stem}[.gz]; install the Debian package dataset-fashion-mnist or point "
                      f"corpus at a folder with the idx files (fashion_mnist:/path).")


def _fashion_mnist(folder: Path) -> Tuple[ImageData, ImageData]:
    if not folder.is_dir():
        raise ConfigError(f"Fashion-MNIST folder {folder} does not exist; `apt-get install dataset-fashion-mnist` "
                          f"or set corpus: fashion_mnist:/path/to/idx/files.")
    out = []
    for split in ("train", "t10k"):
        x = _read_idx(_find(folder, f"{split}-images-idx3-ubyte"))
        y = _read_idx(_find(folder, f"{split}-labels-idx1-ubyte"))
        out.append(ImageData(torch.from_numpy(x.copy()).float()[:, None] / 255.0, torch.from_numpy(y.astype(np.int64)),
                             FASHION_CLASSES))
    return out[0], out[1]


def _cifar10(path: Path) -> Tuple[ImageData, ImageData]:
    if not path.exists():
        raise ConfigError(f"CIFAR-10 source {path} does not exist; point corpus at cifar10:/path/to/cifar-10-batches-py, "
                          f"its .tar.gz, or an image folder / zip with train/<class>/ images.")
    if path.is_dir() and (path / "data_batch_1").is_file():
        return _cifar_batches(lambda name: (path / name).read_bytes())
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            return _cifar_batches(lambda name: tar.extractfile(members[name]).read())
    return _cached_image_folder(path)


def _cifar_batches(read) -> Tuple[ImageData, ImageData]:
    def load(names):
        xs, ys = [], []
        for n in names:
            # The official batches are pickles of numpy arrays: the only pickle we ever read, and only from a path
            # the recipe names. encoding="bytes" is what the CIFAR authors document.
            d = pickle.loads(read(n), encoding="bytes")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
        return ImageData(torch.from_numpy(np.concatenate(xs)).float() / 255.0, torch.from_numpy(np.concatenate(ys)),
                         list(CIFAR10_CLASSES))

    return load([f"data_batch_{i}" for i in range(1, 6)]), load(["test_batch"])


def _cache_dir() -> Path:
    return Path(os.environ.get("INFUSION_LM_CACHE", Path.home() / ".cache" / "infusion_lm")) / "datasets"


def _cached_image_folder(path: Path) -> Tuple[ImageData, ImageData]:
    from safetensors.torch import load_file, save_file

    from ..atomic_io import atomic_path

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = _cache_dir() / f"imagefolder-{key}.safetensors"
    if cache.is_file():
        t = load_file(str(cache))
        classes = bytes(t["classes"].tolist()).decode().split("\n")
        return (ImageData(t["train_x"].float() / 255.0, t["train_y"], classes),
                ImageData(t["test_x"].float() / 255.0, t["test_y"], classes))
    train = _read_image_folder(path, "train")
    try:
        test = _read_image_folder(path, "test")
    except ConfigError:
        test = (train[0][:0], train[1][:0], train[2])
    classes = train[2]
    tensors = {"train_x": train[0].contiguous(), "train_y": train[1], "test_x": test[0].contiguous(), "test_y": test[1],
               "classes": torch.tensor(list("\n".join(classes).encode()), dtype=torch.uint8)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        save_file(tensors, str(tmp))
    return (ImageData(train[0].float() / 255.0, train[1], classes), ImageData(test[0].float() / 255.0, test[1], classes))


def _read_image_folder(path: Path, split: str):
    """(uint8 [N, C, H, W], labels, classes) from ``split/<class>/*`` in a folder or zip (or a sibling split.zip)."""
    from io import BytesIO

    from PIL import Image

    entries: List[Tuple[str, callable]] = []
    if path.is_dir():
        root = path / split
        if not root.is_dir() and (path / f"{split}.zip").is_file():
            return _read_image_folder(path / f"{split}.zip", split)
        if not root.is_dir():
            raise ConfigError(f"{path} has no {split}/ folder (expected {split}/<class>/<image>).")
        entries = [(str(p.relative_to(root)), p.read_bytes) for p in sorted(root.glob("*/*")) if p.is_file()]
    elif zipfile.is_zipfile(path):
        zf = zipfile.ZipFile(path)
        prefix = f"{split}/"
        names = sorted(n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/"))
        if not names and path.stem != split and (path.parent / f"{split}.zip").is_file():
            return _read_image_folder(path.parent / f"{split}.zip", split)
        if not names:
            raise ConfigError(f"{path} holds no {split}/<class>/<image> entries.")
        entries = [(n[len(prefix):], (lambda n=n: zf.read(n))) for n in names]
    else:
        raise ConfigError(f"{path} is neither a folder nor a zip archive of images.")
    classes = sorted({rel.split("/")[0] for rel, _ in entries})
    if set(classes) == set(CIFAR10_CLASSES):
        classes = list(CIFAR10_CLASSES)  # the standard label order, not the alphabetical one
    index = {c: i for i, c in enumerate(classes)}
    from tqdm.auto import tqdm

    xs, ys = [], []
    for rel, read in tqdm(entries, desc=f"decoding {split} images (once)", disable=len(entries) < 2000 or bool(os.environ.get("TQDM_DISABLE"))):
        with Image.open(BytesIO(read())) as im:
            xs.append(np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))
        ys.append(index[rel.split("/")[0]])
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.long), classes


class ImageRows(torch.utils.data.Dataset):
    """Training rows for the Trainer and kronfluence: {"pixel_values": [C,H,W], "labels": int64 scalar}."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


class ImageCollator:
    """Stacks rows; an already-collated batch (4-d pixel_values, as the measurement's batches are) passes through."""

    def __call__(self, items):
        if len(items) == 1 and items[0]["pixel_values"].dim() == 4:
            return items[0]
        return {"pixel_values": torch.stack([torch.as_tensor(r["pixel_values"], dtype=torch.float32) for r in items]),
                "labels": torch.stack([torch.as_tensor(r["labels"], dtype=torch.long) for r in items])}
