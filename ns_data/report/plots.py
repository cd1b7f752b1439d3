"""The report's figures, drawn by matplotlib (Agg, imported on first use) and embedded as PNG data URIs.

Per-class figures read at any number of classes: classes are ordered (by size, by median confidence) along
the x axis, named on it when there are few of them, counted by rank when there are many.
"""
from __future__ import annotations

import base64
import io

import numpy as np

from ns_data.stage import StageError

DPI = 100
NAMED_TICKS = 40  # at most this many classes are named along an axis
LOG_SPAN = 20  # counts spanning a wider ratio (largest / smallest) are drawn on a log axis
WIDE = (10.0, 3.6)
BAND_COLOR = "#1f77b4"


def require_matplotlib() -> None:
    """Stops with one line when the `report` extra is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise StageError("`ns-data report` draws with matplotlib: pip install 'ns-data[report]'") from err


def _figure(size=WIDE, rows: int = 1, cols: int = 1, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kwargs)
    for ax in axes.ravel():
        ax.grid(True, alpha=0.3, linewidth=0.6)
    return fig, axes


def _data_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: same data, same bytes
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _class_axis(ax, names: list[str], what: str) -> None:
    """Class names along x when few, else the rank."""
    if len(names) <= NAMED_TICKS:
        ax.set_xticks(range(len(names)), names, rotation=90 if max(map(len, names), default=0) > 3 else 0,
                      fontsize=8)
        ax.set_xlabel(f"class ({what})")
    else:
        ax.set_xlabel(f"class rank ({what}), {len(names):,} classes")
    ax.set_xlim(-0.5, len(names) - 0.5)


def _per_class(ax, values: np.ndarray, label: str, **kwargs) -> None:
    """Bars when the classes are few, a step line when many."""
    x = np.arange(len(values))
    if len(values) <= NAMED_TICKS:
        ax.bar(x, values, label=label, **kwargs)
    else:
        ax.step(x, values, where="mid", label=label, **{k: v for k, v in kwargs.items() if k != "width"})


def _count_scale(ax, counts: np.ndarray) -> str:
    """A log y axis when the counts span more than LOG_SPAN (the long tail at a glance), else a linear one from
    0 (a log axis over a narrow range hides the baseline); plain numbers on the ticks. Returns the scale."""
    from matplotlib import ticker

    positive = counts[counts > 0]
    if len(positive) and positive.max() / positive.min() > LOG_SPAN:
        ax.set_yscale("log")
        ax.set_ylim(bottom=10 ** np.floor(np.log10(positive.min())) * 0.8)
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        return "log scale"
    ax.set_ylim(bottom=0)
    return "linear scale"


def class_sizes(counts: np.ndarray, names: list[str], title: str, ylabel: str) -> str:
    """Counts per class, largest first."""
    fig, ((ax,),) = _figure()
    _per_class(ax, counts, ylabel, color=BAND_COLOR)
    scale = _count_scale(ax, counts)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} ({scale})")
    _class_axis(ax, names, "largest first")
    return _data_uri(fig)


def confidence_bands(percentiles: np.ndarray, names: list[str]) -> str:
    """Per-class confidence as bands p10-p90 and p25-p75 around the median, classes sorted by median
    (`percentiles` columns: p10, p25, p50, p75, p90, rows already in that order)."""
    fig, ((ax,),) = _figure()
    x = np.arange(len(percentiles))
    step = "mid" if len(x) > NAMED_TICKS else None
    ax.fill_between(x, percentiles[:, 0], percentiles[:, 4], color=BAND_COLOR, alpha=0.2, step=step,
                    label="p10-p90")
    ax.fill_between(x, percentiles[:, 1], percentiles[:, 3], color=BAND_COLOR, alpha=0.4, step=step,
                    label="p25-p75")
    ax.plot(x, percentiles[:, 2], color="black", linewidth=1, label="median",
            drawstyle="steps-mid" if step else "default", marker="o" if step is None else None, markersize=3)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("confidence")
    ax.set_title("confidence per class")
    ax.legend(loc="lower right", fontsize=8)
    _class_axis(ax, names, "by median confidence")
    return _data_uri(fig)


def histograms(confidence: np.ndarray, entropy: np.ndarray | None, entropy_bin: float) -> str:
    """Confidence histogram (and the entropy histogram beside it)."""
    fig, axes = _figure(WIDE, 1, 2 if entropy is not None else 1)
    ax = axes[0, 0]
    edges = np.linspace(0, 1, len(confidence) + 1)
    ax.stairs(confidence, edges, fill=True, color=BAND_COLOR)
    ax.set_xlabel("confidence")
    ax.set_ylabel("rows")
    ax.set_title("confidence")
    if entropy is not None:
        ax = axes[0, 1]
        ax.stairs(entropy, np.arange(len(entropy) + 1) * entropy_bin, fill=True, color="#ff7f0e")
        ax.set_xlabel("entropy (nats)")
        ax.set_title("entropy")
    return _data_uri(fig)


def reasons(counts: dict[str, int], title: str) -> str:
    """Rows by reason, as horizontal bars."""
    items = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    fig, ((ax,),) = _figure((8.0, 0.6 + 0.35 * len(items)))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#d62728")
    ax.set_xlabel("rows")
    ax.set_title(title)
    return _data_uri(fig)


def accuracy(edges: np.ndarray, rows: np.ndarray, correct: np.ndarray) -> str:
    """Pseudo-label accuracy per confidence bin (line) over the rows in each bin (bars); the diagonal is a
    perfectly calibrated teacher."""
    fig, ((ax,),) = _figure((8.0, 3.6))
    centers = (edges[:-1] + edges[1:]) / 2
    counts = ax.twinx()
    counts.bar(centers, rows, width=np.diff(edges) * 0.9, color="#cccccc")
    counts.set_ylabel("rows with ground truth")
    ax.set_zorder(counts.get_zorder() + 1)
    ax.patch.set_visible(False)
    with np.errstate(invalid="ignore", divide="ignore"):
        ax.plot(centers, np.where(rows > 0, correct / rows, np.nan), marker="o", color=BAND_COLOR,
                label="accuracy")
    ax.plot([0, 1], [0, 1], linestyle=":", color="gray", label="calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("teacher confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    return _data_uri(fig)


def selection(candidates: np.ndarray, selected: np.ndarray, cut: np.ndarray, duplication: np.ndarray,
              names: list[str], min_confidence: float) -> str:
    """Per class, largest (by candidates) first: candidates and kept rows (log), the cut (the least confidence
    kept), and copies per kept row."""
    fig, axes = _figure((10.0, 8.0), 3, 1, sharex=True)
    ax = axes[0, 0]
    _per_class(ax, candidates, "candidates", color="#cccccc")
    _per_class(ax, selected, "kept", color=BAND_COLOR, **({"width": 0.5} if len(names) <= NAMED_TICKS else {}))
    scale = _count_scale(ax, np.concatenate([candidates, selected]))
    ax.set_ylabel("rows")
    ax.set_title(f"kept rows of the candidates ({scale})")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(np.arange(len(cut)), cut, marker="o" if len(cut) <= NAMED_TICKS else None, markersize=3,
            linewidth=1, color=BAND_COLOR, label="least confidence kept")
    ax.axhline(min_confidence, color="#d62728", linestyle=":", label=f"--min-confidence {min_confidence:g}")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("confidence")
    ax.set_title("the cut per class")
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[2, 0]
    _per_class(ax, duplication, "copies / kept", color="#ff7f0e")
    ax.set_ylabel("copies per kept row")
    ax.set_title("duplication per class (1 = none)")
    _class_axis(axes[2, 0], names, "most candidates first")
    return _data_uri(fig)


def shards(records: np.ndarray) -> str:
    """Records per shard, in shard order."""
    fig, ((ax,),) = _figure((10.0, 3.0))
    from matplotlib import ticker

    ax.bar(np.arange(len(records)), records, width=1.0 if len(records) > NAMED_TICKS else 0.8, color=BAND_COLOR)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("shard")
    ax.set_ylabel("records")
    ax.set_title("records per shard")
    return _data_uri(fig)


def final_top1(runs: list[str], top1: list[float | None], ema_top1: list[float | None]) -> str:
    """The runs' final evaluation side by side: top-1 of the weights and of their EMA, as dots on an axis
    zoomed to the values (runs a point apart stay apart), each labelled with its value."""
    fig, axes = _figure((12.0, 1.3 + 0.4 * len(runs)))
    ax = axes[0, 0]
    y = np.arange(len(runs))
    for offset, values, label, marker in ((-0.12, top1, "weights", "o"), (0.12, ema_top1, "EMA weights", "D")):
        known = [(i, v) for i, v in enumerate(values) if v is not None]
        if not known:
            continue
        rows, shown = (np.array(v) for v in zip(*known))
        ax.scatter(shown, rows + offset, label=label, marker=marker, s=28, zorder=3)
        for row, value in known:
            ax.annotate(f"{value:.4f}", (value, row + offset), xytext=(6, -3), textcoords="offset points", fontsize=8)
    ax.set_yticks(y, runs)
    ax.set_ylim(len(runs) - 0.5, -0.5)
    ax.margins(x=0.15)
    ax.set_xlabel("top-1 on the validation shards")
    ax.set_title("final evaluation")
    ax.legend(fontsize=8, loc="lower right")
    return _data_uri(fig)


def runs(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> str:
    """Training runs overlaid: one panel per quantity (loss parts, learning rate, evaluations), a line per run.
    `curves` maps a panel title to {run: (steps, values)}."""
    panels = [title for title, lines in curves.items() if lines]
    cols = 3
    rows = max(1, -(-len(panels) // cols))
    fig, axes = _figure((12.0, 3.2 * rows), rows, cols)
    colors = {}
    for ax, title in zip(axes.ravel(), panels):
        for run, (steps, values) in curves[title].items():
            base = run.removesuffix(" (ema)")
            color = colors.setdefault(base, f"C{len(colors) % 10}")
            ax.plot(steps, values, label=run, color=color, linestyle="--" if run != base else "-",
                    marker="o" if len(steps) < 3 else None, markersize=3, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    return _data_uri(fig)
