import hashlib
import http.client
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from capfilt.errors import ConfigError
from model.toy.world import BAD_URL_KINDS, WorldConfig, make_world, noise_ratio
from schemas import SOURCE


def digest_tree(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    config = WorldConfig(images=30, seed=5, port=18555, huge_side=2000)
    make_world(tmp_path / "a", config)
    make_world(tmp_path / "b", config)
    make_world(tmp_path / "c", WorldConfig(images=30, seed=6, port=18555, huge_side=2000))
    assert digest_tree(tmp_path / "a") == digest_tree(tmp_path / "b")
    assert digest_tree(tmp_path / "a") != digest_tree(tmp_path / "c")


def test_source_validates_and_noise_ratio_matches(tmp_path):
    world = make_world(tmp_path, WorldConfig(images=200, seed=1, noise=0.4, huge_side=2000))
    SOURCE.validate(world["source"])
    truth = pq.read_table(world["ground_truth"])
    assert abs(noise_ratio(truth) - 0.4) <= 0.05
    kinds = set(truth.column("kind").to_pylist())
    assert set(BAD_URL_KINDS) | {"image", "duplicate"} == kinds
    noisy = [r for r in truth.to_pylist() if r["corrupted"]]
    assert {r["noise_kind"] for r in noisy} == {"swap", "attribute", "junk", "empty"}
    for row in noisy:
        assert row["web_caption"] != row["true_caption"]
    assert pq.read_table(world["source"]).num_rows == world["rows"] == truth.num_rows


def test_bad_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="--noise must be in"):
        WorldConfig(noise=2)
    with pytest.raises(ConfigError, match="unknown noise kind"):
        WorldConfig(noise_kinds=("typo",))


def fetch(url, timeout=3.0):
    return urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "test"}), timeout=timeout)


def url_of(small_world, kind):
    truth = pq.read_table(small_world["world"]["ground_truth"]).to_pylist()
    return next(r["url"] for r in truth if r["kind"] == kind)


def test_server_good_and_duplicate_images(small_world):
    truth = pq.read_table(small_world["world"]["ground_truth"]).to_pylist()
    dup = next(r for r in truth if r["kind"] == "duplicate")
    a = fetch(dup["url"]).read()
    b = fetch(dup["duplicate_of"]).read()
    assert a == b and a[:2] == b"\xff\xd8"


@pytest.mark.parametrize("kind,code", [("http_404", 404), ("http_500", 500)])
def test_server_error_statuses(small_world, kind, code):
    with pytest.raises(urllib.error.HTTPError) as err:
        fetch(url_of(small_world, kind))
    assert err.value.code == code


def test_server_slow_route_exceeds_timeout(small_world):
    with pytest.raises(Exception, match="timed out"):
        fetch(url_of(small_world, "slow"), timeout=0.5).read()


def test_server_bad_bodies(small_world):
    truncated = fetch(url_of(small_world, "truncated_jpeg")).read()
    assert truncated[:2] == b"\xff\xd8" and not truncated.endswith(b"\xff\xd9")
    html = fetch(url_of(small_world, "html_page"))
    assert html.headers["Content-Type"] == "text/html" and b"<html>" in html.read()
    not_image = fetch(url_of(small_world, "not_image"))
    assert not_image.headers["Content-Type"] == "image/jpeg" and not_image.read()[:2] != b"\xff\xd8"
    huge = fetch(url_of(small_world, "huge_image")).read()
    assert huge[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(huge[16:20], "big") == 9000
    opt_out = fetch(url_of(small_world, "opt_out"))
    assert "noai" in opt_out.headers["X-Robots-Tag"]


def test_server_redirect_loop(small_world):
    with pytest.raises(urllib.error.HTTPError, match="redirect"):
        fetch(url_of(small_world, "redirect_loop"))
    url = url_of(small_world, "redirect_loop")
    host, port = small_world["server"].host, small_world["server"].port
    conn = http.client.HTTPConnection(host, port, timeout=3)
    conn.request("GET", url.split(str(port), 1)[1])
    response = conn.getresponse()
    assert response.status == 302 and url.endswith(response.getheader("Location"))


def test_annotated_set_follows_the_contract(tmp_path):
    """A COCO-style clean set next to the world: other images, several correct captions each."""
    import io
    import json

    from PIL import Image

    from model.toy.scenes import ATTRIBUTE_VALUES
    from model.toy.world import load_world

    config = WorldConfig(images=60, seed=3, huge_side=2000)
    make_world(tmp_path / "a", config)
    world = load_world(tmp_path / "a")
    # world.json names it relative to the world (like source/ground_truth); load_world resolves it
    assert json.loads((tmp_path / "a" / "world.json").read_text())["annotated"] == "annotated/annotated.parquet"
    table = pq.read_table(world["annotated"])
    assert str(table.schema.field("image_id").type) == "string"
    assert str(table.schema.field("image").type) == "binary"
    assert str(table.schema.field("captions").type) == "list<element: string>"
    rows = table.to_pylist()
    assert len(rows) == 6  # 10% of the world
    assert len({r["image_id"] for r in rows}) == len(rows)
    truth = {r["image_id"]: r for r in pq.read_table(tmp_path / "a" / "annotated" / "ground_truth.parquet").to_pylist()}
    assert set(truth) == {r["image_id"] for r in rows}

    world_images = {p.read_bytes() for p in (tmp_path / "a" / "files").glob("0*.jpg")}
    templates = set()
    for row in rows:
        assert Image.open(io.BytesIO(row["image"])).size == (64, 64)
        assert row["image"] not in world_images
        captions = row["captions"]
        assert len(captions) == 5 and len(set(captions)) == 5 and all(c.strip() for c in captions)
        attrs = truth[row["image_id"]]
        for caption in captions:
            words = caption.replace(",", " ").replace(";", " ").split()
            for name, values in ATTRIBUTE_VALUES.items():
                if name == "position":
                    continue  # said in phrases ("near the top", "in the middle")
                assert [v for v in values if v in words] == [attrs[name]], (caption, name)
            templates.add(" ".join(w for w in words if not any(w in v for v in ATTRIBUTE_VALUES.values())))
    assert len(templates) >= 5  # many phrasings, not one template

    # same seed -> same bytes; another seed -> other images
    make_world(tmp_path / "b", config)
    assert digest_tree(tmp_path / "a" / "annotated") == digest_tree(tmp_path / "b" / "annotated")
    make_world(tmp_path / "c", WorldConfig(images=60, seed=4, huge_side=2000))
    assert digest_tree(tmp_path / "a" / "annotated") != digest_tree(tmp_path / "c" / "annotated")
    # none asked for, none written
    make_world(tmp_path / "d", WorldConfig(images=20, seed=3, huge_side=2000, annotated=0))
    assert "annotated" not in load_world(tmp_path / "d") and not (tmp_path / "d" / "annotated").exists()
