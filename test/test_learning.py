"""cgrs train: losses on hand-made matrices, training on a toy colour gallery with the real
offline towers (EfficientNet-Lite0 + MiniLM), the saved folder through the engine, resume after
SIGKILL, open_clip fine-tuning with locks, and the errors a user can cause."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

from cgrs_ros.engine.config import load_config
from cgrs_ros.engine.errors import ConfigError, GalleryError
from cgrs_ros.engine.gallery import GalleryItem, write_manifest
from cgrs_ros.engine.learning.config import load_train_config
from cgrs_ros.engine.learning.data import (GroupCredit, load_query_set, load_training_pairs,
                                           pairs_from_gallery)
from cgrs_ros.engine.learning.heads import DualHeads
from cgrs_ros.engine.learning.losses import batch_targets, symmetric_contrastive_loss
from cgrs_ros.engine.learning.trainer import train_dual, TrainingError
import numpy as np
from PIL import Image
import pytest
import torch

COLOURS = {'red': (200, 30, 30), 'green': (40, 170, 60), 'blue': (40, 60, 200),
           'yellow': (230, 210, 40), 'black': (15, 15, 15), 'white': (245, 245, 245)}
DESCRIPTIONS = ('a {c} square', 'an image that is mostly {c}', 'a tile painted {c}')
QUERIES = ('take me to the {c} one', 'the place that looks {c}')


def toy_gallery(folder, seed, queries=False, descriptions=True, colours=COLOURS):
    """Two noisy tiles (satellite, drone) per colour; the colour is the place."""
    rng = np.random.default_rng(seed)
    items = []
    for name, rgb in colours.items():
        for k, platform in enumerate(('satellite', 'drone')):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 18, (64, 64, 3)), 0, 255)
            path = folder / 'images' / f'{name}_{k}.png'
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(path)
            items.append(GalleryItem(
                image_id=f'{name}_{k}', path=f'images/{name}_{k}.png', lat=47.0 + 0.001 * k,
                lon=8.0 + 0.001 * len(items), alt=400.0, heading_deg=0.0, platform=platform,
                group_id=name,
                descriptions=tuple(d.format(c=name) for d in DESCRIPTIONS) if descriptions
                else ()))
    write_manifest(folder, items)
    if queries:
        rows = ['query,group_id'] + [f'{q.format(c=c)},{c}' for c in colours for q in QUERIES]
        (folder / 'queries.csv').write_text('\n'.join(rows) + '\n')
    return folder


TINY = {'model.dim': 32, 'model.hidden': 64, 'model.dropout': 0.0, 'model.image_size': 64,
        'train.batch_size': 12, 'train.lr': 3e-3, 'train.threads': 1}


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp('toy')
    return {'train': toy_gallery(root / 'train', 1), 'val': toy_gallery(root / 'val', 2, True),
            'cache': root / 'cache'}


@pytest.fixture(scope='module')
def trained(toy, tmp_path_factory):
    """A model trained a few epochs on the toy gallery (shared by the engine tests)."""
    cfg = load_train_config(None, dict(TINY, **{'train.epochs': 8}))
    out = tmp_path_factory.mktemp('model')
    result = train_dual(load_training_pairs([toy['train']]), cfg, out,
                        [load_query_set(toy['val'])], cache_root=toy['cache'], progress=False)
    return out, result


# ---------------------------------------------------------------------------- losses

def test_multi_positive_target_is_uniform_over_the_place():
    # Texts of places 0, 0, 1; images of places 0, 1, 0: each row's target is spread
    # evenly over the images of its place, and the loss is the cross-entropy against it.
    text_groups, image_groups = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])
    target = batch_targets(text_groups, image_groups)
    assert target.tolist() == [[1, 0, 1], [1, 0, 1], [0, 1, 0]]
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.5, 3.0, 0.5]])
    loss = symmetric_contrastive_loss(logits, target)
    log_p = torch.log_softmax(logits, 1)
    t2i = -((log_p[0, 0] + log_p[0, 2]) / 2 + (log_p[1, 0] + log_p[1, 2]) / 2 + log_p[2, 1]) / 3
    log_q = torch.log_softmax(logits.t(), 1)
    i2t = -((log_q[0, 0] + log_q[0, 1]) / 2 + log_q[1, 2] + (log_q[2, 0] + log_q[2, 1]) / 2) / 3
    assert loss.item() == pytest.approx(((t2i + i2t) / 2).item(), rel=1e-6)


def test_one_positive_per_row_is_clip_infonce():
    logits = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    target = batch_targets(torch.tensor([0, 1]), torch.tensor([0, 1]))
    expected = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
                      + torch.nn.functional.cross_entropy(logits.t(), torch.tensor([0, 1])))
    assert symmetric_contrastive_loss(logits, target).item() == pytest.approx(expected.item())


def test_soft_labels_give_partial_credit_and_a_smaller_loss_for_the_near_place():
    credit = torch.tensor([[0.0, 0.8, 0.0], [0.8, 0.0, 0.0], [0.0, 0.0, 0.0]])
    target = batch_targets(torch.tensor([0]), torch.tensor([0, 1, 2]), credit, weight=0.5)
    assert target.tolist() == [[1.0, pytest.approx(0.4), 0.0]]
    # A model that confuses place 0 with its near twin 1 is punished less than one that
    # confuses it with the unrelated place 2.
    near = torch.tensor([[2.0, 2.0, 0.0]])
    far = torch.tensor([[2.0, 0.0, 2.0]])
    hard = batch_targets(torch.tensor([0]), torch.tensor([0, 1, 2]))
    assert symmetric_contrastive_loss(near, hard).item() == pytest.approx(
        symmetric_contrastive_loss(far, hard).item())
    assert symmetric_contrastive_loss(near, target) < symmetric_contrastive_loss(far, target)


def test_group_credit_from_shared_words_and_distance(tmp_path):
    pairs = pairs_from_gallery(toy_gallery(tmp_path / 'g', 0, colours={
        'red': COLOURS['red'], 'green': COLOURS['green']}))
    # {square, mostly, tile, painted} + the colour ('an image that is' are stop words): the
    # two places share 4 of 6 words.
    words = GroupCredit(pairs, min_jaccard=0.5)(np.array([0, 1]))
    assert words[0, 1] == pytest.approx(4 / 6) and words[0, 0] == 0.0
    assert GroupCredit(pairs, min_jaccard=0.9)(np.array([0, 1]))[0, 1] == 0.0
    # Place centres are ~75 m apart (0.001 deg of longitude per image at 47 N).
    near = GroupCredit(pairs, min_jaccard=1.0, radius_m=1000.0)(np.array([0, 1]))
    assert 0.8 < near[0, 1] < 1.0


def test_experts_route_each_image_to_its_platform_head():
    torch.manual_seed(0)
    heads = DualHeads(4, 3, dim=5, experts=['satellite', 'drone'],
                      expert_of={'satellite': 'satellite', 'drone': 'drone', 'ground': 'drone'})
    assert [heads.expert_index(p) for p in ('satellite', 'drone', 'ground')] == [0, 1, 1]
    features, experts = torch.randn(3, 4), torch.tensor([0, 1, 1])
    images = heads.images(features, experts)
    manual = torch.nn.functional.normalize(torch.stack([
        heads.image_heads['satellite'](features[0]), heads.image_heads['drone'](features[1]),
        heads.image_heads['drone'](features[2])]), dim=-1)
    torch.testing.assert_close(images, manual)
    texts = heads.texts(torch.randn(2, 3))            # (experts, texts, dim)
    sims = DualHeads.similarity(texts, images, experts)
    assert sims.shape == (2, 3)
    torch.testing.assert_close(sims[:, 0], texts[0] @ images[0])   # satellite expert's space
    torch.testing.assert_close(sims[:, 2], texts[1] @ images[2])   # drone expert's space


# ---------------------------------------------------------------------------- training

def test_training_lowers_the_loss_and_raises_recall(trained):
    out, result = trained
    history = result.history
    assert history[-1]['loss'] < 0.7 * history[0]['loss']
    before = result.card['val_before']['val']['r1']
    after = result.card['val']['val']['r1']
    # Held-out phrasings on other tiles: chance R@1 is 1/6.
    assert after >= 90.0 and after > before + 20.0
    card = json.loads((out / 'model_card.json').read_text())
    assert card['data']['places'] == 6 and card['epochs'] == 8
    assert '| val |' in (out / 'model_card.md').read_text()


def test_saved_model_answers_queries_through_the_engine(trained, toy, tmp_path):
    from cgrs_ros.engine.indexer import index_gallery
    from cgrs_ros.engine.retriever import Retriever

    out, _ = trained
    config = load_config(overrides={'image_encoder': {'backend': 'learned', 'model': str(out)},
                                    'retrieval.caption_weight': 0.0})
    gallery = toy_gallery(tmp_path / 'g', 7, descriptions=False)
    summary = index_gallery(gallery, config, progress=False)
    assert summary.images_embedded == 12 and summary.image_encoder.startswith('learned:')
    retriever = Retriever.open(gallery, config)
    try:
        for colour in ('red', 'blue', 'yellow'):
            top = retriever.query(f'fly to the {colour} place').candidates[0]
            assert top.group_id == colour
        assert retriever.stats()['image_encoder'].startswith('learned:')
    finally:
        retriever.close()


def test_learned_captioner_runs_cgrs_from_pixels(trained, tmp_path):
    # A gallery without descriptions: the trained model's caption bank writes captions from
    # the pixels (cgrs caption's real run), and the caption channel reranks with them.
    from cgrs_ros.engine.captioning import caption_status, run_captioning
    from cgrs_ros.engine.indexer import index_gallery
    from cgrs_ros.engine.retriever import Retriever

    out, _ = trained
    bank = json.loads((out / 'caption_bank.json').read_text())['texts']
    assert len(bank) == 18  # the toy set's distinct descriptions (fewer than caption_bank)
    config = load_config(overrides={
        'image_encoder': {'backend': 'learned', 'model': str(out)},
        'captioner': {'backend': 'learned', 'model': str(out)}})
    gallery = toy_gallery(tmp_path / 'g', 9, descriptions=False)
    assert caption_status(gallery, config).pending == 12
    summary = run_captioning(gallery, config)
    assert summary.captioned == 12 and not summary.failures
    index_gallery(gallery, config, progress=False)
    retriever = Retriever.open(gallery, config)
    try:
        for colour in ('green', 'white'):
            top = retriever.query(f'the {colour} place').candidates[0]
            assert top.group_id == colour
            assert colour in top.caption and top.caption_score is not None
    finally:
        retriever.close()


def test_platform_experts_train_and_serve_per_platform_queries(toy, tmp_path):
    from cgrs_ros.engine.encoders import LearnedDualEncoder

    cfg = load_train_config(None, dict(TINY, **{'train.epochs': 12, 'model.experts': True}))
    result = train_dual(load_training_pairs([toy['train']]), cfg, tmp_path / 'm',
                        [load_query_set(toy['val'])], cache_root=toy['cache'], progress=False)
    assert result.card['val']['val']['r1'] >= 80.0
    encoder = LearnedDualEncoder(str(tmp_path / 'm'))
    assert encoder.platform_experts
    per_platform = encoder.encode_texts_per_platform(['the red one'])
    assert per_platform.shape == (3, 1, 32)
    assert not np.allclose(per_platform[0], per_platform[1])      # satellite vs drone expert
    np.testing.assert_allclose(per_platform[1], per_platform[2])   # ground -> drone's expert
    with pytest.raises(ValueError, match='platform'):
        encoder.encode_images([Image.new('RGB', (64, 64))])
    # Through the engine: images indexed by their expert, the query scored by each.
    from cgrs_ros.engine.indexer import index_gallery
    from cgrs_ros.engine.retriever import Retriever
    config = load_config(overrides={'image_encoder': {'backend': 'learned',
                                                      'model': str(tmp_path / 'm')},
                                    'captioner': {'backend': 'none'}})
    gallery = toy_gallery(tmp_path / 'g', 5, descriptions=False)
    index_gallery(gallery, config, progress=False)
    retriever = Retriever.open(gallery, config)
    try:
        ranked = retriever.query('the yellow one', top_k=4).candidates
        assert {c.platform for c in ranked[:2]} == {'satellite', 'drone'}
        assert [c.group_id for c in ranked[:2]] == ['yellow', 'yellow']
    finally:
        retriever.close()


def test_cross_view_term_aligns_undescribed_drone_views_with_their_tiles(toy, tmp_path):
    """Drone views without descriptions are never seen by the text-image loss, so with
    platform experts their expert stays untrained; the cross-view term trains it against
    the satellite tiles, and drone -> satellite image queries find the right tile."""
    from cgrs_ros.engine.gallery import decode_image, load_gallery
    from cgrs_ros.engine.indexer import index_gallery
    from cgrs_ros.engine.retriever import Retriever

    def sat_described(folder, seed):
        toy_gallery(folder, seed)
        gallery = load_gallery(folder)
        write_manifest(folder, [dataclasses.replace(item, descriptions=()) if
                                item.platform == 'drone' else item for item in gallery.items])
        return folder

    train = sat_described(tmp_path / 'train', 11)
    test = sat_described(tmp_path / 'test', 12)
    r1, cards = {}, {}
    for on in (False, True):
        out = tmp_path / f'model-{on}'
        cfg = load_train_config(None, dict(TINY, **{
            'train.epochs': 15, 'model.experts': True, 'loss.cross_view.enabled': on,
            'train.select': 'cross_view'}))
        cards[on] = train_dual(load_training_pairs([train]), cfg, out,
                               [load_query_set(test)], cache_root=toy['cache'],
                               progress=False).card
        config = load_config(overrides={'image_encoder': {'backend': 'learned',
                                                          'model': str(out)},
                                        'captioner': {'backend': 'none'}},)
        state = tmp_path / f'state-{on}'
        index_gallery(test, config, state_dir=state, progress=False)
        retriever = Retriever.open(test, config, state_dir=state)
        gallery = load_gallery(test)
        try:
            drones = [item for item in gallery.items if item.platform == 'drone']
            hits = sum(retriever.query_image(decode_image(gallery.path_of(item)), top_k=1,
                                             platform='satellite').candidates[0].group_id
                       == item.group_id for item in drones)
        finally:
            retriever.close()
        r1[on] = 100.0 * hits / len(drones)
    assert r1[True] >= 80.0, r1
    assert r1[True] >= r1[False] + 30.0, r1
    # Validation measured the same drone -> satellite R@1 the engine gives (the held-out
    # gallery here), and train.select exported the epoch where it was best.
    card = cards[True]
    (name, val), = card['val'].items()
    assert abs(val['d2s_r1'] - r1[True]) <= 100.0 / len(drones) + 1e-6, (val, r1)
    history = {h['epoch']: h['val_d2s_r1'] for h in card['history']}
    assert history[card['exported_epoch']] == max(history.values())
    assert 'drone->satellite R@1' in (tmp_path / 'model-True' / 'model_card.md').read_text()


def test_attention_pooling_over_word_pieces_trains_and_serves(toy, tmp_path):
    from cgrs_ros.engine.encoders import LearnedDualEncoder

    cfg = load_train_config(None, dict(TINY, **{'train.epochs': 8,
                                                'model.text_pooling': 'attention'}))
    result = train_dual(load_training_pairs([toy['train']]), cfg, tmp_path / 'm',
                        [load_query_set(toy['val'])], cache_root=toy['cache'], progress=False)
    assert result.card['val']['val']['r1'] >= 90.0
    encoder = LearnedDualEncoder(str(tmp_path / 'm'))
    red, blue = (Image.new('RGB', (64, 64), COLOURS[c]) for c in ('red', 'blue'))
    images = encoder.encode_images([red, blue])
    query = encoder.encode_texts(['please fly to the red place'])
    assert (query @ images.T)[0, 0] > (query @ images.T)[0, 1]


def test_hard_negative_stage_and_soft_labels_run(toy, tmp_path):
    cfg = load_train_config(None, dict(TINY, **{
        'train.epochs': 3, 'loss.hard_negatives.enabled': True,
        'loss.hard_negatives.start_epoch': 2, 'loss.hard_negatives.neighbours': 2,
        'loss.soft_labels.enabled': True, 'loss.soft_labels.radius_m': 200.0}))
    result = train_dual(load_training_pairs([toy['train']]), cfg, tmp_path / 'm',
                        [load_query_set(toy['val'])], cache_root=toy['cache'], progress=False)
    assert [h['stage'] for h in result.history] == [1, 2, 2]
    assert result.history[-1]['loss'] < result.history[0]['loss']


def test_seed_makes_training_deterministic(toy, tmp_path):
    cfg = load_train_config(None, dict(TINY, **{'train.epochs': 2}))
    pairs = load_training_pairs([toy['train']])
    a = train_dual(pairs, cfg, tmp_path / 'a', cache_root=toy['cache'], progress=False)
    b = train_dual(pairs, cfg, tmp_path / 'b', cache_root=toy['cache'], progress=False)
    assert [h['loss'] for h in a.history] == [h['loss'] for h in b.history]


# ---------------------------------------------------------------------------- resume

def _cgrs(*args, **kwargs):
    return subprocess.Popen([sys.executable, '-m', 'cgrs_ros.cli', *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_a_checkpoint_interrupted_between_weights_and_json_keeps_the_previous_one(
        tmp_path, monkeypatch):
    """Killed after the new weights are written but before the JSON: the JSON still names the
    previous epoch's weights, so a resume restarts from a consistent epoch."""
    from cgrs_ros.engine.learning import trainer

    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    trainer.save_checkpoint(tmp_path, module, optimizer, {'epoch': 1})
    first = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        module.weight.add_(1.0)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt('killed while writing the JSON')
    monkeypatch.setattr(trainer, 'atomic_write_json', killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(tmp_path, module, optimizer, {'epoch': 2})
    monkeypatch.undo()
    model, _, info = trainer.load_checkpoint(tmp_path)
    assert info['epoch'] == 1
    assert torch.equal(model['weight'], first['weight'])
    trainer.save_checkpoint(tmp_path, module, optimizer, {'epoch': 2})
    model, _, info = trainer.load_checkpoint(tmp_path)
    assert info['epoch'] == 2 and torch.equal(model['weight'], module.weight.detach())
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == [
        'last-e2.safetensors', 'last.json']


def test_resume_after_sigkill_matches_an_uninterrupted_run(toy, tmp_path):
    config = tmp_path / 'train.yaml'
    settings = dict(TINY, **{'train.epochs': 40})
    config.write_text(json.dumps(_nest(settings)))
    common = [toy['train'], '--config', config, '--cache', toy['cache']]
    killed = _cgrs('train', 'dual', *common, '--out', tmp_path / 'killed', '--quiet')
    last = tmp_path / 'killed' / 'checkpoints' / 'last.json'
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and killed.poll() is None:
        if last.is_file() and json.loads(last.read_text())['epoch'] >= 3:
            break
        time.sleep(0.05)
    assert killed.poll() is None, f'training ended before it could be killed: {killed.stderr}'
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    stopped_at = json.loads(last.read_text())['epoch']
    assert stopped_at < 40
    resumed = _cgrs('train', 'dual', *common, '--out', tmp_path / 'killed', '--json')
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f'resuming from the checkpoint of epoch {stopped_at}' in err
    card = json.loads(out)
    whole = _cgrs('train', 'dual', *common, '--out', tmp_path / 'whole', '--json', '--quiet')
    out_whole, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    full = json.loads(out_whole)
    next_epoch = stopped_at + 1
    resumed_loss = next(h['loss'] for h in card['history'] if h['epoch'] == next_epoch)
    whole_loss = next(h['loss'] for h in full['history'] if h['epoch'] == next_epoch)
    assert resumed_loss == pytest.approx(whole_loss, rel=1e-5)
    assert card['epochs'] == full['epochs'] == 40


def _nest(dotted):
    out = {}
    for key, value in dotted.items():
        section, name = key.split('.', 1)
        out.setdefault(section, {})[name] = value
    return out


# ---------------------------------------------------------------------------- open_clip

def test_open_clip_fine_tune_with_lit_lock_loads_as_local_dir(toy, tiny_open_clip_dir,
                                                              tmp_path):
    from cgrs_ros.engine.encoders import OpenClipEncoder

    cfg = load_train_config(None, {
        'model': {'backend': 'open_clip', 'name': f'local-dir:{tiny_open_clip_dir}',
                  'lock_image': True, 'unlocked_image_groups': 0},
        'train': {'epochs': 3, 'batch_size': 12, 'lr': 1e-3, 'threads': 1}})
    pairs = load_training_pairs([toy['train']])
    result = train_dual(pairs, cfg, tmp_path / 'clip', [load_query_set(toy['val'])],
                        cache_root=toy['cache'], progress=False)
    assert result.history[-1]['loss'] < result.history[0]['loss']
    # The image tower stayed locked: its weights are those of the source checkpoint.
    from safetensors.torch import load_file
    before = load_file(str(tiny_open_clip_dir / 'open_clip_model.safetensors'))
    after = load_file(str(tmp_path / 'clip' / 'open_clip_model.safetensors'))
    visual = [k for k in before if k.startswith('visual.')]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(
        'transformer.'))
    encoder = OpenClipEncoder(f'local-dir:{tmp_path / "clip"}')
    assert encoder.encode_texts(['a red square']).shape == (1, 32)


