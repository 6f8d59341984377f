"""The XrayGPT backend: one fixed report question, no classifier, "###"-separated Patient/Doctor dialog.

Text -> ids as the reference's ``get_context_emb``: the prompt is split at ``<ImageHere>``; the part before
gets ``<s>``, the part after no special tokens, each tokenised on its own (so each gets sentencepiece's
dummy "▁" prefix) by the slow ``LlamaTokenizer``'s legacy rules (``SlowLlamaEncoder``: a text piece after a
``</s>`` typed in a question or report gets the dummy prefix too; transformers' fast tokenizer differs
there); the 32 image embeddings go between them. Generation is greedy by default (the reference
demo samples; :class:`~workers.models.base.Sampling` asks for that per dialog turn) and stops at EOS or at
"###" (ids [835] or [2277, 29937] in the real vocabulary; derived from the tokenizer otherwise). The answer
is post-processed as the reference does (:func:`workers.models.xraygpt.prompts.postprocess`), except that a
final ``</s>`` is not kept in the text (the reference decodes it into the answer; it is no part of one).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from workers.models.base import (
    DialogRequest,
    ModelBackend,
    Provenance,
    ReportOutput,
    StudyInput,
    TokenCallback,
    UnsupportedTask,
)
from workers.models.capabilities import XRAYGPT
from workers.models.common.llama import ends_with_any
from workers.models.conversation import fit_history
from workers.models.xraygpt import prompts
from workers.models.xraygpt.loader import LoadedXrayGPT
from workers.models.xraygpt.preprocess import batch_tensors

MODEL_NAME = "XrayGPT"
MODEL_VERSION = "1.0"
#: A tiny random checkpoint's text is noise: cap its answers so tests and the demo stay quick on CPU.
TINY_MAX_NEW_TOKENS = 32
#: The reference's stop ids for "###" in the real LLaMA vocabulary (it can be one token or two).
REFERENCE_STOPS = ((835,), (2277, 29937))


def stop_sequences(tokenizer: Any) -> tuple[tuple[int, ...], ...]:
    """Id sequences that end an answer ("###"): the reference's ids for the real LLaMA vocabulary, else
    this vocabulary's own single-token and "##"+"#" forms, plus how it spells "###" after other text."""
    pieces = tokenizer.convert_ids_to_tokens
    if len(tokenizer) >= 32000 and pieces(835) in ("###", "▁###") and tuple(pieces([2277, 29937])) == ("##", "#"):
        return REFERENCE_STOPS
    vocab = tokenizer.get_vocab()
    stops: list[tuple[int, ...]] = [(vocab[p],) for p in ("###", "▁###") if p in vocab]
    if "##" in vocab and "#" in vocab:
        stops.append((vocab["##"], vocab["#"]))
    probe = tokenizer("x", add_special_tokens=False).input_ids
    glued = tokenizer("x" + prompts.SEP, add_special_tokens=False).input_ids
    if glued[: len(probe)] == probe and len(glued) > len(probe):
        stops.append(tuple(glued[len(probe) :]))
    return tuple(dict.fromkeys(stops))


class _StopOnSequences(StoppingCriteria):
    """Per row: done once its new tokens end with a stop sequence (the reference checks row 0 only), never
    before ``min_new_tokens`` (benchmarks force lengths; min_new_tokens holds back EOS likewise)."""

    def __init__(self, stops: Sequence[Sequence[int]], min_new_tokens: int = 0) -> None:
        self.stops, self.min_new_tokens = stops, min_new_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = [len(row) >= self.min_new_tokens and ends_with_any(row, self.stops) for row in input_ids.tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]  # bool dtype


def trim(tokens: Sequence[int], eos: int, stops: Sequence[Sequence[int]], min_new_tokens: int = 0) -> list[int]:
    """New tokens up to (excluding) EOS or up to (including) the first stop sequence, whichever is first
    (a stop sequence ending before ``min_new_tokens`` does not count)."""
    out: list[int] = []
    for token in tokens:
        if token == eos:
            break
        out.append(token)
        if len(out) >= min_new_tokens and ends_with_any(out, stops):
            break
    return out


