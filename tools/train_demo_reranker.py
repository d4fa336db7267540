"""Reproduce the demo's trained reranker (models/demo_reranker) from scratch.

The stage before is the demo's own engine config (config/demo_engine.yaml: the learned coarse
model of models/demo_dual with manifest captions, hybrid fusion). Training towns are seeds
1000..1000+N-1, validation towns 2000 and 2001 (their held-out queries.csv); the demo town
(seed 0) and the evaluation town (seed 3000) are never used. Towns are generated into the
same cache as tools/train_demo_model.py, so after that script only the lists are built.

    .venv/bin/python tools/train_demo_reranker.py [--towns 8] [--out models/demo_reranker]
"""

import argparse
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo_model import (  # noqa: E402,I100,I202 (a sibling script, after sys.path)
    cgrs, default_cache, ROOT, town, TRAIN_SEEDS, VAL_SEEDS)


def main():
    """Generate the towns and train the reranker."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--towns', type=int, default=8, help='training towns (default 8)')
    parser.add_argument('--config', type=Path,
                        default=ROOT / 'config' / 'train_demo_reranker.yaml')
    parser.add_argument('--engine-config', type=Path,
                        default=ROOT / 'config' / 'demo_engine.yaml')
    parser.add_argument('--out', type=Path, default=ROOT / 'models' / 'demo_reranker')
    parser.add_argument('--cache', type=Path, default=default_cache(),
                        help='where the generated towns are kept')
    parser.add_argument('--restart', action='store_true', help='ignore checkpoints in --out')
    args = parser.parse_args()
    if not 1 <= args.towns <= len(TRAIN_SEEDS):
        parser.error(f'--towns must be 1..{len(TRAIN_SEEDS)}')
    train = [town(args.cache, seed) for seed in TRAIN_SEEDS[:args.towns]]
    val = [town(args.cache, seed) for seed in VAL_SEEDS]
    extra = ['--restart'] if args.restart else []
    cgrs('train', 'reranker', *train, *[a for v in val for a in ('--val', v)],
         '--engine-config', args.engine_config, '--config', args.config, '--out', args.out,
         *extra)
    return 0


if __name__ == '__main__':
    sys.exit(main())
