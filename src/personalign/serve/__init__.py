"""An OpenAI-compatible HTTP server for personalign models (the ``serve`` extra).

``pip install 'personalign[serve]'`` installs FastAPI and uvicorn; this package imports them only
when an app is built, so importing it never fails::

    from personalign.serve import run_server
    run_server()                      # the embedded model on http://127.0.0.1:8000/v1

Clients pass a preference with the OpenAI client's ``extra_body``::

    client.chat.completions.create(model="smollm2-135m-instruct", messages=[...],
                                   extra_body={"preferences": "1A,2A,3A", "method": "soup"})
"""

from __future__ import annotations

from personalign.serve.app import INSTALL_HINT, Limits, ServeConfig, create_app, run_server, running_server

__all__ = ["INSTALL_HINT", "Limits", "ServeConfig", "create_app", "run_server", "running_server"]
