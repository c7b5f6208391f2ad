"""`cinema-jax infer segment|landmark|classify|ef|denoise --ckpt DIR --input FILE.nii.gz|DICOM_DIR --output DIR`.

`--ckpt` is a training workdir (its best checkpoint, else the latest) or a checkpoint directory. `ef` uses a
segmentation checkpoint (volume curves over the cine, ED/ES = max/min LV volume) or a regression checkpoint (EF
regressed from ED + ES). Errors a user can cause raise CinemaError (the CLI prints one line and exits 2) and leave no
output directory behind.
"""

from __future__ import annotations

import argparse
import json


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="training workdir (best, else latest) or checkpoint directory")
    p.add_argument("--input", required=True, help="NIfTI (.nii/.nii.gz) or DICOM directory (x, y[, z][, t])")
    p.add_argument("--output", required=True, help="output directory (created; must not hold files)")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory an earlier cinema-jax run "
                   "wrote (never anything else)")
    p.add_argument("--series-uid", default=None, help="DICOM input: the SeriesInstanceUID to read when the "
                   "directory holds several series")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cinema-jax infer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name, text in (("segment", "segment every frame; masks, overlays, GIF, volume curves, EF"),
                       ("landmark", "LAX landmarks on every frame; GLS and MAPSE"),
                       ("classify", "disease class (or regressed value) from ED + ES"),
                       ("ef", "ejection fraction from a segmentation or regression checkpoint")):
        p = sub.add_parser(name, help=text)
        _common_args(p)
        if name in ("classify", "ef"):
            p.add_argument("--ed-frame", type=int, default=None, help="ED frame index (0-based)")
            p.add_argument("--es-frame", type=int, default=None, help="ES frame index (0-based)")
    den = sub.add_parser("denoise", help="SNRAware denoising")
    from cinema_jax.infer import denoise

    denoise.add_arguments(den)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.what == "denoise":
        from cinema_jax.infer import denoise

        summary = denoise.run_from_args(args)
    elif args.what == "segment":
        from cinema_jax.infer import segment

        summary = segment.run(args.ckpt, args.input, args.output, overwrite=args.overwrite,
                              series_uid=args.series_uid)
    elif args.what == "landmark":
        from cinema_jax.infer import landmark

        summary = landmark.run(args.ckpt, args.input, args.output, overwrite=args.overwrite,
                               series_uid=args.series_uid)
    elif args.what == "classify":
        from cinema_jax.infer import classify

        summary = classify.run(args.ckpt, args.input, args.output, args.ed_frame, args.es_frame,
                               overwrite=args.overwrite, series_uid=args.series_uid)
    else:
        summary = _ef(args)
    keys = ("prediction", "probabilities", "lv_edv", "lv_esv", "lv_ef", "rv_ef", "gls_percent", "mapse_mm")
    short = {k: summary[k] for k in keys if k in summary}
    from cinema_jax.fileutil import clean_json

    print(json.dumps(clean_json({"output": str(args.output), **short})))
    return 0


def _ef(args) -> dict:
    """EF from a segmentation run (a one-frame input has no EF: refused; given ED/ES frames are used) or a
    regression run."""
    from cinema_jax.infer import common

    common.check_output(args.output, args.overwrite, (args.input, args.ckpt))
    loaded = common.load_model(args.ckpt, ("segment", "regress"))
    if loaded.task.name == "segment":
        from cinema_jax.infer import segment

        return segment.run(args.ckpt, args.input, args.output, overwrite=args.overwrite, loaded=loaded,
                           ed_frame=args.ed_frame, es_frame=args.es_frame, need_cine=True,
                           series_uid=args.series_uid)
    from cinema_jax.infer import classify

    return classify.run(args.ckpt, args.input, args.output, args.ed_frame, args.es_frame, overwrite=args.overwrite,
                        loaded=loaded, series_uid=args.series_uid)
