"""The sample-library generator: seeded two-event clips with captions, and hostile or odd media for tests.

The bottom layer (it imports nothing of model, indexer or app): tests of every layer, the demo (`make demo`)
and the demo model's recipe (assets/demo-model/TRAINING.md) use it. One command line: `python -m synth`.

- `synth.generator`: families of clips and captions, train/test split, variants (`GeneratorVariant`).
- `synth.media`: writing frames as video files (H.264 and other containers), hostile files, test tones.
"""
