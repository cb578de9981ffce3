"""`annotated`: a clean, human-annotated image-caption set (COCO-like) that finetunes the
captioner and the filter and calibrates the filter's threshold (BLIP, Sec. 3.3).

The canonical form (what `capfilt synth` writes as <world>/annotated/annotated.parquet): one row
per image, its encoded bytes and several captions. The reader (pipeline/annotated.py) also takes
`image_path` / `url` instead of `image` and one `caption` per row instead of `captions`.
"""

import pyarrow as pa

from ._spec import ArtifactSchema, field

ANNOTATED = ArtifactSchema(
    name="annotated",
    version=1,
    schema=pa.schema(
        [
            field("image_id", pa.string(), "id of the image (rows with the same id are one image)", nullable=False),
            field("image", pa.binary(), "encoded image bytes (JPEG/PNG)", nullable=False),
            field("captions", pa.list_(pa.string()), "human-written captions of the image (at least one)", nullable=False),
        ]
    ),
    fix_hint=("an annotated set needs `image_id` (string), `image` (encoded bytes) or `image_path` / `url`, and "
              "`captions` (list of strings) or one `caption` per row; see `capfilt finetune --help`."),
)

# Alternatives the reader accepts for the image and the captions, in order of preference.
IMAGE_COLUMNS = ("image", "image_path", "url")
CAPTION_COLUMNS = ("captions", "caption")
