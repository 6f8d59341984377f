"""The engine thread: admits requests between decode steps, dialog first, and decodes every live sequence.

One loop iteration: take what was submitted; drop what was cancelled; admit waiting dialog turns (their
image through the vision tower, prompt prefilled into the dialog pool); else, when no turn streams, admit
waiting reports up to the free report slots and a prompt-token budget (classifier at 488 px and vision
tower at 448 px for the whole group, then one prefill); then one decode step over all live sequences.
While a dialog turn streams, only ``reports_beside_dialog`` report rows decode beside it and no report
prefill runs, so the turn's tokens come at close to the single-stream pace.

Greedy decoding, per sequence: EOS is suppressed until ``min_new_tokens``; a sequence ends at EOS (not
returned), at its ``max_new_tokens`` or when its slot is full. Results are those of the same prompt run
alone (:mod:`workers.engine.decoder`); the vision tower normalises each image by itself, so nothing about
a study depends on the others in its batch.

Callers submit from any thread and wait on a :class:`Handle`; ``on_token`` callbacks run in the engine
thread and must be quick (a Redis publish is). An error in one request's callback fails that request only;
an error in a shared step fails the requests of that step, and the engine goes on.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radialog.logging import get_logger
from workers.engine.decoder import Group, LlamaSteps
from workers.engine.kv_pool import KVPool
from workers.models.radialog_v2.llava import CallbackStreamer
from workers.models.radialog_v2.transforms import CLASSIFIER_CROP, LLM_CROP, branch_batches

if TYPE_CHECKING:
    from workers.models.base import ClassifierFinding
    from workers.models.radialog_v2.backend import RadialogV2Backend

log = get_logger(__name__)

REPORT, DIALOG = "report", "dialog"


class RequestCancelled(RuntimeError):
    """The request was cancelled before it finished."""


@dataclass
class EngineConfig:
    """Sizes of the engine. ``report_slots`` is also the largest report batch decoded at once."""

    report_slots: int = 64
    dialog_slots: int = 4
    #: Tokens per report slot; None = the longest report prompt + the report token limit.
    report_max_len: int | None = None
    dialog_max_len: int = 4096
    #: Most prompt tokens prefilled for reports in one iteration: bounds how long a dialog turn that arrives
    #: meanwhile waits for its first token (~2,048 x 13.5 GFLOP = ~28 TFLOP, tens of ms on an H100).
    prefill_tokens: int = 2048
    #: Report rows decoded beside a streaming dialog turn (the others pause, keeping their cache).
    reports_beside_dialog: int = 16
    #: Share of the free accelerator memory the pools may take (CUDA only; CPU uses the sizes as given).
    memory_fraction: float = 0.9


@dataclass
class Generation:
    """What a request produced: new tokens (EOS excluded), why it stopped, and timings in seconds."""

    tokens: list[int]
    finish: str  # "eos", "length" (token limit or slot full)
    timings: dict[str, float]
    findings: list[ClassifierFinding] | None = None  # reports: the classifier's labels
    phrase: str | None = None  # reports: the findings phrase given to the LLM


class Handle:
    """A submitted request: wait with :meth:`result`, stop it with :meth:`cancel`."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._future: Future[Generation] = Future()
        self._cancel = threading.Event()

    def result(self, timeout: float | None = None) -> Generation:
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, callback: Callable[[Handle], None]) -> None:
        """Call ``callback(handle)`` when the request ends (in the engine thread, or at once if it has)."""
        self._future.add_done_callback(lambda _future: callback(self))

    def cancel(self) -> None:
        """Ask the engine to drop the request at its next step (its slot is freed, others go on)."""
        self._cancel.set()
        self._engine.wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


@dataclass
class _Request:
    kind: str
    handle: Handle
    llm_pixels: torch.Tensor  # [3, 448, 448]
    max_new_tokens: int
    min_new_tokens: int = 0
    classifier_pixels: torch.Tensor | None = None  # reports: [3, 488, 488]
    prompt_ids: list[int] | None = None  # dialog: the whole prompt; reports: built after the classifier
    on_token: Callable[[str], None] | None = None
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class _Sequence:
    request: _Request
    pool: KVPool
    slot: int
    length: int  # tokens in the cache
    tokens: list[int]
    timings: dict[str, float]
    streamer: CallbackStreamer | None = None
    findings: list[ClassifierFinding] | None = None
    phrase: str | None = None


