"""The example suite's data: small classification tasks drawn only from what PyPI packages ship.

Sources: scikit-learn's handwritten digits, glyphs rendered with Pillow from the fonts
inside matplotlib, and patches of scikit-image's sample photographs and textures. Every
image is 32×32 RGB, dark-on-light for glyphs (random colours were unlearnable at this
scale). Splits: `pretrain` (image–caption pairs for the tiny CLIP, kept in memory),
`finetune`, `test` and `unlabeled`, written as image folders `DIR/<split>/<task>/<class>/<n>.png`.
No image appears in two splits: every generated image's bytes are hashed and a repeat is
drawn again, and the digits' source images are partitioned between splits.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rankone.errors import RankoneError

IMAGE_SIZE = 32
SPLITS = ("pretrain", "finetune", "test", "unlabeled")
WRITTEN_SPLITS = ("finetune", "test", "unlabeled")
# The folder an unlabeled image goes in: its class is not recorded.
UNLABELED_FOLDER = "images"


@dataclass(frozen=True)
class Task:
    name: str
    classnames: tuple[str, ...]
    # What a caption says about an image whose class name is held out of pretraining.
    domain: str


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("digits", ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"), "a handwritten digit"),
        Task("letters", tuple("abcdefghjkmnpqrtuy"), "a printed letter"),
        Task("greek", ("alpha", "beta", "gamma", "delta", "epsilon", "theta", "lambda", "pi", "sigma", "omega"), "a greek letter"),
        Task("fonts", ("sans", "serif", "mono", "stix", "roman", "typewriter"), "a word in some typeface"),
        Task("textures", ("brick", "grass", "gravel", "moon", "cells", "coins"), "a texture"),
        Task("photos", ("astronaut", "coffee", "cat", "rocket", "cameraman", "galaxies", "retina", "tissue"), "a photograph"),
    )
}

GREEK_GLYPHS = {"alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "theta": "θ", "lambda": "λ", "pi": "π", "sigma": "σ", "omega": "ω"}
# Typeface class → matplotlib font files (regular, bold, italic variants of one family).
FONT_FAMILIES = {
    "sans": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf"),
    "serif": ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf"),
    "mono": ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf"),
    "stix": ("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf"),
    "roman": ("cmr10.ttf", "cmb10.ttf", "cmti10.ttf"),
    "typewriter": ("cmtt10.ttf",),
}
# Fonts the glyph tasks (letters, greek) draw from: each glyph in many faces.
GLYPH_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
)
WORDS = ("data", "merge", "model", "rank", "one", "vision", "clip", "task", "head", "image", "token", "layer", "fig", "key", "mix", "sum")
TEXTURES = {"brick": "brick", "grass": "grass", "gravel": "gravel", "moon": "moon", "cells": "cell", "coins": "coins"}
PHOTOS = {
    "astronaut": "astronaut", "coffee": "coffee", "cat": "chelsea", "rocket": "rocket", "cameraman": "camera",
    "galaxies": "hubble_deep_field", "retina": "retina", "tissue": "immunohistochemistry",
}


# -- sources -------------------------------------------------------------------------------
def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=256)
def _font(filename: str, size: int) -> ImageFont.FreeTypeFont:
    path = _font_dir() / filename
    if not path.is_file():
        raise RankoneError(f"{path}: font missing from matplotlib's data; reinstall matplotlib")
    return ImageFont.truetype(str(path), size)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


@lru_cache(maxsize=32)
def _skimage_picture(name: str) -> np.ndarray:
    import skimage.data

    picture = np.asarray(getattr(skimage.data, name)())
    if picture.dtype != np.uint8:
        picture = (255 * (picture - picture.min()) / max(float(picture.max() - picture.min()), 1e-8)).astype(np.uint8)
    if picture.ndim == 2:
        picture = np.stack([picture] * 3, axis=-1)
    return picture[..., :3]


# -- renderers: (rng, class index) -> 32×32×3 uint8 --------------------------------------------
def _paper_and_ink(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    paper = int(rng.integers(200, 256))
    ink = int(rng.integers(0, 70))
    tint = rng.integers(-12, 13, size=3)
    return tuple(int(np.clip(paper + t, 0, 255)) for t in tint), tuple(int(np.clip(ink + t, 0, 255)) for t in tint)


def _draw_text(rng: np.random.Generator, text: str, fonts: tuple[str, ...], size_range: tuple[int, int]) -> np.ndarray:
    paper, ink = _paper_and_ink(rng)
    canvas = Image.new("RGB", (IMAGE_SIZE * 2, IMAGE_SIZE * 2), paper)
    font = _font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(*size_range)) * 2)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left, bottom - top
    x = (canvas.width - width) / 2 - left + rng.uniform(-4, 4)
    y = (canvas.height - height) / 2 - top + rng.uniform(-4, 4)
    draw.text((x, y), text, font=font, fill=ink)
    canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.BICUBIC, fillcolor=paper)
    return np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS))


def _render_letter(rng: np.random.Generator, label: int) -> np.ndarray:
    letter = TASKS["letters"].classnames[label]
    if rng.random() < 0.5:
        letter = letter.upper()
    return _draw_text(rng, letter, GLYPH_FONTS, (16, 25))


def _render_greek(rng: np.random.Generator, label: int) -> np.ndarray:
    return _draw_text(rng, GREEK_GLYPHS[TASKS["greek"].classnames[label]], GLYPH_FONTS, (16, 25))


def _render_font(rng: np.random.Generator, label: int) -> np.ndarray:
    family = FONT_FAMILIES[TASKS["fonts"].classnames[label]]
    word = WORDS[int(rng.integers(len(WORDS)))]
    if rng.random() < 0.3:
        word = word.capitalize()
    return _draw_text(rng, word, family, (10, 15))


def _crop_patch(rng: np.random.Generator, picture: np.ndarray, size_range: tuple[int, int]) -> np.ndarray:
    side = int(rng.integers(*size_range))
    side = min(side, picture.shape[0], picture.shape[1])
    top = int(rng.integers(0, picture.shape[0] - side + 1))
    left = int(rng.integers(0, picture.shape[1] - side + 1))
    patch = Image.fromarray(picture[top : top + side, left : left + side]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    if rng.random() < 0.5:
        patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(patch)


def _render_texture(rng: np.random.Generator, label: int) -> np.ndarray:
    return _crop_patch(rng, _skimage_picture(TEXTURES[TASKS["textures"].classnames[label]]), (40, 120))


def _render_photo(rng: np.random.Generator, label: int) -> np.ndarray:
    picture = _skimage_picture(PHOTOS[TASKS["photos"].classnames[label]])
    return _crop_patch(rng, picture, (min(picture.shape[:2]) // 6, min(picture.shape[:2]) // 2))


def _render_digit(rng: np.random.Generator, source: int) -> np.ndarray:
    """sklearn digit number `source`, dark on light, scaled and shifted at random."""
    images, _ = _digits()
    paper, ink = _paper_and_ink(rng)
    intensity = Image.fromarray((images[source] * 255).astype(np.uint8))
    side = int(rng.integers(18, 29))
    intensity = intensity.resize((side, side), Image.BILINEAR).rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR)
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    offset = IMAGE_SIZE - side
    mask.paste(intensity, (int(rng.integers(0, offset + 1)), int(rng.integers(0, offset + 1))))
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    pixels = (1 - alpha) * np.array(paper, np.float32) + alpha * np.array(ink, np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


RENDERERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "letters": _render_letter,
    "greek": _render_greek,
    "fonts": _render_font,
    "textures": _render_texture,
    "photos": _render_photo,
}


# -- splits --------------------------------------------------------------------------------
@dataclass
class Split:
    """One task's images in one split: uint8 (n, 32, 32, 3) and class indices."""

    task: str
    split: str
    images: np.ndarray
    labels: np.ndarray

    @property
    def classnames(self) -> tuple[str, ...]:
        return TASKS[self.task].classnames


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _digit_partition(seed: int, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """Disjoint sklearn digit indices per split (the digits set is finite: 1797 images).

    Every split but `finetune` gets one source per image. `finetune` gets what is left, up
    to its size; when it asks for more images than that, its sources are drawn again with
    fresh jitter (`generate_task` cycles through them), as augmentation would.
    """
    _, targets = _digits()
    order = np.random.default_rng([seed, 7]).permutation(len(targets))
    fixed = sum(sizes.get(split, 0) for split in SPLITS if split != "finetune")
    if fixed + min(sizes.get("finetune", 0), 1) > len(targets):
        raise RankoneError(f"example suite: {fixed} digit images asked for outside fine-tuning, scikit-learn ships {len(targets)}")
    counts = {split: sizes.get(split, 0) for split in SPLITS}
    counts["finetune"] = min(counts["finetune"], len(targets) - fixed)
    partition, start = {}, 0
    for split in SPLITS:
        partition[split] = order[start : start + counts[split]]
        start += counts[split]
    return partition


def generate_task(task: str, sizes: dict[str, int], seed: int = 0) -> dict[str, Split]:
    """All splits of one task, deterministic in `seed`; no two images share their bytes."""
    if task not in TASKS:
        raise RankoneError(f"example task {task!r}: unknown (known: {', '.join(TASKS)})")
    seen: set[bytes] = set()
    classes = len(TASKS[task].classnames)
    digit_sources = _digit_partition(seed, sizes) if task == "digits" else None
    splits = {}
    for split_index, split in enumerate(SPLITS):
        count = sizes.get(split, 0)
        rng = np.random.default_rng([seed, list(TASKS).index(task), split_index])
        images = np.zeros((count, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        labels = np.zeros(count, np.int64)
        for n in range(count):
            if digit_sources is not None:
                source = int(digit_sources[split][n % len(digit_sources[split])])
                label = int(_digits()[1][source])
                render = lambda: _render_digit(rng, source)  # noqa: E731
            else:
                label = n % classes  # balanced classes
                render = lambda: RENDERERS[task](rng, label)  # noqa: E731
            for _ in range(100):
                image = render()
                digest = hashlib.sha256(image.tobytes()).digest()
                if digest not in seen:
                    break
            else:
                raise RankoneError(f"example task {task}: could not draw a new image for split {split}")
            seen.add(digest)
            images[n], labels[n] = image, label
        splits[split] = Split(task, split, images, labels)
    return splits


def generate_suite(sizes: dict[str, int], seed: int = 0, tasks: list[str] | None = None) -> dict[str, dict[str, Split]]:
    """task → split → images: the whole suite in memory."""
    return {task: generate_task(task, sizes, seed) for task in (tasks or list(TASKS))}


def write_split_folders(suite: dict[str, dict[str, Split]], root: Path | str) -> Path:
    """`root/<split>/<task>/<class>/<n>.png` for finetune and test; unlabeled images without classes."""
    root = Path(root)
    for task, splits in suite.items():
        for split in WRITTEN_SPLITS:
            if split not in splits:
                continue
            data = splits[split]
            for n, (image, label) in enumerate(zip(data.images, data.labels)):
                folder = UNLABELED_FOLDER if split == "unlabeled" else data.classnames[int(label)]
                target = root / split / task / folder / f"{n:05d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(png_bytes(image))
    return root


def captions_for(split: Split, templates: list[str] | None, rng: np.random.Generator) -> list[str]:
    """Pretraining captions: one of the task's head templates filled with the class name, or,
    when `templates` is None (the task's label space is held out of pretraining), only the
    domain, so that zero-shot is weak there and fine-tuning has something to add."""
    if templates is None:
        return [f"{TASKS[split.task].domain}." for _ in split.labels]
    return [templates[int(rng.integers(len(templates)))].format(split.classnames[int(label)]) for label in split.labels]
