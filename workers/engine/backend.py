"""The worker's model backend on top of the engine: the same interface as the simple path, served by one
engine thread that batches whatever the worker's report tasks and dialog turns hand it at the same time.
Any backend whose ``engine_model()`` gives an :class:`~workers.engine.model.EngineModel` can be served."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from workers.engine.engine import Engine, EngineConfig, Generation, Handle
from workers.models.base import DialogRequest, ModelBackend, ReportOutput, StudyInput, TokenCallback

if TYPE_CHECKING:
    from radialog.settings import Settings

#: How often a waiting caller checks that the engine thread is still alive.
_POLL_S = 5.0


class EngineBackend(ModelBackend):
    """``report``/``answer`` submit to the engine and wait; safe to call from several threads at once."""

    def __init__(self, model: ModelBackend, config: EngineConfig | None = None) -> None:
        self.model = model
        self.provenance = model.provenance
        self.capabilities = model.capabilities
        self.engine = Engine(model, config).start()
        self.served = self.engine.model

    def _wait(self, handle: Handle) -> Generation:
        while True:
            thread = self.engine._thread
            if thread is None or not thread.is_alive():
                handle.cancel()
                raise RuntimeError("the model engine is not running")
            try:
                return handle.result(timeout=_POLL_S)
            except TimeoutError:
                continue

    def report_each(self, studies: Sequence[StudyInput]) -> list[ReportOutput | Exception]:
        if not studies:
            return []
        started = time.perf_counter()
        handles = self.engine.submit_reports([s.image for s in studies], priorities=[s.priority for s in studies])
        preprocess_s = time.perf_counter() - started
        results: list[ReportOutput | Exception] = []
        for study, handle in zip(studies, handles):
            try:
                generation = self._wait(handle)
            except Exception as exc:  # noqa: BLE001 - this study's own failure (cancel, a failed step)
                results.append(exc)
                continue
            timings = {"preprocess": preprocess_s, **generation.timings}
            results.append(
                ReportOutput(
                    key=study.key,
                    findings_text=self.served.text(generation.tokens),
                    findings=generation.findings or [],
                    findings_phrase=generation.phrase or "",
                    generated_tokens=len(generation.tokens),
                    timings=timings,
                )
            )
        return results

    def report(self, studies: Sequence[StudyInput]) -> list[ReportOutput]:
        outputs = self.report_each(studies)
        for out in outputs:
            if isinstance(out, Exception):
                raise out
        return outputs  # type: ignore[return-value]  # no exception left: raised above

    def answer(self, request: DialogRequest, on_token: TokenCallback | None = None) -> str:
        prompt, limit = self.served.dialog_input(request)
        generation = self._wait(
            self.engine.submit_dialog(prompt, request.image, limit, on_token=on_token, sampling=request.sampling)
        )
        return self.served.text(generation.tokens)

    def close(self) -> None:
        self.engine.stop()

    def serving_info(self) -> dict[str, object]:
        """Engine pools and memory (GiB): what a hospital sizes GPUs by."""
        info: dict[str, object] = {
            name: {"slots": pool.slots, "max_len": pool.max_len, "kv_GiB": round(pool.nbytes / 2**30, 3)}
            for name, pool in self.engine.pools.items()
        }
        info["model_GiB"] = round(self.model.parameter_bytes() / 2**30, 3)
        return {"engine": info}


def with_engine(backend: ModelBackend, settings: Settings) -> ModelBackend:
    """``backend`` served by an engine sized from ``settings`` (``settings.engine`` false, or a backend the
    engine cannot serve: unchanged)."""
    if not settings.engine or backend.engine_model() is None:
        return backend
    config = EngineConfig(
        report_slots=settings.engine_report_slots,
        dialog_slots=settings.engine_dialog_slots,
        reports_beside_dialog=settings.engine_reports_beside_dialog,
    )
    return EngineBackend(backend, config)
