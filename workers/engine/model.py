"""What the engine needs from a model backend, whatever built its inputs: a Llama and input embeddings.

The engine owns the Llama's decoding (slots, positions, batching); a backend turns a request into the rows
of input embeddings that go into the Llama (its vision tower, its prompt format, its splice) and says when
a sequence ends (EOS, and any stop sequences such as XrayGPT's "###") and how its tokens read as text.
Work is split in two: ``prepare_*`` runs in the submitting thread (image resizing, tokenising), ``embed_*``
in the engine thread (anything on the accelerator), one admission group at a time.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from workers.models.base import ClassifierFinding, DialogRequest


class Streamer(Protocol):
    """Receives each new token (a one-element tensor) and the end; passes text pieces to a callback."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


@dataclass
class ReportRows:
    """An admission group's reports as Llama input rows ([T_i, hidden] each), with what else was found."""

    rows: list[torch.Tensor]
    findings: list[list[ClassifierFinding] | None]  # per report: the classifier's labels (None: no classifier)
    phrases: list[str | None]  # per report: the findings phrase given to the LLM (None: none)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, for the whole group


class EngineModel(abc.ABC):
    """A backend as the engine serves it; see the module docstring."""

    #: The ``LlamaForCausalLM`` whose modules the decode steps run.
    language_model: Any
    eos_id: int
    #: Id sequences that end a sequence besides EOS; they stay in its tokens (as with a StoppingCriteria).
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    #: Most positions one sequence may take (the model's context window); None = only the slots bound it.
    max_positions: int | None = None

    @abc.abstractmethod
    def report_token_limit(self) -> int:
        """New tokens of a report."""

    @abc.abstractmethod
    def longest_report_positions(self) -> int:
        """Model positions of the longest report prompt (sizes the report slots and the prefill budget)."""

    @abc.abstractmethod
    def prepare_reports(self, images: Sequence[np.ndarray]) -> list[Any]:
        """Per image, what :meth:`embed_reports` needs (caller's thread: resizing happens here)."""

    @abc.abstractmethod
    def embed_reports(self, inputs: list[Any]) -> ReportRows:
        """Input rows for an admission group of reports (engine thread)."""

    @abc.abstractmethod
    def prepare_dialog(self, prompt: str, image: np.ndarray) -> tuple[Any, int]:
        """(what :meth:`embed_dialogs` needs, model positions of the prompt) for one turn (caller's thread)."""

    @abc.abstractmethod
    def embed_dialogs(self, inputs: list[Any]) -> list[torch.Tensor]:
        """Input rows for an admission group of dialog turns (engine thread)."""

    @abc.abstractmethod
    def streamer(self, on_text: Callable[[str], None]) -> Streamer:
        """A streamer that turns this model's tokens into the text pieces a client sees."""

    @abc.abstractmethod
    def text(self, tokens: Sequence[int]) -> str:
        """The answer text of a finished sequence's tokens (post-processing included)."""

    @abc.abstractmethod
    def dialog_input(self, request: DialogRequest) -> tuple[str, int]:
        """The turn's full prompt (history fitted to the context) and its new-token limit."""
