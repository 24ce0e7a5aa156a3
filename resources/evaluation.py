"""The LoRA evaluation's rules and pictures, framework-free: how iterations compare, how a metric
reads when it has no value, the metrics of every iteration as a table and as a plot.

`lora_eval` (flen_assets/assets/lora.py) calls these; the numbers themselves come from
`identity.score_generations`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Why a metric has no value (NaN), as a person reads it in the UI instead of a blank cell.
NOT_AVAILABLE: dict[str, str] = {
    "mean_distance": "no face found",
    "diversity": "fewer than 2 faces found",
    "final_loss": "no training step ran",
    "eval_loss_start": "no training step ran",
    "eval_loss_end": "no training step ran",
}

RATES = ("identity_consistency", "face_detected_rate")  # shares of the images, shown as percentages
TABLE_ROWS = (("identity_consistency", "identity consistency"), ("face_detected_rate", "face detected"),
              ("mean_distance", "mean distance"), ("diversity", "diversity"))


def is_missing(value: Any) -> bool:
    """True for a float metric without a value (NaN or infinite)."""
    return isinstance(value, float) and not math.isfinite(value)


def not_available(name: str) -> str:
    """What a metric without a value reads as: 'n/a (no face found)'."""
    reason = NOT_AVAILABLE.get(name)
    return f"n/a ({reason})" if reason else "n/a"


def format_metric(name: str, value: Any) -> str:
    """One metric for a person: rates as percentages, distances with 3 decimals, NaN as 'n/a (why)'."""
    if value is None or is_missing(value):
        return not_available(name)
    if name in RATES:
        return f"{100 * float(value):.0f}%"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


# -- not worse than the previous iteration ---------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """The verdict of `not_worse_than_previous`: passed, and one sentence saying what happened."""

    passed: bool
    message: str


def compare_consistency(this: float, previous: float | None, iteration: str,
                        previous_iteration: str | None) -> Comparison:
    """The rule of `not_worse_than_previous`.

    - 0% never passes: a LoRA none of whose images match the character has not learned it, whatever
      the previous iteration did (0% against 0% is no progress, not "not worse");
    - v1 (no previous iteration), or a vN whose v(N-1) was never evaluated, passes with any other rate;
    - otherwise vN passes when its rate is at least that of v(N-1).
    """
    if this <= 0:
        both = previous is not None and previous <= 0
        where = f"in {iteration} and in {previous_iteration}" if both else f"in {iteration}"
        before = "" if both or previous is None else f" (down from {previous:.0%} in {previous_iteration})"
        return Comparison(False, f"0% of images match the character {where}{before}: "
                                 "the LoRA has not learned the character yet")
    if previous is None:
        nothing = f"no evaluation of {previous_iteration}" if previous_iteration else "no previous iteration"
        return Comparison(True, f"{this:.0%} of images match the character in {iteration}; {nothing} to compare with")
    if this < previous:
        return Comparison(False, f"worse: {this:.0%} of images match the character in {iteration}, "
                                 f"{previous:.0%} in {previous_iteration}")
    return Comparison(True, f"{this:.0%} of images match the character in {iteration}, "
                            f"{previous:.0%} in {previous_iteration}")


# -- prompts ---------------------------------------------------------------------------------------

def short_prompt(prompt: str, trigger: str) -> str:
    """What distinguishes a prompt, for a tile label: 'photo of alice_flen in a cafe, candid' -> 'in a cafe, candid'."""
    text = prompt.replace(trigger, " ") if trigger else prompt
    text = re.sub(r"\bphoto of\b", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"\s*,\s*", ", ", re.sub(r"\s+", " ", text))
    text = re.sub(r"(, )+", ", ", text).strip(" ,")
    return text or prompt.strip()


# -- the metrics of every iteration ----------------------------------------------------------------

def metrics_table(history: Sequence[Mapping[str, Any]], extra_rows: Sequence[tuple[str, Mapping[str, str]]] = ()) -> str:
    """A Markdown table of the metrics, one column per iteration (v1..vN), one row per metric.

    `extra_rows`: (label, {iteration: text}) rows appended after the metrics.
    """
    versions = [h["iteration"] for h in history]
    lines = ["| metric | " + " | ".join(versions) + " |", "|---|" + "---:|" * len(versions)]
    missing: list[str] = []  # the rows with an 'n/a' cell: why, once, under the table (the cells stay narrow)
    for key, label in TABLE_ROWS:
        cells = [format_metric(key, h.get(key)) for h in history]
        if any(c.startswith("n/a") for c in cells):
            missing.append(f"{label}: {NOT_AVAILABLE.get(key, 'no value')}")
        lines.append(f"| {label} | " + " | ".join("n/a" if c.startswith("n/a") else c for c in cells) + " |")
    for label, cells in extra_rows:
        lines.append(f"| {label} | " + " | ".join(cells.get(v, "") for v in versions) + " |")
    if missing:
        lines += ["", "n/a: " + "; ".join(missing)]
    return "\n".join(lines)


HEADROOM = 1.35  # the plot's y range above 100%, where the legends go


def plot_history(history: Sequence[Mapping[str, Any]], path: Path, character: str, target: float = 0.70) -> Path:
    """Two panels over the iterations, each line with markers and its values written on it:
    identity consistency against the target (top), and the face-detected rate with the mean
    identity distance on a second axis (bottom). Equal rates cannot hide one another."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker: render to a file only
    import matplotlib.pyplot as plt

    xs = list(range(len(history)))
    labels = [h["iteration"] for h in history]

    def values(key: str) -> list[float]:
        v = [h.get(key) for h in history]
        return [float("nan") if x is None else float(x) for x in v]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 4.8), dpi=110, sharex=True)
    consistency = values("identity_consistency")
    top.plot(xs, consistency, marker="o", markersize=7, linewidth=2, color="#1f4e79", label="identity consistency")
    top.axhline(target, color="#c0392b", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    _label_points(top, xs, consistency, "{:.0%}", "#1f4e79", above=True)
    top.set_title(f"{character}: LoRA evaluation per iteration")
    top.legend(fontsize=7, loc="upper left", ncol=2)

    faces = values("face_detected_rate")
    bottom.plot(xs, faces, marker="s", markersize=6, linewidth=2, color="#2e8b57", label="face detected (left)")
    _label_points(bottom, xs, faces, "{:.0%}", "#2e8b57", above=True)
    right = bottom.twinx()
    distance = values("mean_distance")
    right.plot(xs, distance, marker="^", markersize=6, linewidth=1.5, linestyle=":", color="#8e44ad",
               label="mean identity distance (right)")
    _label_points(right, xs, distance, "{:.2f}", "#8e44ad", above=False)
    finite = [d for d in distance if math.isfinite(d)]
    high = max(finite + [1.0])
    right.set_ylim(-0.08 * high, HEADROOM * high)  # the top band holds the legend, above every value
    right.set_ylabel("distance (lower: closer)")
    for x, d in zip(xs, distance):
        if not math.isfinite(d):
            right.annotate("no face", (x, 0.5 * high), ha="center", fontsize=7, color="#8e44ad")
    handles = bottom.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    names = bottom.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    bottom.legend(handles, names, fontsize=7, loc="upper left", ncol=2)
    bottom.set_xticks(xs, labels)
    bottom.set_xlim(-0.5, len(xs) - 0.5)
    bottom.set_xlabel("iteration")
    for ax in (top, bottom):
        ax.set_ylim(-0.08, HEADROOM)  # the top band holds the legend, above every value
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.set_ylabel("share of images")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _label_points(ax: Any, xs: Sequence[int], ys: Sequence[float], fmt: str, colour: str, above: bool) -> None:
    for x, y in zip(xs, ys):
        if math.isfinite(y):
            ax.annotate(fmt.format(y), (x, y), textcoords="offset points", xytext=(0, 7 if above else -12),
                        ha="center", fontsize=7, color=colour)


def plot_checkpoints(scores: Sequence[Any], promoted: int, path: Path, title: str) -> Path:
    """Identity against training step, one point per checkpoint (checkpoint_selection.CheckpointScore):
    pass rate, memorised share and face-detected rate, with the mean distance on a second axis; the
    promoted checkpoint starred."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker: render to a file only
    import matplotlib.pyplot as plt

    steps = [s.step for s in scores]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for key, label, colour, marker in (("identity_pass_rate", "identity pass rate", "#1f4e79", "o"),
                                       ("memorised_rate", "memorised copies", "#c0392b", "x"),
                                       ("face_detected_rate", "face detected", "#2e8b57", "s")):
        values = [getattr(s, key) for s in scores]
        ax.plot(steps, values, marker=marker, markersize=6, linewidth=1.8, color=colour, label=label)
        _label_points(ax, steps, values, "{:.0%}", colour, above=key != "memorised_rate")
    best = next((s for s in scores if s.step == promoted), None)
    if best is not None:
        ax.axvline(promoted, color="#d4ac0d", linewidth=1, linestyle="--")
        ax.plot([promoted], [best.identity_pass_rate], marker="*", markersize=16, color="#d4ac0d",
                label=f"promoted: step {promoted}", linestyle="none")
    right = ax.twinx()
    distance = [s.mean_distance for s in scores]
    right.plot(steps, distance, marker="^", markersize=5, linewidth=1.2, linestyle=":", color="#8e44ad",
               label="mean distance (right)")
    finite = [d for d in distance if math.isfinite(d)]
    high = max(finite + [1.0])
    right.set_ylim(-0.08 * high, HEADROOM * high)
    right.set_ylabel("distance (lower: closer)")
    for x, d in zip(steps, distance):
        if not math.isfinite(d):
            right.annotate("no face", (x, 0.5 * high), ha="center", fontsize=7, color="#8e44ad")
    ax.set_ylim(-0.08, HEADROOM)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
    ax.set_ylabel("share of images")
    ax.set_xlabel("training step")
    ax.set_xticks(steps)
    if len(steps) == 1:
        ax.set_xlim(steps[0] - 1, steps[0] + 1)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    names = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    ax.legend(handles, names, fontsize=7, loc="upper left", ncol=3)
    ax.set_title(f"{title}: identity against step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
