"""Rows of the faults table that the README shows: each fault test records what it tried and what survived.

The README's command (section "Faults and bad input") runs every fault test, slow ones included, and prints
the table at the end of the run (conftest.pytest_terminal_summary); a row counts only what its test asserted.
"""

import dataclasses

ROWS: list["Row"] = []


@dataclasses.dataclass
class Row:
    fault: str
    tried: int
    survived: int
    lost: str  # steps or records lost (goal: none), e.g. "0 steps"


def record(fault: str, tried: int, survived: int, lost: str) -> None:
    ROWS.append(Row(fault, tried, survived, lost))


def table() -> str:
    lines = ["| fault | times tried | runs survived | steps or records lost |", "|---|---|---|---|"]
    merged: dict[tuple[str, str], Row] = {}
    for row in ROWS:  # a fault tried by several tests (or parameters) is one row
        key = (row.fault, row.lost)
        if key in merged:
            merged[key].tried += row.tried
            merged[key].survived += row.survived
        else:
            merged[key] = dataclasses.replace(row)
    lines += [f"| {r.fault} | {r.tried} | {r.survived} | {r.lost} |" for r in merged.values()]
    return "\n".join(lines)
