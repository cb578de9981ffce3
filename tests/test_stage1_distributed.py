"""Several workers under Ray Train (gloo on CPU): what crosses workers, and with which gradients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def _gather_loop(cfg: dict) -> None:
    """Each worker holds 3 rows; checks what gathering gives it, writes its findings to a file."""
    import torch.distributed as dist

    from model.losses import gather_no_grad, gather_with_local_grad, itc_loss

    rank, size = dist.get_rank(), dist.get_world_size()
    full_images = torch.nn.functional.normalize(torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    full_texts = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    local = full_texts[rank * 3:(rank + 1) * 3].clone().requires_grad_(True)
    gathered = gather_with_local_grad(local)
    weights = torch.arange(6.0)[:, None].expand(6, 8)
    (gathered * weights).sum().backward()
    expected_grad = weights[rank * 3:(rank + 1) * 3]
    images = full_images[rank * 3:(rank + 1) * 3].clone().requires_grad_(True)
    texts = full_texts[rank * 3:(rank + 1) * 3].clone().requires_grad_(True)
    out = itc_loss(images, texts, torch.tensor(0.1), label_smoothing=0.1)
    out.loss.backward()
    findings = {
        "rank": rank,
        "size": size,
        "gathered_is_everyone": torch.allclose(gathered.detach(), full_texts),
        "grad_only_local": torch.equal(local.grad, expected_grad),
        "others_have_no_grad": not gather_no_grad(local).requires_grad,
        "loss": out.loss.item(),
        "images_grad_nonzero": bool(images.grad.abs().sum() > 0),
    }
    Path(cfg["out"], f"rank{rank}.json").write_text(json.dumps(findings))


def test_cross_worker_gather_with_two_workers(ray_local, tmp_path):
    import sys

    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from model.losses import itc_loss

    # Ray workers cannot import this test module; ship the loop function by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    TorchTrainer(
        _gather_loop,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="gather"),
    ).fit()
    findings = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for f in findings:
        assert f["size"] == 2 and f["gathered_is_everyone"] and f["grad_only_local"] and f["others_have_no_grad"]
        assert f["images_grad_nonzero"]
    # Two workers of 3 rows compute, between them, the ITC loss of the whole batch of 6.
    full_images = torch.nn.functional.normalize(torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    full_texts = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    single = itc_loss(full_images, full_texts, torch.tensor(0.1), label_smoothing=0.1).loss.item()
    assert sum(f["loss"] for f in findings) / 2 == pytest.approx(single, abs=1e-5)


def test_two_worker_training_run_checkpoints(ray_local, tmp_path):
    from model.train_stage1 import Stage1Config, train_distributed
    from stage1_world import make_clip_vision, make_curated_run, make_tokenizer

    make_curated_run(tmp_path / "data", "r1", images=16, seed=0)
    config = Stage1Config(
        root=str(tmp_path / "data"), run="r1", vision=make_clip_vision(tmp_path / "clip"), out=str(tmp_path / "out"),
        tokenizer=str(make_tokenizer(tmp_path / "tok")), bert=None, steps=2, batch_size=4, warmup_steps=1,
        model=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   num_query_tokens=4, embed_dim=16, max_position_embeddings=64),
        log_every=1, checkpoint_every=2, progress=False,
    )
    result = train_distributed(config, workers=2, use_gpu=False)
    assert result["step"] == 2
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # rank 0 alone writes the log
    assert (tmp_path / "out" / "step-00000002" / "model" / "model.safetensors").exists()
