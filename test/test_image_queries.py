"""Image queries (drone photo -> gallery) through the engine and `cgrs query --image`.

A tiny random open_clip model from disk (conftest) embeds a small gallery of four places, each
with a satellite tile and a drone view ~1.1 km apart along a meridian; the real FAISS index and
the real geodesic area filter run.
"""

import io
import json

from cgrs_ros.cli import main
from cgrs_ros.engine.config import load_config
from cgrs_ros.engine.encoders import ImageTextEncoder
from cgrs_ros.engine.errors import ConfigError, QueryError
from cgrs_ros.engine.gallery import decode_image, decode_image_bytes, load_gallery
from cgrs_ros.engine.geo import geodesic_distance_m
from cgrs_ros.engine.indexer import index_gallery
from cgrs_ros.engine.retriever import Retriever
import numpy as np
from PIL import Image
import pytest

HEADER = 'image_id,path,lat,lon,alt,heading_deg,platform,group_id,description\n'
PLACES = 4
STEP_DEG = 0.01  # ~1112 m of latitude between places


def _position(place):
    return 47.0 + place * STEP_DEG, 8.0


@pytest.fixture(scope='module')
def setup(tmp_path_factory, tiny_open_clip_dir):
    from conftest import write_png

    root = tmp_path_factory.mktemp('image-queries')
    gallery = root / 'gallery'
    lines = [HEADER]
    for place in range(PLACES):
        lat, lon = _position(place)
        for platform, prefix, seed in (('satellite', 's', place), ('drone', 'd', 10 + place)):
            write_png(gallery / 'img' / f'{prefix}{place}.png', seed)
            # The drone view sits 20 m north of its tile.
            offset = 0.00018 if platform == 'drone' else 0.0
            lines.append(f'{prefix}{place},img/{prefix}{place}.png,{lat + offset},{lon},120,0,'
                         f'{platform},p{place},\n')
    (gallery / 'gallery.csv').write_text(''.join(lines))
    config_file = root / 'engine.yaml'
    config_file.write_text(f'image_encoder:\n  model: "local-dir:{tiny_open_clip_dir}"\n'
                           '  pretrained: null\n  threads: 1\ntext_encoder:\n  threads: 1\n'
                           'retrieval:\n  top_k: 3\n')
    config = load_config(str(config_file))
    index_gallery(gallery, config, progress=False)
    retriever = Retriever.open(gallery, config)
    yield gallery, config_file, retriever
    retriever.close()


def _ids(result):
    return [c.image_id for c in result.candidates]


def test_the_same_image_comes_back_first_with_cosine_one(setup):
    gallery, _, retriever = setup
    result = retriever.query_image(decode_image(gallery / 'img' / 'd2.png'), top_k=8)
    assert _ids(result)[0] == 'd2'
    best = result.candidates[0]
    assert best.coarse_score == pytest.approx(1.0, abs=1e-4)
    assert best.fused_score == best.coarse_score and best.caption_score is None
    assert all(c.caption_score is None and c.rerank_score is None for c in result.candidates)
    scores = [c.coarse_score for c in result.candidates]
    assert scores == sorted(scores, reverse=True) and len(scores) == 8
    assert result.query == 'image 40x32 (drone)' and result.no_match == ''
    assert set(result.timings_ms) == {'encode', 'coarse', 'captions', 'rerank', 'total'}
    assert result.rerank == {}


def test_platform_filter_keeps_one_platform_and_k_results(setup):
    gallery, _, retriever = setup
    image = decode_image(gallery / 'img' / 'd1.png')
    result = retriever.query_image(image, top_k=3, platform='satellite')
    assert len(result.candidates) == 3
    assert {c.platform for c in result.candidates} == {'satellite'}
    assert len(retriever.query_image(image, top_k=10, platform='satellite').candidates) == PLACES


def test_area_filter_runs_inside_the_search(setup):
    gallery, _, retriever = setup
    image = decode_image(gallery / 'img' / 'd3.png')
    unfiltered = _ids(retriever.query_image(image, top_k=2))
    assert unfiltered[0] == 'd3'
    # Around place 0, 600 m: only s0 and d0 (place 1 is ~1.1 km away) although place 3's
    # own image is the best match overall: the filter is applied before top-k.
    lat, lon = _position(0)
    inside = retriever.query_image(image, top_k=2, near=(lat, lon, 600.0))
    assert sorted(_ids(inside)) == ['d0', 's0']
    # A wider area holding 6 images still gives top_k of them, each within the radius.
    wide = retriever.query_image(image, top_k=4, near=(lat, lon, 2300.0))
    assert len(wide.candidates) == 4
    dist = geodesic_distance_m(lat, lon, [c.lat for c in wide.candidates],
                               [c.lon for c in wide.candidates])
    assert (dist <= 2300.0).all()
    assert {c.image_id[1] for c in wide.candidates} <= {'0', '1', '2'}
    # Area and platform together.
    both = retriever.query_image(image, top_k=5, platform='satellite', near=(lat, lon, 600.0))
    assert _ids(both) == ['s0']


