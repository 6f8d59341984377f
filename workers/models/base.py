"""The model-backend interface every report model implements (RaDialog v2, XrayGPT; RaDialog v1 next).

A backend is loaded once per worker process and then serves batches of report jobs and single dialog
turns. Inputs are 8-bit grayscale images already windowed from DICOM (``radialog.imaging``), so backends
never see DICOM. Everything here is plain data: the API and the Celery tasks pass these around. What a
backend can do (classifier, dialog tasks, context) is declared in :mod:`workers.models.capabilities`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from radialog.model_output import ClassifierFinding, Provenance, ReportOutput
from workers.models.capabilities import Capabilities

#: The model's output types live in the kernel (``radialog.model_output``: reporting and the tests use them
#: without model code); the backend interface names them too.
__all__ = [
    "ClassifierFinding",
    "ContextTooLong",
    "DialogRequest",
    "ModelBackend",
    "Provenance",
    "ReportOutput",
    "RequestCancelled",
    "Sampling",
    "StudyInput",
    "TokenCallback",
    "Turn",
    "UnsupportedTask",
]


@dataclass(frozen=True)
class StudyInput:
    """One study's frontal image for a report job. ``key`` is opaque to the backend (registry id)."""

    key: str
    image: np.ndarray  # 2-D uint8, white bones (MONOCHROME2 after windowing)
    priority: int = 1  # the study's rank (0 HIGH, 1 ROUTINE, 2 LOW): the engine admits lower ranks first


@dataclass(frozen=True)
class Turn:
    """A finished exchange of the conversation: what was asked (exact prompt text) and the answer."""

    question: str
    answer: str


@dataclass(frozen=True)
class Sampling:
    """Sampled instead of greedy decoding, asked for explicitly per dialog turn (XrayGPT's demo samples with
    temperature 1.0, top_p 0.9 and transformers' default top_k 50). Reports are always greedy; ``seed``
    makes a draw repeatable."""

    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50
    seed: int | None = None


@dataclass(frozen=True)
class DialogRequest:
    """One dialog turn. ``history`` starts with the report turn (the turn that carries the image)."""

    image: np.ndarray
    history: Sequence[Turn]
    question: str
    task: str = "free"  # decides the token limit, see Capabilities.task_max_new_tokens
    max_new_tokens: int | None = None
    sampling: Sampling | None = None  # None: greedy (the default, and always for reports)


class UnsupportedTask(ValueError):
    """The backend was not trained for this dialog task (see its Capabilities)."""


TokenCallback = Callable[[str], None]


class ContextTooLong(ValueError):
    """The conversation cannot fit the model's context even after dropping what the rule allows."""


class RequestCancelled(RuntimeError):
    """The request was cancelled before it finished (the engine stopped under it: the worker is shutting
    down). Defined here, beside the other errors a backend gives, so callers tell it apart by type without
    importing the engine (and torch)."""


class ModelBackend(abc.ABC):
    """Load once, then ``report`` batches and ``answer`` dialog turns."""

    provenance: Provenance
    capabilities: Capabilities

    @abc.abstractmethod
    def report(self, studies: Sequence[StudyInput]) -> list[ReportOutput]:
        """Draft the findings section for each study; results in input order."""

    def report_each(self, studies: Sequence[StudyInput]) -> list[ReportOutput | Exception]:
        """Like ``report``, but a study's own failure is returned in its place instead of raised.

        The default runs ``report`` as one batch (an error raises for all); a backend that serves studies
        independently (the engine) returns per-study errors so that one study never fails its batch.
        """
        return list(self.report(studies))

    def close(self) -> None:  # noqa: B027 - a hook: a backend holding nothing keeps this one
        """Release what the backend holds (threads, memory); the worker calls it when it stops."""

    def serving_info(self) -> dict[str, Any]:
        """How the model is served (engine slots, memory): shown in the worker's readiness key."""
        return {}

    def engine_model(self) -> Any:
        """This backend as the serving engine runs it (a ``workers.engine.model.EngineModel``), or None when
        it can only run through its own ``report`` / ``answer``."""
        return None

    def parameter_bytes(self) -> int:
        """Bytes of the loaded weights (readiness key, `radialog model check`); 0 when not known."""
        return 0

    @abc.abstractmethod
    def answer(self, request: DialogRequest, on_token: TokenCallback | None = None) -> str:
        """Answer one dialog turn; ``on_token`` receives text pieces as they are generated."""
