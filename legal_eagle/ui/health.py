"""``GET /healthz`` for hosting platforms and load balancers, and login from a settings string.

The health route answers 200 with a JSON status when every model service is ready and 503
with the same JSON while any is still preparing (download, first-start quantization,
loading) or has failed, so a platform's probe or LMDeploy-style router waits for the model
instead of sending users to a page that cannot answer yet. It is deliberately NOT behind
Gradio's login (probes have no password); it shows only stages and progress, never a
question or an answer.

Attach it to the Gradio 6 app in one of two ways (both are tested):

* ``demo.launch(..., app_kwargs={"routes": health_routes(services)})`` (Gradio builds its
  FastAPI app with these routes first), or
* ``mount_health(demo.app, services)`` after ``launch(prevent_thread_lock=True)``, or on the
  parent app when using ``gr.mount_gradio_app``.

Login: ``parse_auth("user:password,user2:pass2")`` gives the list ``demo.launch(auth=...)``
takes; Gradio then refuses the page's config, ``/gradio_api/info``, ``queue/join`` and the
REST call routes without a session cookie, so the API is protected as well as the page.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from legal_eagle.config import parse_auth  # noqa: F401  (re-exported: login is a setting)
from legal_eagle.service import ModelService

HEALTH_PATH = "/healthz"


def health_payload(services: Mapping[str, ModelService],
                   extra: Callable[[], dict[str, Any]] | None = None) -> tuple[int, dict[str, Any]]:
    """The health answer: (HTTP status, JSON body).

    Args:
        services: model services by name (e.g. ``{"chat": service}``).
        extra: returns more JSON fields (e.g. ``{"platform": report.as_dict()}``); called per request.

    Returns:
        200 when all services are ready, else 503; the body has ``status`` (ready, preparing,
        failed), ``ready`` and each service's ``Status.as_dict()`` plus ``paused``: why answers
        wait while a comparison has the GPU to itself (still 200: the app serves, a restart
        would lose the waiting questions), else null.
    """
    statuses = {name: service.status() for name, service in services.items()}
    if statuses and all(s.ready for s in statuses.values()):
        overall = "ready"
    elif any(s.stage == "failed" for s in statuses.values()):
        overall = "failed"
    else:
        overall = "preparing"
    body: dict[str, Any] = {"status": overall, "ready": overall == "ready",
                            "services": {name: {**s.as_dict(), "paused": services[name].paused()}
                                         for name, s in statuses.items()}}
    if extra is not None:
        body.update(extra())
    return (200 if overall == "ready" else 503), body


def health_routes(services: Mapping[str, ModelService], path: str = HEALTH_PATH,
                  extra: Callable[[], dict[str, Any]] | None = None) -> list[Route]:
    """Starlette routes for ``demo.launch(app_kwargs={"routes": ...})`` (GET and HEAD).

    Args:
        services: model services by name.
        path: where to answer.
        extra: more JSON fields, see ``health_payload``.

    Returns:
        A one-element list of routes.
    """

    async def healthz(request: Request) -> JSONResponse:
        status, body = health_payload(services, extra)
        return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})

    return [Route(path, healthz, methods=["GET", "HEAD"], name="legal_eagle_healthz")]


def mount_health(app: Any, services: Mapping[str, ModelService], path: str = HEALTH_PATH,
                 extra: Callable[[], dict[str, Any]] | None = None) -> None:
    """Add the health route to an existing FastAPI/Starlette app (``demo.app`` or a parent app).

    Args:
        app: the FastAPI app.
        services: model services by name.
        path: where to answer.
        extra: more JSON fields, see ``health_payload``.
    """
    route = health_routes(services, path, extra)[0]
    app.router.routes.insert(0, route)  # before any catch-all route of the host app