class Engine:
    """Owns the model's GPU work in one thread; submit from anywhere."""

    def __init__(self, backend: RadialogV2Backend, config: EngineConfig | None = None) -> None:
        self.backend = backend
        self.config = config or EngineConfig()
        self.steps = LlamaSteps(backend.llava.language_model)
        self.eos = backend.eos_id
        #: Model positions of the longest report prompt: sizes the report slots and the prefill budget.
        self.longest_report = self.longest_report_prompt()
        self.pools = self._make_pools()
        self.live: dict[str, list[_Sequence]] = {REPORT: [], DIALOG: []}
        self.waiting: dict[str, deque[_Request]] = {REPORT: deque(), DIALOG: deque()}
        self._inbox: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.step_count = 0

    # -- sizing -------------------------------------------------------------------------------------
    def longest_report_prompt(self) -> int:
        """Model positions of the longest report prompt (every CheXpert label predicted)."""
        from workers.models.base import ClassifierFinding
        from workers.models.prompts import CHEXPERT_LABELS

        everything = [[ClassifierFinding(label, 1.0, True) for label in CHEXPERT_LABELS]]
        _, (prompt,) = self.backend.report_prompts(everything)
        return self.backend.count_tokens(prompt)

    def _make_pools(self) -> dict[str, KVPool]:
        cfg = self.config
        report_len = cfg.report_max_len or self.longest_report + self.backend.report_token_limit() + 1
        device, dtype, shape = self.steps.device, self.steps.dtype, self.steps.shape
        per_token = shape.bytes_per_token(dtype)
        report_slots = cfg.report_slots
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            budget = int(free * cfg.memory_fraction) - cfg.dialog_slots * cfg.dialog_max_len * per_token
            fits = max(1, budget // (report_len * per_token))
            if fits < report_slots:
                log.warning("KV memory limits the report batch", extra={"asked": report_slots, "fits": int(fits)})
                report_slots = int(fits)
        pools = {
            REPORT: KVPool(REPORT, shape, report_slots, report_len, dtype, device),
            DIALOG: KVPool(DIALOG, shape, cfg.dialog_slots, cfg.dialog_max_len, dtype, device),
        }
        log.info("engine pools", extra={
            name: {"slots": p.slots, "max_len": p.max_len, "GiB": round(p.nbytes / 2**30, 2)} for name, p in pools.items()
        })
        return pools

    # -- life ---------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="radialog-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; what is unfinished is cancelled."""
        self._stopping = True
        self._inbox.put(None)
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    @property
    def busy(self) -> int:
        """Requests waiting or running."""
        return sum(len(q) for q in self.waiting.values()) + sum(len(s) for s in self.live.values())

    # -- submit (any thread) ------------------------------------------------------------------------
    def submit_reports(
        self, images: Sequence[np.ndarray], *, max_new_tokens: int | None = None, min_new_tokens: int = 0
    ) -> list[Handle]:
        """Queue report requests; the images are resized in the caller's thread."""
        limit = max_new_tokens or self.backend.report_token_limit()
        room = self.pools[REPORT].max_len - self.longest_report - 1
        if limit > room:  # else a long report would end "length" where the simple path goes on
            raise ValueError(f"{limit} new tokens do not fit the report slots ({room} after the longest prompt); "
                             "build the engine with a larger report_max_len")
        batches = branch_batches(list(images), (CLASSIFIER_CROP, LLM_CROP))
        handles = []
        for i in range(len(images)):
            handle = Handle(self)
            self._put(_Request(REPORT, handle, batches[LLM_CROP][i], limit, min_new_tokens,
                               classifier_pixels=batches[CLASSIFIER_CROP][i]))
            handles.append(handle)
        return handles

    def submit_dialog(
        self, prompt: str, image: np.ndarray, max_new_tokens: int, on_token: Callable[[str], None] | None = None,
        min_new_tokens: int = 0,
    ) -> Handle:
        """Queue a dialog turn (the whole prompt, its ``<image>`` included); served before reports."""
        ids = self.backend.prompt_ids(prompt)
        needed = self.backend.count_tokens(prompt) + 1
        if needed > self.pools[DIALOG].max_len:
            raise ValueError(f"the prompt takes {needed - 1} positions; the dialog slots hold {self.pools[DIALOG].max_len}")
        pixels = branch_batches([image], (LLM_CROP,))[LLM_CROP][0]
        handle = Handle(self)
        self._put(_Request(DIALOG, handle, pixels, max_new_tokens, min_new_tokens, prompt_ids=ids, on_token=on_token))
        return handle

    def _put(self, request: _Request) -> None:
        if self._stopping:
            raise RuntimeError("the engine is stopping")
        self._inbox.put(request)
        self.wake()

    # -- the loop (engine thread) -------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                if not self._take_inbox():
                    break
                try:
                    self._iteration()
                except Exception:  # never let the loop die: the step's requests were failed already
                    log.exception("engine iteration failed")
        self._cancel_everything()

    def _take_inbox(self) -> bool:
        """Move submitted requests to the waiting queues; sleep while there is nothing to do."""
        if not self.busy:
            self._wake.wait(timeout=1.0)
        self._wake.clear()
        while True:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                return not self._stopping
            if request is None:
                return False
            self.waiting[request.kind].append(request)

    def _iteration(self) -> None:
        self._drop_cancelled()
        if self.waiting[DIALOG] and self.pools[DIALOG].free:
            self._admit_dialogs()
        elif self.waiting[REPORT] and self.pools[REPORT].free and not self.live[DIALOG]:
            self._admit_reports()
        if self.live[DIALOG] or self.live[REPORT]:
            self._decode_step()

    def _drop_cancelled(self) -> None:
        for kind, waiting in self.waiting.items():
            kept = deque(r for r in waiting if not r.handle.cancelled)
            for request in waiting:
                if request.handle.cancelled:
                    request.handle._future.set_exception(RequestCancelled("cancelled before it started"))
            self.waiting[kind] = kept
        for kind in (DIALOG, REPORT):
            gone = [s for s in self.live[kind] if s.request.handle.cancelled]
            for seq in sorted(gone, key=lambda s: -s.slot):
                self._end(seq, error=RequestCancelled("cancelled while generating"))

    # -- admission ----------------------------------------------------------------------------------
    def _admit_dialogs(self) -> None:
        pool = self.pools[DIALOG]
        count = min(pool.free, len(self.waiting[DIALOG]))
        self._admit_dialog_group([self.waiting[DIALOG].popleft() for _ in range(count)])

    def _admit_dialog_group(self, requests: list[_Request]) -> None:
        """Vision tower for the turns' images, then their prefill; a failing group goes one by one."""
        started = time.perf_counter()
        try:
            features = self.backend.llava.encode_images(torch.stack([r.llm_pixels for r in requests]))
            rows = self.backend.llava.splice([r.prompt_ids for r in requests], features)
        except Exception as exc:
            self._one_by_one(requests, exc, self._admit_dialog_group, "dialog admission")
            return
        vision_s = time.perf_counter() - started
        none = [None] * len(requests)
        self._prefill(self.pools[DIALOG], requests, rows, [{"vision": vision_s}] * len(requests), none, none)

    @staticmethod
    def _one_by_one(requests: list[_Request], exc: Exception, retry: Callable[[list[_Request]], None],
                    what: str) -> None:
        """A group step failed: a single request gets the error, a group is retried request by request."""
        if len(requests) == 1:
            requests[0].handle._future.set_exception(exc)
            return
        log.warning(f"{what} failed; one by one", extra={"rows": len(requests), "error": type(exc).__name__})
        for request in requests:
            retry([request])

    def _admit_reports(self) -> None:
        pool = self.pools[REPORT]
        per_prompt = self.longest_report
        count = max(1, min(pool.free, len(self.waiting[REPORT]), self.config.prefill_tokens // per_prompt))
        self._admit_report_group([self.waiting[REPORT].popleft() for _ in range(count)])

    def _admit_report_group(self, requests: list[_Request]) -> None:
        """Classifier (488 px) and vision tower (448 px) for the group, then its prefill; a failing group
        is admitted one by one so that the fault stays with its study."""
        started = time.perf_counter()
        try:
            findings = self.backend.classify([], torch.stack([r.classifier_pixels for r in requests]))  # type: ignore[misc]
            t_cls = time.perf_counter()
            phrases, prompts = self.backend.report_prompts(findings)
            features = self.backend.llava.encode_images(torch.stack([r.llm_pixels for r in requests]))
            rows = self.backend.llava.splice([self.backend.prompt_ids(p) for p in prompts], features)
        except Exception as exc:
            self._one_by_one(requests, exc, self._admit_report_group, "report admission")
            return
        t_vis = time.perf_counter()
        timings = [{"classifier": t_cls - started, "vision": t_vis - t_cls, "admitted_together": float(len(requests))}] * len(requests)
        self._prefill(self.pools[REPORT], requests, rows, timings, findings, phrases)

    def _prefill(self, pool: KVPool, requests: list[_Request], rows: list[torch.Tensor],
                 timings: list[dict[str, float]], findings: Sequence[Any], phrases: Sequence[Any]) -> None:
        """Prefill ``rows`` into new slots; a group that fails is retried one by one (the fault stays with its request)."""
        started = time.perf_counter()
        try:
            slots = pool.take(len(requests))
        except RuntimeError as exc:  # admission takes no more than the free slots; never leave a caller waiting
            for request in requests:
                request.handle._future.set_exception(exc)
            return
        try:
            logits = self.steps.prefill(rows, pool, slots)
        except Exception as exc:
            pool.used -= len(requests)  # the slots just taken are the last ones: nothing to move
            if len(requests) == 1:
                requests[0].handle._future.set_exception(exc)
                return
            log.warning("prefill failed; one by one", extra={"rows": len(requests), "error": type(exc).__name__})
            for i in range(len(requests)):
                self._prefill(pool, requests[i:i + 1], rows[i:i + 1], timings[i:i + 1], findings[i:i + 1], phrases[i:i + 1])
            return
        prefill_s = time.perf_counter() - started
        now = time.perf_counter()
        fresh = []
        for i, request in enumerate(requests):
            streamer = (CallbackStreamer(self.backend.tokenizer.decode, request.on_token, self.eos)
                        if request.on_token else None)
            seq = _Sequence(request, pool, slots[i], len(rows[i]), [], {
                **timings[i], "queued": started - request.submitted, "prefill": prefill_s, "decode_started": now,
            }, streamer, findings[i], phrases[i])
            self.live[request.kind].append(seq)
            fresh.append(seq)
        self._advance(fresh, logits)

    # -- decode -------------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        dialogs = self.live[DIALOG]
        reports = self.live[REPORT]
        if dialogs:
            reports = reports[: self.config.reports_beside_dialog]
        groups, rows = [], []
        for seqs in (dialogs, reports):
            if not seqs:
                continue
            device = self.steps.device
            groups.append(Group(seqs[0].pool, torch.arange(len(seqs), device=device),
                                torch.tensor([s.length for s in seqs], device=device)))
            rows.extend(seqs)
        tokens = torch.tensor([s.tokens[-1] for s in rows], device=self.steps.device)
        try:
            logits = self.steps.decode(tokens, groups)
        except Exception as exc:
            log.warning("decode step failed", extra={"rows": len(rows), "error": type(exc).__name__})
            for seq in sorted(rows, key=lambda s: (s.request.kind, -s.slot)):
                self._end(seq, error=exc)
            return
        self.step_count += 1
        for seq in rows:
            seq.length += 1
        self._advance(rows, logits)

    def _advance(self, rows: list[_Sequence], logits: torch.Tensor) -> None:
        """Pick each row's next token (greedy, EOS held back until min_new_tokens) and end what is finished."""
        eos_blocked = [i for i, s in enumerate(rows) if len(s.tokens) < s.request.min_new_tokens]
        if eos_blocked:
            logits[eos_blocked, self.eos] = float("-inf")
        picked = logits.argmax(dim=-1).tolist()
        finished: list[tuple[_Sequence, str, BaseException | None]] = []
        now = time.perf_counter()
        for seq, token in zip(rows, picked):
            if not seq.tokens:
                seq.timings["first_token"] = now - seq.request.submitted
            if token == self.eos:
                finished.append((seq, "eos", None))
                continue
            seq.tokens.append(token)
            if seq.streamer is not None:
                try:
                    seq.streamer.put(torch.tensor([token]))
                except Exception as exc:  # the caller's callback failed: that request alone ends
                    finished.append((seq, "error", exc))
                    continue
            if len(seq.tokens) >= seq.request.max_new_tokens or seq.length >= seq.pool.max_len:
                finished.append((seq, "length", None))
        for seq, reason, error in sorted(finished, key=lambda f: (f[0].request.kind, -f[0].slot)):
            self._end(seq, finish=reason, error=error)

    def _end(self, seq: _Sequence, *, finish: str = "", error: BaseException | None = None) -> None:
        """Free the sequence's slot (the pool's last sequence moves into it) and settle its handle.

        Callers end several sequences of one pool in descending slot order.
        """
        live = self.live[seq.request.kind]
        last = live[-1]
        moved = seq.pool.release(seq.slot, last.length)
        index = live.index(seq)
        if moved is not None:
            live[index] = last
            last.slot = seq.slot
            live.pop()
        else:
            live.pop(index)
        future = seq.request.handle._future
        if error is not None:
            future.set_exception(error)
            return
        if seq.streamer is not None:
            try:
                seq.streamer.end()
            except Exception as exc:
                future.set_exception(exc)
                return
        timings = dict(seq.timings)
        timings["decode"] = time.perf_counter() - timings.pop("decode_started")
        timings["total"] = time.perf_counter() - seq.request.submitted
        future.set_result(Generation(seq.tokens, finish, timings, seq.findings, seq.phrase))

    def _cancel_everything(self) -> None:
        for waiting in self.waiting.values():
            while waiting:
                waiting.popleft().handle._future.set_exception(RequestCancelled("the engine stopped"))
        while True:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                request.handle._future.set_exception(RequestCancelled("the engine stopped"))
        for kind in (DIALOG, REPORT):
            for seq in sorted(self.live[kind], key=lambda s: -s.slot):
                self._end(seq, error=RequestCancelled("the engine stopped"))
