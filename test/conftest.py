"""Shared test set-up: ROS isolation, offline model hubs, and helpers for real processes.

Every test run gets its own ROS_DOMAIN_ID (and every ROS test a fresh one from
``ros_domain``), discovery limited to localhost, logs in a temp dir, and the Hugging Face
hub switched off so a missing model fails at once instead of hanging on the network.
"""

import itertools
import os
import random
import tempfile

import pytest

os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
os.environ.setdefault('ROS_LOG_DIR', tempfile.mkdtemp(prefix='cgrs-roslog-'))
os.environ.setdefault('HOME', tempfile.gettempdir())
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['TRANSFORMERS_OFFLINE'] = '1'
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

# Domain ids 1..100 are safe for DDS port arithmetic on Linux; start from the run's own id
# (make test picks one at random) and hand out successive ids so tests never share one.
_BASE_DOMAIN = int(os.environ.get('ROS_DOMAIN_ID') or random.randint(1, 100))
_domains = itertools.count()


@pytest.fixture
def ros_domain(monkeypatch):
    """Give this test a ROS_DOMAIN_ID of its own (set in os.environ for child processes too)."""
    domain = 1 + (_BASE_DOMAIN - 1 + next(_domains)) % 100
    monkeypatch.setenv('ROS_DOMAIN_ID', str(domain))
    monkeypatch.setenv('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    return domain
