"""The registry service: functions, endpoints and the task ledger, behind a small HTTP API.

``app.create_app`` builds the FastAPI app (routes thin, logic in ``store``, ``identity``,
``policy``, ``ledger``); ``cli`` is ``gc-registry``. Its contract — request and response
bodies and the HTTP client — is ``gc_core.registry_api``, which clients and agents use.

This file imports nothing, so ``gc-registry`` (``entry_point``) can tell an install without
the ``registry`` extra what to add before FastAPI or SQLAlchemy is imported.
"""

__all__: list[str] = []
