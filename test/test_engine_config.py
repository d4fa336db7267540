"""Engine configuration: the shipped default file, overrides and one-sentence errors."""

from pathlib import Path

from cgrs_ros.engine.config import load_config
from cgrs_ros.engine.errors import ConfigError
import pytest

DEFAULT_FILE = Path(__file__).resolve().parents[1] / 'config' / 'engine.yaml'


def test_shipped_config_file_is_the_defaults():
    assert load_config(DEFAULT_FILE) == load_config(None)


def test_overrides_dotted_and_nested(tmp_path):
    path = tmp_path / 'c.yaml'
    path.write_text('retrieval:\n  top_k: 7\n  remove_orientation_words: false\n'
                    'image_encoder:\n  backend: none\n')
    cfg = load_config(path, {'retrieval.coarse_k': 50, 'text_encoder': {'batch_size': 8}})
    assert (cfg.retrieval.top_k, cfg.retrieval.coarse_k) == (7, 50)
    assert cfg.retrieval.remove_orientation_words == 'false'  # YAML boolean accepted
    assert cfg.image_encoder.backend == 'none' and cfg.text_encoder.batch_size == 8
    assert cfg.retrieval.fusion == 'weighted' and cfg.retrieval.caption_channel == 'rerank'


@pytest.mark.parametrize('text, message', [
    ('retrieval:\n  fusion: max\n', r"retrieval.fusion: Input should be 'weighted' or 'rrf'"),
    ('retrieval:\n  caption_weight: 1.5\n', 'retrieval.caption_weight: Input should be less'),
    ('retrival:\n  top_k: 3\n', 'retrival: unknown key'),
    ('image_encoder:\n  backend: clip\n', 'image_encoder.backend'),
    ('captioner:\n  backend: gpt\n', "unknown captioner backend 'gpt'"),
    ('captioner:\n  backend: openai\n  modle: x\n', 'captioner.modle'),
    ('retrieval: [1, 2\n', 'is not valid YAML'),
    ('- a\n- b\n', 'must hold a mapping'),
])
def test_bad_values_name_the_key(tmp_path, text, message):
    path = tmp_path / 'c.yaml'
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match='cannot read config file'):
        load_config(tmp_path / 'nope.yaml')
