"""The editor's page: a Gradio Blocks layout whose controls call the handlers (handlers.py).

One model, loaded once by `fluxspace app` (cli.py), serves every request. Requests that use it share
one queue slot (concurrency_id MODEL, limit 1: one device), and a slider's events run with
trigger_mode="always_last": while one render runs, the values dragged past are dropped and only the
latest is rendered next. Every request's errors become a line in the status box; the server keeps
serving. Gradio is imported here only, so the core install does not need it.
"""

import random
import shutil
import sys
import time
import traceback

import gradio as gr

from ..editing import PlainRuns
from ..inversion import FITS
from ..models import FluxModels
from ..spec import COARSE_TARGETS, PRIOR_REMOVALS, PROJECTIONS
from . import handlers as h

# Long work shows the sampler's progress bars (tqdm) on the page.
PROGRESS = gr.Progress(track_tqdm=True)
SLOW_S = 2.0  # renders slower than this show the sampler's progress on slider moves too
MODEL = "model"  # the concurrency id every request that runs the model shares
DICE_RANGE = 2**31  # the dice draws seeds below this (any seed in [0, 2^64) may be typed)
LAMBDA_FINE = (-10.0, 10.0, 0.5)  # slider minimum, maximum, step
LAMBDA_COARSE = (-2.0, 2.0, 0.05)
# Defaults that make a first render show something on flux-mini (the README's example edit).
FLUX_MINI_EXAMPLE = ("a cartoon portrait of a person with red hair on a blue background", "hat", 1)
OTHER_EXAMPLE = ("a portrait photo of a woman in a park", "eyeglasses", 0)
# 64 px flux-mini images drawn large, pixel for pixel.
CSS = ("#original img, #edited img, #real-input img, #real-output img, #masks img "
       "{width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;} "
       "#strip img {image-rendering: pixelated;}")  # fmt: skip


