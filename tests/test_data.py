"""Tests of stelab.data: file formats, downloads, search order, splits, generated data, batching.

Downloads are served by a local http.server on 127.0.0.1 from small files generated
here in the real IDX / CIFAR-10-binary formats, with their own checksums injected
into ``stelab.data.RESOURCES``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import math
import os
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stelab.data as data
from stelab.data.api import canonical
from stelab.data.files import RemoteFile, Resource
from stelab.errors import ConfigError, DataError, StelabError

# --- generated files ------------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    """``arr`` (uint8) in the IDX format: magic 0x0000 0x08 ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@dataclasses.dataclass
class FakeIdx:
    """A tiny MNIST-like dataset: raw arrays, the published .gz files, the resource entry."""

    arrays: dict[str, np.ndarray]
    files: dict[str, bytes]  # filename -> gz bytes
    resource: Resource


NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def make_idx(name: str, n_train: int = 40, n_test: int = 10, seed: int = 0) -> FakeIdx:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 7, 6), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 7, 6), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    files, remotes = {}, []
    for role, arr in arrays.items():
        content = idx_bytes(arr)
        gz = gzip.compress(content, mtime=0)
        files[NAMES[role]] = gz
        remotes.append(RemoteFile(role, NAMES[role], sha(gz), len(gz), None, sha(content)))
    res = Resource(name, ("http://127.0.0.1:9/unused/",), tuple(remotes))
    return FakeIdx(arrays, files, res)


CIFAR_BATCHES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def make_cifar(per_batch: int = 3, n_test: int = 4, seed: int = 0):
    """(images (N,3,32,32), labels) for train and test, and a tar.gz of the binary release.

    The archive also holds members that must never be extracted: a path-traversal name
    and a symlink.
    """
    rng = np.random.default_rng(seed)
    train_x = rng.integers(0, 256, (5 * per_batch, 3, 32, 32), dtype=np.uint8)
    train_y = rng.integers(0, 10, 5 * per_batch, dtype=np.uint8)
    test_x = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    test_y = rng.integers(0, 10, n_test, dtype=np.uint8)

    def records(x: np.ndarray, y: np.ndarray) -> bytes:
        return b"".join(bytes([int(lab)]) + img.tobytes() for img, lab in zip(x, y, strict=True))

    members = {
        f"data_batch_{i + 1}.bin": records(
            train_x[i * per_batch : (i + 1) * per_batch],
            train_y[i * per_batch : (i + 1) * per_batch],
        )
        for i in range(5)
    }
    members["test_batch.bin"] = records(test_x, test_y)
    members["batches.meta.txt"] = b"airplane\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for fname, body in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{fname}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        evil = tarfile.TarInfo("../evil.bin")
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
        link = tarfile.TarInfo("cifar-10-batches-bin/link.bin")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    archive = buf.getvalue()
    res = Resource(
        "cifar10",
        ("http://127.0.0.1:9/unused/",),
        (RemoteFile("archive", "cifar-10-binary.tar.gz", sha(archive), len(archive)),),
    )
    return (train_x, train_y), (test_x, test_y), archive, res


# --- a local HTTP server ----------------------------------------------------------------


class FileServer:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1; counts requests.

    Paths in ``truncate`` announce their full Content-Length but send only half the
    body and close the connection (an interrupted download). Paths in ``endless``
    send no Content-Length and stream their body repeated for the given number of
    bytes (a mirror that streams without end; finite so a broken client still ends).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.endless: dict[str, int] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outer.requests.append(self.path)
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                if self.path in outer.endless:
                    self.end_headers()
                    self.close_connection = True
                    sent, total = 0, outer.endless[self.path]
                    try:
                        while sent < total:
                            self.wfile.write(body)
                            sent += len(body)
                    except OSError:  # the client stopped reading
                        pass
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in outer.truncate:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, prefix: str, files: dict[str, bytes]) -> str:
        for fname, body in files.items():
            self.files[f"{prefix}/{fname}"] = body
        return f"{self.url}{prefix}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    s = FileServer()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An isolated environment: cache under tmp_path, no $STELAB_DATA / $STELAB_MIRROR."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("STELAB_DATA", raising=False)
    monkeypatch.delenv("STELAB_MIRROR", raising=False)
    return tmp_path


