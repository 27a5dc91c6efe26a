"""Training data of flux-mini: rendered faces, their attributes and captions, deterministic by seed.

The domain is procedural (attributes.py, render.py), so the data set is not downloaded but drawn:
image i has attributes from `sample_attributes` and a render seed, both from one numpy generator
seeded with `seed`, so (n, seed, size, split) fixes every pixel. Training uses the "train" split only: the
held-out attribute combinations (attributes.is_held_out) are what prompt adherence is measured on.

The images are rendered once and kept in memory as uint8 (49 KB each at 128 px), and saved to an
.npz so a resumed build does not render them again. Captions are drawn separately (`caption_sets`),
from their own generator, so asking for more captions per image never changes the images.
"""

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from flux_core.atomic import atomic_file

from .attributes import FAMILIES, Attributes, check_split, sample_attributes
from .captions import caption_with_facts
from .render import render_batch, to_tensor

RENDER_CHUNK = 256  # images per task when rendering in several processes


@dataclass(frozen=True)
class Faces:
    """n rendered faces: images (n, H, W, 3) uint8, their attributes and render seeds."""

    images: np.ndarray
    attrs: tuple[Attributes, ...]
    seeds: tuple[int, ...]
    seed: int  # the data set's seed: (len, seed, size, split) reproduce it
    split: str

    def __len__(self) -> int:
        return len(self.attrs)

    @property
    def size(self) -> int:
        return self.images.shape[1]

    def first(self, n: int) -> "Faces":
        """The first n faces (a data set drawn with more images starts with the same ones)."""
        return Faces(self.images[:n], self.attrs[:n], self.seeds[:n], self.seed, self.split)

    def tensor(self, index: Tensor | np.ndarray | slice) -> Tensor:
        """Images at `index` as (B, 3, H, W) float32 in [-1, 1] (the model's range)."""
        if isinstance(index, Tensor):
            index = index.cpu().numpy()
        return to_tensor(np.ascontiguousarray(self.images[index]))


def draw_attributes(n: int, seed: int, split: str = "train") -> tuple[list[Attributes], list[int]]:
    """The attributes and render seeds of images 0..n-1 of the data set `seed`."""
    check_split(split)
    rng = np.random.default_rng(seed)
    attrs, seeds = [], []
    for _ in range(n):
        attrs.append(sample_attributes(rng, split))
        seeds.append(int(rng.integers(2**31)))
    return attrs, seeds


def _render_chunk(job: tuple[list[Attributes], list[int], int]) -> np.ndarray:
    attrs, seeds, size = job
    return render_batch(attrs, seeds, size)


def render_many(attrs: list[Attributes], seeds: list[int], size: int = 128, workers: int = 1) -> np.ndarray:
    """render_batch in chunks of RENDER_CHUNK, in `workers` processes when > 1 (the same pixels)."""
    n = len(attrs)
    jobs = [
        (attrs[i : i + RENDER_CHUNK], seeds[i : i + RENDER_CHUNK], size) for i in range(0, n, RENDER_CHUNK)
    ]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            chunks = list(pool.map(_render_chunk, jobs))
    else:
        chunks = [_render_chunk(job) for job in jobs]
    return np.concatenate(chunks)


def make_faces(n: int, seed: int, size: int = 128, split: str = "train", workers: int = 1) -> Faces:
    """Render n faces of `split`. workers > 1 renders in that many processes (same pixels)."""
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    attrs, seeds = draw_attributes(n, seed, split)
    return Faces(render_many(attrs, seeds, size, workers), tuple(attrs), tuple(seeds), seed, split)


# Attributes are stored as one small integer per family: the value's index in FAMILIES.
def _encode_attrs(attrs) -> np.ndarray:
    return np.array([[FAMILIES[f].index(v) for f, v in a.as_dict().items()] for a in attrs], dtype=np.uint8)


def _decode_attrs(codes: np.ndarray) -> tuple[Attributes, ...]:
    names = list(FAMILIES)
    return tuple(Attributes(*(FAMILIES[names[j]][c] for j, c in enumerate(row))) for row in codes.tolist())


def save_faces(faces: Faces, path: str | os.PathLike) -> Path:
    """Write an .npz (uncompressed, so loading is quick), atomically."""
    path = Path(path)
    with atomic_file(path) as f:
        np.savez(
            f,
            images=faces.images,
            attrs=_encode_attrs(faces.attrs),
            seeds=np.array(faces.seeds, dtype=np.int64),
            meta=np.array([faces.seed, len(faces)], dtype=np.int64),
            split=np.array(faces.split),
        )
    return path


def load_faces(path: str | os.PathLike) -> Faces:
    with np.load(path, allow_pickle=False) as f:  # every array is numeric or str: no object arrays
        seed, _ = f["meta"].tolist()
        return Faces(
            f["images"], _decode_attrs(f["attrs"]), tuple(f["seeds"].tolist()), seed, str(f["split"])
        )


def cached_faces(
    path: str | os.PathLike, n: int, seed: int, size: int = 128, split: str = "train", workers: int = 1
) -> Faces:
    """make_faces, saved at `path`; a file made with the same (n, seed, size, split) is reused."""
    path = Path(path)
    if path.is_file():
        faces = load_faces(path)
        if (len(faces), faces.seed, faces.size, faces.split) == (n, seed, size, split):
            return faces
    faces = make_faces(n, seed, size, split, workers)
    save_faces(faces, path)
    return faces


def caption_sets(attrs: list[Attributes] | tuple[Attributes, ...], k: int, seed: int) -> list[list[str]]:
    """k captions per image (captions.caption_with_facts: varied templates, ~10% empty).

    Training picks one of the k at random each time it sees the image; the empty ones and the
    caption dropout of train_flow are what teach the model the unconditional velocity for CFG.
    """
    if k < 1:
        raise ValueError(f"k (captions per image) must be >= 1; got {k}")
    rng = np.random.default_rng([seed, 1])  # a stream apart from the images'
    return [[caption_with_facts(a, rng)[0] for _ in range(k)] for a in attrs]
