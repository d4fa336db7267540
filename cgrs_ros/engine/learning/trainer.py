"""The train loop of ``cgrs train dual``: batches of places, checkpoints, resume, model card.

Batches are built from places, not rows: ``batch_size / images_per_place`` places per batch,
up to ``images_per_place`` images of each and one of each image's texts, so every batch has
multi-positives (the group-aware loss needs them). Stage one draws places at random; stage two
(``loss.hard_negatives``) fills each batch with clusters: a place and the wrong places the
current model confuses it with most (mined every ``refresh_every`` epochs), plus places within
``geo_radius_m`` of it (Sample4Geo's geographic hard negatives).

Each epoch ends with validation (text->image Recall@1/5/10 at place level, on galleries and
phrasings not trained on) and a checkpoint (``OUT/checkpoints/last.*``: model, optimizer,
history, all tensors in safetensors, the rest in JSON; no pickle). A killed run restarts from
the last checkpoint; sampling and dropout are seeded per epoch from ``train.seed``, so a
resumed run continues exactly as an uninterrupted one would. Validation galleries with drone
and satellite images also report drone->satellite R@1/5 (image queries, localization). The
exported model is the epoch with the best validation figure ``train.select`` names
(text->image R@1 by default; ``cross_view``: drone->satellite R@1; ``both``: their mean), or
the last epoch without validation.
"""

import dataclasses
import datetime
import hashlib
import json
import math
from pathlib import Path
import re
import time

from cgrs_ros.engine.errors import CgrsError
from cgrs_ros.engine.evaluation.metrics import t2i_from_scores
from cgrs_ros.engine.learning.backends import default_cache_root, make_backend
from cgrs_ros.engine.learning.data import GroupCredit
from cgrs_ros.engine.learning.heads import DualHeads
from cgrs_ros.engine.learning.losses import batch_targets, symmetric_contrastive_loss
from cgrs_ros.engine.query_norm import remove_command_words
from cgrs_ros.engine.storage import atomic_replace, atomic_write_json, atomic_write_text
import numpy as np
import torch
from tqdm import tqdm

CHECKPOINT_DIR = 'checkpoints'


class TrainingError(CgrsError):
    """Training cannot go on (NaN loss, out of memory, a checkpoint of another run)."""


@dataclasses.dataclass
class TrainResult:
    """What a training run did."""

    out_dir: Path
    epochs: int
    best_epoch: int
    history: list
    resumed_from: int
    card: dict


