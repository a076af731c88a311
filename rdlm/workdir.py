"""Start-up checks of a run's workdir, before anything is compiled or trained: can it be written, and is
there room for a checkpoint.

Writability is tested by doing it: the directory is created and a probe file written and removed, so
every cause (no permission, a read-only filesystem, a file in the way, a bucket without write access)
ends in one sentence. Room is the filesystem's free space against the size of one checkpoint (the
parameters and optimizer state, uncompressed); gs:// has no such limit. A disk that fills later fails
the checkpoint being written, never one already complete (rdlm.checkpoint).
"""

import errno
import math
import os
import uuid

import jax
from absl import logging

from rdlm import cli, storage

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def check_writable(workdir) -> None:
    """Raises PermissionError (one sentence) unless this process can create files in `workdir` (for gs://,
    storage's own sentence on a missing bucket or refused access)."""
    probe = storage.path(workdir) / f".rdlm-write-probe-{jax.process_index()}-{uuid.uuid4().hex[:8]}"
    try:
        storage.makedirs(workdir)
        storage.write_text(probe, "rdlm checks that the workdir is writable\n")
        probe.unlink()
    except (storage.NotFound, storage.AccessDenied):
        raise  # gs://: already one sentence naming the bucket and what to do
    except OSError as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise PermissionError(
            f"--workdir={workdir} cannot be written ({reason}); choose a directory this process may write to."
        ) from None


def state_bytes(abstract_state) -> int:
    """Bytes of the parameters and optimizer state at their dtypes: about one checkpoint, uncompressed."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_free_space(workdir, checkpoint_bytes: int, keep: int) -> None:
    """Raises cli.Failure (one sentence) unless the workdir's filesystem has room for one more checkpoint; warns below
    `keep` + 1 (the rotation holds `keep` verified steps while the next one is written)."""
    free = storage.free_bytes(workdir)
    if free is None or jax.process_index() != 0:
        return
    if free < checkpoint_bytes:
        raise cli.Failure(
            f"--workdir={workdir} has {_gib(free)} free, less than one checkpoint of this run (about "
            f"{_gib(checkpoint_bytes)}); free some space or choose a --workdir on a larger disk."
        )
    if free < (keep + 1) * checkpoint_bytes:
        logging.warning(
            "%s has %s free, room for %d checkpoint(s) of about %s; checkpoint.keep=%d needs %d.",
            workdir, _gib(free), free // max(checkpoint_bytes, 1), _gib(checkpoint_bytes), keep, keep + 1,
        )


def is_disk_full(error: BaseException) -> bool:
    """True for an OSError that says the disk (or a file size or quota limit) is full."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def describe_disk_full(error: OSError) -> str:
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or os.strerror(error.errno)}"
