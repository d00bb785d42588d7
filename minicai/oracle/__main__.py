"""python3 -m minicai.oracle generate DIR | check DUMP [--convention NAME] [--tolerance CLASS] | explain A B"""

import argparse
import sys

from minicai.oracle.conventions import PROFILES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m minicai.oracle", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write the golden JSON cases into DIR")
    g.add_argument("dir")
    c = sub.add_parser("check", help="recompute a dump stage by stage under a convention")
    c.add_argument("dump", help="DUMP.safetensors (with DUMP.json next to it)")
    c.add_argument("--convention", choices=list(PROFILES), help="default: the sidecar's convention")
    c.add_argument("--tolerance", choices=["exact", "fp32", "bf16"], help="default: from the dump's dtype")
    e = sub.add_parser("explain", help="the axes on which two conventions differ, with their sources")
    e.add_argument("a", choices=list(PROFILES))
    e.add_argument("b", choices=list(PROFILES))
    args = ap.parse_args(argv)
    if args.command == "generate":
        from minicai.oracle.golden import generate

        paths = generate(args.dir)
        print(f"wrote {len(paths)} cases to {args.dir}")
        return 0
    if args.command == "explain":
        from minicai.oracle.conventions import diff

        a, b = PROFILES[args.a], PROFILES[args.b]
        for axis, va, vb in diff(a, b):
            print(f"{axis}: {a.name}={va!r} ({a.sources[axis]})  |  {b.name}={vb!r} ({b.sources[axis]})")
        return 0
    from minicai import MinicaiError
    from minicai.oracle.check import check_file

    try:
        report = check_file(args.dump, args.convention, args.tolerance)
    except MinicaiError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