def test_geotext_annotations_train_with_the_building_as_place(tmp_path, toy):
    # GeoText-1652 layout: image_id "0001/image-01.jpeg", the first four characters name the
    # building; captions are strings (train split). Images are the toy tiles, renamed.
    root = tmp_path / 'images'
    entries = []
    for b, colour in enumerate(('red', 'green', 'blue'), start=1):
        for k in range(2):
            image_id = f'{b:04d}/image-{k + 1:02d}.jpeg'
            path = root / image_id
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.open(toy['train'] / 'images' / f'{colour}_{k}.png').convert('RGB').save(path)
            entries.append({'image_id': image_id, 'image': f'train/{image_id}',
                            'caption': f'a {colour} square seen from a drone'})
    ann = tmp_path / 'train.json'
    ann.write_text(json.dumps(entries))
    pairs = load_training_pairs(geotext=ann, images_root=root)
    assert len(pairs.groups) == 3 and set(pairs.image_platforms) == {'drone'}
    assert sorted(pairs.groups) == ['geotext/0001', 'geotext/0002', 'geotext/0003']
    cfg = load_train_config(None, dict(TINY, **{'train.epochs': 2}))
    result = train_dual(pairs, cfg, tmp_path / 'm', cache_root=toy['cache'], progress=False)
    assert result.card['data']['places'] == 3
    with pytest.raises(GalleryError, match='--images'):
        load_training_pairs(geotext=ann)