@pytest.fixture
def fake_mnist(env, monkeypatch):
    fake = make_idx("mnist")
    monkeypatch.setitem(data.RESOURCES, "mnist", fake.resource)
    return fake


def cache_dir(env: Path, name: str) -> Path:
    return env / "xdg" / "stelab" / name


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- registry and argument errors -----------------------------------------------------------


def test_names_and_unknown_name():
    assert set(data.names()) == {
        "digits",
        "fashion-mnist",
        "mnist",
        "cifar10",
        "teacher",
        "psa-toy",
    }
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnsit'.*did you mean 'mnist'"):
        data.load("mnsit")
    assert canonical("Fashion_MNIST") == "fashion-mnist" and canonical("CIFAR-10") == "cifar10"
    assert data.load("DIGITS", limit=3).name == "digits"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": -3}, "limit"),
        ({"val_size": -1}, "val_size"),
        ({"val_size": 2000}, "val_size"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"standardise": True}, "standardize"),
    ],
)
def test_bad_numbers_name_the_parameter(kwargs, param):
    with pytest.raises(ConfigError, match=param):
        data.load("digits", **kwargs)


def test_bad_generated_options():
    with pytest.raises(ConfigError, match="v_star"):
        data.load("teacher", m=3, v_star=[1.0, 2.0])
    with pytest.raises(ConfigError, match="n_per_class"):
        data.load("psa-toy", n_per_class=0)
    with pytest.raises(ConfigError, match="labels"):
        data.load("psa-toy", labels="binary")
    with pytest.raises(ConfigError, match="n_val_per_class"):
        data.load("psa-toy", val_size=10)
    with pytest.raises(TypeError, match="dtype"):
        data.load("teacher", dtype=torch.int32)


# --- IDX: download, verify, parse ------------------------------------------------------------


def test_idx_download_verifies_and_parses(fake_mnist, server, env):
    mirror = server.add("/mnist", fake_mnist.files)
    ds = data.load("mnist", val_size=5, standardize=False, mirrors=[mirror], progress=False)
    a = fake_mnist.arrays
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    tr, va = perm[:35], perm[35:]
    raw_train = torch.from_numpy(a["train_images"]).float() / 255
    assert ds.input_shape == (1, 7, 6) and ds.num_classes == 10
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    torch.testing.assert_close(ds.train.x[:, 0], raw_train[tr], rtol=0, atol=0)
    torch.testing.assert_close(ds.val.x[:, 0], raw_train[va], rtol=0, atol=0)
    assert ds.train.y.tolist() == a["train_labels"][tr.numpy()].tolist()
    assert ds.val.y.tolist() == a["train_labels"][va.numpy()].tolist()
    torch.testing.assert_close(
        ds.test.x[:, 0], torch.from_numpy(a["test_images"]).float() / 255, rtol=0, atol=0
    )
    assert ds.test.y.tolist() == a["test_labels"].tolist()
    # the cache holds exactly the four verified files, nothing temporary
    cache = cache_dir(env, "mnist")
    assert files_in(cache) == sorted(NAMES.values())
    for fname, body in fake_mnist.files.items():
        assert (cache / fname).read_bytes() == body
    assert "(downloaded)" in ds.source and str(cache) in ds.source
    assert len(server.requests) == 4


def test_standardised_with_train_statistics(fake_mnist, server):
    mirror = server.add("/mnist", fake_mnist.files)
    ds = data.load("mnist", val_size=5, mirrors=mirror, progress=False)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    raw = fake_mnist.arrays["train_images"][perm[:35].numpy()].astype(np.float64) / 255
    assert ds.mean[0] == pytest.approx(raw.mean(), abs=1e-12)
    assert ds.std[0] == pytest.approx(raw.std(), abs=1e-12)
    expect = (fake_mnist.arrays["test_images"] / 255 - raw.mean()) / raw.std()
    np.testing.assert_allclose(ds.test.x[:, 0].numpy(), expect, atol=1e-5)
    assert abs(float(ds.train.x.mean())) < 1e-5 and float(ds.train.x.std()) == pytest.approx(
        1, abs=1e-2
    )


