"""Test helpers for the caption stage: `images/` shards committed the way ingest commits them."""

from __future__ import annotations

import hashlib
import io

import numpy as np

from model.toy.scenes import ATTRIBUTE_VALUES, render, true_caption
from pipeline.run_store import RunStore, ShardCounts
from schemas import IMAGES


def jpeg(img) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def image_rows(shard: str, count: int, seed: int = 0, corrupt: tuple[int, ...] = (), size: int = 48) -> list[dict]:
    """`count` rendered scenes as `images` rows; rows listed in `corrupt` get truncated JPEG bytes."""
    rng = np.random.default_rng([seed, int(hashlib.sha256(shard.encode()).hexdigest()[:8], 16)])
    rows = []
    for i in range(count):
        attrs = {name: str(rng.choice(values)) for name, values in ATTRIBUTE_VALUES.items()}
        data = jpeg(render(attrs, size, rng))
        if i in corrupt:
            data = data[: len(data) // 3]
        rows.append(
            dict(sample_id=f"{shard}/{i}", key=f"{i:09d}", url=f"http://127.0.0.1:1/{shard}/{i}.jpg",
                 caption=true_caption(attrs), image=data, image_format="jpg", width=size, height=size)
        )
    return rows


def commit_image_shards(store: RunStore, shards: dict[str, int], seed: int = 0, corrupt: dict[str, tuple[int, ...]] | None = None) -> None:
    """Commit one ingest shard per entry (name -> image count), as `capfilt ingest` would."""
    corrupt = corrupt or {}
    for shard, count in shards.items():
        table = IMAGES.from_pylist(image_rows(shard, count, seed, corrupt.get(shard, ())))
        store.commit_shard(
            "ingest", shard, "test-ingest", outputs={"images": (IMAGES, table)},
            counts=ShardCounts(rows_in=count, kept=count),
        )
