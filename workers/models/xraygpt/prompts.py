"""XrayGPT's conversation text and answer post-processing, exactly as its demo builds them (torch-free).

The demo's ``CONV_VISION``: a system text, roles Patient/Doctor, every message followed by "###". The
image message ``<Img><ImageHere></Img>`` opens the first Patient turn and the first question is appended
after one space; ``<ImageHere>`` is where the 32 projected query embeddings are spliced in::

    {SYSTEM}###Patient: <Img><ImageHere></Img> {q1}###Doctor: {a1}###Patient: {q2}###Doctor:

Generation stops on "###"; the answer is the decoded text before the first "###", after the last
"Doctor:", stripped, with "ChatDoctor" / "Chat Doctor" (the LLM's dialogue-tuning persona) replaced by
"XrayGPT". A changed character changes what the model generates, so tests compare these byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

SYSTEM = (
    "You are an experienced Doctor, give the following medical scan: <Img>ImageContent</Img>. "
    "You will be able to see the medical scan once I provide it to you. Please answer my questions."
)
ROLES = ("Patient", "Doctor")
SEP = "###"
IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_MESSAGE = "<Img><ImageHere></Img>"
#: Query embeddings spliced in place of <ImageHere>.
IMAGE_TOKENS = 32

#: The report request: the first of the demo's example prompts (prompts/alignment.txt holds the
#: instruction set it was trained with; this is its first line).
REPORT_QUESTION = "Describe the given chest x-ray image in detail."
#: Quick actions XrayGPT was trained for (lines of prompts/alignment.txt), by our task names.
KEY_FINDINGS = "What are the key findings in this chest x-ray image?"
IMPRESSION = "Based on the findings in this chest x-ray image, what is the overall impression?"

#: The demo's generation limits: 300 new tokens, and prompt + new tokens within 2,000 positions (the
#: reference then keeps the last 1,700 prompt positions; we drop whole follow-up turns instead, see
#: ``workers.models.conversation.fit_history``, so the window never cuts into the image).
MAX_NEW_TOKENS = 300
MAX_LENGTH = 2000
TASK_MAX_NEW_TOKENS: dict[str, int] = {
    "report": MAX_NEW_TOKENS,
    "free": MAX_NEW_TOKENS,
    "list": MAX_NEW_TOKENS,
    "impression": MAX_NEW_TOKENS,
}
TASK_PROMPTS: dict[str, str] = {"list": KEY_FINDINGS, "impression": IMPRESSION}


class Exchange(Protocol):
    """A finished question and answer (read-only: a frozen ``Turn`` is one)."""

    @property
    def question(self) -> str: ...

    @property
    def answer(self) -> str: ...


def conversation_prompt(history: Sequence[Exchange], question: str) -> str:
    """The full prompt for the next answer; ``history[0]`` (if any) is the turn that carried the image.

    Follows the reference's ``get_prompt``: a message is written as ``role: text###``, an empty one as the
    open ``role:`` (so an empty earlier answer reads as the reference would write it).
    """
    questions = [turn.question for turn in history] + [question]
    answers = [turn.answer for turn in history] + [None]
    text = SYSTEM + SEP
    for i, (q, a) in enumerate(zip(questions, answers)):
        asked = f"{IMAGE_MESSAGE} {q}" if i == 0 else q
        for role, message in ((ROLES[0], asked), (ROLES[1], a)):
            text += f"{role}: {message}{SEP}" if message else f"{role}:"
    return text


def postprocess(text: str) -> str:
    """The reference's answer text from the decoded new tokens (see the module docstring)."""
    text = text.split(SEP)[0]
    text = text.split(f"{ROLES[1]}:")[-1].strip()
    return text.replace("ChatDoctor", "XrayGPT").replace("Chat Doctor", "XrayGPT")
