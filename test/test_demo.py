"""`make demo`'s loop (tools/demo.py) end to end on a small demo world.

The full demo (160 places, four goals) takes about two minutes; here the same script runs
on a 12-place world with two goals: real stack processes, real MiniLM, real DDS. The
drone's printed final fix is checked against the retrieved image's manifest position with
PROJ (independently of the nodes and of the demo's own arithmetic).
"""

import csv
import importlib.util
import json
import os
from pathlib import Path
import re
import subprocess
import sys

import pyproj
import pytest

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / 'tools' / 'demo.py'


def _demo_module():
    spec = importlib.util.spec_from_file_location('cgrs_demo', DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_demo(world, out, *args, timeout=420):
    return subprocess.run(
        [sys.executable, str(DEMO), '--world', str(world), '--out', str(out), '--size', '12',
         *args], capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, PYTHONUNBUFFERED='1'))


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory, module_ros_domain):
    folder = tmp_path_factory.mktemp('demo')
    proc = _run_demo(folder / 'world', folder, '--goals', '2')
    return {'proc': proc, 'world': folder / 'world', 'out': folder,
            'text': proc.stdout + proc.stderr}


def test_demo_flies_every_goal_and_stops_the_stack(demo_run):
    text = demo_run['text']
    assert demo_run['proc'].returncode == 0, text
    assert 'generating the demo world' in text
    assert len(re.findall(r'^\[\d/2\] "', text, re.M)) == 2, text
    assert text.count('drone arrived after') == 2, text
    assert '==> stack stopped (exit 0)' in text
    assert re.search(r'2 goals flown, [0-2] to the intended place', text), text
    # make run / make demo use the learned coarse stage: the node's diagnostics name it.
    model = (ROOT / 'models' / 'demo_dual').resolve()
    assert f'==> coarse stage (retrieval_node diagnostics): learned:{model}@' in text, text
    # The params file carries the world's datum to both nodes (one map frame for both).
    params = (demo_run['out'] / 'demo_params.yaml').read_text()
    datum = json.loads((demo_run['world'] / 'world.json').read_text())['datum']
    assert params.count(f'latitude: {datum["lat"]}') == 2


def test_the_drone_ends_above_the_retrieved_image(demo_run):
    text, world = demo_run['text'], demo_run['world']
    with open(world / 'gallery.csv', newline='') as handle:
        manifest = {row['image_id']: row for row in csv.DictReader(handle)}
    places = {p['group_id']: p for p in
              json.loads((world / 'world.json').read_text())['places']}
    with open(world / 'queries.csv', newline='') as handle:
        queries = {row['query']: row['group_id'] for row in csv.DictReader(handle)}
    geod = pyproj.Geod(ellps='WGS84')
    blocks = re.findall(
        r'^\[\d/2\] "(?P<q>.*)"\n\s+retrieved (?P<img>\S+) \(\w+\), group (?P<grp>\S+) .*'
        r'intended (?P<want>\S+) .*: (?P<verdict>MATCH|MISS).*\n'
        r'\s+drone arrived after [\d.]+ s at (?P<lat>[-\d.]+), (?P<lon>[-\d.]+), '
        r'(?P<height>\d+) m above the ground; (?P<dist>[\d.]+) m from the intended place',
        text, re.M)
    assert len(blocks) == 2, text
    for query, image, group, intended, verdict, lat, lon, height, dist in blocks:
        assert queries[query] == intended  # the goal came from the held-out queries
        assert manifest[image]['group_id'] == group
        assert (verdict == 'MATCH') == (group == intended)
        row = manifest[image]
        _, _, off_image = geod.inv(float(row['lon']), float(row['lat']), float(lon), float(lat))
        assert off_image < 1.5  # 1 m tolerance + the 6 decimals printed
        assert abs(int(height) - 40) <= 1  # cruise altitude of the demo drone
        place = places[intended]
        _, _, off_place = geod.inv(place['lon'], place['lat'], float(lon), float(lat))
        assert float(dist) == pytest.approx(off_place, abs=0.2)


def test_a_broken_loop_exits_non_zero(demo_run, tmp_path, ros_domain):
    # A drone too slow to arrive within the goal timeout: the loop breaks and says where.
    proc = _run_demo(demo_run['world'], tmp_path, '--goals', '1', '--speed', '0.1',
                     '--goal-timeout', '5')
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert 'the loop broke: no arrival for goal 1 within 5 s' in text
    assert '==> stack stopped (exit 0)' in text


def test_goals_cover_different_kinds_of_place():
    demo = _demo_module()
    places = {f'g{i}': {'kind': kind} for i, kind in
              enumerate(['house', 'pond', 'pond', 'bridge', 'building'])}
    queries = [(f'q{i}{k}', f'g{i}') for i in range(5) for k in 'ab']
    goals = demo.pick_goals(places, queries, 4)
    assert [places[g]['kind'] for _, g in goals] == ['pond', 'bridge', 'building', 'house']
    assert len({g for _, g in goals}) == 4
    assert len(demo.pick_goals(places, queries, 50)) == 5  # one per place at most
