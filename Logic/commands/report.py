"""``dafne-slicer report``: learning-curve mixed model from an ``evaluate`` Dice table."""

from __future__ import annotations

import argparse
import json

from dafne_logic.core.atomic import atomic_write_text
from dafne_logic.learning.learning_curve import fit_learning_curve, plot_learning_curve, prepare_learning_curve, read_dice_csv


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dice-csv", required=True, metavar="FILE",
                        help="CSV with columns dataset,model_version,dice (as written by 'evaluate')")
    parser.add_argument("--from", dest="from_version", metavar="VERSION", help="first version of the window")
    parser.add_argument("--to", dest="to_version", metavar="VERSION", help="last version of the window")
    parser.add_argument("--json", metavar="OUT", help="write the fit as JSON")
    parser.add_argument("--plot", metavar="PNG", help="plot per-dataset relative Dice, their mean and the fit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data = prepare_learning_curve(read_dice_csv(args.dice_csv), args.from_version, args.to_version)
    fit = fit_learning_curve(data)
    print(fit.summary())
    if args.json:
        atomic_write_text(args.json, json.dumps(fit.to_json(), indent=2) + "\n")
    if args.plot:
        plot_learning_curve(data, fit, args.plot)
    return 0
