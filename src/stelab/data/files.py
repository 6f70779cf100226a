"""Where dataset files live, how they are fetched, verified and parsed.

Search order for a dataset's files (first complete set wins):

1. ``data_dir`` (the argument), then ``data_dir/<name>``;
2. each directory in ``$STELAB_DATA`` (``os.pathsep``-separated), then ``<dir>/<name>``;
3. the user cache ``$XDG_CACHE_HOME/stelab/<name>`` (default ``~/.cache/stelab/<name>``);
4. system directories, e.g. Debian's ``/usr/share/datasets/fashion-mnist``
   (package ``dataset-fashion-mnist``).

Downloads go to ``data_dir`` when it is given, else to the user cache. Every file is
downloaded to a temporary file in the destination directory, checked against the
SHA-256 in :data:`RESOURCES`, and only then renamed into place (``os.replace``), so an
interrupted, failed or corrupt download leaves nothing behind.

The base URL can be overridden with the ``mirrors`` argument or ``$STELAB_MIRROR``
(files are then fetched from ``$STELAB_MIRROR/<name>/<filename>``).

No pickle is read anywhere: MNIST-style data come as IDX files, CIFAR-10 as its
binary release (3073-byte records).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tarfile
import tempfile
import urllib.error
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stelab.errors import DataError

__all__ = ["RESOURCES", "RemoteFile", "Resource", "cache_root"]

ENV_DATA = "STELAB_DATA"
ENV_MIRROR = "STELAB_MIRROR"
TIMEOUT_S = 60.0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One published file of a dataset and what it must hash to.

    Attributes:
        role: what the file holds (``train_images``, ``test_labels``, ``archive``).
        filename: the published file name (appended to a mirror's base URL).
        sha256: SHA-256 of the file exactly as published (checked on download).
        size: size in bytes as published, or None. A download reads at most this
            many bytes (a longer body is rejected as soon as it passes the size) and
            its progress bar uses it when the server sends no ``Content-Length``.
        md5: the MD5 published by the authors / torchvision (provenance only).
        content_sha256: SHA-256 of the decompressed content of a ``.gz`` file. It is
            checked on every load, so a copy recompressed by someone else (Debian's
            ``dataset-fashion-mnist`` strips the gzip name field) or stored
            uncompressed is verified too. None: not checked.
    """

    role: str
    filename: str
    sha256: str
    size: int | None = None
    md5: str | None = None
    content_sha256: str | None = None


@dataclass(frozen=True)
class Resource:
    """A downloadable dataset: its mirrors, files and local install locations."""

    name: str
    mirrors: tuple[str, ...]
    files: tuple[RemoteFile, ...]
    system_dirs: tuple[str, ...] = ()
    install_hint: str | None = None

    def file(self, role: str) -> RemoteFile:
        """The file with the given role."""
        for f in self.files:
            if f.role == role:
                return f
        raise KeyError(role)


