"""Typed flow parameters, validated before any work starts."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.run_store import _RUN_ID

OptionValue = str | int | float | bool | None


def options_to_argv(options: dict[str, OptionValue]) -> list[str]:
    """{"shard-size": 100, "allow-private-addresses": True} -> ["--shard-size", "100", "--allow-private-addresses"]."""
    argv: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-").lstrip("-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        else:
            argv += [flag, str(value)]
    return argv


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
    """Parameters of the `curate` flow. Stage options use the CLI's option names."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(..., description="LAION-style source file or folder (local path or fsspec URI).")
    root: str = Field("./data", description="Data root (local path or fsspec URI).")
    run: str = Field(..., description="Run id; a scheduled run with a fixed id only processes new shards.")
    ingest: dict[str, OptionValue] = Field(default_factory=dict, description="`capfilt ingest` options, e.g. {'shard-size': 1000}.")
    caption: dict[str, OptionValue] | None = Field(
        None, description="`capfilt caption` options, e.g. {'captioner': 'Salesforce/blip-image-captioning-large', 'num-captions': 10}; null skips captioning."
    )
    filter: dict[str, OptionValue] | None = Field(
        None, description="`capfilt filter` options, e.g. {'clip': 'ViT-L-14', 'clip-pretrained': 'openai', 'itm': 'Salesforce/blip2-itm-vit-g', 'policy': 'blip2'}; null skips filtering."
    )
    execution: Execution = Field(default_factory=Execution)

    @field_validator("run")
    @classmethod
    def _run_id(cls, value: str) -> str:
        if not _RUN_ID.match(value):
            raise ValueError("use letters, digits, '.', '_' and '-' (at most 128)")
        return value

    def stage_argv(self) -> dict[str, list[str]]:
        """Each stage's full CLI arguments, in the order the flow runs them."""
        common = ["--root", self.root, "--run", self.run]
        stages = {"ingest": ["--source", self.source, *common, "--no-progress", *options_to_argv(self.ingest)]}
        if self.caption is not None:
            stages["caption"] = [*common, *options_to_argv(self.caption)]
        if self.filter is not None:
            stages["filter"] = [*common, *options_to_argv(self.filter)]
        return stages


def describe_errors(exc: Exception) -> str:
    """One line per pydantic error: 'field.path: message'."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    return "; ".join(".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in errors())


__all__ = ["CurateParams", "Execution", "describe_errors", "options_to_argv"]
