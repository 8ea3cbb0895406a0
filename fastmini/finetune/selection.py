"""The grid of a fine-tuning job and the choice among its runs: per mode, the learning rate with the best
mean dev metric over the seeds, then its best seed; the results table that reports it."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from fastmini.finetune.config import FinetuneConfig
from fastmini.finetune.tasks import LOWER_IS_BETTER

MODES = ("full", "adapter")


@dataclass(frozen=True)
class Setting:
    """One run of the grid."""

    mode: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.mode}-lr{self.lr:g}-seed{self.seed}"


def modes_of(config: FinetuneConfig) -> list[str]:
    if config.adapter_tuning is None:
        return list(MODES) if config.embedded_default else ["full"]
    return ["adapter"] if config.adapter_tuning else ["full"]


def is_better(value: float, best: float | None, metric: str) -> bool:
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def choose(runs: list[dict[str, Any]], lrs: list[float], metric: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per learning rate: the seeds' dev values, mean and sample std; the chosen run (best mean, then best seed)."""
    grid = []
    for lr in lrs:
        group = [run for run in runs if run["lr"] == lr]
        values = [run["selection_value"] for run in group]
        grid.append(
            {
                "lr": lr,
                "seeds": [run["seed"] for run in group],
                "values": values,
                "mean": round(statistics.fmean(values), 6),
                "std": round(statistics.stdev(values), 6) if len(values) > 1 else 0.0,
                "best_epochs": [run["best_epoch"] for run in group],
            }
        )
    best_lr = grid[0]
    for entry in grid[1:]:
        if is_better(entry["mean"], best_lr["mean"], metric):
            best_lr = entry
    chosen = None
    for run in runs:
        if run["lr"] == best_lr["lr"] and (
            chosen is None or is_better(run["selection_value"], chosen["selection_value"], metric)
        ):
            chosen = run
    for entry in grid:
        entry["chosen"] = entry is best_lr
    return grid, chosen


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _cell(entry: dict[str, Any]) -> str:
    return f"{entry['mean']:.3f} ± {entry['std']:.3f}" + ("*" if entry["chosen"] else " ")


def results_table(metrics: dict[str, Any], seeds: list[int]) -> str:
    """A small text table: per mode and learning rate, mean ± std of the selection metric over the seeds."""
    metric, split = metrics["selection_metric"], metrics["selection_split"]
    lines = [
        f"{metrics['task']}: dev {metric} ({split}, {metrics['examples'][split]} examples), mean ± std over "
        f"{len(seeds)} seed(s); * = chosen",
    ]
    modes = metrics["modes"]
    lrs = [entry["lr"] for entry in next(iter(modes.values()))["grid"]]
    header = f"{'mode':<9}{'trainable':>18}  " + "".join(f"{'lr ' + format(lr, 'g'):>20}" for lr in lrs)
    lines += [header, "-" * len(header)]
    for mode, entry in modes.items():
        share = entry["trainable_parameters"] / entry["total_parameters"]
        trainable = f"{_count(entry['trainable_parameters'])} ({100 * share:.1f}%)"
        cells = "".join(f"{_cell(g):>20}" for g in entry["grid"])
        lines.append(f"{mode:<9}{trainable:>18}  {cells}")
    for mode, entry in modes.items():
        chosen = entry["chosen"]
        shown = ", ".join(f"{name} {value:.4f}" for name, value in next(iter(chosen["validation"].values())).items())
        lines.append(
            f"{mode}: chosen lr {chosen['lr']:g} seed {chosen['seed']} (epoch {chosen['best_epoch']}): "
            f"{shown} -> {entry['directory']}"
        )
    return "\n".join(lines)
