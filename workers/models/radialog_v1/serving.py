"""RaDialog v1 as the engine serves it: classifier (488 px) -> report prompt -> BioViL-T + Q-Former (448 px) ->
splice at the 32 ``<IMG>`` ids. The same calls in the same order as the simple path
(``RadialogV1Backend.generate``): images are resized in the submitting thread, an admission group is
classified and encoded together in the engine thread (BatchNorm with stored statistics: batch-independent).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from workers.engine.model import EngineModel, ReportRows
from workers.models.radialog_v1.prompts import MAX_CONTEXT_TOKENS
from workers.models.radialog_v2.llava import CallbackStreamer
from workers.models.radialog_v2.transforms import CLASSIFIER_CROP, LLM_CROP, branch_batches

if TYPE_CHECKING:
    from workers.models.base import DialogRequest
    from workers.models.radialog_v1.backend import RadialogV1Backend


@dataclass
class _Report:
    classifier_pixels: torch.Tensor  # [3, 488, 488]
    llm_pixels: torch.Tensor  # [3, 448, 448]


@dataclass
class _Dialog:
    ids: list[int]  # the whole prompt, the 32 image ids included
    llm_pixels: torch.Tensor


class RadialogV1Served(EngineModel):
    def __init__(self, backend: RadialogV1Backend) -> None:
        self.backend = backend
        self.language_model = backend.model.llama_model
        self.eos_id = backend.eos_id
        self.max_positions = min(MAX_CONTEXT_TOKENS, int(self.language_model.config.max_position_embeddings))

    def report_token_limit(self) -> int:
        return self.backend.report_token_limit()

    def longest_report_positions(self) -> int:
        """Every CheXpert label predicted gives the longest findings phrase."""
        from workers.models.base import ClassifierFinding
        from workers.models.prompts import CHEXPERT_LABELS

        everything = [[ClassifierFinding(label, 1.0, True) for label in CHEXPERT_LABELS]]
        _, (prompt,) = self.backend.report_prompts(everything)
        return self.backend.count_tokens(prompt)

    def prepare_reports(self, images: Sequence[np.ndarray]) -> list[Any]:
        batches = branch_batches(list(images), (CLASSIFIER_CROP, LLM_CROP))
        return [_Report(batches[CLASSIFIER_CROP][i], batches[LLM_CROP][i]) for i in range(len(images))]

    def embed_reports(self, inputs: list[Any]) -> ReportRows:
        started = time.perf_counter()
        findings = self.backend.classify([], torch.stack([r.classifier_pixels for r in inputs]))
        t_cls = time.perf_counter()
        phrases, prompts = self.backend.report_prompts(findings)
        rows = self.backend.embed(prompts, torch.stack([r.llm_pixels for r in inputs]))
        return ReportRows(
            rows, list(findings), list(phrases), {"classifier": t_cls - started, "vision": time.perf_counter() - t_cls}
        )

    def prepare_dialog(self, prompt: str, image: np.ndarray) -> tuple[Any, int]:
        ids = self.backend.prompt_ids(prompt)
        pixels = branch_batches([image], (LLM_CROP,))[LLM_CROP][0]
        return _Dialog(ids, pixels), len(ids)

    def embed_dialogs(self, inputs: list[Any]) -> list[torch.Tensor]:
        features = self.backend.model.encode_images(torch.stack([d.llm_pixels for d in inputs]))
        return self.backend.model.splice([d.ids for d in inputs], features)

    def streamer(self, on_text: Callable[[str], None]) -> CallbackStreamer:
        return CallbackStreamer(self.backend.tokenizer.decode, on_text, self.eos_id)

    def text(self, tokens: Sequence[int]) -> str:
        return self.backend.decode(tokens)

    def dialog_input(self, request: DialogRequest) -> tuple[str, int]:
        return self.backend.dialog_prompt(request)
