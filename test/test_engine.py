"""Index and retrieval end to end: tiny real CLIP models from disk, real MiniLM, real FAISS."""

import json
import shutil

from cgrs_ros.engine.captions import caption_store_path, CaptionStore
from cgrs_ros.engine.config import load_config
from cgrs_ros.engine.encoders import load_image_encoder
from cgrs_ros.engine.errors import ConfigError, GalleryError, QueryError
from cgrs_ros.engine.indexer import index_gallery
from cgrs_ros.engine.retriever import Retriever
from cgrs_ros.engine.storage import sha256_file
import numpy as np
from PIL import Image
import pytest

HEADER = 'image_id,path,lat,lon,alt,heading_deg,platform,group_id,description\n'
PLACES = [
    ('house', 'satellite', 'a red-roofed house beside a circular plaza with a fountain'),
    ('stadium', 'drone', 'a football stadium with a green pitch and floodlights'),
    ('bridge', 'drone', 'a stone bridge with white arches over a wide river'),
    ('parking', 'satellite', 'a large parking lot full of cars next to a supermarket'),
    ('church', 'ground', 'a gothic church with a tall pointed spire'),
    ('harbour', 'drone', 'a harbour with sailing boats moored along a pier'),
    ('windfarm', 'satellite', 'a wind farm of white turbines on a hill'),
    ('orchard', 'ground', 'an orchard of apple trees in neat rows'),
]
PARAPHRASES = [
    ('the home with a red roof next to the round square that has a fountain', 'house'),
    ('soccer ground with floodlights', 'stadium'),
    ('an arched bridge crossing the river', 'bridge'),
    ('cathedral with a pointy steeple', 'church'),
    ('marina with yachts tied up at the jetty', 'harbour'),
]


def _write_gallery(root, make_png, descriptions=True, extra_rows=''):
    rows = []
    for i, (name, platform, text) in enumerate(PLACES):
        make_png(root / 'img' / f'{name}.png', i)
        rows.append(f'{name},img/{name}.png,{47 + i / 1000},{8 + i / 1000},{400 + i},{i * 40},'
                    f'{platform},g{i},{text if descriptions else ""}\n')
    (root / 'gallery.csv').write_text(HEADER + ''.join(rows) + extra_rows)
    return root


def _corrupt_png(path):
    """A PNG whose header parses but whose pixel data is cut off."""
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    noisy.save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.fixture
def gallery(tmp_path, make_png):
    return _write_gallery(tmp_path / 'gallery', make_png)


@pytest.fixture
def config(tiny_open_clip_dir):
    def make(**overrides):
        # One torch thread: this machine's cores are shared, where 1 thread is fastest.
        base = {'image_encoder.model': f'local-dir:{tiny_open_clip_dir}',
                'image_encoder.pretrained': None, 'image_encoder.batch_size': 3,
                'image_encoder.threads': 1, 'text_encoder.threads': 1}
        base.update(overrides)
        return load_config(None, base)
    return make


