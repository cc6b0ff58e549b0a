"""The tiny random-weight Whisper checkpoint: the transcriber's stand-in for openai/whisper-*.

A complete Whisper directory (config, safetensors, generation config, tokenizer, feature
extractor) that `WhisperForConditionalGeneration` and `WhisperProcessor` load exactly as they
load a real one. Its vocabulary is small but laid out as Whisper's: byte-level BPE tokens
(the first VOCAB_BPE ranks of Qwen's table, which form a BPE of their own since every token's
merge parts rank below it), then <|endoftext|>, <|startoftranscript|>, one token per language
transformers' Whisper knows, the task tokens, <|startofprev|> (prompts) and <|notimestamps|>.
No timestamp tokens: the transcriber never asks for timestamps.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from omni.checkpoints.tokenizer import qwen_bpe_ranks, vocab_and_merges

VOCAB_BPE = 4096
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|startoftranscript|>",
    *(f"<|{code}|>" for code in LANGUAGES),
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)
MEL_BINS = 80  # whisper-tiny .. whisper-large-v2 (v3 has 128)
# A real Whisper says up to 448 tokens per 30 s window; random weights never end on their own,
# so the tiny one's generation config stops it early (it is only for tests).
TINY_MAX_LENGTH = 24
SEED = 20250612


def build_tokenizer() -> WhisperTokenizer:
    vocab, merges = vocab_and_merges({b: r for b, r in qwen_bpe_ranks().items() if r < VOCAB_BPE})
    vocab.update({token: VOCAB_BPE + i for i, token in enumerate(SPECIAL_TOKENS)})
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges, model_max_length=448)
    tokenizer.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS[1:]
            ]
        }
    )
    return tokenizer


def _non_ascii_tokens(tokenizer: WhisperTokenizer) -> list[int]:
    """BPE tokens that are not printable ASCII on their own (a lone UTF-8 byte decodes to
    nothing useful): suppressed, so every token the tiny model says is visible text."""
    return [
        i
        for i in range(VOCAB_BPE)
        if not tokenizer.decode([i]).isascii() or not tokenizer.decode([i]).isprintable()
    ]


def generation_config(tokenizer: WhisperTokenizer) -> GenerationConfig:
    """What Whisper's generate() reads from a checkpoint: its start, language and task ids."""
    ids = tokenizer.convert_tokens_to_ids
    eos = ids("<|endoftext|>")
    return GenerationConfig(
        decoder_start_token_id=ids("<|startoftranscript|>"),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        max_length=TINY_MAX_LENGTH,
        is_multilingual=True,
        lang_to_id={f"<|{code}|>": ids(f"<|{code}|>") for code in LANGUAGES},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        suppress_tokens=_non_ascii_tokens(tokenizer),
        begin_suppress_tokens=[ids("Ġ"), eos],  # as Whisper: no empty or space-only start
        return_timestamps=False,
    )


def write_tiny_whisper(out_dir: Path) -> None:
    """Model, generation config, tokenizer and feature extractor into `out_dir`."""
    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=MEL_BINS,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        d_model=64,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,  # 30 s windows, as every Whisper
        max_target_positions=448,
        pad_token_id=ids("<|endoftext|>"),
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|endoftext|>"),
        decoder_start_token_id=ids("<|startoftranscript|>"),
    )
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(out_dir)
    processor = WhisperProcessor(WhisperFeatureExtractor(feature_size=MEL_BINS), tokenizer)
    processor.save_pretrained(out_dir)
