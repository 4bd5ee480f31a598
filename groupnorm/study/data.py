"""Offline dataset loaders for the study. Nothing is ever downloaded.

:func:`load_dataset` takes one ``--data`` argument and returns a :class:`Dataset` of
in-memory tensors (float32 images normalized per channel with training-set statistics,
int64 labels). Accepted values:

* ``fashion-mnist`` (default): the Debian package ``dataset-fashion-mnist``, IDX files
  under ``/usr/share/datasets/fashion-mnist/`` (or a directory holding the four
  ``*-idx?-ubyte[.gz]`` files).
* a CIFAR-10 / CIFAR-100 *python* directory (``data_batch_1..5`` + ``test_batch``, or
  ``train`` + ``test``), e.g. ``cifar-10-batches-py``.
* an image folder with ``train/`` and ``test/``, each holding one sub-folder per class.
* an ``.npz`` file with ``x_train``, ``y_train``, ``x_test``, ``y_test``.

Layout rules for ``.npz`` arrays (N = samples): ``(N, H, W)`` is one-channel 2-D;
``(N, C, H, W)`` or ``(N, H, W, C)`` with C in {1, 3, 4} is 2-D; any other 4-D array
``(N, D, H, W)`` is one-channel volumetric (3-D); ``(N, C, D, H, W)`` is volumetric.
(1-D models exist too; use them from Python with ``build_model(..., dims=1)``.) Integer
images (uint8) are scaled by 1/255 first.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A dataset could not be found or read; the message says how to fix it."""


@dataclass
class Dataset:
    """In-memory train/test split.

    Attributes:
        x_train, x_test (Tensor): float32, shape (N, C, *spatial), normalized.
        y_train, y_test (Tensor): int64 class indices.
        num_classes (int), name (str), source (str): what was loaded and from where.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str
    source: str

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def dims(self) -> int:
        """Spatial dimensionality (1, 2 or 3)."""
        return self.x_train.dim() - 2

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.x_train.shape[1:])
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test, "
                f"{self.num_classes} classes, sample shape {shape}, from {self.source}")


# ------------------------------------------------------------------------------- readers
def _open(path):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST format), optionally gzip-compressed."""
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(data[2])
    if dtype is None:
        raise DatasetError(f"{path}: unknown IDX type code 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: header says shape {shape} but holds {arr.size} values (truncated file?)")
    return arr.reshape(shape)


def _find(directory, stem):
    for name in (stem, stem + ".gz"):
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return p
    alt = stem.replace("-idx", ".idx")  # some mirrors use train-images.idx3-ubyte
    for name in (alt, alt + ".gz"):
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return p
    return None


def load_idx_dir(directory: str):
    """Load the four MNIST-format files from ``directory`` as uint8 arrays."""
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]
    paths = [_find(directory, s) for s in stems]
    missing = [s for s, p in zip(stems, paths) if p is None]
    if missing:
        raise DatasetError(
            f"Fashion-MNIST not found in {directory!r}: missing {', '.join(missing)}[.gz]. "
            "Install it with `sudo apt-get install dataset-fashion-mnist` (files land in "
            f"{FASHION_MNIST_DIR}), or point --data at a directory holding these four IDX files "
            "(or at a CIFAR python directory, an image folder with train/ and test/, or an .npz)."
        )
    xtr, ytr, xte, yte = (read_idx(p) for p in paths)
    return xtr[:, None], ytr, xte[:, None], yte


