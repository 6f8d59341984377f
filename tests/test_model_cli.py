"""`radialog model make-tiny` and `radialog model check` through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from composition.cli import main


def test_make_tiny_then_check(tmp_path: Path) -> None:
    runner = CliRunner()
    made = runner.invoke(main, ["model", "make-tiny", str(tmp_path / "tiny")])
    assert made.exit_code == 0, made.output
    assert "NOT CLINICAL" in made.output
    args = [
        "model",
        "check",
        "--model-dir",
        str(tmp_path / "tiny/radialog"),
        "--base-dir",
        str(tmp_path / "tiny/llava"),
        "--device",
        "cpu",
    ]
    checked = runner.invoke(main, args)
    assert checked.exit_code == 0, checked.output
    assert "language model (LoRA merged)" in checked.output and "files sha256" in checked.output
    (tmp_path / "tiny/radialog/non_lora_trainables.bin").unlink()
    failed = runner.invoke(main, args)
    assert failed.exit_code == 1
    assert "non_lora_trainables.bin" in failed.output


def test_make_tiny_then_check_xraygpt(tmp_path: Path, monkeypatch) -> None:
    """Issue 16: the XrayGPT set is written in its published formats and loaded as a worker loads it; a broken
    checkpoint is named and the check fails."""
    from radialog.settings import get_settings

    runner = CliRunner()
    made = runner.invoke(main, ["model", "make-tiny", "--backend", "xraygpt", str(tmp_path / "tiny")])
    assert made.exit_code == 0, made.output
    assert "NOT CLINICAL" in made.output
    env = dict(line.split("=", 1) for line in made.output.splitlines() if line.startswith("RADIALOG_"))
    assert set(env) == {
        "RADIALOG_MODEL_BACKEND",
        "RADIALOG_XRAYGPT_VISION_DIR",
        "RADIALOG_XRAYGPT_LLM_DIR",
        "RADIALOG_XRAYGPT_CHECKPOINT",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        checked = runner.invoke(main, ["model", "check", "--device", "cpu"])
        assert checked.exit_code == 0, checked.output
        for part in (
            "vision tower (EVA ViT-g)",
            "ln_vision + Q-Former",
            "llama_proj",
            "language model (Vicuna)",
            "files sha256",
            "ignored optimizer, config, scaler, epoch",
        ):
            assert part in checked.output
        import torch

        checkpoint = Path(env["RADIALOG_XRAYGPT_CHECKPOINT"])
        content = torch.load(checkpoint, weights_only=True)
        content["model"].pop("llama_proj.weight")
        torch.save(content, checkpoint)
        failed = runner.invoke(main, ["model", "check", "--device", "cpu"])
        assert failed.exit_code == 1
        assert "llama_proj.weight" in failed.output
    finally:
        get_settings.cache_clear()


def test_make_tiny_then_check_radialog_v1(tmp_path: Path, monkeypatch) -> None:
    """Issue 17: the RaDialog v1 set is written in its published formats and loaded as a worker loads it; the check
    says that the projector is replayed (the released checkpoint lacks it) and the version the SR carries; a broken
    adapter is named and the check fails."""
    from radialog.settings import get_settings

    runner = CliRunner()
    made = runner.invoke(main, ["model", "make-tiny", "--backend", "radialog-v1", str(tmp_path / "tiny")])
    assert made.exit_code == 0, made.output
    assert "NOT CLINICAL" in made.output
    env = dict(line.split("=", 1) for line in made.output.splitlines() if line.startswith("RADIALOG_"))
    assert set(env) == {"RADIALOG_MODEL_BACKEND", "RADIALOG_V1_DIR", "RADIALOG_V1_LLM_DIR", "RADIALOG_V1_BIOVIL_FILE"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        checked = runner.invoke(main, ["model", "check", "--device", "cpu"])
        assert checked.exit_code == 0, checked.output
        for part in (
            "vision tower (BioViL-T, 1408)",
            "ln_vision + Q-Former",
            "img_proj",
            "language model (LoRA merged)",
            "findings classifier",
            "projector: REPLAYED - checkpoint_4.pth holds no BioViL-T projector",
            "algorithm version (SR) 1.0+projector-replay-seed42",
            "files sha256",
            "checkpoint_4.pth",
            "adapter_model.bin",
            "TINY RANDOM MODEL",
        ):
            assert part in checked.output, part
        import torch

        adapter = Path(env["RADIALOG_V1_DIR"]) / "checkpoints/vicuna-7b-img-instruct/checkpoint-4800/adapter_model.bin"
        state = torch.load(adapter, weights_only=True)
        state.pop("base_model.model.model.img_proj_layer.bias")
        torch.save(state, adapter)
        failed = runner.invoke(main, ["model", "check", "--device", "cpu"])
        assert failed.exit_code == 1
        assert "img_proj_layer.bias" in failed.output
    finally:
        get_settings.cache_clear()