def test_second_load_uses_cache_without_http(fake_mnist, server, env):
    mirror = server.add("/mnist", fake_mnist.files)
    first = data.load("mnist", val_size=5, mirrors=mirror, progress=False)
    assert len(server.requests) == 4
    second = data.load("mnist", val_size=5, mirrors=mirror, progress=False)
    assert len(server.requests) == 4
    assert second.source == f"IDX files in {cache_dir(env, 'mnist')}"
    assert torch.equal(first.train.x, second.train.x)
    # download() is a no-op when the files are there
    assert data.download("mnist", mirrors=mirror, progress=False) == cache_dir(env, "mnist")
    assert len(server.requests) == 4


def test_checksum_mismatch_leaves_nothing(fake_mnist, server, env):
    files = dict(fake_mnist.files)
    files[NAMES["train_labels"]] = gzip.compress(b"not the labels", mtime=0)
    mirror = server.add("/mnist", files)
    expected = fake_mnist.resource.file("train_labels").sha256
    with pytest.raises(DataError) as err:
        data.load("mnist", val_size=5, mirrors=mirror, progress=False)
    msg = str(err.value)
    assert "checksum mismatch" in msg and expected in msg and "'mnist'" in msg
    assert "\n" not in msg
    # the verified first file stays; the corrupt one and any temporary file do not
    assert files_in(cache_dir(env, "mnist")) == [NAMES["train_images"]]


def test_interrupted_download_leaves_nothing(fake_mnist, server, env):
    mirror = server.add("/mnist", fake_mnist.files)
    server.truncate.add(f"/mnist/{NAMES['train_images']}")
    with pytest.raises(DataError, match="interrupted"):
        data.load("mnist", val_size=5, mirrors=mirror, progress=False)
    assert files_in(cache_dir(env, "mnist")) == []


@pytest.mark.parametrize("sized", [True, False])
def test_endless_stream_is_cut_at_the_expected_size(fake_mnist, server, env, monkeypatch, sized):
    """A mirror streaming without end is stopped after the published size (+1 byte),
    before the checksum; without a published size, at MAX_UNSIZED_BYTES."""
    import stelab.data.files as files_mod

    name = NAMES["train_images"]
    remote = fake_mnist.resource.file("train_images")
    if not sized:
        monkeypatch.setattr(files_mod, "MAX_UNSIZED_BYTES", 3 * remote.size)
        res = dataclasses.replace(
            fake_mnist.resource,
            files=tuple(
                dataclasses.replace(f, size=None) if f.role == "train_images" else f
                for f in fake_mnist.resource.files
            ),
        )
        monkeypatch.setitem(data.RESOURCES, "mnist", res)
    mirror = server.add("/mnist", fake_mnist.files)
    server.endless[f"/mnist/{name}"] = 64 << 20
    with pytest.raises(DataError) as err:
        data.load("mnist", val_size=5, mirrors=mirror, progress=False)
    cap = remote.size if sized else 3 * remote.size
    msg = str(err.value)
    assert f"more than the expected {cap} bytes" in msg and name in msg
    assert files_in(cache_dir(env, "mnist")) == []


def test_falls_back_to_the_next_mirror(fake_mnist, server, env):
    good = server.add("/good", fake_mnist.files)
    ds = data.load("mnist", val_size=5, mirrors=[f"{server.url}/missing/", good], progress=False)
    assert len(ds.train) == 35
    assert server.requests.count(f"/missing/{NAMES['train_images']}") == 1


def test_env_mirror(fake_mnist, server, env, monkeypatch):
    server.add("/base/mnist", fake_mnist.files)
    monkeypatch.setenv("STELAB_MIRROR", f"{server.url}/base")
    ds = data.load("mnist", val_size=5, progress=False)
    assert len(ds.test) == 10
    assert all(r.startswith("/base/mnist/") for r in server.requests)


def test_missing_without_download_names_places_and_command(fake_mnist, env):
    with pytest.raises(DataError) as err:
        data.load("mnist", download=False)
    msg = str(err.value)
    assert "'mnist'" in msg and str(cache_dir(env, "mnist")) in msg
    assert "d.download('mnist')" in msg and "\n" not in msg