# ---------------------------------------------------------------------------- bad input

def test_bad_training_rows_are_skipped_and_reported(toy, tmp_path):
    import shutil
    folder = tmp_path / 'g'
    shutil.copytree(toy['train'], folder)
    with open(folder / 'gallery.csv', 'a') as handle:
        handle.write('ghost,images/ghost.png,47.0,8.0,400,0,drone,ghost,a ghost tile\n')
    pairs = load_training_pairs([folder])
    assert len(pairs.groups) == 6 and len(pairs.problems) == 1
    assert 'line 14' in pairs.problems[0] and 'ghost.png' in pairs.problems[0]


def test_gallery_without_descriptions_is_refused_with_the_fix(tmp_path):
    gallery = toy_gallery(tmp_path / 'g', 0, descriptions=False)
    with pytest.raises(GalleryError, match='no descriptions to learn from.*description column'):
        load_training_pairs([gallery])


def test_validation_sets_from_queries_or_descriptions(toy, tmp_path):
    by_folder = load_query_set(toy['val'])
    by_csv = load_query_set(toy['val'] / 'queries.csv')
    assert by_folder.queries == by_csv.queries and len(by_folder.queries) == 12
    assert by_folder.queries[0] == 'take me to the red one'
    # Without a queries.csv the gallery's own descriptions are the queries.
    described = load_query_set(toy['train'])
    assert len(described.queries) == 36 and described.query_groups[0] == 'red'
    with pytest.raises(GalleryError, match='neither queries.csv nor descriptions'):
        load_query_set(toy_gallery(tmp_path / 'bare', 0, descriptions=False))