def load_cifar_dir(directory: str):
    """Load CIFAR-10 (``data_batch_*``, ``test_batch``) or CIFAR-100 (``train``, ``test``)."""
    def unpickle(p):
        with open(p, "rb") as f:
            return pickle.load(f, encoding="bytes")

    def get(d, key):
        for k in (key, key.encode()):
            if k in d:
                return d[k]
        raise DatasetError(f"CIFAR batch is missing key {key!r} (keys: {list(d)[:8]})")

    names = sorted(n for n in os.listdir(directory) if n.startswith("data_batch"))
    if names:
        parts = [unpickle(os.path.join(directory, n)) for n in names]
        test = unpickle(os.path.join(directory, "test_batch"))
        label_key = "labels"
    else:
        parts = [unpickle(os.path.join(directory, "train"))]
        test = unpickle(os.path.join(directory, "test"))
        label_key = "fine_labels"
    xtr = np.concatenate([np.asarray(get(p, "data"), dtype=np.uint8) for p in parts])
    ytr = np.concatenate([np.asarray(get(p, label_key)) for p in parts])
    xte = np.asarray(get(test, "data"), dtype=np.uint8)
    yte = np.asarray(get(test, label_key))
    return xtr.reshape(-1, 3, 32, 32), ytr, xte.reshape(-1, 3, 32, 32), yte


def load_image_folder(directory: str):
    """Load ``train/<class>/*.png`` and ``test/<class>/*.png`` (class order: sorted names)."""
    from PIL import Image

    classes = sorted(d for d in os.listdir(os.path.join(directory, "train"))
                     if os.path.isdir(os.path.join(directory, "train", d)))
    if not classes:
        raise DatasetError(f"image folder {directory!r}: train/ has no class sub-folders")
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for split in ("train", "test"):
        xs, ys, size, mode = [], [], None, None
        root = os.path.join(directory, split)
        for c in sorted(os.listdir(root)):
            if not os.path.isdir(os.path.join(root, c)):
                continue
            if c not in index:
                raise DatasetError(f"image folder: class {c!r} is in {split}/ but not in train/")
            for fn in sorted(os.listdir(os.path.join(root, c))):
                if not fn.lower().endswith(IMAGE_EXTS):
                    continue
                img = Image.open(os.path.join(root, c, fn))
                if mode is None:
                    mode = "L" if img.mode in ("L", "1", "I;16", "I") else "RGB"
                img = img.convert(mode)
                if size is None:
                    size = img.size
                elif img.size != size:
                    img = img.resize(size)  # all images to the first one's size
                a = np.asarray(img, dtype=np.uint8)
                xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
                ys.append(index[c])
        if not xs:
            raise DatasetError(f"image folder {directory!r}: no images found under {split}/")
        out += [np.stack(xs), np.asarray(ys)]
    return out[0], out[1], out[2], out[3]


