"""The toy world's scenes: a shape of some color and size at a position on a background.

Their vocabulary, the captions that describe them (the true one, web alt-text phrasings, clean
annotators' captions) and their pixels. Everything takes the caller's random generator: the
same seed gives the same captions and bytes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"black": (15, 15, 15), "white": (245, 245, 245), "gray": (128, 128, 128)}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
ATTRIBUTES = ("shape", "color", "size", "position", "background")
ATTRIBUTE_VALUES = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}


_POSITION_PHRASES = {
    "left": ("on the left", "at the left", "to the left"),
    "right": ("on the right", "at the right", "to the right"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle", "at the center"),
}
_TEMPLATES = (
    "a {size} {color} {shape} {pos} of a {background} background",
    "a {size} {color} {shape} {pos}, {background} background",
    "{size} {color} {shape} {pos} on {background}",
    "photo of a {size} {color} {shape} {pos} on a {background} background",
)


# Clean human-style captions of the annotated set (COCO-like: several per image, each naming every
# attribute correctly, in different words and orders), deliberately not the web templates above.
ANNOTATION_TEMPLATES = (
    "a {size} {color} {shape} {pos} of a {background} background",
    "a {background} background with a {size} {color} {shape} {pos}",
    "there is a {size} {color} {shape} {pos}, on {background}",
    "{pos} sits a {size} {shape} in {color} against a {background} backdrop",
    "a {color} {shape}, {size}, placed {pos} on a plain {background} background",
    "on a {background} background, a {size} {shape} colored {color} appears {pos}",
    "a simple image: {size} {color} {shape} {pos}, {background} background",
    "the picture shows a {color} {shape} {pos}; it is {size} and the background is {background}",
)


def annotation_captions(attrs: dict[str, str], rng: np.random.Generator, n: int = 5) -> list[str]:
    """`n` distinct correct captions of a scene, as several annotators would write them."""
    picks = rng.permutation(len(ANNOTATION_TEMPLATES))[:n]
    phrases = _POSITION_PHRASES[attrs["position"]]
    return [ANNOTATION_TEMPLATES[i].format(pos=phrases[rng.integers(len(phrases))], **attrs) for i in picks]


def true_caption(attrs: dict[str, str]) -> str:
    """The canonical caption of a scene (the oracle caption)."""
    return (
        f"a {attrs['size']} {attrs['color']} {attrs['shape']} "
        f"{_POSITION_PHRASES[attrs['position']][0]} of a {attrs['background']} background"
    )


def web_caption(attrs: dict[str, str], rng: np.random.Generator) -> str:
    """A correct caption in one of several phrasings, as web alt-text would vary."""
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    phrases = _POSITION_PHRASES[attrs["position"]]
    return template.format(pos=phrases[rng.integers(len(phrases))], **attrs)


def render(attrs: dict[str, str], size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one scene with a little jitter and pixel noise so no two images are identical."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[attrs["background"]])
    draw = ImageDraw.Draw(img)
    radius = size * (0.14 if attrs["size"] == "small" else 0.3) * rng.uniform(0.9, 1.1)
    centers = {
        "left": (0.25, 0.5),
        "right": (0.75, 0.5),
        "top": (0.5, 0.25),
        "bottom": (0.5, 0.75),
        "center": (0.5, 0.5),
    }
    cx, cy = centers[attrs["position"]]
    cx = size * cx + rng.uniform(-0.04, 0.04) * size
    cy = size * cy + rng.uniform(-0.04, 0.04) * size
    color = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[attrs["color"]])
    shape = attrs["shape"]
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
    elif shape == "square":
        draw.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=color)
    elif shape == "cross":
        w = radius * 0.35
        draw.rectangle([cx - radius, cy - w, cx + radius, cy + w], fill=color)
        draw.rectangle([cx - w, cy - radius, cx + w, cy + radius], fill=color)
    pixels = np.asarray(img, dtype=np.int16)
    pixels = pixels + rng.integers(-8, 9, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
