"""``cgrs train reranker``: train the cross-encoder of the ``trained`` reranker backend.

The reranker must learn to fix the mistakes of the stage before it, so it trains on that
stage's own output: every training gallery is indexed and queried with the engine config the
user names (``--engine-config``, e.g. the demo's learned coarse model with manifest captions),
and each query's top ``data.list_size`` candidates become one training list. Queries are the
training galleries' descriptions (one, or one of its clauses, per image, seeded), never their
``queries.csv``: the held-out phrasings stay for validation on other towns, as for
``cgrs train dual``.

Each list's target is 1 for candidates of the query's place and, with soft labels on, partial
credit (SkyLink) for a place whose description words overlap the right one's by at least
``min_jaccard``. The loss is ListNet's top-1 cross-entropy over the list (the first factor of
Plackett-Luce, as in GeoRanker) plus a pointwise binary cross-entropy with weight
``loss.pointwise_weight`` so that sigmoid(logit) reads as a probability.

Validation runs the exact stage arithmetic (``(1 - w) * minmax(fused) + w * P`` over the top
``k`` of each list) for several weights on the validation galleries' held-out queries and
reports R@1/5/10 before and after; the best epoch (by R@1 at the best weight) is exported.
Candidate lists are cached in ``OUT/lists/`` (keyed by the engine config, gallery contents and
queries), so a second run only trains.
"""

import dataclasses
import datetime
import hashlib
import json
from pathlib import Path
import random
import sys
import time
from typing import Literal

from cgrs_ros.engine.config import _first_error, _Section, read_config_data
from cgrs_ros.engine.errors import CgrsError
from cgrs_ros.engine.learning.cross import (caption_sentences, CrossScorer, listwise_loss,
                                            prior_features, save_reranker_folder,
                                            sentence_scores)
from cgrs_ros.engine.learning.data import attribute_words, clause_views, load_query_set
from cgrs_ros.engine.learning.trainer import load_checkpoint, save_checkpoint, TrainingError
from cgrs_ros.engine.rerankers.stage import stage_order
from cgrs_ros.engine.storage import atomic_write_json, atomic_write_text, read_json
import numpy as np
from pydantic import Field, ValidationError
import torch

WEIGHTS = (0.25, 0.5, 0.75, 1.0)


class RerankModel(_Section):
    """The cross-encoder's size and inputs."""

    text_model: str = 'all-MiniLM-L6-v2'
    dim: int = Field(128, ge=8, le=2048)
    heads: int = Field(4, ge=1, le=32)
    hidden: int = Field(128, ge=8, le=4096)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    max_query_tokens: int = Field(32, ge=4, le=256)
    max_caption_tokens: int = Field(80, ge=4, le=512)


class RerankData(_Section):
    """How training lists are made from the stage before."""

    list_size: int = Field(10, ge=2, le=200)
    queries_per_image: int = Field(1, ge=1, le=20)
    # full: a whole description; clauses: a description or one of its clauses (data.py)
    text_views: Literal['full', 'clauses'] = 'clauses'


class RerankLoss(_Section):
    """Listwise cross-entropy with optional soft labels and a pointwise term."""

    soft_labels: bool = True
    soft_weight: float = Field(0.3, ge=0.0, le=1.0)
    min_jaccard: float = Field(0.6, ge=0.0, le=1.0)
    pointwise_weight: float = Field(0.5, ge=0.0, le=10.0)


class RerankTrain(_Section):
    """The optimization loop and the stage settings validated against."""

    epochs: int = Field(8, ge=1, le=1000)
    batch_lists: int = Field(32, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    seed: int = 0
    threads: int = Field(0, ge=0, le=256)
    k: int = Field(10, ge=1, le=200)   # reranker.k the validation simulates


class RerankTrainConfig(_Section):
    """The whole ``cgrs train reranker`` configuration."""

    model: RerankModel = Field(default_factory=RerankModel)
    data: RerankData = Field(default_factory=RerankData)
    loss: RerankLoss = Field(default_factory=RerankLoss)
    train: RerankTrain = Field(default_factory=RerankTrain)


def load_rerank_config(path=None, overrides=None):
    """Return the validated :class:`RerankTrainConfig` of a YAML file (None = defaults)."""
    source = 'train config' if path is None else str(path)
    data = read_config_data(path, overrides, 'train config', 'model, data, loss, train')
    try:
        return RerankTrainConfig.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, source) from None


