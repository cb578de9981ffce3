"""Typed flow parameters, validated before any work starts."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from capfilt.errors import ConfigError
from flows.steps import StepFields, make
from pipeline.run_store import check_run_id

# A stage's options in a parameters file are {name: value}, by field name (top_k), dotted field path
# (select.top_k) or the CLI's spelling (top-k); flows/steps/ builds the stage's typed config from
# them, checked. A bootstrap hands its curate and train subflows a preset's typed fields by path,
# whose values may be lists (policies) or objects (a Q-Former architecture).
OptionValue = str | int | float | bool | None | list | dict


class Execution(BaseModel):
    """Where stages run: in this process on a local Ray, or as Ray jobs on a cluster."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["embedded", "cluster"] = "embedded"
    ray_address: str | None = Field(
        None, description="Job submission address of the cluster (http://head:8265); cluster mode only."
    )
    working_dir: str | None = Field(
        None, description="runtime_env working_dir uploaded with each job (cluster mode), e.g. '.'"
    )

    @model_validator(mode="after")
    def _cluster_needs_address(self):
        if self.mode == "cluster" and not self.ray_address:
            raise ValueError("execution.mode 'cluster' needs execution.ray_address (e.g. http://127.0.0.1:8265)")
        return self


class CurateParams(BaseModel):
    """Parameters of the `curate` flow. Stage options by field name or the CLI's option name."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(..., description="LAION-style source file or folder (local path or fsspec URI).")
    root: str = Field("./data", description="Data root (local path or fsspec URI).")
    run: str = Field(..., description="Run id; a scheduled run with a fixed id only processes new shards.")
    images_from: str | None = Field(None, description="Reuse this run's downloads instead of downloading the source again.")
    ingest: dict[str, OptionValue] = Field(default_factory=dict, description="`capfilt ingest` options, e.g. {'shard-size': 1000}.")
    caption: dict[str, OptionValue] | None = Field(
        None, description="`capfilt caption` options, e.g. {'captioner': 'Salesforce/blip-image-captioning-large', 'num-captions': 10}; null skips captioning."
    )
    filter: dict[str, OptionValue] | None = Field(
        None, description="`capfilt filter` options, e.g. {'clip': 'ViT-L-14', 'clip-pretrained': 'openai', 'itm': 'Salesforce/blip2-itm-vit-g', 'policy': 'blip2'}; null skips filtering."
    )
    execution: Execution = Field(default_factory=Execution)

    _run = field_validator("run")(classmethod(lambda cls, v: _run_id(v)))

    def steps(self, will_exist: tuple[str, ...] = ()) -> dict:
        """Each stage's typed step, checked, in the order the flow runs them."""
        where = {"root": self.root, "run": self.run}
        if self.images_from:  # a later bootstrap round: round 0's images, not a second download
            stages = {"ingest": make("ingest", {"from_run": self.images_from, **where})}
        else:
            stages = {"ingest": make("ingest", {**self.ingest, "source": self.source, **where, "progress": False})}
        if self.caption is not None:
            stages["caption"] = make("caption", {**self.caption, **where})
        if self.filter is not None:
            stages["filter"] = make("filter", {**self.filter, **where}, will_exist)
        return stages

    @property
    def labels(self) -> list[str]:
        """The steps' labels (what names their Ray jobs), without building them."""
        return ["ingest", *(["caption"] if self.caption is not None else []), *(["filter"] if self.filter is not None else [])]


def _run_id(value: str) -> str:
    try:
        return check_run_id(value)  # the one rule for run ids
    except ConfigError as exc:
        raise ValueError(str(exc)) from None  # pydantic reports ValueErrors under the field's name


# Where a round's finetuned models go, inside the models folder of the round they start from.
FINETUNED_FILTER, FINETUNED_CAPTIONER = "filter", "captioner"


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


