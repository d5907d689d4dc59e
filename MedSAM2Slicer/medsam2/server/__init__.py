"""The inference server (``medsam2 serve``): the engine behind an authenticated HTTP API.

Importing this package loads nothing heavy: ``wire`` (the byte formats the client shares) needs only
numpy, and FastAPI/uvicorn (the ``server`` extra) are imported by ``app`` and ``serve`` alone.
"""
