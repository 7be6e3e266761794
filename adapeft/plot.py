"""The paper's pictures: the PPI heatmap, APPI curves and the Pareto frontier (matplotlib, written to files).

Following its appendix A.1: per group, values outside [Q1 - 3 IQR, Q3 + 3 IQR] of its series are dropped
as fit outliers, the series is smoothed by an exponential moving average, and the heatmap divides every
row by the `others` row (the bulk of the parameters), so that row reads one unit of influence.
Groups rejected at a probe step (PPI 0) count as missing, not as zero influence.
"""
import numpy as np
import torch

IQR_FACTOR = 3.0
EMA = 0.9


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(history):
    """K x T float64 array of PPI, nan where a group was rejected."""
    if not history:
        raise ValueError("adapeft.plot: the probe history is empty; run Prober.step() first")
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


def ppi_heatmap(history, names, path, relative_to="others", title="PPI relative to others (log10)"):
    """Groups x probe steps, log10 of the cleaned PPI divided by the `relative_to` row when it exists."""
    plt = _pyplot()
    smooth = clean(_series(history))
    if relative_to in names:
        smooth = smooth / smooth[names.index(relative_to)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * smooth.shape[1] + 2.5), 0.45 * len(names) + 1.5))
    with np.errstate(divide="ignore", invalid="ignore"):
        image = ax.imshow(np.log10(smooth), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), names)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("probe step")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="log10 PPI ratio")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def appi_curves(history, names, path, title="APPI: accumulated per-parameter influence"):
    plt = _pyplot()
    smooth = clean(_series(history))
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for name, row in zip(names, smooth):
        ax.plot(np.cumsum(np.nan_to_num(row)), label=name)
    ax.set_yscale("symlog", linthresh=1e-12)
    ax.set_xlabel("probe step")
    ax.set_ylabel("APPI")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto(selection, path, all_subsets=None, measured=None, title="Pareto frontier"):
    """Predicted loss reduction against % trainable parameters: the selection's frontier, every subset
    when `all_subsets` = (counts, values) is given, and a second panel of measured results `measured` =
    [(share of parameters, metric, label)] when the sets were trained."""
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
    if selection.count > 0:
        ax.axvline(100 * selection.count / total, color="k", lw=0.8, ls=":", label="chosen")
    ax.set_xscale("log")
    ax.set_xlabel("% trainable parameters")
    ax.set_ylabel("predicted loss reduction")
    ax.set_title(title)
    ax.legend(fontsize=8)
    if measured:
        ax = axes[0][1]
        for share, metric, label in measured:
            ax.scatter(100 * share, metric)
            ax.annotate(label, (100 * share, metric), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("% trainable parameters")
        ax.set_ylabel("measured")
        ax.set_title("measured after training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
