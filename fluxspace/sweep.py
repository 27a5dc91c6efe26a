"""Ablation grids: one prompt, one noise, one or two edit parameters varied over values.

Like the paper's ablation figures (lambda_fine, lambda_coarse, tau_m, start), as one labelled image.
Under torchrun the cells are shared out across ranks (distributed.py): each rank writes its cells'
images to the shard folder, and rank 0 assembles the grid.
"""

import os
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageDraw

from .distributed import barrier, world
from .editing import EditResult, edit_image
from .images import save_png
from .models import FluxModels
from .settings import SampleSettings
from .spec import EditSpec

SWEEPABLE = ("lambda_fine", "lambda_coarse", "tau_m", "start", "lora_scale")
SHORT = {"lambda_fine": "fine", "lambda_coarse": "coarse", "tau_m": "tau", "start": "start", "lora_scale": "lora"}
LABEL_HEIGHT = 14


def vary(spec: EditSpec, name: str, value) -> EditSpec:
    """The edit with one parameter set; lambda_fine and tau_m apply to every concept. lora_scale is
    the model's (every LoRA's strength, set by `sweep`): the edit stays as it is."""
    if name == "lora_scale":
        return spec
    if name in ("lambda_fine", "tau_m"):
        return replace(spec, concepts=tuple(replace(c, **{name: value}) for c in spec.concepts))
    if name in ("lambda_coarse", "start"):
        return replace(spec, **{name: value})
    raise ValueError(f"cannot sweep {name!r}; valid: {', '.join(SWEEPABLE)}")


def sweep(
    models: FluxModels,
    prompt: str,
    spec: EditSpec,
    axes: list[tuple[str, list]],
    seed: int = 0,
    settings: SampleSettings | None = None,
    progress: bool = False,
    shards: str | os.PathLike | None = None,
    image=None,
) -> tuple[Image.Image | None, list[list[EditResult | None]]]:
    """Columns vary the first parameter, rows the second (if any). Returns the grid and the results.

    Under torchrun (WORLD_SIZE > 1) each rank edits every world-th cell and saves its images in
    `shards` (a folder every rank can see); rank 0 returns the grid, the other ranks None. Results
    are those of this rank's cells (None elsewhere); cell (0, 0) is always rank 0's.
    image: on a Kontext model, the image the prompt's instruction edits.
    """
    if not 1 <= len(axes) <= 2:
        raise ValueError(f"sweep one or two parameters; got {len(axes)}")
    cols_name, cols = axes[0]
    rows_name, rows = axes[1] if len(axes) == 2 else (None, [None])
    if "lora_scale" in (cols_name, rows_name):
        if not models.loras:
            raise ValueError("sweeping lora_scale needs a LoRA on the model (--lora FILE, load_models(loras=...))")
        models.loras.set_scale(1.0)  # refused in fused mode, before any cell runs
    rank, size = world()
    results = [[None] * len(cols) for _ in rows]
    strengths = [models.loras.scales[n] for n in models.loras.names]
    try:
        for k in range(rank, len(rows) * len(cols), size):
            i, j = divmod(k, len(cols))
            cell = spec
            for name, value in ((cols_name, cols[j]), (rows_name, rows[i])):
                if name == "lora_scale":
                    models.loras.set_scale(value)
                elif name is not None:
                    cell = vary(cell, name, value)
            results[i][j] = edit_image(models, prompt, cell, seed, settings, progress=progress, image=image)
    finally:  # the model's LoRAs as they were
        for name, value in zip(models.loras.names, strengths, strict=True):
            models.loras.scales[name] = value
    col_labels = [f"{SHORT[cols_name]}={c}" for c in cols]
    row_labels = [f"{SHORT[rows_name]}={r}" if rows_name else "unedited" for r in rows]
    if size == 1:
        cells = [[x.edited for x in row] for row in results]
        return grid_image(results[0][0].original, cells, col_labels, row_labels), results
    if shards is None:
        raise ValueError("a sharded sweep (WORLD_SIZE > 1) needs a shard folder that every rank can see")
    folder = Path(shards)
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(results):
        for j, x in enumerate(row):
            if x is not None:
                save_png(x.edited, folder / f"cell-{i}-{j}.png", {"sweep_cell": [i, j]})
    barrier(size)
    if rank != 0:
        return None, results
    cells = [[Image.open(folder / f"cell-{i}-{j}.png").convert("RGB") for j in range(len(cols))] for i in range(len(rows))]
    return grid_image(results[0][0].original, cells, col_labels, row_labels), results


def grid_image(
    original: Image.Image, cells: list[list[Image.Image]], col_labels: list[str], row_labels: list[str], gap: int = 4
) -> Image.Image:
    """Each row: the unedited image (labelled with the row's value), then its cells (labelled with the column's)."""
    w, h = original.size
    n_rows, n_cols = len(cells), len(cells[0]) + 1
    out = Image.new("RGB", (n_cols * (w + gap) - gap, n_rows * (h + LABEL_HEIGHT + gap) - gap), "white")
    draw = ImageDraw.Draw(out)
    for i, row in enumerate(cells):
        y = i * (h + LABEL_HEIGHT + gap)
        for j, (image, label) in enumerate(zip([original, *row], [row_labels[i], *col_labels], strict=True)):
            x = j * (w + gap)
            draw.text((x + 1, y + 1), label, fill="black")
            out.paste(image, (x, y + LABEL_HEIGHT))
    return out
