"""Paper experiments that run end to end on CPU: `python -m pipeline.experiments distorted ...`.

- `distorted`: Table 1 of the paper (distorted MNIST / Fashion-MNIST; see `distorted.py`).
"""
