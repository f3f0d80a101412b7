"""Grounding: the boxes and points a Qwen-VL answer names, mapped back onto the user's own image.

The two model families write them differently (docs/grounding.md):

- Qwen2-VL: ``<|object_ref_start|>a dog<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``,
  coordinates normalized to 0-1000 of the image's width and height;
- Qwen2.5-VL: JSON objects such as ``{"bbox_2d": [x1, y1, x2, y2], "label": "a dog"}`` or
  ``{"point_2d": [x, y], "label": "..."}`` (usually in a ```json block), in absolute pixels of the image
  *as resized by smart_resize* (multiples of 28), not of the original.

Which convention applies is the model's (``CONVENTIONS``), whatever the form. Boxes refer to the last
image of the prompt (Qwen grounds one image per question). They come back in the original image's
pixels, clamped to it, with a note when they reached past its edges.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import QwenVLError

NORMALIZED_1000 = "normalized_1000"  # Qwen2-VL: 0..1000 of the image's width / height
RESIZED_PIXELS = "resized_pixels"  # Qwen2.5-VL: pixels of the smart_resize'd image
CONVENTIONS = {"qwen2_vl": NORMALIZED_1000, "qwen2_5_vl": RESIZED_PIXELS}

# The special tokens Qwen2-VL's boxes are written with (decoding with skip_special_tokens drops them).
GROUNDING_TOKENS = (
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
)

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_PAIR = rf"\({_NUMBER},{_NUMBER}\)"
_BOX_TEXT = re.compile(rf"\s*{_PAIR}\s*,?\s*{_PAIR}\s*")
_BOX_TOKENS = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>(?:(?!<\|object_ref_(?:start|end)\|>).)*?)<\|object_ref_end\|>\s*)?"
    r"<\|box_start\|>(?P<box>(?:(?!<\|box_start\|>).)*?)<\|box_end\|>",
    re.DOTALL,
)
_FLAT_OBJECT = re.compile(r"\{[^{}]*\}")  # a JSON object with no object inside it
_JSON_KEYS = {"bbox_2d": ("box", 4), "point_2d": ("point", 2)}


@dataclass(frozen=True)
class ImageGeometry:
    """One image of a prompt: its size as given (after EXIF rotation) and the size the model saw."""

    index: int  # among the prompt's images, in order (videos not counted)
    width: int
    height: int
    resized_width: int
    resized_height: int

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "original": {"width": self.width, "height": self.height},
            "resized": {"width": self.resized_width, "height": self.resized_height},
        }


@dataclass(frozen=True)
class Mention:
    """A box or point as the answer wrote it (model coordinates), before any mapping."""

    kind: str  # "box" (x1, y1, x2, y2) or "point" (x, y)
    label: str | None
    coords: tuple[float, ...]
    start: int  # offset in the answer text, for ordering


@dataclass(frozen=True)
class GroundedBox:
    """A box or point in the original image's pixels."""

    image: int  # ImageGeometry.index
    kind: str  # "box" or "point"
    label: str | None
    coords: tuple[float, ...]  # (x1, y1, x2, y2) with x1 <= x2, y1 <= y2; or (x, y); clamped to the image
    raw: tuple[float, ...]  # as the model wrote them, in its own convention
    convention: str  # NORMALIZED_1000 or RESIZED_PIXELS
    clamped: bool  # some coordinate lay outside the image and was moved onto its edge
    outside: bool  # the box (or point) lay wholly outside the image

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "kind": self.kind,
            "label": self.label,
            ("box" if self.kind == "box" else "point"): [round(v, 2) for v in self.coords],
            "raw": [_plain_number(v) for v in self.raw],
            "convention": self.convention,
            "clamped": self.clamped,
            "outside": self.outside,
        }


# ----------------------------------------------------------------------------------------------
# Parsing