class AnswerStreamer:
    """Streams the post-processed answer: text pieces that will stay in it, as tokens arrive.

    The last word is held back until the next one starts (it may grow into "###", "Doctor:" or
    "ChatDoctor"), as is a trailing "Chat" (it may become "Chat Doctor"), and text ending in an incomplete
    byte-fallback character. If post-processing changes text already sent (a "Doctor:" mid-answer), nothing
    more is streamed: the final answer (the "done" message) is authoritative.
    """

    def __init__(self, backend: XrayGPTBackend, on_text: TokenCallback) -> None:
        self.backend, self.on_text = backend, on_text
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        ids = value.flatten().tolist()
        if len(ids) != 1 or self.stopped:
            return
        self.tokens.extend(ids)
        raw = self.backend.tokenizer.decode(self.tokens)
        if raw.endswith("\ufffd"):
            return
        text = self.backend.text(self.tokens)
        if prompts.SEP in raw:  # the answer is complete
            self._send(text)
            self.stopped = True
            return
        cut = text.rfind(" ")
        stable = text[:cut] if cut >= 0 else ""
        if stable.endswith(" Chat") or stable == "Chat":
            stable = stable[: -len("Chat")].rstrip()
        self._send(stable)

    def end(self) -> None:
        if not self.stopped:
            self._send(self.backend.text(self.tokens))
            self.stopped = True

    def _send(self, text: str) -> None:
        if not text.startswith(self.sent):
            self.stopped = True
            return
        if len(text) > len(self.sent):
            self.on_text(text[len(self.sent) :])
            self.sent = text


