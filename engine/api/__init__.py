"""The HTTP API (docs/http.md): ``engine.api.app.create_app`` is the ASGI factory that
`flashteam serve` runs under uvicorn."""
