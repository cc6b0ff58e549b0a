"""Building the engine's conversations in this process (the tests that drive the stages)."""

from __future__ import annotations

from collections.abc import Callable

from omni.engine.kv_memory import KVSlots
from omni.engine.protocol import ContextRows
from omni.engine.thinker import ThinkerConversation
from omni.engine.thinker_family import thinker_family
from omni.engine.thinker_worker import token_ids


def thinker_conversation(
    thinker, processor, on_rows: Callable[[ContextRows], None], kv: KVSlots, **options
) -> ThinkerConversation:
    """A conversation as the thinker worker opens one, with its family's default system prompt
    (`options`: ThinkerConversation's keyword options, e.g. its budget)."""
    tok = processor.tokenizer
    return ThinkerConversation(
        thinker,
        token_ids(tok, thinker.generation_config.eos_token_id),
        processor.feature_extractor,
        processor.image_processor.to_dict(),
        thinker_family(thinker).system_prompt(None),
        lambda text: tok.encode(text, add_special_tokens=False),
        on_rows,
        kv,
        **options,
    )
