"""PNG figures of an evaluation report: Recall@K curves and per-stage latency histograms.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so it
works headless and inside other programs. The figure is drawn from a report dict alone, so a
report written yesterday can be re-plotted (``cgrs eval plot REPORT.json``).
"""

import io
import math

from cgrs_ros.engine.errors import CgrsError
from cgrs_ros.engine.storage import atomic_write_bytes
import numpy as np


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CgrsError('plotting needs matplotlib; install it with pip install matplotlib '
                        '(or pip install cgrs_ros[plot])') from None
    return Figure, FigureCanvasAgg


def _title(report):
    counts = report.get('counts', {})
    text = f"{report.get('benchmark', '?')}: {counts.get('queries', '?')} queries, " \
           f"{counts.get('gallery_images', '?')} gallery images"
    encoders = report.get('encoders') or {}
    names = [str(encoders[k]) for k in ('image_encoder', 'text_encoder') if encoders.get(k)]
    if names:
        text += '\n' + ' / '.join(names)
    return text


def render_report_png(report, dpi=110):
    """Return PNG bytes of a report's figure.

    Recall@K (K = 1..10) per method on top, below it one latency histogram per stage with
    the methods overlaid.
    """
    figure_cls, canvas_cls = _matplotlib()
    methods = report.get('methods', {})
    if not methods:
        raise CgrsError('the report has no methods to plot; run cgrs eval with --methods')
    stages = []
    for entry in methods.values():
        for stage, values in entry.get('latency_samples_ms', {}).items():
            if values and stage not in stages:
                stages.append(stage)
    hist_cols = min(4, max(1, len(stages)))
    hist_rows = math.ceil(len(stages) / hist_cols) if stages else 0
    fig = figure_cls(figsize=(4.2 * hist_cols + 1.5, 4.2 + 3.0 * hist_rows), dpi=dpi)
    canvas_cls(fig)
    grid = fig.add_gridspec(1 + hist_rows, hist_cols, height_ratios=[1.4] + [1] * hist_rows)
    colors = {name: f'C{i}' for i, name in enumerate(methods)}

    ax = fig.add_subplot(grid[0, :])
    for name, entry in methods.items():
        for direction, curve in entry.get('curve', {}).items():
            ks = list(range(1, len(curve) + 1))
            label = name if len(entry.get('curve', {})) == 1 else f'{name} ({direction})'
            ax.plot(ks, curve, marker='o', color=colors[name], label=label)
            if curve:
                ax.annotate(f'{curve[-1]:.1f}', (ks[-1], curve[-1]), textcoords='offset points',
                            xytext=(6, 0), va='center', fontsize=8, color=colors[name])
    ax.set_xlabel('K')
    ax.set_ylabel('Recall@K (%)')
    ax.set_xticks(range(1, 11))
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0))
    ax.set_title(_title(report), fontsize=10)

    for i, stage in enumerate(stages):
        ax = fig.add_subplot(grid[1 + i // hist_cols, i % hist_cols])
        series = [(name, entry['latency_samples_ms'][stage]) for name, entry in methods.items()
                  if entry.get('latency_samples_ms', {}).get(stage)]
        low = min(min(v) for _, v in series)
        high = max(max(v) for _, v in series)
        # Latencies have long tails (model warm-up, a busy machine): log-spaced bins keep
        # both the bulk and the tail readable when they span more than a decade.
        floor = max(low, 0.01)
        log_scale = high / floor > 10.0
        if log_scale:
            bins = np.geomspace(floor, high, 31)
        else:
            bins = np.linspace(low, high if high > low else low + 1.0, 31)
        for name, values in series:
            stats = methods[name].get('latency_ms', {}).get(stage, {})
            label = name
            if stats.get('p50') is not None:
                label += f" p50 {stats['p50']:.1f} / p95 {stats['p95']:.1f}"
            clipped = np.clip(values, bins[0], bins[-1])
            ax.hist(clipped, bins=bins, histtype='step', linewidth=1.5, color=colors[name],
                    label=label)
        if log_scale:
            ax.set_xscale('log')
        ax.set_title(f'{stage} latency', fontsize=10)
        ax.set_xlabel('ms (log scale)' if log_scale else 'ms')
        ax.set_ylabel('queries')
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png')
    return buffer.getvalue()


def write_report_png(report, path, dpi=110):
    """Draw :func:`render_report_png` and write it to ``path`` atomically."""
    atomic_write_bytes(path, render_report_png(report, dpi=dpi))
    return path