def test_an_empty_area_gives_no_candidates_and_says_so(setup):
    gallery, _, retriever = setup
    result = retriever.query_image(decode_image(gallery / 'img' / 'd0.png'),
                                   near=(10.0, 10.0, 100.0))
    assert result.candidates == []
    assert 'within 100 m of (10.000000, 10.000000)' in result.no_match


def test_bad_options_are_query_errors(setup):
    gallery, _, retriever = setup
    image = decode_image(gallery / 'img' / 'd0.png')
    for bad in ((47.0, 8.0), (47.0, 8.0, 0.0), (95.0, 8.0, 10.0), ('a', 8.0, 10.0)):
        with pytest.raises(QueryError, match='near'):
            retriever.query_image(image, near=bad)
    with pytest.raises(QueryError, match='platform'):
        retriever.query_image(image, platform='boat')
    with pytest.raises(QueryError, match='query platform'):
        retriever.query_image(image, query_platform='boat')
    with pytest.raises(QueryError, match='top_k'):
        retriever.query_image(image, top_k=0)
    with pytest.raises(QueryError, match='PIL image'):
        retriever.query_image(b'not decoded')


def test_decode_image_bytes_matches_the_file_decoder(setup):
    gallery, _, _ = setup
    path = gallery / 'img' / 's1.png'
    from_bytes = decode_image_bytes(path.read_bytes())
    assert np.array_equal(np.asarray(from_bytes), np.asarray(decode_image(path)))
    big = io.BytesIO()
    Image.new('RGB', (3000, 1500)).save(big, format='PNG')
    assert decode_image_bytes(big.getvalue()).size == (2048, 1024)
    with pytest.raises(ValueError, match='empty'):
        decode_image_bytes(b'')
    with pytest.raises(Exception):
        decode_image_bytes(b'\x89PNG not really')


class _ExpertEncoder(ImageTextEncoder):
    """Platform experts that write the expert into the vector, to see which one ran."""

    platform_experts = True
    dim = 3

    def __init__(self):
        super().__init__()
        self.seen = []

    def _encode_images(self, images, platforms=None):
        self.seen.extend(platforms)
        return np.array([[1.0, 0.0, 0.0] if p == 'drone' else [0.0, 1.0, 0.0]
                         for p in platforms])

    def _encode_texts(self, texts):
        return np.ones((len(texts), 3))


def test_expert_encoders_embed_the_query_with_its_own_platform(setup):
    gallery_dir, _, _ = setup
    gallery = load_gallery(gallery_dir)
    vectors = np.array([[1.0, 0.0, 0.0] if item.platform == 'drone' else [0.0, 1.0, 0.0]
                        for item in gallery.items], dtype=np.float32)
    encoder = _ExpertEncoder()
    config = load_config(None, {'image_encoder.backend': 'learned'})
    retriever = Retriever.from_arrays(gallery, config, image_encoder=encoder,
                                      image_vectors=vectors)
    image = Image.new('RGB', (8, 8))
    sat = retriever.query_image(image, top_k=2, query_platform='satellite')
    assert encoder.seen == ['satellite'] and {c.platform for c in sat.candidates} == {
        'satellite'}
    assert sat.query == 'image 8x8 (satellite)'
    retriever.query_image(image, top_k=2)
    assert encoder.seen == ['satellite', 'drone']


def test_without_an_image_encoder_image_queries_are_a_config_error(setup):
    gallery_dir, _, _ = setup
    gallery = load_gallery(gallery_dir)
    config = load_config(None, {'image_encoder.backend': 'none'})
    retriever = Retriever.from_arrays(gallery, config, caption_texts=['x'] * len(gallery),
                                      caption_vectors=np.eye(len(gallery), dtype=np.float32))
    with pytest.raises(ConfigError, match='image_encoder.backend'):
        retriever.query_image(Image.new('RGB', (8, 8)))


