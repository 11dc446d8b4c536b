"""aipaint's model zoo data: one JSON card per model, configs for offline single-file
loading, and the embedded default model. Read it only through :mod:`aipaint.models.zoo`."""