def test_missing_fashion_mnist_suggests_apt(env, monkeypatch):
    res = data.RESOURCES["fashion-mnist"]
    monkeypatch.setitem(
        data.RESOURCES,
        "fashion-mnist",
        dataclasses.replace(res, system_dirs=(str(env / "no-such-dir"),)),
    )
    with pytest.raises(DataError) as err:
        data.load("fashion-mnist", download=False)
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and str(env / "no-such-dir") in msg


def test_unreachable_mirror_is_a_data_error(fake_mnist, env):
    dead = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(DataError) as err:
        data.load("mnist", mirrors=[dead], progress=False)
    msg = str(err.value)
    assert "download failed" in msg and dead in msg and "d.download('mnist')" in msg
    assert files_in(cache_dir(env, "mnist")) == []


def write_files(d: Path, files: dict[str, bytes], *, raw: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for fname, body in files.items():
        if raw:
            (d / fname.removesuffix(".gz")).write_bytes(gzip.decompress(body))
        else:
            (d / fname).write_bytes(body)
    return d


def test_search_order_data_dir_env_cache(fake_mnist, env, monkeypatch):
    explicit = write_files(env / "explicit", fake_mnist.files)
    env_dir = write_files(env / "shared" / "mnist", fake_mnist.files, raw=True)
    cache = write_files(cache_dir(env, "mnist"), fake_mnist.files)
    monkeypatch.setenv("STELAB_DATA", str(env / "shared"))
    kw = {"val_size": 5, "download": False}
    assert data.load("mnist", data_dir=explicit, **kw).source == f"IDX files in {explicit}"
    assert data.load("mnist", **kw).source == f"IDX files in {env_dir}"
    monkeypatch.delenv("STELAB_DATA")
    assert data.load("mnist", **kw).source == f"IDX files in {cache}"
    # data_dir may also be a root holding <name>/
    assert data.load("mnist", data_dir=env / "shared", **kw).source == f"IDX files in {env_dir}"
    # raw (uncompressed) files parse to the same tensors as gzip'd ones
    a = data.load("mnist", data_dir=explicit, **kw)
    b = data.load("mnist", data_dir=env_dir, **kw)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)


def test_truncated_local_file_names_file_and_checksum(fake_mnist, env):
    d = write_files(env / "d", fake_mnist.files)
    body = fake_mnist.files[NAMES["train_images"]]
    (d / NAMES["train_images"]).write_bytes(body[: len(body) - 20])
    content_sha = fake_mnist.resource.file("train_images").content_sha256
    with pytest.raises(DataError) as err:
        data.load("mnist", data_dir=d, download=False, val_size=5)
    msg = str(err.value)
    assert str(d / NAMES["train_images"]) in msg and content_sha in msg


def test_wrong_content_is_rejected_unless_verify_false(fake_mnist, env):
    other = make_idx("mnist", seed=1)
    d = write_files(env / "d", other.files)
    with pytest.raises(DataError, match="sha256 of its content"):
        data.load("mnist", data_dir=d, download=False, val_size=5)
    ds = data.load("mnist", data_dir=d, download=False, val_size=5, verify=False)
    assert ds.test.y.tolist() == other.arrays["test_labels"].tolist()


def test_bad_idx_header_is_a_data_error(fake_mnist, env):
    d = write_files(env / "d", fake_mnist.files)
    labels = idx_bytes(fake_mnist.arrays["test_labels"])
    (d / NAMES["test_labels"]).write_bytes(gzip.compress(labels[:-3], mtime=0))
    with pytest.raises(DataError, match="truncated or corrupt"):
        data.load("mnist", data_dir=d, download=False, val_size=5, verify=False)


def test_download_function(fake_mnist, server, env):
    mirror = server.add("/mnist", fake_mnist.files)
    target = env / "mine"
    assert data.download("mnist", data_dir=target, mirrors=mirror, progress=False) == target
    assert files_in(target) == sorted(NAMES.values())
    assert data.download("digits") is None and data.download("psa-toy") is None


def test_limit_takes_a_prefix_of_the_seeded_train_order(fake_mnist, server):
    mirror = server.add("/mnist", fake_mnist.files)
    full = data.load("mnist", val_size=5, mirrors=mirror, progress=False)
    part = data.load("mnist", val_size=5, limit=7, mirrors=mirror, progress=False)
    assert len(part.train) == 7 and torch.equal(part.train.x, full.train.x[:7])
    assert torch.equal(part.val.x, full.val.x)


