"""Shapes read from a config.json against the model transformers builds from the same config."""

import json

import pytest

from adapprox_cli import memory
from adapprox_cli.errors import InputError
from adapprox_cli.model_shapes import config_named_shapes, load_config

# Small configs that still exercise each family's switches: GQA (fewer key/value heads), an
# explicit head_dim unlike hidden / heads, tied and untied embeddings, biases.
CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_layer=2, n_embd=48, n_head=4, n_positions=40, vocab_size=101),
    "gpt2-inner-untied": dict(
        model_type="gpt2",
        n_layer=1,
        n_embd=32,
        n_head=2,
        n_positions=16,
        vocab_size=50,
        n_inner=80,
        tie_word_embeddings=False,
    ),
    "llama-gqa": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=99,
    ),
    "llama-bias-tied": dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=64,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
    ),
    "mistral": dict(
        model_type="mistral",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=77,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=88,
        tie_word_embeddings=True,
    ),
    "qwen3-head-dim": dict(
        model_type="qwen3",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        vocab_size=70,
    ),
    "gpt_neox": dict(
        model_type="gpt_neox",
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=90,
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_match_the_model_transformers_builds(name):
    transformers = pytest.importorskip("transformers")
    spec = dict(CONFIGS[name])
    config = transformers.AutoConfig.for_model(**spec)
    model = transformers.AutoModelForCausalLM.from_config(config)
    built = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    # The library reads the config.json that transformers itself would write.
    assert config_named_shapes(json.loads(config.to_json_string())) == built


def test_gpt2_config_gives_the_papers_parameter_count():
    # GPT-2 117M's published config; N is the count behind the paper's memory figures.
    shapes = config_named_shapes(
        dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    )
    assert sum(memory._numel(s) for _, s in shapes) == 124_439_808
    assert [s for _, s in shapes] == memory.preset_shapes("gpt2-124m")


def test_llama_7b_config_matches_the_preset():
    shapes = config_named_shapes(
        dict(
            model_type="llama",
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            vocab_size=32000,
        )
    )
    assert sorted(s for _, s in shapes) == sorted(memory.preset_shapes("llama-7b"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "bert"}, "model_type 'bert'"),
        ({"n_embd": 0}, "n_embd must be a positive integer"),
        ({"n_layer": 10**9}, "n_layer must be a positive integer up to"),
        ({"vocab_size": "50257"}, "vocab_size must be a positive integer"),
    ],
)
def test_bad_configs_are_refused_by_name(change, message):
    with pytest.raises(InputError, match=message):
        config_named_shapes({**CONFIGS["gpt2"], **change}, source="c.json")


def test_load_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["gpt2"]))
    assert load_config(tmp_path) == CONFIGS["gpt2"]
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(InputError, match=r"bad\.json: not a readable JSON config"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="holds list"):
        load_config(tmp_path / "list.json")
    with pytest.raises(InputError, match="no such file"):
        load_config(tmp_path / "missing.json")
