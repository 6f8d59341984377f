"""What each model backend can do, declared (torch-free: the API reads it to adapt routes and the page).

A backend declares whether it has a findings classifier (RaDialog v2 and v1: 14 CheXpert labels coded in the SR;
XrayGPT: none, its SR carries the text only), the dialog tasks it was trained for with the exact phrasing
it was trained on, per-task new-token limits, its context window and how many positions the image takes.
Quick actions a model was not trained for are hidden and refused; free questions are always offered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.models import prompts as v2
from workers.models.radialog_v1 import prompts as v1
from workers.models.xraygpt import prompts as xraygpt

#: Dialog tasks whose question is built per request (free text, correction and yes/no from findings).
PER_REQUEST = ""


@dataclass(frozen=True)
class Capabilities:
    backend: str  # the RADIALOG_MODEL_BACKEND value
    model_name: str  # what the page and the SR call it
    findings_classifier: bool
    #: task -> the exact question sent (PER_REQUEST when built from the request: free, correction, yes_no)
    tasks: Mapping[str, str]
    task_max_new_tokens: Mapping[str, int]
    context_tokens: int  # prompt + new tokens must fit
    image_tokens: int  # positions the image takes in the prompt
    system_text: str
    #: tasks asked as a conversation's first turn with the image (RaDialog's view question), not after the report
    first_turn_tasks: frozenset[str] = frozenset()
    report_question: Callable[[Sequence[str]], str] = field(default=lambda labels: "", compare=False)

    def supports(self, task: str) -> bool:
        return task in self.tasks

    def seed_question(self, findings: Sequence[Mapping[str, Any]] | None) -> str:
        """The question of a conversation's first exchange, whose answer is the seed report's text: the
        report question with the seed's present findings (``Report.findings`` rows). The worker replays it
        and the API counts its tokens: one spelling, so the estimate is of the prompt the model gets."""
        return self.report_question([f["label"] for f in findings or [] if f.get("present")])

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "model_name": self.model_name,
            "findings_classifier": self.findings_classifier,
            "tasks": {
                task: {"prompt": phrasing or None, "max_new_tokens": self.task_max_new_tokens[task]}
                for task, phrasing in self.tasks.items()
            },
            "context_tokens": self.context_tokens,
            "image_tokens": self.image_tokens,
        }


def _v2_report_question(labels: Sequence[str]) -> str:
    return v2.report_prompt(v2.findings_phrase(labels))


RADIALOG_V2 = Capabilities(
    backend="radialog-v2",
    model_name="RaDialog",
    findings_classifier=True,
    tasks={
        "free": PER_REQUEST,
        "correction": PER_REQUEST,
        "yes_no": PER_REQUEST,
        "list": v2.LIST_FINDINGS,
        "impression": v2.IMPRESSION,
        "easy_language": v2.EASY_LANGUAGE,
        "summary": v2.SUMMARY,
        "view": v2.VIEW_PROMPT,
    },
    task_max_new_tokens=v2.TASK_MAX_NEW_TOKENS,
    context_tokens=v2.MAX_CONTEXT_TOKENS,
    image_tokens=v2.IMAGE_TOKENS,
    system_text=v2.SYSTEM,
    first_turn_tasks=frozenset({"view"}),
    report_question=_v2_report_question,
)


def _v1_report_question(labels: Sequence[str]) -> str:
    return v1.report_prompt(v1.findings_phrase(tuple(labels)))


#: RaDialog-INS's tasks (the default adapter; RaDialog-RG was trained for reports only). No impression and no
#: view question: v1 was not trained for them. The 32 <IMG> placeholders are in the report question's text.
RADIALOG_V1 = Capabilities(
    backend="radialog-v1",
    model_name="RaDialog v1",
    findings_classifier=True,
    tasks={
        "free": PER_REQUEST,
        "correction": PER_REQUEST,
        "yes_no": PER_REQUEST,
        "list": v1.LIST_FINDINGS,
        "easy_language": v1.EASY_LANGUAGE,
        "summary": v1.SUMMARY,
    },
    task_max_new_tokens=v1.TASK_MAX_NEW_TOKENS,
    context_tokens=v1.MAX_CONTEXT_TOKENS,
    image_tokens=v1.IMAGE_TOKENS,
    system_text=v1.SYSTEM,
    report_question=_v1_report_question,
)

XRAYGPT = Capabilities(
    backend="xraygpt",
    model_name="XrayGPT",
    findings_classifier=False,
    tasks={"free": PER_REQUEST, **xraygpt.TASK_PROMPTS},
    task_max_new_tokens=xraygpt.TASK_MAX_NEW_TOKENS,
    context_tokens=xraygpt.MAX_LENGTH,
    image_tokens=xraygpt.IMAGE_TOKENS,
    system_text=xraygpt.SYSTEM,
    report_question=lambda labels: xraygpt.REPORT_QUESTION,
)

CAPABILITIES: dict[str, Capabilities] = {c.backend: c for c in (RADIALOG_V2, RADIALOG_V1, XRAYGPT)}


class UnknownBackend(ValueError):
    """RADIALOG_MODEL_BACKEND names no backend."""


def capabilities_for(backend: str) -> Capabilities:
    try:
        return CAPABILITIES[backend]
    except KeyError:
        raise UnknownBackend(f"unknown model backend {backend!r}; available: {', '.join(CAPABILITIES)}") from None