# --- CIFAR-10 binary -------------------------------------------------------------------------


def test_cifar10_download_extract_parse(server, env, monkeypatch):
    (train_x, train_y), (test_x, test_y), archive, res = make_cifar()
    monkeypatch.setitem(data.RESOURCES, "cifar10", res)
    mirror = server.add("/c", {"cifar-10-binary.tar.gz": archive})
    ds = data.load("cifar10", val_size=3, standardize=False, mirrors=mirror, progress=False)
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(0))
    assert ds.input_shape == (3, 32, 32) and len(ds.train) == 12 and len(ds.val) == 3
    expect = torch.from_numpy(train_x).float() / 255
    torch.testing.assert_close(ds.train.x, expect[perm[:12]], rtol=0, atol=0)
    assert ds.train.y.tolist() == train_y[perm[:12].numpy()].tolist()
    torch.testing.assert_close(ds.test.x, torch.from_numpy(test_x).float() / 255, rtol=0, atol=0)
    assert ds.test.y.tolist() == test_y.tolist()
    cache = cache_dir(env, "cifar10")
    assert files_in(cache) == ["cifar-10-batches-bin", "cifar-10-binary.tar.gz"]
    assert files_in(cache / "cifar-10-batches-bin") == sorted(CIFAR_BATCHES)
    assert not (cache / "evil.bin").exists() and not (env / "xdg" / "stelab" / "evil.bin").exists()
    # second load: no HTTP, per-channel standardisation with the training statistics
    n = len(server.requests)
    std = data.load("cifar10", val_size=3, progress=False)
    assert len(server.requests) == n
    raw = train_x[perm[:12].numpy()].astype(np.float64) / 255
    np.testing.assert_allclose(std.mean, raw.mean(axis=(0, 2, 3)), atol=1e-12)
    np.testing.assert_allclose(std.std, raw.std(axis=(0, 2, 3)), atol=1e-12)


def test_cifar10_archive_in_data_dir_is_verified_and_extracted(env, monkeypatch):
    _, (test_x, _), archive, res = make_cifar()
    monkeypatch.setitem(data.RESOURCES, "cifar10", res)
    d = env / "mine"
    d.mkdir()
    (d / "cifar-10-binary.tar.gz").write_bytes(archive)
    ds = data.load("cifar10", data_dir=d, download=False, val_size=3, standardize=False)
    assert (d / "cifar-10-batches-bin" / "test_batch.bin").is_file()
    assert "extracted from" in ds.source
    torch.testing.assert_close(ds.test.x, torch.from_numpy(test_x).float() / 255, rtol=0, atol=0)
    # a corrupt archive is refused with the expected checksum
    e = env / "bad"
    e.mkdir()
    (e / "cifar-10-binary.tar.gz").write_bytes(archive[:-100])
    with pytest.raises(DataError, match=res.files[0].sha256):
        data.load("cifar10", data_dir=e, download=False, val_size=3)


def test_cifar10_truncated_batch_file(env, monkeypatch):
    _, _, archive, res = make_cifar()
    monkeypatch.setitem(data.RESOURCES, "cifar10", res)
    d = env / "mine"
    d.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for name in CIFAR_BATCHES:
            src = tar.extractfile(f"cifar-10-batches-bin/{name}")
            (d / name).write_bytes(src.read())
    (d / "data_batch_3.bin").write_bytes((d / "data_batch_3.bin").read_bytes()[:-5])
    with pytest.raises(DataError, match="data_batch_3.bin"):
        data.load("cifar10", data_dir=d, download=False, val_size=3)


# --- digits ------------------------------------------------------------------------------------