def parse_mentions(text: str) -> list[Mention]:
    """Every well-formed box / point in ``text``, in order; malformed ones are skipped."""
    found = _box_token_mentions(text) + _json_mentions(text)
    return sorted(found, key=lambda mention: mention.start)


def _box_token_mentions(text: str) -> list[Mention]:
    """Qwen2-VL's box tokens. A box right after another box without its own reference shares its label."""
    mentions: list[Mention] = []
    label, previous_end = None, -1
    for match in _BOX_TOKENS.finditer(text):
        if match.group("label") is not None:
            label = match.group("label").strip() or None
        elif previous_end < 0 or text[previous_end : match.start()].strip(" \n,;"):
            label = None  # not right after another box: no reference of its own
        previous_end = match.end()
        coords = _BOX_TEXT.fullmatch(match.group("box"))
        if coords is None:
            continue
        mentions.append(Mention("box", label, tuple(float(v) for v in coords.groups()), match.start()))
    return mentions


def _json_mentions(text: str) -> list[Mention]:
    """Qwen2.5-VL's ``bbox_2d`` / ``point_2d`` objects, wherever they stand (a list, a code block, prose)."""
    mentions = []
    for match in _FLAT_OBJECT.finditer(text):
        try:
            value = json.loads(match.group())
        except ValueError:
            continue
        if not isinstance(value, dict):
            continue
        for key, (kind, count) in _JSON_KEYS.items():
            coords = _numbers(value.get(key), count)
            if coords is not None:
                label = value.get("label")
                label = (str(label).strip() or None) if isinstance(label, (str, int, float)) else None
                mentions.append(Mention(kind, label, coords, match.start()))
                break
    return mentions


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    if not isinstance(value, list) or len(value) != count:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    return tuple(float(v) for v in value)


# ----------------------------------------------------------------------------------------------
# Mapping


def to_original(mention: Mention, image: ImageGeometry, convention: str) -> GroundedBox:
    """``mention`` in ``image``'s original pixels, clamped to the image."""
    if convention == NORMALIZED_1000:
        sx, sy = image.width / 1000, image.height / 1000
    elif convention == RESIZED_PIXELS:
        sx, sy = image.width / image.resized_width, image.height / image.resized_height
    else:
        raise QwenVLError(f"unknown grounding convention {convention!r}")
    xs = [v * sx for v in mention.coords[0::2]]
    ys = [v * sy for v in mention.coords[1::2]]
    if mention.kind == "box":
        xs, ys = sorted(xs), sorted(ys)
        outside = xs[0] >= image.width or xs[1] <= 0 or ys[0] >= image.height or ys[1] <= 0
    else:
        outside = not (0 <= xs[0] <= image.width and 0 <= ys[0] <= image.height)
    cx = [min(max(x, 0.0), float(image.width)) for x in xs]
    cy = [min(max(y, 0.0), float(image.height)) for y in ys]
    coords = tuple(v for pair in zip(cx, cy) for v in pair)  # (x1, y1, x2, y2) or (x, y)
    return GroundedBox(
        image=image.index,
        kind=mention.kind,
        label=mention.label,
        coords=coords,
        raw=mention.coords,
        convention=convention,
        clamped=cx != xs or cy != ys,
        outside=outside,
    )


def ground(text: str, images: Sequence[ImageGeometry], convention: str | None) -> list[GroundedBox]:
    """The boxes and points of an answer, on the last image of its prompt (none without an image)."""
    if not images or convention is None:
        return []
    return [to_original(mention, images[-1], convention) for mention in parse_mentions(text)]


