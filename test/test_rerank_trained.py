"""`cgrs train reranker` and the `trained` backend on a toy set where the stage must help.

The stage before is deliberately weak: a tiny random CLIP (real open_clip loading code) whose
coarse scores are noise, fused with the caption channel at a low caption weight, so the
right place is in the list but rarely first. The cross-encoder reads the query against each
candidate's caption and the earlier scores; trained on one gallery's descriptions it must
lift R@1 on another gallery's held-out phrasings, in its own validation and through the
engine's query path (Retriever with reranker.backend: trained).
"""

import json
import subprocess
import sys

from cgrs_ros.engine.config import load_config
from cgrs_ros.engine.errors import ModelLoadError
from cgrs_ros.engine.indexer import index_gallery
from cgrs_ros.engine.rerankers import make_reranker
from cgrs_ros.engine.retriever import Retriever
import pytest

HEADER = 'image_id,path,lat,lon,alt,heading_deg,platform,group_id,description\n'
COLOURS = ['red', 'blue', 'green', 'white']
THINGS = ['a football pitch', 'a small pond', 'a car park', 'a railway line']


def _gallery(root, make_png, seed, queries=False):
    rows, qrows = [], []
    for i, colour in enumerate(COLOURS):
        for j, thing in enumerate(THINGS):
            name = f'p{i}{j}'
            make_png(root / 'img' / f'{name}.png', seed * 100 + i * 10 + j)
            text = (f'A building with a {colour} roof beside {thing}. || '
                    f'Seen from above, a {colour}-roofed building next to {thing}.')
            rows.append(f'{name},img/{name}.png,{47 + i / 1000},{8 + j / 1000},400,0,'
                        f'satellite,{name},"{text}"\n')
            qrows.append(f'"Go to the house whose roof is {colour}, by {thing}.",{name}\n')
    root.mkdir(parents=True, exist_ok=True)
    (root / 'gallery.csv').write_text(HEADER + ''.join(rows))
    if queries:
        (root / 'queries.csv').write_text('query,group_id\n' + ''.join(qrows))
    return root


@pytest.fixture(scope='module')
def toy(tmp_path_factory, tiny_open_clip_dir):
    from conftest import write_png

    base = tmp_path_factory.mktemp('toy_rerank')
    train = _gallery(base / 'train', write_png, 1)
    val = _gallery(base / 'val', write_png, 2, queries=True)
    engine = base / 'stage_before.yaml'
    engine.write_text(
        'image_encoder: {backend: open_clip, model: "local-dir:%s", pretrained: null, '
        'threads: 1}\n'
        'text_encoder: {threads: 1}\n'
        'retrieval: {caption_weight: 0.15, caption_channel: rerank, coarse_k: 16, '
        'min_caption_score: null}\n' % tiny_open_clip_dir)
    train_cfg = base / 'train_reranker.yaml'
    train_cfg.write_text('model: {dim: 32, hidden: 32, heads: 2, max_caption_tokens: 40}\n'
                         'data: {list_size: 8, queries_per_image: 3}\n'
                         'train: {epochs: 12, batch_lists: 4, lr: 0.003, threads: 1, k: 8}\n')
    out = base / 'model'
    run = subprocess.run(
        [sys.executable, '-m', 'cgrs_ros.cli', 'train', 'reranker', str(train),
         '--engine-config', str(engine), '--val', str(val), '--config', str(train_cfg),
         '--out', str(out), '--json', '--quiet'],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return {'train': train, 'val': val, 'engine': engine, 'out': out,
            'card': json.loads(run.stdout), 'config': train_cfg}


def _r1(retriever, val):
    lines = (val / 'queries.csv').read_text().splitlines()[1:]
    hits = 0
    for line in lines:
        text, group = line.rsplit(',', 1)
        result = retriever.query(text.strip('"'), top_k=8)
        hits += result.candidates[0].group_id == group
    return 100.0 * hits / len(lines)


def test_training_writes_a_model_folder_and_card_and_helps_in_validation(toy):
    out, card = toy['out'], toy['card']
    for name in ('reranker.safetensors', 'cgrs_reranker.json', 'model_card.md',
                 'model_card.json'):
        assert (out / name).is_file(), name
    assert card['training_galleries'] == ['train-loo']  # first descriptions held out
    assert card['validation_galleries'] == ['val']
    val = card['val']['val']
    best = val[f'w{card["suggested_weight"]:g}']
    assert best['r1'] >= val['before']['r1'] + 15, val
    assert 'val' in (out / 'model_card.md').read_text()
    assert (out / 'reranker.safetensors').stat().st_size < 1_000_000


def test_the_engine_stage_with_the_trained_backend_lifts_r1(toy):
    overrides = {'reranker': {'backend': 'trained', 'model': str(toy['out']), 'k': 8,
                              'weight': toy['card']['suggested_weight']}}
    index_gallery(toy['val'], load_config(toy['engine']), progress=False)
    before = Retriever.open(toy['val'], load_config(toy['engine']))
    after = Retriever.open(toy['val'], load_config(toy['engine'], overrides))
    try:
        r1_before, r1_after = _r1(before, toy['val']), _r1(after, toy['val'])
        result = after.query('the house whose roof is red, by a small pond', top_k=8)
    finally:
        before.close()
        after.close()
    assert r1_after >= r1_before + 15, (r1_before, r1_after)
    # The engine's arithmetic is the one validation simulated: same R@1.
    weight = f'w{toy["card"]["suggested_weight"]:g}'
    assert r1_after == pytest.approx(toy['card']['val']['val'][weight]['r1'], abs=0.01)
    assert result.rerank['scored'] == 8
    assert all(0.0 <= c.rerank_score <= 1.0 for c in result.candidates)
    assert after.reranker is None  # closed


def test_rerunning_a_finished_run_is_refused_and_resume_continues(toy, tmp_path):
    import shutil

    out = tmp_path / 'model'
    shutil.copytree(toy['out'], out)
    args = [sys.executable, '-m', 'cgrs_ros.cli', 'train', 'reranker', str(toy['train']),
            '--engine-config', str(toy['engine']), '--val', str(toy['val']), '--config',
            str(toy['config']), '--out', str(out), '--quiet']
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert 'already holds a finished run of 12 epochs' in run.stderr
    run = subprocess.run(args + ['--epochs', '13'], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    card = json.loads((out / 'model_card.json').read_text())
    assert [h['epoch'] for h in card['history']] == list(range(1, 14))


def test_missing_or_foreign_model_folder_names_it_and_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match='cgrs train reranker') as err:
        make_reranker({'backend': 'trained', 'model': str(tmp_path / 'nope')})
    assert str(tmp_path / 'nope') in str(err.value)
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'cgrs_reranker.json').write_text('{"format": "other"}')
    (tmp_path / 'bad' / 'reranker.safetensors').write_bytes(b'x')
    with pytest.raises(ModelLoadError, match='format'):
        make_reranker({'backend': 'trained', 'model': str(tmp_path / 'bad')})
