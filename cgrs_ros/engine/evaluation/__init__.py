"""Evaluation: Recall@K on GeoText-1652, RoboSense Track 4 and project galleries.

- ``metrics``: Recall@K with group-level hits from score matrices or ranked id lists.
- ``datasets``: readers and writers of the benchmark files.
- ``runner``: indexes a gallery once and runs every query per retrieval method.
- ``report``: the JSON report and the comparison of two reports.
- ``plots``: Recall@K curves and latency histograms as PNG.
"""
