"""``aipaint serve``: an HTTP API shaped as the AUTOMATIC1111 web UI's (see docs/serving.md).

:mod:`aipaint.serve.a1111` turns A1111 JSON into requests and results back into JSON,
:mod:`aipaint.serve.jobs` runs one job at a time, :mod:`aipaint.serve.app` is the FastAPI
application. FastAPI is imported only here, so ``import aipaint`` does not need it.
"""
