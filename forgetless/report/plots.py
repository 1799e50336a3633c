"""The report's figures, drawn with matplotlib (Agg) and returned as inline PNG data URIs.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot), so drawing a
report never changes the backend or the global state of a notebook that calls it. Each function
returns a :class:`Plot`: the data URI and the width, in CSS pixels, to show it at (the PNG has
twice the pixels, so it stays sharp on high-density screens).
"""

from __future__ import annotations

import base64
import functools
import io
import math
from dataclasses import dataclass
from typing import Callable, Optional

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from forgetless.eval.metrics import pareto_front
from forgetless.report.results import LossCurve, Results, RunLog, Strategy
from forgetless.report.tables import HIGHER, level_direction, scores_are_fractions

DPI = 100  # CSS pixels per inch of figure
SCALE = 2  # PNG pixels per CSS pixel
BASELINE_STYLE = {"sequential": ("#444444", "s", (0, (5, 2))), "joint": ("#8c8c8c", "D", (0, (1, 1.5)))}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#bcbd22", "#8c564b",
           "#393b79", "#637939", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354"]
STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.color": "#e6e6e6", "grid.linewidth": 0.8, "legend.frameon": False, "legend.fontsize": 8.5,
    "axes.edgecolor": "#999999", "xtick.color": "#444444", "ytick.color": "#444444",
}


@dataclass
class Plot:
    uri: str
    width_px: int
    alt: str