def test_digits_split_shapes_and_determinism():
    from sklearn.datasets import load_digits

    a = data.load("digits")
    b = data.load("digits")
    assert (len(a.train), len(a.val), len(a.test)) == (1257, 180, 360)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert a.train.x.shape == (1257, 1, 8, 8) and a.train.x.dtype == torch.float32
    for s, t in zip((a.train, a.val, a.test), (b.train, b.val, b.test), strict=True):
        assert torch.equal(s.x, t.x) and torch.equal(s.y, t.y)
    # raw values partition the 1797 bundled images exactly
    raw = data.load("digits", standardize=False)
    allx = torch.cat([raw.train.x, raw.val.x, raw.test.x]).reshape(1797, 64) * 16
    sk = load_digits()
    assert torch.equal(allx.round().to(torch.int64).sum(0), torch.from_numpy(sk.data).long().sum(0))
    ally = torch.cat([raw.train.y, raw.val.y, raw.test.y])
    assert torch.equal(ally.bincount(), torch.from_numpy(sk.target).bincount())
    # another seed moves the train/val boundary but not the test set
    c = data.load("digits", seed=3, standardize=False)
    assert torch.equal(c.test.x, raw.test.x) and not torch.equal(c.val.x, raw.val.x)
    assert abs(float(a.train.x.mean())) < 1e-5


# --- psa-toy -------------------------------------------------------------------------------------


def test_psa_toy_matches_the_spec():
    ds = data.load("psa-toy")
    x, y = ds.train
    assert x.shape == (200, 2) and ds.num_classes == 2
    assert (y == 1).sum() == 100 and (y == -1).sum() == 100
    pos, neg = x[y == 1], x[y == -1]
    assert (pos[:, 0].abs() <= math.pi / 2).all() and ((pos[:, 1] >= 0) & (pos[:, 1] <= 1)).all()
    assert (neg[:, 0].abs() <= math.pi / 2).all() and (neg[:, 1] >= -1).all()
    assert (neg[:, 1] < torch.cos(neg[:, 0])).all()
    again = data.load("psa-toy", seed=1)
    assert torch.equal(again.train.x, x) and torch.equal(again.train.y, y)
    other = data.load("psa-toy", seed=2)
    assert not torch.equal(other.train.x, x)
    d64 = data.load("psa-toy", dtype=torch.float64, labels="01")
    assert d64.train.x.dtype == torch.float64 and d64.train.y.dtype == torch.int64
    assert d64.train.y.tolist() == [1] * 100 + [0] * 100


def test_psa_toy_distribution():
    """Moments of a large draw against closed forms of the stated distribution."""
    n = 20000
    ds = data.load("psa-toy", n_per_class=n, dtype=torch.float64)
    x, y = ds.train
    pos, neg = x[:n], x[n:]
    # class +1: uniform rectangle
    assert float(pos[:, 0].mean()) == pytest.approx(0, abs=4 * (math.pi / math.sqrt(12)) / n**0.5)
    assert float(pos[:, 1].mean()) == pytest.approx(0.5, abs=4 * (1 / math.sqrt(12)) / n**0.5)
    # class -1: accepted with prob (1 + cos x)/2, so E[cos x] = (2 + π/2)/(π + 2)
    # (not the 2/π of the proposal) and E[y] = -π / (4 (π + 2))
    assert float(torch.cos(neg[:, 0]).mean()) == pytest.approx(
        (2 + math.pi / 2) / (math.pi + 2), abs=4 * 0.3 / n**0.5
    )
    assert float(neg[:, 1].mean()) == pytest.approx(
        -math.pi / (4 * (math.pi + 2)), abs=4 * 0.5 / n**0.5
    )
    assert (neg[:, 1] < torch.cos(neg[:, 0])).all()


def test_psa_toy_val_test_and_limit():
    ds = data.load("psa-toy", n_val_per_class=5, n_test_per_class=7, limit=11)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (11, 10, 14)
    assert (ds.train.y == 1).sum() == 6 and (ds.train.y == -1).sum() == 5
    base = data.load("psa-toy")
    assert torch.equal(base.train.x[:6], ds.train.x[:6])


# --- teacher --------------------------------------------------------------------------------------


