"""Generated reasoning problems rendered as text, for training and for the depth-vs-accuracy evaluation.

Each task has an integer difficulty that sets how many sequential steps the answer needs. A problem's
document text is `prompt + answer`; the answer is what greedy decoding after the prompt must produce.

- `parity`: a string of `difficulty` random bits, then `=`, then their XOR: `0110=0`. One bit per step.
- `carry`: two `difficulty`-digit numbers a and b as digit pairs `a_i b_i`, least-significant first and
  space-separated, then `=` and the carry out of a + b (0 or 1): `45 55=1` is 54 + 55 = 109. About half
  the pairs sum to 9 and pass the incoming carry on, so the answer depends on a long chain of carries.
- `s3`: a string of `difficulty` operations from {1, 2} acting on x in Z3, starting at x = 0: `1` maps x
  to x + 1 mod 3 and `2` maps x to -x mod 3; then `=` and the final x: `1212=0`. The two generate the
  symmetric group S3, which is not commutative, so the answer depends on the order of the operations
  and no counting shortcut exists. One operation per step; chance is about 1/3.
"""

import dataclasses
import numbers
import random
from typing import Sequence

TASKS = ("parity", "carry", "s3")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: `prompt + answer` is the document text; `difficulty` counts its sequential steps."""

    prompt: str
    answer: str
    difficulty: int


def _parity(rng: random.Random, g: int) -> Problem:
    """A `g`-bit string and the XOR of its bits."""
    bits = [rng.randrange(2) for _ in range(g)]
    return Problem("".join(map(str, bits)) + "=", str(sum(bits) % 2), g)


def _carry(rng: random.Random, g: int) -> Problem:
    """Two `g`-digit numbers as least-significant-first digit pairs, and the carry out of their sum."""
    pairs, carry = [], 0
    for _ in range(g):
        if rng.random() < 0.5:
            a = rng.randrange(10)
            b = 9 - a
        else:
            a, b = rng.randrange(10), rng.randrange(10)
        carry = int(a + b + carry >= 10)
        pairs.append(f"{a}{b}")
    return Problem(" ".join(pairs) + "=", str(carry), g)


def _s3(rng: random.Random, g: int) -> Problem:
    """`g` operations on x in Z3 from x = 0 (`1`: x + 1, `2`: -x), and the final x."""
    ops, x = [], 0
    for _ in range(g):
        op = rng.randrange(1, 3)
        x = (x + 1) % 3 if op == 1 else (-x) % 3
        ops.append(op)
    return Problem("".join(map(str, ops)) + "=", str(x), g)


_MAKERS = {"parity": _parity, "carry": _carry, "s3": _s3}


def generate(task: str, num: int, *, seed: int, difficulties: Sequence[int]) -> list[Problem]:
    """`num` problems of `task`, each difficulty drawn uniformly from `difficulties`; deterministic per seed.

    Repeating a value in `difficulties` weights it. The same seed gives different problems per task.
    """
    if task not in _MAKERS:
        raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}.")
    difficulties = list(difficulties)
    if not difficulties:
        raise ValueError(f"difficulties={difficulties} is empty; give at least one difficulty >= 1.")
    bad = [g for g in difficulties if not isinstance(g, numbers.Integral) or isinstance(g, bool) or g < 1]
    if bad:
        raise ValueError(f"difficulties contains invalid value(s) {bad}; each must be an int >= 1.")
    if num < 0:
        raise ValueError(f"num={num} must be >= 0.")
    difficulties = [int(g) for g in difficulties]
    rng = random.Random(f"{task}:{int(seed)}")
    return [_MAKERS[task](rng, rng.choice(difficulties)) for _ in range(num)]


def check_answer(problem: Problem, generated: str) -> bool:
    """Whether `generated`, the greedy decoding after the prompt, begins with the answer.

    Leading spaces are ignored and only the answer's length is compared, so whatever the decoder
    produced after the answer (the next document, say) does not matter.
    """
    return generated.lstrip(" ")[: len(problem.answer)] == problem.answer
