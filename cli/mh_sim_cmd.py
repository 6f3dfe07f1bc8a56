"""``dt mh-sim``: a fleet of simulated Media Handlers in one process.

``--count`` MHs (``<prefix>1`` ... ``<prefix>N``, zones round-robin over
``--zones``) register with the GC over gRPC and report load at the interval
the GC returned, following ``--load``; :mod:`darktower.cli.mh_sim` does the
work and documents the behaviour (re-registration on ``NOT_FOUND``, retries,
never exiting on GC trouble).

Tokens. Each MH presents its own MH service token (``sub`` = its id, SPEC
§4). They are minted in memory from the signing key in ``--keys DIR`` (a
``dt keys init`` directory; ``.dt/keys`` by default) and renewed before they
expire; or, when the key is not at hand (tokens from a real AC), taken from
``$DT_MH_TOKENS``: one token per MH, in id order, separated by commas or
whitespace. Never from the command line, where every local user can read
them; never printed or logged.

Output. Logs (one event per line) go to stderr. On stdout, exactly one line
once every MH's first report was taken - the readiness signal ``dt up`` and
tests wait for - and one when it stops; ``--json`` makes both JSON objects
(``{"event": "ready", ...}``, ``{"event": "stopped", ...}``). SIGINT/SIGTERM
stop it with exit status 0; a usage problem is one line and status 2.

``python -m darktower.cli.mh_sim_cmd`` is the same command without importing
the rest of ``dt`` (``dt up`` starts it that way: faster).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import trio

from darktower.cli.args import positive_int
from darktower.cli.keys_cmd import DEFAULT_KEYS_DIR, SIGNING_KEY_FILE
from darktower.cli.mh_load import LoadPattern
from darktower.cli.mh_sim import (
    DEFAULT_ID_PREFIX,
    DEFAULT_MAX_STREAMS,
    DEFAULT_REGION,
    DEFAULT_WEBTRANSPORT_BASE_PORT,
    DEFAULT_ZONES,
    MhFleet,
    MhSpec,
    fleet_specs,
    gc_host_port,
    open_mh_registry,
)
from darktower.cli.mh_tokens import MintedTokens, StaticTokens, TokenSource
from darktower.shared.config import Secret, parse_service_token, token_subject
from darktower.shared.keys import KeyFileError, key_id, load_private_key
from darktower.shared.logging import configure_logging
from darktower.shared.seam import asyncio_loop

DEFAULT_GC_URL = "http://127.0.0.1:50051"
DEFAULT_LOAD = "constant:0.1"
TOKENS_VARIABLE = "DT_MH_TOKENS"
_TOKEN_SEPARATORS = re.compile(r"[\s,]+")


class UsageError(Exception):
    """Bad arguments or local inputs: one line, exit status 2."""


@dataclass(frozen=True, slots=True)
class SimOptions:
    gc_url: str
    specs: list[MhSpec]
    pattern: LoadPattern
    tokens: TokenSource
    json: bool


def command(
    *,
    gc_url: str,
    count: int,
    keys_dir: Path,
    id_prefix: str = DEFAULT_ID_PREFIX,
    zones: Sequence[str] = DEFAULT_ZONES,
    load: str = DEFAULT_LOAD,
    max_streams: int = DEFAULT_MAX_STREAMS,
    json_output: bool = True,
    log_level: str = "INFO",
) -> list[str]:
    """The argv that runs a fleet as a child process (``dt up``, benches):
    one place that knows how it is started."""
    argv = [sys.executable, "-m", "darktower.cli.mh_sim_cmd", "--gc-url", gc_url]
    argv += ["--count", str(count), "--id-prefix", id_prefix, "--zones", ",".join(zones)]
    argv += ["--load", load, "--max-streams", str(max_streams), "--keys", str(keys_dir)]
    argv += ["--log-level", log_level]
    return [*argv, "--json"] if json_output else argv


def _zones(text: str) -> list[str]:
    zones = [zone.strip() for zone in text.split(",") if zone.strip()]
    if not zones:
        raise argparse.ArgumentTypeError("give at least one zone, e.g. zone-a,zone-b")
    return zones


def _load(text: str) -> LoadPattern:
    try:
        return LoadPattern.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gc_url(text: str) -> str:
    try:
        gc_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip().rstrip("/")


def _token_source(args: argparse.Namespace, specs: list[MhSpec]) -> TokenSource:
    """``--keys DIR``, else ``$DT_MH_TOKENS``, else the default key directory."""
    raw = os.environ.get(TOKENS_VARIABLE, "").strip()
    if args.keys is None and raw:
        return _static_tokens(raw, specs)
    key_path = Path(args.keys or DEFAULT_KEYS_DIR) / SIGNING_KEY_FILE
    try:
        key = load_private_key(key_path)
    except KeyFileError as exc:
        hint = "" if key_path.exists() else " (create one with `dt keys init`)"
        raise UsageError(f"{exc}{hint}, or set ${TOKENS_VARIABLE}") from None
    return MintedTokens(key, key_id(key.public_key()))


def _static_tokens(raw: str, specs: list[MhSpec]) -> StaticTokens:
    tokens = [token for token in _TOKEN_SEPARATORS.split(raw) if token]
    if len(tokens) != len(specs):
        raise UsageError(
            f"${TOKENS_VARIABLE} holds {len(tokens)} tokens for {len(specs)} MHs (one per MH)"
        )
    checked: dict[str, Secret] = {}
    for n, (text, spec) in enumerate(zip(tokens, specs, strict=True), start=1):
        try:
            token = parse_service_token(text)
        except ValueError:
            raise UsageError(f"${TOKENS_VARIABLE}: token {n} is not a JWT") from None
        # The GC refuses an MH whose token names another id, for ever.
        if token_subject(token) != spec.handler_id:
            raise UsageError(
                f"${TOKENS_VARIABLE}: token {n} is not for {spec.handler_id} (its sub differs)"
            )
        checked[spec.handler_id] = token
    return StaticTokens(checked)


def _options(args: argparse.Namespace) -> SimOptions:
    try:
        specs = fleet_specs(
            args.count,
            id_prefix=args.id_prefix,
            region=args.region,
            zones=args.zones,
            max_streams=args.max_streams,
            base_port=args.base_port,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    gc_url = args.gc_url
    if gc_url is None:
        try:
            gc_url = _gc_url(os.environ.get("GC_GRPC_URL") or DEFAULT_GC_URL)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"GC_GRPC_URL: {exc}") from None
    return SimOptions(gc_url, specs, args.load, _token_source(args, specs), args.json)


def _emit(options: SimOptions, event: str, text: str, **fields: object) -> None:
    if options.json:
        print(json.dumps({"event": event, **fields}), flush=True)
    else:
        print(text, flush=True)


async def _serve(options: SimOptions) -> None:
    """Run the fleet until SIGINT/SIGTERM."""
    ids = [spec.handler_id for spec in options.specs]
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with asyncio_loop(), open_mh_registry(options.gc_url) as registry:
            fleet = MhFleet(options.specs, registry, options.tokens, options.pattern)
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_signal)
                await nursery.start(fleet.run)
                await fleet.wait_ready()
                interval = fleet.interval_s
                _emit(
                    options,
                    "ready",
                    f"mh-sim ready: {len(ids)} MHs ({', '.join(ids)}) reporting to"
                    f" {options.gc_url} every {interval:g} s, load {options.pattern}",
                    mh_ids=ids,
                    zones=[spec.zone for spec in options.specs],
                    interval_s=interval,
                    gc_url=options.gc_url,
                )
    totals = fleet.totals()
    _emit(
        options,
        "stopped",
        f"mh-sim stopped: {totals['reports']} reports taken, {totals['report_failures']}"
        f" failed, {totals['registrations']} registrations",
        **totals,
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM outside trio's own receiver: delivered as a SIGINT, so trio's
    KeyboardInterrupt protection applies (raising here could land inside
    trio's internals while it starts or stops)."""
    signal.raise_signal(signal.SIGINT)


