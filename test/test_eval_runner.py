"""``cgrs eval`` end to end: tiny generated benchmarks through the real engine.

A tiny random open_clip model (saved to disk, loaded through the real local-dir path) is the
image encoder and the real all-MiniLM-L6-v2 the caption encoder. With random image weights
the coarse channel ranks by noise, so tests assert what does not depend on its quality:
counts, absent queries, Recall@10 when the whole gallery fits in the top 10, files written,
index reuse, and that annotation captions never reach the gallery.
"""

import csv
import json

from cgrs_ros.cli import main
from cgrs_ros.engine.evaluation import datasets
import pytest

# building -> image file names (platform follows from the name); 0003 has a single image.
BUILDINGS = {
    '0001': ['image-01.jpeg', 'image-02.jpeg', '0001.jpg', '1.jpg'],
    '0002': ['image-01.jpeg', '0002.jpg'],
    '0003': ['0003.jpg'],
}


@pytest.fixture(scope='module')
def tiny_config(tiny_open_clip_dir, tmp_path_factory):
    """Engine config: the tiny open_clip model as image encoder, MiniLM for captions."""
    path = tmp_path_factory.mktemp('eval_config') / 'engine.yaml'
    path.write_text('image_encoder:\n'
                    '  backend: open_clip\n'
                    f"  model: 'local-dir:{tiny_open_clip_dir}'\n"
                    '  pretrained: null\n'
                    'retrieval:\n'
                    '  caption_weight: 0.9\n')
    return path


def _geotext_dataset(root, write_png):
    entries, seed = [], 0
    for building, names in BUILDINGS.items():
        for name in names:
            seed += 1
            write_png(root / 'test' / building / name, seed, size=(48, 48))
            entries.append({'image_id': f'{building}/{name}', 'image': f'test/{building}/{name}',
                            'caption': [f'unique caption {seed} of building {building}',
                                        f'another view, number {seed}'],
                            'sentences': [], 'bboxes': []})
    # Annotated, but its image is missing on disk: building 0004 is absent from the gallery.
    entries.append({'image_id': '0004/image-01.jpeg', 'image': 'test/0004/image-01.jpeg',
                    'caption': ['a building that is not in the gallery'], 'sentences': [],
                    'bboxes': []})
    ann = root / 'test.json'
    ann.write_text(json.dumps(entries))
    return ann