# ----------------------------------------------------------------------------- lists

@dataclasses.dataclass
class ListSet:
    """Candidate lists of one gallery: per query, the stage-before ranking and its labels."""

    name: str
    queries: list
    captions: list      # per list: caption per candidate (None without)
    labels: list        # per list: float credit per candidate (1 = the query's place)
    coarse: list        # per list: coarse scores (NaN where none) or None
    caption: list       # per list: caption scores or None
    fused: list         # per list: fused scores (descending)


def _stage_before_config(engine_config, list_size):
    config = engine_config.model_copy(deep=True)
    config.reranker.backend = 'none'
    config.retrieval.min_caption_score = None
    config.retrieval.coarse_k = max(config.retrieval.coarse_k, list_size)
    return config


def _training_queries(gallery, cfg, rng):
    """(query, place) pairs of a training gallery: its held-out first descriptions.

    Only images with two descriptions or more give queries: the first one (or one of its
    clauses) is the query, and :func:`leave_one_out_gallery` keeps it out of the captions.
    """
    out = []
    for item in gallery.items:
        if len(item.descriptions) < 2:
            continue
        first = item.descriptions[0]
        texts = clause_views(first) if cfg.data.text_views == 'clauses' else [first]
        for text in rng.sample(texts, min(len(texts), cfg.data.queries_per_image)):
            out.append((text, item.group_id or item.image_id))
    return out


def leave_one_out_gallery(folder, work_dir):
    """Return a copy of a described gallery whose captions leave each first description out.

    The training queries are the first descriptions; if the captions the stage before (and
    the reranker) compare them with still held them, every positive would contain its query
    word for word, and a reranker would learn to spot copies, which no user's goal is (it
    learned nothing that carried over to paraphrases until this was done). The copy links the
    original image folders and reuses the original state's image embeddings (same content
    hashes), so only the captions are new work.
    """
    import os
    import shutil

    from cgrs_ros.engine.gallery import load_gallery, write_manifest
    from cgrs_ros.engine.storage import default_state_dir

    folder = Path(folder).resolve()
    gallery = load_gallery(folder, check_images='none')
    out = Path(work_dir) / f'{folder.name}-loo'
    out.mkdir(parents=True, exist_ok=True)
    for top in {Path(item.path).parts[0] for item in gallery.items}:  # folders or files
        link = out / top
        if not link.exists():
            os.symlink(folder / top, link)
    items = [dataclasses.replace(item, descriptions=item.descriptions[1:])
             if len(item.descriptions) >= 2 else item for item in gallery.items]
    write_manifest(out, items)
    embeddings = default_state_dir(folder) / 'embeddings'
    if embeddings.is_dir() and not (default_state_dir(out) / 'embeddings').exists():
        shutil.copytree(embeddings, default_state_dir(out) / 'embeddings')
    return out