def test_teacher_labels_follow_the_formula():
    ds = data.load("teacher", m=4, n=6, n_train=3000, n_test=50, val_size=20, dtype="float64")
    v, w = ds.meta["v_star"], ds.meta["w_star"]
    assert ds.train.x.shape == (3000, 4, 6) and ds.input_shape == (4, 6)
    assert ds.num_classes is None and float(w.norm()) == pytest.approx(1, abs=1e-12)
    z = ds.train.x
    for i in range(5):  # per-sample, as written: y = sum_j v_j 1{z_j . w > 0}
        expect = sum(float(v[j]) * float(z[i, j] @ w > 0) for j in range(4))
        assert float(ds.train.y[i]) == pytest.approx(expect, abs=1e-12)
    expect = torch.einsum("j,nj->n", v, (torch.einsum("njk,k->nj", z, w) > 0).double())
    torch.testing.assert_close(ds.train.y, expect, rtol=0, atol=1e-12)
    # each indicator is Bernoulli(1/2): E[y] = (1ᵀv*)/2, Var[y] = ‖v*‖²/4
    sd = float(v.norm()) / 2
    assert float(ds.train.y.mean()) == pytest.approx(float(v.sum()) / 2, abs=4 * sd / 3000**0.5)
    assert float(z.mean()) == pytest.approx(0, abs=4 / (3000 * 24) ** 0.5)


def test_teacher_given_parameters_seed_and_limit():
    v = [1.0, -2.0, 0.5]
    ds = data.load("teacher", m=3, n=2, v_star=v, w_star=[3.0, 4.0], n_test=10, val_size=5)
    assert ds.meta["v_star"].tolist() == v
    assert ds.meta["w_star"].tolist() == pytest.approx([0.6, 0.8])
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.float32
    expect = data.teacher_labels(ds.test.x, ds.meta["v_star"], ds.meta["w_star"])
    torch.testing.assert_close(ds.test.y.double(), expect, rtol=0, atol=1e-6)
    small = data.load(
        "teacher", m=3, n=2, v_star=v, w_star=[3.0, 4.0], n_test=10, val_size=5, limit=7
    )
    assert len(small.train) == 7 and torch.equal(small.test.x, ds.test.x)
    assert torch.equal(small.train.x, ds.train.x[:7])
    # v*, w* are drawn even when given: the inputs depend only on the seed
    drawn = data.load("teacher", m=3, n=2, n_test=10, val_size=5)
    assert torch.equal(drawn.test.x, ds.test.x)
    other = data.load("teacher", m=3, n=2, n_test=10, val_size=5, seed=1)
    assert not torch.equal(other.test.x, ds.test.x)


# --- batching -------------------------------------------------------------------------------------


def test_batches_cover_each_index_once_and_are_deterministic():
    n = 103
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    y = torch.arange(n)
    g = torch.Generator().manual_seed(5)
    seen = []
    sizes = []
    for xb, yb in data.batches(x, y, 10, generator=g):
        assert torch.equal(xb[:, 0].long(), yb)
        seen += yb.tolist()
        sizes.append(len(yb))
    assert sorted(seen) == list(range(n)) and sizes == [10] * 10 + [3]
    assert seen != list(range(n))
    again = [
        yb.tolist() for _, yb in data.batches(x, y, 10, generator=torch.Generator().manual_seed(5))
    ]
    assert sum(again, []) == seen
    # the next epoch from the same generator is a different permutation
    nxt = sum((yb.tolist() for _, yb in data.batches(x, y, 10, generator=g)), [])
    assert sorted(nxt) == list(range(n)) and nxt != seen
    dropped = list(data.batches(x, y, 10, generator=g, drop_last=True))
    assert [len(b[1]) for b in dropped] == [10] * 10
    ordered = list(data.batches(x, y, 50, shuffle=False))
    assert [b[1].tolist() for b in ordered] == [
        list(range(50)),
        list(range(50, 100)),
        [100, 101, 102],
    ]


def test_batches_augment_loader_and_errors():
    x, y = torch.randn(20, 1, 4, 4), torch.arange(20)
    out = list(data.batches(x, y, 8, shuffle=False, augment=lambda b: b * 2))
    torch.testing.assert_close(out[0][0], x[:8] * 2)
    loader = data.Loader(x, y, 8, seed=0)
    assert len(loader) == 3 and data.num_batches(20, 8, drop_last=True) == 2
    e1 = torch.cat([yb for _, yb in loader])
    e2 = torch.cat([yb for _, yb in loader])
    assert sorted(e1.tolist()) == sorted(e2.tolist()) == list(range(20))
    assert not torch.equal(e1, e2)
    assert torch.equal(e1, torch.cat([yb for _, yb in data.Loader(x, y, 8, seed=0)]))
    with pytest.raises(ConfigError, match="batch_size"):
        data.batches(x, y, 0)
    with pytest.raises(ConfigError, match="same number of rows"):
        data.batches(x, y[:5], 4)


