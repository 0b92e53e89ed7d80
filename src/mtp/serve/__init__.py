"""``mtp serve``: an OpenAI-compatible HTTP server on mtp's own engine (trees, lossless sampling).

- :mod:`~mtp.serve.protocol`: the OpenAI request fields we accept, checked into typed values (one 4xx error
  object naming the field otherwise), and the response / stream chunk objects;
- :mod:`~mtp.serve.scheduler`: continuous batching: one worker thread owns the decoder; requests wait in a
  bounded queue, join the running batch between steps and leave it when they finish or their client goes;
- :mod:`~mtp.serve.app`: the ASGI app (Starlette, server-sent events through sse-starlette), authentication,
  body limits, Prometheus metrics, and uvicorn with a graceful SIGTERM.
"""
