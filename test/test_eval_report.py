"""Evaluation reports: JSON round trip, comparison of two runs, the PNG and the CLI on them."""

import json

from cgrs_ros.cli import main
from cgrs_ros.engine.errors import CgrsError
from cgrs_ros.engine.evaluation import report as report_mod
from cgrs_ros.engine.evaluation.metrics import t2i_from_scores
import numpy as np
import pytest


def _run_report(shift, latency):
    groups = ['A', 'A', 'B', 'C']
    rng = np.random.default_rng(0)
    scores = rng.random((6, 4))
    query_groups = ['A', 'B', 'C', 'A', 'B', 'Z']
    for q, g in enumerate(query_groups):
        if g in groups and q % 2 == shift:
            scores[q, groups.index(g)] = 2.0  # make some queries hit at rank 1
    platforms = ['drone', 'drone', 'satellite', 'ground', 'drone', 'ground']
    result = t2i_from_scores(scores, query_groups, groups, text_platforms=platforms)
    timings = [{'encode_text': latency + q, 'search': 0.5 * latency} for q in range(6)]
    methods = {'coarse': report_mod.method_entry(result, timings,
                                                 {'retrieval.caption_channel': 'off'})}
    return report_mod.build_report(
        'gallery', methods, counts={'queries': 6, 'gallery_images': 4, 'groups': 3,
                                    'absent_queries': len(result.absent)},
        config={'retrieval': {'coarse_k': 20 + shift}},
        encoders={'image_encoder': 'open_clip:tiny (random weights)'},
        absent_query_ids=['q5'])


def test_report_round_trip_and_table(tmp_path):
    rep = _run_report(0, 10.0)
    path = tmp_path / 'a.json'
    report_mod.write_report(path, rep)
    back = report_mod.load_report(path)
    assert back == json.loads(json.dumps(rep))
    entry = back['methods']['coarse']
    assert set(entry['metrics']) == {'t2i_r1', 't2i_r5', 't2i_r10'}
    assert len(entry['curve']['t2i']) == 10
    assert entry['n_absent'] == 1
    assert entry['latency_ms']['encode_text']['p50'] == pytest.approx(12.5)
    assert set(entry['by_platform']) == {'drone', 'satellite', 'ground'}
    table = report_mod.format_report(back)
    assert 't2i_r10' in table and 'encode_text' in table and 'misses' in table


def test_compare_reports_gives_deltas_and_differing_settings(tmp_path):
    a, b = _run_report(0, 10.0), _run_report(1, 20.0)
    rows = report_mod.compare_reports(a, b)
    by_metric = {(m, k): (va, vb, d) for m, k, va, vb, d in rows['metrics']}
    va, vb, delta = by_metric[('coarse', 't2i_r1')]
    assert delta == pytest.approx(vb - va)
    assert va == a['methods']['coarse']['metrics']['t2i_r1']
    assert ('coarse', 'drone/t2i_r1') in by_metric
    latency = {k: d for _, k, _, _, d in rows['latency']}
    assert latency['encode_text.p50'] == pytest.approx(10.0)
    assert ('config.retrieval.coarse_k', 20, 21) in rows['config']
    assert rows['counts'] == []
    text = report_mod.format_comparison(rows, 'a.json', 'b.json')
    assert 'coarse_k' in text and '+10.00' in text


def test_load_report_rejects_other_json(tmp_path):
    other = tmp_path / 'other.json'
    other.write_text('{"hello": 1}')
    with pytest.raises(CgrsError, match='not a cgrs evaluation report'):
        report_mod.load_report(other)
    with pytest.raises(CgrsError, match='does not exist'):
        report_mod.load_report(tmp_path / 'none.json')


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip('matplotlib', reason='matplotlib is needed for --plot')
    from cgrs_ros.engine.evaluation.plots import write_report_png
    rep = _run_report(0, 10.0)
    rep['methods']['rerank'] = _run_report(1, 14.0)['methods']['coarse']
    out = write_report_png(rep, tmp_path / 'eval.png')
    data = out.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 10000


def test_cli_compare_and_plot(tmp_path, capsys):
    a, b = tmp_path / 'a.json', tmp_path / 'b.json'
    report_mod.write_report(a, _run_report(0, 10.0))
    report_mod.write_report(b, _run_report(1, 20.0))
    assert main(['eval', 'compare', str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert 't2i_r1' in out and 'B - A' in out
    assert main(['eval', 'compare', str(a), str(b), '--json']) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows['metrics'][0][0] == 'coarse'
    assert main(['eval', 'compare', str(a), str(tmp_path / 'missing.json')]) == 2
    assert 'does not exist' in capsys.readouterr().err
    pytest.importorskip('matplotlib', reason='matplotlib is needed for cgrs eval plot')
    png = tmp_path / 'a.png'
    assert main(['eval', 'plot', str(a), '--out', str(png)]) == 0
    assert png.read_bytes()[:4] == b'\x89PNG'


def test_cli_scores_a_track4_submission(tmp_path, capsys):
    gt = tmp_path / 'gt.txt'
    gt.write_text('q_00001\timage_aa\nq_00002\timage_bb image_cc\nq_00003\timage_dd\n'
                  'q_00004\timage_ee\n')
    sub = tmp_path / 'submission.txt'
    # q1 hits at rank 1, q2 at rank 10 (image_cc), q3 misses, q4 is missing from the file
    fillers = [f'image_f{i}' for i in range(9)]
    sub.write_text('q1 image_aa ' + ' '.join(fillers) + '\n'
                   'q2 ' + ' '.join(fillers) + ' image_cc\n'
                   'q3 ' + ' '.join(fillers) + ' image_zz\n')
    out = tmp_path / 'rep.json'
    assert main(['eval', 'track4', '--from-submission', str(sub), '--gt', str(gt),
                 '--report', str(out), '--json']) == 0
    rep = json.loads(capsys.readouterr().out)
    metrics = rep['methods']['submission']['metrics']
    assert metrics['t2i_r1'] == 25.0 and metrics['t2i_r10'] == 50.0
    assert metrics['track4_score'] == 37.5
    assert any('q4' in p for p in rep['problems'])
    assert report_mod.load_report(out)['methods']['submission']['metrics'] == metrics
    assert main(['eval', 'track4', '--from-submission', str(sub)]) == 2
    assert '--gt' in capsys.readouterr().err


def test_compare_pairs_methods_with_different_names(capsys):
    a, b = _run_report(0, 10.0), _run_report(1, 20.0)
    b['methods']['config'] = b['methods'].pop('coarse')
    assert report_mod.compare_reports(a, b)['metrics'] == []
    rows = report_mod.compare_reports(a, b, [('coarse', 'config')])
    assert rows['metrics'][0][:2] == ('coarse->config', 't2i_r1')
    with pytest.raises(CgrsError, match="no method 'hybrid'"):
        report_mod.compare_reports(a, b, [('hybrid', 'config')])
    assert 'no method in common' in report_mod.format_comparison(
        report_mod.compare_reports(a, b))
