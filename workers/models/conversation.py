"""Vicuna v1.1 conversation text exactly as RaDialog's reference builds it (torch-free), and the context rule.

"{SYSTEM} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:" -- the report turn (holding ``<image>``)
comes first. Context rule (reference demo: 4,000 tokens in all): when prompt + the task's new-token limit
do not fit, the oldest follow-up turns are dropped one at a time (never the report turn, never the current
question); if it still does not fit, :class:`~workers.models.base.ContextTooLong` is raised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from workers.models.base import ContextTooLong, Turn
from workers.models.prompts import MAX_CONTEXT_TOKENS, ROLES, SEP, SEP2, SYSTEM


def conversation_prompt(history: Sequence[Turn], question: str) -> str:
    """The full prompt for the next answer."""
    text = SYSTEM + SEP
    for turn in history:
        text += f"{ROLES[0]}: {turn.question}{SEP}{ROLES[1]}: {turn.answer}{SEP2}"
    return text + f"{ROLES[0]}: {question}{SEP}{ROLES[1]}:"


def fit_history(
    history: Sequence[Turn],
    question: str,
    count_tokens: Callable[[str], int],
    max_new_tokens: int,
    limit: int = MAX_CONTEXT_TOKENS,
    build: Callable[[Sequence[Turn], str], str] = conversation_prompt,
) -> tuple[list[Turn], int]:
    """Drop the oldest follow-up turns until prompt + ``max_new_tokens`` fits ``limit``.

    Returns the kept history and the number of dropped turns. ``count_tokens`` counts a prompt's model
    tokens (image embeddings included); ``build`` writes the prompt (another backend's format).
    """
    kept = list(history)
    dropped = 0
    while True:
        needed = count_tokens(build(kept, question)) + max_new_tokens
        if needed <= limit:
            return kept, dropped
        if len(kept) <= 1:
            raise ContextTooLong(
                f"conversation needs {needed} tokens (prompt + {max_new_tokens} new) but the limit is {limit}, "
                "even with only the report turn kept"
            )
        del kept[1]
        dropped += 1