def _styled(draw: Callable[..., Optional[Plot]]) -> Callable[..., Optional[Plot]]:
    """Draw under the report's style; rcParams are read as artists are made, and restored after."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)

    return wrapper


def _figure(width_in: float, height_in: float) -> Figure:
    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def _png(fig: Figure, alt: str) -> Plot:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI * SCALE, metadata={"Software": None}, facecolor="white")
    return Plot("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), int(fig.get_figwidth() * DPI), alt)


def colours(results: Results) -> dict[str, tuple[str, str, object]]:
    """Colour, marker and line style per strategy; baselines in greys with their own shapes."""
    out, i = {}, 0
    for s in results.strategies:
        if s.baseline in BASELINE_STYLE:
            out[s.name] = BASELINE_STYLE[s.baseline]
        else:
            out[s.name] = (PALETTE[i % len(PALETTE)], "o", "-")
            i += 1
    return out


def _label(s: Strategy) -> str:
    return f"{s.name} (baseline)" if s.baseline and s.baseline not in s.name else s.name


def _row_labels(results: Results) -> list[str]:
    return ["before"] + [f"after {t}: {name}" for t, name in enumerate(results.tasks, 1)]


def _value_text(value: float, fractions: bool) -> str:
    return f"{100 * value:.0f}" if fractions else f"{value:.3g}"


@_styled
def heatmap(results: Results, strategy: Strategy) -> Plot:
    """The strategy's matrix: rows = after each task (and before), columns = tasks; the cell of
    each task right after training it is outlined. Colours use one scale per column across all
    strategies (0-100% for fractions), dark = good."""
    T = len(results.tasks)
    fractions = scores_are_fractions(results)
    cmap = matplotlib.colormaps["YlGnBu"]
    ranges = []
    for k in range(T):
        column = [s.matrix[t][k] for s in results.strategies for t in range(T + 1) if s.matrix[t][k] is not None]
        lo, hi = (0.0, 1.0) if fractions or not column else (min(column), max(column))
        ranges.append((lo, hi if hi > lo else lo + 1.0))
    fig = _figure(1.2 + 0.68 * T, 0.62 + 0.34 * (T + 1))
    ax = fig.add_subplot()
    ax.grid(False)
    for t, row in enumerate(strategy.matrix):
        for k, v in enumerate(row):
            if v is None:
                ax.add_patch(Rectangle((k - 0.5, t - 0.5), 1, 1, facecolor="#f2f2f2", edgecolor="white", lw=1.5))
                ax.text(k, t, "–", ha="center", va="center", color="#999999")
                continue
            lo, hi = ranges[k]
            x = (v - lo) / (hi - lo)
            x = x if results.directions[k] else 1.0 - x
            shade = 0.08 + 0.84 * min(max(x, 0.0), 1.0)
            ax.add_patch(Rectangle((k - 0.5, t - 0.5), 1, 1, facecolor=cmap(shade), edgecolor="white", lw=1.5))
            ax.text(k, t, _value_text(v, fractions), ha="center", va="center", fontsize=8.5,
                    color="white" if shade > 0.55 else "#222222", fontweight="bold" if t == k + 1 else "normal")
        if 1 <= t <= T and row[t - 1] is not None:
            ax.add_patch(Rectangle((t - 1.5, t - 0.5), 1, 1, fill=False, edgecolor="#222222", lw=1.6))
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_ylim(T + 0.5, -0.5)
    ax.set_xticks(range(T), results.tasks, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(T + 1), _row_labels(results), fontsize=8)
    ax.tick_params(length=0, pad=2)
    for side in ax.spines.values():
        side.set_visible(False)
    unit = " (%)" if fractions else ""
    ax.set_xlabel(f"score{unit}; outlined: right after training", fontsize=7.5, color="#555555")
    return _png(fig, f"accuracy matrix of {strategy.name}")


@_styled
def tradeoff(results: Results, rows: list[dict]) -> Optional[Plot]:
    """Old vs new: x = BWT (retention of old tasks), y = mean plasticity (new-task learning), one
    point per strategy; the Pareto front (both maximised) joined and ringed; a joint baseline,
    which has no per-task rows, as a horizontal line at its final average."""
    direction = level_direction(results)
    if direction is None:
        return None
    sign = 1.0 if direction == HIGHER else -1.0
    style = colours(results)
    strategies = {s.name: s for s in results.strategies}
    placed = [r for r in rows if r["bwt"] is not None and r["plasticity"] is not None]
    if not placed:
        return None
    scale = 100.0 if scores_are_fractions(results) else 1.0
    front = set(pareto_front([(r["bwt"], sign * r["plasticity"]) for r in placed]))
    fig = _figure(7.6, 4.2)
    ax = fig.add_subplot()
    xs = [scale * r["bwt"] for r in placed]
    ys = [scale * r["plasticity"] for r in placed]
    ordered = sorted(front, key=lambda i: xs[i])
    if len(ordered) > 1:
        ax.plot([xs[i] for i in ordered], [ys[i] for i in ordered], color="#f0a030", lw=6, alpha=0.35, solid_capstyle="round", zorder=1)
    labels: dict[tuple[float, float], list[str]] = {}  # strategies at the same point share one label
    for i, r in enumerate(placed):
        colour, marker, _ = style[r["strategy"]]
        hollow = bool(r["baseline"])
        ax.scatter(xs[i], ys[i], s=70, marker=marker, zorder=3, linewidths=1.8,
                   facecolors="white" if hollow else colour, edgecolors=colour)
        if i in front:
            ax.scatter(xs[i], ys[i], s=260, marker="o", facecolors="none", edgecolors="#f0a030", linewidths=2, zorder=2)
        labels.setdefault((xs[i], ys[i]), []).append(_label(strategies[r["strategy"]]))
    for (x, y), names in labels.items():
        on_front = any(xs[i] == x and ys[i] == y for i in front)
        ax.annotate(", ".join(names), (x, y), xytext=(7, 5), textcoords="offset points", fontsize=8.5,
                    color="#222222", fontweight="bold" if on_front else "normal")
    for r in rows:
        s = strategies[r["strategy"]]
        if s.baseline == "joint" and r["final_average"] is not None:
            colour, _, dash = style[s.name]
            ax.axhline(scale * r["final_average"], color=colour, ls=dash, lw=1.2, zorder=0)
            ax.annotate(f"{s.name}: final average (all tasks at once)", (1, scale * r["final_average"]), xycoords=("axes fraction", "data"),
                        xytext=(-4, 3), textcoords="offset points", fontsize=8, color="#666666", ha="right")
    xlo, xhi = min(xs + [0.0]), max(xs + [0.0])
    pad = 0.12 * (xhi - xlo or 1.0)
    ax.set_xlim(xlo - pad, xhi + 3 * pad)
    ax.axvline(0, color="#bbbbbb", lw=0.8, zorder=0)
    unit = " (pts)" if scale == 100.0 else ""
    ax.set_xlabel(f"BWT: retention of old tasks{unit}   ← more forgetting · less forgetting →")
    ax.set_ylabel(f"plasticity: new-task score{' (%)' if unit else ''}" + (", lower is better" if sign < 0 else "") + "  →")
    if sign < 0:
        ax.invert_yaxis()
    ax.set_title("old vs new: the best trade-offs (Pareto front) are ringed", loc="left")
    return _png(fig, "trade-off between retaining old tasks and learning new ones")


def _legend(fig: Figure, ax, n: int) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", ncols=1 if n <= 14 else 2)


@_styled
def score_curves(results: Results) -> Plot:
    """Column k of each matrix over the rows: how each task's score moves through the sequence."""
    T = len(results.tasks)
    fractions = scores_are_fractions(results)
    style = colours(results)
    ncols = min(T, 3)
    nrows = math.ceil(T / ncols)
    fig = _figure(3.2 * ncols + 1.8, 2.7 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, name in enumerate(results.tasks):
        ax = axes[k // ncols][k % ncols]
        ax.axvspan(k, k + 1, color="#fff4d6", zorder=0, lw=0)
        for s in results.strategies:
            colour, marker, dash = style[s.name]
            ys = [float("nan") if row[k] is None else (100 * row[k] if fractions else row[k]) for row in s.matrix]
            ax.plot(range(T + 1), ys, color=colour, ls=dash, marker=marker, ms=4, lw=1.6, label=_label(s))
        ax.set_title(f"{name} ({results.metrics[name]}{'' if results.higher_is_better[name] else ', lower is better'})", loc="left")
        ax.set_xticks(range(T + 1), ["before"] + [f"after {t}" for t in range(1, T + 1)], fontsize=8)
        ax.set_xlim(-0.3, T + 0.3)
        if fractions:
            ax.set_ylim(-4, 104)
        ax.text(k + 0.5, 0.98, "trained", transform=ax.get_xaxis_transform(), fontsize=7.5, color="#9a6700", ha="center", va="top")
    for extra in range(T, nrows * ncols):
        axes[extra // ncols][extra % ncols].set_visible(False)
    axes[0][0].set_ylabel("score (%)" if fractions else "score")
    _legend(fig, axes[0][0], len(results.strategies))
    return _png(fig, "score on each task after each training step")


@_styled
def loss_curves(results: Results, curves: dict[str, LossCurve]) -> Optional[Plot]:
    """Training loss across the whole sequence, steps offset per task; task boundaries marked."""
    if not curves:
        return None
    style = colours(results)
    fig = _figure(9.6, 3.6)
    ax = fig.add_subplot()
    sequential = [c.boundaries for c in curves.values() if len(c.boundaries) == len(results.tasks) - 1]
    shared = sequential[0] if sequential and all(b == sequential[0] for b in sequential) else None
    for s in results.strategies:
        curve = curves.get(s.name)
        if curve is None:
            continue
        colour, _, dash = style[s.name]
        ax.plot(curve.steps, curve.losses, color=colour, ls=dash if s.baseline else "-", lw=1.3, alpha=0.9, label=_label(s))
        if shared is None:
            for b in curve.boundaries:
                ax.axvline(b, color=colour, lw=0.8, ls=(0, (2, 2)), alpha=0.7)
    if shared is not None:
        end = max(c.steps[-1] for c in curves.values())
        starts = [0] + shared
        for t, (a, b) in enumerate(zip(starts, starts[1:] + [end])):
            if t:
                ax.axvline(a, color="#777777", lw=1, ls=(0, (4, 3)))
            ax.text((a + b) / 2, 1.0, results.tasks[t], transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8.5, color="#444444")
    ax.set_xlabel("training step across the task sequence" + ("" if shared is not None else " (dotted lines: each strategy's task boundaries)"))
    ax.set_ylabel("training loss")
    ax.set_xlim(left=0)
    _legend(fig, ax, len(curves))
    return _png(fig, "training loss across the task sequence")


@_styled
def general_curves(results: Results) -> Optional[Plot]:
    """Perplexity (else loss) of each general probe over the rows, lower is better."""
    probes = [p for p in results.general if any(p in s.general for s in results.strategies)]
    if not probes:
        return None
    T = len(results.tasks)
    style = colours(results)
    fig = _figure(3.6 * len(probes) + 1.8, 2.8)
    axes = fig.subplots(1, len(probes), squeeze=False)[0]
    for ax, probe in zip(axes, probes):
        measure = "perplexity"
        for s in results.strategies:
            curves = s.general.get(probe) or {}
            measure = "perplexity" if "perplexity" in curves else "loss"
            values = curves.get(measure)
            if not values:
                continue
            colour, marker, dash = style[s.name]
            ax.plot(range(T + 1), [float("nan") if v is None else v for v in values], color=colour, ls=dash, marker=marker, ms=4, lw=1.6, label=_label(s))
        ax.set_title(f"{probe}: {measure} (lower is better)", loc="left")
        ax.set_xticks(range(T + 1), ["before"] + [f"after {t}" for t in range(1, T + 1)], fontsize=8)
    _legend(fig, axes[0], len(results.strategies))
    return _png(fig, "general-probe perplexity after each training step")


@_styled
def run_curves(log: RunLog, roles: dict[str, str]) -> Optional[Plot]:
    """One training run: its loss per step, and each scored set's headline at every evaluation."""
    steps = sorted(log.losses)
    eval_steps = sorted(log.evals)
    show_evals = len(eval_steps) >= 2
    if not steps and not show_evals:
        return None
    fig = _figure(9.6 if show_evals and steps else 6.0, 3.2)
    axes = fig.subplots(1, int(bool(steps)) + int(show_evals), squeeze=False)[0]
    if steps:
        axes[0].plot(steps, [log.losses[s] for s in steps], color=PALETTE[0], lw=1.3)
        changes = log.controller_changes()
        labelled = set()
        for s in changes:  # where the forgetting budget's controller moved the protection
            action = log.budgets[s].get("action")
            axes[0].axvline(s, color=PALETTE[1] if action == "raised" else PALETTE[2], ls=":", lw=1,
                            label=None if action in labelled else f"budget: protection {action}")
            labelled.add(action)
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("training loss")
        axes[0].set_title("training loss", loc="left")
        if changes:
            axes[0].legend(loc="best")
    if show_evals:
        ax = axes[-1]
        for i, (name, role) in enumerate(roles.items()):
            key = next((k for k in ("score", "exact_match", "mc_accuracy", "token_accuracy")
                        if all(k in (log.evals[s].get(name) or {}) for s in eval_steps)), None)
            if key is None:
                continue
            ax.plot(eval_steps, [log.evals[s][name][key] for s in eval_steps], color=PALETTE[(i + 1) % len(PALETTE)],
                    ls="-" if role == "new" else "--", marker="o", ms=4, lw=1.6, label=f"{name} ({key})")
        ax.set_xlabel("step")
        ax.set_title("scores at each evaluation", loc="left")
        ax.legend(loc="best")
    return _png(fig, "training loss and evaluation scores over the run")


@_styled
def budget_curves(log: RunLog, limits: dict[str, float]) -> Optional[Plot]:
    """The forgetting budget's checks: the online KL, each keep sample's drop (with its limit), and
    the controller's strength."""
    steps = sorted(log.budgets)
    if not steps:
        return None
    records = [log.budgets[s] for s in steps]
    strength = [r.get("strength") for r in records]
    has_strength = any(v is not None for v in strength)
    fig = _figure(9.6 if has_strength else 6.4, 3.0)
    axes = fig.subplots(1, 2 + int(has_strength), squeeze=False)[0]
    ax = axes[0]
    ax.plot(steps, [r.get("kl") for r in records], color=PALETTE[0], marker="o", ms=3, lw=1.4)
    if "online_kl" in limits:  # forgetless.recipes.budget.KL
        ax.axhline(limits["online_kl"], color=PALETTE[1], ls="--", lw=1, label="kl_max")
        ax.legend(loc="best")
    ax.set_xlabel("step")
    ax.set_title("online KL(start || model) per token", loc="left")
    ax = axes[1]
    names = sorted({n for r in records for n in (r.get("drop") or {})})
    for i, name in enumerate(names):
        colour = PALETTE[(i + 2) % len(PALETTE)]
        ax.plot(steps, [(r.get("drop") or {}).get(name, math.nan) for r in records], color=colour, marker="o", ms=3, lw=1.4, label=name)
        if name in limits:
            ax.axhline(limits[name], color=colour, ls="--", lw=1)
    ax.axhline(0, color="#999999", lw=0.8)
    ax.set_xlabel("step")
    ax.set_title("drop of each keep sample (dashed: max_drop)", loc="left")
    if names:
        ax.legend(loc="best")
    if has_strength:
        ax = axes[2]
        ax.step(steps, [math.nan if v is None else v for v in strength], where="post", color=PALETTE[3], lw=1.6)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("protection strength (x configured)", loc="left")
    return _png(fig, "forgetting budget: online KL, keep-sample drops and the controller's strength")


@_styled
def grouped_bars(groups: list[str], series: list[tuple[str, list[float], str]], ylabel: str,
                 ylim: Optional[tuple[float, float]] = None, alt: str = "") -> Plot:
    """Bars side by side per group: ``series`` is (label, one value per group, colour) each."""
    fig = _figure(max(6.0, 1.8 * len(groups) + 3), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, (label, values, colour) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar([j + offset for j in range(len(groups))], values, width, label=label, color=colour)
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(axis="x", visible=False)
    ax.set_axisbelow(True)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    fig.legend(loc="outside upper center", ncols=len(series))
    return _png(fig, alt)


@_styled
def tune_front(result: dict) -> Optional[Plot]:
    """``forgetless tune``'s trials: x = learned, y = kept, one point per finished trial (colour: its
    strategy; hollow: over the budget); the front of the feasible ones joined and ringed; the
    chosen one starred."""
    done = [t for t in result.get("trials", []) if isinstance(t.get("learned"), (int, float)) and isinstance(t.get("kept"), (int, float))]
    if not done:
        return None
    strategies = sorted({t["params"].get("strategy", "?") for t in done})
    colour = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(strategies)}
    front = set(result.get("front") or [])
    fig = _figure(7.6, 4.2)
    ax = fig.add_subplot()
    on_front = sorted((t for t in done if t["number"] in front), key=lambda t: t["learned"])
    if len(on_front) > 1:
        ax.plot([t["learned"] for t in on_front], [t["kept"] for t in on_front], color="#f0a030", lw=6, alpha=0.35,
                solid_capstyle="round", zorder=1)
    seen = set()
    for t in done:
        s = t["params"].get("strategy", "?")
        feasible = t.get("feasible", True)
        ax.scatter(t["learned"], t["kept"], s=60, zorder=3, linewidths=1.6, edgecolors=colour[s],
                   facecolors=colour[s] if feasible else "white", label=None if s in seen else s)
        seen.add(s)
        if t["number"] in front:
            ax.scatter(t["learned"], t["kept"], s=240, marker="o", facecolors="none", edgecolors="#f0a030", linewidths=2, zorder=2)
        ax.annotate(str(t["number"]), (t["learned"], t["kept"]), xytext=(6, 4), textcoords="offset points", fontsize=8, color="#444444")
        if t["number"] == result.get("chosen"):
            ax.scatter(t["learned"], t["kept"], s=320, marker="*", color="#f0a030", edgecolors="#222222", linewidths=0.8, zorder=4)
    ax.set_xlabel("learned (new-task score after training)")
    ax.set_ylabel("kept (share of the keep sets' scores)")
    ax.set_title("trials: the front ringed, the chosen one starred, hollow = over the budget", loc="left")
    ax.legend(loc="best")
    return _png(fig, "forgetless tune: learned vs kept per trial, with the Pareto front")
