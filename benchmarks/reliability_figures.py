"""What hostile inputs cost: the figures issue 16 (reliability) asks for.

The bounds of issue 16 promise that a misbehaving server or a hostile gallery row costs a
bounded, small amount of time and memory and fails only itself. This measures that, through
the code paths a user runs:

1. The openai captioner (``make_captioner`` -> ``engine/openai_client.py`` -> the bounded POST
   in ``engine/http.py``), with ``timeout_s: 5`` and ``max_retries: 0``, captioning one 64 px
   image against a server on 127.0.0.1 that: answers well (the reference); drips its answer
   one byte a second; never ends its body (4 kB of JSON whitespace every 50 ms, forever);
   sends a valid answer with a 100 MB caption and no usable Content-Length; redirects (307)
   to another host and port. Each case runs in its own child process, so its peak RSS is its
   own; the server (``test/hostile_inputs.py``, shared with the tests) runs in this process,
   so its memory is not counted. The baseline is a child that imports the same modules and
   builds the same captioner, but sends nothing: a case's peak minus the baseline is what the
   request cost.
2. ``cgrs index`` (the real CLI, in a child process) on a 40-row gallery (64x64 PNGs with
   descriptions; ``image_encoder: {backend: none}``, so only MiniLM embeds the descriptions),
   with and without one more row whose PNG header declares 30000 x 30000 = 900 Mpx (a
   decompression bomb of a few hundred bytes). The bomb must be skipped with its reason, the
   other rows indexed, and time and memory stay those of the clean gallery (after a
   discarded warm-up run, so both are measured with a warm file cache).

Peak RSS is VmHWM from /proc/PID/status for the captioner children, and GNU time's
"Maximum resident set size" for ``cgrs index`` (``os.wait4`` when /usr/bin/time is missing).
``ru_maxrss`` alone is not used for the children: a child started with vfork (as subprocess
does) inherits the parent's high-water mark at exec.

    python benchmarks/reliability_figures.py [--out figures.json]
"""

import argparse
import json
import os
import pathlib
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Run from a checkout without installing the package; the hostile server lives in test/.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'test'))

TIMEOUT_S = 5
CUT = 120
CASES = [  # (URL mode, what the server does)
    ('ok', 'well-behaved'),
    ('drip', 'drips 1 byte/s'),
    ('endless', 'never ends its body'),
    ('huge', '100 MB caption'),
    ('redirect', '307 to 127.0.0.2:9'),
]
NORMAL_ROWS = 40
HEADER = 'image_id,path,lat,lon,alt,heading_deg,platform,group_id,description\n'
COLOURS = ['red', 'grey', 'white', 'green', 'blue', 'brown', 'black', 'yellow']
THINGS = ['roof', 'warehouse', 'water tower', 'parking lot', 'church', 'bridge', 'field',
          'roundabout', 'silo', 'tennis court']


