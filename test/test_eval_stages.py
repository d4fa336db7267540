"""``cgrs eval`` with every stage: reranker on and off, --tune-weights, per-query rows, captioning.

The reranker is the real openai backend talking HTTP to ``model_factories.ChatServer``, which
answers Yes (by logprobs) when the question names the dominant colour of the uploaded image.
The gallery has three places of one colour each, with descriptions; the validation queries
name the right colour but describe another place, the evaluation queries describe the right
place but name a wrong colour. So on validation the reranker must be trusted, on the
evaluation queries it must not: tuning that peeked at the evaluation queries would pick
another weight. The image encoder is a tiny random open_clip (noise), the caption encoder
the real MiniLM.
"""

import csv
import json
import re

from cgrs_ros.cli import main
from cgrs_ros.engine.gallery import GalleryItem, write_manifest
from model_factories import dominant_colour, prompt_text, uploaded_image
import numpy as np
from PIL import Image
import pytest
import yaml

PLACES = {  # group -> (colour, RGB, description)
    'lake': ('red', (210, 30, 30), 'A round lake with reeds along the shore.'),
    'tower': ('green', (30, 190, 40), 'A tall glass office tower.'),
    'bridge': ('blue', (30, 40, 220), 'A stone bridge over a river.'),
}
# Right colour, another place's words: only the reranker finds these.
VALIDATION = [('the red tall glass tower', 'lake'),
              ('the green stone bridge over the river', 'tower'),
              ('the blue round lake with reeds', 'bridge')]
# Right words, wrong colour: the reranker leads these astray.
EVALUATION = [('a green lake surrounded by reeds', 'lake'),
              ('a blue glass tower, very tall', 'tower'),
              ('a red bridge of stone across the river', 'bridge')]


def colour_judge(body):
    """Answer Yes when the question names the dominant colour of the uploaded image."""
    words = re.findall(r'[a-z]+', prompt_text(body).lower())
    if dominant_colour(uploaded_image(body)) in words:
        return [(' Yes', -0.1), (' No', -2.5)]
    return [(' No', -0.1), (' Yes', -3.0)]


def _queries_csv(path, rows):
    with path.open('w', newline='') as handle:
        writer = csv.writer(handle)
        writer.writerow(['query', 'group_id'])
        writer.writerows(rows)
    return path


@pytest.fixture(scope='module')
def colour_gallery(tmp_path_factory):
    """Three places of three images each, one colour per place, with descriptions."""
    root = tmp_path_factory.mktemp('colour_gallery')
    items = []
    for group, (_, rgb, description) in PLACES.items():
        for n in range(3):
            pixels = np.full((32, 32, 3), rgb, dtype=np.uint8)
            pixels[n * 4:n * 4 + 4, :4] = 255  # a distinct file per image
            rel = f'images/{group}_{n}.png'
            (root / 'images').mkdir(exist_ok=True)
            Image.fromarray(pixels).save(root / rel)
            items.append(GalleryItem(image_id=f'{group}_{n}', path=rel, lat=47.0, lon=8.0,
                                     alt=400.0, heading_deg=0.0, platform='drone',
                                     group_id=group, descriptions=(description,)))
    write_manifest(root, items)
    _queries_csv(root / 'queries.csv', EVALUATION)
    _queries_csv(root / 'val.csv', VALIDATION)
    return root


def _engine_config(path, tiny_open_clip_dir, server, **reranker):
    data = {'image_encoder': {'backend': 'open_clip', 'model': f'local-dir:{tiny_open_clip_dir}',
                              'pretrained': None, 'threads': 1},
            'text_encoder': {'threads': 1},
            'retrieval': {'caption_channel': 'hybrid', 'caption_weight': 0.9},
            'reranker': {'backend': 'openai', 'model': 'tiny-vlm', 'base_url': server.url,
                         'api_key_env': None, 'timeout_s': 10, 'max_retries': 0,
                         'concurrency': 4, 'k': 10, 'weight': 0.0, **reranker}}
    path.write_text(yaml.safe_dump(data))
    return path


def _texts(server, start=0):
    return [prompt_text(r['body']) for r in server.requests[start:]]