class TrainParams(BaseModel):
    """Parameters of the `train` flow: Stage 1 then Stage 2 on a curated run."""

    model_config = ConfigDict(extra="forbid")
    root: str = Field("./data", description="Data root holding runs/<run>/curated.")
    run: str = Field(..., description="Curated run to train on (its lineage is recorded in the checkpoints).")
    out: str | None = Field(None, description="Checkpoint folder; default <root>/models/<run> (stage1/ and stage2/ inside).")
    stage1: dict[str, OptionValue] = Field(
        ..., description="`capfilt train stage1` options, e.g. {'vision': 'open_clip:ViT-L-14@openai', 'steps': 250000}."
    )
    stage2: dict[str, OptionValue] | None = Field(
        None, description="`capfilt train stage2` options, e.g. {'llm': 'facebook/opt-2.7b'}; null stops after Stage 1."
    )
    execution: Execution = Field(default_factory=Execution)

    _run = field_validator("run")(classmethod(lambda cls, v: _run_id(v)))

    @property
    def models(self) -> str:
        return self.out or _join(self.root, "models", self.run)

    @property
    def labels(self) -> list[str]:
        return ["stage1", *(["stage2"] if self.stage2 is not None else [])]

    def steps(self) -> dict:
        """{step label: typed step} in the order the flow runs them; Stage 2 may read the Stage 1
        this flow trains."""
        stage1_out = _join(self.models, "stage1")
        where = {"root": self.root, "run": self.run}
        steps = {"stage1": make("train stage1", {**self.stage1, **where, "out": stage1_out})}
        if self.stage2 is not None:
            steps["stage2"] = make("train stage2", {**self.stage2, **where, "stage1": stage1_out,
                                                     "out": _join(self.models, "stage2")}, (self.models,))
        return steps


