"""`cinema-jax` command line: parse arguments, call the library, turn user errors into one line + exit code 2.

Subcommands:
  train   --config=configs/NAME.py[:variant] --workdir=DIR [--config.key=value ...]
  data    synth [--preview OUT.png] [--out DIR --n-subjects N [--cine]] | prepare DATASET RAW_DIR OUT_DIR
          | pack LAYOUT_DIR OUT_DIR [--views ...] [--no-cine | --cine-only] [--no-labels]
  infer   segment|landmark|classify|ef|denoise --ckpt DIR --input PATH --output DIR
  convert import|export ...
  bench   --config=configs/bench.py:NAME [--config.key=value ...]
  eval    --workdir=DIR [--split val|test]
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from cinema_jax.errors import CinemaError


def one_line(err: BaseException) -> str:
    """The error as one line: messages that embed a parser's multi-line text (yaml, configparser) are joined."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


def _load_config(spec: str | None, overrides: list[str]):
    from cinema_jax.config import load_config

    if not spec:
        raise CinemaError("--config=configs/NAME.py[:variant] is required")
    return load_config(spec, overrides)


def cmd_train(argv: list[str]) -> int:
    from cinema_jax.config import split_config_flags

    rest, spec, overrides = split_config_flags(argv)
    parser = argparse.ArgumentParser(prog="cinema-jax train")
    parser.add_argument("--workdir", required=True, help="run directory (re-running the same command resumes)")
    args = parser.parse_args(rest)
    config = _load_config(spec, overrides)
    from cinema_jax.train.loop import train

    train(config, args.workdir)
    return 0


def cmd_eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cinema-jax eval")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--split", default="val")
    args = parser.parse_args(argv)
    from cinema_jax.train.loop import evaluate_workdir

    evaluate_workdir(args.workdir, args.split)
    return 0


def cmd_data(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cinema-jax data")
    sub = parser.add_subparsers(dest="action", required=True)
    synth = sub.add_parser("synth", help="synthetic cine CMR: preview PNG and/or an ArrayRecord dataset")
    synth.add_argument("--preview", help="write a grid of all views with labels and landmarks to this PNG")
    synth.add_argument("--out", help="write subjects as an ArrayRecord dataset to this directory")
    synth.add_argument("--n-subjects", type=int, default=32)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--cine", action="store_true",
                       help="also store every frame ('<view>_t'), for MAE pretraining on random frames")
    pack = sub.add_parser("pack", help="CineMA processed layout (NIfTI) -> ArrayRecord, cine one record per frame")
    pack.add_argument("layout_dir")
    pack.add_argument("out_dir")
    pack.add_argument("--views", default="sax,lax_2c,lax_3c,lax_4c", help="comma-separated (default: all four)")
    pack.add_argument("--no-cine", action="store_true", help="ED/ES only (no '<pid>_<view>_t.nii.gz' files)")
    pack.add_argument("--cine-only", action="store_true", help="cine only (a pretraining layout without ED/ES)")
    pack.add_argument("--no-labels", action="store_true", help="skip the '_gt' label files")
    prep = sub.add_parser("prepare", help="raw public release -> CineMA processed layout")
    prep.add_argument("dataset", choices=["acdc", "mnms", "mnms2"])
    prep.add_argument("raw_dir")
    prep.add_argument("out_dir")
    args = parser.parse_args(argv)
    if args.action == "synth":
        if not args.preview and not args.out:
            parser.error("data synth needs --preview and/or --out")
        if args.preview:
            from cinema_jax.viz import write_synthetic_preview

            write_synthetic_preview(args.preview, seed=args.seed)
            print(f"wrote {args.preview}")
        if args.out:
            from cinema_jax.data.synthetic import write_synthetic_dataset

            write_synthetic_dataset(args.out, n_subjects=args.n_subjects, seed=args.seed, cine=args.cine)
            print(f"wrote {args.n_subjects} subjects to {args.out}")
    elif args.action == "pack":
        from cinema_jax.data.layout import pack_layout

        if args.no_cine and args.cine_only:
            parser.error("--no-cine and --cine-only exclude each other")
        views = tuple(v.strip() for v in args.views.split(",") if v.strip())
        counts = pack_layout(args.layout_dir, args.out_dir, views, cine=not args.no_cine, edes=not args.cine_only,
                             with_labels=not args.no_labels)
        print(f"packed {counts} subjects into {args.out_dir}")
    else:
        from cinema_jax.data.prepare import prepare

        prepare(args.dataset, args.raw_dir, args.out_dir)
        print(f"prepared {args.dataset} into {args.out_dir}")
    return 0


def cmd_infer(argv: list[str]) -> int:
    from cinema_jax.infer import main as infer_main

    return infer_main(argv)


def cmd_convert(argv: list[str]) -> int:
    from cinema_jax.convert import main as convert_main

    return convert_main(argv)


def cmd_bench(argv: list[str]) -> int:
    from cinema_jax.bench import main as bench_main

    return bench_main(argv)


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "data": cmd_data,
    "infer": cmd_infer,
    "convert": cmd_convert,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from cinema_jax.train.preemption import EXIT_PREEMPTED, Preempted

    quiet = _QuietResourceLogs()
    logging.getLogger("absl").addFilter(quiet)
    try:
        return command(argv[1:])
    except CinemaError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except Preempted as p:
        print(f"preempted: {p}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - only resource exhaustion is turned into one line; bugs keep tracebacks
        why = resource_exhausted(err)
        if why is None:
            raise
        print(f"error: {why}; files written before it are intact (checkpoints too): free space or memory and re-run "
              f"the same command (training resumes)", file=sys.stderr)
        return 2


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class _QuietResourceLogs(logging.Filter):
    """Orbax's background save threads log a full traceback for a disk-full write before the error reaches us;
    `main` reports it in one line, so those records are dropped (any other log record passes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and resource_exhausted(exc) is not None:
            return False
        text = record.getMessage()
        return not ("No space left on device" in text or "Disk quota exceeded" in text)


def _chain(err: BaseException):
    """`err`, its causes / contexts and the members of exception groups (Orbax's async saves wrap failures)."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def resource_exhausted(err: BaseException) -> str | None:
    """One line for a full disk or exhausted host / accelerator memory anywhere in `err`'s chain, else None."""
    for e in _chain(err):
        text = one_line(e)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            where = f" writing {e.filename}" if e.filename else ""
            return f"disk full ({e.strerror or 'no space left on device'}){where}"
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return f"disk full ({text[:200]})"
        if isinstance(e, MemoryError):
            return f"out of host memory ({text[:200] or 'MemoryError'})"
        if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text:
            return f"out of accelerator memory ({text[:200]}); lower batch_size or set remat"
    return None


if __name__ == "__main__":
    raise SystemExit(main())
