"""The bundled GPT (nanoGPT-compatible), its character data, generated text and sample states."""

from adapprox_cli.train.corpus import generate_corpus
from adapprox_cli.train.data import (
    CharVocab,
    NanoGPTData,
    check_block_size,
    encode_text_file,
    get_batch,
    read_meta,
    read_nanogpt_dataset,
    read_tokens,
    read_vocab,
    write_meta,
    write_nanogpt_dataset,
    write_tokens,
)
from adapprox_cli.train.model import (
    GPT,
    GPTConfig,
    gpt_config_from_model_args,
    gpt_from_checkpoint,
    gpt_from_model_args,
    model_state_from_checkpoint,
    nanogpt_learning_rate,
    nanogpt_param_groups,
    strip_compile_prefix,
)

__all__ = [
    "GPT",
    "CharVocab",
    "GPTConfig",
    "NanoGPTData",
    "check_block_size",
    "encode_text_file",
    "generate_corpus",
    "get_batch",
    "gpt_config_from_model_args",
    "gpt_from_checkpoint",
    "gpt_from_model_args",
    "model_state_from_checkpoint",
    "nanogpt_learning_rate",
    "nanogpt_param_groups",
    "read_meta",
    "read_nanogpt_dataset",
    "read_tokens",
    "read_vocab",
    "strip_compile_prefix",
    "write_meta",
    "write_nanogpt_dataset",
    "write_tokens",
]