def _peak_rss_mb():
    """Return this process's peak RSS in MB (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(url, send):
    """Caption one image through ``url`` (or only build the captioner); print JSON."""
    from cgrs_ros.engine.captioners import make_captioner
    from PIL import Image

    image = Image.new('RGB', (64, 64), (200, 30, 30))
    section = {'backend': 'openai', 'model': 'm', 'base_url': url, 'timeout_s': TIMEOUT_S,
               'max_retries': 0}
    outcome, start = None, time.monotonic()
    with make_captioner(section) as captioner:
        start = time.monotonic()
        if send:
            result = captioner.caption([image], ['satellite'])[0]
            outcome = (f'caption ({len(result.caption)} chars): {result.caption}'
                       if result.error is None else f'error: {result.error}')
        wall = time.monotonic() - start
    print(json.dumps({'outcome': outcome[:CUT] if outcome else None,
                      'wall_s': round(wall, 2), 'peak_rss_mb': round(_peak_rss_mb(), 1)}))


def _run_child(url, send):
    args = [sys.executable, os.path.abspath(__file__), '--child', url]
    if not send:
        args.append('--no-request')
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f'child for {url} failed:\n{proc.stderr[-2000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def captioner_figures():
    """Run each server case in its own child; return the baseline and one row per case."""
    from hostile_inputs import MisbehavingServer

    server = MisbehavingServer(drip_s=1.0, endless_chunk=4096, endless_s=0.05,
                               huge_bytes=100_000_000)
    with server:
        baseline = _run_child(server.base_url('ok'), send=False)
        rows = []
        for mode, what in CASES:
            row = _run_child(server.base_url(mode), send=True)
            row.update(case=mode, server=what,
                       over_baseline_mb=round(row['peak_rss_mb'] - baseline['peak_rss_mb'], 1))
            rows.append(row)
            print(f'  {mode}: {row["wall_s"]} s, {row["peak_rss_mb"]} MB', file=sys.stderr)
    return {'timeout_s': TIMEOUT_S, 'max_retries': 0,
            'baseline_peak_rss_mb': baseline['peak_rss_mb'], 'cases': rows}


def _png(path, seed):
    from PIL import Image

    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes('RGB', (64, 64), rng.randbytes(64 * 64 * 3)).save(path)


def build_gallery(folder, bomb):
    """Write NORMAL_ROWS rows of 64x64 PNGs with descriptions (+ a bomb row at line 22)."""
    from hostile_inputs import png_claiming

    lines = [HEADER]
    for i in range(NORMAL_ROWS):
        image_id = f'r{i:03d}'
        _png(folder / 'images' / f'{image_id}.png', i)
        text = (f'a {COLOURS[i % len(COLOURS)]} {THINGS[i % len(THINGS)]} '
                f'next to a {THINGS[(i * 3 + 1) % len(THINGS)]} seen from above')
        lines.append(f'{image_id},images/{image_id}.png,{47 + i * 1e-4:.4f},8.0,400,0,'
                     f'satellite,{image_id},{text}\n')
        if bomb and i == NORMAL_ROWS // 2 - 1:
            png_claiming(folder / 'images' / 'bomb.png', 30000, 30000)
            lines.append('bomb,images/bomb.png,47.0,8.0,400,0,satellite,bomb,a bomb\n')
    (folder / 'gallery.csv').write_text(''.join(lines))
    return folder


def run_index(gallery, config):
    """Run ``cgrs index GALLERY --config CONFIG --json``; return its summary and costs."""
    cgrs = pathlib.Path(sys.executable).with_name('cgrs')
    command = [str(cgrs)] if cgrs.exists() else [sys.executable, '-m', 'cgrs_ros.cli']
    command += ['index', str(gallery), '--config', str(config), '--json']
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    gnu_time = shutil.which('time', path='/usr/bin')
    with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
        start = time.monotonic()
        proc = subprocess.Popen([gnu_time, '-v', *command] if gnu_time else command,
                                stdout=out, stderr=err, text=True, env=env)
        # wait4: this child's own rusage (RUSAGE_CHILDREN would mix in the captioner children)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
        proc.returncode = returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    match = re.search(r'Maximum resident set size \(kbytes\): (\d+)', stderr)
    if match:  # GNU time measured the CLI in a fork of its own small process
        peak_mb, how = int(match.group(1)) / 1024, '/usr/bin/time -v'
    else:  # includes this process's high-water mark if the child was vforked
        peak_mb, how = usage.ru_maxrss / 1024, 'os.wait4 ru_maxrss'
    if returncode != 0:
        raise RuntimeError(f'cgrs index exited {returncode}:\n{stderr[-3000:]}')
    summary = json.loads(stdout)
    return {'rows_indexed': summary['indexed'],
            'rows_skipped': len(summary['skipped']),
            'skipped': [f'line {s["line"]} ({s["image_id"]}): {s["reason"]}'
                        for s in summary['skipped']],
            'captions_embedded': summary.get('captions_embedded'),
            'wall_s': round(wall, 2), 'peak_rss_mb': round(peak_mb, 1), 'rss_from': how}


def index_figures():
    """Index the clean gallery, then the one with a bomb row; return both.

    A first, discarded run warms the file cache (torch, MiniLM), so neither measured run pays
    for loading them from disk and the two compare.
    """
    with tempfile.TemporaryDirectory(prefix='cgrs-reliability-') as tmp:
        tmp = pathlib.Path(tmp)
        config = tmp / 'engine.yaml'
        config.write_text(json.dumps({'image_encoder': {'backend': 'none'},
                                      'text_encoder': {'threads': 1},
                                      'captioner': {'backend': 'manifest'}}))
        run_index(build_gallery(tmp / 'warm-up', False), config)
        out = {}
        for name, bomb in (('clean', False), ('with_bomb', True)):
            out[name] = run_index(build_gallery(tmp / name, bomb), config)
            print(f'  index {name}: {out[name]["wall_s"]} s', file=sys.stderr)
    return out


def print_table(figures):
    """Print the figures as two small tables."""
    cap = figures['captioner']
    print(f'openai captioner, timeout_s {cap["timeout_s"]}, max_retries {cap["max_retries"]}, '
          f'one 64 px image; baseline peak RSS (no request) {cap["baseline_peak_rss_mb"]} MB')
    print(f'{"case":<9} {"server":<20} {"wall s":>6} {"peak MB":>8} {"+base":>6}  outcome')
    for row in cap['cases']:
        print(f'{row["case"]:<9} {row["server"]:<20} {row["wall_s"]:>6.2f} '
              f'{row["peak_rss_mb"]:>8.1f} {row["over_baseline_mb"]:>6.1f}  {row["outcome"]}')
    print()
    index = figures['index']
    print(f'cgrs index, {NORMAL_ROWS} rows of 64x64 PNG, captions from descriptions (MiniLM), '
          f'no image encoder; peak RSS from {index["clean"]["rss_from"]}')
    print(f'{"gallery":<10} {"indexed":>7} {"skipped":>7} {"wall s":>7} {"peak MB":>8}')
    for name in ('clean', 'with_bomb'):
        row = index[name]
        print(f'{name:<10} {row["rows_indexed"]:>7} {row["rows_skipped"]:>7} '
              f'{row["wall_s"]:>7.2f} {row["peak_rss_mb"]:>8.1f}')
    for line in index['with_bomb']['skipped']:
        print(f'  skipped {line}')


def main():
    """Measure, print the table, and write JSON with --out."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', metavar='FILE', help='also write the figures as JSON')
    parser.add_argument('--child', metavar='URL', help=argparse.SUPPRESS)
    parser.add_argument('--no-request', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, send=not args.no_request)
        return
    print('captioner cases:', file=sys.stderr)
    figures = {'captioner': captioner_figures()}
    print('cgrs index:', file=sys.stderr)
    figures['index'] = index_figures()
    print_table(figures)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(figures, indent=2) + '\n')


if __name__ == '__main__':
    main()
