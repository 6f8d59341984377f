"""XrayGPT as the engine serves it: EVA ViT-g + Q-Former + llama_proj, spliced at ``<ImageHere>``.

Images are resized in the submitting thread; an admission group is encoded together in the engine thread.
Sequences end at EOS or after "###" (kept in the tokens, cut by the post-processing), as in the simple path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from workers.engine.model import EngineModel, ReportRows
from workers.models.xraygpt.preprocess import to_tensor

if TYPE_CHECKING:
    from workers.models.base import DialogRequest
    from workers.models.xraygpt.backend import AnswerStreamer, XrayGPTBackend


@dataclass
class _Input:
    prompt: str
    pixels: torch.Tensor  # [3, 224, 224]


class XrayGPTServed(EngineModel):
    def __init__(self, backend: XrayGPTBackend) -> None:
        self.backend = backend
        self.language_model = backend.model.llama_model
        self.eos_id = backend.eos_id
        self.stop_sequences = backend.stops
        self.max_positions = int(self.language_model.config.max_position_embeddings)

    def report_token_limit(self) -> int:
        return self.backend.report_token_limit()

    def longest_report_positions(self) -> int:
        return self.backend.count_tokens(self.backend.report_prompt())  # one question for every study

    def prepare_reports(self, images: Sequence[np.ndarray]) -> list[Any]:
        prompt = self.backend.report_prompt()
        return [_Input(prompt, to_tensor(image)) for image in images]

    def embed_reports(self, inputs: list[Any]) -> ReportRows:
        started = time.perf_counter()
        rows = self.backend.embed([i.prompt for i in inputs], torch.stack([i.pixels for i in inputs]))
        return ReportRows(rows, [None] * len(rows), [None] * len(rows), {"vision": time.perf_counter() - started})

    def prepare_dialog(self, prompt: str, image: np.ndarray) -> tuple[Any, int]:
        return _Input(prompt, to_tensor(image)), self.backend.count_tokens(prompt)  # count_tokens checks it

    def embed_dialogs(self, inputs: list[Any]) -> list[torch.Tensor]:
        return self.backend.embed([i.prompt for i in inputs], torch.stack([i.pixels for i in inputs]))

    def streamer(self, on_text: Callable[[str], None]) -> AnswerStreamer:
        from workers.models.xraygpt.backend import AnswerStreamer

        return AnswerStreamer(self.backend, on_text)

    def text(self, tokens: Sequence[int]) -> str:
        return self.backend.text(tokens)

    def dialog_input(self, request: DialogRequest) -> tuple[str, int]:
        return self.backend.dialog_prompt(request)
