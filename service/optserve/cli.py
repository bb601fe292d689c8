"""`optserve serve` (with a Redis of its own when none is configured) and `optserve demo`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .startup import ConfigError, check, load_settings

log = logging.getLogger("optserve")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .store.embedded import EmbeddedRedis, RedisServerNotFound

    try:
        settings = load_settings()
        check(settings)
    except ConfigError as exc:
        print(f"optserve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    embedded: EmbeddedRedis | None = None
    if not settings.redis_url:
        try:
            embedded = EmbeddedRedis(data_dir=settings.data_dir)
            url = embedded.start()
        except RedisServerNotFound as exc:
            print(f"optserve: {exc}", file=sys.stderr)
            return 2
        os.environ["OPTSERVE_REDIS_URL"] = url
        print(f"optserve: started redis-server at {url}, append-only persistence in "
              f"{settings.data_dir.resolve()} (set OPTSERVE_REDIS_URL to use your own Redis)",
              file=sys.stderr, flush=True)
    try:
        uvicorn.run(
            "optserve.app:app_factory",
            factory=True,
            host=args.host or settings.host,
            port=args.port or settings.port,
            workers=args.workers or settings.workers,
            log_level=settings.log_level,
            proxy_headers=True,
        )
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def demo(args: argparse.Namespace) -> int:
    from .demos import main as demo_main

    return demo_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the HTTP service")
    p.add_argument("--host", default=None, help="default: OPTSERVE_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: OPTSERVE_PORT or 8000")
    p.add_argument("--workers", type=int, default=None, help="default: OPTSERVE_WORKERS or 1")
    p.set_defaults(func=serve)
    d = sub.add_parser("demo", help="the RMSprop document's demonstrations, through the service")
    d.add_argument("which", choices=["quadratic", "ill-conditioned", "vs-adagrad", "centered",
                                     "all"])
    d.add_argument("--url", default=None, help="a running service (default: start one here)")
    d.add_argument("--plot", default=None, metavar="DIR", help="write PNG figures to DIR")
    d.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
