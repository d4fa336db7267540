"""Figures of the learned dual encoder: loss variants, experts vs shared head, pipelines.

Trains each variant of config/train_demo.yaml on the demo training towns (seeds 1000..1029,
validation 2000-2001; tools/train_demo_model.py generates them), then runs `cgrs eval gallery`
on towns never trained on: the demo town (seed 0) and seed 3000, with their held-out queries
(the generator's query register: synonyms and sentence shapes no training text uses).

Per town it prints
- every variant's coarse stage from pixels alone (captioner: none);
- the demo model (models/demo_dual) in every pipeline: coarse, rerank (CGRS), hybrid, with the
  manifest descriptions as captions; rerank and hybrid from pixels alone with captions written
  by the learned captioner; and caption-only (no image encoder, manifest descriptions).

    .venv/bin/python benchmarks/learned_models.py [--towns 30] [--variants shared,soft,...]

Trained variants are kept under --work (default ~/.cache/cgrs/variants) and reused.
"""

import argparse
import json
import os
from pathlib import Path
import subprocess
import sys

import yaml

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'cgrs'
VARIANTS = {
    'shared': {},
    'soft_labels': {'loss': {'soft_labels': {'enabled': True}}},
    'hard_negatives': {'loss': {'hard_negatives': {'enabled': True, 'geo_radius_m': 150.0}}},
    'experts': {'model': {'experts': True}},
}
EVAL_TOWNS = (0, 3000)


def cgrs(*args, capture=False):
    """Run the cgrs CLI; return stdout when ``capture``."""
    out = subprocess.run([sys.executable, '-m', 'cgrs_ros.cli', *map(str, args)], check=True,
                         stdout=subprocess.PIPE if capture else None, text=True)
    return out.stdout


def merge(base, extra):
    """Deep-merge ``extra`` into a copy of ``base``."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def town(seed):
    folder = CACHE / 'towns' / f's{seed}'
    if not (folder / 'world.json').is_file():
        cgrs('gallery', 'demo', folder, '--seed', seed, '--force')
    return folder


def train_variant(name, overrides, work, towns):
    out = work / name
    if (out / 'model_card.json').is_file():
        return out
    base = yaml.safe_load((ROOT / 'config' / 'train_demo.yaml').read_text())
    config = work / f'{name}.yaml'
    config.write_text(yaml.safe_dump(merge(base, overrides)))
    train = [town(s) for s in range(1000, 1000 + towns)]
    cgrs('train', 'dual', *train, '--val', town(2000), '--val', town(2001), '--config', config,
         '--out', out, '--quiet')
    return out


def engine_config(work, name, image_model, captioner):
    path = work / f'engine-{name}.yaml'
    image = ({'backend': 'learned', 'model': str(image_model), 'threads': 1} if image_model
             else {'backend': 'none'})
    section = {'backend': captioner}
    if captioner == 'learned':
        section['model'] = str(image_model)
    path.write_text(yaml.safe_dump({'image_encoder': image, 'text_encoder': {'threads': 1},
                                    'captioner': section}))
    return path


def evaluate(gallery, config, methods, state):
    report = json.loads(cgrs('eval', 'gallery', gallery, '--queries', gallery / 'queries.csv',
                             '--config', config, '--methods', methods, '--state-dir', state,
                             '--json', capture=True))
    return {m: {k: round(e['metrics'][f't2i_r{k}'], 2) for k in (1, 5, 10)}
            for m, e in report['methods'].items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--towns', type=int, default=30)
    parser.add_argument('--variants', default=','.join(VARIANTS))
    parser.add_argument('--work', type=Path, default=CACHE / 'variants')
    parser.add_argument('--json', type=Path, help='also write the figures here')
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    models = {name: train_variant(name, VARIANTS[name], args.work, args.towns)
              for name in args.variants.split(',')}
    demo_model = ROOT / 'models' / 'demo_dual'
    figures = {}
    for seed in EVAL_TOWNS:
        gallery = town(seed)
        rows = {}
        for name, model in models.items():
            config = engine_config(args.work, f'{name}-pixels', model, 'none')
            rows[f'{name}: coarse, pixels only'] = evaluate(
                gallery, config, 'coarse', args.work / f'state-{seed}')['coarse']
        config = engine_config(args.work, 'demo-pixels', demo_model, 'none')
        rows['demo model: coarse, pixels only'] = evaluate(
            gallery, config, 'coarse', args.work / f'state-{seed}')['coarse']
        config = engine_config(args.work, 'demo-described', demo_model, 'manifest')
        for method, value in evaluate(gallery, config, 'coarse,rerank,hybrid',
                                      args.work / f'state-{seed}').items():
            rows[f'demo model: {method}, with descriptions'] = value
        # Pixels only, whole CGRS: captions written by the learned captioner (caption bank).
        config = engine_config(args.work, 'demo-learned-captions', demo_model, 'learned')
        cgrs('caption', gallery, '--config', config, '--state', args.work / f'state-{seed}')
        for method, value in evaluate(gallery, config, 'rerank,hybrid',
                                      args.work / f'state-{seed}').items():
            rows[f'demo model: {method}, pixels only (learned captions)'] = value
        config = engine_config(args.work, 'caption-only', None, 'manifest')
        rows['caption only (no image encoder)'] = evaluate(
            gallery, config, 'config', args.work / f'state-{seed}')['config']
        figures[f'seed {seed}'] = rows
        print(f'\n### town seed {seed} ({"the demo town" if seed == 0 else "unseen"}), '
              'held-out query phrasings; t2i Recall@K at place level, %\n')
        print('| pipeline | R@1 | R@5 | R@10 |\n|---|---|---|---|')
        for label, v in rows.items():
            print(f'| {label} | {v[1]} | {v[5]} | {v[10]} |')
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