def build_lists(gallery_dir, engine_config, queries, cfg, cache_dir, say):
    """Index ``gallery_dir``, query it with the stage before and return its :class:`ListSet`.

    ``queries`` are (text, place) pairs. Cached in ``cache_dir`` by a key of the engine
    config, the manifest and the queries.
    """
    from cgrs_ros.engine.gallery import find_manifest, load_gallery
    from cgrs_ros.engine.indexer import index_gallery
    from cgrs_ros.engine.retriever import Retriever

    config = _stage_before_config(engine_config, cfg.data.list_size)
    manifest = find_manifest(gallery_dir)
    key = hashlib.sha256(json.dumps(
        [config.model_dump(mode='json'), manifest.read_text(encoding='utf-8'), queries,
         cfg.data.list_size], sort_keys=True).encode()).hexdigest()[:16]
    name = Path(gallery_dir).resolve().name
    cached = Path(cache_dir) / f'{name}-{key}.json'
    if cached.is_file():
        return ListSet(**read_json(cached))
    say(f'lists: indexing and querying {gallery_dir} ({len(queries)} queries)')
    index_gallery(gallery_dir, config, progress=False)
    gallery = load_gallery(gallery_dir, check_images='none')
    place = {item.image_id: item.group_id or item.image_id for item in gallery.items}
    words = {}
    for item in gallery.items:
        words.setdefault(place[item.image_id], set()).update(
            w for d in item.descriptions for w in attribute_words(d))
    retriever = Retriever.open(gallery_dir, config)
    out = ListSet(name=name, queries=[], captions=[], labels=[], coarse=[], caption=[],
                  fused=[])
    try:
        for text, group in queries:
            result = retriever.query(text, top_k=cfg.data.list_size)
            cands = result.candidates
            labels = []
            for c in cands:
                other = place[c.image_id]
                if other == group:
                    labels.append(1.0)
                elif cfg.loss.soft_labels:
                    a, b = words.get(group, set()), words.get(other, set())
                    jac = len(a & b) / max(1, len(a | b))
                    labels.append(cfg.loss.soft_weight * jac if jac >= cfg.loss.min_jaccard
                                  else 0.0)
                else:
                    labels.append(0.0)
            out.queries.append(text)
            out.captions.append([c.caption for c in cands])
            out.labels.append(labels)
            out.coarse.append(_channel([c.coarse_score for c in cands]))
            out.caption.append(_channel([c.caption_score for c in cands]))
            out.fused.append([c.fused_score for c in cands])
    finally:
        retriever.close()
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cached, json.dumps(dataclasses.asdict(out), allow_nan=True))
    return out


def _channel(scores):
    """Return a channel's scores over a list (None -> NaN), or None if it did not run."""
    if all(s is None for s in scores):
        return None
    return [float('nan') if s is None else s for s in scores]


# ----------------------------------------------------------------------------- tensors

class _TokenTable:
    """MiniLM word pieces of distinct texts as one padded float16 table (row 0: no text).

    Lists refer to rows by index, so a batch is a gather, not a Python loop over tensors.
    """

    def __init__(self, encoder, texts, max_tokens):
        distinct = sorted({t for t in texts if t})
        self.row = {text: i + 1 for i, text in enumerate(distinct)}
        self.tokens = torch.zeros(len(distinct) + 1, max_tokens, encoder.dim,
                                  dtype=torch.float16)
        self.mask = torch.zeros(len(distinct) + 1, max_tokens, dtype=torch.bool)
        for start in range(0, len(distinct), 256):
            chunk = distinct[start:start + 256]
            tokens, mask = encoder.encode_tokens(chunk, max_tokens)
            rows = slice(start + 1, start + 1 + len(chunk))
            self.tokens[rows, :tokens.shape[1]] = torch.from_numpy(tokens)
            self.mask[rows, :mask.shape[1]] = torch.from_numpy(mask)

    def rows(self, texts):
        """Return the row index of each text (0 for None or unknown)."""
        return [self.row.get(t, 0) if t else 0 for t in texts]


class _Sentences:
    """Sentence vectors (MiniLM, normalized) of queries and caption sentences, by text."""

    def __init__(self, encoder, queries, captions):
        texts = sorted(set(queries) | {x for c in captions for x in caption_sentences(c)})
        self.vector = dict(zip(texts, encoder.encode_texts(texts))) if texts else {}
        self.empty = np.zeros((0, encoder.dim), dtype=np.float32)

    def scores(self, query, captions):
        """Return the (n, 2) sentence scores of one list (cross.sentence_scores)."""
        per = [np.stack([self.vector[x] for x in caption_sentences(c)])
               if caption_sentences(c) else self.empty for c in captions]
        return sentence_scores(self.vector[query], per)


