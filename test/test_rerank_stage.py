"""The reranker stage inside a real query: fusion, re-sorting, budget, progress, bad images.

The gallery, MiniLM, FAISS and the retriever are real; the model of the stage is a small
pixel reranker written here (it prefers one image by its pixels), because what is under test
is the stage: which candidates it scores, how it fuses and re-sorts, and what it reports. The
model backends have their own tests (test_rerankers_*.py).
"""

import json
import time

from cgrs_ros.engine.config import load_config
from cgrs_ros.engine.errors import ConfigError
from cgrs_ros.engine.indexer import index_gallery
from cgrs_ros.engine.rerankers import Reranker
from cgrs_ros.engine.retriever import Retriever
import numpy as np
from PIL import Image
import pytest
from test_engine import _write_gallery

QUERY = 'a building with a roof near some trees'


class PixelReranker(Reranker):
    """P(match) = 0.95 for images whose pixels equal the target image's, else 0.05."""

    def __init__(self, target_path, batch_size=1, delay_s=0.0):
        self.target = np.asarray(Image.open(target_path).convert('RGB'))
        self.batch_size = batch_size
        self.delay_s = delay_s
        self.calls = []

    @property
    def identity(self):
        return 'test-pixels'

    def score(self, query, images, platforms, captions=None):
        self._check_inputs(images, platforms, captions)
        self.calls.append(len(images))
        time.sleep(self.delay_s)
        out = []
        for image in images:
            if image is None:
                out.append(np.nan)
            else:
                same = np.array_equal(np.asarray(image.convert('RGB')), self.target)
                out.append(0.95 if same else 0.05)
        return np.array(out)


@pytest.fixture(scope='module')
def indexed(tmp_path_factory):
    from conftest import write_png

    root = _write_gallery(tmp_path_factory.mktemp('stage') / 'gallery', write_png)
    config = load_config(overrides={'image_encoder.backend': 'none',
                                    'retrieval.min_caption_score': None})
    index_gallery(root, config, progress=False)
    return root


def _open(root, reranker=None, **section):
    config = load_config(overrides={'image_encoder.backend': 'none',
                                    'retrieval.min_caption_score': None,
                                    'reranker': dict(section)})
    retriever = Retriever.open(root, config)
    retriever.reranker = reranker
    return retriever


def _ids(result):
    return [c.image_id for c in result.candidates]


def test_stage_reorders_only_the_top_k_and_reports_its_scores(indexed):
    before = _open(indexed).query(QUERY, top_k=8)
    assert before.rerank == {}  # backend none: no stage ran
    base = _ids(before)
    target = base[2]  # third before the stage, inside k=4
    tail = base[4:]
    retriever = _open(indexed, PixelReranker(indexed / 'img' / f'{target}.png'),
                      backend='none', k=4, weight=0.8)
    result = retriever.query(QUERY, top_k=8)
    ids = _ids(result)
    assert ids[0] == target
    assert sorted(ids[:4]) == sorted(base[:4])   # the stage reorders its k candidates only
    assert ids[4:] == tail                        # the rest keep their order after them
    assert result.rerank == {'scored': 4, 'of': 4, 'failed': 0, 'budget_hit': False,
                             'reranker': 'test-pixels'}
    first = result.candidates[0]
    assert first.rerank_score == pytest.approx(0.95)
    assert first.final_score is not None
    assert [c.rerank_score for c in result.candidates[4:]] == [None] * 4
    finals = [c.final_score for c in result.candidates[:4]]
    assert finals == sorted(finals, reverse=True)
    data = json.loads(json.dumps(result.to_dict()))
    assert data['candidates'][0]['scores']['rerank'] == pytest.approx(0.95)
    assert data['timings_ms']['rerank'] > 0


def test_weight_zero_keeps_the_order_but_reports_probabilities(indexed):
    base = _ids(_open(indexed).query(QUERY, top_k=8))
    retriever = _open(indexed, PixelReranker(indexed / 'img' / f'{base[3]}.png'), k=8,
                      weight=0.0)
    result = retriever.query(QUERY, top_k=8)
    assert _ids(result) == base
    assert result.candidates[3].rerank_score == pytest.approx(0.95)


def test_budget_scores_a_prefix_and_the_rest_keep_their_place(indexed):
    base = _ids(_open(indexed).query(QUERY, top_k=8))
    target = base[5]  # would win, but the budget runs out before the model sees it
    slow = PixelReranker(indexed / 'img' / f'{target}.png', batch_size=1, delay_s=0.05)
    retriever = _open(indexed, slow, k=8, weight=1.0, timeout_ms=120)
    result = retriever.query(QUERY, top_k=8)
    scored = result.rerank['scored']
    assert result.rerank['budget_hit'] is True
    assert 1 <= scored < 6
    assert _ids(result)[0] != target
    assert _ids(result)[scored:] == base[scored:]
    assert all(c.rerank_score is None for c in result.candidates[scored:])


def test_progress_per_model_call_and_cancel_between_calls(indexed):
    base = _ids(_open(indexed).query(QUERY, top_k=8))
    reranker = PixelReranker(indexed / 'img' / f'{base[0]}.png', batch_size=2)
    retriever = _open(indexed, reranker, k=6)
    seen = []
    retriever.query(QUERY, on_stage=lambda stage, p: seen.append((stage, p)))
    stages = [s for s, _ in seen]
    assert stages == ['encode', 'coarse', 'captions', 'rerank 0/6', 'rerank 2/6', 'rerank 4/6',
                      'rerank 6/6']
    assert [p for _, p in seen] == sorted(p for _, p in seen)
    assert reranker.calls == [2, 2, 2]

    class Cancelled(Exception):
        pass

    def cancel_after_first_call(stage, progress):
        if stage == 'rerank 2/6':
            raise Cancelled()

    reranker.calls.clear()
    with pytest.raises(Cancelled):
        retriever.query(QUERY, on_stage=cancel_after_first_call)
    assert reranker.calls == [2]  # abandoned between model calls


def test_an_unreadable_candidate_keeps_its_place(indexed, tmp_path):
    import shutil

    root = tmp_path / 'gallery'
    shutil.copytree(indexed, root)
    base = _ids(_open(root).query(QUERY, top_k=8))
    (root / 'img' / f'{base[0]}.png').write_bytes(b'not a png any more')
    retriever = _open(root, PixelReranker(root / 'img' / f'{base[1]}.png'), k=3,
                      weight=1.0)
    result = retriever.query(QUERY, top_k=8)
    by_id = {c.image_id: c for c in result.candidates}
    assert by_id[base[0]].rerank_score is None       # not scored: NaN -> None in the result
    assert by_id[base[1]].rerank_score == pytest.approx(0.95)
    assert result.rerank['scored'] == 3
    assert result.rerank['failed'] == 1


@pytest.mark.parametrize('section, message', [
    ({'backend': 'vlm'}, 'reranker.backend'),
    ({'k': 0}, 'reranker.k'),
    ({'weight': 1.5}, 'reranker.weight'),
    ({'prompt': 'is it {place}?'}, 'reranker.prompt'),
    ({'topk': 3}, 'unknown key'),
])
def test_bad_reranker_sections_name_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={'reranker': section})
