"""Every loader, on small files written here in the real formats."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from groupnorm.study.data import DatasetError, load_dataset, read_idx


def _write_idx(path, arr, gz=True):
    code = {np.uint8: 0x08}[arr.dtype.type]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(head + arr.tobytes())


def _images(n, shape, seed, classes=3):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)
    return x, y.astype(np.uint8)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory(tmp_path, gz):
    xtr, ytr = _images(12, (28, 28), 0, classes=10)
    xte, yte = _images(5, (28, 28), 1, classes=10)
    sfx = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", xtr, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", ytr, gz)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", xte, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", yte, gz)
    assert (read_idx(str(tmp_path / f"t10k-images-idx3-ubyte{sfx}")) == xte).all()
    d = load_dataset(str(tmp_path))
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert d.y_train.tolist() == ytr.tolist() and d.y_test.tolist() == yte.tolist()
    assert d.num_classes == 10 and d.dims == 2
    # normalized with training-set statistics, same transform on the test set
    assert abs(d.x_train.mean().item()) < 1e-4 and abs(d.x_train.std().item() - 1) < 1e-2
    mean, std = (xtr / 255.0).mean(), (xtr / 255.0).std(ddof=1)
    np.testing.assert_allclose(d.x_test[0, 0].numpy(), ((xte[0] / 255.0 - mean) / std), rtol=1e-4, atol=1e-4)


def test_cifar10_and_cifar100_python_batches(tmp_path):
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    xs = []
    for i in range(1, 3):
        x, y = _images(4, (3 * 32 * 32,), i, classes=10)
        xs.append(x)
        with open(c10 / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": x, b"labels": y.tolist()}, f)
    xt, yt = _images(3, (3 * 32 * 32,), 9, classes=10)
    with open(c10 / "test_batch", "wb") as f:
        pickle.dump({b"data": xt, b"labels": yt.tolist()}, f)
    d = load_dataset(str(c10))
    assert d.x_train.shape == (8, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    assert d.name == "cifar-10" or d.num_classes <= 10
    # channel-major row layout: the first 1024 bytes are the red plane
    raw = np.concatenate(xs).reshape(-1, 3, 32, 32)
    assert np.corrcoef(d.x_train[:, 0].numpy().ravel(), raw[:, 0].ravel())[0, 1] > 0.999

    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    x, _ = _images(6, (3 * 32 * 32,), 3)
    with open(c100 / "train", "wb") as f:
        pickle.dump({b"data": x, b"fine_labels": [0, 99, 5, 7, 1, 2], b"coarse_labels": [0] * 6}, f)
    with open(c100 / "test", "wb") as f:
        pickle.dump({b"data": x[:2], b"fine_labels": [3, 4], b"coarse_labels": [0, 0]}, f)
    d = load_dataset(str(c100))
    assert d.num_classes == 100 and d.y_train.tolist() == [0, 99, 5, 7, 1, 2]


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(
                    tmp_path / split / c / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    d = load_dataset(str(tmp_path))
    assert d.x_train.shape == (6, 3, 10, 12) and d.x_test.shape == (4, 3, 10, 12)
    assert d.y_train.tolist() == [0, 0, 0, 1, 1, 1] and d.num_classes == 2


def test_npz_2d_channels_last_and_3d(tmp_path):
    x, y = _images(10, (8, 8, 3), 0)
    p = tmp_path / "d.npz"
    np.savez(p, x_train=x, y_train=y, x_test=x[:4], y_test=y[:4])
    d = load_dataset(str(p))
    assert d.x_train.shape == (10, 3, 8, 8) and d.dims == 2
    vol = np.random.default_rng(0).normal(size=(6, 5, 6, 7)).astype(np.float32)  # (N, D, H, W)
    p3 = tmp_path / "v.npz"
    np.savez(p3, x_train=vol, y_train=np.arange(6) % 2, x_test=vol[:2], y_test=np.array([0, 1]))
    d = load_dataset(str(p3), train_size=4)
    assert d.x_train.shape == (4, 1, 5, 6, 7) and d.dims == 3 and len(d.y_test) == 2


def test_subsets_are_fixed_by_subset_seed(tmp_path):
    x, y = _images(50, (4, 4), 0, classes=5)
    p = tmp_path / "d.npz"
    np.savez(p, x_train=x, y_train=y, x_test=x, y_test=y)
    a = load_dataset(str(p), train_size=10, subset_seed=1)
    b = load_dataset(str(p), train_size=10, subset_seed=1)
    c = load_dataset(str(p), train_size=10, subset_seed=2)
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)


def test_clear_errors(tmp_path, monkeypatch):
    import groupnorm.study.data as data

    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist.*--data"):
        load_dataset("fashion-mnist")
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(str(tmp_path / "nope.npz"))
    p = tmp_path / "bad.npz"
    np.savez(p, x=np.zeros((2, 2, 2)))
    with pytest.raises(DatasetError, match=r"lacks \['x_train'"):
        load_dataset(str(p))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="cannot tell the format"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "half").mkdir()
    _write_idx(tmp_path / "half" / "train-images-idx3-ubyte.gz", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DatasetError, match="missing train-labels-idx1-ubyte"):
        load_dataset(str(tmp_path / "half"))


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist absent")
def test_installed_fashion_mnist():
    d = load_dataset("fashion-mnist", train_size=100, test_size=50)
    assert d.x_train.shape == (100, 1, 28, 28) and d.num_classes == 10 and len(d.y_test) == 50