def test_index_and_query_end_to_end(gallery, config, make_png):
    _corrupt_png(gallery / 'img' / 'broken.png')
    with open(gallery / 'gallery.csv', 'a') as handle:
        handle.write('broken,img/broken.png,47,8,400,0,drone,gx,a broken photo\n'
                     'ghost,img/ghost.png,47,8,400,0,drone,gx,\n')
    summary = index_gallery(gallery, config(), progress=False)
    assert (summary.indexed, summary.unchanged) == (len(PLACES), 0)
    reasons = {s.image_id: (s.line, s.reason) for s in summary.skipped}
    assert reasons['ghost'][0] == len(PLACES) + 3 and 'not found' in reasons['ghost'][1]
    assert reasons['broken'][0] == len(PLACES) + 2
    assert 'cannot decode image' in reasons['broken'][1]
    assert 'searchable by its caption only' in reasons['broken'][1]
    assert summary.images_embedded == len(PLACES)
    assert summary.captions_embedded == len(PLACES) + 1 and summary.captioned == len(PLACES) + 1
    assert list((gallery / '.cgrs' / 'index').glob('image.*.faiss'))

    retriever = Retriever.open(gallery, config())
    stats = retriever.stats()
    assert stats['gallery_size'] == len(PLACES) + 1 and stats['indexed'] == len(PLACES)
    assert stats['captioned'] == len(PLACES) + 1 and stats['caption_coverage'] == 1.0
    assert stats['image_encoder'].startswith('open_clip:local-dir:')
    result = retriever.query('a football stadium north of the river', top_k=3)
    assert result.normalized_query == 'a football stadium the river'
    assert [c.rank for c in result.candidates] == [1, 2, 3]
    fused = [c.fused_score for c in result.candidates]
    assert fused == sorted(fused, reverse=True)
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data) == {'query', 'normalized_query', 'candidates', 'timings_ms', 'no_match',
                         'rerank'}
    assert data['no_match'] == ''  # a real description clears the relevance floor
    assert set(data['timings_ms']) == {'encode', 'coarse', 'captions', 'rerank', 'total'}
    first = data['candidates'][0]
    assert {'rank', 'image_id', 'platform', 'lat', 'lon', 'alt', 'heading_deg', 'caption',
            'scores'} <= set(first)
    assert set(first['scores']) == {'coarse', 'caption', 'fused', 'rerank', 'final'}
    item = retriever.gallery.get(first['image_id'])
    assert (first['lat'], first['lon'], first['alt'], first['heading_deg']) == (
        item.lat, item.lon, item.alt, item.heading_deg)
    retriever.close()


def test_second_index_run_does_no_model_work_and_changes_are_incremental(gallery, config,
                                                                         make_png):
    first = index_gallery(gallery, config(), progress=False)
    assert len(first.models_loaded) == 2
    second = index_gallery(gallery, config(), progress=False)
    assert (second.indexed, second.unchanged, second.skipped) == (0, len(PLACES), [])
    assert second.models_loaded == [] and second.files_hashed == 0
    assert (second.images_embedded, second.captions_embedded, second.captions_written) == (
        0, 0, 0)

    # Change one image's pixels, one description, add one row: exactly those are embedded.
    make_png(gallery / 'img' / 'house.png', 1234)
    text = (gallery / 'gallery.csv').read_text()
    text = text.replace('neat rows', 'neat rows and a barn')
    make_png(gallery / 'img' / 'new.png', 555)
    text += 'new,img/new.png,47,8,400,0,drone,g9,a lighthouse on a rocky cape\n'
    (gallery / 'gallery.csv').write_text(text)
    third = index_gallery(gallery, config(), progress=False)
    assert third.images_embedded == 2          # house (new pixels) + new
    assert third.captions_embedded == 2        # orchard (new text) + new
    assert third.indexed == 3 and third.unchanged == len(PLACES) - 2  # house, orchard, new
    # A description removed from the manifest stops being that image's caption.
    (gallery / 'gallery.csv').write_text((gallery / 'gallery.csv').read_text().replace(
        'a gothic church with a tall pointed spire', ''))
    assert index_gallery(gallery, config(), progress=False).captioned == len(PLACES)
    church = Retriever.open(gallery, config()).query('church', top_k=len(PLACES) + 1)
    assert {c.image_id: c.caption for c in church.candidates}['church'] is None
    # Touching a file without changing its bytes re-hashes it but embeds nothing.
    (gallery / 'img' / 'church.png').write_bytes((gallery / 'img' / 'church.png').read_bytes())
    fourth = index_gallery(gallery, config(), progress=False)
    assert fourth.files_hashed == 1 and fourth.models_loaded == [] and fourth.indexed == 0