def _fingerprint(cfg, pairs):
    """Hash of the config and data a checkpoint belongs to (resume refuses another run's).

    Settings that may change between a run and its resumption (epochs to reach, device,
    threads) are left out.
    """
    settings = cfg.model_dump(mode='json')
    for key in ('epochs', 'device', 'threads'):
        settings['train'].pop(key)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update('\n'.join(pairs.image_paths).encode())
    digest.update(str(len(pairs.texts)).encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- sampling

class PlaceSampler:
    """Batches of (image, text) pairs grouped by place (see the module docstring)."""

    def __init__(self, pairs, batch_size, images_per_place, all_views=False):
        self.images_per_place = images_per_place
        # all_views (the cross-view loss): every image of a chosen place joins the batch,
        # with or without a text, so each drone view meets its satellite tile.
        self.all_views = all_views
        self.places_per_batch = max(2, batch_size // images_per_place)
        groups = np.asarray(pairs.image_groups, dtype=np.int64)
        self.n_groups = len(pairs.groups)
        self.place_images = [np.flatnonzero(groups == g) for g in range(self.n_groups)]
        text_images = np.asarray(pairs.text_images, dtype=np.int64)
        order = np.argsort(text_images, kind='stable')
        bounds = np.searchsorted(text_images[order], np.arange(len(pairs.image_paths) + 1))
        self.image_texts = [order[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]
        self.texted = [np.array([i for i in imgs if len(self.image_texts[i])], dtype=np.int64)
                       for imgs in self.place_images]
        self.usable = np.array([g for g in range(self.n_groups) if len(self.texted[g])])
        self.steps = max(1, math.ceil(len(pairs.texts) / batch_size))
        self.neighbours = None  # stage two: (n_groups, k) mined wrong places

    def _pairs_of(self, places, rng):
        images, texts = [], []
        for g in places:
            imgs = self.texted[g]
            take = rng.choice(imgs, size=min(self.images_per_place, len(imgs)), replace=False)
            for i in take:
                images.append(int(i))
                texts.append(int(rng.choice(self.image_texts[i])))
            if self.all_views:
                images += [int(i) for i in self.place_images[g] if int(i) not in take]
        return np.array(images), np.array(texts)

    def _clustered(self, rng):
        """Places for one stage-two batch: seeds, each followed by its mined neighbours."""
        chosen, seen = [], set()
        while len(chosen) < self.places_per_batch:
            seed = int(rng.choice(self.usable))
            for g in [seed, *self.neighbours[seed].tolist()]:
                if g >= 0 and g not in seen and len(self.texted[g]):
                    chosen.append(g)
                    seen.add(g)
                    if len(chosen) >= self.places_per_batch:
                        break
        return chosen

    def epoch(self, rng):
        """Yield (image index, text index) arrays for one epoch."""
        order = rng.permutation(self.usable)
        pos = 0
        for _ in range(self.steps):
            if self.neighbours is not None:
                places = self._clustered(rng)
            else:
                if pos + self.places_per_batch > len(order):
                    order, pos = rng.permutation(self.usable), 0
                places = order[pos:pos + self.places_per_batch]
                pos += self.places_per_batch
            yield self._pairs_of(places, rng)


# ----------------------------------------------------------------------------- mining & eval

@torch.no_grad()
def _embed_all(backend, n_images, n_texts, chunk=4096):
    images = torch.cat([backend.images(torch.arange(s, min(s + chunk, n_images)))
                        for s in range(0, n_images, chunk)])
    texts = torch.cat([backend.texts(torch.arange(s, min(s + chunk, n_texts)))
                       for s in range(0, n_texts, chunk)], dim=1)
    return images, texts


@torch.no_grad()
def mine_neighbours(backend, pairs, k, geo_radius_m=0.0):
    """For every place, the ``k`` wrong places whose images its texts score highest.

    A place's texts are averaged per expert; each other place scores by its best image. Places
    within ``geo_radius_m`` in the same town come first (Sample4Geo). Returns (G, k) int64, -1
    where a place has fewer neighbours.
    """
    backend.module.eval()
    n_groups = len(pairs.groups)
    images, texts = _embed_all(backend, len(pairs.image_paths), len(pairs.texts))
    experts = backend.expert_ids(torch.arange(len(pairs.image_paths)))
    text_groups = torch.from_numpy(pairs.text_groups).to(texts.device)
    image_groups = torch.as_tensor(pairs.image_groups, dtype=torch.int64)
    # Place centroids of the texts, per expert: (E, G, d).
    sums = torch.zeros(texts.shape[0], n_groups, texts.shape[2], device=texts.device)
    sums.index_add_(1, text_groups, texts)
    centroids = torch.nn.functional.normalize(sums, dim=-1)
    out = np.full((n_groups, k), -1, dtype=np.int64)
    en = np.array([p if p is not None else (np.nan, np.nan) for p in pairs.group_en])
    towns = np.array(pairs.group_town)
    for start in range(0, n_groups, 512):
        block = slice(start, min(start + 512, n_groups))
        sims = DualHeads.similarity(centroids[:, block], images, experts).cpu()  # (g, n_img)
        best = torch.full((sims.shape[0], n_groups), -float('inf'))
        best = best.scatter_reduce(1, image_groups.expand(sims.shape[0], -1), sims, 'amax')
        rows = torch.arange(block.start, block.stop)
        best[torch.arange(len(rows)), rows] = -float('inf')
        top = best.topk(min(k, n_groups - 1), dim=1).indices.numpy()
        for r, g in enumerate(rows.tolist()):
            near = []
            if geo_radius_m > 0 and np.isfinite(en[g]).all():
                dist = np.hypot(en[:, 0] - en[g, 0], en[:, 1] - en[g, 1])
                cand = np.flatnonzero((towns == towns[g]) & (dist < geo_radius_m))
                near = [int(c) for c in cand[np.argsort(dist[cand])] if c != g]
            merged = list(dict.fromkeys(near + top[r].tolist()))[:k]
            out[g, :len(merged)] = merged
    return out


@torch.no_grad()
def evaluate_query_set(backend, query_set, inputs=None):
    """Text->image place-level Recall@1/5/10 of a :class:`QuerySet` (percent).

    ``inputs``: the set's frozen features from ``backend.encode_extra`` when already computed.
    """
    backend.module.eval()
    feats, experts, texts = inputs or backend.encode_extra(
        query_set.image_paths, query_set.image_platforms, query_set.queries)
    images = backend.images(None, feats, experts)
    text_emb = backend.texts(None, texts)
    sims = DualHeads.similarity(text_emb, images, experts)
    result = t2i_from_scores(sims.cpu().numpy(), query_set.query_groups,
                             query_set.image_groups)
    out = {f'r{k}': round(result.recall(k), 2) for k in (1, 5, 10)}
    platforms = np.asarray(query_set.image_platforms)
    drone, satellite = platforms == 'drone', platforms == 'satellite'
    if drone.any() and satellite.any():
        # The cross-view direction image queries and localization use: each drone image
        # ranks the satellite images, a hit when the top one shows its place.
        groups = np.asarray(query_set.image_groups)
        rows = images.cpu().numpy()
        d2s = t2i_from_scores(rows[drone] @ rows[satellite].T, groups[drone].tolist(),
                              groups[satellite].tolist())
        out.update({f'd2s_r{k}': round(d2s.recall(k), 2) for k in (1, 5)})
    return out


def _mean_recalls(val):
    """Return val_r1 (text->image) and, when measured, val_d2s_r1, averaged over the sets."""
    out = {'val_r1': round(float(np.mean([v['r1'] for v in val.values()])), 2)}
    d2s = [v['d2s_r1'] for v in val.values() if 'd2s_r1' in v]
    if d2s:
        out['val_d2s_r1'] = round(float(np.mean(d2s)), 2)
    return out


def _selection_score(entry, select):
    """Return the validation figure ``train.select`` exports the best epoch by."""
    text = entry.get('val_r1', 0.0)
    if select == 'text':
        return text
    if 'val_d2s_r1' not in entry:
        return text if 'val_r1' in entry else 0.0
    return entry['val_d2s_r1'] if select == 'cross_view' else (text + entry['val_d2s_r1']) / 2


# ----------------------------------------------------------------------------- checkpoints

def _flatten_optimizer(state):
    tensors, meta = {}, {'param_groups': state['param_groups'], 'state': {}}
    for pid, values in state['state'].items():
        meta['state'][str(pid)] = {}
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f'opt.{pid}.{name}'] = value.contiguous()
            else:
                meta['state'][str(pid)][name] = value
    return tensors, meta


def _unflatten_optimizer(tensors, meta):
    state = {}
    for pid, values in meta['state'].items():
        state[int(pid)] = dict(values)
    for key, value in tensors.items():
        if key.startswith('opt.'):
            _, pid, name = key.split('.', 2)
            state.setdefault(int(pid), {})[name] = value
    return {'state': state, 'param_groups': meta['param_groups']}


def save_checkpoint(out_dir, module, optimizer, info, name='last'):
    """Write ``checkpoints/<name>-e<epoch>.safetensors`` (model + optimizer), then ``<name>.json``.

    The JSON names its weights file and is replaced last, so a run killed at any point leaves
    a JSON whose weights are the ones it describes (the previous epoch's until the new JSON is
    in place); weights files no JSON names any more are removed afterwards.
    """
    from safetensors.torch import save_file

    folder = Path(out_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f'model.{k}': v.detach().contiguous().cpu()
               for k, v in module.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    weights = f'{name}-e{info["epoch"]}.safetensors'
    with atomic_replace(folder / weights) as tmp:
        save_file(tensors, tmp)
    atomic_write_json(folder / f'{name}.json', dict(info, optimizer=opt_meta, weights=weights))
    for stale in folder.glob(f'{name}*.safetensors'):
        if stale.name != weights and re.fullmatch(rf'{name}(-e\d+)?\.safetensors', stale.name):
            stale.unlink(missing_ok=True)


def load_checkpoint(out_dir, name='last'):
    """Return (model state, optimizer state, info) of a checkpoint, or None when absent."""
    from safetensors.torch import load_file

    folder = Path(out_dir) / CHECKPOINT_DIR
    meta_path = folder / f'{name}.json'
    if not meta_path.is_file():
        return None
    weights = folder / f'{name}.safetensors'  # checkpoints written before the JSON named it
    try:
        info = json.loads(meta_path.read_text(encoding='utf-8'))
        weights = folder / Path(info.pop('weights', weights.name)).name
        if not weights.is_file():
            return None
        tensors = load_file(str(weights))
    except Exception as exc:  # a damaged file: say which and how to get past it
        raise TrainingError(f'checkpoint {weights} cannot be read ({exc}); delete '
                            f'{folder} to start over, or pass --restart') from None
    model = {k[len('model.'):]: v for k, v in tensors.items() if k.startswith('model.')}
    optimizer = _unflatten_optimizer(tensors, info.pop('optimizer'))
    return model, optimizer, info


# ----------------------------------------------------------------------------- the loop

def _is_oom(exc):
    # CUDA says "out of memory"; torch's CPU allocator "can't allocate memory".
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or 'out of memory' in text or (
        "can't allocate memory" in text) or (
        hasattr(torch, 'OutOfMemoryError') and isinstance(exc, torch.OutOfMemoryError))


def train_dual(pairs, cfg, out_dir, val_sets=(), cache_root=None, restart=False,
               progress=True, log=None):
    """Train a dual encoder on ``pairs`` (a checked PairSet); returns a :class:`TrainResult`.

    ``val_sets`` are QuerySets scored after every epoch. ``log(message)`` receives progress
    lines (default: print to stderr when ``progress``).
    """
    import sys
    say = log or ((lambda m: print(m, file=sys.stderr, flush=True)) if progress
                  else (lambda m: None))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    descriptions = list(pairs.texts)
    if tc.text_views == 'clauses':
        pairs = pairs.with_clause_views()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    backend = make_backend(cfg, pairs.image_platforms, cache_root or default_cache_root(), say)
    backend.set_data(pairs.image_paths, pairs.image_platforms, pairs.texts)
    module = backend.module
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise TrainingError('nothing to train: every parameter is locked; unlock layers '
                            '(model.lock_text: false or model.unlocked_*) and run again')
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sampler = PlaceSampler(pairs, tc.batch_size, tc.images_per_place,
                           all_views=cfg.loss.cross_view.enabled)
    soft = cfg.loss.soft_labels
    credit = (GroupCredit(pairs, soft.min_jaccard, soft.radius_m) if soft.enabled else None)
    hard = cfg.loss.hard_negatives
    fingerprint = _fingerprint(cfg, pairs)

    history, start_epoch, resumed_from, best, val_before = [], 1, 0, None, {}
    checkpoint = None if restart else load_checkpoint(out)
    if checkpoint is not None:
        model_state, opt_state, info = checkpoint
        if info.get('fingerprint') != fingerprint:
            raise TrainingError(
                f'{out} holds a checkpoint of another run (different config or data); pass '
                '--restart to overwrite it or choose another --out')
        module.load_state_dict(model_state)
        optimizer.load_state_dict(opt_state)
        history, best, val_before = info['history'], info.get('best'), info.get('val_before')
        start_epoch = resumed_from = info['epoch'] + 1
        if start_epoch > tc.epochs:
            raise TrainingError(f'{out} already holds a finished run of {tc.epochs} epochs; '
                                'raise train.epochs to continue it, or pass --restart')
        say(f'resuming from the checkpoint of epoch {info["epoch"]} in {out / CHECKPOINT_DIR}')

    # Validation queries go through the engine's default query normalization (a spoken
    # command such as "fly to" is dropped), as they will at query time.
    val_inputs = [backend.encode_extra(q.image_paths, q.image_platforms,
                                       [remove_command_words(t) for t in q.queries])
                  for q in val_sets]

    def validate():
        return {q.name: evaluate_query_set(backend, q, inputs)
                for q, inputs in zip(val_sets, val_inputs)}

    if val_sets and checkpoint is None:
        val_before = validate()  # the untrained model, so the card shows what training added
    started = time.perf_counter()
    # The progress bar shows the last validation R@1 beside the running loss.
    last_val = {'val_r1': history[-1]['val_r1']} if history and 'val_r1' in history[-1] else {}
    for epoch in range(start_epoch, tc.epochs + 1):
        rng = np.random.default_rng([tc.seed, epoch])
        torch.manual_seed(tc.seed * 100003 + epoch)
        stage = 2 if hard.enabled and epoch >= hard.start_epoch else 1
        if stage == 2 and ((epoch - hard.start_epoch) % hard.refresh_every == 0
                           or sampler.neighbours is None):
            sampler.neighbours = mine_neighbours(backend, pairs, hard.neighbours,
                                                 hard.geo_radius_m)
        module.train()
        t0 = time.perf_counter()
        losses, n_pairs = [], 0
        bar = tqdm(sampler.epoch(rng), total=sampler.steps, desc=f'epoch {epoch}/{tc.epochs}',
                   unit='batch', disable=not progress, leave=False)
        for step, (img_idx, txt_idx) in enumerate(bar, start=1):
            try:
                loss = _step(backend, pairs, img_idx, txt_idx, credit, soft.weight,
                             cfg.loss.cross_view)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f'the loss became {loss.item()} at epoch {epoch}, step {step}; lower '
                        f'train.lr (now {tc.lr}) or raise loss.temperature, then run again '
                        f'with --restart')
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 diverges
                    backend.logit_scale.clamp_(0.0, math.log(100.0))
            except (RuntimeError, MemoryError) as exc:
                if _is_oom(exc):
                    raise TrainingError(
                        f'a batch of {tc.batch_size} ran out of memory at epoch {epoch}, step '
                        f'{step}; lower train.batch_size (or model.image_size)') from None
                raise
            losses.append(loss.item())
            n_pairs += len(img_idx)
            bar.set_postfix(loss=f'{np.mean(losses[-20:]):.4f}', **last_val)
        bar.close()
        seconds = time.perf_counter() - t0
        entry = {'epoch': epoch, 'stage': stage, 'loss': round(float(np.mean(losses)), 6),
                 'seconds': round(seconds, 2), 'pairs_per_s': round(n_pairs / seconds, 1),
                 'temperature': round(float(1.0 / backend.logit_scale.detach().exp()), 5)}
        if val_sets:
            entry['val'] = validate()
            entry.update(_mean_recalls(entry['val']))
            last_val = {'val_r1': entry['val_r1']}
        history.append(entry)
        score = _selection_score(entry, tc.select)
        improved = best is None or score >= best.get('score', best['val_r1'])
        if improved:
            best = {'epoch': epoch, 'val_r1': entry.get('val_r1', 0.0), 'score': score}
        info = {'epoch': epoch, 'fingerprint': fingerprint, 'history': history, 'best': best,
                'val_before': val_before}
        if improved:
            save_checkpoint(out, module, optimizer, info, 'best')
        save_checkpoint(out, module, optimizer, info, 'last')
        val_text = f', val R@1 {entry["val_r1"]}' if 'val_r1' in entry else ''
        if 'val_d2s_r1' in entry:
            val_text += f', drone->satellite R@1 {entry["val_d2s_r1"]}'
        say(f'epoch {epoch}/{tc.epochs} (stage {stage}): loss {entry["loss"]:.4f}{val_text}, '
            f'{entry["pairs_per_s"]:.0f} pairs/s, {seconds:.1f} s')

    # Export the best epoch's weights.
    best_state = load_checkpoint(out, 'best') if best else None
    if best_state is not None:
        module.load_state_dict(best_state[0])
    module.eval()
    card = model_card(cfg, pairs, val_sets, history, best, time.perf_counter() - started,
                      val_before)
    backend.export(out, {'card': 'model_card.json'})
    if cfg.model.backend == 'lite0_minilm' and cfg.model.caption_bank:
        write_caption_bank(out, descriptions, cfg.model.caption_bank, tc.seed)
    atomic_write_json(out / 'model_card.json', card)
    atomic_write_text(out / 'model_card.md', format_card(card))
    return TrainResult(out, len(history), best['epoch'] if best else len(history), history,
                       resumed_from, card)


def write_caption_bank(out_dir, texts, size, seed):
    """Keep up to ``size`` distinct training descriptions (seeded sample) for captioning."""
    from cgrs_ros.engine.captioners.learned_backend import CAPTION_BANK

    unique = sorted(set(texts))
    if len(unique) > size:
        keep = np.random.default_rng([seed, 7]).choice(len(unique), size, replace=False)
        unique = [unique[i] for i in sorted(keep)]
    atomic_write_json(Path(out_dir) / CAPTION_BANK, {'texts': unique})


def _step(backend, pairs, img_idx, txt_idx, credit, soft_weight, cross_view=None):
    """Loss of one batch (text-image, plus the cross-view image-image term when enabled)."""
    img_t = torch.from_numpy(img_idx)
    txt_t = torch.from_numpy(txt_idx)
    images = backend.images(img_t)
    texts = backend.texts(txt_t)
    sims = DualHeads.similarity(texts, images, backend.expert_ids(img_t))
    image_groups = np.asarray(pairs.image_groups)[img_idx]
    text_groups = pairs.text_groups[txt_idx]
    places, local = np.unique(np.concatenate([text_groups, image_groups]), return_inverse=True)
    t_local = torch.from_numpy(local[:len(text_groups)])
    i_local = torch.from_numpy(local[len(text_groups):])
    credit_matrix = torch.from_numpy(credit(places)) if credit is not None else None
    target = batch_targets(t_local, i_local, credit_matrix, soft_weight).to(sims.device)
    loss = symmetric_contrastive_loss(backend.logit_scale.exp() * sims, target)
    if cross_view is not None and cross_view.enabled and cross_view.weight > 0:
        loss = loss + cross_view.weight * _cross_view_loss(backend, pairs, img_idx, images,
                                                           i_local)
    return loss


def _cross_view_loss(backend, pairs, img_idx, images, groups):
    """Sample4Geo's symmetric InfoNCE between the batch's satellite and other images.

    Each drone/ground image's positives are the satellite tiles of its place in the batch
    (each image embedded by its own platform's expert); the other tiles are negatives, and
    with ``hard_negatives.geo_radius_m`` the mined batches put neighbouring places' tiles in
    them, as Sample4Geo's GPS-based sampling does. Rows or columns without a positive in the
    batch are left out; a batch without both kinds of image adds nothing.
    """
    platforms = np.asarray(pairs.image_platforms)[img_idx]
    sat = torch.from_numpy(platforms == 'satellite')
    if not sat.any() or sat.all():
        return images.sum() * 0.0
    target = (groups[~sat][:, None] == groups[sat][None, :]).float().to(images.device)
    if not target.any():
        return images.sum() * 0.0
    sims = images[~sat] @ images[sat].t()
    return symmetric_contrastive_loss(backend.logit_scale.exp() * sims, target)


SELECT_LABELS = {'text': 'text->image R@1', 'cross_view': 'drone->satellite R@1',
                 'both': 'mean of text->image and drone->satellite R@1'}


def model_card(cfg, pairs, val_sets, history, best, seconds, val_before=None):
    """Return the model card: data, loss, epochs, validation recall, date."""
    last = history[-1]
    best_entry = next((h for h in history if best and h['epoch'] == best['epoch']), last)
    platforms = {p: pairs.image_platforms.count(p) for p in sorted(set(pairs.image_platforms))}
    return {
        'model': cfg.model.model_dump(mode='json'),
        'data': {'sources': pairs.sources, 'images': len(pairs.image_paths),
                 'texts': len(pairs.texts), 'places': len(pairs.groups),
                 'platforms': platforms},
        'validation': {'sets': [q.name for q in val_sets],
                       'queries': {q.name: len(q.queries) for q in val_sets},
                       'metric': 'text->image Recall@K at place level, percent',
                       'select': cfg.train.select},
        'loss': cfg.loss.model_dump(mode='json'),
        'train': cfg.train.model_dump(mode='json'),
        'epochs': last['epoch'],
        'exported_epoch': best_entry['epoch'],
        'val': best_entry.get('val', {}),
        'val_before': val_before or {},
        'history': history,
        'train_seconds_this_run': round(seconds, 1),
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    }


def format_card(card):
    """Return the model card as Markdown."""
    data = card['data']
    lines = [
        '# cgrs model card', '',
        f'- date: {card["date"]}',
        f'- model: {card["model"]["backend"]} (dim {card["model"]["dim"]}, hidden '
        f'{card["model"]["hidden"]}, experts {card["model"]["experts"]})',
        f'- data: {data["images"]} images, {data["texts"]} texts, {data["places"]} places from '
        f'{len(data["sources"])} source(s): {", ".join(data["sources"][:6])}'
        + (' ...' if len(data['sources']) > 6 else ''),
        f'- loss: multi-positive symmetric InfoNCE, temperature {card["loss"]["temperature"]} '
        f'(learned: {card["loss"]["learn_temperature"]}); soft labels '
        f'{card["loss"]["soft_labels"]["enabled"]}; hard negatives '
        f'{card["loss"]["hard_negatives"]["enabled"]}',
        f'- epochs: {card["epochs"]} (exported: epoch {card["exported_epoch"]}, best '
        f'validation {SELECT_LABELS[card["validation"].get("select", "text")]})',
        f'- validation ({card["validation"]["metric"]}; d2s: drone->satellite images), '
        'never trained on:', '',
        '| set | queries | R@1 | R@5 | R@10 | d2s R@1 | d2s R@5 |',
        '|---|---|---|---|---|---|---|']
    for name, v in card['val'].items():
        lines.append(f'| {name} | {card["validation"]["queries"].get(name, "")} | {v["r1"]} | '
                     f'{v["r5"]} | {v["r10"]} | {v.get("d2s_r1", "")} | '
                     f'{v.get("d2s_r5", "")} |')
    return '\n'.join(lines) + '\n'
