"""The data core: IDX parsing, folders, digits, the artifact format and the real downloader."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import threading
import time
from functools import partial

import numpy as np
import pytest

from helpers.data import write_idx_folder
from steps.core import data
from steps.core.data import DataError, encode_idx


def test_parse_idx_round_trip():
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    assert np.array_equal(data.parse_idx(encode_idx(images), "x"), images)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    assert np.array_equal(data.parse_idx(encode_idx(labels), "y"), labels)


@pytest.mark.parametrize("raw, message", [
    (b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc", "bad magic"),
    (b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc", "unsupported IDX type"),
    (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
    (encode_idx(np.zeros(10, np.uint8))[:-3], "truncated or corrupt"),
    (encode_idx(np.zeros(10, np.uint8)) + b"x", "truncated or corrupt"),
])
def test_parse_idx_rejects_corrupt_files(raw, message):
    with pytest.raises(DataError, match=message):
        data.parse_idx(raw, "f")


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_load_idx_folder_layouts(tmp_path, gz, layout):
    folder = write_idx_folder(tmp_path, n_train=30, n_test=10, gz=gz, layout=layout)
    ds = data.load_idx_folder(folder, "mnist")
    assert ds.x_train.shape == (30, 28, 28) and ds.x_train.dtype == np.uint8
    assert ds.y_test.shape == (10,) and ds.y_test.dtype == np.int64
    assert ds.y_train.max() <= 9


def test_load_idx_folder_names_missing_files(tmp_path):
    folder = write_idx_folder(tmp_path, n_train=5, n_test=5)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        data.load_idx_folder(folder, "mnist")


def test_load_idx_folder_rejects_truncated_gzip(tmp_path):
    folder = write_idx_folder(tmp_path, n_train=5, n_test=5)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="corrupt gzip|truncated"):
        data.load_idx_folder(folder, "mnist")


def test_load_idx_folder_rejects_label_count_mismatch(tmp_path):
    folder = write_idx_folder(tmp_path, n_train=5, n_test=5)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(encode_idx(np.zeros(4, np.uint8))))
    with pytest.raises(DataError, match="5 images but 4 labels"):
        data.load_idx_folder(folder, "mnist")


def test_digits_look_like_mnist():
    ds = data.load_digits_dataset()
    assert ds.x_train.shape[1:] == (28, 28) and ds.x_train.dtype == np.uint8
    assert len(ds.y_train) + len(ds.y_test) == 1797
    # The 4-pixel frame stays empty, as in MNIST.
    assert ds.x_train[:, :4, :].max() == 0 and ds.x_train[:, :, -4:].max() == 0
    assert ds.x_train.max() > 200
    assert set(np.unique(ds.y_test)) == set(range(10))
    assert ds.digest == data.load_digits_dataset().digest  # deterministic split


def test_resize_bilinear_keeps_corners_and_constant_images():
    img = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    out = data.resize_bilinear(img, 7)
    assert out[0, 0, 0] == 0 and out[0, -1, -1] == 15
    assert np.allclose(data.resize_bilinear(np.full((1, 3, 3), 5.0), 10), 5.0)


def test_saved_dataset_round_trip_without_pickle(tmp_path):
    ds = data.load_digits_dataset()
    data.save_dataset(ds, tmp_path)
    with np.load(tmp_path / data.DATA_FILE, allow_pickle=False) as npz:
        assert set(npz.files) == {"x_train", "y_train", "x_test", "y_test"}
    loaded = data.load_saved_dataset(tmp_path)
    assert loaded.digest == ds.digest and loaded.classes == ds.classes


def test_saved_dataset_digest_mismatch_is_detected(tmp_path):
    ds = data.load_digits_dataset()
    data.save_dataset(ds, tmp_path)
    tampered = ds.x_train.copy()
    tampered[0, 10, 10] ^= 0xFF
    np.savez(tmp_path / data.DATA_FILE, x_train=tampered, y_train=ds.y_train,
             x_test=ds.x_test, y_test=ds.y_test)
    with pytest.raises(DataError, match="digest"):
        data.load_saved_dataset(tmp_path)


def test_saved_dataset_refuses_other_folders(tmp_path):
    with pytest.raises(DataError, match="not a dataset artifact"):
        data.load_saved_dataset(tmp_path)
    (tmp_path / data.MANIFEST_FILE).write_text("{}")
    (tmp_path / data.DATA_FILE).write_bytes(b"not a zip")
    with pytest.raises(DataError, match="unreadable"):
        data.load_saved_dataset(tmp_path)


def test_split_train_val_is_seeded_and_disjoint():
    train, val = data.split_train_val(100, 0.1, seed=7)
    assert len(val) == 10 and len(train) == 90
    assert not set(train) & set(val)
    assert np.array_equal(val, data.split_train_val(100, 0.1, seed=7)[1])
    assert not np.array_equal(val, data.split_train_val(100, 0.1, seed=8)[1])


# --------------------------------------------------------------------------- downloads


class _Server:
    """A loopback HTTP server for a folder; counts requests per path."""

    def __init__(self, folder):
        self.hits: dict[str, int] = {}
        hits = self.hits

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                hits[self.path] = hits.get(self.path, 0) + 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mirror(tmp_path):
    served = write_idx_folder(tmp_path / "served", n_train=40, n_test=10)
    server = _Server(served)
    resources = [(p.name, hashlib.md5(p.read_bytes()).hexdigest())
                 for p in sorted(served.glob("*.gz"))]
    yield server, resources, served
    server.close()


def test_download_fetches_and_verifies_md5(tmp_path, mirror):
    server, resources, _ = mirror
    dest = data.download_idx(tmp_path / "cache", resources, [server.url])
    ds = data.load_idx_folder(dest, "mnist")
    assert len(ds.y_train) == 40 and len(ds.y_test) == 10
    # A second call finds every file intact and asks the server nothing.
    before = dict(server.hits)
    data.download_idx(tmp_path / "cache", resources, [server.url])
    assert server.hits == before


def test_download_refetches_a_corrupt_cached_file(tmp_path, mirror):
    server, resources, _ = mirror
    dest = data.download_idx(tmp_path / "cache", resources, [server.url])
    victim = dest / resources[0][0]
    victim.write_bytes(b"garbage")
    before = dict(server.hits)
    data.download_idx(dest, resources, [server.url])
    assert hashlib.md5(victim.read_bytes()).hexdigest() == resources[0][1]
    refetched = {path for path, count in server.hits.items() if count != before.get(path)}
    assert refetched == {"/" + resources[0][0]}


def test_download_rejects_a_mirror_serving_wrong_bytes(tmp_path, mirror):
    server, resources, served = mirror
    (served / resources[0][0]).write_bytes(b"tampered")
    with pytest.raises(DataError, match="could not download"):
        data.download_idx(tmp_path / "cache", resources, [server.url])
    assert not (tmp_path / "cache" / resources[0][0]).exists()


def test_download_falls_back_to_the_next_mirror(tmp_path, mirror):
    server, resources, _ = mirror
    dead = "http://127.0.0.1:9/"  # discard port: connection refused
    dest = data.download_idx(tmp_path / "cache", resources, [dead, server.url])
    for filename, md5 in resources:
        assert hashlib.md5((dest / filename).read_bytes()).hexdigest() == md5
        assert server.hits.get("/" + filename)  # it came from the live mirror


def test_offline_download_fails_fast_naming_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv(data.MIRRORS_ENV, "http://127.0.0.1:9/")
    started = time.monotonic()
    with pytest.raises(DataError) as exc:
        data.download_dataset("mnist", tmp_path)
    assert time.monotonic() - started < 30
    assert "dataset=digits" in str(exc.value) and "data_dir" in str(exc.value)


def test_official_sources_come_from_torchvision(monkeypatch):
    monkeypatch.delenv(data.MIRRORS_ENV, raising=False)
    resources, mirrors = data.torchvision_sources("mnist")
    assert ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3") in resources
    assert any("ossci-datasets" in m for m in mirrors)
    assert data.torchvision_sources("fashion-mnist")[0] != resources
