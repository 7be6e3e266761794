"""The paper's pictures: the PPI heatmap, APPI curves and the Pareto frontier (matplotlib, written to files).

Following its appendix A.1: per group, values outside [Q1 - 3 IQR, Q3 + 3 IQR] of its series are dropped
as fit outliers, the series is smoothed by an exponential moving average, and the heatmap divides every
row by the `others` row (the bulk of the parameters), so that row reads one unit of influence.
Groups rejected at a probe step (PPI 0) count as missing, not as zero influence; where the record has each
probe's verdicts, the heatmap marks those cells by why (not measured, or rejected for what was measured).
"""
import math

import numpy as np
import torch

IQR_FACTOR = 3.0
EMA = 0.9


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def ppi_series(history):
    """K x T float64 array of PPI, nan where a group was rejected."""
    if not history:
        raise ValueError("adapeft.apps.plot: the probe history is empty; run Prober.step() first")
    table = torch.stack([torch.as_tensor(h, dtype=torch.float64).cpu() for h in history], dim=1).numpy()
    return np.where(table > 0, table, np.nan)


def clean(series, iqr_factor=IQR_FACTOR, ema=EMA):
    """Per row: drop IQR outliers, then an EMA over the steps that remain (missing steps keep the average)."""
    out = np.full_like(series, np.nan)
    for k, row in enumerate(series):
        kept = row[np.isfinite(row)]
        if kept.size:
            q1, q3 = np.percentile(kept, [25, 75])
            spread = q3 - q1
            row = np.where((row >= q1 - iqr_factor * spread) & (row <= q3 + iqr_factor * spread), row, np.nan)
        average = np.nan
        for t, value in enumerate(row):
            if np.isfinite(value):
                average = value if np.isnan(average) else ema * average + (1 - ema) * value
            out[k, t] = average
    return out


# Marks of the heatmap's cells by verdict (adapeft.probe.VERDICTS): a probe that could not measure the group,
# which is no evidence against it, and a fit rejected for what it measured.
MEASURED_REJECTIONS = ("b <= 0", "A <= 0", "R^2")
MARKS = {"unmeasured": "\u25cb", "rejected": "\u00d7"}


def ppi_heatmap(history, names, path, relative_to="others", title="PPI relative to others (log10)", verdicts=None):
    """Groups x probe steps, log10 of the cleaned PPI divided by the `relative_to` row when it exists; with
    `verdicts` (per probe, each group's verdict name) the cells of fits not accepted are marked by why."""
    plt = _pyplot()
    smooth = clean(ppi_series(history))
    if relative_to in names:
        smooth = smooth / smooth[names.index(relative_to)]
    fig, ax = plt.subplots(figsize=(max(5.5, 0.35 * smooth.shape[1] + 2.5), 0.45 * len(names) + 1.8))
    with np.errstate(divide="ignore", invalid="ignore"):
        image = ax.imshow(np.log10(smooth), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), names)
    _probe_step_ticks(ax, smooth.shape[1])
    ax.set_xlabel("probe step")
    if verdicts is not None:
        for t, probe in enumerate(verdicts):
            for k, verdict in enumerate(probe):
                if verdict != "accepted":
                    kind = "rejected" if verdict in MEASURED_REJECTIONS else "unmeasured"
                    ax.text(t, k, MARKS[kind], ha="center", va="center", fontsize=11, fontweight="bold",
                            color="#e03030" if kind == "rejected" else "#909090")  # seen on dark and blank cells
        ax.set_xlabel(f"probe step\n{MARKS['unmeasured']} not measured (no direction, below resolution)   "
                      f"{MARKS['rejected']} rejected (b <= 0, A <= 0, R^2)", fontsize=8)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="log10 PPI ratio")
    return _save(plt, fig, path)


def _probe_step_ticks(ax, steps):
    """Ticks at whole probe steps, ten at most (a locator puts fractions under one or two steps)."""
    ax.set_xticks(range(0, steps, max(1, math.ceil(steps / 10))))


LABELLED_CURVES = 10  # more groups than this: the rest drawn thin and grey, unlabelled, so the legend stays readable