def _layout(x: np.ndarray, name: str) -> np.ndarray:
    """Put an .npz image array into (N, C, *spatial) following the module's rules."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[1] in (1, 3, 4):
            return x
        if x.shape[-1] in (1, 3, 4):
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return x[:, None]  # (N, D, H, W): one-channel volume
    if x.ndim == 5:
        return x
    raise DatasetError(f"npz: {name} has shape {x.shape}; expected (N,H,W), (N,C,H,W), (N,H,W,C), "
                       "(N,D,H,W) or (N,C,D,H,W)")


def load_npz(path: str):
    """Load ``x_train, y_train, x_test, y_test`` from an .npz file."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
        if missing:
            raise DatasetError(f"npz {path!r} lacks {missing}; it holds {z.files}. Save it with "
                               "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
        xtr, ytr, xte, yte = (z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    return _layout(xtr, "x_train"), ytr, _layout(xte, "x_test"), yte


# ------------------------------------------------------------------------------- entry
def _normalize(xtr: np.ndarray, xte: np.ndarray):
    scale = 1.0 / 255.0 if np.issubdtype(xtr.dtype, np.integer) else 1.0
    tr = torch.from_numpy(np.array(xtr, dtype=np.float32)).mul_(scale)
    te = torch.from_numpy(np.array(xte, dtype=np.float32)).mul_(scale)
    red = [0] + list(range(2, tr.dim()))
    mean = tr.mean(dim=red, keepdim=True)
    std = tr.std(dim=red, keepdim=True).clamp_min(1e-6)
    return (tr - mean) / std, (te - mean) / std


def _subset(x, y, n: Optional[int], seed: int):
    if n is None or n <= 0 or n >= len(y):
        return x, y
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:n].sort().values
    return x[idx], y[idx]


def load_dataset(data: str = "fashion-mnist", *, train_size: Optional[int] = None,
                 test_size: Optional[int] = None, subset_seed: int = 0) -> Dataset:
    """Load a dataset for the study (see module docstring for the accepted ``data``).

    Args:
        data (str): ``fashion-mnist``, a directory or an .npz path.
        train_size (int, optional): a fixed random subset of the training set.
        test_size (int, optional): a fixed random subset of the test set.
        subset_seed (int): seed of those subsets (independent of the run seeds).
    """
    if data in ("fashion-mnist", "fashion_mnist", "fmnist"):
        path, kind = FASHION_MNIST_DIR, "idx"
        if not os.path.isdir(path):
            raise DatasetError(
                f"Fashion-MNIST is not installed: {path} does not exist. Install it with "
                "`sudo apt-get install dataset-fashion-mnist`, or pass --data DIR with the four "
                "IDX files, a CIFAR python directory, an image folder (train/ and test/ with one "
                "sub-folder per class) or an .npz with x_train, y_train, x_test, y_test."
            )
    else:
        path = os.path.expanduser(data)
        if not os.path.exists(path):
            raise DatasetError(
                f"--data {data!r}: no such file or directory. Use 'fashion-mnist' (needs "
                "`sudo apt-get install dataset-fashion-mnist`), a directory of IDX files, a CIFAR "
                "python directory, an image folder with train/ and test/, or an .npz file."
            )
        if os.path.isfile(path):
            if not path.endswith(".npz"):
                raise DatasetError(f"--data {data!r}: a file must be an .npz with x_train, y_train, "
                                   "x_test, y_test")
            kind = "npz"
        elif os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "test")):
            kind = "folder"
        elif any(n.startswith("data_batch") for n in os.listdir(path)) or (
                os.path.isfile(os.path.join(path, "train")) and os.path.isfile(os.path.join(path, "test"))):
            kind = "cifar"
        elif _find(path, "train-images-idx3-ubyte"):
            kind = "idx"
        else:
            raise DatasetError(
                f"--data {data!r}: cannot tell the format of this directory. Expected IDX files "
                "(train-images-idx3-ubyte[.gz], ...), CIFAR python batches (data_batch_1.., "
                "test_batch or train, test), or train/ and test/ sub-folders with one folder per class."
            )
    loader = {"idx": load_idx_dir, "cifar": load_cifar_dir, "folder": load_image_folder, "npz": load_npz}[kind]
    try:
        xtr, ytr, xte, yte = loader(path)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError) as e:
        raise DatasetError(f"--data {data!r}: could not read it as {kind}: {e}") from e
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise DatasetError(f"--data {data!r}: {len(xtr)} train images but {len(ytr)} labels, "
                           f"{len(xte)} test images but {len(yte)} labels")
    if xtr.shape[1:] != xte.shape[1:]:
        raise DatasetError(f"--data {data!r}: train samples have shape {xtr.shape[1:]}, test {xte.shape[1:]}")
    x_train, x_test = _normalize(xtr, xte)
    y_train = torch.as_tensor(np.asarray(ytr).astype(np.int64)).reshape(-1)
    y_test = torch.as_tensor(np.asarray(yte).astype(np.int64)).reshape(-1)
    if y_train.min() < 0:
        raise DatasetError(f"--data {data!r}: labels must be class indices >= 0, got min {int(y_train.min())}")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    x_train, y_train = _subset(x_train, y_train, train_size, subset_seed)
    x_test, y_test = _subset(x_test, y_test, test_size, subset_seed + 1)
    name = {"idx": "fashion-mnist" if path == FASHION_MNIST_DIR else "idx", "cifar": f"cifar-{num_classes}",
            "folder": "image-folder", "npz": "npz"}[kind]
    return Dataset(x_train, y_train, x_test, y_test, num_classes, name, path)