def _flatten(lists, queries, captions, sentences):
    """Per list: (query row, caption rows, priors, labels) ready for batching."""
    out = []
    for i, query in enumerate(lists.queries):
        if not lists.fused[i]:
            continue
        priors = prior_features(
            None if lists.coarse[i] is None else np.asarray(lists.coarse[i], dtype=float),
            None if lists.caption[i] is None else np.asarray(lists.caption[i], dtype=float),
            np.asarray(lists.fused[i], dtype=float),
            sentences.scores(query, lists.captions[i]))
        out.append((queries.rows([query])[0], np.asarray(captions.rows(lists.captions[i])),
                    priors, np.asarray(lists.labels[i], dtype=np.float32)))
    return out


def _batch(items, queries, captions):
    """Tensors of a batch of lists, each padded to the longest list with masked entries."""
    size = max(len(it[1]) for it in items)
    q_rows = np.zeros((len(items), size), dtype=np.int64)
    c_rows = np.zeros((len(items), size), dtype=np.int64)
    priors = np.zeros((len(items), size, items[0][2].shape[1]), dtype=np.float32)
    labels = np.zeros((len(items), size), dtype=np.float32)
    mask = np.zeros((len(items), size), dtype=bool)
    for i, (q, caps, pri, lab) in enumerate(items):
        n = len(caps)
        q_rows[i] = q
        c_rows[i, :n], priors[i, :n], labels[i, :n], mask[i, :n] = caps, pri, lab, True
    q_idx, c_idx = torch.from_numpy(q_rows.ravel()), torch.from_numpy(c_rows.ravel())
    return (queries.tokens[q_idx], queries.mask[q_idx], captions.tokens[c_idx],
            captions.mask[c_idx], torch.from_numpy(priors.reshape(-1, priors.shape[2])),
            torch.from_numpy(labels), torch.from_numpy(mask))


def _logits(module, items, queries, captions, chunk=64):
    """Logits per list (numpy), evaluation mode, in chunks of lists."""
    out = []
    module.eval()
    with torch.inference_mode():
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            q, qm, c, cm, pri, _, mask = _batch(part, queries, captions)
            logits = module(q, qm, c, cm, pri).view(len(part), -1)
            out += [logits[i][mask[i]].double().numpy() for i in range(len(part))]
    return out


def stage_recall(items, logits, k, weight):
    """R@1/5/10 (percent) after the stage arithmetic over the top ``k`` of every list.

    ``weight`` None gives the ranking before the stage. A list whose positive is not in it
    counts as a miss at every K.
    """
    hits = {1: 0, 5: 0, 10: 0}
    for (_, _, pri, lab), logit in zip(items, logits):
        order = np.arange(len(lab))
        if weight is not None:
            kk = min(k, len(lab))
            probs = np.full(len(lab), np.nan)
            probs[:kk] = 1.0 / (1.0 + np.exp(-logit[:kk]))
            # minmax_fused over the list ranks and min-maxes like the fused scores themselves
            order, _ = stage_order(pri[:, 2].astype(np.float64), probs, kk, weight)
        pos = np.flatnonzero(lab[order] >= 1.0)
        for kk in hits:
            hits[kk] += int(len(pos) > 0 and pos[0] < kk)
    n = max(1, len(items))
    return {f'r{kk}': round(100.0 * v / n, 2) for kk, v in hits.items()}


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class RerankResult:
    """What a training run produced."""

    out_dir: str
    card: dict


