"""The HTTP API (SPEC section 8): ``engine.api.app.create_app`` is the ASGI factory that
`flashteam serve` runs under uvicorn."""
