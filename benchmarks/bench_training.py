"""Throughput of `cgrs train dual` on this machine: where the time of a training run goes.

Measures, in one run, on one demo town (generated into a temp folder; seed 1000):
- frozen image features: EfficientNet-Lite0 images/s (the one-off cost; cached afterwards);
- frozen text features: MiniLM texts/s (sentence embeddings, cached afterwards);
- head training: pairs/s and seconds per epoch once features are cached, for the shared
  head and for platform experts.

    .venv/bin/python benchmarks/bench_training.py [--threads 2] [--epochs 3]
"""

import argparse
import json
from pathlib import Path
import subprocess
import sys
import tempfile
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--epochs', type=int, default=3)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    from cgrs_ros.engine.learning.backends import text_features
    from cgrs_ros.engine.learning.config import load_train_config
    from cgrs_ros.engine.learning.data import load_training_pairs
    from cgrs_ros.engine.learning.towers import FeatureCache, Lite0Tower
    from cgrs_ros.engine.learning.trainer import train_dual

    work = Path(tempfile.mkdtemp(prefix='cgrs-bench-train-'))
    subprocess.run([sys.executable, '-m', 'cgrs_ros.cli', 'gallery', 'demo', str(work / 'town'),
                    '--seed', '1000'], check=True, capture_output=True)
    pairs = load_training_pairs([work / 'town'])
    cache = work / 'cache'
    figures = {'threads': args.threads, 'images': len(pairs.image_paths),
               'texts': len(pairs.texts)}

    tower = Lite0Tower()
    start = time.perf_counter()
    FeatureCache(cache / 'image', tower).features(pairs.image_paths)
    figures['image_features_per_s'] = round(len(pairs.image_paths)
                                            / (time.perf_counter() - start), 1)
    start = time.perf_counter()
    text_features(pairs.texts, 'all-MiniLM-L6-v2', cache)
    figures['text_features_per_s'] = round(len(pairs.texts) / (time.perf_counter() - start), 1)

    for name, extra in (('shared', {}), ('experts', {'model.experts': True})):
        cfg = load_train_config(None, dict({'train.epochs': args.epochs,
                                            'train.threads': args.threads}, **extra))
        result = train_dual(pairs, cfg, work / name, cache_root=cache, progress=False)
        epochs = result.history
        figures[name] = {
            'pairs_per_s': round(sum(h['pairs_per_s'] for h in epochs) / len(epochs), 1),
            'seconds_per_epoch': round(sum(h['seconds'] for h in epochs) / len(epochs), 2)}
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
