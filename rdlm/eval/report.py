"""The evaluation report: a fixed-width table, results.json and one plot of every score against r.

A result is a dict with `num_steps` (the r of each column entry) and lists aligned with it:
validation loss (`val_loss`, `val_perplexity`, `val_bits_per_byte`), held-out reasoning accuracy
(`accuracy`, `accuracy_in_distribution`, `accuracy_beyond_training`, `accuracy_by_difficulty`) and
`tasks` ({task: {metric: [...], "mean_iterations": [...]}}; mean iterations per scored or
generated token, reported with an adaptive exit).
"""

import json
import math

import jax
from etils import epath

SCALING_JSON = "recurrence_scaling.json"  # what training writes into its workdir
SCALING_PNG = "recurrence_scaling.png"
RESULTS_JSON = "results.json"  # what rdlm.evaluate writes into --out
RESULTS_PNG = "results.png"

_COLUMNS = (
    ("val_loss", "val_loss"),
    ("val_perplexity", "val_ppl"),
    ("val_bits_per_byte", "val_bpb"),
    ("accuracy", "accuracy"),
    ("accuracy_in_distribution", "in-dist"),
    ("accuracy_beyond_training", "beyond"),
    ("accuracy_mean_iterations", "acc_iters"),
)
_SHORT = {"strict-match": "strict", "flexible-extract": "flexible", "mean_iterations": "iters"}


def columns(result: dict) -> list[tuple[str, list]]:
    """(header, values per r) of every column the result has, in table order; '*' marks difficulties beyond training."""
    cols = [(name, result[key]) for key, name in _COLUMNS if result.get(key)]
    cols += list(result.get("accuracy_by_difficulty", {}).items())
    for task, metrics in result.get("tasks", {}).items():
        cols += [(f"{task}/{_SHORT.get(m, m)}", values) for m, values in metrics.items()]
    return cols


def format_table(result: dict) -> str:
    """The scores against r as fixed-width text."""
    cols = [("r", result["num_steps"])] + columns(result)
    widths = [max(8, len(h)) for h, _ in cols]
    lines = ["  ".join(f"{h:>{w}}" for (h, _), w in zip(cols, widths))]
    for i in range(len(result["num_steps"])):
        cells = [f"{result['num_steps'][i]:>{widths[0]}d}"]
        cells += [_cell(values[i], w) for (_, values), w in zip(cols[1:], widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _cell(value, width: int) -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return f"{'-':>{width}}" if missing else f"{value:>{width}.4f}"


def write_results(directory, result: dict, json_name: str = SCALING_JSON, png_name: str = SCALING_PNG) -> None:
    """The result as JSON and its plot in `directory` (process 0 only)."""
    if jax.process_index() != 0:
        return
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / json_name).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, directory / png_name)


def _panels(result: dict) -> list[tuple[str, dict, list | None]]:
    """(title, {label: values per r}, mean iterations per r or None) for each plot panel."""
    panels = []
    if result.get("accuracy"):
        lines = dict(result.get("accuracy_by_difficulty", {}))
        lines["all held-out"] = result["accuracy"]
        panels.append(("held-out reasoning accuracy", lines, result.get("accuracy_mean_iterations")))
    if result.get("val_loss"):
        panels.append(("validation loss", {"val_loss": result["val_loss"]}, None))
    for task, metrics in result.get("tasks", {}).items():
        lines = {m: v for m, v in metrics.items() if m != "mean_iterations"}
        panels.append((task, lines, metrics.get("mean_iterations")))
    return panels


def plot(result: dict, path) -> None:
    """One figure: each score against r (log axis); a second row against mean iterations per token with an exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = result["num_steps"]
    panels = _panels(result) or [("no scores", {}, None)]
    with_exit = any(iters for _, _, iters in panels)
    rows = 2 if with_exit else 1
    fig, axes = plt.subplots(rows, len(panels), figsize=(4.2 * len(panels), 3.6 * rows), squeeze=False)
    for col, (title, lines, iters) in enumerate(panels):
        ax = axes[0][col]
        for label, values in lines.items():
            bold = label == "all held-out"
            ax.plot(r, values, marker="o" if bold else ".", linewidth=2.5 if bold else 1.2,
                    color="black" if bold else None, alpha=1.0 if bold or len(lines) < 4 else 0.6, label=label)
        ax.set(xscale="log", xlabel="test-time iterations r", title=title)
        ax.set_xticks(r, [str(x) for x in r])
        if lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        if with_exit:
            low = axes[1][col]
            if iters:
                for label, values in lines.items():
                    low.plot(iters, values, marker=".", label=label)
                low.set(xlabel="mean iterations per token", title=f"{title} (adaptive exit)")
                low.grid(alpha=0.3)
            else:
                low.axis("off")
    fig.tight_layout()
    with epath.Path(path).open("wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
