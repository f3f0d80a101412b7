"""From a rendered chat prompt and encoded media to what the text model consumes.

The chat template emits one ``<|image_pad|>`` (or ``<|video_pad|>``) per media item; each becomes
t·h·w / merge² copies, and the vision encoder's output rows replace them in prompt order.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..errors import RequestError
from ..grounding import ImageGeometry
from ..models.rope import IMAGE, VIDEO, VisualSpan, mrope_position_ids, text_position_ids


@dataclass
class Prompt:
    """What the text model consumes: ids, their M-RoPE ids and, for VL prompts, the visual embeddings."""

    input_ids: list[int]
    position_ids: torch.Tensor  # [3, L]
    rope_delta: int = 0  # decode step n sits at position n + rope_delta on all three axes
    visual_embeds: torch.Tensor | None = None  # [number of pad tokens, hidden], in prompt order
    visual_token_ids: tuple[int, ...] = ()  # the pad ids that visual_embeds replace
    images: tuple[ImageGeometry, ...] = ()  # each image's original and resized size, in prompt order
    # each image/video's content digest and pad-token count, in prompt order: what names its pad
    # tokens in the KV cache's block hashes (empty with visual_embeds: the prompt's blocks are not shared)
    visual_items: tuple[tuple[str, int], ...] = ()

    @classmethod
    def text_only(cls, input_ids: Sequence[int]) -> Prompt:
        return cls(list(input_ids), text_position_ids(0, len(input_ids)))


@dataclass
class EncodedVisual:
    """One image or video after the vision encoder."""

    kind: int  # IMAGE or VIDEO
    grid_thw: tuple[int, int, int]
    embeds: torch.Tensor  # [t*h*w / merge², text hidden]
    second_per_grid: float = 1.0
    digest: str = ""  # VisionCache.key of its preprocessed pixels and grid ("" when unknown)


def build_prompt(ids: Sequence[int], visuals: Sequence[EncodedVisual], config: ModelConfig) -> Prompt:
    """Expand each media placeholder to its pad run and compute M-RoPE ids for the whole prompt."""
    if not visuals:
        _check_no_placeholders(ids, config)
        return Prompt.text_only(ids)
    assert config.vision is not None
    merge = config.vision.spatial_merge_size
    expanded = expand_placeholders(ids, visuals, config, merge)
    spans = [VisualSpan(v.kind, v.grid_thw, v.second_per_grid) for v in visuals]
    positions, _ = mrope_position_ids(
        expanded,
        spans,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        spatial_merge_size=merge,
        tokens_per_second=config.vision.tokens_per_second if config.arch == "qwen2_5_vl" else None,
    )
    return Prompt(
        input_ids=expanded,
        position_ids=positions,
        rope_delta=decode_delta(positions),
        visual_embeds=torch.cat([v.embeds for v in visuals]),
        visual_token_ids=(config.image_token_id, config.video_token_id),
        visual_items=_visual_items(visuals, merge),
    )


def _visual_items(visuals: Sequence[EncodedVisual], merge: int) -> tuple[tuple[str, int], ...]:
    """Each item's digest and pad count, or () when one digest is unknown."""
    if not all(v.digest for v in visuals):
        return ()
    return tuple((f"{v.kind}:{v.digest}", v.grid_thw[0] * v.grid_thw[1] * v.grid_thw[2] // merge**2) for v in visuals)


def decode_delta(positions: torch.Tensor) -> int:
    """Offset of decode positions from sequence indices: generation continues at the last prompt
    token's position + 1, as transformers 5.23's ``generate`` extends position ids. ``get_rope_index``'s
    own delta (max position + 1) is the same for text and images; it differs after a video whose time
    ids run past the text that follows it (docs/video.md)."""
    return int(positions[:, -1].max()) + 1 - positions.shape[1]


def expand_placeholders(
    ids: Sequence[int], visuals: Sequence[EncodedVisual], config: ModelConfig, merge: int
) -> list[int]:
    pad_of = {IMAGE: config.image_token_id, VIDEO: config.video_token_id}
    kind_of = {config.image_token_id: IMAGE, config.video_token_id: VIDEO}
    placeholders = [kind_of[i] for i in ids if i in kind_of]
    wanted = [v.kind for v in visuals]
    if placeholders != wanted:
        raise RequestError(f"the prompt has {_count(placeholders)} placeholders but {_count(wanted)} were given")
    pending = iter(visuals)
    out: list[int] = []
    for token in ids:
        if token in kind_of:
            visual = next(pending)
            t, h, w = visual.grid_thw
            out.extend([pad_of[visual.kind]] * (t * h * w // (merge * merge)))
        else:
            out.append(token)
    return out


def _count(kinds: Sequence[int]) -> str:
    images, videos = kinds.count(IMAGE), kinds.count(VIDEO)
    return f"{images} image(s) and {videos} video(s)"


def _check_no_placeholders(ids: Sequence[int], config: ModelConfig) -> None:
    if any(i in (config.image_token_id, config.video_token_id) for i in ids):
        raise RequestError("the prompt has an image/video placeholder but no image or video was given")


class VisionCache:
    """LRU of encoder outputs keyed by the preprocessed pixels (so by content and pixel budget)."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(pixel_values: torch.Tensor, grid_thw: tuple[int, int, int]) -> str:
        digest = hashlib.blake2b(pixel_values.contiguous().numpy().tobytes(), digest_size=16)
        digest.update(repr(grid_thw).encode())
        return digest.hexdigest()

    def clear(self) -> None:
        """Drop every cached encoding (the next request encodes its images again)."""
        self.entries.clear()

    def get_or_compute(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        value = compute()
        if self.capacity > 0:
            self.entries[key] = value
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
        return value
