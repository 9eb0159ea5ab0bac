"""`python -m gcmlm_assets.landing.intake` (`make receive`): run the DICOM receiver until stopped.

Options override the GCMLM_INTAKE_* variables (settings.py); the landing zone, the artifacts and the
Dagster home come from settings.py as for the platform, so the pseudonym table is checked against them.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from gcmlm_assets import settings
from gcmlm_assets.landing.intake.pseudonyms import PseudonymTableError
from gcmlm_assets.landing.intake.receiver import DicomReceiver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gcmlm_assets.landing.intake",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--landing", type=Path, default=settings.landing_root(),
                        help="landing zone (GCMLM_LANDING_ROOT)")
    parser.add_argument("--pseudonym-table", type=Path, default=settings.intake_pseudonym_table(),
                        help="real id -> pseudonym table, outside the landing zone and artifacts "
                             "(GCMLM_INTAKE_PSEUDONYM_TABLE; required)")
    parser.add_argument("--host", default=settings.intake_host(), help="address to listen on (GCMLM_INTAKE_HOST)")
    parser.add_argument("--port", type=int, default=settings.intake_port(), help="TCP port (GCMLM_INTAKE_PORT)")
    parser.add_argument("--ae-title", default=settings.intake_ae_title(), help="AE title (GCMLM_INTAKE_AE_TITLE)")
    parser.add_argument("--calling-ae-title", action="append", default=list(settings.intake_calling_ae_titles()),
                        help="an AE title allowed to send; repeat for several (GCMLM_INTAKE_CALLING_AE_TITLES; "
                             "default: any)")
    parser.add_argument("--quiet-s", type=float, default=settings.intake_quiet_s(),
                        help="seconds of quiet before READY is written (GCMLM_INTAKE_QUIET_S)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log pynetdicom's own messages")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.INFO if args.verbose else logging.WARNING)
    if args.pseudonym_table is None:
        print("no pseudonym table: set GCMLM_INTAKE_PSEUDONYM_TABLE or --pseudonym-table to a file outside "
              "the landing zone and the artifacts", file=sys.stderr)
        return 2
    protected = {"artifacts": settings.artifacts_root(), "Dagster instance": settings.dagster_home()}
    try:
        receiver = DicomReceiver(args.landing, args.pseudonym_table, host=args.host, port=args.port,
                                 ae_title=args.ae_title, quiet_s=args.quiet_s,
                                 calling_ae_titles=tuple(args.calling_ae_title), protected=protected)
    except (PseudonymTableError, ValueError) as error:
        print(f"refusing to start: {error}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    receiver.serve_until(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