def test_reopening_gives_the_same_results(gallery, config):
    index_gallery(gallery, config(), progress=False)
    queries = ['a bridge over a river', 'boats in a harbour', 'apple trees']

    def run():
        retriever = Retriever.open(gallery, config())
        out = [[(c.image_id, round(c.fused_score, 6), c.coarse_score, c.caption_score)
                for c in retriever.query(q, top_k=4).candidates] for q in queries]
        retriever.close()
        return out

    before = run()
    assert before == run()
    # Without the persisted FAISS file the index is rebuilt from the stored embeddings.
    next((gallery / '.cgrs' / 'index').glob('image.*.faiss')).unlink()
    assert run() == before
    # A state folder elsewhere works the same way (--state).
    state = gallery.parent / 'state'
    index_gallery(gallery, config(), state_dir=state, progress=False)
    retriever = Retriever.open(gallery, config(), state_dir=state)
    assert [[(c.image_id, round(c.fused_score, 6), c.coarse_score, c.caption_score)
             for c in retriever.query(q, top_k=4).candidates] for q in queries] == before


def test_switching_the_image_encoder_re_embeds(gallery, config, tiny_hf_clip_dir):
    index_gallery(gallery, config(), progress=False)
    hf = config(**{'image_encoder.backend': 'hf_clip', 'image_encoder.model':
                   str(tiny_hf_clip_dir)})
    summary = index_gallery(gallery, hf, progress=False)
    assert summary.images_embedded == len(PLACES) and summary.captions_embedded == 0
    assert summary.image_encoder.startswith('hf_clip:')
    result = Retriever.open(gallery, hf).query('a stadium', top_k=2)
    assert len(result.candidates) == 2 and result.candidates[0].coarse_score is not None
    # Back to the first encoder: its embeddings are still there.
    assert index_gallery(gallery, config(), progress=False).models_loaded == []


def test_platform_filter_applies_before_top_k(gallery, config):
    index_gallery(gallery, config(), progress=False)
    satellites = {name for name, platform, _ in PLACES if platform == 'satellite'}
    for channel in ('rerank', 'hybrid'):
        retriever = Retriever.open(gallery, config(**{'retrieval.coarse_k': 1,
                                                      'retrieval.caption_channel': channel}))
        result = retriever.query('a wind farm on a hill', top_k=5, platform='satellite')
        # coarse_k is 1, yet every satellite image is reachable: the filter is inside FAISS.
        assert {c.image_id for c in result.candidates} <= satellites
        assert {c.platform for c in result.candidates} == {'satellite'}
        ground = retriever.query('a wind farm on a hill', top_k=5, platform='ground')
        assert {c.platform for c in ground.candidates} == {'ground'}
        assert len(ground.candidates) == 2


def test_orientation_words_auto_only_scores_satellite_images_with_the_normalized_query(
        gallery, config):
    index_gallery(gallery, config(), progress=False)
    query = 'the harbour with boats on the left side of the pier'
    normalized = 'the harbour with boats the pier'
    encoder = load_image_encoder(config().image_encoder)
    raw_q, norm_q = encoder.encode_texts([query, normalized])
    platform_of = {name: platform for name, platform, _ in PLACES}

    def image_vector(name):
        return encoder.encode_images([Image.open(gallery / 'img' / f'{name}.png')
                                      .convert('RGB')])[0]

    for mode, sat_q, other_q, reported in [('auto', norm_q, raw_q, normalized),
                                           ('true', norm_q, norm_q, normalized),
                                           ('false', raw_q, raw_q, query)]:
        retriever = Retriever.open(gallery, config(**{
            'retrieval.remove_orientation_words': mode, 'retrieval.coarse_k': len(PLACES)}))
        result = retriever.query(query, top_k=len(PLACES))
        assert result.normalized_query == reported
        for cand in result.candidates:
            want = sat_q if platform_of[cand.image_id] == 'satellite' else other_q
            assert cand.coarse_score == pytest.approx(float(image_vector(cand.image_id) @ want),
                                                      abs=1e-4), (mode, cand.image_id)


