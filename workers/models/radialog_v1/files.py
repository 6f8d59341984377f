"""Where RaDialog v1's published files are, checked to exist, and the provenance hash over them.

Four settings, because the files come from three places (README "RaDialog v1"):

- ``RADIALOG_V1_DIR``: the release assets of ChantalMP/RaDialog (tag ``weights``) unpacked as its README says,
  in the repository's layout: ``pretraining/outputs/stage1_pt_instruct_blip_origlr_img448/checkpoint_4.pth``
  (the README's ``outputs/...`` is accepted too), ``checkpoints/vicuna-7b-img-{instruct,report}/...``,
  ``findings_classifier/checkpoints/chexpert_train/ChexpertClassifier-epoch=06-val_f1=0.36.ckpt``.
- ``RADIALOG_V1_ADAPTER``: the LoRA adapter directory, relative to RADIALOG_V1_DIR or absolute; default the
  demo's RaDialog-INS (``checkpoints/vicuna-7b-img-instruct/checkpoint-4800``). RaDialog-RG
  (``checkpoints/vicuna-7b-img-report/checkpoint-11200``) was trained for reports only.
- ``RADIALOG_V1_LLM_DIR``: ``lmsys/vicuna-7b-v1.3`` (config.json, weights, tokenizer.model).
- ``RADIALOG_V1_BIOVIL_FILE``: ``microsoft/BiomedVLP-BioViL-T`` v1.0's ``biovil_t_image_model_proj_size_128.pt``
  (the reference downloads it; we never download).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workers.models.common.llama import files_sha256, weight_files
from workers.models.radialog_v2.checkpoint_io import ModelFileError

QFORMER_RELPATHS = (
    Path("pretraining/outputs/stage1_pt_instruct_blip_origlr_img448/checkpoint_4.pth"),
    Path("outputs/stage1_pt_instruct_blip_origlr_img448/checkpoint_4.pth"),
)
CLASSIFIER_RELPATH = Path("findings_classifier/checkpoints/chexpert_train/ChexpertClassifier-epoch=06-val_f1=0.36.ckpt")
INSTRUCT_ADAPTER = "checkpoints/vicuna-7b-img-instruct/checkpoint-4800"
REPORT_ADAPTER = "checkpoints/vicuna-7b-img-report/checkpoint-11200"
BIOVIL_FILE = "biovil_t_image_model_proj_size_128.pt"
TINY_MARKER = "TINY_RANDOM_MODEL.txt"  # written by make_tiny in RADIALOG_V1_DIR: not a clinical model
SETTINGS = ("RADIALOG_V1_DIR", "RADIALOG_V1_LLM_DIR", "RADIALOG_V1_BIOVIL_FILE")


@dataclass(frozen=True)
class RadialogV1Files:
    root: Path
    qformer: Path  # checkpoint_4.pth
    adapter_dir: Path
    adapter_config: Path
    adapter_weights: Path
    classifier: Path
    llm_dir: Path
    llm_config: Path
    llm_weights: tuple[Path, ...]
    tokenizer: tuple[Path, ...]
    biovil: Path

    @property
    def tiny(self) -> bool:
        return (self.root / TINY_MARKER).is_file()

    def named(self) -> list[tuple[str, Path]]:
        """(name in the hash, path): release files, then the BioViL-T file, then the Vicuna directory's."""
        return (
            [
                (f"radialog/{p.relative_to(self.root) if p.is_relative_to(self.root) else p.name}", p)
                for p in (self.qformer, self.adapter_config, self.adapter_weights, self.classifier)
            ]
            + [(f"biovil/{self.biovil.name}", self.biovil)]
            + [(f"llm/{p.name}", p) for p in (self.llm_config, *self.llm_weights, *self.tokenizer)]
        )

    def all_files(self) -> list[Path]:
        return [path for _, path in self.named()]


def locate(root: Path | None, adapter: str | Path | None, llm_dir: Path | None, biovil: Path | None) -> RadialogV1Files:
    """Find every file; one error naming all that is missing (or which settings are not set)."""
    unset = [name for name, value in zip(SETTINGS, (root, llm_dir, biovil)) if value is None]
    if unset:
        raise ModelFileError(
            f"RaDialog v1 files not configured: set {', '.join(unset)} (see README 'RaDialog v1'); "
            "`radialog model make-tiny --backend radialog-v1 DIR` writes a test set"
        )
    assert root is not None and llm_dir is not None and biovil is not None
    root, llm_dir, biovil = Path(root), Path(llm_dir), Path(biovil)
    missing: list[str] = []

    def need(path: Path) -> Path:
        if not path.is_file():
            missing.append(str(path))
        return path

    qformer = next((root / p for p in QFORMER_RELPATHS if (root / p).is_file()), None)
    if qformer is None:
        missing.append(" or ".join(str(root / p) for p in QFORMER_RELPATHS))
        qformer = root / QFORMER_RELPATHS[0]
    adapter_dir = root / (adapter or INSTRUCT_ADAPTER)  # an absolute adapter path replaces root
    adapter_config = need(adapter_dir / "adapter_config.json")
    adapter_weights = need(adapter_dir / "adapter_model.bin")
    classifier = need(root / CLASSIFIER_RELPATH)
    config = need(llm_dir / "config.json")
    weights = weight_files(llm_dir, missing)
    # the prompt ids come from the sentencepiece model (as the reference's slow tokenizer made them)
    tokenizer = [need(llm_dir / "tokenizer.model")]
    tokenizer += [
        p
        for p in (llm_dir / "tokenizer_config.json", llm_dir / "special_tokens_map.json", llm_dir / "tokenizer.json")
        if p.is_file()
    ]
    need(biovil)
    if missing:
        raise ModelFileError("missing model files: " + ", ".join(missing))
    return RadialogV1Files(
        root,
        qformer,
        adapter_dir,
        adapter_config,
        adapter_weights,
        classifier,
        llm_dir,
        config,
        tuple(weights),
        tuple(tokenizer),
        biovil,
    )


def sha256(files: RadialogV1Files) -> str:
    return files_sha256(files.named())