def run(args: argparse.Namespace) -> int:
    """The command: exit status 0 when stopped by a signal, 2 on bad usage."""
    try:
        options = _options(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    # Until trio's own receiver is installed, SIGTERM ends the start like SIGINT.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        trio.run(_serve, options)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gc-url",
        type=_gc_url,
        help=f"the GC's gRPC endpoint (default: $GC_GRPC_URL or {DEFAULT_GC_URL})",
    )
    parser.add_argument("--count", type=positive_int, default=1, help="how many MHs (default: 1)")
    parser.add_argument(
        "--id-prefix",
        default=DEFAULT_ID_PREFIX,
        help=f"MH ids are PREFIX1 ... PREFIXN (default: {DEFAULT_ID_PREFIX})",
    )
    parser.add_argument(
        "--region", default=DEFAULT_REGION, help=f"region (default: {DEFAULT_REGION})"
    )
    parser.add_argument(
        "--zones",
        type=_zones,
        default=list(DEFAULT_ZONES),
        metavar="A,B",
        help=f"zones, assigned round-robin (default: {','.join(DEFAULT_ZONES)})",
    )
    parser.add_argument(
        "--max-streams",
        type=positive_int,
        default=DEFAULT_MAX_STREAMS,
        help=f"capacity of each MH (default: {DEFAULT_MAX_STREAMS})",
    )
    parser.add_argument(
        "--base-port",
        type=positive_int,
        default=DEFAULT_WEBTRANSPORT_BASE_PORT,
        metavar="PORT",
        help="MH i advertises https://127.0.0.1:PORT+i for WebTransport (never dialled;"
        f" default: {DEFAULT_WEBTRANSPORT_BASE_PORT})",
    )
    parser.add_argument(
        "--load",
        type=_load,
        default=LoadPattern.parse(DEFAULT_LOAD),
        metavar="PATTERN",
        help="load over time, fractions of capacity: constant:LOAD, sine:MIN,MAX,PERIOD_S"
        f" or ramp:FROM,TO,SECONDS (default: {DEFAULT_LOAD})",
    )
    parser.add_argument(
        "--keys",
        metavar="DIR",
        help=f"mint each MH's token with the key in DIR (default: ${TOKENS_VARIABLE} if set,"
        f" else {DEFAULT_KEYS_DIR})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the ready and stopped lines as JSON"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level on stderr (default: INFO)",
    )
    parser.set_defaults(func=run)


_DESCRIPTION = (
    "Simulated Media Handlers: register with the GC over gRPC and send load reports at the"
    " interval it returns, until SIGINT/SIGTERM. Prints one line once every MH's first"
    f" report was taken. Tokens: minted from --keys DIR, or ${TOKENS_VARIABLE}."
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``dt mh-sim``."""
    parser = subparsers.add_parser(
        "mh-sim", help="run simulated media handlers against a GC", description=_DESCRIPTION
    )
    add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dt mh-sim", description=_DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