class XrayGPTBackend(ModelBackend):
    """Loaded once per worker; ``report`` takes a batch, ``answer`` one dialog turn."""

    capabilities = XRAYGPT

    def __init__(self, loaded: LoadedXrayGPT) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer  # decodes; prompts are encoded by ``encoder``
        self.encoder = loaded.encoder
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.stops = stop_sequences(self.tokenizer)
        self.queries = self.model.bridge.size.queries
        self.provenance = Provenance(
            name=MODEL_NAME,
            version=MODEL_VERSION,
            files_sha256=loaded.sha256,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            tiny=loaded.files.tiny if loaded.files is not None else True,
            display_name=XRAYGPT.model_name,
        )

    # -- text ------------------------------------------------------------------------------------
    def prompt_segments(self, prompt: str) -> tuple[list[int], list[int]]:
        """(ids before <ImageHere> with <s>, ids after it without special tokens).

        The image goes where the first <ImageHere> is: the image message opens the first Patient turn and
        the system text holds none. The reference splits at every one and fails when a user's text (a
        question, an edited report) contains the string; here such text stays text.
        """
        before_text, placeholder, after_text = prompt.partition(prompts.IMAGE_PLACEHOLDER)
        if not placeholder:
            raise ValueError(f"a prompt must hold {prompts.IMAGE_PLACEHOLDER} (the image message opens the first turn)")
        before = self.encoder.encode(before_text, add_special_tokens=True)
        after = self.encoder.encode(after_text, add_special_tokens=False)
        return before, after

    def count_tokens(self, prompt: str) -> int:
        """Model positions a prompt takes (the placeholder becomes the 32 query embeddings)."""
        before, after = self.prompt_segments(prompt)
        return len(before) + self.queries + len(after)

    def text(self, tokens: Sequence[int]) -> str:
        """The reference's answer text: leading <unk> then <s> dropped, decoded, post-processed."""
        ids = list(tokens)
        if ids and ids[0] == 0:
            ids = ids[1:]
        if ids and ids[0] == 1:
            ids = ids[1:]
        return prompts.postprocess(self.tokenizer.decode(ids, skip_special_tokens=False))

    def report_prompt(self) -> str:
        return prompts.conversation_prompt([], prompts.REPORT_QUESTION)

    def _limit(self, task_limit: int) -> int:
        return min(task_limit, TINY_MAX_NEW_TOKENS) if self.provenance.tiny else task_limit

    def report_token_limit(self) -> int:
        return self._limit(prompts.TASK_MAX_NEW_TOKENS["report"])

    def dialog_prompt(self, request: DialogRequest) -> tuple[str, int]:
        """The turn's full prompt (oldest follow-ups dropped to fit 2,000 positions) and its token limit."""
        if not XRAYGPT.supports(request.task):
            raise UnsupportedTask(f"XrayGPT was not trained for the {request.task!r} task; ask a free question")
        if not request.history:
            raise ValueError("an XrayGPT conversation starts with the report turn (it carries the image)")
        limit = request.max_new_tokens or self._limit(prompts.TASK_MAX_NEW_TOKENS[request.task])
        history, _dropped = fit_history(
            request.history,
            request.question,
            self.count_tokens,
            limit,
            prompts.MAX_LENGTH,
            build=prompts.conversation_prompt,
        )
        return prompts.conversation_prompt(history, request.question), limit

    # -- model -----------------------------------------------------------------------------------
    def embed(self, prompts_: Sequence[str], pixels: torch.Tensor) -> list[torch.Tensor]:
        """One [T_i, hidden] input row per prompt: its segments around the image's 32 embeddings."""
        images = self.model.encode_images(pixels)
        return self.model.splice([self.prompt_segments(p) for p in prompts_], images)

    @torch.inference_mode()
    def generate(
        self,
        prompts_: Sequence[str],
        images: Sequence[np.ndarray],
        max_new_tokens: int,
        *,
        min_new_tokens: int | None = None,
        sampling: Any = None,
        on_token: TokenCallback | None = None,
        pixels: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """New tokens per (prompt, image), as one left-padded batch through transformers' generate."""
        if pixels is None:
            pixels = batch_tensors(list(images))
        rows = self.embed(prompts_, pixels)
        longest = max(len(r) for r in rows)
        embeds = torch.zeros(len(rows), longest, rows[0].shape[1], dtype=rows[0].dtype, device=self.model.device)
        mask = torch.zeros(len(rows), longest, dtype=torch.long, device=self.model.device)
        for i, row in enumerate(rows):
            embeds[i, longest - len(row) :] = row
            mask[i, longest - len(row) :] = 1
        options: dict[str, Any] = {"do_sample": False}
        if sampling is not None:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            options = {
                "do_sample": True,
                "top_p": sampling.top_p,
                "temperature": sampling.temperature,
                "top_k": sampling.top_k,
            }
        if min_new_tokens:
            options["min_new_tokens"] = min_new_tokens
        streamer = _GenerateStreamer(AnswerStreamer(self, on_token), self.eos_id) if on_token else None
        out = self.model.llm().generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            num_beams=1,
            eos_token_id=self.eos_id,
            pad_token_id=self.eos_id,
            stopping_criteria=StoppingCriteriaList([_StopOnSequences(self.stops, min_new_tokens or 0)]),
            streamer=streamer,
            use_cache=True,
            **options,
        )
        return [trim(row, self.eos_id, self.stops, min_new_tokens or 0) for row in out.tolist()]

    def report(
        self, studies: Sequence[StudyInput], *, max_new_tokens: int | None = None, min_new_tokens: int | None = None
    ) -> list[ReportOutput]:
        """The report question for each study, as one batch (greedy)."""
        if not studies:
            return []
        t0 = time.perf_counter()
        pixels = batch_tensors([s.image for s in studies])
        t1 = time.perf_counter()
        prompt = self.report_prompt()
        tokens = self.generate(
            [prompt] * len(studies),
            [],
            max_new_tokens or self.report_token_limit(),
            min_new_tokens=min_new_tokens,
            pixels=pixels,
        )
        timings = {"preprocess": t1 - t0, "generate": time.perf_counter() - t1, "batch_size": float(len(studies))}
        return [
            ReportOutput(
                key=s.key,
                findings_text=self.text(out),
                findings=[],
                findings_phrase="",
                generated_tokens=len(out),
                timings=dict(timings),
            )
            for s, out in zip(studies, tokens)
        ]

    def answer(self, request: DialogRequest, on_token: TokenCallback | None = None) -> str:
        prompt, limit = self.dialog_prompt(request)
        (out,) = self.generate([prompt], [request.image], limit, sampling=request.sampling, on_token=on_token)
        return self.text(out)

    def engine_model(self):  # -> XrayGPTServed
        from workers.models.xraygpt.serving import XrayGPTServed

        return XrayGPTServed(self)

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


class _GenerateStreamer:
    """transformers' streamer protocol around :class:`AnswerStreamer` (new tokens only; EOS ends it)."""

    def __init__(self, streamer: AnswerStreamer, eos: int) -> None:
        self.streamer, self.eos, self.done = streamer, eos, False

    def put(self, value: torch.Tensor) -> None:
        if self.done or value.numel() != 1:  # prompt echo would be >1; we generate from embeddings
            return
        if int(value.item()) == self.eos:
            self.done = True
            return
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()


def load_xraygpt_backend(vision_dir: Any, llm_dir: Any, checkpoint: Any, device: str = "auto") -> XrayGPTBackend:
    from workers.models.xraygpt.loader import load_xraygpt

    with torch.inference_mode(False):
        return XrayGPTBackend(load_xraygpt(vision_dir, llm_dir, checkpoint, device))
