"""The RaDialog v1 backend: classifier (488 px) -> findings phrase -> report prompt with 32 ``<IMG>`` -> BioViL-T +
Q-Former (448 px) spliced there -> Vicuna-7B v1.3 with its LoRA, greedy.

Generation as the reference's ``test.py``: greedy, up to 300 new tokens for a report, stop at ``</s>``; the
answer is the new tokens decoded without special tokens. The reference decodes prompt and answer together and
keeps what follows "ASSISTANT:" (``split("ASSISTANT:")``); we decode the new tokens only and strip the
surrounding whitespace (as the training data's answers are), so an answer in which the model itself writes
"ASSISTANT:" is kept whole. Conversations: the report turn first (it carries the image), then the follow-ups;
prompt + new tokens within Vicuna v1.3's 2,048 positions (oldest follow-ups dropped first).
"""

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
    UnsupportedTask,
)
from workers.models.capabilities import RADIALOG_V1
from workers.models.conversation import conversation_prompt, fit_history
from workers.models.radialog_v1 import prompts
from workers.models.radialog_v1.loader import LoadedRadialogV1
from workers.models.radialog_v1.tokens import prompt_ids
from workers.models.radialog_v2.llava import CallbackStreamer
from workers.models.radialog_v2.transforms import CLASSIFIER_CROP, LLM_CROP, batch_tensors, branch_batches

MODEL_NAME = "RaDialog-v1"
MODEL_VERSION = "1.0"
#: A tiny random checkpoint's text is noise: cap its answers so tests and the demo stay quick on CPU.
TINY_MAX_NEW_TOKENS = 32


def model_version(projector: str) -> str:
    """The version written into the SR: "1.0" with the checkpoint's projector, else it names the replay."""
    return MODEL_VERSION if projector == "checkpoint" else f"{MODEL_VERSION}+projector-{projector}"


