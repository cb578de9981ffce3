"""The one trainer core: every capfilt model trains through `fit(objective, config, device)`.

Read top to bottom: the `Objective` a model plugs in -> optimizer and LR schedule -> checkpoints
and the "latest" pointer -> the loop -> several workers with Ray Train. Stage 1, Stage 2, their
finetuning (model/train_stage1.py, model/stage2.py, model/finetune.py) and the toy pieces'
pretraining (model/toy/training.py) are objectives; the loop knows nothing of Q-Formers or LLMs.

The loop: per optimizer step, `grad_accumulation` micro-batches, each run forward under autocast
(bf16/fp16 on GPU, nothing on CPU) and backward through a GradScaler (active for fp16 only);
then unscale, clip, step, schedule; a line of metrics.jsonl every `log_every` steps and a
checkpoint every `checkpoint_every` steps and at the last one (rank 0 only).

Exact resume: the data at micro-batch m is a pure function of (seed, m) (model/data.py), and a
checkpoint holds the trainable weights (the objective's `save`), the optimizer, scheduler and
grad scaler, the step, torch's CPU and CUDA RNG (dropout) and the objective's `extra_state`
(e.g. Stage 1's ITM negative-sampling generator). A resumed CPU run therefore logs the same
losses as the uninterrupted one.

`config` is a `LoopConfig` or any object with its fields (Stage1Config and Stage2Config).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from capfilt.device import autocast, pick_device

from .losses import world
from .progress import Progress
from .recipes import lr_factor

METRICS_NAME = "metrics.jsonl"
LATEST_NAME = "latest"
SELECTED_NAME = "selected"  # a model selection's pick (e.g. by held-out CIDEr): what the folder loads as
STATE_NAME = "trainer.pt"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class LoopConfig:
    """What the loop reads of a config; Stage1Config and Stage2Config have these fields too.

    `out` None writes nothing (no log, no checkpoints, no resume): the toy pieces (model/toy/)
    train in seconds and write their folders once, complete."""

    steps: int
    lr: float
    out: str | None = None
    grad_accumulation: int = 1
    weight_decay: float = 0.0  # what `Objective.param_groups` gives the matrices by default
    lr_schedule: str = "cosine-step"  # see model/recipes.py lr_factor
    warmup_steps: int = 0
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    precision: str = "fp32"  # bf16 | fp16 | fp32: autocast on GPU only
    seed: int = 0
    num_data_workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    resume: bool = False
    stop_at: int | None = None
    progress: bool = False


# -- what a model plugs in -----------------------------------------------------------------------

class Objective:
    """What a model brings to the loop.

    `name` labels the progress bar, the Ray Train run and the step folder's `<name>.json` (which
    `save` writes, with at least "step"). `module` is what trains: DDP wraps it on several
    workers and the loop calls it as `module(**inputs(batch, step))` under autocast. `data[m]`
    is micro-batch m and `data.position(m)` its {"epoch", "batch_in_epoch"}. `lineage` (which
    data made the model) is written to <out>/lineage.json.
    """

    name: str
    module: nn.Module
    data: torch.utils.data.Dataset
    lineage: dict | None = None

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self.module, weight_decay)

    def inputs(self, batch: dict, step: int) -> dict:
        """The module's keyword arguments for one micro-batch, on the device. Runs outside autocast,
        so frozen encoders here keep their own precision."""
        raise NotImplementedError

    def loss(self, output) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the loss to minimise, other figures to log) from the module's output."""
        raise NotImplementedError

    def samples(self, batch: dict) -> int:
        return next(iter(batch.values())).shape[0]

    def log_values(self) -> dict:
        """Figures of the model itself for a metrics line (Stage 1's temperature)."""
        return {}

    def shown(self, totals: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows of a step's averaged figures."""
        return {"loss": f"{totals['loss']:.3f}"}

    def save(self, folder: Path, step: int, data_position: dict) -> None:
        """Write the model (folder/model, save_pretrained-style) and folder/<name>.json."""
        raise NotImplementedError

    def restore(self, folder: Path) -> None:
        """Load the trainable weights that `save` wrote into folder."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Runs after each optimizer step (e.g. a clamp the model's recipe applies to a parameter)."""

    def extra_state(self) -> dict:
        """More state for an exact resume (kept in trainer.pt beside the loop's own)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


# -- optimizer and schedule ----------------------------------------------------------------------

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms or the temperature (LAVIS: ndim < 2)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(config, data):
    """The scheduler's step -> LR factor (model/recipes.py lr_factor); the LAVIS schedule needs
    each step's epoch of `data`."""
    def epoch_of(step: int) -> int:
        return data.position(step * config.grad_accumulation)["epoch"]

    epochs = epoch_of(config.steps - 1) + 1
    return lambda step: lr_factor(step, config, epoch_of(step), epochs)


# -- checkpoints: out/step-XXXXXXXX/{model/, <name>.json, trainer.pt} and out/latest ---------------

def latest_checkpoint(out: str | Path) -> Path | None:
    """The step folder a trainer --out folder's "latest" pointer names, or None without one."""
    out = Path(out)
    pointer = out / LATEST_NAME
    return out / pointer.read_text().strip() if pointer.exists() else None


def selected_checkpoint(out: str | Path) -> Path | None:
    """The checkpoint a model selection picked for a trainer --out folder, or None."""
    pointer = Path(out) / SELECTED_NAME
    return Path(out) / pointer.read_text().strip() if pointer.exists() else None


def select_checkpoint(out: str | Path, checkpoint: str | Path | None) -> None:
    """Make `out` load as `checkpoint` (a step folder, possibly another run's, e.g. the parent a
    finetuning did not beat), as LAVIS keeps its best checkpoint on the validation split; None
    drops the pick. Training and resuming follow "latest" whatever is selected."""
    pointer = Path(out) / SELECTED_NAME
    if checkpoint is None:
        pointer.unlink(missing_ok=True)
        return
    tmp = Path(out) / f".{SELECTED_NAME}.tmp"
    tmp.write_text(str(Path(checkpoint).resolve()))
    os.replace(tmp, pointer)


def resolve_latest(folder: str | Path) -> Path:
    """The checkpoint a trainer --out folder loads as (its selected one, else its latest step
    folder); any other folder (a step-*, a model/) as it is."""
    return selected_checkpoint(folder) or latest_checkpoint(folder) or Path(folder)


def save_checkpoint(out: Path, step: int, objective: Objective, optimizer, scheduler, scaler, data_position: dict) -> Path:
    folder = out / f"step-{step:08d}"
    objective.save(folder, step, data_position)
    torch.save({
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        **objective.extra_state(),
        "data_position": data_position,
    }, folder / STATE_NAME)
    # Written last: the checkpoint is complete. Through a rename, because a process killed
    # between write_text's truncate and its write would leave an empty pointer and no resume.
    pointer = out / f".{LATEST_NAME}.tmp"
    pointer.write_text(folder.name)
    os.replace(pointer, out / LATEST_NAME)
    return folder


def restore(folder: Path, objective: Objective, optimizer, scheduler, scaler) -> int:
    """Load a checkpoint into the objective and the loop's state; returns its step."""
    objective.restore(folder)
    state = torch.load(folder / STATE_NAME, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    objective.load_extra_state(state)
    return state["step"]


def _trim_metrics(path: Path, after_step: int) -> None:
    """Drop log lines past the resumed step, so a resumed run's log reads as one run."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= after_step]
        path.write_text("".join(ln + "\n" for ln in lines))


# -- the loop ------------------------------------------------------------------------------------

def worker_device(preference: str) -> torch.device:
    """Ray Train's device for this worker when distributed, else `preference` (auto: GPU if any)."""
    if world()[1] > 1:
        import ray.train.torch

        return ray.train.torch.get_device()
    return pick_device(preference)


def fit(objective: Objective, config, device: torch.device) -> dict:
    """Train (or resume from config.out) to config.steps, or stop after config.stop_at as if killed.
    Returns this process's {'step', 'checkpoint', 'metrics'}."""
    rank, world_size = world()
    out = Path(config.out) if config.out is not None else None
    writes = rank == 0 and out is not None  # the log, lineage and checkpoints: rank 0's
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if writes and objective.lineage is not None:
        (out / "lineage.json").write_text(json.dumps(objective.lineage, indent=1, default=str))
    data, accumulation = objective.data, config.grad_accumulation

    model = objective.module
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # fused: the whole update in one kernel over all parameters (CPU and CUDA), where PyTorch's CPU
    # default loops over them in Python; foreach (each op once over all parameters) elsewhere.
    # Toy sizes on a CPU: 0.6 ms a step against 2.2 ms foreach and several times that looped.
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(objective.param_groups(config.weight_decay), lr=config.lr, betas=config.betas,
                                  fused=fused, foreach=None if fused else True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, data))
    scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16" and device.type == "cuda")
    amp_dtype = AMP_DTYPES[config.precision]
    trainable = [p for p in objective.module.parameters() if p.requires_grad]

    step = 0
    previous = latest_checkpoint(out) if out is not None and config.resume else None
    if previous is not None:
        step = restore(previous, objective, optimizer, scheduler, scaler)
    metrics_path = out / METRICS_NAME if out is not None else None
    if writes:
        _trim_metrics(metrics_path, step)

    loader = torch.utils.data.DataLoader(
        data, batch_size=None, sampler=range(step * accumulation, config.steps * accumulation),
        num_workers=config.num_data_workers,
        # Its own generator: creating the iterator would otherwise draw from the global torch RNG
        # (which drives dropout) at a different moment in a resumed run than in a straight one.
        generator=torch.Generator().manual_seed(config.seed),
    )
    batches = iter(loader)
    last_stop = min(config.steps, config.stop_at or config.steps)
    progress = Progress(objective.name, last_stop, step, enabled=config.progress and rank == 0)
    window_start, window_samples, history = time.perf_counter(), 0, []
    checkpoint = previous
    model.train()
    while step < last_stop:
        optimizer.zero_grad(set_to_none=True)
        figures_seen = []  # detached; read (a device sync) only on the steps that log them
        for micro in range(accumulation):
            batch = next(batches)
            inputs = objective.inputs(batch, step)
            # DDP averages gradients on the last micro-batch only.
            sync = world_size == 1 or micro == accumulation - 1
            with (nullcontext() if sync else model.no_sync()), autocast(device, amp_dtype):
                output = model(**inputs)
            loss, figures = objective.loss(output)
            scaler.scale(loss / accumulation).backward()
            figures_seen.append({"loss": loss.detach(), **{k: v.detach() for k, v in figures.items()}})
            window_samples += objective.samples(batch) * world_size
        scaler.unscale_(optimizer)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        objective.after_step()
        step += 1
        progress.update(1)

        if step % config.log_every == 0 or step == last_stop:
            totals = {key: sum(float(f[key]) / accumulation for f in figures_seen) for key in figures_seen[0]}
            elapsed = time.perf_counter() - window_start
            record = {"step": step, **{k: round(v, 6) for k, v in totals.items()}, **objective.log_values(),
                      "lr": optimizer.param_groups[0]["lr"],
                      "samples_per_s": round(window_samples / max(elapsed, 1e-9), 2),
                      **data.position(step * accumulation)}
            history.append(record)
            progress.report(step, **objective.shown(totals))
            if writes:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            window_start, window_samples = time.perf_counter(), 0
        if writes and (step % config.checkpoint_every == 0 or step == last_stop):
            checkpoint = save_checkpoint(out, step, objective, optimizer, scheduler, scaler,
                                         data.position(step * accumulation))
    progress.close()
    return {"step": step, "checkpoint": str(checkpoint) if checkpoint else None, "metrics": history}


# -- several workers: Ray Train ------------------------------------------------------------------

def run_on_ray_train(train_fn, config, workers: int, use_gpu: bool | None, name: str) -> dict:
    """Run `train_fn(config)` (a trainer that ends in `fit`) on Ray Train workers with DDP; returns
    rank 0's {'step', 'checkpoint', 'metrics'} from `config.out` (`<name>.json` holds the step)."""
    # First: it sets Ray's environment before ray is imported (storage floor: pipeline/ray_env.py
    # imports nothing above capfilt's bottom, so models may use it).
    from pipeline.ray_env import ensure_ray, gpus_available  # noqa: I001
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray()
    use_gpu = gpus_available() >= workers if use_gpu is None else use_gpu
    config_class = type(config)

    def loop(cfg: dict) -> None:
        result = train_fn(config_class(**cfg))
        ray.train.report({"step": result["step"], "final": result["metrics"][-1] if result["metrics"] else {}})

    trainer = TorchTrainer(
        loop,
        train_loop_config=asdict(config),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(storage_path=str(Path(config.out).resolve() / "ray"), name=name),
    )
    trainer.fit()  # raises if a worker failed
    # Rank 0's checkpoint and log on disk are the result (the folder must be shared by workers).
    out = Path(config.out)
    checkpoint = latest_checkpoint(out)
    step = json.loads((checkpoint / f"{name}.json").read_text())["step"] if checkpoint else 0
    log = out / METRICS_NAME
    metrics = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {"step": step, "checkpoint": str(checkpoint) if checkpoint else None, "metrics": metrics}
