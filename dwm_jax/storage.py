"""One file-system layer for every path the package reads or writes: local paths as plain
files, cloud buckets (``gs://bucket/...``) through etils.epath and gcsfs, the layer Orbax
and TFDS use.

    storage.check(path, "--workdir")          # StorageError (one line) for a bad scheme
    with storage.open(path, "w") as f: ...    # local or gs://
    storage.write_atomic(path, text)          # readers see the old or the new content

What differs on a bucket, and how this module keeps the guarantees of a local disk:

* atomic writes: an object appears only when its upload completes, so a single-object
  write is atomic (a local file is written to ``.tmp`` and renamed);
* moving a folder aside (a damaged checkpoint) copies every object, then deletes the
  originals: not atomic, but nothing is deleted before its copy exists;
* appending (``metrics.jsonl``) rewrites the whole object;
* listings are read fresh (gcsfs's listing cache is off), since other hosts write too;
* array_record readers need local files: :func:`mirror` keeps a checked local copy of a
  folder in a bucket (``DWM_JAX_CACHE``, default ``~/.cache/dwm_jax``).

A path whose first component looks like a URL that lost a slash (``gs:/bucket``) is
refused: nothing ever creates a local folder named after a URL.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import urllib.parse

log = logging.getLogger(__name__)

SCHEMES = {"gs": "gcsfs"}     # scheme -> the client library that serves it
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_MANGLED = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/?(?!/)")
_KNOWN_SCHEMES = ("gs", "s3", "az", "hf", "http", "https", "file")


class StorageError(ValueError):
    """A path of an unsupported scheme, a bucket that cannot be reached, a missing client."""


def is_url(path) -> bool:
    return bool(_URL.match(str(path)))


def check(path: str, what: str = "path") -> str:
    """``path`` unchanged when this layer can serve it; else StorageError naming ``what``
    (e.g. the flag). Checks the scheme and its client library, not the network."""
    path = os.fspath(path)
    m = _URL.match(path)
    if m is None:
        bad = _MANGLED.match(path)
        if bad and bad.group(1).lower() in _KNOWN_SCHEMES:
            raise StorageError(f"{what} {path!r} looks like a URL that lost a slash; write "
                               f"{bad.group(1)}://...")
        return path
    scheme = m.group(1).lower()
    if scheme not in SCHEMES:
        raise StorageError(f"{what} {path!r}: the scheme {scheme}:// is not supported "
                           f"(local paths and {', '.join(s + '://' for s in SCHEMES)})")
    try:
        __import__(SCHEMES[scheme])
    except ImportError:
        raise StorageError(f"{what} {path!r} needs {SCHEMES[scheme]}: pip install "
                           "'dwm_jax[gcs]'") from None
    _configure_gcsfs()
    return path


def local_only(path: str, what: str) -> str:
    """``path`` when it is a local path; StorageError for a URL (or one that lost a slash),
    for tools that write only on this machine."""
    if is_url(check(path, what)):
        raise StorageError(f"{what} {path!r}: this tool writes on this machine only; give a "
                           "local path")
    return path


def _configure_gcsfs() -> None:
    """Fresh listings (other hosts write the same bucket), and no probing of the bucket's
    layout over gRPC (a minute's wait where that service is absent, e.g. a test server)."""
    import fsspec
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
    # each retry is logged with its traceback; the error, when it comes, is raised once
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


def check_reachable(path: str, what: str = "path") -> None:
    """StorageError in one line when the bucket of URL ``path`` cannot be reached (no
    server, no credentials, no such bucket). Local paths pass."""
    check(path, what)
    if not is_url(path):
        return
    bucket = "/".join(path.split("/")[:3])
    _check_endpoint(path, what)
    import fsspec
    try:
        fsspec.filesystem(path.split("://", 1)[0]).info(bucket)
        ok = True
    except FileNotFoundError:
        ok = False
    except Exception as e:  # aiohttp, auth and HTTP errors: the first cause says which
        raise StorageError(f"{what} {path}: the bucket cannot be reached "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not ok:
        raise StorageError(f"{what} {path}: the bucket {bucket} does not exist")


def _check_endpoint(path: str, what: str) -> None:
    """StorageError at once when nothing answers at the storage endpoint (the clients would
    retry for a minute first)."""
    endpoint = urllib.parse.urlsplit(os.environ.get("STORAGE_EMULATOR_HOST")
                                     or "https://storage.googleapis.com")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=10).close()
    except OSError as e:
        raise StorageError(f"{what} {path}: the bucket cannot be reached (nothing answers at "
                           f"{endpoint.hostname}:{port}: {e.strerror or e})") from None


def _epath(path: str):
    from etils import epath
    return epath.Path(path)


def join(*parts: str) -> str:
    return os.path.join(*parts)


def absolute(path: str) -> str:
    """A local path made absolute; a URL as it is (``os.path`` would fold its ``//``)."""
    return path if is_url(path) else os.path.abspath(path)


def open(path: str, mode: str = "r", **kwargs):
    """``builtins.open`` for a local path; the object's reader or writer for a URL."""
    if is_url(path):
        return _epath(path).open(mode, **kwargs)
    return builtins.open(path, mode, **kwargs)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return _epath(path).is_file() if is_url(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
    if is_url(path):
        return sorted(p.name for p in _epath(path).iterdir())
    return sorted(os.listdir(path))


def makedirs(path: str) -> None:
    """A folder and its parents (a bucket has no folders: nothing to do there)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    if is_url(path):
        _epath(path).unlink()
    else:
        os.remove(path)


def rmtree(path: str) -> None:
    if is_url(path):
        if exists(path):
            _epath(path).rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def walk_files(path: str) -> list[str]:
    """Every file under ``path``, relative to it, sorted."""
    if is_url(path):
        root = path.split("://", 1)[1].rstrip("/")
        out = []
        for folder, _, files in _epath(path).walk():
            folder = str(folder).split("://", 1)[-1].rstrip("/")
            rel = folder[len(root):].lstrip("/")
            out += [f"{rel}/{f}" if rel else str(f) for f in files]
        return sorted(out)
    return sorted(os.path.relpath(os.path.join(d, f), path)
                  for d, _, files in os.walk(path) for f in files)


def write_atomic(path: str, data: str | bytes) -> None:
    """Writes ``data`` so that a reader sees the old or the new content, never a part:
    a local file through ``.tmp`` and a rename, an object in one upload."""
    mode = "wb" if isinstance(data, bytes) else "w"
    if is_url(path):
        with open(path, mode) as f:
            f.write(data)
        return
    with builtins.open(path + ".tmp", mode) as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def create_only(path: str, data: bytes) -> None:
    """Writes ``path`` only where nothing is there: FileExistsError otherwise (an object
    store's create-only precondition, where the server honours it)."""
    if not is_url(path):
        with builtins.open(path, "xb") as f:
            f.write(data)
        return
    import fsspec
    try:
        fsspec.filesystem(path.split("://", 1)[0]).pipe(path, data, mode="create")
    except FileExistsError:
        raise
    except Exception as e:
        if "412" in str(e) or "recondition" in str(e):
            raise FileExistsError(path) from None
        raise


def append_text(path: str, text: str) -> None:
    """Appends ``text`` to a file (to an object: rewrites it whole)."""
    with appender(path) as f:
        f.write(text)


def appender(path: str):
    """A text file opened for appending: a local file, or for a URL a writer that keeps the
    object's text and rewrites the object at each ``flush`` (and at ``close``)."""
    return _ObjectAppender(path) if is_url(path) else builtins.open(path, "a")


class _ObjectAppender:
    def __init__(self, path: str):
        self.path = path
        self.text = read_text(path) if exists(path) else ""
        self.dirty = False

    def write(self, text: str) -> None:
        self.text += text
        self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            write_atomic(self.path, self.text)
            self.dirty = False

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def move(src: str, dst: str) -> None:
    """Renames a file or folder; on a bucket every object is copied, then the originals are
    deleted (a folder is never half-deleted before its copy is whole)."""
    if not is_url(src):
        os.replace(src, dst)
        return
    files = walk_files(src) if isdir(src) else [""]
    for rel in files:
        _copy_object(join(src, rel) if rel else src, join(dst, rel) if rel else dst)
    for rel in files:
        _epath(join(src, rel) if rel else src).unlink()


def _copy_object(src: str, dst: str) -> None:
    _epath(src).copy(_epath(dst), overwrite=True)


def upload_tree(local: str, url: str, last: tuple[str, ...] = ()) -> None:
    """Copies local folder ``local`` to ``url``, the files named in ``last`` after all the
    others (markers whose presence says the folder is whole)."""
    files = walk_files(local)
    for rel in sorted(files, key=lambda r: r in last):
        with builtins.open(os.path.join(local, rel), "rb") as f, open(join(url, rel), "wb") as g:
            shutil.copyfileobj(f, g, 1 << 22)


@contextlib.contextmanager
def local_file(path: str):
    """A local path holding ``path``'s bytes for the block (readers that need a file, e.g.
    torch.load, safetensors): the path itself, or a temporary download of a URL."""
    if not is_url(path):
        yield path
        return
    suffix = os.path.splitext(path)[1]
    with tempfile.TemporaryDirectory(prefix="dwm_jax-") as tmp:
        local = os.path.join(tmp, "file" + suffix)
        with open(path, "rb") as f, builtins.open(local, "wb") as g:
            shutil.copyfileobj(f, g, 1 << 22)
        yield local


@contextlib.contextmanager
def staged(path: str, suffix: str = ".tmp"):
    """A local path to write ``path``'s content to (for writers that need a file name):
    renamed onto a local ``path``, or uploaded to a URL in one piece, when the block ends
    without error; removed otherwise."""
    if not is_url(path):
        tmp = path + suffix
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with tempfile.TemporaryDirectory(prefix="dwm_jax-") as folder:
        tmp = os.path.join(folder, "file" + suffix)
        yield tmp
        with builtins.open(tmp, "rb") as f, open(path, "wb") as g:
            shutil.copyfileobj(f, g, 1 << 22)


def cache_root() -> str:
    return os.environ.get("DWM_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "dwm_jax")


def mirror_path(url: str) -> str:
    """Where :func:`mirror` keeps the local copy of ``url``."""
    scheme, rest = url.split("://", 1)
    return os.path.join(cache_root(), "buckets", scheme, rest.strip("/"))


def mirror(url: str) -> str:
    """A local copy of the file or folder ``url``, downloaded whole on first use (into a
    temporary name renamed when complete) and reused while the bucket's listing (names,
    sizes, generations) is the one it was copied from. -> the local path."""
    local = mirror_path(url)
    listing = _listing(url)
    stamp = local.rstrip("/") + ".listing.json"
    if os.path.exists(local) and _local_bytes(stamp) == listing:
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=os.path.dirname(local))
    try:
        for rel in json.loads(listing) or {"": 0}:
            target = os.path.join(tmp, rel) if rel else os.path.join(tmp, "file")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(join(url, rel) if rel else url, "rb") as f, \
                    builtins.open(target, "wb") as g:
                shutil.copyfileobj(f, g, 1 << 22)
        if os.path.isdir(local):
            shutil.rmtree(local)
        elif os.path.exists(local):
            os.remove(local)
        os.replace(tmp if isdir(url) else os.path.join(tmp, "file"), local)
        with builtins.open(stamp, "wb") as f:
            f.write(listing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.warning("read %s through its local copy %s", url, local)
    return local


def mirrored(url: str) -> None:
    """Records that the local copy of ``url`` equals it now (after uploading that copy)."""
    with builtins.open(mirror_path(url).rstrip("/") + ".listing.json", "wb") as f:
        f.write(_listing(url))


def _listing(url: str) -> bytes:
    """{relative name: [size, generation]} of every object under ``url`` (one listing)."""
    import fsspec
    fs = fsspec.filesystem(url.split("://", 1)[0])
    if not fs.isdir(url):
        info = fs.info(url)   # FileNotFoundError names it
        return json.dumps({"": [info.get("size"), info.get("generation")]}).encode()
    root = url.split("://", 1)[1].rstrip("/")
    found = fs.find(url, detail=True)
    return json.dumps({name[len(root):].lstrip("/"): [i.get("size"), i.get("generation")]
                       for name, i in sorted(found.items())}, sort_keys=True).encode()


def localise(path: str) -> str:
    """``path`` itself, or for a URL its local copy (:func:`mirror`): for readers that need
    local files (audio folders, their tables)."""
    return mirror(path) if path and is_url(path) else path


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _local_bytes(path: str) -> bytes | None:
    return _read_bytes(path) if os.path.exists(path) else None


def digest(path: str) -> str:
    """sha256 of a file's bytes (local or URL)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
