"""The HTTP API (:func:`controldiff.serve.create_app`: the native API, A1111's, the web page) as a
Ray Serve deployment, for a service that many users share across GPUs and machines.

From Python::

    from ray import serve
    from controldiff.batch.ray_serve import deployment
    from controldiff.serve import ServerConfig

    config = ServerConfig(model=Path("/models/sd15"), models=[Path("/models")], outputs=Path("/shared/outputs"),
                          devices=("cuda",), token="...")
    serve.run(deployment(config, num_replicas=4, ray_actor_options={"num_gpus": 1}).bind(), route_prefix="/")

From a shell (``serve run`` passes ``key=value`` pairs to :func:`app`)::

    serve run controldiff.batch.ray_serve:app model=/models/sd15 models=/models outputs=/shared/outputs \\
        num_replicas=4 num_gpus=1 token=...

Each replica builds its own app (the builder runs on the replica, so nothing of a server is
pickled) with its own queue and one worker per device of ``config.devices``; Serve spreads the
requests over the replicas. What that means for clients:

* requests answered in one call (A1111's ``/sdapi/v1/txt2img`` and ``img2img``, which return
  the images; the schema and the lists of names) work with any number of replicas;
* a native job (``POST /controldiff/v1/jobs``, then polling ``/jobs/{id}``, ``/cancel``) and
  A1111's ``/progress`` live in the replica that took them: a poll routed to another replica
  answers 404. Use one replica per service for them (``num_replicas=1``; it drives every GPU of
  its machine with ``devices=("cuda:0", "cuda:1", ...)`` and ``num_gpus`` to match);
* images are saved in ``config.outputs`` on the replica's machine: give the machines a shared
  folder for one gallery.

Serve's proxy binds ``127.0.0.1:8000`` unless ``serve.start(http_options=...)`` says otherwise;
bound elsewhere, give the config a token (the app checks it on every route).
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["deployment", "app"]


def deployment(config, *, name: str = "controldiff", num_replicas: int = 1, ray_actor_options: dict | None = None,
               **options):
    """A Serve deployment of ``create_app(config)`` (a ``ServerConfig``, checked here, before
    any replica starts); ``options`` go to ``serve.deployment`` (e.g. ``autoscaling_config``)."""
    from ray import serve

    config.check()

    def build():  # runs on the replica (pickled by value: an absolute import)
        from controldiff.serve import create_app

        return create_app(config)

    class ControldiffAPI:
        """controldiff's HTTP API on one replica."""

    ingress = serve.ingress(build)(ControldiffAPI)
    return serve.deployment(ingress, name=name, num_replicas=num_replicas,
                            ray_actor_options=ray_actor_options or {}, **options)


_FOLDERS = ("models", "loras", "embeddings", "controlnets")


def app(args: dict):
    """``serve run controldiff.batch.ray_serve:app key=value ...``: ``model``, ``outputs``,
    ``token``, ``dtype``; ``models``, ``loras``, ``embeddings``, ``controlnets``, ``devices``
    (comma-separated); ``num_replicas``, ``num_gpus``, ``num_cpus`` (of each replica)."""
    from ..serve import ServerConfig

    args = dict(args)
    known = {"model", "outputs", "token", "dtype", "devices", "num_replicas", "num_gpus", "num_cpus", *_FOLDERS}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: unknown argument; expected some of: {', '.join(sorted(known))}")

    def number(key: str, convert, default):
        try:
            return convert(args.get(key, default))
        except ValueError:
            raise ValueError(f"{key}: expected a number, got {args[key]!r}") from None

    kw = {k: [Path(p) for p in str(args[k]).split(",") if p] for k in _FOLDERS if k in args}
    if "devices" in args:
        kw["devices"] = tuple(d for d in str(args["devices"]).split(",") if d)
    for key in ("model", "outputs"):
        if key in args:
            kw[key] = Path(args[key])
    for key in ("token", "dtype"):
        if key in args:
            kw[key] = str(args[key])
    actor = {"num_gpus": number("num_gpus", float, 0), "num_cpus": number("num_cpus", float, 1)}
    return deployment(ServerConfig(**kw), num_replicas=number("num_replicas", int, 1),
                      ray_actor_options=actor).bind()