def reference_flip_crop(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Per-sample loop with the documented draws: flip, dy, dx for the whole batch."""
    b, _, h, w = x.shape
    flips = torch.rand(b, generator=g) < 0.5
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    out = torch.empty_like(x)
    for i in range(b):
        p = F.pad(x[i], (pad, pad, pad, pad))
        crop = p[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out, flips, dy, dx


def test_flip_crop_matches_per_sample_reference():
    x = torch.randn(64, 3, 32, 32)
    aug = data.flip_crop(4, generator=torch.Generator().manual_seed(7))
    got = aug(x)
    expect, flips, dy, dx = reference_flip_crop(x, 4, torch.Generator().manual_seed(7))
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    # the draws are not degenerate: both flips, shifted crops (with zero borders)
    assert flips.any() and not flips.all() and (dy != 4).any() and (dx != 4).any()
    assert not torch.equal(got, x)
    # pad=0 only flips
    only = data.flip_crop(0, generator=torch.Generator().manual_seed(1))(x)
    f = torch.rand(64, generator=torch.Generator().manual_seed(1)) < 0.5
    torch.testing.assert_close(only[f], x[f].flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(only[~f], x[~f], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="pad"):
        data.flip_crop(-1)
    with pytest.raises(ConfigError):
        aug(torch.randn(3, 32, 32))


def test_flip_crop_as_batches_augment():
    x, y = torch.randn(10, 3, 8, 8), torch.arange(10)
    aug = data.flip_crop(2, generator=torch.Generator().manual_seed(0))
    for xb, yb in data.batches(x, y, 4, shuffle=False, augment=aug):
        assert xb.shape == (len(yb), 3, 8, 8)


# --- containers ----------------------------------------------------------------------------------


def test_splits_repr_unpack_and_to():
    ds = data.load("psa-toy", n_test_per_class=2)
    x, y = ds.test
    assert x.shape == (4, 2) and "psa-toy" in repr(ds) and "train=200" in repr(ds)
    assert isinstance(ds.to("cpu"), data.Splits)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "x"  # type: ignore[misc]
    assert issubclass(DataError, OSError) and issubclass(DataError, StelabError)


# --- the real Fashion-MNIST from Debian ----------------------------------------------------------

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not DEBIAN_FMNIST.is_dir(),
    reason="Debian's Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)
def test_debian_fashion_mnist(env):
    ds = data.load("fashion-mnist", download=False, progress=False)
    assert str(DEBIAN_FMNIST) in ds.source
    assert (len(ds.train) + len(ds.val), len(ds.test)) == (60000, 10000)
    assert len(ds.val) == 5000 and ds.input_shape == (1, 28, 28)
    ally = torch.cat([ds.train.y, ds.val.y])
    assert ally.bincount().tolist() == [6000] * 10
    assert ds.test.y.bincount().tolist() == [1000] * 10
    assert int(ally.min()) == 0 and int(ally.max()) == 9
    assert 0.2 < ds.mean[0] < 0.4 and os.path.isdir(DEBIAN_FMNIST)


def test_splits_from_tensors_and_its_errors():
    import torch

    from stelab.data import Splits
    from stelab.errors import ConfigError, StelabTypeError

    x, y = torch.randn(12, 1, 4, 4), torch.arange(12) % 3
    s = Splits.from_tensors((x[:8], y[:8]), test=(x[8:], y[8:] + 4))
    assert (len(s.train), len(s.val), len(s.test)) == (8, 0, 4)
    assert s.num_classes == 7 and s.input_shape == (1, 4, 4)  # max label 6 is in test
    assert s.val.x.shape == (0, 1, 4, 4) and s.val.y.dtype == y.dtype
    assert torch.equal(s.train.x, x[:8])
    reg = Splits.from_tensors((x, torch.randn(12)))
    assert reg.num_classes is None
    with pytest.raises(ConfigError, match=r"val: x and y must have as many rows"):
        Splits.from_tensors((x, y), val=(x, y[:3]))
    with pytest.raises(StelabTypeError, match="test must be an"):
        Splits.from_tensors((x, y), test=x)
    with pytest.raises(ConfigError, match="at least one row"):
        Splits.from_tensors((x[:0], y[:0]))
