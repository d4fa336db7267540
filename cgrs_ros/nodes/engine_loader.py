"""Bring a node's engine up: index what is new in the gallery, then open the retriever.

Shared by the nodes that query a gallery (retrieval_node, localization_node), so both index,
log and report repairs the same way. Runs on the node's worker thread, never in a callback.
"""

import time


def open_retriever(params, logger, overrides=None, adjust=None):
    """Index ``params['gallery_dir']`` and return an open Retriever.

    ``params`` holds ``gallery_dir``, ``config`` and ``state_dir`` (node parameters);
    ``overrides`` are dotted config keys (``{'retrieval.top_k': 5}``); ``adjust(config)`` may
    change the loaded config before indexing. Engine errors (CgrsError) propagate.
    """
    from cgrs_ros.engine.config import load_config
    from cgrs_ros.engine.indexer import index_gallery
    from cgrs_ros.engine.retriever import Retriever

    gallery = params['gallery_dir']
    state = params['state_dir'] or None
    config = load_config(params['config'] or None, overrides or {})
    if adjust is not None:
        adjust(config)
    started = time.monotonic()
    summary = index_gallery(gallery, config, state_dir=state, progress=False)
    logger.info(
        f'index of {gallery}: {summary.indexed} indexed, {summary.unchanged} unchanged, '
        f'{len(summary.skipped)} skipped ({time.monotonic() - started:.1f} s)')
    for repair in summary.repairs:  # damaged state found and repaired by this index run
        logger.warning(f'repaired: {repair}')
    for skipped in summary.skipped[:20]:
        logger.warning(f'skipped: {skipped}')
    return Retriever.open(gallery, config, state_dir=state)
