"""The prompt language: A1111 syntax (and a Midjourney-style front end) parsed once into data, then encoded.

Parsing and scheduling are pure Python; torch is imported only by :class:`PromptEncoder`
when it encodes. See ``docs/prompts.md`` for the syntax.
"""

from aipaint.prompt.encode import Chunk, PromptEncoder, tokenize_chunks
from aipaint.prompt.midjourney import MidjourneyPrompt, UnsupportedPromptOption, parse_midjourney
from aipaint.prompt.parser import (
    ExtraNetworkRef,
    LoraRef,
    ParsedPrompt,
    PromptWarning,
    SubPrompt,
    WeightedText,
    parse_attention,
    parse_attention_segments,
    parse_negative_prompt,
    parse_prompt,
)
from aipaint.prompt.schedule import describe, distinct_schedule, prompt_at_step

__all__ = [
    "Chunk",
    "ExtraNetworkRef",
    "LoraRef",
    "MidjourneyPrompt",
    "ParsedPrompt",
    "PromptEncoder",
    "PromptWarning",
    "SubPrompt",
    "UnsupportedPromptOption",
    "WeightedText",
    "describe",
    "distinct_schedule",
    "parse_attention",
    "parse_attention_segments",
    "parse_midjourney",
    "parse_negative_prompt",
    "parse_prompt",
    "prompt_at_step",
    "tokenize_chunks",
]