class _TextReranker:
    identity = 'fake-rerank'

    def close(self):
        pass


def test_a_text_reranker_is_skipped_and_says_why(setup):
    gallery_dir, config_file, retriever = setup
    config = load_config(str(config_file), {'reranker.backend': 'itm',
                                            'reranker.model': 'some-blip'})
    with_stage = Retriever(retriever.gallery, config, image_encoder=retriever._image_encoder,
                           image_index=retriever._image_index, reranker=_TextReranker())
    result = with_stage.query_image(decode_image(gallery_dir / 'img' / 'd1.png'))
    assert result.rerank == {'skipped': 'the itm reranker compares text with images only',
                             'reranker': 'fake-rerank'}
    assert _ids(result)[0] == 'd1'


def test_the_openai_reranker_sees_photo_and_candidate_pairs(setup, chat_server):
    """The VLM gets the photo and each candidate with the same-place question; its answers
    (Yes only for the tile the image tower ranked last) re-sort the satellite candidates."""
    from cgrs_ros.engine.rerankers import make_reranker
    from model_factories import prompt_text, uploaded_images

    gallery_dir, config_file, retriever = setup
    photo = decode_image(gallery_dir / 'img' / 'd0.png')
    before = retriever.query_image(photo, top_k=4, platform='satellite')
    last = _ids(before)[-1]
    target = np.asarray(decode_image(gallery_dir / 'img' / f'{last}.png'), float).mean((0, 1))

    def answer(body):
        photo, candidate = uploaded_images(body)
        same = np.allclose(np.asarray(candidate.convert('RGB'), float).mean((0, 1)), target,
                           atol=4.0)
        return [('Yes', -0.05), ('No', -3.0)] if same else [('No', -0.05), ('Yes', -3.0)]

    chat_server.logprobs = lambda body: (answer(body) if len(uploaded_images(body)) == 2
                                         else [('Yes', -0.1), ('No', -2.0)])  # the probe
    overrides = {'reranker': {'backend': 'openai', 'model': 'tiny-vlm', 'k': 4, 'weight': 1.0,
                              'base_url': chat_server.url, 'max_retries': 0}}
    config = load_config(str(config_file), overrides)
    reranker = make_reranker(config.reranker)
    with_stage = Retriever(retriever.gallery, config, image_encoder=retriever._image_encoder,
                           image_index=retriever._image_index, reranker=reranker)
    try:
        result = with_stage.query_image(photo, top_k=4, platform='satellite')
    finally:
        with_stage.close()
    assert _ids(result)[0] == last
    assert sorted(_ids(result)) == sorted(_ids(before))
    assert result.rerank['scored'] == 4 and result.rerank['failed'] == 0
    assert result.candidates[0].rerank_score > 0.9
    pairs = [r['body'] for r in chat_server.requests if len(uploaded_images(r['body'])) == 2]
    assert len(pairs) == 4
    assert 'drone photo' in prompt_text(pairs[0]) and 'same place' in prompt_text(pairs[0])
    assert result.timings_ms['rerank'] > 0


def test_the_transformers_reranker_scores_photo_and_candidate_pairs(setup, tiny_llava_dir):
    """A local VLM (a tiny LLaVA built in the test) scores every (photo, candidate) pair of
    the top k: its probabilities are reported and order the candidates with weight 1."""
    from cgrs_ros.engine.rerankers import make_reranker

    gallery_dir, config_file, retriever = setup
    photo = decode_image(gallery_dir / 'img' / 'd0.png')
    before = retriever.query_image(photo, top_k=4, platform='satellite')
    overrides = {'reranker': {'backend': 'transformers', 'model': tiny_llava_dir, 'k': 4,
                              'weight': 1.0, 'device': 'cpu', 'batch_size': 2}}
    config = load_config(str(config_file), overrides)
    with_stage = Retriever(retriever.gallery, config, image_encoder=retriever._image_encoder,
                           image_index=retriever._image_index,
                           reranker=make_reranker(config.reranker))
    try:
        result = with_stage.query_image(photo, top_k=4, platform='satellite')
    finally:
        with_stage.close()
    assert 'skipped' not in result.rerank
    assert result.rerank['scored'] == 4 and result.rerank['failed'] == 0
    assert result.rerank['reranker'].startswith('transformers:')
    assert sorted(_ids(result)) == sorted(_ids(before))
    probabilities = [c.rerank_score for c in result.candidates]
    assert all(0.0 <= p <= 1.0 for p in probabilities)
    assert probabilities == sorted(probabilities, reverse=True)
    assert result.timings_ms['rerank'] > 0