def test_hybrid_adds_caption_matches_beyond_the_coarse_list(gallery, config):
    index_gallery(gallery, config(), progress=False)
    query = 'marina with yachts tied up at the jetty'
    settings = {'retrieval.coarse_k': 1, 'retrieval.top_k': 1, 'retrieval.caption_weight': 0.9}
    coarse_top = Retriever.open(gallery, config(**settings)).query(query).candidates
    hybrid = Retriever.open(gallery, config(**settings, **{
        'retrieval.caption_channel': 'hybrid'})).query(query, top_k=1).candidates
    # rerank can only reorder the coarse top-1; hybrid also brings in the caption match.
    assert coarse_top[0].image_id != 'harbour'
    assert hybrid[0].image_id == 'harbour'
    assert hybrid[0].coarse_score is not None and hybrid[0].caption_score is not None
    # Asking for more than coarse_k widens the coarse search rather than returning fewer.
    assert len(Retriever.open(gallery, config(**settings)).query(query, top_k=4).candidates) == 4


@pytest.mark.parametrize('query, expected', PARAPHRASES)
def test_paraphrased_query_finds_the_right_image_through_its_caption(gallery, config, query,
                                                                     expected, tmp_path):
    caption_only = config(**{'image_encoder.backend': 'none'})
    index_gallery(gallery, caption_only, progress=False)
    result = Retriever.open(gallery, caption_only).query(query, top_k=3)
    assert result.candidates[0].image_id == expected
    # The same holds inside the CGRS rerank when the caption channel decides the order.
    index_gallery(gallery, config(), progress=False)
    rerank = Retriever.open(gallery, config(**{'retrieval.caption_weight': 1.0,
                                               'retrieval.coarse_k': len(PLACES)}))
    assert rerank.query(query, top_k=1).candidates[0].image_id == expected


def test_caption_only_retrieval_loads_no_image_model(gallery, config):
    caption_only = config(**{'image_encoder.backend': 'none'})
    summary = index_gallery(gallery, caption_only, progress=False)
    assert summary.images_embedded == 0 and summary.image_encoder is None
    assert not list((gallery / '.cgrs' / 'index').glob('image*'))
    retriever = Retriever.open(gallery, caption_only)
    result = retriever.query('a gothic church', top_k=3)
    assert result.candidates[0].image_id == 'church'
    assert all(c.coarse_score is None for c in result.candidates)
    assert [c.fused_score for c in result.candidates] == [c.caption_score
                                                          for c in result.candidates]
    assert retriever.stats()['image_encoder'] is None


def test_coarse_only_without_captions(tmp_path, make_png, config):
    gallery = _write_gallery(tmp_path / 'g', make_png, descriptions=False)
    summary = index_gallery(gallery, config(), progress=False)
    assert summary.captioned == 0 and summary.text_encoder is None
    retriever = Retriever.open(gallery, config())
    result = retriever.query('a stadium', top_k=3)
    assert len(result.candidates) == 3
    for cand in result.candidates:
        assert cand.caption is None and cand.caption_score is None
        assert cand.fused_score == cand.coarse_score
    assert retriever.stats()['captioned'] == 0


def test_neither_channel_is_a_clear_error(tmp_path, make_png, config):
    gallery = _write_gallery(tmp_path / 'g', make_png, descriptions=False)
    nothing = config(**{'image_encoder.backend': 'none'})
    with pytest.raises(ConfigError, match='image_encoder.backend is none and no image has a '
                                          'caption'):
        index_gallery(gallery, nothing, progress=False)
    with pytest.raises(ConfigError, match='nothing to search'):
        Retriever.open(gallery, nothing)


def test_unindexed_gallery_and_bad_queries(gallery, config):
    with pytest.raises(GalleryError, match='run `cgrs index'):
        Retriever.open(gallery, config())
    index_gallery(gallery, config(), progress=False)
    retriever = Retriever.open(gallery, config())
    with pytest.raises(QueryError, match='empty'):
        retriever.query('   ')
    for text in ('\u200b', '\x07', '\U0001f681'):  # nothing to search for
        with pytest.raises(QueryError, match='no letters or digits'):
            retriever.query(text)
    # The relevance floor: an off-topic goal matches nothing (candidates still listed).
    off_topic = retriever.query('set an alarm for seven tomorrow morning')
    assert 'under retrieval.min_caption_score 0.3' in off_topic.no_match
    assert off_topic.candidates and off_topic.to_dict()['no_match'] == off_topic.no_match
    with pytest.raises(QueryError, match="platform 'boat'"):
        retriever.query('a house', platform='boat')
    with pytest.raises(QueryError, match='top_k 0'):
        retriever.query('a house', top_k=0)


