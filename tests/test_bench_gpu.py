"""bench/gpu.py end to end on CPU with the tiny model at tiny sizes: the JSON and table it promises, and
engine tokens equal to one-at-a-time generation. No timing assertions: figures on a shared CPU are noise."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from bench import gpu

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, str]:
    out = tmp_path_factory.mktemp("bench") / "gpu.json"
    capture = tmp_path_factory.mktemp("stdout") / "stdout.txt"
    with capture.open("w") as stream, contextlib.redirect_stdout(stream):
        returned = gpu.main(
            [
                "--tiny",
                "--device",
                "cpu",
                "--batch-sizes",
                "1,2",
                "--new-tokens",
                str(NEW_TOKENS),
                "--naive",
                "1",
                "--profile",
                "--json",
                str(out),
            ]
        )
    return returned, json.loads(Path(out).read_text()), capture.read_text()


def test_json_holds_every_section(bench_run: tuple[dict, dict, str]) -> None:
    returned, written, _ = bench_run
    assert set(written) >= {"build", "naive", "engine", "dialog", "equality", "profile", "targets"}
    assert written["equality"] == returned["equality"]
    assert written["build"]["model_bytes"] > 0
    assert [row["batch"] for row in written["engine"]] == [1, 2]


def test_every_request_made_exactly_the_forced_tokens(bench_run: tuple[dict, dict, str]) -> None:
    _, r, _ = bench_run
    assert r["naive"]["tokens"] == r["naive"]["studies"] * NEW_TOKENS
    for row in r["engine"]:
        assert row["studies"] == max(3, 3 * row["batch"])
        assert row["tokens"] == row["studies"] * NEW_TOKENS
        assert row["pools"]["report"]["slots"] == row["batch"]
        assert row["ratio_to_naive"] > 0
    assert r["dialog"]["tokens"] == NEW_TOKENS
    assert r["dialog"]["reports_live"] == 2  # the largest batch was full when the turn came


def test_engine_tokens_equal_one_at_a_time_generation(bench_run: tuple[dict, dict, str]) -> None:
    equality = bench_run[1]["equality"]
    assert len(set(equality["prompt_tokens"])) == equality["prompts"]  # mixed lengths, batched together
    assert equality["all_identical"] is True
    assert equality["identical_prefix"] == equality["tokens"] == [NEW_TOKENS] * equality["prompts"]
    assert equality["identical_share"] == 1.0


def test_table_names_every_path_and_the_targets(bench_run: tuple[dict, dict, str]) -> None:
    _, r, printed = bench_run
    lines = printed.splitlines()
    assert sum(line.startswith("engine ") for line in lines) == 2
    assert sum(line.startswith("naive ") for line in lines) == 1
    assert any(line.startswith("dialog turn beside 2 live reports") for line in lines)
    assert "targets:  [tiny/CPU run: targets do not apply]" in lines
    assert set(r["targets"]) == {
        "best_studies_per_s",
        "dialog_first_token_s",
        "dialog_tokens_per_s",
        "model_gb",
        "identical_share",
    }
    assert len(r["profile"]["top"]) == 15


def test_xraygpt_backend_runs_the_same_benchmark(tmp_path: Path) -> None:
    """`--backend xraygpt` (issue 16): same sections, forced token counts, engine == one at a time."""
    out = tmp_path / "xraygpt.json"
    with (tmp_path / "stdout.txt").open("w") as stream, contextlib.redirect_stdout(stream):
        gpu.main(
            [
                "--tiny",
                "--backend",
                "xraygpt",
                "--device",
                "cpu",
                "--batch-sizes",
                "2",
                "--new-tokens",
                str(NEW_TOKENS),
                "--naive",
                "1",
                "--json",
                str(out),
            ]
        )
    r = json.loads(out.read_text())
    assert r["backend"] == "xraygpt" and "XrayGPT" in r["model"]
    assert r["naive"]["tokens"] == NEW_TOKENS
    assert r["engine"][0]["tokens"] == r["engine"][0]["studies"] * NEW_TOKENS
    assert r["dialog"]["tokens"] == NEW_TOKENS and r["dialog"]["reports_live"] == 2
    assert r["engine"][0]["pools"]["dialog"]["max_len"] == 2048  # never more than Vicuna-7B v1's positions
    equality = r["equality"]
    assert len(set(equality["prompt_tokens"])) == equality["prompts"] and equality["all_identical"] is True


def test_radialog_v1_backend_runs_the_same_benchmark(tmp_path: Path) -> None:
    """`--backend radialog-v1` (issue 17): same sections, forced token counts, engine == one at a time."""
    out = tmp_path / "radialog-v1.json"
    with (tmp_path / "stdout.txt").open("w") as stream, contextlib.redirect_stdout(stream):
        gpu.main(
            [
                "--tiny",
                "--backend",
                "radialog-v1",
                "--device",
                "cpu",
                "--batch-sizes",
                "2",
                "--new-tokens",
                str(NEW_TOKENS),
                "--naive",
                "1",
                "--json",
                str(out),
            ]
        )
    r = json.loads(out.read_text())
    assert r["backend"] == "radialog-v1" and "RaDialog v1" in r["model"]
    assert r["naive"]["tokens"] == NEW_TOKENS
    assert r["engine"][0]["tokens"] == r["engine"][0]["studies"] * NEW_TOKENS
    assert r["dialog"]["tokens"] == NEW_TOKENS and r["dialog"]["reports_live"] == 2
    assert r["engine"][0]["pools"]["dialog"]["max_len"] == 2048  # never more than Vicuna-7B v1.3's positions
    equality = r["equality"]
    assert len(set(equality["prompt_tokens"])) == equality["prompts"] and equality["all_identical"] is True


# -- bench/gpu_suite.py: every backend in one device call -------------------------------------------------
@pytest.mark.slow
def test_suite_runs_every_backend_and_summarises(tmp_path: Path) -> None:
    """The script a GPU session runs once: each backend's JSON, log and one summary line with its figures."""
    from bench import gpu_suite

    lines = gpu_suite.main(
        [
            "--out",
            str(tmp_path),
            "--tiny",
            "--budget",
            "900",
            "--",
            "--device",
            "cpu",
            "--batch-sizes",
            "1,2",
            "--new-tokens",
            "5",
            "--naive",
            "1",
        ]
    )
    assert [line["backend"] for line in lines] == list(gpu_suite.BACKENDS)
    for line in lines:
        assert line["outcome"] == "ok", (line, (tmp_path / f"{line['backend']}.log").read_text()[-2000:])
        assert line["best_batch"] in (1, 2) and line["model_gib"] > 0 and line["identical_share"] == 1.0
        assert json.loads((tmp_path / f"{line['backend']}.json").read_text())["backend"] == line["backend"]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [s.split(" on ")[0] for s in summary] == list(gpu_suite.BACKENDS)
    assert json.loads((tmp_path / "summary.json").read_text()) == lines


def test_suite_reports_a_backend_out_of_time_and_goes_on(tmp_path: Path) -> None:
    from bench import gpu_suite

    line = gpu_suite.run_one("radialog-v2", tmp_path, 0.5, ["--device", "cpu"], tiny=True)
    assert line["outcome"].startswith("ran out of its 0 s") and "model_gib" not in line
    assert gpu_suite.format_line(line) == f"radialog-v2: {line['outcome']} after {line['seconds']:.0f} s"
