"""The HTTP API (docs/http.md): ``engine.api.app.Api`` (its routes), served by
``engine.api.server`` (`flashteam serve`); ``engine.api.app.create_app`` is the same API as an
ASGI factory for any ASGI server."""
