"""The command line: bad input gets one line and a non-zero exit; a smoke pretrain + eval runs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd35flash.cli import main


def run_cli(*args: str, env_cache: Path | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    if env_cache is not None:
        env["SD35FLASH_CACHE"] = str(env_cache)
    return subprocess.run([sys.executable, "-m", "sd35flash", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _one_line_error(code: int, stderr: str, *needles: str) -> None:
    assert code != 0
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and "torchvision" not in ln]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs_get_one_line(tmp_path, smoke_teacher, cli_in_process):
    """The first case runs as its own process (the whole stderr of a fresh interpreter is one line);
    the rest run ``main`` in this process, with the same checks."""
    res = run_cli("eval", "--model", str(tmp_path / "nope"), "--split", "test", "--json", str(tmp_path / "o.json"))
    _one_line_error(res.returncode, res.stderr, "does not exist")

    def here(*args: str, needle: str) -> None:
        code, _, err = cli_in_process(*args)
        _one_line_error(code, err, needle)

    (tmp_path / "notsd3").mkdir()
    (tmp_path / "notsd3" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    here("generate", "--model", str(tmp_path / "notsd3"), "a red circle", "--out", str(tmp_path / "x.png"),
         needle="not an SD3 pipeline")
    here("generate", "--model", str(smoke_teacher), "", "--out", str(tmp_path / "x.png"), needle="empty")
    here("generate", "--model", str(smoke_teacher), "a red circle", "--steps", "0", "--out", str(tmp_path / "x.png"),
         needle="--steps must be >= 1")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "single_object", "objects": [{"shape": "circle", "color": "red", "size": null}]}\n'
                   '{"category": "single_object", "objects": [{"shape": "hexagon", "color": "red", "size": null}]}\n')
    here("eval", "--model", str(smoke_teacher), "--specs", str(bad), "--json", str(tmp_path / "o.json"), needle=":2")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("flow:\n  stepz: 3\n")
    here("pretrain", "--config", str(cfg), "--out", str(tmp_path / "t"), needle="flow.stepz")
    here("pretrain", "--preset", "gigantic", "--out", str(tmp_path / "t"), needle="unknown preset")
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "x.png").exists()


def test_generate_and_eval_smoke(tmp_path, smoke_teacher):
    out = tmp_path / "one.png"
    assert main(["generate", "--model", str(smoke_teacher), "--steps", "3", "a large red circle",
                 "--out", str(out)]) == 0
    assert np.asarray(Image.open(out)).shape == (64, 64, 3)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n\ntwo blue squares\n")
    assert main(["generate", "--model", str(smoke_teacher), "--steps", "2", "--prompts", str(prompts),
                 "--out", str(tmp_path / "grid.png")]) == 0
    specs = tmp_path / "s.jsonl"
    assert main(["world", "specs", "--split", "heldout", "--num", "3", "--out", str(specs)]) == 0
    js = tmp_path / "e.json"
    assert main(["eval", "--model", str(smoke_teacher), "--steps", "2", "--guidance", "2", "--specs", str(specs),
                 "--num-images", "5", "--json", str(js), "--save-images", str(tmp_path / "imgs")]) == 0
    res = json.loads(js.read_text())
    for key in ("fd_effnet", "seconds_per_image", "nfe_per_image", "num_images", "steps", "guidance", "model"):
        assert key in res
    assert res["num_images"] == 5 and res["nfe_per_image"] == 4
    assert 0.0 <= res["alignment"]["overall"] <= 1.0 and res["fd_effnet"] > 0
    assert res["fd_effnet_se"] > 0 and 0 < res["fd_effnet_mean_term"] < res["fd_effnet"]
    manifest = [json.loads(x) for x in (tmp_path / "imgs" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 5 and (tmp_path / "imgs" / manifest[0]["file"]).is_file()
    # --specs cycles in file order
    spec_lines = [json.loads(x) for x in specs.read_text().splitlines()]
    assert [m["spec"] for m in manifest] == [spec_lines[i % 3] for i in range(5)]
    assert Path(res["grid"]).is_file()


def test_report_lists_every_model(tmp_path, smoke_teacher):
    from sd35flash.evaluate.evaluator import EvalRequest, evaluate
    from sd35flash.evaluate.report import write_report

    results = {}
    for name, steps in (("teacher-3step", 3), ("teacher-1step", 1)):
        req = EvalRequest(model=str(smoke_teacher), steps=steps, guidance=2.0, split="test", num_images=5, fd=False)
        results[name] = evaluate(req, tmp_path / f"{name}.json", progress=False)
    page = write_report(tmp_path / "report", "smoke", results, {"teacher": tmp_path / "missing.jsonl"})
    html = page.read_text()
    for name in results:
        assert name in html and (tmp_path / "report" / f"grid-{name}.png").is_file()
    assert (tmp_path / "report" / "categories.png").is_file()
    assert (tmp_path / "report" / "alignment_vs_nfe.png").is_file()


def test_set_overrides_parse_to_a_nested_mapping():
    from sd35flash.config import parse_overrides
    from sd35flash.errors import ConfigError

    overrides = ["dmd.timestep_sharing=false", "student.lr=1.0e-4", "gan.blocks=[0, -1]", "student_steps=2"]
    assert parse_overrides(overrides) == {
        "dmd": {"timestep_sharing": False}, "student": {"lr": 1e-4}, "gan": {"blocks": [0, -1]}, "student_steps": 2}
    for bad in ("nokey", "=3", "a..b=1", "a=[1,"):
        with pytest.raises(ConfigError):
            parse_overrides([bad])
    with pytest.raises(ConfigError):
        parse_overrides(["dmd=1", "dmd.weight=2"])
