"""``controldiff serve [MODEL]``: the server's command line (``controldiff.cli`` adds it)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["add_parser", "cmd_serve"]


def add_parser(sub) -> None:
    from ..cli import _positive_int

    s = sub.add_parser("serve", help="serve the A1111-compatible and native HTTP APIs and the web page",
                       description="Start the HTTP server: A1111's API under /sdapi/v1, the native API under "
                                   "/controldiff/v1, the web page at /. Binds 127.0.0.1 unless a token is given.")
    s.add_argument("model", nargs="?", type=Path, metavar="MODEL",
                   help="default model folder or single file (default: the built-in demo model)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need a token)")
    s.add_argument("--port", type=_positive_int, default=7860, help="port (default 7860, as A1111)")
    s.add_argument("--token", default=os.environ.get("CONTROLDIFF_TOKEN"),
                   help="required on every request as 'Authorization: Bearer TOKEN' or as the basic-auth "
                        "password (default: $CONTROLDIFF_TOKEN)")
    for flag, dest, what in (("--models-dir", "models", "model folders/files"), ("--lora-dir", "loras", "LoRAs"),
                             ("--embedding-dir", "embeddings", "embeddings"),
                             ("--controlnet-dir", "controlnets", "ControlNets and T2I-Adapters")):
        s.add_argument(flag, action="append", default=[], type=Path, metavar="DIR", dest=dest,
                       help=f"folder of {what} that requests name, repeatable")
    s.add_argument("--outputs", type=Path, default=Path("outputs"), metavar="DIR",
                   help="where every image is saved, with its settings (default: outputs/)")
    s.add_argument("--device", default="auto",
                   help="torch device(s), comma-separated, one worker each (default: cuda if available, else cpu)")
    s.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="weights dtype (default auto, as for generate)")
    s.add_argument("--max-upload-bytes", type=_positive_int, default=64 * 1024 * 1024, metavar="N",
                   dest="max_upload_bytes", help="largest request body (default 64 MiB)")
    s.add_argument("--max-pixels", type=_positive_int, default=2048 * 2048, metavar="N", dest="max_pixels",
                   help="largest uploaded image and output, in pixels (default 2048x2048)")
    s.add_argument("--max-images", type=_positive_int, default=64, metavar="N", dest="max_images",
                   help="most images per request (default 64)")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from ..cli import UsageError
    from .config import ServerConfig

    if args.model is not None and not args.model.exists():
        raise UsageError(f"argument MODEL: model folder or file not found: {args.model}")
    for flag, folders in (("--models-dir", args.models), ("--lora-dir", args.loras),
                          ("--embedding-dir", args.embeddings), ("--controlnet-dir", args.controlnets)):
        for d in folders:
            if not d.is_dir():
                raise UsageError(f"argument {flag}: not a folder: {d}")
    devices = tuple(d.strip() for d in args.device.split(",") if d.strip())
    config = ServerConfig(model=args.model, models=args.models, loras=args.loras, embeddings=args.embeddings,
                          controlnets=args.controlnets, outputs=args.outputs, host=args.host, port=args.port,
                          token=args.token, devices=devices or ("auto",), dtype=args.dtype,
                          max_upload_bytes=args.max_upload_bytes, max_pixels=args.max_pixels,
                          max_images=args.max_images)
    try:
        config.check()
    except ValueError as e:
        raise UsageError(str(e)) from None
    from .jobs import resolve_device

    for d in config.devices:
        try:
            resolve_device(d)
        except (RuntimeError, AssertionError) as e:
            raise UsageError(f"argument --device: {d} is not usable here ({str(e).strip().splitlines()[0]})") from None

    import uvicorn

    from .app import create_app

    app = create_app(config)
    print(f"controldiff serve: http://{args.host}:{args.port}/ (A1111 API at /sdapi/v1, native at /controldiff/v1)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
