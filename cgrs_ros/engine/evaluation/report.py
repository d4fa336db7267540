"""The JSON evaluation report: what was measured, with what, and how two runs differ.

A report is a plain dict (written as JSON) with this shape::

    {'cgrs_eval_report': 1, 'benchmark': 'geotext', 'created': ISO time,
     'recall_unit': 'percent', 'inputs': {...}, 'config': {...}, 'encoders': {...},
     'counts': {'queries', 'gallery_images', 'groups', 'absent_queries', ...},
     'absent_query_ids': [...first 50...], 'problems': [...first 50...],
     'methods': {name: {'overrides': {...}, 'metrics': {'t2i_r1': ..., ...},
                        'n_queries', 'n_absent', 'curve': {'t2i': [R@1..R@10]},
                        'by_platform': {platform: {'n_queries', 'n_absent', 't2i_r1', ...}},
                        'latency_ms': {stage: {'n', 'mean', 'p50', 'p95', 'max'}},
                        'latency_samples_ms': {stage: [...]},
                        'per_query': [{'query_id', 'first_hit_rank', 'top10'}, ...]}},
     'queries': [{'query_id', 'relevant'}, ...],
     'captioning': {...}, 'tuning': {...}}       (the last two only when they ran)

Stages are those of ``QueryResult.timings_ms`` (encode, coarse, captions, rerank, total).
With a reranker configured every method appears twice, ``hybrid`` (stage off) and
``hybrid+reranker`` (stage on). ``per_query`` is for error analysis: the label (place /
group id; the image id in Track 4) of each of the top 10 images and the 1-based rank of the
first correct one (null when none of the 10 is). ``latency_samples_ms`` keeps at most
:data:`MAX_LATENCY_SAMPLES` values per stage (evenly strided, so the histogram keeps its
shape) so that a report can be re-plotted later.
"""

import datetime
import json

from cgrs_ros.engine.errors import CgrsError
from cgrs_ros.engine.evaluation.metrics import (CURVE_MAX_K, HEADLINE_KS, latency_summary,
                                                track4_score)
from cgrs_ros.engine.storage import atomic_write_text

REPORT_VERSION = 1
MAX_LATENCY_SAMPLES = 2000
MAX_LISTED = 50


def _strided(values, limit):
    values = list(values)
    if len(values) <= limit:
        return values
    step = len(values) / float(limit)
    return [values[int(i * step)] for i in range(limit)]


def stage_samples(timings):
    """Turn per-query ``{stage: ms}`` dicts into ``{stage: [ms, ...]}`` (stage order kept)."""
    stages = {}
    for per_query in timings:
        for stage, value in (per_query or {}).items():
            if value is not None:
                stages.setdefault(stage, []).append(float(value))
    return stages


def per_query_rows(query_ids, ranked_labels, hit_ranks, top=CURVE_MAX_K):
    """Return one ``{'query_id', 'first_hit_rank', 'top10'}`` row per query (error analysis).

    ``ranked_labels[q]`` are the labels of query ``q``'s ranked images, ``hit_ranks[q]`` the
    1-based rank of its first hit (0: none in the list, written as null).
    """
    return [{'query_id': qid, 'first_hit_rank': int(rank) or None,
             'top10': list(labels[:top])}
            for qid, labels, rank in zip(query_ids, ranked_labels, hit_ranks)]


def method_entry(result, timings=(), overrides=None, challenge_score=False, ks=HEADLINE_KS,
                 per_query=None):
    """Return the report entry of one method from its RecallResult and per-query timings."""
    summary = result.summary(ks)
    metrics = {k: v for k, v in summary.items() if k.startswith(result.direction + '_r')}
    if challenge_score:
        metrics['track4_score'] = round(track4_score(result), 4)
    samples = stage_samples(timings)
    entry = {
        'overrides': dict(overrides or {}),
        'metrics': metrics,
        'n_queries': summary['n_queries'],
        'n_absent': summary['n_absent'],
        'curve': {result.direction: summary['curve']},
        'latency_ms': {stage: latency_summary(v) for stage, v in samples.items()},
        'latency_samples_ms': {stage: [round(x, 3) for x in _strided(v, MAX_LATENCY_SAMPLES)]
                               for stage, v in samples.items()},
    }
    if 'shortest_list' in summary:
        entry['shortest_list'] = summary['shortest_list']
    if 'by_platform' in summary:
        entry['by_platform'] = summary['by_platform']
    if per_query is not None:
        entry['per_query'] = list(per_query)
    return entry


