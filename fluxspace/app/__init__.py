"""The interactive FluxSpace editor in the browser: `fluxspace app` (needs the app extra, gradio).

    handlers.py  control values -> EditSpec / SampleSettings / InversionSettings -> edit_image, sweep,
                 invert_image -> PNGs with their metadata; a PNG's metadata -> control values (no Gradio)
    page.py      the Gradio page wiring the controls to the handlers, and serve()

Nothing here implements the method: the page is a way to call the library.
"""