def test_geotext_end_to_end(tmp_path, tiny_config, make_png, capsys, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    root = tmp_path / 'GeoText1652'
    ann = _geotext_dataset(root, make_png)
    report_path, plot_path = tmp_path / 'geotext.json', tmp_path / 'geotext.png'
    argv = ['eval', 'geotext', '--ann', str(ann), '--images', str(root), '--config',
            str(tiny_config), '--methods', 'coarse,rerank,hybrid', '--json', '--report',
            str(report_path), '--plot', str(plot_path)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)

    n_images = sum(len(v) for v in BUILDINGS.values())
    assert report['counts'] == {'queries': 2 * n_images + 1, 'gallery_images': n_images,
                                'groups': 3, 'absent_queries': 1, 'captioned': 0}
    assert report['absent_query_ids'] == ['0004/image-01.jpeg#0']
    assert any('0004/image-01.jpeg' in p for p in report['problems'])
    assert list(report['methods']) == ['coarse', 'rerank', 'hybrid']
    for entry in report['methods'].values():
        curve = entry['curve']['t2i']
        assert curve == sorted(curve)
        # 7 images fit in the top 10: every query whose building is present hits by K=7.
        assert curve[n_images - 1] == pytest.approx(100.0 * 2 * n_images / (2 * n_images + 1))
        assert entry['by_platform']['drone']['n_queries'] == 2 * 3 + 1
        assert entry['by_platform']['satellite']['n_queries'] == 2 * 3
        assert entry['by_platform']['ground']['n_queries'] == 2
        assert set(entry['latency_ms']) >= {'encode', 'coarse', 'total'}
        assert entry['latency_ms']['total']['n'] == 2 * n_images + 1
    # No captions exist (the annotation captions are queries only), so the caption methods
    # cannot reorder anything, and the report says why.
    assert (report['methods']['rerank']['metrics'] == report['methods']['coarse']['metrics']
            == report['methods']['hybrid']['metrics'])
    assert any('no image has a caption' in note for note in report['notes'])
    assert report['encoders']['image_encoder'].startswith('open_clip:local-dir:')
    assert report['encoders']['text_encoder'].endswith('all-MiniLM-L6-v2')

    # The evaluation gallery lives in the cache, links the images and carries no captions.
    work_dir = tmp_path / 'cache' / 'cgrs' / 'eval'
    manifest = next(work_dir.glob('geotext-*/gallery.csv'))
    rows = list(csv.DictReader(manifest.open()))
    assert len(rows) == n_images and all(row['description'] == '' for row in rows)
    assert 'caption' not in manifest.read_text()
    assert {row['group_id'] for row in rows} == set(BUILDINGS)
    assert report_path.is_file() and plot_path.read_bytes()[:4] == b'\x89PNG'

    # A second run reuses the index: no image is embedded again.
    assert main(argv[:-4] + ['--methods', 'coarse']) == 0
    again = json.loads(capsys.readouterr().out)
    assert again['index']['indexed'] == 0 and again['index']['unchanged'] == n_images
    assert again['methods']['coarse']['metrics'] == report['methods']['coarse']['metrics']


def test_track4_end_to_end_writes_the_submission(tmp_path, tiny_config, make_png, capsys):
    gallery = tmp_path / 'Track_4_Phase_I_Images'
    ids = [f'image_{i:08x}' for i in range(0xa0, 0xa0 + 12)]
    for seed, image_id in enumerate(ids):
        make_png(gallery / f'{image_id}.jpeg', seed, size=(48, 48))
    queries = tmp_path / 'test_queries.txt'
    queries.write_text('q_00001\tA large campus building with a white roof.\n'
                       'q_00002\tA red brick tower beside a parking lot.\n'
                       'q_00003\tA stadium next to trees.\n')
    gt = tmp_path / 'gt.txt'
    gt.write_text(f'q_00001\t{ids[0]}\nq_00002\t{ids[3]} {ids[7]}\nq_00003\timage_ffffffff\n')
    submission, report_path = tmp_path / 'submission.txt', tmp_path / 'track4.json'
    assert main(['eval', 'track4', '--queries', str(queries), '--gallery', str(gallery),
                 '--gt', str(gt), '--submission', str(submission), '--config',
                 str(tiny_config), '--state-dir', str(tmp_path / 'state'), '--json',
                 '--report', str(report_path)]) == 0
    report = json.loads(capsys.readouterr().out)

    lines = submission.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ['q1', 'q2', 'q3']
    assert {len(line.split()) for line in lines} == {11}
    assert all(field in ids for line in lines for field in line.split()[1:])
    assert report['counts']['absent_queries'] == 1 and report['absent_query_ids'] == ['q_00003']
    metrics = report['methods']['config']['metrics']
    # (figures are rounded to 4 decimals in the report)
    assert metrics['track4_score'] == pytest.approx((metrics['t2i_r1'] + metrics['t2i_r10']) / 2,
                                                    abs=1e-3)
    # Scoring the written file gives the same figures as the run that wrote it.
    assert main(['eval', 'track4', '--from-submission', str(submission), '--gt', str(gt),
                 '--json']) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored['methods']['submission']['metrics'] == metrics
    assert datasets.read_track4_submission(submission)['q2'] == lines[1].split()[1:]


PLACES = {
    'church': ('A small stone church with a tall pointed spire and a graveyard.',
               'the old church with the pointed steeple'),
    'stadium': ('An oval football stadium with a red running track around the pitch.',
                'the sports arena with the athletics track'),
    'harbour': ('A harbour with sailing boats moored along a wooden pier.',
                'the marina where the yachts are tied up'),
    'greenhouse': ('Long glass greenhouses in rows beside a farm field.',
                   'the glasshouses next to the crops'),
    'carpark': ('A multi-storey car park with a ramp spiralling up the side.',
                'the parking garage with the spiral ramp'),
}


def test_gallery_eval_caption_channel_finds_paraphrases(tmp_path, tiny_config, make_png,
                                                        capsys):
    from cgrs_ros.engine.gallery import GalleryItem, write_manifest

    items = []
    for n, (place, (description, _)) in enumerate(PLACES.items()):
        for platform in ('satellite', 'drone'):
            rel = f'images/{place}_{platform}.png'
            make_png(tmp_path / 'gallery' / rel, 10 * n + len(platform))
            items.append(GalleryItem(image_id=f'{place}_{platform}', path=rel, lat=47.0 + n / 1e3,
                                     lon=8.0, alt=400.0, heading_deg=0.0, platform=platform,
                                     group_id=place, descriptions=(description,)))
    write_manifest(tmp_path / 'gallery', items)
    queries = tmp_path / 'queries.csv'
    with queries.open('w', newline='') as handle:
        writer = csv.writer(handle)
        writer.writerow(['query', 'group_id'])
        writer.writerows((query, place) for place, (_, query) in PLACES.items())
        writer.writerow(['the lighthouse on the cliff', 'lighthouse'])
    assert main(['eval', 'gallery', str(tmp_path / 'gallery'), '--queries', str(queries),
                 '--config', str(tiny_config), '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['counts'] == {'queries': 6, 'gallery_images': 10, 'groups': 5,
                                'absent_queries': 1, 'captioned': 10}
    methods = report['methods']
    # Real MiniLM on the manifest descriptions matches every paraphrase first; the sixth query
    # names a place that is not in the gallery and stays a miss.
    assert methods['hybrid']['metrics']['t2i_r1'] == pytest.approx(500 / 6)
    assert methods['rerank']['metrics']['t2i_r1'] == pytest.approx(500 / 6)
    assert methods['coarse']['overrides'] == {'retrieval.caption_weight': 0.0}
    assert 'rerank' in methods['hybrid']['latency_ms']


def test_unknown_method_is_a_one_line_error(tmp_path, capsys):
    assert main(['eval', 'gallery', str(tmp_path), '--queries', str(tmp_path / 'q.csv'),
                 '--methods', 'coarse,clip']) == 2
    assert 'unknown method(s) clip' in capsys.readouterr().err
