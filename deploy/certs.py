"""Make a consortium's credentials from the command line (wraps ``privacy.certs``).

The coordinator's operator makes the CA and the SuperLink certificate; each hospital makes its
own node key pair and sends only the ``.pub`` file to the operator. Existing private keys are
never overwritten (a replaced CA or node key must be distributed or registered again)::

    python deploy/certs.py ca OUT_DIR
    python deploy/certs.py server OUT_DIR --ca-dir CA_DIR --host link.example.org --ip 10.0.0.5
    python deploy/certs.py node-key OUT_DIR --name hospital-a
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from privacy.certs import (  # noqa: E402
    CertificateAuthority,
    create_ca,
    create_node_key_pair,
    create_server_certificate,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ca = commands.add_parser("ca", help="create ca.pem and ca.key (keep ca.key offline)")
    ca.add_argument("out_dir", type=Path)
    ca.add_argument("--name", default="fedrad consortium CA", help="the CA's common name")
    ca.add_argument("--days", type=int, default=3650, help="validity in days")
    server = commands.add_parser("server", help="create the SuperLink's superlink.pem/.key")
    server.add_argument("out_dir", type=Path)
    server.add_argument("--ca-dir", type=Path, required=True, help="folder holding ca.pem, ca.key")
    server.add_argument("--host", action="append", default=[], help="a DNS name sites dial")
    server.add_argument("--ip", action="append", default=[], help="an IP address sites dial")
    server.add_argument("--days", type=int, default=365, help="validity in days")
    node = commands.add_parser("node-key", help="create a site's NAME.key and NAME.pub")
    node.add_argument("out_dir", type=Path)
    node.add_argument("--name", required=True, help="the site's id, e.g. hospital-a")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Create the requested credentials and say which files were written."""
    args = _parser().parse_args(argv)
    existing = {
        "ca": args.out_dir / "ca.key",
        "server": args.out_dir / "superlink.key",
        "node-key": args.out_dir / f"{getattr(args, 'name', '')}.key",
    }[args.command]
    if existing.exists():
        print(f"error: {existing} exists; move it away first to make a new one.", file=sys.stderr)
        return 2
    try:
        if args.command == "ca":
            ca = create_ca(args.out_dir, common_name=args.name, valid_days=args.days)
            written = [ca.cert, ca.key]
        elif args.command == "server":
            authority = CertificateAuthority(
                cert=args.ca_dir / "ca.pem", key=args.ca_dir / "ca.key"
            )
            server = create_server_certificate(
                authority,
                args.out_dir,
                hostnames=args.host,
                ip_addresses=args.ip,
                valid_days=args.days,
            )
            written = [server.cert, server.key]
        else:
            pair = create_node_key_pair(args.out_dir, args.name)
            written = [pair.private, pair.public]
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