# ---------------------------------------------------------------- the command line

def test_cli_image_query_json_has_the_text_query_shape(setup, capsys):
    gallery, config_file, _ = setup
    photo = gallery / 'img' / 'd1.png'
    assert main(['query', str(gallery), '--image', str(photo), '--config', str(config_file),
                 '--json']) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {'query', 'normalized_query', 'candidates', 'timings_ms', 'no_match',
                           'rerank'}
    assert result['query'] == 'image 40x32 (drone)'
    assert len(result['candidates']) == 3  # retrieval.top_k of the config file
    first = result['candidates'][0]
    assert first['image_id'] == 'd1' and first['scores']['coarse'] == pytest.approx(1, abs=1e-4)
    assert first['scores']['caption'] is None

    lat, lon = _position(2)
    assert main(['query', str(gallery), '--image', str(photo), '--config', str(config_file),
                 '--platform', 'satellite', '--query-platform', 'drone', '--near', str(lat),
                 str(lon), '--radius', '500', '--top-k', '5', '--json']) == 0
    result = json.loads(capsys.readouterr().out)
    assert [c['image_id'] for c in result['candidates']] == ['s2']


def test_cli_empty_area_prints_the_reason(setup, capsys):
    gallery, config_file, _ = setup
    assert main(['query', str(gallery), '--image', str(gallery / 'img' / 'd1.png'),
                 '--config', str(config_file), '--near', '0', '0', '--radius', '50']) == 0
    out = capsys.readouterr().out
    assert 'query: image 40x32 (drone)' in out and '(no match' in out


@pytest.mark.parametrize('content', [b'\x89PNG\r\n\x1a\n broken', None])
def test_cli_corrupt_or_missing_photo_is_one_line_exit_2(setup, tmp_path, capsys, content):
    gallery, config_file, _ = setup
    photo = tmp_path / 'photo.jpg'
    if content is not None:
        photo.write_bytes(content)
    assert main(['query', str(gallery), '--image', str(photo), '--config',
                 str(config_file)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f'cgrs query: error: query image {photo} ')
    assert len(err.splitlines()) == 1 and captured.out == ''


def test_cli_argument_mistakes_are_exit_2(setup, capsys):
    gallery, config_file, _ = setup
    photo = str(gallery / 'img' / 'd1.png')
    for argv in (['a house', '--image', photo], [], ['--image', photo, '--near', '47', '8'],
                 ['a house', '--query-platform', 'drone']):
        assert main(['query', str(gallery)] + argv + ['--config', str(config_file)]) == 2
        assert capsys.readouterr().err.startswith('cgrs query: error: ')


def test_text_queries_take_the_same_area_filter(setup, capsys):
    gallery, config_file, retriever = setup
    lat, lon = _position(1)
    result = retriever.query('a red roof', top_k=5, near=(lat, lon, 600.0))
    assert sorted(_ids(result)) == ['d1', 's1'] and result.no_match == ''
    empty = retriever.query('a red roof', near=(-30.0, 20.0, 1000.0))
    assert empty.candidates == [] and 'within 1000 m' in empty.no_match
    assert main(['query', str(gallery), 'a red roof', '--config', str(config_file), '--near',
                 str(lat), str(lon), '--radius', '600', '--json']) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(c['image_id'] for c in result['candidates']) == ['d1', 's1']


def test_area_filter_is_geodesic_across_the_antimeridian_and_at_the_poles():
    from types import SimpleNamespace

    from cgrs_ros.engine.area import AreaFilter, SearchArea

    points = [(0.0, 179.999), (0.0, -179.999), (0.0, 0.0), (89.9999, 0.0), (89.9999, 180.0),
              (0.0, 179.99)]
    area_filter = AreaFilter([SimpleNamespace(lat=lat, lon=lon) for lat, lon in points])
    # 0.001 deg of longitude at the equator is ~111 m; 0.01 deg ~1113 m.
    assert list(area_filter.items_within(SearchArea(0.0, 180.0, 500.0))) == [0, 1]
    assert list(area_filter.items_within(SearchArea(0.0, 180.0, 1200.0))) == [0, 1, 5]
    # Two points 0.0001 deg from the pole on opposite meridians are ~22 m apart.
    assert list(area_filter.items_within(SearchArea(89.9999, 0.0, 30.0))) == [3, 4]
    assert list(area_filter.items_within(SearchArea(-45.0, 10.0, 1000.0))) == []