def train_reranker(galleries, engine_config, cfg, out_dir, val_galleries=(), restart=False,
                   progress=True, log=None):
    """Train the cross-encoder on the stage-before lists of ``galleries``; export the best."""
    say = log or ((lambda m: print(m, file=sys.stderr, flush=True)) if progress
                  else (lambda m: None))
    from cgrs_ros.engine.gallery import load_gallery

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    rng = random.Random(tc.seed)
    train_sets = []
    for folder in galleries:
        gallery = load_gallery(folder, check_images='none')
        queries = _training_queries(gallery, cfg, rng)
        if not queries:
            raise CgrsError(f'{folder} has no descriptions to make training queries from; add '
                            'a description column to its manifest')
        loo = leave_one_out_gallery(folder, out / 'lists')
        train_sets.append(build_lists(loo, engine_config, queries, cfg, out / 'lists', say))
    val_sets = []
    for folder in val_galleries:
        qs = load_query_set(folder)
        val_sets.append(build_lists(folder, engine_config,
                                    list(zip(qs.queries, qs.query_groups)), cfg,
                                    out / 'lists', say))
    from cgrs_ros.engine.config import TextEncoderConfig
    from cgrs_ros.engine.encoders import load_text_encoder

    encoder = load_text_encoder(TextEncoderConfig(model=cfg.model.text_model))
    sets = train_sets + val_sets
    say('word pieces of the queries and captions')
    queries = _TokenTable(encoder, [q for ls in sets for q in ls.queries],
                          cfg.model.max_query_tokens)
    captions = _TokenTable(encoder, [c for ls in sets for caps in ls.captions for c in caps],
                           cfg.model.max_caption_tokens)
    say('sentence vectors of the queries and caption sentences')
    sentences = _Sentences(encoder, [q for ls in sets for q in ls.queries],
                           {c for ls in sets for caps in ls.captions for c in caps if c})
    train_items = [it for ls in train_sets for it in _flatten(ls, queries, captions, sentences)]
    train_items = [it for it in train_items if it[3].sum() > 0]  # lists with a positive
    val_items = {ls.name: _flatten(ls, queries, captions, sentences) for ls in val_sets}
    if not train_items:
        raise TrainingError('no training list holds its right place: the stage before misses '
                            'every training query; check --engine-config')
    dim = encoder.dim
    torch.manual_seed(tc.seed)
    m = cfg.model
    module = CrossScorer(dim, m.dim, m.heads, m.hidden, m.dropout)
    optimizer = torch.optim.AdamW(module.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    # Everything that shapes the run except its length: more epochs continue a run.
    shape = cfg.model_dump(mode='json')
    shape['train'].pop('epochs')
    fingerprint = hashlib.sha256(json.dumps(
        [shape, engine_config.model_dump(mode='json'),
         [ls.name for ls in train_sets], len(train_items)], sort_keys=True).encode()).hexdigest()

    def validate():
        res = {}
        for name, items in val_items.items():
            logits = _logits(module, items, queries, captions)
            res[name] = {'before': stage_recall(items, logits, tc.k, None)}
            for w in WEIGHTS:
                res[name][f'w{w:g}'] = stage_recall(items, logits, tc.k, w)
        return res

    history, best, start_epoch = [], None, 1
    checkpoint = None if restart else load_checkpoint(out)
    if checkpoint is not None:
        model_state, opt_state, info = checkpoint
        if info.get('fingerprint') != fingerprint:
            raise TrainingError(f'{out} holds a checkpoint of another run; pass --restart or '
                                'choose another --out')
        module.load_state_dict(model_state)
        optimizer.load_state_dict(opt_state)
        history, best, start_epoch = info['history'], info.get('best'), info['epoch'] + 1
        if start_epoch > tc.epochs:
            raise TrainingError(f'{out} already holds a finished run of {tc.epochs} epochs; '
                                'raise train.epochs or pass --restart')
        say(f'resuming after epoch {info["epoch"]}')
    say(f'training lists: {len(train_items)} from {len(train_sets)} galleries; validation: '
        f'{", ".join(val_items) or "none"}')
    started = time.perf_counter()
    for epoch in range(start_epoch, tc.epochs + 1):
        t0 = time.perf_counter()
        module.train()
        # The list order of an epoch depends on (seed, epoch) only, so a resumed run sees
        # the same batches as an uninterrupted one.
        perm = np.random.default_rng([tc.seed, epoch]).permutation(len(train_items))
        losses = []
        for start in range(0, len(perm), tc.batch_lists):
            part = [train_items[i] for i in perm[start:start + tc.batch_lists]]
            q, qm, c, cm, pri, lab, mask = _batch(part, queries, captions)
            logits = module(q, qm, c, cm, pri).view(len(part), -1)
            loss = listwise_loss(logits, lab, mask)
            if cfg.loss.pointwise_weight > 0:
                hard = (lab >= 1.0).float()
                loss = loss + cfg.loss.pointwise_weight * torch.nn.functional \
                    .binary_cross_entropy_with_logits(logits[mask], hard[mask])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        entry = {'epoch': epoch, 'loss': round(float(np.mean(losses)), 4),
                 'seconds': round(time.perf_counter() - t0, 1)}
        if val_items:
            entry['val'] = validate()
            score = float(np.mean([max(v[f'w{w:g}']['r1'] for w in WEIGHTS)
                                   for v in entry['val'].values()]))
            entry['val_r1'] = round(score, 2)
            if best is None or score > best['val_r1']:
                best = {'epoch': epoch, 'val_r1': round(score, 2)}
                save_checkpoint(out, module, optimizer, {'epoch': epoch}, name='best')
        history.append(entry)
        say(f'epoch {epoch}/{tc.epochs}: loss {entry["loss"]} ({entry["seconds"]} s)'
            + (f', val R@1 at best weight {entry["val_r1"]}' if val_items else ''))
        save_checkpoint(out, module, optimizer, {'epoch': epoch, 'history': history,
                                                 'best': best, 'fingerprint': fingerprint})
    if best is not None:
        module.load_state_dict(load_checkpoint(out, 'best')[0])
    final = next((h for h in history if best and h['epoch'] == best['epoch']), history[-1])
    weight = _best_weight(final.get('val', {}))
    card = {
        'model': cfg.model.model_dump(mode='json'), 'data': cfg.data.model_dump(mode='json'),
        'loss': cfg.loss.model_dump(mode='json'), 'train': cfg.train.model_dump(mode='json'),
        'stage_before': engine_config.model_dump(mode='json'),
        'training_galleries': [ls.name for ls in train_sets],
        'training_lists': len(train_items),
        'validation_galleries': list(val_items),
        'validation_queries': {ls.name: len(ls.queries) for ls in val_sets},
        'exported_epoch': final['epoch'], 'val': final.get('val', {}),
        'suggested_weight': weight, 'history': history,
        'train_seconds_this_run': round(time.perf_counter() - started, 1),
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    }
    save_reranker_folder(out, module, cfg.model.text_model, cfg.model.max_query_tokens,
                         cfg.model.max_caption_tokens,
                         extra={'trained_at': card['date'], 'suggested_weight': weight,
                                'k': tc.k})
    atomic_write_json(out / 'model_card.json', card)
    atomic_write_text(out / 'model_card.md', format_rerank_card(card))
    return RerankResult(str(out), card)


def _best_weight(val):
    if not val:
        return 0.5
    return max(WEIGHTS, key=lambda w: float(np.mean([v[f'w{w:g}']['r1'] for v in val.values()])))


def format_rerank_card(card):
    """Return the reranker's model card as Markdown."""
    lines = ['# cgrs reranker card', '',
             f'- date: {card["date"]}',
             f'- model: cross-encoder over {card["model"]["text_model"]} word pieces (dim '
             f'{card["model"]["dim"]}, {card["model"]["heads"]} heads) + earlier-stage scores',
             f'- trained on the stage-before lists ({card["data"]["list_size"]} candidates) of '
             f'{len(card["training_galleries"])} galleries: '
             f'{", ".join(card["training_galleries"][:8])}'
             + (' ...' if len(card['training_galleries']) > 8 else ''),
             f'- loss: ListNet top-1 (Plackett-Luce first factor); soft labels '
             f'{card["loss"]["soft_labels"]}; pointwise BCE weight '
             f'{card["loss"]["pointwise_weight"]}',
             f'- exported epoch {card["exported_epoch"]}; suggested reranker.weight '
             f'{card["suggested_weight"]} (best validation R@1)', '',
             '| validation set (held-out queries) | stage | R@1 | R@5 | R@10 |',
             '|---|---|---|---|---|']
    for name, v in card['val'].items():
        for stage, r in v.items():
            lines.append(f'| {name} ({card["validation_queries"].get(name, "")}) | {stage} | '
                         f'{r["r1"]} | {r["r5"]} | {r["r10"]} |')
    return '\n'.join(lines) + '\n'
