"""API inputs and outputs as images: PIL images, uint8 arrays or float tensors of any size become
the tokenizer's [B, 3, R, R] floats in [0, 1] the way the ingest made its training images
(tasks/ingest/images.py: RGB with alpha on white, centre crop or white padding, LANCZOS), and
decoded tensors become PIL images or uint8 arrays the way evaluate stores its samples."""

from __future__ import annotations

from typing import Any, Literal, Sequence, Union

import numpy as np
import torch
from PIL import Image

from tasks.evaluate.generate import to_uint8
from tasks.export.spec import Preprocessing
from tasks.ingest.images import resize_square, to_rgb

#: One image: a PIL image, a uint8 array [H, W] / [H, W, 3] / [H, W, 4], or a tensor [3, H, W] /
#: [1, H, W] (float in [0, 1], or uint8).
ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]
#: One image, a list of them (sizes may differ), a uint8 array [B, H, W, 3] or a tensor [B, C, H, W].
Images = Union[ImageLike, Sequence[ImageLike]]
Output = Literal["pil", "uint8", "tensor"]


def to_batch(images: Images, preprocessing: Preprocessing) -> torch.Tensor:
    """Float [B, 3, R, R] in [0, 1], R = the tokenizer's resolution. A float tensor already R x R
    is taken as it is; any other input is made square and resized as the ingest did (a float
    tensor of another size is first quantised to uint8, as the ingest's PNGs were)."""
    return torch.stack([_one(image, preprocessing) for image in _split(images)])


def _split(images: Images) -> list[ImageLike]:
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, np.ndarray):
        # [H, W] grey, or [H, W, 3|4] one image; [B, H, W, 3|4] a batch.
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, torch.Tensor):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        return list(images)
    raise TypeError(f"images: expected PIL images, uint8 arrays or tensors, got {type(images).__name__}")


def _one(image: Any, preprocessing: Preprocessing) -> torch.Tensor:
    size = preprocessing.resolution
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be [3, H, W] or [1, H, W] (channels first), got {list(image.shape)}")
        if image.is_floating_point():
            if image.shape[1:] == (size, size):
                return image.detach().float().cpu().expand(3, -1, -1).clamp(0, 1)
            image = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
        elif image.dtype != torch.uint8:
            raise TypeError(f"an image tensor must be float (values in [0, 1]) or uint8, got {image.dtype}")
        rgb = image.cpu().expand(3, -1, -1).permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"an image array must be uint8 [H, W(, 3|4)], got {image.dtype}; pass floats as a torch "
                            "tensor [3, H, W] in [0, 1]")
        if image.ndim == 2:
            rgb = np.repeat(image[..., None], 3, axis=2)
        elif image.ndim == 3 and image.shape[2] in (3, 4):
            rgb = to_rgb(Image.fromarray(image, "RGB" if image.shape[2] == 3 else "RGBA"))
        else:
            raise ValueError(f"an image array must be [H, W], [H, W, 3] or [H, W, 4], got {list(image.shape)}")
    elif isinstance(image, Image.Image):
        rgb = to_rgb(image)
    else:
        raise TypeError(f"images: expected PIL images, uint8 arrays or tensors, got {type(image).__name__}")
    rgb = np.ascontiguousarray(rgb)
    square = rgb if rgb.shape[:2] == (size, size) else np.asarray(resize_square(rgb, size, preprocessing.fit))
    return torch.from_numpy(np.array(square)).permute(2, 0, 1).float().div_(255.0)


def from_batch(images: torch.Tensor, output: Output) -> list[Image.Image] | np.ndarray | torch.Tensor:
    """Decoded [B, C, H, W] floats as PIL images, a uint8 array [B, H, W, 3], or the float tensor
    clamped to [0, 1] on the CPU."""
    if output == "tensor":
        return images.detach().float().clamp(0, 1).cpu()
    arrays = to_uint8(images)
    if output == "uint8":
        return arrays
    if output == "pil":
        return [Image.fromarray(array, "RGB") for array in arrays]
    raise ValueError(f"output={output!r}: expected 'pil', 'uint8' or 'tensor'")
