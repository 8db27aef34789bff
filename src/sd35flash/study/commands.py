"""``sd35flash study create | serve | results | oracle``: parsers and handlers (``cli.py`` dispatches here)."""

from __future__ import annotations

import argparse
import json

from .. import args as A


def _protocol_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--votes-per-annotator", type=A.integer("--votes-per-annotator", 1, 100_000), default=20,
                   help="pairs in each annotator's queue (default 20)")
    p.add_argument("--gold-share", type=A.number("--gold-share", 0.0, 0.5), default=0.1,
                   help="share of gold pairs per annotator (default 0.1)")
    p.add_argument("--repeat-share", type=A.number("--repeat-share", 0.0, 0.5), default=0.1,
                   help="share of repeated pairs per annotator (default 0.1)")


def register(sub) -> None:
    """Add the ``study`` command and its subcommands to the top-level parser's subparsers."""
    s = sub.add_parser("study", help="blind pairwise user study: create, serve, results, oracle")
    ssub = s.add_subparsers(dest="study_command", required=True, parser_class=type(s))
    c = ssub.add_parser("create", help="draw every prompt with every model (same seeds) into a study folder")
    c.add_argument("--model", action="append", required=True, metavar="NAME=MODEL[:steps[:guidance]]",
                   help="a model to compare (repeat); MODEL is a pipeline folder or hub id")
    c.add_argument("--schedule", action="append", metavar="NAME=SPEC",
                   help="sampling times for the model NAME (repeat): scheduler | uniform | a list such as "
                        "1,0.9,0.75,0.5,0 (default: the model's own)")
    c.add_argument("--prompts", required=True, help="'shapes' (the shapes world's test split), a .jsonl spec file, "
                                                    "or a text file with one prompt per line")
    c.add_argument("--num-prompts", type=A.integer("--num-prompts", 1, 100_000), default=32,
                   help="with --prompts shapes")
    c.add_argument("--seeds", type=A.integer("--seeds", 1, 10_000), default=4, help="images per prompt and model")
    c.add_argument("--seed", type=A.seed, default=0, help="base seed")
    c.add_argument("--preset", help="a device preset for every model, as in `generate`")
    c.add_argument("--device", default="auto")
    c.add_argument("--batch-size", type=A.batch_size, default=16)
    c.add_argument("--out", required=True, help="the study folder")
    c.add_argument("--no-progress", action="store_true")
    v = ssub.add_parser("serve", help="serve the study to annotators (FastAPI + uvicorn, votes in SQLite)")
    v.add_argument("dir", help="the study folder")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=A.integer("--port", 1, 65535), default=8000)
    _protocol_args(v)
    r = ssub.add_parser("results", help="Bradley-Terry / ELO scores with bootstrap CIs, agreement, compute plot")
    r.add_argument("dir", help="the study folder")
    r.add_argument("--json", dest="json_out", help="write the results JSON here")
    r.add_argument("--html", dest="html_out", help="write the HTML report (with the plot) here")
    r.add_argument("--resamples", type=A.integer("--resamples", 1, 10**6), default=1000,
                   help="bootstrap resamples over prompts (>= 1000)")
    r.add_argument("--max-gold-failure", type=A.number("--max-gold-failure", 0.0, 1.0), default=0.25,
                   help="exclude annotators who fail more than this share of gold pairs (default 0.25)")
    r.add_argument("--seed", type=A.seed, default=0)
    o = ssub.add_parser("oracle", help="simulated annotators that vote with the shapes-world judge")
    o.add_argument("dir", help="the study folder (shapes-world prompts)")
    o.add_argument("--annotators", type=A.integer("--annotators", 1, 100_000), default=8)
    o.add_argument("--seed", type=A.seed, default=0)
    _protocol_args(o)


def _protocol(args):
    from ..errors import UserError
    from .db import Protocol

    if args.votes_per_annotator < 1:
        raise UserError(f"--votes-per-annotator must be >= 1, got {args.votes_per_annotator}")
    for name in ("gold_share", "repeat_share"):
        val = getattr(args, name)
        if not 0 <= val <= 0.5:
            raise UserError(f"--{name.replace('_', '-')} must be between 0 and 0.5, got {val}")
    return Protocol(args.votes_per_annotator, args.gold_share, args.repeat_share)


def run(args) -> int:
    """Dispatch one ``study`` subcommand."""
    from ..errors import UserError

    if args.study_command == "create":
        from .create import apply_schedule_args, create_study, parse_model_arg

        models = apply_schedule_args([parse_model_arg(m) for m in args.model], args.schedule or [])
        path = create_study(models, args.prompts, args.out, seeds=args.seeds, num_prompts=args.num_prompts,
                            seed=args.seed, preset=args.preset, device=args.device, batch_size=args.batch_size,
                            progress=not args.no_progress)
        print(f"study ready: {path}")
        return 0
    if args.study_command == "serve":
        import uvicorn

        from .app import create_app
        from .folder import INVITE_FILE, TOKEN_FILE

        if not 0 < args.port < 65536:
            raise UserError(f"--port must be between 1 and 65535, got {args.port}")
        app = create_app(args.dir, _protocol(args))
        print(f"invite code: in {args.dir}/{INVITE_FILE}; admin token: in {args.dir}/{TOKEN_FILE} "
              f"(admin page: http://{args.host}:{args.port}/admin)")
        print(f"annotators open http://{args.host}:{args.port}/")
        try:
            uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        except OSError as exc:
            raise UserError(f"cannot serve on {args.host}:{args.port} ({exc.strerror}); pick another --port") from None
        return 0
    if args.study_command == "results":
        from .results import write_results

        if not 0 <= args.max_gold_failure <= 1:
            raise UserError(f"--max-gold-failure must be between 0 and 1, got {args.max_gold_failure}")
        from ..io import check_writable_output

        for path, flag in ((args.json_out, "--json"), (args.html_out, "--html")):
            if path:
                check_writable_output(path, "file", flag)
        res = write_results(args.dir, args.json_out, args.html_out, resamples=args.resamples,
                            max_gold_failure=args.max_gold_failure, seed=args.seed)
        print(json.dumps({"votes": res["votes"], "ranking": res["ranking"],
                          "models": {n: {k: m[k] for k in ("elo", "ci_low", "ci_high", "bt")}
                                     for n, m in res["models"].items()},
                          "krippendorff_alpha": res["agreement"]["krippendorff_alpha"]}, indent=1))
        return 0
    from .oracle import run_oracle

    counts = run_oracle(args.dir, annotators=args.annotators, seed=args.seed, protocol=_protocol(args))
    print(f"oracle: {counts['annotators']} simulated annotators cast {counts['votes']} votes in {args.dir}; "
          f"rate them with `sd35flash study results {args.dir}`")
    return 0
