"""The RaDialog v2 backend: classifier -> findings phrase -> report prompt -> batched greedy generation."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from workers.models.base import (
    ClassifierFinding,
    DialogRequest,
    ModelBackend,
    Provenance,
    ReportOutput,
    StudyInput,
    TokenCallback,
)
from workers.models.capabilities import RADIALOG_V2
from workers.models.conversation import conversation_prompt, fit_history
from workers.models.llama_tokenizer import image_prompt_ids
from workers.models.prompts import (
    IMAGE_PLACEHOLDER,
    MAX_CONTEXT_TOKENS,
    TASK_MAX_NEW_TOKENS,
    findings_phrase,
    report_prompt,
)
from workers.models.radialog_v2.llava import IMAGE_TOKEN_INDEX, NUM_IMAGE_TOKENS, CallbackStreamer
from workers.models.radialog_v2.loader import LoadedModel
from workers.models.radialog_v2.transforms import CLASSIFIER_CROP, LLM_CROP, batch_tensors, branch_batches

MODEL_NAME = "RaDialog-LLaVA"
MODEL_VERSION = "2.0"
#: A tiny random checkpoint's text is noise: cap its answers so tests and the demo stay quick on CPU.
TINY_MAX_NEW_TOKENS = 32


class RadialogV2Backend(ModelBackend):
    """Loaded once per worker; ``report`` takes a batch, ``answer`` one dialog turn."""

    capabilities = RADIALOG_V2

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.llava = loaded.llava
        self.classifier = loaded.classifier
        self.tokenizer = loaded.tokenizer  # decodes; prompts are encoded by ``encoder`` (reference ids)
        if loaded.encoder is None:
            raise ValueError("LoadedModel.encoder is required (SlowLlamaEncoder.from_directory(tokenizer dir))")
        self.encoder = loaded.encoder
        #: Extra transformers generate options (e.g. {"cache_implementation": "static"}); empty = dynamic cache.
        self.generate_options: dict[str, object] = {}
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.provenance = Provenance(
            name=MODEL_NAME,
            version=MODEL_VERSION,
            files_sha256=loaded.sha256,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            tiny=loaded.files.tiny if loaded.files is not None else True,  # no files: random weights
            display_name=RADIALOG_V2.model_name,
        )

    # -- text ------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        """The reference's ids: LLaVA's tokenizer_image_token over the slow sentencepiece tokenizer's ids."""
        return image_prompt_ids(prompt, self.encoder, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX)

    def count_tokens(self, prompt: str) -> int:
        """Model positions a prompt takes (the placeholder becomes 196 image embeddings)."""
        ids = self.prompt_ids(prompt)
        return len(ids) + ids.count(IMAGE_TOKEN_INDEX) * (NUM_IMAGE_TOKENS - 1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def _limit(self, task_limit: int) -> int:
        """The task's new-token limit; capped for a tiny random model (see TINY_MAX_NEW_TOKENS)."""
        return min(task_limit, TINY_MAX_NEW_TOKENS) if self.provenance.tiny else task_limit

    # -- model -----------------------------------------------------------------------------------
    def classify(
        self, images: Sequence[np.ndarray], pixels: torch.Tensor | None = None
    ) -> list[list[ClassifierFinding]]:
        """CheXpert findings per image (``pixels``: the 488-px batch when already prepared)."""
        if pixels is None:
            pixels = batch_tensors(list(images), CLASSIFIER_CROP)
        return self.classifier.predict(pixels.to(self.loaded.device, self.loaded.classifier_dtype))

    def generate(
        self,
        prompts: Sequence[str],
        images: Sequence[np.ndarray],
        max_new_tokens: int,
        *,
        min_new_tokens: int | None = None,
        on_token: TokenCallback | None = None,
        pixels: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """Greedy new tokens for each (prompt, image) pair, as one left-padded batch."""
        ids = [self.prompt_ids(p) for p in prompts]
        if pixels is None:
            pixels = batch_tensors(list(images), LLM_CROP)
        streamer = CallbackStreamer(self.tokenizer.decode, on_token, self.eos_id) if on_token else None
        return self.llava.generate(
            ids,
            pixels,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            min_new_tokens=min_new_tokens,
            streamer=streamer,
            **self.generate_options,
        )

    def report(
        self, studies: Sequence[StudyInput], *, max_new_tokens: int | None = None, min_new_tokens: int | None = None
    ) -> list[ReportOutput]:
        """Classifier + report generation for a batch; the token limits are for benchmarks only."""
        if not studies:
            return []
        images = [s.image for s in studies]
        t0 = time.perf_counter()
        batches = branch_batches(images, (CLASSIFIER_CROP, LLM_CROP))
        t_pre = time.perf_counter()
        findings = self.classify(images, batches[CLASSIFIER_CROP])
        t1 = time.perf_counter()
        phrases, prompts = self.report_prompts(findings)
        limit = max_new_tokens or self.report_token_limit()
        tokens = self.generate(prompts, images, limit, min_new_tokens=min_new_tokens, pixels=batches[LLM_CROP])
        t2 = time.perf_counter()
        # per batch, in seconds (every study of the batch gets the same figures)
        timings = {
            "preprocess": t_pre - t0,
            "classifier": t1 - t_pre,
            "generate": t2 - t1,
            "batch_size": float(len(studies)),
        }
        return [
            ReportOutput(
                key=study.key,
                findings_text=self.decode(out),
                findings=row,
                findings_phrase=phrase,
                generated_tokens=len(out),
                timings=dict(timings),
            )
            for study, row, phrase, out in zip(studies, findings, phrases, tokens)
        ]

    def dialog_prompt(self, request: DialogRequest) -> tuple[str, int]:
        """The turn's full prompt (history fitted to the context rule) and its new-token limit."""
        limit = request.max_new_tokens or self._limit(
            TASK_MAX_NEW_TOKENS.get(request.task, TASK_MAX_NEW_TOKENS["free"])
        )
        history, _dropped = fit_history(request.history, request.question, self.count_tokens, limit, MAX_CONTEXT_TOKENS)
        prompt = conversation_prompt(history, request.question)
        if prompt.count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(
                "the conversation must hold the image placeholder exactly once "
                f"(found {prompt.count(IMAGE_PLACEHOLDER)}); "
                "its first turn is the report prompt or the view question"
            )
        return prompt, limit

    def report_prompts(self, findings: Sequence[Sequence[ClassifierFinding]]) -> tuple[list[str], list[str]]:
        """Findings phrases and report prompts from the classifier's output (one per study)."""
        phrases = [findings_phrase([f.label for f in row if f.present]) for row in findings]
        return phrases, [conversation_prompt([], report_prompt(p)) for p in phrases]

    def report_token_limit(self) -> int:
        return self._limit(TASK_MAX_NEW_TOKENS["report"])

    def engine_model(self):  # -> RadialogV2Served
        from workers.models.radialog_v2.serving import RadialogV2Served

        return RadialogV2Served(self)

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in (self.llava, self.classifier) for p in m.parameters())

    def answer(self, request: DialogRequest, on_token: TokenCallback | None = None) -> str:
        prompt, limit = self.dialog_prompt(request)
        (out,) = self.generate([prompt], [request.image], limit, on_token=on_token)
        return self.decode(out)


def load_radialog_v2(model_dir, base_dir, device: str = "auto") -> RadialogV2Backend:
    from workers.models.radialog_v2.loader import load_radialog

    with torch.inference_mode(False):
        return RadialogV2Backend(load_radialog(model_dir, base_dir, device))