def test_refresh_captions_picks_up_new_captions_without_reopening(gallery, config):
    (gallery / 'gallery.csv').write_text(
        (gallery / 'gallery.csv').read_text().replace('a gothic church', 'an old church'))
    vlm = config(**{'captioner': {'backend': 'openai', 'model': 'some-vlm'}})
    index_gallery(gallery, vlm, progress=False)  # manifest text is not the VLM's caption
    retriever = Retriever.open(gallery, vlm)
    assert retriever.stats()['captioned'] == 0
    assert retriever.query('a church').candidates[0].caption_score is None
    assert retriever.refresh_captions() == 0

    # The captioning node writes captions (by image content hash) while the retriever runs.
    digest = {name: sha256_file(gallery / 'img' / f'{name}.png') for name, _, _ in PLACES}
    with CaptionStore(caption_store_path(gallery / '.cgrs')) as store:
        for name, _, text in PLACES:
            store.put_ok(digest[name], 'openai:some-vlm', 'v1', text)
        store.put_failed(digest['orchard'], 'openai:other', 'v1', 'timeout')
    assert retriever.refresh_captions() == len(PLACES)
    assert retriever.stats()['captioned'] == len(PLACES)
    rerank = retriever.query('a gothic church with a spire', top_k=len(PLACES))
    assert all(c.caption_score is not None for c in rerank.candidates)
    assert retriever.refresh_captions() == 0

    # A better caption for one image replaces the old one on the next refresh.
    with CaptionStore(caption_store_path(gallery / '.cgrs')) as store:
        store.put_ok(digest['orchard'], 'openai:better-vlm', 'v2', 'rows of apple trees')
    assert retriever.refresh_captions() == 1
    top = retriever.query('apple trees in rows', top_k=len(PLACES)).candidates
    assert {c.image_id: c.caption for c in top}['orchard'] == 'rows of apple trees'
    # The new caption embeddings were stored, so a reopen does not embed them again.
    reopened = Retriever.open(gallery, vlm)
    assert reopened.stats()['captioned'] == len(PLACES)
    summary = index_gallery(gallery, vlm, progress=False)
    assert summary.captions_embedded == 0 and summary.models_loaded == []


def test_identical_images_share_one_embedding(gallery, config):
    shutil.copy(gallery / 'img' / 'church.png', gallery / 'img' / 'church2.png')
    with open(gallery / 'gallery.csv', 'a') as handle:
        handle.write('church2,img/church2.png,47,8,400,0,ground,g4,a gothic church\n')
    summary = index_gallery(gallery, config(), progress=False)
    assert summary.images_embedded == len(PLACES)
    result = Retriever.open(gallery, config()).query('church', top_k=len(PLACES) + 1,
                                                     platform='ground')
    scores = {c.image_id: c.coarse_score for c in result.candidates}
    assert scores['church'] == scores['church2']


def test_stage_callback_reports_each_stage_and_can_abandon_the_query(gallery, config):
    index_gallery(gallery, config(), progress=False)
    retriever = Retriever.open(gallery, config())
    seen = []
    result = retriever.query('a red roof', on_stage=lambda stage, p: seen.append((stage, p)))
    assert [stage for stage, _ in seen] == ['encode', 'coarse', 'captions']
    assert [p for _, p in seen] == sorted(p for _, p in seen)
    assert result.candidates

    class Stop(Exception):
        pass

    def stop_at_coarse(stage, progress):
        if stage == 'coarse':
            raise Stop()

    with pytest.raises(Stop):
        retriever.query('a red roof', on_stage=stop_at_coarse)
    assert retriever.query('a red roof').candidates  # nothing left half-done
