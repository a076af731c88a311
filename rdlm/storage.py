"""Every path a user gives, local or `gs://`: one layer on etils.epath, with gcsfs behind `gs://`.

    from rdlm import storage
    storage.path("~/runs/tiny")                   # an absolute epath.Path ("~" expanded)
    storage.glob("gs://bucket/data/*.parquet")    # sorted files; "**" recurses
    storage.read_bytes(p), storage.write_text(p, s), storage.open(p, "rb"), storage.exists(p)
    with storage.atomic_write(p) as f: ...        # nothing half-written is ever seen at `p`

Local paths behave as plain files do. A failed `gs://` operation ends in one sentence that names the
path and what to do (no such bucket, no credentials, no access) instead of an HTTP traceback.
"""

import contextlib
import glob as stdlib_glob
import importlib.util
import io
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator

from etils import epath

GCS_EXTRA = "pip install 'rdlm[gcs]'"
CREDENTIALS_HINT = (
    "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service-account "
    "key file; on a Cloud TPU or GCE VM, give the VM's service account access to the bucket"
)
_MAGIC = frozenset("*?[")


class _DropRaisedErrors(logging.Filter):
    """Drops gcsfs's log of a failed request (a traceback): the error it raises next is explained instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.funcName == "retry_request")


logging.getLogger("gcsfs").addFilter(_DropRaisedErrors())


class NotFound(FileNotFoundError):
    """A path, bucket or glob match that does not exist, explained in one sentence."""


class AccessDenied(PermissionError):
    """A remote operation refused for lack of credentials or permission, explained in one sentence."""


def is_remote(p) -> bool:
    """True for a URL such as gs://bucket/key."""
    return "://" in os.fspath(p)


def path(p) -> epath.Path:
    """The epath of `p`: URLs as given; local paths with "~" expanded, made absolute (Orbax needs that)."""
    text = os.fspath(p)
    if not text:
        raise ValueError("An empty path was given; pass a local path or a gs:// URL.")
    if not is_remote(text):
        return epath.Path(text).expanduser().resolve()
    if text.startswith("gs://") and importlib.util.find_spec("gcsfs") is None:
        raise ValueError(f"{text} is a gs:// path, which needs gcsfs: {GCS_EXTRA}.")
    return epath.Path(text)


def local_path(p) -> str | None:
    """The operating-system path of a local `p` (for libraries that need one, e.g. np.memmap); None if remote."""
    return None if is_remote(p) else os.fspath(path(p))


def _filesystem(url: str):
    import fsspec  # behind epath already; used directly only for listings with file types

    return fsspec.core.url_to_fs(url)[0]


