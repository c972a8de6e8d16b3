"""The registry's web dashboard under ``/ui``: server-rendered pages (sandboxed Jinja2, no
JavaScript build), signed in with the API's tokens, showing what the API would show."""

from gc_core.registry.ui.pages import router

__all__ = ["router"]