class RadialogV1Backend(ModelBackend):
    """Loaded once per worker; ``report`` takes a batch, ``answer`` one dialog turn."""

    capabilities = RADIALOG_V1

    def __init__(self, loaded: LoadedRadialogV1) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.classifier = loaded.classifier
        self.tokenizer = loaded.tokenizer  # decodes; prompts are encoded by ``encoder`` (the reference's ids)
        self.encoder = loaded.encoder
        self.eos_id = int(self.encoder.eos_id)
        self.provenance = Provenance(
            name=MODEL_NAME,
            version=model_version(loaded.projector),
            files_sha256=loaded.sha256,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            tiny=loaded.files.tiny if loaded.files is not None else True,
            display_name=RADIALOG_V1.model_name,
        )

    # -- text ------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        return prompt_ids(prompt, self.encoder)

    def count_tokens(self, prompt: str) -> int:
        """Model positions a prompt takes (the 32 placeholders are the image's positions)."""
        return len(self.prompt_ids(prompt))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def _limit(self, task_limit: int) -> int:
        return min(task_limit, TINY_MAX_NEW_TOKENS) if self.provenance.tiny else task_limit

    def report_token_limit(self) -> int:
        return self._limit(prompts.TASK_MAX_NEW_TOKENS["report"])

    def report_prompts(self, findings: Sequence[Sequence[ClassifierFinding]]) -> tuple[list[str], list[str]]:
        """Findings phrases and full report prompts from the classifier's output (one per study)."""
        phrases = [prompts.findings_phrase(tuple(f.label for f in row if f.present)) for row in findings]
        return phrases, [conversation_prompt([], prompts.report_prompt(p)) for p in phrases]

    def dialog_prompt(self, request: DialogRequest) -> tuple[str, int]:
        """The turn's full prompt (oldest follow-ups dropped to fit 2,048 positions) and its token limit."""
        if not RADIALOG_V1.supports(request.task):
            raise UnsupportedTask(f"RaDialog v1 was not trained for the {request.task!r} task; ask a free question")
        if not request.history or prompts.IMAGE_RUN not in request.history[0].question:
            raise ValueError("a RaDialog v1 conversation starts with the report turn (it carries the image)")
        limit = request.max_new_tokens or self._limit(prompts.TASK_MAX_NEW_TOKENS[request.task])
        history, _dropped = fit_history(
            request.history, request.question, self.count_tokens, limit, prompts.MAX_CONTEXT_TOKENS
        )
        return conversation_prompt(history, request.question), limit

    # -- model -----------------------------------------------------------------------------------
    def classify(
        self,
        images: Sequence[np.ndarray],
        pixels: torch.Tensor | None = None,
    ) -> list[list[ClassifierFinding]]:
        """CheXpert findings per image (``pixels``: the 488-px batch when already prepared)."""
        if pixels is None:
            pixels = batch_tensors(list(images), CLASSIFIER_CROP)
        return self.classifier.predict(pixels.to(self.loaded.device, self.loaded.classifier_dtype))

    def embed(self, prompts_: Sequence[str], pixels: torch.Tensor) -> list[torch.Tensor]:
        """One [T_i, hidden] input row per prompt, the image's 32 embeddings at its placeholders."""
        return self.model.splice([self.prompt_ids(p) for p in prompts_], self.model.encode_images(pixels))

    @torch.inference_mode()
    def generate(
        self,
        prompts_: Sequence[str],
        images: Sequence[np.ndarray],
        max_new_tokens: int,
        *,
        min_new_tokens: int | None = None,
        on_token: TokenCallback | None = None,
        pixels: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """Greedy new tokens per (prompt, image), as one left-padded batch through transformers' generate."""
        if pixels is None:
            pixels = batch_tensors(list(images), LLM_CROP)
        rows = self.embed(prompts_, pixels)
        longest = max(len(r) for r in rows)
        device = self.model.device
        embeds = torch.zeros(len(rows), longest, rows[0].shape[1], dtype=rows[0].dtype, device=device)
        mask = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            embeds[i, longest - len(row) :] = row
            mask[i, longest - len(row) :] = 1
        options = {"min_new_tokens": min_new_tokens} if min_new_tokens else {}
        streamer = CallbackStreamer(self.tokenizer.decode, on_token, self.eos_id) if on_token else None
        out = self.model.llm().generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.eos_id,
            pad_token_id=0,
            streamer=streamer,
            use_cache=True,
            **options,
        )
        return [row[: row.index(self.eos_id)] if self.eos_id in row else row for row in out.tolist()]

    def report(
        self, studies: Sequence[StudyInput], *, max_new_tokens: int | None = None, min_new_tokens: int | None = None
    ) -> list[ReportOutput]:
        """Classifier + report for a batch; the token limits are for benchmarks only."""
        if not studies:
            return []
        images = [s.image for s in studies]
        t0 = time.perf_counter()
        batches = branch_batches(images, (CLASSIFIER_CROP, LLM_CROP))
        t1 = time.perf_counter()
        findings = self.classify(images, batches[CLASSIFIER_CROP])
        t2 = time.perf_counter()
        phrases, report_prompts = self.report_prompts(findings)
        tokens = self.generate(
            report_prompts,
            images,
            max_new_tokens or self.report_token_limit(),
            min_new_tokens=min_new_tokens,
            pixels=batches[LLM_CROP],
        )
        timings = {
            "preprocess": t1 - t0,
            "classifier": t2 - t1,
            "generate": time.perf_counter() - t2,
            "batch_size": float(len(studies)),
        }
        return [
            ReportOutput(
                key=s.key,
                findings_text=self.decode(out),
                findings=row,
                findings_phrase=phrase,
                generated_tokens=len(out),
                timings=dict(timings),
            )
            for s, row, phrase, out in zip(studies, findings, phrases, tokens)
        ]

    def answer(self, request: DialogRequest, on_token: TokenCallback | None = None) -> str:
        prompt, limit = self.dialog_prompt(request)
        (out,) = self.generate([prompt], [request.image], limit, on_token=on_token)
        return self.decode(out)

    def engine_model(self):  # -> RadialogV1Served
        from workers.models.radialog_v1.serving import RadialogV1Served

        return RadialogV1Served(self)

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in (self.model, self.classifier) for p in m.parameters())


def load_radialog_v1_backend(root, adapter, llm_dir, biovil, device: str = "auto") -> RadialogV1Backend:
    from workers.models.radialog_v1.loader import load_radialog_v1

    with torch.inference_mode(False):
        return RadialogV1Backend(load_radialog_v1(root, adapter, llm_dir, biovil, device))
