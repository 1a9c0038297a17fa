"""Reusable parts of lrreid: config schema, data, models, losses, metrics, pictures.

Nothing here imports Ray, DVC or MLflow, and nothing imports from ``pipelines``.
"""