class BootstrapParams(BaseModel):
    """Parameters of the `bootstrap` flow: round 0 on the raw source, then CapFilt rounds.

    Runs are `<run>-r0`, `<run>-r1`, ...; models go to `<root>/models/<run>-r<k>/stage1|stage2`.
    A preset gives each stage's typed fields; the dicts here replace single fields of it by name (the field's or
    the CLI's spelling), checked as typed.
    """

    model_config = ConfigDict(extra="forbid")
    source: str = Field(..., description="LAION-style source file or folder (local path or fsspec URI).")
    root: str = Field("./data", description="Data root (local path or fsspec URI).")
    run: str = Field("bootstrap", description="Prefix of the rounds' run ids.")
    rounds: int = Field(1, ge=0, le=10, description="CapFilt rounds after round 0.")
    preset: Literal["toy", "blip2", "none"] = Field("toy", description="Stage options to start from.")
    quick: bool = Field(False, description="Toy preset: fewer steps and captions.")
    ingest: dict[str, OptionValue] = Field(default_factory=dict)
    round0_caption: dict[str, OptionValue] = Field(default_factory=dict)
    round0_filter: dict[str, OptionValue] = Field(default_factory=dict)
    caption: dict[str, OptionValue] = Field(default_factory=dict)
    filter: dict[str, OptionValue] = Field(default_factory=dict)
    stage1: dict[str, OptionValue] = Field(default_factory=dict)
    stage2: dict[str, OptionValue] | None = Field(default_factory=dict, description="null: Stage 1 only.")
    eval: dict[str, OptionValue] = Field(default_factory=dict, description="Options of every `capfilt eval`.")
    truth: str | None = Field(None, description="Ground-truth Parquet of a synthetic world: adds an oracle model and evaluation.")
    annotated: str | None = Field(None, description=(
        "Clean annotated set (BLIP's COCO): before round k >= 1, round k-1's Stage 1 and Stage 2 are finetuned "
        "on it (capfilt finetune filter|captioner), and the finetuned filter keeps every caption whose ITM "
        "probability reaches the threshold calibrated on its held-out part."))
    finetune_filter: dict[str, OptionValue] = Field(default_factory=dict)
    finetune_captioner: dict[str, OptionValue] = Field(default_factory=dict)
    pretrain: dict[str, OptionValue] = Field(default_factory=dict, description=(
        "`capfilt toy pretrain` options of presets that pretrain toy frozen models, e.g. {'world_images': 12000}."))
    heldout: str | None = Field(None, description="A synthetic world folder no model trains on: the clean evaluation set.")
    evaluate: bool = Field(True, description="Run `capfilt eval` on every trained model and put the table in the report.")
    ablation: bool = Field(False, description=(
        "BLIP's Table 1: besides round 1 (captioner + filter), train two more arms on round 0's images with the "
        "same budget: captioner (web + synthetic captions, no filter) and filter (web captions, filtered); "
        "models are labelled raw, captioner, filter, capfilt and oracle."))
    execution: Execution = Field(default_factory=Execution)

    _run = field_validator("run")(classmethod(lambda cls, v: _run_id(v)))

    @model_validator(mode="after")
    def _ablation_needs_a_round(self):
        if self.ablation and self.rounds < 1:
            raise ValueError("ablation compares round 1's captioner and filter: it needs rounds >= 1")
        return self

    def round_run(self, k: int) -> str:
        return f"{self.run}-r{k}"

    def models(self, run: str) -> str:
        return _join(self.root, "models", run)

    @property
    def toy_dir(self) -> str:
        return self.models(f"{self.run}-toy")

    def preset_options(self):
        from capfilt.presets import get_preset

        return get_preset(self.preset, self.toy_dir, self.quick)

    def round_params(self, k: int) -> tuple[CurateParams, StepFields, TrainParams]:
        """Round k: (curate params without filter, the filter's fields, train params)."""
        preset = self.preset_options()
        run = self.round_run(k)
        if k == 0:
            caption = preset.round0_caption.replace(self.round0_caption)
            filter_fields = preset.round0_filter.replace(self.round0_filter)
        else:  # BLIP with an annotated set: the finetuned captioner and the calibrated, finetuned filter
            previous = self.models(self.round_run(k - 1))
            captioner, itm = (FINETUNED_CAPTIONER, FINETUNED_FILTER) if self.annotated else ("stage2", "stage1")
            caption = preset.caption.replace(preset.calibrated_caption.values) if self.annotated else preset.caption
            caption = caption.replace({"captioner": _join(previous, captioner)}).replace(self.caption)
            filter_fields = (preset.calibrated_filter if self.annotated else preset.filter)
            filter_fields = filter_fields.replace({"itm": _join(previous, itm)}).replace(self.filter)
        curate = CurateParams(source=self.source, root=self.root, run=run, ingest=preset.ingest.replace(self.ingest).values,
                              images_from=self.round_run(0) if k else None, caption=caption.values, filter=None,
                              execution=self.execution)
        return curate, filter_fields, self.train_params(run)

    def train_params(self, run: str) -> TrainParams:
        preset = self.preset_options()
        stage2 = None if self.stage2 is None else preset.stage2.replace(self.stage2).values
        return TrainParams(root=self.root, run=run, out=self.models(run), stage1=preset.stage1.replace(self.stage1).values,
                           stage2=stage2, execution=self.execution)

    @property
    def will_exist(self) -> tuple[str, ...]:
        """What earlier steps write that later ones read: every round's models."""
        return (self.models(""),)

    def finetune_steps(self, k: int) -> dict:
        """Round k's finetune steps (label -> step): round k-1's models finetuned on the annotated
        set, into models/<run>-r<k-1>/filter (+ calibration.json) and .../captioner."""
        if not self.annotated or k == 0:
            return {}
        preset = self.preset_options()
        previous = self.models(self.round_run(k - 1))
        fields = preset.finetune_filter.replace(self.finetune_filter).values
        # BLIP's filter starts from the round's Stage 1, unless a Stage 1 pretrained elsewhere is named
        # (`--set finetune_filter.stage1=FOLDER`) or the toy preset pretrains one (`--set pretrain.stage1_steps=N`)
        start = fields.get("stage1") or self.pretrained_stage1()
        if start and fields.get("folds", 1) > 1:
            how = ("--set pretrain.stage1_steps=0 --set pretrain.stage2_steps=0" if not fields.get("stage1")
                   else "leave finetune_filter.stage1 unset")
            raise ConfigError(f"--set finetune_filter.folds={fields['folds']}: the filter starts from {start}, not "
                              f"from round {k - 1}'s Stage 1, so it never trained on the images it judges; folds "
                              f"retrain the round's Stage 1 without each fold. For folds, {how}.")
        steps = {f"finetune-filter-r{k}": make("finetune filter", {
            **fields, "annotated": self.annotated, "stage1": start or _join(previous, "stage1"),
            "out": _join(previous, FINETUNED_FILTER)}, self.will_exist)}
        if self.stage2 is not None:
            # and the captioner from the round's Stage 2, unless one pretrained elsewhere is named
            # (`--set finetune_captioner.stage2=FOLDER`) or the toy preset pretrains one (`pretrain.stage2_steps`)
            captioner = preset.finetune_captioner.replace(self.finetune_captioner).values
            steps[f"finetune-captioner-r{k}"] = make("finetune captioner", {
                **captioner, "annotated": self.annotated,
                "stage2": captioner.get("stage2") or self.pretrained_stage2() or _join(previous, "stage2"),
                "out": _join(previous, FINETUNED_CAPTIONER)}, self.will_exist)
        return steps

    def filter_step(self, k: int):
        _, filter_fields, _ = self.round_params(k)
        return make("filter", {**filter_fields.values, "root": self.root, "run": self.round_run(k)}, self.will_exist)

    # BLIP's Table 1 arms besides raw (round 0) and capfilt (round 1): {arm: what round 1's filter becomes}.
    # Each arm takes round 1's captions and scores (`filter --from-run`) and only selects differently.
    ABLATION_ARMS: ClassVar[dict[str, dict]] = {"captioner": {"policies": ("none",)}, "filter": {"caption_sources": ("web",)}}

    def ablation_run(self, arm: str) -> str:
        return f"{self.run}-{arm}"

    def ablation_steps(self, arm: str) -> tuple[CurateParams, object, TrainParams]:
        """An arm's ingest (round 0's images), its filter step (round 1's captions and scores, its own
        selection) and its training (the same budget as every arm)."""
        run = self.ablation_run(arm)
        _, filter_fields, _ = self.round_params(1)
        curate = CurateParams(source=self.source, root=self.root, run=run, images_from=self.round_run(0),
                              caption=None, filter=None, execution=self.execution)
        step = make("filter", {**filter_fields.replace(self.ABLATION_ARMS[arm]).values, "root": self.root, "run": run,
                                "from_run": self.round_run(1)}, self.will_exist)
        return curate, step, self.train_params(run)

    def pretrained_stage1(self) -> str | None:
        """The toy folder's pretrained Stage 1 where the pretrain step trains one."""
        from model.toy.preset import TOY_STAGE1

        step = self.pretrain_step()
        return _join(step.out, TOY_STAGE1) if step is not None and step.stage1_steps > 0 else None

    def pretrained_stage2(self) -> str | None:
        """The toy folder's pretrained Stage 2 where the pretrain step trains one."""
        from model.toy.preset import TOY_STAGE2

        step = self.pretrain_step()
        return _join(step.out, TOY_STAGE2) if step is not None and step.stage2_steps > 0 else None

    def pretrain_steps(self) -> dict:
        """label -> the toy preset's pretraining steps: its frozen pieces ("toy-pretrain") and, where it
        pretrains a Stage 1 (and a Stage 2 from it), those as a step of their own ("toy-blip2", the toy's
        public BLIP-2 checkpoint), which the flow runs beside round 0's trainings (only round 1's
        finetuning needs them); {} for a preset without toy models."""
        step = self.pretrain_step()
        if step is None:
            return {}
        if step.stage1_steps > 0:
            return {"toy-pretrain": replace(step, stage1_steps=0, stage2_steps=0), "toy-blip2": step}
        return {"toy-pretrain": step}

    def pretrain_step(self):
        pretrain = self.preset_options().pretrain
        if pretrain is None:
            if self.pretrain:
                raise ConfigError(f"--set pretrain.*: preset {self.preset!r} pretrains no toy models; "
                                  f"use it with --preset toy (the demo's).")
            return None
        return make("toy pretrain", {**pretrain.replace(self.pretrain).values, "root": self.root, "run": self.round_run(0)})

    @property
    def oracle_run(self) -> str:
        return f"{self.run}-oracle"

    def oracle_step(self):
        return make("synth oracle", {"truth": self.truth, "root": self.root, "from_run": self.round_run(0),
                                      "run": self.oracle_run})

    def captioner_evals(self) -> dict:
        """label -> the eval step (writing eval.json into the captioner's folder) of the captions each
        CapFilt round's finetuned captioner wrote its synthetic captions with (what the round's
        captions are worth, beside the arms its data trained), on the held-out world; {} without an
        annotated set or a held-out world."""
        if not (self.annotated and self.heldout and self.evaluate and self.stage2 is not None):
            return {}
        folders = {k: _join(self.models(self.round_run(k - 1)), FINETUNED_CAPTIONER) for k in range(1, self.rounds + 1)}
        return {f"captioner-of-r{k}": make("eval", {**self.eval, "root": self.root, "run": self.round_run(k),
                                                    "captioner": folder, "heldout": self.heldout, "out": folder},
                                           self.will_exist) for k, folder in folders.items()}

    def eval_step(self, run: str):
        """The evaluation of the models trained on `run`: retrieval (and captions with Stage 2) on the
        held-out world when given (else on the run itself), and filter quality of the run with ground truth."""
        models = self.models(run)
        values = {**self.eval, "root": self.root, "run": run, "stage1": _join(models, "stage1"),
                  "out": models}  # writes models/eval.json
        if self.stage2 is not None:
            values["captioner"] = _join(models, "stage2")
        if self.heldout:
            values["heldout"] = self.heldout
        if self.truth and run != self.oracle_run:  # the oracle run has no scores to judge
            values["truth"] = self.truth
        return make("eval", values, self.will_exist)


def describe_errors(exc: Exception) -> str:
    """One line per pydantic error: 'field.path: message'."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    return "; ".join(".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in errors())


__all__ = ["BootstrapParams", "CurateParams", "Execution", "TrainParams", "describe_errors"]
