"""Serve a trained run without Python: a SavedModel whose signatures take raw strings.

- `serving.export`: `python main.py export --run-dir R [--quantize MODE]` writes
  a TensorFlow SavedModel (tokenizer and model in one graph) and `serving.json`.
- `serving.quantize`: Keras 3 `model.quantize` (int8, int4, float8) and what
  each mode changes.
- `serving.graph`: the in-graph pieces: text cleaning, context windows,
  per-row seeded sampling, the generation loop.

docs/serving.md says how to load and serve the export.
"""
