"""Figures of the operator console and of confirm_below (issue 14).

    .venv/bin/python benchmarks/console_figures.py [--goals 30] [--loads 10] [--json OUT]

1. The console of a real stack: `cgrs launch` on the demo world (config/demo_engine.yaml,
   console:=true) and Debian's chromium driven by Playwright. Page load: from navigation to
   the page connected (WebSocket open) with the map drawn, first load (the server draws the
   mosaic) and later loads. Goal -> candidates shown: from the Send click to the candidates
   in the page (the page's own performance.now()), for held-out queries of the demo world, one
   at a time, next to the engine's own time for the same goal.
2. confirm_below on the demo world's held-out queries (demo/world/queries.csv, 320 goals; the
   calibration in demo_engine.yaml was fitted on towns 2000/2001): the share of goals it holds
   and the rank-1 accuracy of those it lets through, per min_confidence. Computed with the
   node's own functions (confidence.assess / should_hold over the engine's ranking).
"""

import argparse
import csv
import json
import os
from pathlib import Path
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / 'demo' / 'world'
CONFIG = ROOT / 'config' / 'demo_engine.yaml'


def _stats(samples):
    array = np.asarray(samples, dtype=float)
    return {'p50_ms': float(np.percentile(array, 50)), 'p95_ms': float(np.percentile(array, 95)),
            'n': int(array.size)}


def _goals(count):
    with open(WORLD / 'queries.csv', newline='') as handle:
        queries = [row['query'] for row in csv.DictReader(handle)]
    random.Random(0).shuffle(queries)
    return queries[:count]


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f'timed out waiting for {what}')
        time.sleep(0.05)


def console_latency(goals, loads):
    """Start the stack with the console; return page-load and goal->candidates timings."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which('chromium')
    if chromium is None:
        raise SystemExit('Debian chromium is needed: run `make setup` as root')
    tmp = Path(tempfile.mkdtemp(prefix='cgrs-console-bench-'))
    params = tmp / 'params.yaml'
    params.write_text('/**/console_node:\n  ros__parameters:\n    console: {port: 0}\n')
    log = tmp / 'launch.log'
    env = dict(os.environ, PYTHONUNBUFFERED='1', ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
               ROS_DOMAIN_ID=os.environ.get('ROS_DOMAIN_ID', str(random.randint(101, 230))))
    with open(log, 'w') as out:
        proc = subprocess.Popen(
            [sys.executable, '-m', 'cgrs_ros.cli', 'launch', f'params_file:={params}',
             f'gallery_dir:={WORLD}', f'config:={CONFIG}', 'console:=true',
             'captioning:=false'], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        port = {}

        def ready():
            text = log.read_text()
            found = re.search(r'console at http://127\.0\.0\.1:(\d+)/', text)
            if found:
                port['port'] = int(found.group(1))
            if proc.poll() is not None:
                raise SystemExit(f'the stack exited: {text}')
            return found and 'ready:' in text
        _wait(ready, 300, 'the stack')
        url = f'http://127.0.0.1:{port["port"]}/'
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                         args=['--no-sandbox'])
            page_loads = []
            for _ in range(loads):
                context = browser.new_context()   # nothing cached between loads
                page = context.new_page()
                start = time.perf_counter()
                page.goto(url)
                page.wait_for_selector('#connection.ok')
                _wait(lambda: page.evaluate(
                    "() => document.querySelector('#map-image').naturalWidth > 0"), 60, 'map')
                page_loads.append((time.perf_counter() - start) * 1e3)
                context.close()
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector('#connection.ok')
            page.select_option('#policy', 'auto')
            for goal in goals:
                done = page.evaluate('() => window.cgrsLatencies.length')
                page.fill('#goal-text', goal)
                page.click('#send')
                _wait(lambda: page.evaluate('() => window.cgrsLatencies.length') > done, 60,
                      f'candidates of {goal!r}')
            shown = page.evaluate('() => window.cgrsLatencies')
            browser.close()
    finally:
        proc.send_signal(2)
        proc.wait(timeout=60)
    return {'page_load_first_ms': page_loads[0],
            'page_load_later': _stats(page_loads[1:]) if len(page_loads) > 1 else None,
            'goal_to_candidates_shown': _stats([s['shown_ms'] for s in shown]),
            'engine_total': _stats([s['engine_ms'] for s in shown])}


def confirm_below_figures(thresholds):
    """Held share and R@1 of the let-through goals on the demo world, per min_confidence."""
    from cgrs_ros.cli.calibrate import observe_gallery
    from cgrs_ros.engine import confidence
    from cgrs_ros.engine.config import load_config

    section = load_config(CONFIG).confidence
    observations = observe_gallery(WORLD, str(CONFIG), progress=False)
    rows = []
    for min_confidence, min_margin in thresholds:
        rep = confidence.report(observations, section.intercept, section.weights,
                                min_confidence, min_margin)
        rows.append({k: rep[k] for k in ('min_confidence', 'min_margin', 'queries', 'r_at_1',
                                         'held', 'r_at_1_passed', 'r_at_1_held', 'brier')})
    return {'fitted_on': section.fitted_on, 'rows': rows,
            'reliability': confidence.report(observations, section.intercept,
                                             section.weights)['reliability']}


def main():
    """Measure and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--goals', type=int, default=30, help='goals typed on the page')
    parser.add_argument('--loads', type=int, default=10, help='page loads timed')
    parser.add_argument('--skip-console', action='store_true', help='only the confirm figures')
    parser.add_argument('--json', type=Path, help='also write the figures here')
    args = parser.parse_args()
    if not (WORLD / 'gallery.csv').is_file():
        subprocess.run([sys.executable, '-m', 'cgrs_ros.cli', 'gallery', 'demo', str(WORLD)],
                       check=True)
    figures = {'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
               'cpus': os.cpu_count()}
    figures['confirm_below'] = confirm_below_figures(
        [(0.3, 0.0), (0.4, 0.0), (0.5, 0.0), (0.6, 0.0), (0.0, 0.05), (0.0, 0.1)])
    for row in figures['confirm_below']['rows']:
        print(f'confirm_below min_confidence {row["min_confidence"]:.1f} min_margin '
              f'{row["min_margin"]:.2f}: holds {row["held"]:.1%} of {row["queries"]} goals; '
              f'R@1 of the rest {row["r_at_1_passed"]:.3f} (all {row["r_at_1"]:.3f}, held '
              f'{row["r_at_1_held"]:.3f})')
    if not args.skip_console:
        figures['console'] = console_latency(_goals(args.goals), args.loads)
        c = figures['console']
        print(f'page load: first {c["page_load_first_ms"]:.0f} ms, later p50 '
              f'{c["page_load_later"]["p50_ms"]:.0f} ms')
        print(f'goal -> candidates shown: p50 {c["goal_to_candidates_shown"]["p50_ms"]:.0f} ms '
              f'p95 {c["goal_to_candidates_shown"]["p95_ms"]:.0f} ms (engine p50 '
              f'{c["engine_total"]["p50_ms"]:.0f} ms), {c["goal_to_candidates_shown"]["n"]} goals')
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
