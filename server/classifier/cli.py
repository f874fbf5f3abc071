"""Commands: ``gpuattest classify`` for compliance teams, ``gpuattest classifier ...`` to refit.

``gpuattest classify FILE [FILE ...] [--json]`` classifies logs a team already has. The JSON
contract (one object on stdout)::

    {"model_version": str,
     "recordings": [{"path": str, "verdict": "training"|"inference"|"idle",
                     "confidence": float, "gpus": int, "first_training_s": float|null,
                     "windows": [{"gpu": int, "start_s": float, "end_s": float,
                                  "label": str, "p_training": float}]}]}

Times are seconds since the recording's first sample. A file that cannot be read, or holds
no samples, gets one line on stderr and makes the exit status 1; the others are classified.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click

from agent.collectors.replay import parse_recording
from proto.errors import GpuattestError
from proto.limits import DEFAULT_LIMITS
from server.classifier.compute import sum_flop, window_flop
from server.classifier.model import (
    DEFAULT_WINDOW_S,
    StumpModel,
    load_model,
    load_packaged_model,
    packaged_model_path,
    write_model,
)
from server.classifier.offline import ClassifiedRecording, classify_recording

_ROUND = 6


def _finite_window_s(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
    # FloatRange lets NaN through: every comparison with it is false.
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number of seconds")
    return value


# The window length a fit or an evaluation cuts recordings into; the agent must use the same.
_window_option = click.option(
    "--window-s",
    "window_s",
    default=DEFAULT_WINDOW_S,
    show_default=True,
    type=click.FloatRange(0.0, DEFAULT_LIMITS.max_window_seconds, min_open=True),
    callback=_finite_window_s,
    help="window length in seconds (the agent's window_s)",
)


def _load(model_path: Path | None) -> StumpModel:
    return load_model(model_path) if model_path is not None else load_packaged_model()


def recording_document(path: str, classified: ClassifiedRecording) -> dict[str, Any]:
    """One entry of the ``recordings`` list of the JSON contract."""
    result = classified.result
    return {
        "path": path,
        "verdict": result.verdict,
        "confidence": round(result.confidence, _ROUND),
        "gpus": result.gpus,
        "first_training_s": (
            None if result.first_training_s is None else round(result.first_training_s, _ROUND)
        ),
        "windows": [
            {
                "gpu": item.verdict.gpu,
                "start_s": round(item.verdict.start_s, _ROUND),
                "end_s": round(item.verdict.end_s, _ROUND),
                "label": item.verdict.label,
                "p_training": round(item.verdict.p_training, _ROUND),
            }
            for item in sorted(classified.windows, key=lambda w: (w.verdict.start_s, w.verdict.gpu))
        ],
    }


def _classify_file(path: str, model: StumpModel, gpu_name: str) -> ClassifiedRecording:
    try:
        recording = parse_recording(Path(path))
    except (OSError, UnicodeError, GpuattestError, ValueError) as exc:
        raise click.ClickException(f"{path}: cannot read: {exc}") from exc
    if not recording.ticks:
        raise click.ClickException(f"{path}: no samples in the file")
    return classify_recording(recording, model, gpu_name)


def _table(path: str, classified: ClassifiedRecording, gpu_name: str) -> str:
    result = classified.result
    detected = (
        "-" if result.first_training_s is None else f"alarm at {result.first_training_s:.0f} s"
    )
    flop = sum_flop(
        window_flop(
            item.features, item.verdict.end_s - item.verdict.start_s, gpu_name, item.verdict.label
        )
        for item in classified.windows
    )
    counts: dict[str, int] = {}
    for item in classified.windows:
        counts[item.verdict.label] = counts.get(item.verdict.label, 0) + 1
    windows = ", ".join(f"{label} {n}" for label, n in sorted(counts.items()))
    return (
        f"{path}\n"
        f"  verdict     {result.verdict} (confidence {result.confidence:.2f}), {detected}\n"
        f"  GPUs        {result.gpus}, {classified.duration_s:.0f} s recorded\n"
        f"  windows     {windows}\n"
        f"  compute     {flop.describe()}"
    )


@click.command("classify")
@click.argument("files", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object (see docs)")
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="model JSON (default: the packaged model)",
)
@click.option(
    "--gpu-name",
    default="",
    help='NVML device name, e.g. "NVIDIA H100 80GB HBM3" (enables SKU-relative features)',
)
def classify(files: tuple[str, ...], as_json: bool, model_path: Path | None, gpu_name: str) -> None:
    """Classify recorded GPU telemetry as training, inference or idle."""
    model = _load(model_path)
    documents: list[dict[str, Any]] = []
    failed = 0
    for path in files:
        try:
            classified = _classify_file(path, model, gpu_name)
        except click.ClickException as exc:
            click.echo(f"gpuattest classify: {exc.message}", err=True)
            failed += 1
            continue
        if as_json:
            documents.append(recording_document(path, classified))
        else:
            click.echo(_table(path, classified, gpu_name))
    if as_json:
        json.dump({"model_version": model.model_version, "recordings": documents}, sys.stdout)
        sys.stdout.write("\n")
    else:
        click.echo(f"model {model.model_version} ({model.window_s:g} s windows)")
    if failed:
        raise click.exceptions.Exit(1)


@click.group("classifier")
def classifier() -> None:
    """Fit and evaluate the training/inference/idle classifier (needs the dev extra)."""


@classifier.command("fit")
@click.argument("data_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="seed of the fit and its folds")
@_window_option
def fit_command(data_dir: Path, out: Path, seed: int, window_s: float) -> None:
    """Fit the model on every labelled recording in DATA_DIR and write it to --out."""
    from server.classifier.dataset import discover, load_recording_data
    from server.classifier.fit import FitSettings, fit_model

    rows = [
        row
        for item in discover(data_dir)
        for row in load_recording_data(item, window_s=window_s).rows
    ]
    model = fit_model(rows, FitSettings(seed=seed))
    write_model(model, out)
    click.echo(
        f"wrote {out}: {model.model_version} for {model.window_s:g} s windows, "
        f"{model.provenance['windows']} windows from "
        f"{len(model.provenance['recordings'])} recordings, "
        f"training threshold {model.training_threshold:.3f}"
    )


@classifier.command("evaluate")
@click.argument("data_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="seed of every fit and its folds")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.option(
    "--figures",
    type=click.Path(file_okay=False, path_type=Path),
    help="write the held-out figures (PNG) into this folder",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="model whose step functions the figures show (default: the packaged one)",
)
@_window_option
def evaluate_command(
    data_dir: Path,
    seed: int,
    as_json: bool,
    figures: Path | None,
    model_path: Path | None,
    window_s: float,
) -> None:
    """Leave-one-recording-out evaluation of the fitting procedure on DATA_DIR."""
    from server.classifier.evaluate import leave_one_recording_out, load_data, report_markdown
    from server.classifier.fit import FitSettings

    data, subsampled = load_data(data_dir, window_s=window_s)
    evaluation = leave_one_recording_out(
        data,
        subsampled,
        FitSettings(seed=seed),
        progress=lambda held: click.echo(f"held out {held.name}: {held.verdict}", err=True),
    )
    if figures is not None:
        from server.classifier.figures import write_figures

        shown = model_path if model_path is not None else packaged_model_path()
        model = load_model(shown) if shown is not None else None
        if model is not None and model.window_s != window_s:
            model = None  # its step figure describes other windows than these
        for path in write_figures(evaluation, data, figures, model):
            click.echo(f"wrote {path}", err=True)
    if as_json:
        summary = {"native": evaluation.summary("native")}
        if evaluation.subsampled:
            summary["subsampled_250ms"] = evaluation.summary("subsampled")
        click.echo(json.dumps(summary, indent=1))
    else:
        click.echo(report_markdown(evaluation))


@classifier.command("evasion")
@click.argument("data_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="seed of the fits and transforms")
@click.option("--trials", default=3, show_default=True, help="random trials per family")
def evasion_command(data_dir: Path, seed: int, trials: int) -> None:
    """Detection rate per evasion family on held-out training recordings in DATA_DIR."""
    from server.classifier.evasion import evasion_report_markdown, run_evasion_suite

    report = run_evasion_suite(data_dir, seed=seed, trials=trials)
    click.echo(evasion_report_markdown(report))
