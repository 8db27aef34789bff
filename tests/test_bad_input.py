"""The bad-input table: every command, every class of bad input.

Each row runs the CLI in process and asserts one line on stderr, a non-zero exit, no traceback and
that nothing was created, deleted or changed under the test folder or the cache. Every row fails
before a model is loaded or trained, so the whole table takes seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sd35flash.cli import build_parser

# Placeholders in the rows: {t} = the test folder. Files made by _materials():
#   file.txt (a regular file), dir/ (empty folder), user/ (a folder of the user's own files),
#   student/ (an empty folder), bad.yaml (invalid YAML), empty.yaml, list.yaml (not a mapping),
#   latin1.yaml / latin1.txt / latin1.jsonl (not UTF-8), unknown.yaml (an unknown key),
#   bad.jsonl (invalid JSON), empty.txt (no prompts), notmodel/ (a folder with a stray file).
PROC = "/proc/sd35flash-nonexistent"
T = "{t}"

# (command, input class, argv, a word the one line must contain)
ROWS: list[tuple[str, str, list[str], str]] = [
    # ---- world check / fd-scale / specs
    ("world check", "unwritable output", ["world", "check", "--num", "2", "--json", f"{PROC}/c.json"], "system file"),
    ("world check", "wrong kind", ["world", "check", "--num", "2", "--json", f"{T}/dir"], "is a folder"),
    ("world check", "parent is a file", ["world", "check", "--num", "2", "--json", f"{T}/file.txt/c.json"],
     "is a file"),
    ("world check", "huge number", ["world", "check", "--num", "1000000000000"], "--num"),
    ("world check", "negative number", ["world", "check", "--num", "-5"], "--num"),
    ("world check", "huge seed", ["world", "check", "--seed", str(2**70)], "--seed"),
    ("world check", "nan", ["world", "check", "--num", "nan"], "--num"),
    ("world fd-scale", "unwritable output", ["world", "fd-scale", "--json", f"{PROC}/f.json"], "system file"),
    ("world fd-scale", "unknown split", ["world", "fd-scale", "--split", "bogus", "--num", "2"], "unknown split"),
    ("world fd-scale", "inf", ["world", "fd-scale", "--num", "inf"], "--num"),
    ("world specs", "unwritable output", ["world", "specs", "--split", "test", "--out", f"{PROC}/o.jsonl"],
     "system file"),
    ("world specs", "wrong kind", ["world", "specs", "--split", "test", "--out", f"{T}/dir"], "is a folder"),
    ("world specs", "parent is a file", ["world", "specs", "--split", "test", "--out", f"{T}/file.txt/o.jsonl"],
     "is a file"),
    ("world specs", "huge number", ["world", "specs", "--split", "test", "--num", "1000000000000", "--out",
                                    f"{T}/o.jsonl"], "--num"),
    ("world specs", "huge seed", ["world", "specs", "--split", "test", "--seed", str(2**70), "--out", f"{T}/o.jsonl"],
     "--seed"),
    ("world specs", "unknown split", ["world", "specs", "--split", "bogus", "--out", f"{T}/o.jsonl"], "unknown split"),
    # ---- pretrain
    ("pretrain", "wrong kind", ["pretrain", "--preset", "smoke", "--out", f"{T}/file.txt"], "is a file"),
    ("pretrain", "existing non-model output", ["pretrain", "--preset", "smoke", "--out", f"{T}/user"],
     "not a model folder"),
    ("pretrain", "unwritable output", ["pretrain", "--preset", "smoke", "--out", f"{PROC}/t"], "system file"),
    ("pretrain", "missing input", ["pretrain", "--config", f"{T}/missing.yaml", "--out", f"{T}/t"], "does not exist"),
    ("pretrain", "wrong kind input", ["pretrain", "--config", f"{T}/dir", "--out", f"{T}/t"], "is a folder"),
    ("pretrain", "malformed file", ["pretrain", "--config", f"{T}/bad.yaml", "--out", f"{T}/t"], "not valid YAML"),
    ("pretrain", "empty file", ["pretrain", "--config", f"{T}/empty.yaml", "--out", f"{T}/t"], "empty"),
    ("pretrain", "not a mapping", ["pretrain", "--config", f"{T}/list.yaml", "--out", f"{T}/t"], "mapping"),
    ("pretrain", "non-UTF-8 file", ["pretrain", "--config", f"{T}/latin1.yaml", "--out", f"{T}/t"], "UTF-8"),
    ("pretrain", "unknown config key", ["pretrain", "--config", f"{T}/unknown.yaml", "--out", f"{T}/t"],
     "unknown config key"),
    ("pretrain", "negative number in config", ["pretrain", "--config", f"{T}/neglr.yaml", "--out", f"{T}/t"], "lr"),
    ("pretrain", "nan in config", ["pretrain", "--config", f"{T}/nan.yaml", "--out", f"{T}/t"], "finite"),
    ("pretrain", "huge seed in config", ["pretrain", "--config", f"{T}/seed.yaml", "--out", f"{T}/t"], "seed"),
    ("pretrain", "unknown preset", ["pretrain", "--preset", "gigantic", "--out", f"{T}/t"], "unknown preset"),
    # ---- generate
    ("generate", "missing input", ["generate", "x", "--model", f"{T}/missing", "--out", f"{T}/o.png"],
     "does not exist"),
    ("generate", "wrong kind input", ["generate", "x", "--model", f"{T}/file.txt", "--out", f"{T}/o.png"], "model"),
    ("generate", "wrong kind", ["generate", "x", "--model", f"{T}/missing", "--out", f"{T}/dir.png"], "is a folder"),
    ("generate", "not a png", ["generate", "x", "--model", f"{T}/missing", "--out", f"{T}/dir"], ".png"),
    ("generate", "unwritable output", ["generate", "x", "--model", f"{T}/missing", "--out", f"{PROC}/o.png"],
     "system file"),
    ("generate", "nan", ["generate", "x", "--model", f"{T}/missing", "--guidance", "nan", "--out", f"{T}/o.png"],
     "--guidance"),
    ("generate", "inf", ["generate", "x", "--model", f"{T}/missing", "--guidance", "inf", "--out", f"{T}/o.png"],
     "--guidance"),
    ("generate", "huge number", ["generate", "x", "--model", f"{T}/missing", "--guidance", "1e30", "--out",
                                 f"{T}/o.png"], "--guidance"),
    ("generate", "negative number", ["generate", "x", "--model", f"{T}/missing", "--guidance", "-1", "--out",
                                     f"{T}/o.png"], "--guidance"),
    ("generate", "zero steps", ["generate", "x", "--model", f"{T}/missing", "--steps", "0", "--out", f"{T}/o.png"],
     "--steps"),
    ("generate", "huge steps", ["generate", "x", "--model", f"{T}/missing", "--steps", "1e12", "--out", f"{T}/o.png"],
     "--steps"),
    ("generate", "huge seed", ["generate", "x", "--model", f"{T}/missing", "--seed", str(2**70), "--out",
                               f"{T}/o.png"], "--seed"),
    ("generate", "negative seed", ["generate", "x", "--model", f"{T}/missing", "--seed", "-1", "--out", f"{T}/o.png"],
     "--seed"),
    ("generate", "missing prompt file", ["generate", "--prompts", f"{T}/missing.txt", "--model", f"{T}/missing",
                                         "--out", f"{T}/o.png"], "does not exist"),
    ("generate", "non-UTF-8 file", ["generate", "--prompts", f"{T}/latin1.txt", "--model", f"{T}/missing",
                                    "--out", f"{T}/o.png"], "UTF-8"),
    ("generate", "empty file", ["generate", "--prompts", f"{T}/empty.txt", "--model", f"{T}/missing",
                                "--out", f"{T}/o.png"], "no prompts"),
    ("generate", "device absent", ["generate", "x", "--model", f"{T}/missing", "--device", "cuda:7", "--out",
                                   f"{T}/o.png"], "device"),
    ("generate", "unknown device", ["generate", "x", "--model", f"{T}/missing", "--device", "toaster", "--out",
                                    f"{T}/o.png"], "device"),
    # ---- eval
    ("eval", "missing input", ["eval", "--model", f"{T}/missing", "--split", "test", "--json", f"{T}/e.json"],
     "does not exist"),
    ("eval", "unwritable output", ["eval", "--model", f"{T}/missing", "--split", "test", "--json", f"{PROC}/e.json"],
     "system file"),
    ("eval", "wrong kind", ["eval", "--model", f"{T}/missing", "--split", "test", "--json", f"{T}/dir"], "is a folder"),
    ("eval", "wrong kind images", ["eval", "--model", f"{T}/missing", "--split", "test", "--json", f"{T}/e.json",
                                   "--save-images", f"{T}/file.txt"], "is a file"),
    ("eval", "existing non-model output", ["eval", "--model", f"{T}/missing", "--split", "test", "--json",
                                           f"{T}/e.json", "--save-images", f"{T}/user"], "not a model folder"),
    ("eval", "missing spec file", ["eval", "--model", f"{T}/missing", "--specs", f"{T}/missing.jsonl", "--json",
                                   f"{T}/e.json"], "does not exist"),
    ("eval", "malformed file", ["eval", "--model", f"{T}/missing", "--specs", f"{T}/bad.jsonl", "--json",
                                f"{T}/e.json"], "invalid JSON"),
    ("eval", "non-UTF-8 file", ["eval", "--model", f"{T}/missing", "--specs", f"{T}/latin1.jsonl", "--json",
                                f"{T}/e.json"], "UTF-8"),
    ("eval", "unknown split", ["eval", "--model", f"{T}/missing", "--split", "bogus", "--json", f"{T}/e.json"],
     "split"),
    ("eval", "nan", ["eval", "--model", f"{T}/missing", "--split", "test", "--guidance", "nan", "--json",
                     f"{T}/e.json"], "--guidance"),
    ("eval", "huge number", ["eval", "--model", f"{T}/missing", "--split", "test", "--num-images", "1e15", "--json",
                             f"{T}/e.json"], "--num-images"),
    ("eval", "zero batch", ["eval", "--model", f"{T}/missing", "--split", "test", "--batch-size", "0", "--json",
                            f"{T}/e.json"], "--batch-size"),
    ("eval", "device absent", ["eval", "--model", f"{T}/missing", "--split", "test", "--device", "cuda:7",
                               "--json", f"{T}/e.json"], "device"),
    # ---- distill
    ("distill", "wrong kind", ["distill", "--preset", "smoke", "--out", f"{T}/file.txt"], "is a file"),
    ("distill", "existing non-model output", ["distill", "--preset", "smoke", "--out", f"{T}/user"],
     "not a model folder"),
    ("distill", "unwritable output", ["distill", "--preset", "smoke", "--out", f"{PROC}/s"], "system file"),
    ("distill", "parent is a file", ["distill", "--preset", "smoke", "--out", f"{T}/file.txt/s"], "is a file"),
    ("distill", "missing input", ["distill", "--config", f"{T}/missing.yaml", "--out", f"{T}/s"], "does not exist"),
    ("distill", "malformed file", ["distill", "--config", f"{T}/bad.yaml", "--out", f"{T}/s"], "not valid YAML"),
    ("distill", "empty file", ["distill", "--config", f"{T}/empty.yaml", "--out", f"{T}/s"], "empty"),
    ("distill", "non-UTF-8 file", ["distill", "--config", f"{T}/latin1.yaml", "--out", f"{T}/s"], "UTF-8"),
    ("distill", "unknown config key", ["distill", "--preset", "smoke", "--set", "student.stepz=3", "--out", f"{T}/s"],
     "unknown config key"),
    ("distill", "negative steps", ["distill", "--preset", "smoke", "--set", "student.steps=-3", "--out", f"{T}/s"],
     "student.steps"),
    ("distill", "negative lr", ["distill", "--preset", "smoke", "--set", "student.lr=-1e-4", "--out", f"{T}/s"],
     "student.lr"),
    ("distill", "zero lr", ["distill", "--preset", "smoke", "--set", "fake.lr=0", "--out", f"{T}/s"], "fake.lr"),
    ("distill", "nan", ["distill", "--preset", "smoke", "--set", "guidance=nan", "--out", f"{T}/s"], "guidance"),
    ("distill", "inf", ["distill", "--preset", "smoke", "--set", "student.lr=inf", "--out", f"{T}/s"], "student.lr"),
    ("distill", "huge seed", ["distill", "--preset", "smoke", "--set", f"runtime.seed={2**70}", "--out", f"{T}/s"],
     "runtime.seed"),
    ("distill", "huge number", ["distill", "--preset", "smoke", "--set", "guidance=1e30", "--out", f"{T}/s"],
     "guidance"),
    ("distill", "bad student steps", ["distill", "--preset", "smoke", "--student-steps", "3", "--out", f"{T}/s"],
     "--student-steps"),
    ("distill", "missing prompt file", ["distill", "--preset", "smoke", "--force", "--teacher", f"{T}/missing",
                                        "--prompts", f"{T}/missing.txt", "--out", f"{T}/s"], "missing.txt"),
    ("distill", "missing work folder", ["distill", "--preset", "smoke", "--teacher", f"{T}/missing", "--from-work",
                                        f"{T}/dir", "--out", f"{T}/s"], "--from-work"),
    ("distill", "missing init folder", ["distill", "--preset", "smoke", "--teacher", f"{T}/missing", "--init-from",
                                        f"{T}/missing", "--out", f"{T}/s"], "--init-from"),
    ("distill", "missing teacher", ["distill", "--preset", "smoke", "--teacher", f"{T}/missing", "--out", f"{T}/s"],
     "does not exist"),
    # ---- merge
    ("merge", "existing non-model output", ["merge", "--student", f"{T}/student", "--ratio", "0.5", "--out",
                                            f"{T}/user"], "not a model folder"),
    ("merge", "wrong kind", ["merge", "--student", f"{T}/student", "--ratio", "0.5", "--out", f"{T}/file.txt"],
     "is a file"),
    ("merge", "unwritable output", ["merge", "--student", f"{T}/student", "--ratio", "0.5", "--out", f"{PROC}/m"],
     "system file"),
    ("merge", "missing input", ["merge", "--student", f"{T}/missing", "--ratio", "0.5", "--out", f"{T}/m"],
     "does not exist"),
    ("merge", "wrong kind input", ["merge", "--student", f"{T}/file.txt", "--ratio", "0.5", "--out", f"{T}/m"],
     "is a file"),
    ("merge", "nan", ["merge", "--student", f"{T}/student", "--ratio", "nan", "--out", f"{T}/m"], "--ratio"),
    ("merge", "out of range", ["merge", "--student", f"{T}/student", "--ratio", "1.5", "--out", f"{T}/m"],
     "outside [0, 1]"),
    ("merge", "nan weights", ["merge", "--student", f"{T}/student", "--weights", "nan,1", "--out", f"{T}/m"],
     "--weights"),
    ("merge", "negative weights", ["merge", "--student", f"{T}/student", "--weights", "-1,2", "--out", f"{T}/m"],
     "--weights"),
    ("merge", "malformed weights", ["merge", "--student", f"{T}/student", "--weights", "a,b", "--out", f"{T}/m"],
     "--weights"),
    ("merge", "no split student", ["merge", "--student", f"{T}/student", "--ratio", "0.5", "--out", f"{T}/m"],
     "model"),
    # ---- merge-sweep
    ("merge-sweep", "missing input", ["merge-sweep", "--student", f"{T}/missing", "--out", f"{T}/w"],
     "does not exist"),
    ("merge-sweep", "wrong kind input", ["merge-sweep", "--student", f"{T}/file.txt", "--out", f"{T}/w"], "is a file"),
    ("merge-sweep", "wrong kind", ["merge-sweep", "--student", f"{T}/student", "--out", f"{T}/file.txt"], "is a file"),
    ("merge-sweep", "unwritable output", ["merge-sweep", "--student", f"{T}/student", "--out", f"{PROC}/w"],
     "system file"),
    ("merge-sweep", "existing non-model output", ["merge-sweep", "--student", f"{T}/student", "--out",
                                                  f"{T}/sweepout"], "not a model folder"),
    ("merge-sweep", "nan", ["merge-sweep", "--student", f"{T}/student", "--out", f"{T}/w", "--fd-tolerance", "nan"],
     "--fd-tolerance"),
    ("merge-sweep", "negative number", ["merge-sweep", "--student", f"{T}/student", "--out", f"{T}/w",
                                        "--fd-tolerance", "-1"], "--fd-tolerance"),
    ("merge-sweep", "huge count", ["merge-sweep", "--student", f"{T}/student", "--out", f"{T}/w", "--ratios",
                                   "0:1:1e-7"], "at most"),
    ("merge-sweep", "tiny step", ["merge-sweep", "--student", f"{T}/student", "--out", f"{T}/w", "--ratios",
                                  "0:1:1e-320"], "--ratios"),
    ("merge-sweep", "nan ratios", ["merge-sweep", "--student", f"{T}/student", "--out", f"{T}/w", "--ratios",
                                   "nan,0.5"], "--ratios"),
    ("merge-sweep", "out of range", ["merge-sweep", "--student", f"{T}/student", "--out", f"{T}/w", "--ratios",
                                     "0,2"], "outside"),
    ("merge-sweep", "test split", ["merge-sweep", "--student", f"{T}/student", "--out", f"{T}/w", "--split", "test"],
     "val"),
    # ---- info
    ("info", "missing input", ["info", f"{T}/missing"], "does not exist"),
    ("info", "wrong kind input", ["info", f"{T}/file.txt"], "not a model folder"),
    ("info", "not a model", ["info", f"{T}/dir"], "not a model folder"),
    # ---- presets
    ("presets", "unwritable output", ["presets", "--json", f"{PROC}/p.json"], "system file"),
    ("presets", "wrong kind", ["presets", "--json", f"{T}/dir"], "is a folder"),
    ("presets", "device absent", ["presets", "--device", "cuda:7"], "device"),
    # ---- bench
    ("bench", "unwritable output", ["bench", "--model", f"{T}/missing", "--presets", "cpu-fp32", "--json",
                                    f"{PROC}/b.json"], "system file"),
    ("bench", "wrong kind", ["bench", "--model", f"{T}/missing", "--presets", "cpu-fp32", "--json", f"{T}/dir"],
     "is a folder"),
    ("bench", "wrong kind work", ["bench", "--model", f"{T}/missing", "--presets", "cpu-fp32", "--json",
                                  f"{T}/b.json", "--work", f"{T}/file.txt"], "is a file"),
    ("bench", "nan", ["bench", "--model", f"{T}/missing", "--presets", "cpu-fp32", "--json", f"{T}/b.json",
                      "--guidance", "nan"], "--guidance"),
    ("bench", "huge number", ["bench", "--model", f"{T}/missing", "--presets", "cpu-fp32", "--json", f"{T}/b.json",
                              "--runs", "1e9"], "--runs"),
    ("bench", "device absent", ["bench", "--model", f"{T}/missing", "--presets", "cpu-fp32", "--json", f"{T}/b.json",
                                "--device", "cuda:7"], "device"),
    ("bench", "unknown preset", ["bench", "--model", f"{T}/missing", "--presets", "bogus", "--json", f"{T}/b.json"],
     "bogus"),
    # ---- export
    ("export", "existing non-model output", ["export", "--model", f"{T}/missing", "--format", "onnx", "--out",
                                             f"{T}/user"], "not a model folder"),
    ("export", "wrong kind", ["export", "--model", f"{T}/missing", "--format", "onnx", "--out", f"{T}/file.txt"],
     "is a file"),
    ("export", "unwritable output", ["export", "--model", f"{T}/missing", "--format", "onnx", "--out", f"{PROC}/x"],
     "system file"),
    ("export", "missing input", ["export", "--model", f"{T}/missing", "--format", "onnx", "--out", f"{T}/x"],
     "does not exist"),
    ("export", "not a model", ["export", "--model", f"{T}/dir", "--format", "onnx", "--out", f"{T}/x"],
     "model_index.json"),
    ("export", "huge number", ["export", "--model", f"{T}/missing", "--format", "onnx", "--resolution", "1e9",
                               "--out", f"{T}/x"], "--resolution"),
    # ---- plan
    ("plan", "unwritable output", ["plan", "--config", "sd35-medium", "--preset", "desktop-16bit-t5", "--json",
                                   f"{PROC}/p.json"], "system file"),
    ("plan", "wrong kind", ["plan", "--config", "sd35-medium", "--preset", "desktop-16bit-t5", "--json", f"{T}/dir"],
     "is a folder"),
    ("plan", "missing input", ["plan", "--config", f"{T}/missing", "--preset", "desktop-16bit-t5"], "missing"),
    ("plan", "unknown preset", ["plan", "--config", "sd35-medium", "--preset", "bogus"], "bogus"),
    ("plan", "huge number", ["plan", "--config", "sd35-medium", "--preset", "desktop-16bit-t5", "--batch", "1e12"],
     "--batch"),
    ("plan", "nan", ["plan", "--config", "sd35-medium", "--preset", "desktop-16bit-t5", "--resolution", "nan"],
     "--resolution"),
    # ---- demo
    ("demo", "wrong kind", ["demo", "--preset", "smoke", "--out", f"{T}/file.txt"], "is a file"),
    ("demo", "unwritable output", ["demo", "--preset", "smoke", "--out", f"{PROC}/d"], "system file"),
    ("demo", "huge number", ["demo", "--preset", "smoke", "--num-images", "1e12", "--out", f"{T}/d"], "--num-images"),
    ("eval", "nan schedule", ["eval", "--model", f"{T}/missing", "--split", "test", "--schedule", "1,nan,0", "--json",
                              f"{T}/e.json"], "--schedule"),
    ("eval", "unordered schedule", ["eval", "--model", f"{T}/missing", "--split", "test", "--schedule", "0.5,1,0",
                                    "--json", f"{T}/e.json"], "descending"),
    ("eval", "malformed value", ["eval", "--model", f"{T}/missing", "--split", "test", "--schedule", "bogus", "--json",
                                 f"{T}/e.json"], "--schedule"),
    # ---- distill: memory section (--force skips only the memory planner, never these checks), shipped names
    ("distill", "zero count", ["distill", "--preset", "smoke", "--force", "--set", "memory.probe_batch=0", "--out",
                               f"{T}/s"], "memory.probe_batch"),
    ("distill", "bad choice in config", ["distill", "--preset", "smoke", "--force", "--set",
                                         "memory.teacher_dtype=fp8", "--out", f"{T}/s"], "teacher_dtype"),
    ("distill", "unknown shipped name", ["distill", "--preset", "smoke", "--teacher", "bogusname", "--out", f"{T}/s"],
     "shipped"),
    # ---- plan --train
    ("plan", "zero count", ["plan", "--train", "--config", "sd35-medium", "--gpus", "0"], "--gpus"),
    ("plan", "inf", ["plan", "--train", "--config", "sd35-medium", "--lora-rank", "inf"], "--lora-rank"),
    ("plan", "negative number", ["plan", "--train", "--config", "sd35-medium", "--split-branches", "-1"],
     "--split-branches"),
    ("plan", "missing option", ["plan", "--config", "sd35-medium"], "--preset"),
    # ---- prepare
    ("prepare", "missing teacher", ["prepare", "--teacher", f"{T}/missing", "--prompts", "shapes", "--out", f"{T}/p"],
     "does not exist"),
    ("prepare", "wrong kind", ["prepare", "--teacher", f"{T}/missing", "--prompts", "shapes", "--out",
                               f"{T}/file.txt"], "is a file"),
    ("prepare", "existing non-model output", ["prepare", "--teacher", f"{T}/missing", "--prompts", "shapes", "--out",
                                              f"{T}/user"], "not a model folder"),
    ("prepare", "unwritable output", ["prepare", "--teacher", f"{T}/missing", "--prompts", "shapes", "--out",
                                      f"{PROC}/p"], "system file"),
    ("prepare", "missing prompt file", ["prepare", "--teacher", f"{T}/missing", "--prompts", f"{T}/missing.txt",
                                        "--out", f"{T}/p"], "does not exist"),
    ("prepare", "huge number", ["prepare", "--teacher", f"{T}/missing", "--prompts", "shapes", "--batch", "1e12",
                                "--out", f"{T}/p"], "--batch"),
    ("prepare", "nan", ["prepare", "--teacher", f"{T}/missing", "--prompts", "shapes", "--resolution", "nan", "--out",
                        f"{T}/p"], "--resolution"),
    ("prepare", "unknown preset", ["prepare", "--teacher", f"{T}/missing", "--prompts", "shapes", "--preset", "bogus",
                                   "--out", f"{T}/p"], "unknown distill preset"),
    ("prepare", "negative number", ["prepare", "--teacher", f"{T}/missing", "--prompts", "shapes", "--set",
                                    "num_prompts=-1", "--out", f"{T}/p"], "num_prompts"),
    # ---- models
    ("models", "unknown flag", ["models", "--bogus"], "unrecognized"),
    # ---- study
    ("study create", "unwritable output", ["study", "create", "--model", f"a={T}/missing", "--model", f"b={T}/missing",
                                           "--prompts", "shapes", "--out", f"{PROC}/s"], "system file"),
    ("study create", "wrong kind", ["study", "create", "--model", f"a={T}/missing", "--model", f"b={T}/missing",
                                    "--prompts", "shapes", "--out", f"{T}/file.txt"], "is a file"),
    ("study create", "existing non-model output", ["study", "create", "--model", f"a={T}/missing", "--model",
                                                   f"b={T}/missing", "--prompts", "shapes", "--out", f"{T}/user"],
     "not a study folder"),
    ("study create", "missing input", ["study", "create", "--model", f"a={T}/missing", "--model", f"b={T}/missing",
                                       "--prompts", "shapes", "--out", f"{T}/s"], "does not exist"),
    ("study create", "malformed value", ["study", "create", "--model", "bogus", "--prompts", "shapes", "--out",
                                         f"{T}/s"], "NAME=MODEL"),
    ("study create", "nan", ["study", "create", "--model", f"a={T}/missing:2:nan", "--model", f"b={T}/missing",
                             "--prompts", "shapes", "--out", f"{T}/s"], "guidance"),
    ("study create", "huge seed", ["study", "create", "--model", f"a={T}/missing", "--model", f"b={T}/missing",
                                   "--prompts", "shapes", "--seed", str(2**70), "--out", f"{T}/s"], "--seed"),
    ("study create", "missing prompt file", ["study", "create", "--model", f"a={T}/missing", "--model",
                                             f"b={T}/missing", "--prompts", f"{T}/missing.txt", "--out", f"{T}/s"],
     "does not exist"),
    ("study serve", "missing input", ["study", "serve", f"{T}/missing"], "does not exist"),
    ("study serve", "out of range", ["study", "serve", f"{T}/missing", "--port", "70000"], "--port"),
    ("study serve", "nan", ["study", "serve", f"{T}/missing", "--gold-share", "nan"], "--gold-share"),
    ("study serve", "zero count", ["study", "serve", f"{T}/missing", "--votes-per-annotator", "0"],
     "--votes-per-annotator"),
    ("study results", "missing input", ["study", "results", f"{T}/missing"], "does not exist"),
    ("study results", "unwritable output", ["study", "results", f"{T}/missing", "--json", f"{PROC}/r.json"],
     "system file"),
    ("study results", "wrong kind", ["study", "results", f"{T}/missing", "--html", f"{T}/dir"], "is a folder"),
    ("study results", "out of range", ["study", "results", f"{T}/missing", "--max-gold-failure", "2"],
     "--max-gold-failure"),
    ("study oracle", "missing input", ["study", "oracle", f"{T}/missing"], "does not exist"),
    ("study oracle", "huge number", ["study", "oracle", f"{T}/missing", "--annotators", "1e12"], "--annotators"),
    ("study oracle", "inf", ["study", "oracle", f"{T}/missing", "--repeat-share", "inf"], "--repeat-share"),
    # ---- no command / unknown flag
    ("(none)", "no command", [], "required"),
    ("generate", "unknown flag", ["generate", "x", "--model", f"{T}/missing", "--out", f"{T}/o.png", "--bogus"],
     "unrecognized"),
]


#: The input class of each row's kind (the kinds name the case; the classes are what the table must span).
CLASS_OF = {
    "missing input": "missing input", "missing prompt file": "missing input", "missing spec file": "missing input",
    "missing work folder": "missing input", "missing init folder": "missing input", "missing teacher": "missing input",
    "wrong kind": "wrong kind", "wrong kind input": "wrong kind", "parent is a file": "wrong kind",
    "not a png": "wrong kind", "wrong kind images": "wrong kind", "wrong kind work": "wrong kind",
    "not a model": "wrong kind", "no split student": "wrong kind",
    "unwritable output": "unwritable output",
    "existing non-model output": "existing non-model output",
    "nan": "nan / inf", "inf": "nan / inf", "nan in config": "nan / inf", "nan weights": "nan / inf",
    "nan ratios": "nan / inf",
    "negative number": "negative / zero", "negative seed": "negative / zero", "zero steps": "negative / zero",
    "zero batch": "negative / zero", "negative steps": "negative / zero", "negative lr": "negative / zero",
    "zero lr": "negative / zero", "negative weights": "negative / zero",
    "negative number in config": "negative / zero",
    "huge number": "huge / out of range", "huge seed": "huge / out of range", "huge steps": "huge / out of range",
    "huge seed in config": "huge / out of range", "huge count": "huge / out of range",
    "tiny step": "huge / out of range", "out of range": "huge / out of range",
    "bad student steps": "huge / out of range", "test split": "huge / out of range",
    "malformed file": "malformed file", "empty file": "malformed file", "not a mapping": "malformed file",
    "malformed weights": "malformed file",
    "non-UTF-8 file": "non-UTF-8 file",
    "unknown config key": "unknown key or name", "unknown preset": "unknown key or name",
    "unknown split": "unknown key or name", "unknown device": "unknown key or name",
    "unknown flag": "unknown key or name", "no command": "unknown key or name",
    "device absent": "device absent",
    "nan schedule": "nan / inf", "unordered schedule": "huge / out of range", "malformed value": "malformed file",
    "zero count": "negative / zero", "bad choice in config": "unknown key or name",
    "unknown shipped name": "unknown key or name", "missing option": "missing input",
}


def _materials(t: Path) -> None:
    (t / "file.txt").write_text("a user's file\n")
    (t / "dir").mkdir()
    (t / "dir.png").mkdir()
    (t / "user").mkdir()
    (t / "user" / "thesis.tex").write_text("years of work\n")
    (t / "student").mkdir()
    (t / "sweepout").mkdir()
    (t / "sweepout" / "student").mkdir()
    (t / "sweepout" / "student" / "notes.txt").write_text("mine\n")
    (t / "bad.yaml").write_text("flow: [1, 2\n")
    (t / "empty.yaml").write_text("# nothing here\n")
    (t / "list.yaml").write_text("- 1\n- 2\n")
    (t / "latin1.yaml").write_bytes("flow:\n  steps: 3 # caf\xe9\n".encode("latin-1"))
    (t / "unknown.yaml").write_text("flow:\n  stepz: 3\n")
    (t / "neglr.yaml").write_text("flow:\n  lr: -1e-4\n")
    (t / "nan.yaml").write_text("vae:\n  lr: .nan\n")
    (t / "seed.yaml").write_text(f"data_seed: {2**70}\n")
    (t / "latin1.txt").write_bytes("a red caf\xe9\n".encode("latin-1"))
    (t / "latin1.jsonl").write_bytes('{"category": "caf\xe9"}\n'.encode("latin-1"))
    (t / "bad.jsonl").write_text('{"category": \n')
    (t / "empty.txt").write_text("\n\n")


def _snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under ``roots`` with its kind and, for files, size and modification time (a folder's
    own time changes when a writability probe comes and goes; its entries are compared instead)."""
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                out[str(p)] = (True, 0, 0) if p.is_dir() else (False, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def bench(tmp_path, monkeypatch):
    t = tmp_path / "t"
    t.mkdir()
    _materials(t)
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("SD35FLASH_CACHE", str(cache))
    return t, cache


@pytest.mark.parametrize("command,kind,argv,needle", ROWS, ids=[f"{c}:{k}" for c, k, _, _ in ROWS])
def test_bad_input(bench, cli_in_process, command, kind, argv, needle):
    t, cache = bench
    argv = [a.replace("{t}", str(t)) for a in argv]
    before = _snapshot(t, cache)
    code, _, err = cli_in_process(*argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0, f"exit 0 for {argv}"
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert _snapshot(t, cache) == before, "files were created, deleted or changed"


def _commands() -> set[str]:
    """Every leaf command of the parser (``world check``, ``pretrain``, ...)."""
    parser = build_parser()
    names = set()
    for action in parser._subparsers._group_actions:  # argparse keeps subcommands here
        for name, sub in action.choices.items():
            nested = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]
            if nested:
                names |= {f"{name} {leaf}" for leaf in nested[0].choices}
            else:
                names.add(name)
    return names


def test_every_command_has_rows():
    covered = {c for c, *_ in ROWS}
    missing = _commands() - covered
    assert not missing, f"commands without bad-input rows: {sorted(missing)}"


def test_table_spans_the_input_classes():
    classes = {CLASS_OF[k] for _, k, *_ in ROWS}  # a KeyError: a new kind needs its class
    assert classes == set(CLASS_OF.values())
    commands = {c for c, *_ in ROWS if c != "(none)"}
    for cls in ("unwritable output", "wrong kind", "nan / inf", "huge / out of range"):
        # output, path and number checks are per command: most commands have a row of each
        with_rows = {c for c, k, *_ in ROWS if CLASS_OF[k] == cls}
        assert len(with_rows) >= len(commands) // 2, (cls, sorted(commands - with_rows))