# Checksum table.
# - URLs and MD5s: torchvision's torchvision/datasets/mnist.py (MNIST, FashionMNIST
#   classes: `mirrors`, `resources`) and the CIFAR-10 home page
#   (https://www.cs.toronto.edu/~kriz/cifar.html, "CIFAR-10 binary version").
# - SHA-256 of the published archives: not published by the authors; the values are
#   the ones TensorFlow Datasets' url_checksums and many independent projects record
#   (the same digests in every copy checked). Downloads are verified against them.
# - SHA-256 of the decompressed IDX contents: recorded likewise by independent
#   projects; for Fashion-MNIST they were recomputed here from Debian's
#   dataset-fashion-mnist 0.0~git20200523.55506a9-1 files and match. These are checked
#   on every load, whatever the compression of the local copy.
RESOURCES: dict[str, Resource] = {
    "mnist": Resource(
        name="mnist",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        files=(
            RemoteFile(
                "train_images",
                "train-images-idx3-ubyte.gz",
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                9912422,
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            ),
            RemoteFile(
                "train_labels",
                "train-labels-idx1-ubyte.gz",
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                28881,
                "d53e105ee54ea40749a09fcbcd1e9432",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            ),
            RemoteFile(
                "test_images",
                "t10k-images-idx3-ubyte.gz",
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                1648877,
                "9fb629c4189551a2d022fa330f9573f3",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            ),
            RemoteFile(
                "test_labels",
                "t10k-labels-idx1-ubyte.gz",
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                4542,
                "ec29112dd5afa0611ce80d1b7f02629c",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            ),
        ),
    ),
    "fashion-mnist": Resource(
        name="fashion-mnist",
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        files=(
            RemoteFile(
                "train_images",
                "train-images-idx3-ubyte.gz",
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                26421880,
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            ),
            RemoteFile(
                "train_labels",
                "train-labels-idx1-ubyte.gz",
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                29515,
                "25c81989df183df01b3e8a0aad5dffbe",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            ),
            RemoteFile(
                "test_images",
                "t10k-images-idx3-ubyte.gz",
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                4422102,
                "bef4ecab320f06d8554ea6380940ec79",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            ),
            RemoteFile(
                "test_labels",
                "t10k-labels-idx1-ubyte.gz",
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                5148,
                "bb300cfdad3c16e7a12a480ee83cd310",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
        ),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        install_hint="apt-get install dataset-fashion-mnist",
    ),
    "cifar10": Resource(
        name="cifar10",
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        files=(
            RemoteFile(
                "archive",
                "cifar-10-binary.tar.gz",
                "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                170052171,
                "c32a1d4ab5d03f1284b67883e8d87530",
            ),
        ),
    ),
}


# --- locations ----------------------------------------------------------------------


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/stelab`` (default ``~/.cache/stelab``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "stelab"


def search_dirs(name: str, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """The directories searched for dataset ``name``, in order (see module docs)."""
    dirs: list[Path] = []
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        dirs += [d, d / name]
    for entry in os.environ.get(ENV_DATA, "").split(os.pathsep):
        if entry:
            d = Path(entry).expanduser()
            dirs += [d, d / name]
    dirs.append(cache_root() / name)
    res = RESOURCES.get(name)
    if res is not None:
        dirs += [Path(s) for s in res.system_dirs]
    return dirs


def download_dir(name: str, data_dir: str | os.PathLike[str] | None) -> Path:
    """Where downloads of ``name`` go: ``data_dir`` if given, else the user cache."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return cache_root() / name


def mirror_urls(name: str, mirrors: Sequence[str] | str | None) -> list[str]:
    """Base URLs to try, in order: ``mirrors``, else ``$STELAB_MIRROR/<name>/``, else the table."""
    if isinstance(mirrors, str):
        mirrors = [mirrors]
    if mirrors:
        return [m if m.endswith("/") else m + "/" for m in mirrors]
    env = os.environ.get(ENV_MIRROR)
    if env:
        return [f"{env.rstrip('/')}/{name}/"]
    return list(RESOURCES[name].mirrors)


def download_command(name: str) -> str:
    """The shell command that downloads ``name`` (no CLI is assumed)."""
    return f"python -c \"import stelab.data as d; d.download('{name}')\""


def missing_error(name: str, searched: Sequence[Path], why: str) -> DataError:
    """A one-line DataError: what is missing, where we looked, how to get it."""
    places = ", ".join(str(p) for p in searched)
    env = os.environ.get(ENV_DATA)
    env_txt = f"${ENV_DATA}={env}" if env else f"${ENV_DATA} unset"
    hints = []
    res = RESOURCES.get(name)
    if res is not None and res.install_hint:
        hints.append(f"`{res.install_hint}`")
    hints.append(f"`{download_command(name)}`")
    return DataError(
        f"dataset {name!r} not found ({why}); searched: {places} ({env_txt}); "
        f"get it with {' or '.join(hints)}, or pass data_dir= a directory holding its files"
    )


# --- checksums and downloads ------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, expected: str) -> None:
    """Raise DataError unless ``path`` hashes to ``expected`` (SHA-256)."""
    got = sha256_file(path)
    if got != expected:
        raise DataError(
            f"{path} is corrupt or not the expected file: sha256 {got}, expected {expected}; "
            "delete it to download it again"
        )


def fetch(
    name: str,
    remote: RemoteFile,
    dest_dir: Path,
    *,
    mirrors: Sequence[str] | str | None = None,
    progress: bool = True,
) -> Path:
    """Download ``remote`` into ``dest_dir`` from the first mirror that serves it intact.

    The bytes go to a temporary file in ``dest_dir``; it is renamed to its final name
    only after its SHA-256 matched. Raises DataError listing every mirror's failure.
    """
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the download directory {dest_dir}: {e}") from e
    if not os.access(dest_dir, os.W_OK):
        raise DataError(f"cannot write to the download directory {dest_dir}")
    dest = dest_dir / remote.filename
    failures = []
    for base in mirror_urls(name, mirrors):
        url = base + remote.filename
        try:
            _fetch_one(url, dest, remote, progress)
            return dest
        except DataError as e:
            failures.append(f"{url}: {e}")
        except (OSError, http.client.HTTPException, ValueError) as e:
            failures.append(f"{url}: {_describe(e)}")
    raise DataError(f"could not download {remote.filename} of {name!r}: " + "; ".join(failures))


def _describe(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return f"{e.reason}"
    if isinstance(e, http.client.IncompleteRead):
        return f"connection closed after {len(e.partial)} bytes (interrupted download)"
    return f"{type(e).__name__}: {e}"


MAX_UNSIZED_BYTES = 1 << 30
"""The cap on a download whose :class:`RemoteFile` gives no ``size`` (1 GiB, or the
server's ``Content-Length`` if that is smaller)."""


def _max_size(length: str | None) -> int:
    if length and length.isdigit():
        return min(int(length), MAX_UNSIZED_BYTES)
    return MAX_UNSIZED_BYTES


def _fetch_one(url: str, dest: Path, remote: RemoteFile, progress: bool) -> None:
    import urllib.request

    fd, tmp_name = tempfile.mkstemp(prefix=f".{remote.filename}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    bar = None
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else remote.size
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(
                    total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=remote.filename
                )
            h = hashlib.sha256()
            received = 0
            # read at most the published size (+1 byte to notice a longer body): a
            # mirror that streams without end must not fill the disk before the
            # checksum fails
            cap = remote.size if remote.size is not None else _max_size(length)
            while chunk := resp.read(min(_CHUNK, cap + 1 - received)):
                received += len(chunk)
                if received > cap:
                    raise DataError(
                        f"the server sent more than the expected {cap} bytes of "
                        f"{remote.filename} (download stopped, file discarded)"
                    )
                out.write(chunk)
                h.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if length and length.isdigit() and received != int(length):
                raise DataError(
                    f"connection closed after {received} of {length} bytes (interrupted download)"
                )
            out.flush()
            os.fsync(out.fileno())
        got = h.hexdigest()
        if got != remote.sha256:
            raise DataError(
                f"checksum mismatch for {remote.filename}: sha256 {got}, expected "
                f"{remote.sha256} (file discarded)"
            )
        os.replace(tmp, dest)
    finally:
        if bar is not None:
            bar.close()
        tmp.unlink(missing_ok=True)


# --- IDX (MNIST, Fashion-MNIST) ----------------------------------------------------------


def find_local(dirs: Sequence[Path], filename: str) -> Path | None:
    """``filename`` (or, for ``x.gz``, the uncompressed ``x``) in one directory, if present."""
    for d in dirs:
        for cand in _variants(d, filename):
            if cand.is_file():
                return cand
    return None


def _variants(d: Path, filename: str) -> list[Path]:
    out = [d / filename]
    if filename.endswith(".gz"):
        out.append(d / filename[:-3])
    return out


def read_idx(path: Path, content_sha256: str | None, *, verify: bool = True) -> np.ndarray:
    """Parse an IDX file (gzip'd or raw) into a uint8 array with its declared dims.

    With ``verify``, the decompressed bytes must hash to ``content_sha256``.
    """
    expect = f"expected sha256 of its content {content_sha256}" if content_sha256 else ""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path} is truncated or corrupt ({e}); {expect or 'not a valid gzip file'}; "
            "delete it to download it again"
        ) from e
    if verify and content_sha256 is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != content_sha256:
            raise DataError(
                f"{path} is corrupt or not the expected file: sha256 of its content {got}, "
                f"{expect}; delete it to download it again"
            )
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: header of {ndim} dims incomplete")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != count:
        raise DataError(
            f"{path} is truncated or corrupt: dims {dims} need {count} bytes of data, "
            f"found {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# --- CIFAR-10 binary ------------------------------------------------------------------------

CIFAR_DIR = "cifar-10-batches-bin"
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = ("test_batch.bin",)
CIFAR_RECORD = 1 + 3 * 32 * 32


def read_cifar_bin(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) from CIFAR-10 binary batch files."""
    images, labels = [], []
    for p in paths:
        raw = np.fromfile(p, dtype=np.uint8)
        if raw.size == 0 or raw.size % CIFAR_RECORD:
            raise DataError(
                f"{p} is truncated or corrupt: {raw.size} bytes is not a positive multiple "
                f"of the {CIFAR_RECORD}-byte record"
            )
        rec = raw.reshape(-1, CIFAR_RECORD)
        if int(rec[:, 0].max()) > 9:
            raise DataError(f"{p} is corrupt: labels outside 0..9")
        labels.append(rec[:, 0])
        images.append(rec[:, 1:].reshape(-1, 3, 32, 32))
    return np.concatenate(images), np.concatenate(labels)


def extract_cifar(archive: Path, dest_parent: Path) -> Path:
    """Extract the six CIFAR-10 ``.bin`` batches of ``archive`` into ``dest_parent/CIFAR_DIR``.

    Only the expected member names are read (regular files only, so no path traversal,
    links or devices); they are written to a temporary directory that is renamed into
    place when complete.
    """
    wanted = {f"{CIFAR_DIR}/{n}": n for n in CIFAR_TRAIN + CIFAR_TEST}
    dest_parent.mkdir(parents=True, exist_ok=True)
    final = dest_parent / CIFAR_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{CIFAR_DIR}.", dir=dest_parent))
    try:
        found = set()
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    target = wanted.get(member.name)
                    if target is None or not member.isreg():
                        continue
                    src = tar.extractfile(member)
                    assert src is not None
                    with src, open(tmp / target, "wb") as out:
                        while chunk := src.read(_CHUNK):
                            out.write(chunk)
                    found.add(target)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise DataError(f"{archive} is truncated or corrupt ({e})") from e
        missing = sorted(set(wanted.values()) - found)
        if missing:
            raise DataError(f"{archive} lacks the CIFAR-10 members {', '.join(missing)}")
        try:
            os.replace(tmp, final)
        except OSError:
            if not all((final / n).is_file() for n in wanted.values()):
                raise
    finally:
        if tmp.exists():
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return final