def appi_curves(history, names, path, title="APPI: accumulated PPI, cleaned and smoothed"):
    plt = _pyplot()
    series = ppi_series(history)
    curves = np.cumsum(np.nan_to_num(clean(series)), axis=1)
    # the groups of largest APPI (the record's sum of PPI, not the smoothed curves) labelled
    labelled = set(np.argsort(-np.nansum(series, axis=1), kind="stable")[:LABELLED_CURVES].tolist())
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    for k, (name, curve) in enumerate(zip(names, curves)):
        if k in labelled:
            ax.plot(curve, label=name)
        else:
            ax.plot(curve, color="0.75", linewidth=0.6)
    ax.set_yscale("symlog", linthresh=1e-12)
    _probe_step_ticks(ax, curves.shape[1])
    ax.set_xlabel("probe step")
    ax.set_ylabel("APPI")
    others = len(names) - len(labelled)
    ax.set_title(title + (f"\n(the {len(labelled)} of largest APPI named; {others} others in grey)" if others else ""),
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return _save(plt, fig, path)


def pareto(selection, path, all_subsets=None, nested=None, measured=None, measured_name="measured",
           title="Pareto frontier"):
    """Predicted loss reduction against % trainable parameters: the selection's frontier, every subset
    when `all_subsets` = (counts, values) is given, the nested sets of a greedy selection `nested`, and a second panel of measured results `measured` =
    [(share of parameters, metric, label[, spread])] when the sets were trained. Labels "<name> top-<k>"
    are one nested family and are drawn as one line; the others are single methods."""
    plt = _pyplot()
    panels = 2 if measured else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    total = selection.total
    # A log scale of the share; the empty set (no parameters) has no place on it and is left out.
    if all_subsets is not None:
        counts, values = (np.asarray(a) for a in all_subsets)
        keep = counts > 0
        ax.scatter(100 * counts[keep] / total, values[keep], s=6, c="lightgray", label="all subsets")
    points = selection.frontier or [(selection.count, selection.value, selection.mask)]
    labels = selection.labels or [selection.method] * len(points)
    for how in sorted(set(label.split("@")[0] for label in labels)):
        chosen = [(c, v) for (c, v, _), label in zip(points, labels) if label.split("@")[0] == how and c > 0]
        if chosen:
            xs, ys = zip(*chosen)
            ax.plot(100 * np.asarray(xs) / total, ys, "o-" if how in ("greedy", "exact") else "s", label=how, ms=4)
    if nested is not None:
        xs, ys, _ = zip(*[point for point in nested.frontier if point[0] > 0])
        ax.plot(100 * np.asarray(xs) / total, ys, "x--", ms=5, lw=0.8, label="greedy nested sets")
    if selection.budget is not None and selection.count > 0:  # without a budget nothing was chosen
        ax.axvline(100 * selection.count / total, color="k", lw=0.8, ls=":",
                   label=f"chosen within {selection.budget:.2%}")
    ax.set_xscale("log")
    ax.set_xlabel("% trainable parameters")
    ax.set_ylabel("predicted loss reduction")
    ax.set_title(title)
    ax.legend(fontsize=8)
    if measured:
        _measured_panel(axes[0][1], measured, measured_name)
    return _save(plt, fig, path)


def report(record, out_dir, budget=None, title="Pareto frontier", measured_name="test accuracy"):
    """All three pictures of a probe record (`adapeft probe`'s probe.json or `adapeft demo`'s results.json):
    ppi_heatmap.png, appi.png and pareto.png in `out_dir`; the Pareto panel gets every subset as its
    background when there are at most 24 groups, and the measured panel when the record has trained
    results. Returns the paths written."""
    import os

    from ..select import all_subsets, select
    names, counts = record["groups"], record["counts"]
    values = [a * n for a, n in zip(record["appi"], counts)]
    frontier = select(values=values, counts=counts, names=names, budget=budget, method="pareto")
    nested = select(values=values, counts=counts, names=names, method="greedy")
    if record.get("comparison"):
        measured = [(row["share"], row["accuracy_mean"], row["method"], row["accuracy_std"])
                    for row in record["comparison"]]
    elif record.get("target"):
        measured = [(record["target"]["share"], record["target"]["test_accuracy"], "AdaPEFT")]
    else:
        measured = None
    os.makedirs(out_dir, exist_ok=True)
    verdicts = [probe["verdict"] for probe in record["probe_history"]] if record.get("probe_history") else None
    return [ppi_heatmap(record["ppi_history"], names, os.path.join(out_dir, "ppi_heatmap.png"), verdicts=verdicts),
            appi_curves(record["ppi_history"], names, os.path.join(out_dir, "appi.png")),
            pareto(frontier, os.path.join(out_dir, "pareto.png"),
                   all_subsets=all_subsets(values, counts) if len(names) <= 24 else None, nested=nested,
                   measured=measured,
                   measured_name=measured_name, title=title)]


def _measured_panel(ax, measured, name):
    families = {}
    for share, metric, label, *spread in measured:
        family = label.split(" top-")[0] + " nested sets" if " top-" in label else label
        families.setdefault(family, []).append((100 * share, metric, spread[0] if spread else 0.0))
    markers = "osD^v<>ph*"
    for index, (family, rows) in enumerate(families.items()):
        xs, ys, spreads = zip(*sorted(rows))
        ax.errorbar(xs, ys, yerr=spreads, fmt=("o-" if len(rows) > 1 else markers[index % len(markers)]),
                    ms=5, capsize=2, lw=1, label=family)
    ax.set_xscale("log")
    ax.set_xlabel("% trainable parameters")
    ax.set_ylabel(name)
    ax.set_title(f"{name} after training")
    ax.legend(fontsize=7, loc="lower right")


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
