"""Trained model artifacts that ship with latentpack (package data); see README.md here.

`latentpack encode --model-dir photo:<quality>` resolves to `models/photo-q<quality>/`
(`pipeline/models.py`).
"""
