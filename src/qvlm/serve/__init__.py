"""``qvlm serve``: an OpenAI-compatible chat-completions server and a one-page web UI for a stage-2 model.

``schemas`` (the wire format, limits, errors), ``images`` (image_url -> RGB image with limits),
``engine`` (prompts and batched, streamed generation), ``batcher`` (the bounded queue and worker
thread), ``app`` (the FastAPI routes, admission, running it with uvicorn), ``static/index.html``.
Needs the ``serve`` extra: ``pip install "qvlm[serve]"``.
"""
