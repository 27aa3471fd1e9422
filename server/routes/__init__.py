"""The HTTP routes, one router per resource (devices, ingest, personal model, ops); auth and
shared dependencies in ``deps``. ``server.app.create_app`` includes them."""
