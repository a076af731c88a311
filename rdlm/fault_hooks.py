"""Test hooks that make faults happen on purpose, switched on by environment variables (all off by default).

- `RDLM_FAULT_NAN_STEPS=5,9`: the batches of these optimizer steps (1-based, as logged) get NaN loss
  weights, so the step's loss and gradients are NaN; set in the data path, before the batch reaches
  the device, exactly as a corrupt batch would arrive.
- `RDLM_FAULT_COMMIT_DELAY_S=3`: every checkpoint waits this long after all of its files are written
  and before Orbax commits it (runs inside Orbax's commit thread), so a test can kill a run while a
  checkpoint is half-way to complete.

The fault tests (tests/test_faults_*.py) use them; nothing else reads them.
"""

import os
import sys
import time

import numpy as np

NAN_STEPS = "RDLM_FAULT_NAN_STEPS"
COMMIT_DELAY_S = "RDLM_FAULT_COMMIT_DELAY_S"
COMMIT_HELD = "rdlm fault hook: holding a checkpoint commit"  # printed on stderr while a commit is held


def _nan_steps() -> frozenset[int]:
    text = os.environ.get(NAN_STEPS, "").strip()
    return frozenset(int(s) for s in text.split(",") if s.strip()) if text else frozenset()


def poison_batch(step: int, batch: dict) -> dict:
    """`batch` with NaN weights if `step` is one of RDLM_FAULT_NAN_STEPS, else `batch` itself."""
    if step not in _nan_steps():
        return batch
    print(f"rdlm fault hook: the batch of step {step} gets NaN weights", file=sys.stderr, flush=True)
    return {**batch, "weights": np.full_like(batch["weights"], np.nan)}


def hold_commit() -> None:
    """Orbax's post-finalization callback: sleeps RDLM_FAULT_COMMIT_DELAY_S before the commit."""
    delay = float(os.environ.get(COMMIT_DELAY_S, "0") or 0)
    if delay > 0:
        print(f"{COMMIT_HELD} for {delay:g} s", file=sys.stderr, flush=True)
        time.sleep(delay)