def test_stages_on_and_off_tuned_on_validation_only(colour_gallery, tiny_open_clip_dir,
                                                    chat_server, tmp_path, capsys):
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.evaluation import report as report_mod
    from cgrs_ros.engine.evaluation.datasets import read_gallery_queries
    from cgrs_ros.engine.evaluation.tuning import tune_weights
    from cgrs_ros.engine.rerankers import make_reranker
    from cgrs_ros.engine.retriever import Retriever

    chat_server.logprobs = colour_judge
    config = _engine_config(tmp_path / 'engine.yaml', tiny_open_clip_dir, chat_server)
    report_path = tmp_path / 'report.json'
    capsys.readouterr()
    assert main(['eval', 'gallery', str(colour_gallery), '--queries',
                 str(colour_gallery / 'queries.csv'), '--config', str(config),
                 '--methods', 'hybrid', '--tune-weights', str(colour_gallery / 'val.csv'),
                 '--json', '--report', str(report_path)]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)

    # Tuning: the configured reranker weight 0 would ignore the reranker; on validation only
    # the reranker finds the place, so a weight that lets it decide is chosen.
    tuning = report['tuning']
    chosen = tuning['chosen']
    assert tuning['n_queries'] == 3 and tuning['validation'].endswith('val.csv')
    assert tuning['configured'] == {'caption_weight': 0.9, 'reranker_weight': 0.0}
    assert chosen['t2i_r1'] == 100.0 and chosen['reranker_weight'] >= 0.5
    assert chosen['caption_weight'] == 0.9  # every caption weight ties: the configured stays
    assert len(tuning['grid']) == 11 * 5
    expected = ('retrieval:\n  caption_weight: 0.9\nreranker:\n'
                f"  weight: {chosen['reranker_weight']:g}\n")
    assert tuning['config_yaml'] == expected
    assert expected in out.err  # --json: the lines to paste go to stderr

    # Only validation queries were asked while tuning: every request naming a validation
    # query comes before every request naming an evaluation query.
    asked = _texts(chat_server, 1)  # after the probe
    val_at = [i for i, t in enumerate(asked) if any(q in t for q, _ in VALIDATION)]
    test_at = [i for i, t in enumerate(asked) if any(q in t for q, _ in EVALUATION)]
    assert val_at and test_at and max(val_at) < min(test_at)

    # The evaluation queries would have chosen differently (they punish the reranker).
    base = load_config(config)
    tune_config = load_config(config, overrides={'reranker.backend': 'none'})
    label_of = {f'{g}_{n}': g for g in PLACES for n in range(3)}
    with make_reranker(base.reranker) as reranker:
        retriever = Retriever.open(colour_gallery, tune_config)
        try:
            on_test = tune_weights(retriever, reranker,
                                   read_gallery_queries(colour_gallery / 'queries.csv').queries,
                                   label_of)
        finally:
            retriever.close()
    assert (on_test.caption_weight, on_test.reranker_weight) != (
        chosen['caption_weight'], chosen['reranker_weight'])
    assert on_test.reranker_weight < chosen['reranker_weight']

    # Both variants, run with the tuned weights; the reranker's answers change the ranking.
    methods = report['methods']
    assert list(methods) == ['hybrid', 'hybrid+reranker']
    assert methods['hybrid']['overrides'] == {
        'retrieval.caption_weight': 0.9, 'reranker.weight': chosen['reranker_weight'],
        'retrieval.caption_channel': 'hybrid', 'reranker.backend': 'none'}
    assert methods['hybrid+reranker']['overrides']['reranker.weight'] == \
        chosen['reranker_weight']
    assert methods['hybrid']['metrics']['t2i_r1'] > methods['hybrid+reranker']['metrics'][
        't2i_r1'] == 0.0
    assert report['encoders']['reranker'].startswith('openai-rerank:tiny-vlm:')
    for entry in methods.values():
        assert set(entry['latency_ms']) == {'encode', 'coarse', 'captions', 'rerank', 'total'}
        assert entry['latency_ms']['total']['n'] == 3
    assert (methods['hybrid+reranker']['latency_ms']['rerank']['p50']
            > methods['hybrid']['latency_ms']['rerank']['p50'])

    # Per query: the top-10 places and the rank of the first correct one, consistent with R@K.
    assert [q['query_id'] for q in report['queries']] == ['line2', 'line3', 'line4']
    assert [q['relevant'] for q in report['queries']] == [['lake'], ['tower'], ['bridge']]
    for name, entry in methods.items():
        rows = entry['per_query']
        assert [row['query_id'] for row in rows] == ['line2', 'line3', 'line4']
        for row, (_, group) in zip(rows, EVALUATION):
            assert len(row['top10']) == 9 and set(row['top10']) == set(PLACES)
            assert row['first_hit_rank'] == row['top10'].index(group) + 1
        hits_at_1 = sum(row['first_hit_rank'] == 1 for row in rows)
        assert entry['metrics']['t2i_r1'] == pytest.approx(100.0 * hits_at_1 / 3)
    # +reranker puts the colour the query names first: always the wrong place here.
    for row, (text, _) in zip(methods['hybrid+reranker']['per_query'], EVALUATION):
        colour = next(c for c, _, _ in PLACES.values() if c in text.split())
        assert PLACES[row['top10'][0]][0] == colour

    # The table, compare and plot read the longer method names.
    table = report_mod.format_report(report)
    assert 'hybrid+reranker' in table and 'weights tuned on' in table
    capsys.readouterr()
    assert main(['eval', 'compare', str(report_path), str(report_path)]) == 0
    assert 'hybrid+reranker' in capsys.readouterr().out


class PriorEcho:
    """A reranker that reads the earlier scores (like the trained one): P = 1 - minmax(fused)."""

    batch_size = 1000
    needs_images = False
    uses_priors = True
    identity = 'test:prior-echo'
    last_errors = []

    def score(self, query, images, platforms, captions=None, priors=None):
        from cgrs_ros.engine.rerank import minmax
        return 1.0 - np.nan_to_num(minmax(priors['fused']), nan=0.0)

    def close(self):
        pass