def text_with_markers(
    decode: Any, token_ids: Sequence[int], marker_ids: dict[int, str], visible: str | None = None
) -> str:
    """The answer with Qwen2-VL's grounding tokens kept (other special tokens dropped).

    ``decode(ids)`` decodes without special tokens; ``visible``, the answer as the user got it, cuts the
    result where that text ends (a stop string may have cut the answer before its last tokens).
    """
    if not any(token in marker_ids for token in token_ids):
        return visible if visible is not None else decode(list(token_ids))
    pieces: list[tuple[str, bool]] = []  # (text, is_marker)
    segment: list[int] = []
    for token in token_ids:
        if token in marker_ids:
            pieces.append((decode(segment), False))
            pieces.append((marker_ids[token], True))
            segment = []
        else:
            segment.append(token)
    pieces.append((decode(segment), False))
    plain_length = sum(len(text) for text, marker in pieces if not marker)
    if visible is None or plain_length <= len(visible):
        return "".join(text for text, _ in pieces)  # nothing was cut: every marker kept, trailing ones too
    out, room = [], len(visible)
    for text, marker in pieces:
        if room <= 0 and not (marker and text.endswith("_end|>")):
            break  # past the cut, only the closing markers of what was shown are kept
        out.append(text if marker else text[:room])
        room -= 0 if marker else len(text)
    return "".join(out)


def _plain_number(value: float) -> int | float:
    return int(value) if value.is_integer() else value


# ----------------------------------------------------------------------------------------------
# Drawing

_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def draw_boxes(image: Any, boxes: Iterable[GroundedBox]) -> Any:
    """A copy of ``image`` (PIL, original pixels) with the boxes and points drawn and labelled."""
    from PIL import ImageDraw, ImageFont

    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(canvas.size) / 200))
    try:
        font = ImageFont.load_default(size=max(12, round(min(canvas.size) / 40)))
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    for number, box in enumerate(boxes):
        colour = _COLOURS[number % len(_COLOURS)]
        if box.kind == "box":
            x1, y1, x2, y2 = box.coords
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
            anchor = (x1, y1)
        else:
            x, y = box.coords
            radius = line * 3
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=colour, width=line)
            draw.line((x - radius, y, x + radius, y), fill=colour, width=max(1, line // 2))
            draw.line((x, y - radius, x, y + radius), fill=colour, width=max(1, line // 2))
            anchor = (x + radius, y - radius)
        if box.label:
            _draw_label(draw, anchor, box.label, colour, font, canvas.size)
    return canvas


def _draw_label(draw: Any, anchor: tuple[float, float], label: str, colour: tuple, font: Any, size: tuple) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    width, height = right - left + 6, bottom - top + 4
    x = min(max(anchor[0], 0), max(size[0] - width, 0))
    y = anchor[1] - height if anchor[1] - height >= 0 else anchor[1]
    draw.rectangle((x, y, x + width, y + height), fill=colour)
    draw.text((x + 3 - left, y + 2 - top), label, fill=(255, 255, 255), font=font)


def check_output_image(path: str | os.PathLike) -> str:
    """The Pillow format for an output image path, or QwenVLError (unknown suffix, missing directory)."""
    from PIL import Image

    target = Path(path)
    image_format = Image.registered_extensions().get(target.suffix.lower())
    if image_format is None or image_format not in Image.SAVE:
        raise QwenVLError(f"{target}: cannot tell the image format from its suffix (use .png, .jpg or .webp)")
    if target.is_dir():
        raise QwenVLError(f"{target}: is a directory")
    if not target.parent.is_dir():
        raise QwenVLError(f"{target.parent}: no such directory")
    return image_format


def save_image(image: Any, path: str | os.PathLike) -> None:
    """Write ``image`` to ``path`` through a temporary file in the same directory and a rename, so
    an interrupted write never leaves a half-written file where ``path`` was."""
    target = Path(path)
    image_format = check_output_image(target)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            image.save(file, format=image_format)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


__all__ = [
    "CONVENTIONS",
    "NORMALIZED_1000",
    "RESIZED_PIXELS",
    "ImageGeometry",
    "Mention",
    "GroundedBox",
    "parse_mentions",
    "to_original",
    "ground",
    "text_with_markers",
    "draw_boxes",
    "check_output_image",
    "save_image",
]
