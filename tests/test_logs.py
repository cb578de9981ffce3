"""Logs that help: --quiet/--verbose on every command, "step k of N" with the time left, and no
warning for what capfilt does on purpose (README: Logs)."""

from __future__ import annotations

import io
import logging

import click
import pytest
from PIL import Image

from capfilt import logs
from capfilt.cli import cli, main
from flows.progress import StepClock, estimate_left, format_duration, format_step_end, format_step_start

VARIABLES = ("CAPFILT_LOG_LEVEL", "TRANSFORMERS_VERBOSITY", "PREFECT_LOGGING_LEVEL", "PREFECT_LOGGING_ROOT_LEVEL",
             "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL")


@pytest.fixture
def clean_levels(monkeypatch):
    """Each test starts at the default verbosity and leaves the process's logging as it found it."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    names = ("", *logs.OWN, *logs.LIBRARIES)
    saved = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def leaf_commands():
    """(path, command) of every command that runs something: `train stage1`, `eval`, ..."""
    out = []

    def walk(path, command):
        if isinstance(command, click.Group):
            for name in command.list_commands(None):
                walk((*path, name), command.get_command(None, name))
        if not isinstance(command, click.Group) or command.invoke_without_command:
            out.append((path, command))

    for name in cli.list_commands(None):
        walk((name,), cli.get_command(None, name))
    return out


LEAVES = leaf_commands()


@pytest.mark.parametrize("flag,level", [("--quiet", "quiet"), ("-q", "quiet"), ("--verbose", "verbose"), ("-v", "verbose")])
@pytest.mark.parametrize("where", ["after", "before"])
def test_every_command_accepts_quiet_and_verbose(flag, level, where, clean_levels, monkeypatch):
    """Parsed for real by `main` (required options left out fail after the flag applied); the
    command bodies are replaced so nothing (the demo!) runs."""
    assert len(LEAVES) >= 15
    for path, command in LEAVES:
        monkeypatch.setattr(command, "callback", lambda *a, **k: None)
        monkeypatch.setenv("CAPFILT_LOG_LEVEL", "info")
        argv = [*path, flag] if where == "after" else [flag, *path]
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 2, (argv, exc.code)  # a missing required option, nothing else
        assert logs.verbosity() == level, argv
        own = logging.DEBUG if level == "verbose" else logging.WARNING
        assert logging.getLogger("pipeline").level == own, argv


def test_a_failing_command_logs_at_the_level_asked(tmp_path, clean_levels, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--root", str(tmp_path), "--run", "nope", "--out", str(tmp_path / "o"), "--verbose"])
    assert exit_.value.code == 2 and "capfilt: error: nothing to evaluate" in capsys.readouterr().err
    assert logging.getLogger("flows").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("transformers").getEffectiveLevel() == logging.INFO
    import os

    # what a Ray worker or a stage's Ray job inherits
    assert os.environ["CAPFILT_LOG_LEVEL"] == "verbose" and os.environ["TRANSFORMERS_VERBOSITY"] == "info"

    with pytest.raises(SystemExit):
        main(["-q", "train", "stage1", "--root", str(tmp_path), "--run", "nope", "--out", str(tmp_path / "o")])
    assert logging.getLogger("model").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("ray").getEffectiveLevel() == logging.ERROR
    assert os.environ["PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL"] == "WARNING"  # no step lines


def test_the_environment_sets_the_default(clean_levels, monkeypatch):
    """A capfilt started by another (a Ray job, a flow's subprocess) keeps its parent's choice."""
    monkeypatch.setenv("CAPFILT_LOG_LEVEL", "quiet")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")  # a user's own setting wins over the default
    assert logs.configure() == "quiet"
    assert logging.getLogger("capfilt").level == logging.WARNING
    import os

    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    assert logs.configure("verbose") == "verbose"  # an explicit flag overrides it
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"
    monkeypatch.setenv("CAPFILT_LOG_LEVEL", "nonsense")
    assert logs.verbosity() == "info"


def test_progress_is_off_when_quiet(clean_levels, monkeypatch, capsys):
    from model.progress import Progress

    monkeypatch.setenv("CAPFILT_LOG_LEVEL", "quiet")
    bar = Progress("stage1", 10)
    bar.report(1, loss="1.0")
    bar.close()
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("CAPFILT_LOG_LEVEL", "info")
    bar = Progress("stage1", 10)
    bar.report(1, loss="1.0")  # not a terminal here: one plain line
    bar.close()
    assert capsys.readouterr().out == "stage1: step 1/10 loss 1.0\n"


def test_step_lines_say_where_the_flow_stands():
    assert format_step_start(3, 14, "filter-r0", "filter") == "step 3 of 14: filter-r0 (capfilt filter)"
    assert format_step_end(3, 14, "filter-r0", 65.4, 612) == (
        "step 3 of 14: filter-r0 done in 1 min 05 s; about 10 min 12 s left (estimate from the 3 steps so far)")
    assert format_step_end(1, 14, "ingest", 4, None) == "step 1 of 14: ingest done in 4 s"
    assert format_step_end(14, 14, "eval-oracle", 9, 0) == "step 14 of 14: eval-oracle done in 9 s; that was the last step"
    assert format_duration(3725) == "1 h 02 min"


def test_time_left_uses_the_mean_of_the_same_command():
    done = [("ingest", 10.0), ("caption", 30.0), ("train stage1", 100.0), ("caption", 50.0)]
    # caption: its own mean (40); eval never ran: the mean of every step so far (47.5)
    assert estimate_left(done, ["caption", "eval"]) == pytest.approx(40 + 47.5)
    assert estimate_left([], ["caption"]) is None
    assert estimate_left(done, []) == 0


def test_step_clock_counts_against_the_plan():
    now = iter([0.0, 10.0, 10.0, 40.0, 40.0, 41.0])
    clock = StepClock(["ingest", "caption", "caption"], clock=lambda: next(now))
    k, started, line = clock.start("ingest", "ingest")
    assert (k, line) == (1, "step 1 of 3: ingest (capfilt ingest)")
    assert clock.end(k, started, "ingest", "ingest") == (
        "step 1 of 3: ingest done in 10 s; about 20 s left (estimate from the 1 step so far)")
    k, started, _ = clock.start("caption", "caption")
    assert clock.end(k, started, "caption", "caption").endswith("about 30 s left (estimate from the 2 steps so far)")
    k, started, _ = clock.start("caption", "caption")
    assert clock.end(k, started, "caption", "caption") == "step 3 of 3: caption done in 1 s; that was the last step"


@pytest.mark.parametrize("extra", [{}, {"truth": "/w/ground_truth.parquet", "annotated": "/a/ann.parquet"}])
def test_bootstrap_plans_every_step_it_runs(extra):
    """"step k of N" counts planned_steps: it must hold every step the flow runs (incl. curate's and
    train's, the finetune steps of an annotated set, the oracle and its training)."""
    from flows.bootstrap import planned_steps
    from flows.params import BootstrapParams

    params = BootstrapParams(source="src", root="/d", run="b", rounds=2, preset="toy", quick=True, **extra)
    planned = [step for _, step in planned_steps(params)]
    for k in range(3):  # what the flow runs, round by round
        curate, _, train = params.round_params(k)
        for step in [*params.finetune_steps(k).values(), *curate.steps(params.will_exist).values(),
                     params.filter_step(k), *train.steps().values()]:
            assert step in planned
    trained = [step.config.run for step in planned if step.COMMAND == "train stage1"]
    assert trained == ["b-r0"] + ([params.oracle_run] if extra else []) + ["b-r1", "b-r2"]  # the oracle after round 0
    assert [step.COMMAND.split()[0] for step in planned].count("finetune") == (4 if extra else 0)  # rounds 1 and 2
    assert planned[-1].COMMAND == "eval"


def _jpeg(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(out, format="JPEG")
    return out.getvalue()


def test_toy_clip_is_built_and_loaded_without_a_warning(tmp_path, caplog):
    """open_clip warns "initialized randomly" for a model built without weights: for the toy CLIP
    that is the plan (it is trained next), so it must not reach the user as a warning."""
    from model.toy.clip import pretrain_clip
    from model.toy.preset import ToyPreset
    from model.vision import load_vision_encoder

    caplog.set_level(logging.WARNING)
    pairs = [(_jpeg((200, 30, 30)), "a red square"), (_jpeg((30, 30, 200)), "a blue square")]
    clip = pretrain_clip(pairs, tmp_path / "clip", ToyPreset(clip_steps=1, threads=1))
    clip.load_scorer("cpu")
    load_vision_encoder(clip.local_vision_spec, device="cpu")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_expected_drops_only_inside_its_block(caplog):
    caplog.set_level(logging.WARNING)
    with logs.expected(logs.RANDOM_INIT):
        logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
    logging.warning("No pretrained weights loaded for model 'y'. Model initialized randomly.")
    assert [r.getMessage() for r in caplog.records] == [
        "No pretrained weights loaded for model 'y'. Model initialized randomly."]


def test_no_colour_codes_when_logs_go_to_a_file():
    from capfilt.environment import apply_defaults

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    to_file: dict[str, str] = {}
    apply_defaults(to_file, stderr=io.StringIO())
    assert to_file["PREFECT_LOGGING_COLORS"] == "false" and to_file["RAY_COLOR_PREFIX"] == "0"
    on_terminal: dict[str, str] = {}
    apply_defaults(on_terminal, stderr=Terminal())
    assert "PREFECT_LOGGING_COLORS" not in on_terminal and "RAY_COLOR_PREFIX" not in on_terminal
    mine = {"PREFECT_LOGGING_COLORS": "true"}  # the user's own choice wins
    apply_defaults(mine, stderr=io.StringIO())
    assert mine["PREFECT_LOGGING_COLORS"] == "true"