@pytest.mark.parametrize('channel', ['rerank', 'hybrid'])
def test_the_grid_ranks_exactly_as_queries_do(colour_gallery, tiny_open_clip_dir, chat_server,
                                              tmp_path, channel):
    """Re-fusing scores computed once gives the ranking query() gives at every grid point."""
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.evaluation.tuning import _pool_rankings
    from cgrs_ros.engine.indexer import index_gallery
    from cgrs_ros.engine.rerankers import make_reranker
    from cgrs_ros.engine.retriever import Retriever

    chat_server.logprobs = colour_judge
    path = _engine_config(tmp_path / 'engine.yaml', tiny_open_clip_dir, chat_server, k=4)
    config = load_config(path, overrides={'reranker.backend': 'none',
                                          'retrieval.caption_channel': channel})
    index_gallery(colour_gallery, config, progress=False)
    retriever = Retriever.open(colour_gallery, config)
    ids = [item.image_id for item in retriever.gallery.items]
    grid_cw, grid_rw = (0.0, 0.3, 0.9), (0.0, 0.5, 1.0)
    try:
        for reranker in (make_reranker(load_config(path).reranker), PriorEcho()):
            retriever.reranker = reranker
            for text, _ in VALIDATION[:2]:
                pool = retriever.candidates(text, top_k=10, with_captions=True)
                grid = _pool_rankings(retriever, reranker, pool, grid_cw, grid_rw, 10)
                for (cw, rw), ranked in grid.items():
                    retriever.config.retrieval.caption_weight = cw
                    retriever.config.reranker.weight = rw
                    result = retriever.query(text, top_k=10)
                    assert [c.image_id for c in result.candidates] == [ids[i] for i in ranked], \
                        (reranker.identity, cw, rw)
            reranker.close()
            retriever.reranker = None
    finally:
        retriever.close()


def _track4_gallery(root):
    colours = {'image_000000a1': (220, 20, 20), 'image_000000a2': (20, 200, 20),
               'image_000000a3': (20, 20, 230), 'image_000000a4': (200, 40, 30)}
    root.mkdir(parents=True)
    for image_id, rgb in colours.items():
        Image.new('RGB', (48, 48), rgb).save(root / f'{image_id}.jpeg')
    return root


def test_track4_captions_its_gallery_with_the_configured_vlm_and_resumes(
        tmp_path, chat_server, capsys):
    gallery = _track4_gallery(tmp_path / 'images')
    queries = tmp_path / 'queries.txt'
    queries.write_text('q_00001\tthe green roof\nq_00002\tthe blue roof\n')
    gt = tmp_path / 'gt.txt'
    gt.write_text('q_00001\timage_000000a2\nq_00002\timage_000000a3\n')
    config = tmp_path / 'engine.yaml'
    config.write_text(yaml.safe_dump({
        'image_encoder': {'backend': 'none'}, 'text_encoder': {'threads': 1},
        'captioner': {'backend': 'openai', 'model': 'tiny-vlm', 'base_url': chat_server.url,
                      'api_key_env': None, 'timeout_s': 10, 'max_retries': 0,
                      'concurrency': 1, 'batch_size': 2}}))
    argv = ['eval', 'track4', '--queries', str(queries), '--gallery', str(gallery), '--gt',
            str(gt), '--config', str(config), '--state-dir', str(tmp_path / 'work'), '--json']
    # The first caption request fails: that image stays uncaptioned, the rest are captioned.
    chat_server.plan = [500]
    capsys.readouterr()
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert len(chat_server.requests) == 4
    assert first['captioning']['new_captions'] == 3 and first['captioning']['failed'] == 1
    assert first['counts']['captioned'] == 3
    assert any('1 of 4 gallery images have no caption' in n for n in first['notes'])

    # A second run captions only what is missing (the failed image), then nothing at all.
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert len(chat_server.requests) == 5
    assert second['captioning']['new_captions'] == 1 and second['counts']['captioned'] == 4
    # The captions ("a green roof, 48x48") find the place from its colour.
    assert second['methods']['config']['metrics']['t2i_r1'] == 100.0
    assert [row['top10'][0] for row in second['methods']['config']['per_query']] == [
        'image_000000a2', 'image_000000a3']
    assert main(argv) == 0
    third = json.loads(capsys.readouterr().out)
    assert len(chat_server.requests) == 5 and third['captioning']['new_captions'] == 0


def test_tune_weights_refuses_the_evaluation_queries(colour_gallery, tmp_path, capsys):
    queries = colour_gallery / 'queries.csv'
    assert main(['eval', 'gallery', str(colour_gallery), '--queries', str(queries),
                 '--tune-weights', str(queries)]) == 2
    assert '--tune-weights names the evaluation queries' in capsys.readouterr().err
    assert main(['eval', 'track4', '--queries', str(tmp_path / 'q.txt'), '--gallery',
                 str(tmp_path), '--tune-weights', str(tmp_path / 'v.txt')]) == 2
    assert 'needs --tune-gt' in capsys.readouterr().err
