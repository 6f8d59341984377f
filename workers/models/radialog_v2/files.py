"""The published file layout of RaDialog v2 and its llava-v1.5-7b base, and the provenance hash over it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from workers.models.radialog_v2.checkpoint_io import ModelFileError

CLASSIFIER_RELPATH = Path("findings_classifier/checkpoints/chexpert_train/ChexpertClassifier.ckpt")
TINY_MARKER = "TINY_RANDOM_MODEL.txt"  # written by make_tiny: "tiny random model, not clinical"


@dataclass(frozen=True)
class ModelFiles:
    """Every file the loader reads, resolved and checked to exist."""

    model_dir: Path
    base_dir: Path
    config: Path
    adapter_config: Path
    adapter_weights: Path
    non_lora_trainables: Path
    classifier: Path
    base_config: Path
    base_weights: tuple[Path, ...]
    tokenizer_files: tuple[Path, ...]

    @property
    def tiny(self) -> bool:
        return (self.model_dir / TINY_MARKER).is_file()

    def all_files(self) -> list[Path]:
        return [
            self.config,
            self.adapter_config,
            self.adapter_weights,
            self.non_lora_trainables,
            self.classifier,
            self.base_config,
            *self.base_weights,
            *self.tokenizer_files,
        ]


def locate(model_dir: Path | None, base_dir: Path | None) -> ModelFiles:
    """Find the files in the two directories; one error naming everything that is missing."""
    if model_dir is None or base_dir is None:
        raise ModelFileError(
            "model files not configured: set RADIALOG_MODEL_DIR (RaDialog v2 directory) and "
            "RADIALOG_BASE_MODEL_DIR (llava-v1.5-7b directory); `radialog model make-tiny DIR` writes a test pair"
        )
    model_dir, base_dir = Path(model_dir), Path(base_dir)
    missing: list[str] = []

    def need(path: Path) -> Path:
        if not path.is_file():
            missing.append(str(path))
        return path

    def one_of(*paths: Path) -> Path:
        for path in paths:
            if path.is_file():
                return path
        missing.append(" or ".join(str(p) for p in paths))
        return paths[0]

    config = need(model_dir / "config.json")
    adapter_config = need(model_dir / "adapter_config.json")
    adapter_weights = one_of(model_dir / "adapter_model.safetensors", model_dir / "adapter_model.bin")
    non_lora = need(model_dir / "non_lora_trainables.bin")
    classifier = need(model_dir / CLASSIFIER_RELPATH)
    base_config = need(base_dir / "config.json")
    weights = _base_weights(base_dir, missing)
    # tokenizer.model is required: prompt ids come from it as in the reference (tokenizer.json cannot
    # reproduce the slow tokenizer's ids); tokenizer_config.json says legacy / add_bos_token.
    tokenizer = [need(base_dir / "tokenizer.model"), need(base_dir / "tokenizer_config.json")]
    tokenizer += [p for p in (base_dir / "tokenizer.json", base_dir / "special_tokens_map.json") if p.is_file()]
    if missing:
        raise ModelFileError("missing model files: " + ", ".join(missing))
    return ModelFiles(
        model_dir,
        base_dir,
        config,
        adapter_config,
        adapter_weights,
        non_lora,
        classifier,
        base_config,
        tuple(weights),
        tuple(tokenizer),
    )


def _base_weights(base_dir: Path, missing: list[str]) -> list[Path]:
    """Single-file or sharded (index.json) .bin / .safetensors weights of the base LLM."""
    import json

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = base_dir / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            paths = [base_dir / s for s in shards]
            missing.extend(str(p) for p in paths if not p.is_file())
            return [index, *paths]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (base_dir / name).is_file():
            return [base_dir / name]
    missing.append(f"{base_dir}/model.safetensors or pytorch_model.bin (or a sharded index)")
    return []


def files_sha256(files: ModelFiles, chunk: int = 16 * 1024 * 1024) -> str:
    """sha256 over (relative name, bytes) of every loaded file, in a fixed order: the model's identity."""
    digest = hashlib.sha256()
    for root, path in [(files.model_dir, p) for p in files.all_files()[:5]] + [
        (files.base_dir, p) for p in files.all_files()[5:]
    ]:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()
