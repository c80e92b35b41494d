"""Serving: the OpenAI API shapes (openai_api, replies), a request's preparation (prepare), the ASGI app (app),
the HTTP server (http), the tickets that route each request's tokens back to it (tickets), and the API process
that runs them beside rank 0 (api_process)."""