def build_report(benchmark, methods, counts, config=None, encoders=None, inputs=None,
                 absent_query_ids=(), problems=(), notes=()):
    """Assemble a report dict; ``methods`` maps a method name to its :func:`method_entry`."""
    return {
        'cgrs_eval_report': REPORT_VERSION,
        'benchmark': benchmark,
        'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'recall_unit': 'percent',
        'inputs': dict(inputs or {}),
        'config': config or {},
        'encoders': dict(encoders or {}),
        'counts': dict(counts),
        'absent_query_ids': list(absent_query_ids)[:MAX_LISTED],
        'problems': list(problems)[:MAX_LISTED],
        'notes': list(notes),
        'methods': dict(methods),
    }


def write_report(path, report):
    """Write ``report`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(report, indent=2, sort_keys=False) + '\n')


def load_report(path):
    """Read a report written by :func:`write_report`, checking it is one."""
    try:
        with open(path, encoding='utf-8') as handle:
            report = json.load(handle)
    except FileNotFoundError:
        raise CgrsError(f'report {path} does not exist; pass a file written by '
                        f'cgrs eval ... --report') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CgrsError(f'report {path} is not valid JSON ({exc}); pass a file written by '
                        f'cgrs eval ... --report') from None
    if not isinstance(report, dict) or 'cgrs_eval_report' not in report:
        raise CgrsError(f'{path} is not a cgrs evaluation report; pass a file written by '
                        f'cgrs eval ... --report')
    return report


def _fmt(value, width=8, digits=2):
    if value is None:
        return '-'.rjust(width)
    return f'{value:{width}.{digits}f}'


def format_report(report):
    """Return a human-readable table of a report: metrics and latency per method."""
    lines = []
    counts = report.get('counts', {})
    lines.append(f"benchmark {report.get('benchmark')}: "
                 + ', '.join(f'{k}={v}' for k, v in counts.items()))
    encoders = report.get('encoders') or {}
    if encoders:
        lines.append('encoders: ' + ', '.join(f'{k}={v}' for k, v in encoders.items()))
    methods = report.get('methods', {})
    metric_names = []
    for entry in methods.values():
        for name in entry.get('metrics', {}):
            if name not in metric_names:
                metric_names.append(name)
    stages = []
    for entry in methods.values():
        for stage in entry.get('latency_ms', {}):
            if stage not in stages:
                stages.append(stage)
    width = max([10] + [len(name) for name in methods])
    header = f"{'method':{width}s}" + ''.join(f'{m:>14s}' for m in metric_names)
    lines.append(header)
    for name, entry in methods.items():
        values = entry.get('metrics', {})
        lines.append(f'{name:{width}s}' + ''.join(_fmt(values.get(m), 14) for m in metric_names))
    platforms = sorted({p for e in methods.values() for p in e.get('by_platform', {})})
    if platforms:
        lines.append('per platform (queries):')
        for platform in platforms:
            for name, entry in methods.items():
                sub = entry.get('by_platform', {}).get(platform)
                if not sub:
                    continue
                lines.append(f"  {platform:9s} {name:{width}s} n={sub.get('n_queries'):<6d}"
                             + ''.join(f' {m}={_fmt(sub.get(m), 6)}' for m in metric_names
                                       if m in sub))
    if stages:
        lines.append('latency ms (p50 / p95 / mean):')
        for name, entry in methods.items():
            parts = []
            for stage in stages:
                stats = entry.get('latency_ms', {}).get(stage)
                if stats and stats.get('n'):
                    parts.append(f"{stage} {_fmt(stats['p50'], 1)}/{_fmt(stats['p95'], 1)}/"
                                 f"{_fmt(stats['mean'], 1)}")
            lines.append(f'  {name:{width}s} ' + '  '.join(parts))
    tuning = report.get('tuning')
    if tuning:
        chosen = tuning.get('chosen', {})
        lines.append(f"weights tuned on {tuning.get('validation')} ({tuning.get('n_queries')} "
                     f"queries): caption_weight {chosen.get('caption_weight')}, reranker weight "
                     f"{chosen.get('reranker_weight')} (validation R@1 "
                     f"{_fmt(chosen.get('t2i_r1'), 0)}, R@5 {_fmt(chosen.get('t2i_r5'), 0)})")
    absent = counts.get('absent_queries')
    if absent:
        lines.append(f'{absent} queries have no relevant item in the gallery; they count as '
                     f'misses')
    return '\n'.join(lines)


def _flatten(value, prefix=''):
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f'{prefix}.{key}' if prefix else str(key)))
        return out
    return {prefix: value}


def compare_reports(a, b, pairs=None):
    """Return the differences between two reports as a dict of rows.

    ``pairs`` lists ``(method in a, method in b)`` to compare; by default every method name
    the two reports share is compared with itself. A pair of different names is reported
    under ``'name_a->name_b'``.

    ``metrics``: ``(method, metric, a, b, b - a)`` for every metric both runs have, per
    platform included (as ``platform/metric``); ``latency``: the same for p50/p95/mean per
    stage; ``config``: ``(key, a, b)`` for config and encoder values that differ;
    ``counts``: the same for counts (different counts mean the runs are not comparable).
    """
    rows = {'metrics': [], 'latency': [], 'config': [], 'counts': []}
    methods_a = a.get('methods', {})
    methods_b = b.get('methods', {})
    if pairs is None:
        pairs = [(m, m) for m in methods_a if m in methods_b]
    for name_a, name_b in pairs:
        for name, methods, which in ((name_a, methods_a, 'A'), (name_b, methods_b, 'B')):
            if name not in methods:
                raise CgrsError(f'report {which} has no method {name!r}; it has '
                                f'{", ".join(methods) or "none"}')
        method = name_a if name_a == name_b else f'{name_a}->{name_b}'
        ea, eb = methods_a[name_a], methods_b[name_b]
        for metric, va in ea.get('metrics', {}).items():
            vb = eb.get('metrics', {}).get(metric)
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                rows['metrics'].append((method, metric, va, vb, vb - va))
        for platform, sa in ea.get('by_platform', {}).items():
            sb = eb.get('by_platform', {}).get(platform, {})
            for metric, va in sa.items():
                vb = sb.get(metric)
                if metric.startswith(('t2i_', 'i2t_')) and isinstance(vb, (int, float)):
                    rows['metrics'].append((method, f'{platform}/{metric}', va, vb, vb - va))
        for stage, la in ea.get('latency_ms', {}).items():
            lb = eb.get('latency_ms', {}).get(stage, {})
            for stat in ('p50', 'p95', 'mean'):
                va, vb = la.get(stat), lb.get(stat)
                if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                    rows['latency'].append((method, f'{stage}.{stat}', va, vb, vb - va))
    for section in ('config', 'encoders'):
        fa, fb = _flatten(a.get(section) or {}), _flatten(b.get(section) or {})
        for key in sorted(set(fa) | set(fb)):
            if fa.get(key) != fb.get(key):
                rows['config'].append((f'{section}.{key}', fa.get(key), fb.get(key)))
    ca, cb = a.get('counts', {}), b.get('counts', {})
    for key in sorted(set(ca) | set(cb)):
        if ca.get(key) != cb.get(key):
            rows['counts'].append((key, ca.get(key), cb.get(key)))
    only_a = sorted(set(methods_a) - {p[0] for p in pairs})
    only_b = sorted(set(methods_b) - {p[1] for p in pairs})
    rows['methods_only_in_a'] = only_a
    rows['methods_only_in_b'] = only_b
    return rows


def format_comparison(rows, name_a='A', name_b='B'):
    """Return a human-readable table of :func:`compare_reports` rows."""
    lines = [f'A = {name_a}', f'B = {name_b}']
    if rows['counts']:
        lines.append('WARNING: the runs differ in counts, so figures are not directly '
                     'comparable:')
        lines.extend(f'  {key}: {va} -> {vb}' for key, va, vb in rows['counts'])
    width = max([10] + [len(row[0]) for row in rows['metrics'] + rows['latency']])
    lines.append(f"{'method':{width}s} {'metric':28s} {'A':>10s} {'B':>10s} {'B - A':>9s}")
    for method, metric, va, vb, delta in rows['metrics']:
        lines.append(f'{method:{width}s} {metric:28s} {va:10.2f} {vb:10.2f} {delta:+9.2f}')
    if not rows['metrics']:
        lines.append('(no method in common; pick pairs with --pair A_METHOD:B_METHOD)')
    if rows['latency']:
        lines.append('latency ms:')
        for method, metric, va, vb, delta in rows['latency']:
            lines.append(f'{method:{width}s} {metric:28s} {va:10.2f} {vb:10.2f} {delta:+9.2f}')
    if rows['config']:
        lines.append('settings that differ:')
        lines.extend(f'  {key}: {va!r} -> {vb!r}' for key, va, vb in rows['config'])
    for key, label in (('methods_only_in_a', 'A'), ('methods_only_in_b', 'B')):
        if rows.get(key):
            lines.append(f"methods not compared in {label}: {', '.join(rows[key])}")
    return '\n'.join(lines)
