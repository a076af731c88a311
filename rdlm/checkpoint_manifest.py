"""What a checkpoint step held when it was verified: every file's size and CRC-32, in `rdlm_manifest.json`.

A training run verifies each step once Orbax has committed it: it reads every file of the step back,
checks that every item is there, and writes the manifest beside them. A later reader compares the
files with the manifest, so a file deleted, truncated or garbled since is named rather than loaded.
Orbax's own commit only proves that the writes finished. Paths are local or gs:// (`rdlm.storage`).
"""

import json
import zlib

from rdlm import storage

MANIFEST_FILE = "rdlm_manifest.json"
_CHUNK = 16 << 20
FORMAT = 1


def _crc32(path) -> int:
    crc = 0
    with storage.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def has_manifest(step_dir) -> bool:
    return storage.exists(storage.path(step_dir) / MANIFEST_FILE)


def write(step_dir, items: tuple[str, ...]) -> dict:
    """Reads every file of a committed step back, checks that each of `items` is there and records them all.

    Raises ValueError naming the missing item; returns the manifest.
    """
    step_dir = storage.path(step_dir)
    sizes = {name: size for name, size in storage.list_files(step_dir).items() if name != MANIFEST_FILE}
    present = {name.split("/", 1)[0] for name in sizes}
    missing = [item for item in items if item not in present]
    if missing:
        raise ValueError(f"{step_dir} lacks the item(s) {missing} after its commit.")
    files = {name: [size, _crc32(step_dir / name)] for name, size in sorted(sizes.items())}
    manifest = {"format": FORMAT, "files": files}
    storage.write_text(step_dir / MANIFEST_FILE, json.dumps(manifest, indent=1))
    return manifest


def problem(step_dir, items: tuple[str, ...] | None = None) -> str | None:
    """Why `step_dir` is not as verified (a phrase naming the file), or None if it is; None without a manifest.

    `items` limits the check to the files of those items (e.g. only `params` for generation).
    """
    step_dir = storage.path(step_dir)
    manifest_path = step_dir / MANIFEST_FILE
    try:
        if not storage.exists(manifest_path):
            return None
        manifest = json.loads(storage.read_text(manifest_path))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"its manifest {manifest_path} cannot be read ({type(e).__name__}: {e})"
    present = storage.list_files(step_dir)
    for name, (size, crc) in files.items():
        if items is not None and name.split("/", 1)[0] not in items:
            continue
        file = step_dir / name
        if name not in present:
            return f"{file} is missing"
        if present[name] != size:
            kind = "truncated" if present[name] < size else "longer than written"
            return f"{file} is {kind} ({present[name]} bytes, {size} when written)"
        if _crc32(file) != crc:
            return f"{file} is garbled (its CRC-32 differs from the one recorded when it was written)"
    return None