def test_one_place_only_is_refused(tmp_path):
    gallery = toy_gallery(tmp_path / 'g', 0, colours={'red': COLOURS['red']})
    with pytest.raises(GalleryError, match='only one place'):
        load_training_pairs([gallery])


def test_nan_loss_stops_and_names_the_step(toy, tmp_path):
    # A NaN in the (cached) text features of one description poisons the loss at once.
    from cgrs_ros.engine.learning.backends import text_features
    from cgrs_ros.engine.storage import EmbeddingStore, sha256_text

    cache = tmp_path / 'cache'
    pairs = load_training_pairs([toy['train']])
    _, identity = text_features(pairs.texts[:1], 'all-MiniLM-L6-v2', cache)
    store = EmbeddingStore.for_encoder(cache, 'text', identity)
    store.add([sha256_text(t) for t in pairs.texts], np.full((len(pairs.texts), 384), np.nan))
    cfg = load_train_config(None, dict(TINY, **{'train.epochs': 2}))
    with pytest.raises(TrainingError, match=r'loss became nan at epoch 1, step 1; lower train.lr'):
        train_dual(pairs, cfg, tmp_path / 'm', cache_root=cache, progress=False)


def test_checkpoint_of_another_run_is_not_resumed(toy, tmp_path):
    pairs = load_training_pairs([toy['train']])
    train_dual(pairs, load_train_config(None, dict(TINY, **{'train.epochs': 1})), tmp_path,
               cache_root=toy['cache'], progress=False)
    other = load_train_config(None, dict(TINY, **{'train.epochs': 1, 'model.dim': 16}))
    with pytest.raises(TrainingError, match='another run.*--restart'):
        train_dual(pairs, other, tmp_path, cache_root=toy['cache'], progress=False)


