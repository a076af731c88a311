"""The reasoning-problem generator: determinism, correct answers, difficulty and input checks."""

import re

import pytest

from rdlm.data import tasks


@pytest.mark.parametrize("task", tasks.TASKS)
def test_same_seed_same_problems_and_different_seed_differs(task):
    a = tasks.generate(task, 50, seed=3, difficulties=range(4, 9))
    assert a == tasks.generate(task, 50, seed=3, difficulties=range(4, 9))
    assert a != tasks.generate(task, 50, seed=4, difficulties=range(4, 9))


def test_parity_answers_and_format():
    for p in tasks.generate("parity", 300, seed=1, difficulties=[1, 2, 7, 30]):
        bits = p.prompt[:-1]
        assert p.prompt.endswith("=") and set(bits) <= {"0", "1"}
        assert len(bits) == p.difficulty
        assert p.answer == str(bits.count("1") % 2)


def test_carry_answers_and_format():
    for p in tasks.generate("carry", 300, seed=1, difficulties=[1, 3, 12]):
        pairs = p.prompt[:-1].split(" ")
        assert p.prompt.endswith("=") and len(pairs) == p.difficulty
        a = int("".join(pair[0] for pair in reversed(pairs)))
        b = int("".join(pair[1] for pair in reversed(pairs)))
        assert p.answer == str(int(a + b >= 10**p.difficulty))


# The two s3 operations as permutations of Z3 = {0, 1, 2}, written as the images of 0, 1 and 2.
_S3_OPS = {"1": (1, 2, 0), "2": (0, 2, 1)}  # 1: x -> x + 1, 2: x -> -x


def _compose(first, then):
    return tuple(then[first[x]] for x in range(3))


def test_s3_answers_are_the_composed_permutation_applied_to_zero():
    seen = set()
    for p in tasks.generate("s3", 500, seed=1, difficulties=[1, 2, 5, 16, 32]):
        ops = p.prompt[:-1]
        assert p.prompt.endswith("=") and set(ops) <= {"1", "2"} and len(ops) == p.difficulty
        perm = (0, 1, 2)
        for op in ops:
            perm = _compose(perm, _S3_OPS[op])
        seen.add(perm)
        assert p.answer == str(perm[0])
    assert len(seen) == 6  # the operations generate all of S3
    assert _compose(_S3_OPS["1"], _S3_OPS["2"]) != _compose(_S3_OPS["2"], _S3_OPS["1"])  # not commutative


def test_s3_answers_are_balanced_and_depend_on_order():
    ps = tasks.generate("s3", 3000, seed=0, difficulties=[12])
    counts = [sum(p.answer == str(x) for p in ps) for x in range(3)]
    assert all(800 < c < 1200 for c in counts)  # chance is about 1/3
    # The same multiset of operations in another order can change the answer: no counting shortcut.
    by_counts = {}
    for p in ps:
        by_counts.setdefault(p.prompt.count("1"), set()).add(p.answer)
    assert any(len(answers) > 1 for answers in by_counts.values())


def test_hand_worked_examples():
    parity = {p.prompt: p.answer for p in tasks.generate("parity", 2000, seed=0, difficulties=[4])}
    assert parity["1011="] == "1"  # three ones
    assert parity["0110="] == "0"  # two ones
    assert parity["0000="] == "0"
    # Pairs are (a_i, b_i), least-significant digit first.
    carry1 = {p.prompt: p.answer for p in tasks.generate("carry", 3000, seed=0, difficulties=[1])}
    assert carry1["45="] == "0"  # 4 + 5 = 9
    assert carry1["55="] == "1"  # 5 + 5 = 10
    assert carry1["09="] == "0"
    s3 = {p.prompt: p.answer for p in tasks.generate("s3", 2000, seed=0, difficulties=[2, 4])}
    assert s3["12="] == "2"  # 0 -> 1 -> -1 = 2
    assert s3["21="] == "1"  # 0 -> 0 -> 1
    assert s3["1212="] == "0"  # 0 -> 1 -> 2 -> 0 -> 0
    assert s3["1111="] == "1"
    carry2 = {p.prompt: p.answer for p in tasks.generate("carry", 20000, seed=0, difficulties=[2])}
    assert carry2["55 45="] == "1"  # 45 + 55 = 100: the carry from 5 + 5 runs through 4 + 5
    assert carry2["54 45="] == "0"  # 45 + 54 = 99


def test_numpy_integer_difficulties_and_seeds_are_accepted():
    import numpy as np

    a = tasks.generate("parity", 20, seed=np.int64(5), difficulties=np.arange(3, 6))
    assert a == tasks.generate("parity", 20, seed=5, difficulties=[3, 4, 5])
    assert all(type(p.difficulty) is int for p in a)


def test_difficulty_is_drawn_from_the_given_set_uniformly():
    ds = [p.difficulty for p in tasks.generate("parity", 3000, seed=2, difficulties=[3, 5, 9])]
    assert set(ds) == {3, 5, 9}
    assert all(800 < ds.count(g) < 1200 for g in (3, 5, 9))


def test_carry_problems_have_long_chains_of_nines():
    ps = tasks.generate("carry", 500, seed=0, difficulties=[10])
    sums = [[int(pair[0]) + int(pair[1]) for pair in p.prompt[:-1].split(" ")] for p in ps]
    nines = sum(s.count(9) for s in sums) / (10 * len(ps))
    assert 0.5 < nines < 0.6  # half forced to 9, plus 1 in 10 of the rest
    longest = [max(len(run) for run in "".join("9" if x == 9 else "." for x in s).split(".")) for s in sums]
    assert sum(n >= 5 for n in longest) > 50
    assert {p.answer for p in ps} == {"0", "1"}


def test_check_answer():
    p = tasks.Problem("1011=", "1", 4)
    assert tasks.check_answer(p, "1")
    assert tasks.check_answer(p, " 1")
    assert tasks.check_answer(p, "1\n0110=")
    assert not tasks.check_answer(p, "0")
    assert not tasks.check_answer(p, "")
    assert tasks.check_answer(p, "10110=")  # decoding ran on past the answer: only the answer is compared
    assert not tasks.check_answer(p, "=1")


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        (dict(task="sorting", num=3, seed=0, difficulties=[2]), "sorting"),
        (dict(task="parity", num=3, seed=0, difficulties=[]), "empty"),
        (dict(task="parity", num=3, seed=0, difficulties=range(5, 3)), "empty"),
        (dict(task="parity", num=3, seed=0, difficulties=[0, 2]), "[0]"),
        (dict(task="parity", num=3, seed=0, difficulties=[2.5]), "[2.5]"),
        (dict(task="parity", num=-1, seed=0, difficulties=[2]), "num=-1"),
        (dict(task="s3", num=3, seed=0, difficulties=[]), "empty"),
        (dict(task="s3", num=3, seed=0, difficulties=[3, -1]), "[-1]"),
        (dict(task="s3", num=3, seed=0, difficulties=[True]), "[True]"),
        (dict(task="s3", num=3, seed=0, difficulties=["4"]), "['4']"),
    ],
)
def test_bad_input_raises_naming_the_value(kwargs, bad):
    task = kwargs.pop("task")
    with pytest.raises(ValueError, match=re.escape(bad)):
        tasks.generate(task, **kwargs)
