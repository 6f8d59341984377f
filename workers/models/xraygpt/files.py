"""Where XrayGPT's published files are, checked to exist, and the provenance hash over them.

Three settings, because the files come from three places:

- ``RADIALOG_XRAYGPT_VISION_DIR``: ``eva_vit_g.pth`` (EVA-CLIP ViT-g, raw state dict) and
  ``blip2_pretrained_flant5xxl.pth`` (BLIP-2 Q-Former, ``{"model": ...}``), both from LAVIS's public bucket;
  the reference downloads them into ``$TORCH_HOME/hub/checkpoints/``.
- ``RADIALOG_XRAYGPT_LLM_DIR``: the radiology-tuned Vicuna-7B directory (``Vicuna_Radiology_fp16``:
  config.json, sharded pytorch_model-*.bin + index, tokenizer.model, tokenizer_config.json).
- ``RADIALOG_XRAYGPT_CHECKPOINT``: the XrayGPT checkpoint file (``{"model": {"llama_proj.weight",
  "llama_proj.bias", ...}, "optimizer", ...}``), the only trained part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workers.models.common.llama import files_sha256, tokenizer_files, weight_files
from workers.models.radialog_v2.checkpoint_io import ModelFileError

EVA_FILE = "eva_vit_g.pth"
QFORMER_FILE = "blip2_pretrained_flant5xxl.pth"
TINY_MARKER = "TINY_RANDOM_MODEL.txt"  # written by make_tiny next to the checkpoint: not a clinical model


@dataclass(frozen=True)
class XrayGPTFiles:
    vision_dir: Path
    llm_dir: Path
    checkpoint: Path
    eva: Path
    qformer: Path
    llm_config: Path
    llm_weights: tuple[Path, ...]
    tokenizer: tuple[Path, ...]

    @property
    def tiny(self) -> bool:
        return (self.checkpoint.parent / TINY_MARKER).is_file()

    def named(self) -> list[tuple[str, Path]]:
        """(name in the hash, path): vision files, then the LLM directory's files, then the checkpoint."""
        return (
            [(p.name, p) for p in (self.eva, self.qformer)]
            + [(f"llm/{p.name}", p) for p in (self.llm_config, *self.llm_weights, *self.tokenizer)]
            + [(f"checkpoint/{self.checkpoint.name}", self.checkpoint)]
        )

    def all_files(self) -> list[Path]:
        return [path for _, path in self.named()]


def locate(vision_dir: Path | None, llm_dir: Path | None, checkpoint: Path | None) -> XrayGPTFiles:
    """Find every file; one error naming all that is missing (or which setting is not set)."""
    unset = [
        name
        for name, value in (
            ("RADIALOG_XRAYGPT_VISION_DIR", vision_dir),
            ("RADIALOG_XRAYGPT_LLM_DIR", llm_dir),
            ("RADIALOG_XRAYGPT_CHECKPOINT", checkpoint),
        )
        if value is None
    ]
    if unset:
        raise ModelFileError(
            f"XrayGPT files not configured: set {', '.join(unset)} (see README 'XrayGPT'); "
            "`radialog model make-tiny --backend xraygpt DIR` writes a test set"
        )
    assert vision_dir is not None and llm_dir is not None and checkpoint is not None
    vision_dir, llm_dir, checkpoint = Path(vision_dir), Path(llm_dir), Path(checkpoint)
    missing: list[str] = []

    def need(path: Path) -> Path:
        if not path.is_file():
            missing.append(str(path))
        return path

    eva, qformer = need(vision_dir / EVA_FILE), need(vision_dir / QFORMER_FILE)
    config = need(llm_dir / "config.json")
    weights = weight_files(llm_dir, missing)
    tokenizer = tokenizer_files(llm_dir, missing)
    need(checkpoint)
    if missing:
        raise ModelFileError("missing model files: " + ", ".join(missing))
    return XrayGPTFiles(vision_dir, llm_dir, checkpoint, eva, qformer, config, tuple(weights), tuple(tokenizer))


def sha256(files: XrayGPTFiles) -> str:
    return files_sha256(files.named())