def test_bad_train_config_names_the_key(tmp_path):
    path = tmp_path / 'train.yaml'
    path.write_text('loss:\n  temprature: 0.1\n')
    with pytest.raises(ConfigError, match='loss.temprature: unknown key'):
        load_train_config(path)


def test_learned_backend_without_a_model_folder_says_how_to_make_one(tmp_path):
    from cgrs_ros.engine.encoders import image_encoder_identity
    from cgrs_ros.engine.errors import ModelLoadError

    config = load_config(overrides={'image_encoder': {'backend': 'learned',
                                                      'model': str(tmp_path)}})
    with pytest.raises(ModelLoadError, match='cgrs train dual'):
        image_encoder_identity(config.image_encoder)


def test_damaged_model_folder_names_the_file(trained, tmp_path):
    import shutil

    from cgrs_ros.engine.captioners import make_captioner
    from cgrs_ros.engine.encoders import LearnedDualEncoder
    from cgrs_ros.engine.errors import ModelLoadError

    out, _ = trained
    broken = tmp_path / 'broken'
    shutil.copytree(out, broken, ignore=shutil.ignore_patterns('checkpoints'))
    (broken / 'caption_bank.json').write_text('{"texts": ')
    with pytest.raises(ModelLoadError, match='caption_bank.json cannot be read.*retrain'):
        make_captioner({'backend': 'learned', 'model': str(broken)})
    (broken / 'heads.safetensors').write_bytes(b'not safetensors')
    with pytest.raises(ModelLoadError, match='heads.safetensors does not hold the heads'):
        LearnedDualEncoder(str(broken))


def test_cli_train_reports_the_model_and_how_to_use_it(toy, tmp_path):
    config = tmp_path / 'train.yaml'
    config.write_text(json.dumps(_nest(dict(TINY, **{'train.epochs': 2,
                                                     'model.weights_dtype': 'float16'}))))
    proc = _cgrs('train', 'dual', toy['train'], '--val', toy['val'], '--config', config,
                 '--cache', toy['cache'], '--out', tmp_path / 'm', '--quiet',
                 env=dict(os.environ))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert 'use it: image_encoder: {backend: learned, model: ' in out
    assert 'val val: R@1' in out
    # float16 heads load back as float32 and encode.
    from cgrs_ros.engine.encoders import LearnedDualEncoder
    encoder = LearnedDualEncoder(str(tmp_path / 'm'))
    assert encoder.encode_texts(['a red square']).dtype == np.float32