def _bucket(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


def _access_problem(url: str) -> str:
    """Why access to `url` may have been refused: no credentials at all, or credentials without access."""
    try:
        method = getattr(getattr(_filesystem(url), "credentials", None), "method", None)
    except Exception:  # the filesystem itself could not be built: its error is the one to show
        method = None
    if method == "anon":
        return "no Google credentials were found"
    return "the credentials in use have no access to it" + (f" (gcsfs method {method!r})" if method else "")


def _list_one(url: str) -> None:
    """Lists at most one object of the bucket of `url`: 404 if the bucket does not exist, 401/403 without access
    (the objects.list permission, which anyone who may read or write the bucket's objects has)."""
    _filesystem(url).call("GET", "b/{}/o", _bucket(url), maxResults=1, json_out=True)


def _bucket_missing(url: str) -> bool:
    """True if the bucket of `url` is known not to exist; False if it exists or cannot be checked."""
    if not url.startswith("gs://"):
        return False
    try:
        _list_one(url)
    except FileNotFoundError:
        return True
    except Exception:
        return False
    return False


def _explain(url: str, error: Exception) -> Exception | None:
    """The one-sentence error for a failed operation on remote `url`, or None to keep `error` as it is."""
    if isinstance(error, (NotFound, AccessDenied)) or not is_remote(url):
        return None
    text = str(error)
    code = getattr(error, "code", None)
    denied = code in (401, 403) or text.startswith("Forbidden") or type(error).__module__.startswith("google.auth")
    if denied:
        return AccessDenied(f"Access to {url} was refused: {_access_problem(url)}; {CREDENTIALS_HINT}.")
    if isinstance(error, FileNotFoundError):
        if _bucket_missing(url):
            return NotFound(
                f"{url}: the bucket {_bucket(url)!r} does not exist (or these credentials cannot see it); "
                "check the bucket name."
            )
        return NotFound(f"{url} does not exist.")
    return None


@contextlib.contextmanager
def explained(p) -> Iterator[None]:
    """Turns the errors of a remote operation on `p` into one sentence (see `_explain`)."""
    try:
        yield
    except Exception as e:
        better = _explain(os.fspath(p), e)
        if better is None:
            raise
        raise better from e


def exists(p) -> bool:
    target = path(p)
    with explained(target):
        return target.exists()


def is_file(p) -> bool:
    target = path(p)
    with explained(target):
        return target.is_file()


def _text(f, mode: str):
    """`f` as UTF-8 text for a text mode (epath leaves the encoding to the locale)."""
    return f if "b" in mode else io.TextIOWrapper(f, encoding="utf-8")


def open(p, mode: str = "r", *, random_access: bool = False):  # noqa: A001 (the layer's own open)
    """The file object of `p`; text is UTF-8. Binary reads seek on gs:// too (pyarrow relies on that).

    `random_access=True` (reading chosen byte ranges: parquet row groups, safetensors tensors) turns off
    gcsfs's read-ahead, which would fetch and buffer up to 256 MB past each read in the background.
    """
    target = path(p)
    with explained(target):
        if random_access and is_remote(target) and mode == "rb":
            return _filesystem(os.fspath(target)).open(os.fspath(target), "rb", cache_type="none")
        return _text(target.open(mode.replace("b", "") + "b"), mode)


def read_bytes(p) -> bytes:
    target = path(p)
    with explained(target):
        return target.read_bytes()


def read_text(p) -> str:
    return read_bytes(p).decode("utf-8")


def write_bytes(p, data: bytes) -> None:
    with atomic_write(p, "wb") as f:
        f.write(data)


def write_text(p, text: str) -> None:
    with atomic_write(p, "w") as f:
        f.write(text)


def makedirs(p) -> epath.Path:
    """Creates a local directory and its parents; for gs:// (no directories) checks that the bucket exists."""
    target = path(p)
    if is_remote(target):
        url = os.fspath(target)
        if url.startswith("gs://"):
            try:
                with explained(url):
                    _list_one(url)
            except NotFound:
                message = f"{url}: the bucket {_bucket(url)!r} does not exist; create it or fix the name."
                raise NotFound(message) from None
        return target
    target.mkdir(parents=True, exist_ok=True)
    return target


@contextlib.contextmanager
def atomic_write(p, mode: str = "wb"):
    """A file to write `p` through: readers see the old content or all of the new, never a part.

    Locally it is a temporary file renamed over `p`; on gs:// an object appears only when its upload
    completes, and a failed write is discarded.
    """
    target = path(p)
    binary_mode = mode.replace("b", "") + "b"
    if is_remote(target):
        with explained(target):
            raw = target.open(binary_mode)
        f = _text(raw, mode)
        try:
            yield f
            f.flush()
        except BaseException:
            with contextlib.suppress(Exception):
                raw.discard()
            raw.closed = True  # never committed by the finaliser
            raise
        with explained(target):
            f.close()
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with _text(tmp.open(binary_mode), mode) as f:
            yield f
        tmp.replace(target)
    finally:
        if tmp.exists():
            tmp.unlink()


def copy(src, dst) -> None:
    """Copies one file, local or remote either side, 16 MB at a time."""
    with open(src, "rb") as source, atomic_write(dst, "wb") as target:
        while chunk := source.read(16 << 20):
            target.write(chunk)


@contextlib.contextmanager
def local_file(p) -> Iterator[str]:
    """An operating-system path to write `p` through, for writers that only take local files (ArrayRecord):
    `p` itself when local, else a temporary file uploaded to `p` when the block ends without error."""
    if not is_remote(p):
        target = path(p)
        target.parent.mkdir(parents=True, exist_ok=True)
        yield os.fspath(target)
        return
    with tempfile.TemporaryDirectory(prefix="rdlm-upload-") as folder:
        local = os.fspath(epath.Path(folder) / path(p).name)
        yield local
        copy(local, p)


def _split_glob(pattern: str) -> tuple[str, str]:
    """(the folder before the first wildcard, the rest of the pattern)."""
    parts = pattern.split("/")
    fixed = next((i for i, part in enumerate(parts) if _MAGIC & set(part)), len(parts))
    return "/".join(parts[:fixed]) or "/", "/".join(parts[fixed:])


def _hidden(relative: str, rest: str) -> bool:
    """True where a wildcard matched a name starting with '.' (glob.glob's rule), unless the pattern names one."""
    asks_for_dot = any(part.startswith(".") for part in rest.split("/"))
    return not asks_for_dot and any(part.startswith(".") for part in relative.split("/"))


def glob(pattern: str) -> list[str]:
    """The files (not folders) matching `pattern`, sorted; "**" matches any number of folders.

    Local patterns are glob.glob's (with "~" expanded); remote ones follow the same rules, including that a
    wildcard does not match a name starting with '.'. Raises only when a remote listing fails.
    """
    pattern = os.fspath(pattern)
    if not is_remote(pattern):
        found = stdlib_glob.glob(os.fspath(path(pattern)), recursive=True)
        return sorted(f for f in found if epath.Path(f).is_file())
    path(pattern)  # a clear error if gcsfs is missing
    protocol = pattern.split("://", 1)[0] + "://"
    with explained(pattern):
        found = _filesystem(pattern).glob(pattern, detail=True)
    files = [protocol + name for name, info in found.items() if info.get("type") == "file"]
    anchor, rest = _split_glob(pattern)
    return sorted(f for f in files if not _hidden(f[len(anchor):].lstrip("/"), rest))


def list_files(p) -> dict[str, int]:
    """Every file under directory `p` (recursively, hidden ones too), as {path relative to `p`: size in bytes}."""
    root = path(p)
    if not is_remote(root):
        found, folders = {}, [root]
        while folders:
            for entry in folders.pop().iterdir():
                if entry.is_dir():
                    folders.append(entry)
                else:
                    found[entry.relative_to(root).as_posix()] = entry.stat().length
        return found
    url = os.fspath(root).rstrip("/")
    with explained(url):
        listing = _filesystem(url).find(url, detail=True)
    prefix = url.split("://", 1)[1] + "/"
    return {name[len(prefix):]: int(info["size"]) for name, info in listing.items()
            if info.get("type") == "file" and name.startswith(prefix)}


def free_bytes(p) -> int | None:
    """Bytes free for this process on the filesystem of local directory `p`; None for a remote `p` (no limit)."""
    if is_remote(p):
        return None
    stats = os.statvfs(os.fspath(path(p)))
    return stats.f_bavail * stats.f_frsize


def rename(src, dst) -> None:
    """Moves a file or a directory (on gs://: a copy, then a delete, so not atomic there)."""
    source, target = path(src), path(dst)
    if not is_remote(source):
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
        return
    with explained(source):
        _filesystem(os.fspath(source)).mv(os.fspath(source), os.fspath(target), recursive=True)


def missing_reason(p) -> str:
    """' (the bucket ... does not exist)' when that is why remote `p` is missing, else ''."""
    if is_remote(p) and _bucket_missing(os.fspath(p)):
        return f" (the bucket {_bucket(os.fspath(p))!r} does not exist)"
    return ""
