"""Training of the built-in tiny model: ``python -m diffblocks.presets.tiny.train --out DIR``.

Stages, all seeded: a dataset from the procedural world (``make_batch``) with MiniLM token states
of its captions; the autoencoder (``autoencoder``); its latents, normalised per channel; the
denoiser by rectified flow with caption dropout (``denoiser``); export as a diffusers-layout
folder; evaluation of prompt adherence through the pipeline. See docs/tiny_model.md.
"""
