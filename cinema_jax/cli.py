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
            from cinema_jax.data.datasets import write_synthetic_dataset

            write_synthetic_dataset(args.out, n_subjects=args.n_subjects, seed=args.seed, cine=args.cine)
            print(f"wrote {args.n_subjects} subjects to {args.out}")
    elif args.action == "pack":
        from cinema_jax.data.datasets import pack_layout

        if args.no_cine and args.cine_only:
            parser.error("--no-cine and --cine-only exclude each other")
        views = tuple(v.strip() for v in args.views.split(",") if v.strip())
        counts = pack_layout(args.layout_dir, args.out_dir, views, cine=not args.no_cine, edes=not args.cine_only,
                             with_labels=not args.no_labels)
        print(f"packed {counts} subjects into {args.out_dir}")
    else:
        from cinema_jax.data.datasets import prepare

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
    try:
        return command(argv[1:])
    except CinemaError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