class Page:
    """The components of the page, by role, and the handlers' wiring."""

    def __init__(self, models: FluxModels, outputs: h.Outputs):
        self.models, self.outputs = models, outputs
        self.plain_runs = PlainRuns()  # a slider move re-samples only the edited branch
        self.slow = False  # the last render took more than SLOW_S
        defaults = models.sample_settings(None)
        uses_cfg = defaults.cfg_scale != 1.0
        prompt, concept, seed = FLUX_MINI_EXAMPLE if models.preset.name == "flux-mini" else OTHER_EXAMPLE
        title = f"FluxSpace editor: {models.preset.name} on {models.device}"

        with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as self.blocks:
            gr.Markdown(f"## {title}\nFluxSpace (Dalva et al., arXiv 2412.09611): drag a slider and the edit "
                        "follows. The original and the edited image come from the same noise.")  # fmt: skip
            self.status = gr.Markdown("", elem_id="status")
            with gr.Row():
                with gr.Column(scale=1):
                    self.prompt = gr.Textbox(prompt, label="prompt", elem_id="prompt")
                    self.negative = gr.Textbox("", label="negative prompt (true CFG)", visible=uses_cfg,
                                               elem_id="negative")  # fmt: skip
                    with gr.Row():
                        self.cfg = gr.Number(defaults.cfg_scale, label="true CFG scale (1: off)", visible=uses_cfg,
                                             elem_id="cfg")  # fmt: skip
                        self.guidance = gr.Number(defaults.guidance, label="guidance (distilled)",
                                                  visible=models.params.guidance_embed, elem_id="guidance")  # fmt: skip
                    with gr.Row():
                        self.seed = gr.Number(seed, label="seed", precision=0, elem_id="seed", scale=3)
                        self.dice = gr.Button("random seed", elem_id="dice", scale=1, min_width=60)
                    with gr.Row():
                        self.width = gr.Number(defaults.width, label="width", precision=0, elem_id="width")
                        self.height = gr.Number(defaults.height, label="height", precision=0, elem_id="height")
                        self.steps = gr.Number(defaults.steps, label="steps", precision=0, elem_id="steps")
                    conditioned = models.preset.kontext or models.family == "flux2"
                    self.condition = gr.File(
                        label="image to edit by the prompt's instruction" if models.preset.kontext
                        else "reference images (optional)", file_count="multiple", file_types=["image"],
                        visible=conditioned, elem_id="condition",
                    )  # fmt: skip
                    self._concept_rows(concept)
                    pooled = models.family != "flux2"  # FLUX.2 has no pooled text vector: no coarse edit
                    self.lambda_coarse = gr.Slider(*LAMBDA_COARSE[:2], value=0.0, step=LAMBDA_COARSE[2],
                                                   label="lambda_coarse (pooled text vector)", visible=pooled,
                                                   elem_id="lambda-coarse")  # fmt: skip
                    self.coarse_prompt = gr.Textbox("", label="coarse prompt (empty: the concepts' prompts)",
                                                    visible=pooled, elem_id="coarse-prompt")  # fmt: skip
                    with gr.Row():
                        self.start = gr.Textbox("0", label="start: a step (2) or a time in [0, 1] (0.8)", elem_id="start")
                        self.end = gr.Textbox("", label="end (empty: until the last step)", elem_id="end")
                    with gr.Accordion("advanced EditSpec options", open=False):
                        self.blocks_text = gr.Textbox("", label="double blocks that edit, e.g. 0-9 (empty: all)",
                                                      elem_id="blocks")  # fmt: skip
                        self.prior = gr.Textbox("", label="prior prompt (phi)", elem_id="prior")
                        self.projection = gr.Dropdown(list(PROJECTIONS), value=PROJECTIONS[0], label="projection")
                        self.coarse_target = gr.Dropdown(list(COARSE_TARGETS), value=COARSE_TARGETS[0],
                                                         label="coarse target", visible=pooled)  # fmt: skip
                        self.prior_removal = gr.Dropdown(list(PRIOR_REMOVALS), value=PRIOR_REMOVALS[0],
                                                         label="prior removal")  # fmt: skip
                        self.reference = gr.Checkbox(False, label="reference mode (the unofficial code, exactly)")
                    self.render = gr.Button("render", variant="primary", elem_id="render")
                    self.restore_file = gr.File(label="drop a fluxspace PNG here to restore its settings",
                                                file_count="single", elem_id="restore")  # fmt: skip
                with gr.Column(scale=2):
                    with gr.Tabs():
                        with gr.Tab("generated image", id="generated"):
                            self._generated_outputs()
                        with gr.Tab("real image", id="real", elem_id="real-tab"):
                            self._real_image_tab()
            self._wire()

    # ------------------------------------------------------------------------------------------
    # Layout pieces

    def _concept_rows(self, first: str) -> None:
        gr.Markdown("**concepts** (lambda_fine > 0 adds, < 0 removes)")
        self.n_concepts = gr.State(1)
        self.groups, self.rows = [], []
        for i in range(h.MAX_CONCEPTS):
            with gr.Group(visible=i == 0) as group:
                row = (
                    gr.Textbox(first if i == 0 else "", label=f"concept {i + 1}: edit prompt", elem_id=f"concept-{i}"),
                    gr.Slider(*LAMBDA_FINE[:2], value=h.ConceptRow.lambda_fine, step=LAMBDA_FINE[2],
                              label="lambda_fine", elem_id=f"lambda-{i}"),
                    gr.Slider(0.0, 1.0, value=h.ConceptRow.tau_m, step=0.05, label="tau_m (mask threshold; 0: no mask)",
                              elem_id=f"tau-{i}"),
                    gr.Textbox("", label="mask words (comma-separated words of the edit prompt; empty: all)",
                               elem_id=f"mask-words-{i}"),
                )  # fmt: skip
            self.groups.append(group)
            self.rows.append(row)
        with gr.Row():
            self.add = gr.Button("add concept", size="sm", elem_id="add-concept")
            self.remove = gr.Button("remove last concept", size="sm", elem_id="remove-concept")

    def _generated_outputs(self) -> None:
        with gr.Row():
            self.original = gr.Image(label="original", type="filepath", format="png", interactive=False,
                                     height=320, elem_id="original")  # fmt: skip
            self.edited = gr.Image(label="edited", type="filepath", format="png", interactive=False,
                                   height=320, elem_id="edited")  # fmt: skip
        self.show_masks = gr.Checkbox(False, label="show each concept's mask over the original", elem_id="show-masks")
        with gr.Row(visible=False, elem_id="masks") as self.masks:  # one image per concept row in use
            self.mask_images = [gr.Image(label=f"mask {i + 1}", type="filepath", format="png", interactive=False,
                                         height=200, visible=i == 0, elem_id=f"mask-{i}")
                                for i in range(h.MAX_CONCEPTS)]  # fmt: skip
        with gr.Accordion("strip over lambda_fine (every concept at once)", open=False):
            with gr.Row():
                self.strip_low = gr.Number(0.0, label="from", elem_id="strip-from")
                self.strip_high = gr.Number(8.0, label="to", elem_id="strip-to")
                self.strip_count = gr.Number(5, label="images", precision=0, elem_id="strip-count")
            self.strip_button = gr.Button("render strip", elem_id="strip-button")
            self.strip = gr.Image(label="strip", type="filepath", format="png", interactive=False, elem_id="strip")
        self.downloads = gr.File(label="PNGs with their settings (fluxspace metadata)", file_count="multiple",
                                 interactive=False, elem_id="downloads")  # fmt: skip

    def _real_image_tab(self) -> None:
        gr.Markdown("Upload an image: it is fitted to the token grid, inverted to noise, and sampled back with "
                    "the edit. The prompt box above serves as its caption; the steps box sets the steps; true CFG "
                    "is off here.")  # fmt: skip
        self.upload = gr.File(label="image (PNG, JPEG, ...)", file_count="single", elem_id="upload")
        with gr.Row():
            self.solver = gr.Dropdown(list(h.SOLVERS), value="midpoint (RF-Solver)", label="solver",
                                      elem_id="solver")  # fmt: skip
            self.fit = gr.Radio(list(FITS), value=FITS[0], label="fit to the token grid")
            side = self.models.preset.default_size  # FLUX.2 presets: (width, height)
            self.size = gr.Number(max(side) if isinstance(side, tuple) else side, label="resize the longer side to (px)",
                                  precision=0, elem_id="size")  # fmt: skip
        with gr.Row():
            self.invert_button = gr.Button("invert and reconstruct", elem_id="invert")
            self.real_edit_button = gr.Button("edit the upload", variant="primary", elem_id="real-edit")
        self.psnr = gr.Markdown("", elem_id="psnr")
        with gr.Row():
            self.real_input = gr.Image(label="fitted input / reconstruction", type="filepath", format="png",
                                       interactive=False, height=320, elem_id="real-input")  # fmt: skip
            self.real_output = gr.Image(label="reconstruction / edited", type="filepath", format="png",
                                        interactive=False, height=320, elem_id="real-output")  # fmt: skip
        self.real_downloads = gr.File(label="PNGs with their settings", file_count="multiple", interactive=False,
                                      elem_id="real-downloads")  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # Control values <-> the handlers' objects

    @property
    def sample_inputs(self) -> list:
        return [self.prompt, self.seed, self.width, self.height, self.steps, self.guidance, self.cfg, self.negative,
                self.condition]  # fmt: skip

    @property
    def edit_inputs(self) -> list:
        rows = [c for row in self.rows for c in row]
        return [self.n_concepts, *rows, self.lambda_coarse, self.coarse_prompt, self.start, self.end,
                self.blocks_text, self.prior, self.projection, self.coarse_target, self.prior_removal,
                self.reference]  # fmt: skip

    @staticmethod
    def sample_from(values: list) -> h.SampleControls:
        prompt, seed, width, height, steps, guidance, cfg, negative, condition = values
        images = tuple(str(p) for p in (condition or ()))
        return h.SampleControls(prompt or "", seed, width, height, steps, guidance, cfg, negative or "", images)

    @staticmethod
    def edit_from(values: list) -> h.EditControls:
        n, rest = values[0], values[1:]
        k = 4 * h.MAX_CONCEPTS
        rows = [h.ConceptRow(rest[i] or "", rest[i + 1], rest[i + 2], rest[i + 3] or "") for i in range(0, 4 * n, 4)]
        (lambda_coarse, coarse_prompt, start, end, blocks, prior, projection, coarse_target, prior_removal,
         reference) = rest[k:]  # fmt: skip
        return h.EditControls(tuple(rows), lambda_coarse or 0.0, coarse_prompt or "", start or "", end or "",
                              blocks or "", prior or "", projection, coarse_target, prior_removal, bool(reference))  # fmt: skip

    def _split(self, values: tuple) -> tuple[h.SampleControls, h.EditControls, list]:
        n_sample, n_edit = len(self.sample_inputs), len(self.edit_inputs)
        return (self.sample_from(list(values[:n_sample])), self.edit_from(list(values[n_sample : n_sample + n_edit])),
                list(values[n_sample + n_edit :]))  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # Requests: each returns its outputs' new values and a status line; a failure changes nothing else

    def _guarded(self, work, n_outputs: int):
        """Run work(); on any error, keep every output as it is and put the error in the status line."""
        try:
            return work()
        except Exception as e:  # the page must keep working whatever went wrong
            line = h.describe(e)
            print(f"fluxspace app: request failed: {line}", file=sys.stderr)
            if line.startswith("internal error"):
                traceback.print_exc()
            return [gr.skip()] * n_outputs + [f"**error:** {line}"]

    def on_render(self, *values, progress=PROGRESS):
        return self._render(values, progress_bars=True)

    def on_live(self, *values, progress=PROGRESS):
        """A render as a slider moves: progress bars only once renders are slow (FLUX.1; on flux-mini each
        step's update would cost more than it shows)."""
        return self._render(values, progress_bars=self.slow)

    def _render(self, values: tuple, progress_bars: bool):
        def work():
            sample, edit, _ = self._split(values)
            t0 = time.perf_counter()
            r = h.render_edit(self.models, self.outputs, sample, edit, progress=progress_bars,
                              plain_runs=self.plain_runs)
            self.slow = time.perf_counter() - t0 > SLOW_S
            overlays = [gr.update(value=str(path), label=f"mask: {caption} (red: where the edit acts)", visible=True)
                        for path, caption in r.overlays]  # fmt: skip
            overlays += [gr.update(value=None, visible=False)] * (h.MAX_CONCEPTS - len(overlays))
            return [str(r.original), str(r.edited), *overlays, [str(p) for p in r.files], r.message]

        return self._guarded(work, 3 + h.MAX_CONCEPTS)

    def on_strip(self, *values, progress=PROGRESS):
        def work():
            sample, edit, (low, high, count) = self._split(values)
            r = h.render_strip(self.models, self.outputs, sample, edit, low, high, count)
            return [str(r.strip), [str(p) for p in r.files], r.message]

        return self._guarded(work, 2)

    def on_invert(self, *values, progress=PROGRESS):
        def work():
            sample, _, (path, solver, fit, size) = self._split(values)
            r = h.render_inversion(self.models, self.outputs, sample, h.RealControls(path, solver, fit, size))
            return [str(r.original), str(r.edited), f"**PSNR {r.psnr:.2f} dB**", [str(p) for p in r.files], r.message]

        return self._guarded(work, 4)

    def on_real_edit(self, *values, progress=PROGRESS):
        def work():
            sample, edit, (path, solver, fit, size) = self._split(values)
            r = h.render_real_edit(self.models, self.outputs, sample, edit, h.RealControls(path, solver, fit, size))
            return [str(r.original), str(r.edited), gr.skip(), [str(p) for p in r.files], r.message]

        return self._guarded(work, 4)

    def on_restore(self, path):
        """Every control the PNG records; a PNG without an edit leaves the edit controls as they are."""
        n_out = len(self.sample_inputs) + len(self.edit_inputs) + len(self.groups) + 1

        def work():
            r = h.restore(path)
            s = r.sample
            sample = [s.prompt, s.seed, s.width, s.height, s.steps, s.guidance, s.cfg_scale, s.negative_prompt,
                      gr.skip()]  # the conditioning images stay as uploaded (a PNG records their names only)
            if r.edit is None:
                edit = [gr.skip()] * (len(self.edit_inputs) + len(self.groups))
            else:
                e, n = r.edit, len(r.edit.concepts)
                rows = []
                for i in range(h.MAX_CONCEPTS):
                    c = e.concepts[i] if i < n else h.ConceptRow()
                    rows += [c.prompt, c.lambda_fine, c.tau_m, c.mask_words]
                edit = [max(n, 1), *rows, e.lambda_coarse, e.coarse_prompt, e.start, e.end, e.blocks, e.prior,
                        e.projection, e.coarse_target, e.prior_removal, e.reference]  # fmt: skip
                edit += [gr.update(visible=i < max(n, 1)) for i in range(h.MAX_CONCEPTS)]
            return [*sample, *edit, r.solver if r.solver is not None else gr.skip(), r.message]

        return self._guarded(work, n_out)

    @staticmethod
    def on_dice() -> int:
        return random.randrange(DICE_RANGE)

    @staticmethod
    def on_show_masks(show: bool):
        return gr.update(visible=bool(show))

    def on_concepts(self, n: int, change: int):
        n = min(max(n + change, 1), h.MAX_CONCEPTS)
        return [n, *(gr.update(visible=i < n) for i in range(h.MAX_CONCEPTS))]

    # ------------------------------------------------------------------------------------------

    def _wire(self) -> None:
        inputs = self.sample_inputs + self.edit_inputs
        rendered = [self.original, self.edited, *self.mask_images, self.downloads, self.status]
        render = dict(fn=self.on_render, inputs=inputs, outputs=rendered, concurrency_id=MODEL, concurrency_limit=1)
        live = dict(render, fn=self.on_live, trigger_mode="always_last", show_progress="minimal")

        self.blocks.load(**render)
        self.render.click(**render)
        for row in self.rows:  # sliders render as they move; the latest value wins
            row[1].input(**live)
            row[2].input(**live)
            row[0].submit(**render)
            row[3].submit(**render)
        self.lambda_coarse.input(**live)
        for box in (self.prompt, self.negative, self.cfg, self.guidance, self.seed, self.width, self.height, self.steps,
                    self.coarse_prompt, self.start, self.end, self.blocks_text, self.prior):
            box.submit(**render)
        self.dice.click(self.on_dice, outputs=self.seed, queue=False).then(**render)
        self.condition.upload(**render)
        self.show_masks.change(self.on_show_masks, self.show_masks, self.masks, queue=False)
        for change, button in ((1, self.add), (-1, self.remove)):
            button.click(lambda n, change=change: self.on_concepts(n, change), self.n_concepts,
                         [self.n_concepts, *self.groups], queue=False)  # fmt: skip

        self.strip_button.click(self.on_strip, inputs + [self.strip_low, self.strip_high, self.strip_count],
                                [self.strip, self.downloads, self.status], concurrency_id=MODEL,
                                concurrency_limit=1)  # fmt: skip
        real = [self.upload, self.solver, self.fit, self.size]
        real_out = [self.real_input, self.real_output, self.psnr, self.real_downloads, self.status]
        self.invert_button.click(self.on_invert, inputs + real, real_out, concurrency_id=MODEL, concurrency_limit=1)
        self.real_edit_button.click(self.on_real_edit, inputs + real, real_out, concurrency_id=MODEL,
                                    concurrency_limit=1)  # fmt: skip
        restored = [*self.sample_inputs, *self.edit_inputs, *self.groups, self.solver, self.status]
        self.restore_file.upload(self.on_restore, self.restore_file, restored, queue=False).then(**render)


def build(models: FluxModels, outputs: h.Outputs | None = None) -> Page:
    return Page(models, outputs or h.Outputs())


def serve(models: FluxModels, host: str = "127.0.0.1", port: int = 7860) -> int:
    """Serve the page until interrupted; says where it listens once it accepts connections."""
    page = build(models)
    page.blocks.queue(default_concurrency_limit=1)
    try:
        page.blocks.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                           allowed_paths=[str(page.outputs.root)], max_file_size="64mb", ssr_mode=False,
                           css=CSS, footer_links=[])  # fmt: skip
        where = "this machine only" if host in ("127.0.0.1", "localhost", "::1") else f"every client that reaches {host}"
        print(f"fluxspace app: listening on http://{host}:{port} ({where}); Ctrl-C stops it", flush=True)
        page.blocks.block_thread()
    finally:
        page.blocks.close()
        shutil.rmtree(page.outputs.root, ignore_errors=True)
    return 0
