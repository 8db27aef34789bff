"""Stage 2, split-timestep fine-tuning: branches see only their own times, exact resume, merging is
an interpolation, unmerged students route every step to its branch, the merge-ratio sweep, and
one-line errors for bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from sd35flash.cli import main
from sd35flash.config import merge
from sd35flash.distill import run as distill_run
from sd35flash.distill.config import load_distill_config
from sd35flash.distill.trainer import DistillTrainer
from sd35flash.errors import ConfigError, StopTraining, UserError
from sd35flash.models.branches import BranchRouter, memory_report, resolve_variant, sampling_transformer
from sd35flash.models.merge import merge_state_dicts, merged_transformer, ratio_weights
from sd35flash.models.pipeline_io import load_pipeline
from sd35flash.models.student_info import read_student_info
from sd35flash.sampling import generate
from sd35flash.train.checkpoint import CheckpointManager
from sd35flash.train.ema import anchored_ema

RANGES = [(0.5, 1.0), (0.0, 0.5)]
TIMES = [1.0, 0.9, 0.75, 0.5]


def _cfg():
    cfg = load_distill_config("smoke")  # trajectory 2, DMD 2, split 2 steps
    assert cfg.split.steps == 2 and cfg.split.boundaries == [0.5]
    return cfg


class RecordingTrainer(DistillTrainer):
    """Records the time of every forward pass each branch runs, and whether it carried gradients."""

    last: RecordingTrainer | None = None

    def _setup_branches(self) -> None:
        super()._setup_branches()
        self.seen: list[list[tuple[float, bool]]] = [[] for _ in self.branches]
        self.hooks = []
        for b, mod in enumerate(self.branches):
            def hook(module, args, kwargs, b=b):
                ts = (kwargs["timestep"] / 1000.0).tolist()
                self.seen[b].extend((round(t, 6), torch.is_grad_enabled()) for t in ts)
            self.hooks.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        RecordingTrainer.last = self


@pytest.fixture(scope="module")
def split_run(smoke_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("split") / "student"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill_run, "DistillTrainer", RecordingTrainer)
        distill_run.distill(_cfg(), str(smoke_teacher), out, progress=False)
    trainer = RecordingTrainer.last
    for h in trainer.hooks:
        h.remove()
    return out, trainer.seen


def _state(folder, sub="transformer"):
    from safetensors.torch import load_file

    return load_file(str(folder / sub / "diffusion_pytorch_model.safetensors"))


def test_branches_only_see_their_own_times(split_run):
    _, seen = split_run
    for (lo, hi), calls in zip(RANGES, seen):
        times = {t for t, _ in calls}
        assert calls and all(lo < t <= hi for t in times), (lo, hi, sorted(times))
        assert any(grad for _, grad in calls)  # the branch's own training step ran
        assert all(lo < t <= hi for t, grad in calls if grad)
    assert {t for t, _ in seen[0]} <= {1.0, 0.9, 0.75} and {t for t, _ in seen[1]} == {0.5}


def test_split_folder_layout_and_merge(split_run):
    out, _ = split_run
    info = read_student_info(out)
    assert info.split is not None and [b.subfolder for b in info.split.branches] == ["transformer_branch0",
                                                                                       "transformer_branch1"]
    assert [(b.t_min, b.t_max) for b in info.split.branches] == RANGES
    assert info.split.merge_weights == pytest.approx([0.7, 0.3]) and info.split.presplit == "transformer_presplit"
    b0, b1, merged, pre = (_state(out, s) for s in ("transformer_branch0", "transformer_branch1", "transformer",
                                                    "transformer_presplit"))
    expect = merge_state_dicts([b0, b1], info.split.merge_weights)
    assert all(torch.allclose(merged[k], expect[k], atol=1e-6) for k in merged)
    assert any(not torch.equal(b0[k], b1[k]) for k in b0)  # the branches were trained apart
    assert any(not torch.equal(b0[k], pre[k]) for k in b0)
    pipe = StableDiffusion3Pipeline.from_pretrained(out)  # stock diffusers loads the merged transformer
    assert all(torch.equal(p, merged[k]) for k, p in pipe.transformer.state_dict().items())
    mem = memory_report(out)
    assert mem["unmerged_bytes"] == 2 * mem["merged_bytes"] and mem["unmerged_over_merged"] == 2.0


def test_merge_is_an_interpolation(smoke_teacher):
    a = load_pipeline(smoke_teacher).transformer
    b = copy.deepcopy(a)
    c = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p))
        for p in c.parameters():
            p.mul_(-2.0)
    sa, sb = a.state_dict(), b.state_dict()
    for r, want in ((0.0, sa), (1.0, sb)):
        got = merged_transformer([a, b], ratio_weights(r)).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), r  # exactly the branch
    mid = merged_transformer([a, b], ratio_weights(0.5)).state_dict()
    assert all(torch.allclose(mid[k], (sa[k] + sb[k]) / 2, atol=1e-7, rtol=0) for k in sa)
    third = merge_state_dicts([sa, sb, c.state_dict()], [0.2, 0.3, 0.5])
    k = next(iter(sa))
    assert torch.allclose(third[k], 0.2 * sa[k] + 0.3 * sb[k] + 0.5 * c.state_dict()[k], atol=1e-6)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(UserError, match="outside"):
            ratio_weights(bad)
    with pytest.raises(UserError, match="summing to 1"):
        merge_state_dicts([sa, sb], [0.5, 0.6])


def test_anchored_ema_keeps_the_start():
    lin = torch.nn.Linear(3, 2)
    w0 = [p.detach().clone() for p in lin.parameters()]
    ema = anchored_ema(lin.parameters(), 0.9)
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(1.0)
    for _ in range(5):
        ema.step(lin.parameters())
    for s, p0, p in zip(ema.shadow_params, w0, lin.parameters()):  # 0.9^5 of the start remains
        assert torch.allclose(s, 0.9**5 * p0 + (1 - 0.9**5) * p, atol=1e-6)


def test_unmerged_student_routes_every_step_to_its_branch(split_run):
    out, _ = split_run
    pipe = load_pipeline(out)
    router = sampling_transformer(pipe, out, "unmerged")
    assert isinstance(router, BranchRouter) and len(router.modules) == 2
    seen: list[list[float]] = [[], []]
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw, b=b: seen[b].extend((kw["timestep"] / 1000).tolist()),
                                         with_kwargs=True) for b, m in enumerate(router.modules)]
    sched = TIMES + [0.0]
    imgs = generate(pipe, ["a red circle", "a blue square"], [0, 1], sched, transformer=router)
    for h in hooks:
        h.remove()
    assert sorted({round(t, 6) for t in seen[0]}, reverse=True) == [1.0, 0.9, 0.75]
    assert {round(t, 6) for t in seen[1]} == {0.5}
    assert len(seen[0]) == 3 * 2 and len(seen[1]) == 2  # every step ran exactly once per image
    merged = generate(pipe, ["a red circle", "a blue square"], [0, 1], sched)
    assert not (imgs == merged).all()


def test_resume_through_the_split_stage(smoke_teacher, split_run, tmp_path):
    straight, _ = split_run
    out = tmp_path / "resumed"
    with pytest.raises(StopTraining):  # TG 2 + DMD 2 + one of the two split steps
        distill_run.distill(_cfg(), str(smoke_teacher), out, progress=False, stop_at=5)
    distill_run.distill(_cfg(), str(smoke_teacher), out, progress=False, resume=True)
    for sub in ("transformer", "transformer_branch0", "transformer_branch1", "transformer_presplit"):
        a, b = _state(straight, sub), _state(out, sub)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), sub


def test_presplit_equals_a_run_without_stage_2(smoke_teacher, split_run, tmp_path):
    """Stage 2 does not disturb stages 0-1: the kept pre-split student is the student a run with
    ``split.steps: 0`` exports (so the no-split ablation needs no second run)."""
    straight, _ = split_run
    out = distill_run.distill(merge(_cfg(), {"split": {"steps": 0}}), str(smoke_teacher), tmp_path / "nosplit",
                              progress=False)
    assert read_student_info(out).split is None and not (out / "transformer_branch0").exists()
    a, b = _state(straight, "transformer_presplit"), _state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # --init-from: stage 2 started from that run's end-of-stage-1 checkpoint is the straight run
    work = json.loads((out / "sd35flash.json").read_text())["extra"]["work_dir"]
    init = distill_run.distill(_cfg(), str(smoke_teacher), tmp_path / "init", progress=False, init=work)
    for sub in ("transformer", "transformer_branch0", "transformer_branch1", "transformer_presplit"):
        a, b = _state(straight, sub), _state(init, sub)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), sub
    other = merge(_cfg(), {"dmd": {"timestep_sharing": False}})
    with pytest.raises(UserError, match="dmd.timestep_sharing"):  # only the split section may differ
        distill_run.distill(other, str(smoke_teacher), tmp_path / "bad", progress=False, init=work)
    with pytest.raises(UserError, match="not a distillation work folder"):
        distill_run.distill(_cfg(), str(smoke_teacher), tmp_path / "bad2", progress=False, init=tmp_path)


def test_a_finished_split_run_keeps_its_stage_1_end_for_another_stage_2(smoke_teacher, split_run, tmp_path):
    """keep_presplit_checkpoint: the end of stage 1 (step 4, not a checkpoint_every multiple) survives
    the pruning of stage 2, so a longer stage 2 starts from it with `--init-from`; without the option
    it is pruned, and --init-from says why."""
    straight, _ = split_run
    work = Path(json.loads((straight / "sd35flash.json").read_text())["extra"]["work_dir"])
    manager = CheckpointManager(work / "checkpoints")
    assert [manager.step_of(p) for p in manager.all()] == [4, 6]
    longer = distill_run.distill(merge(_cfg(), {"split": {"steps": 3}}), str(smoke_teacher), tmp_path / "longer",
                                 progress=False, init=str(work))
    a, b = _state(straight, "transformer_presplit"), _state(longer, "transformer_presplit")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_student_info(longer).extra["config"]["split"]["steps"] == 3
    a, b = _state(straight, "transformer_branch1"), _state(longer, "transformer_branch1")
    assert any(not torch.allclose(a[k], b[k]) for k in a)  # one more split step moved the branch
    bare = merge(_cfg(), {"keep_presplit_checkpoint": False})
    out = distill_run.distill(bare, str(smoke_teacher), tmp_path / "bare", progress=False)
    bare_work = Path(json.loads((out / "sd35flash.json").read_text())["extra"]["work_dir"])
    assert [manager.step_of(p) for p in CheckpointManager(bare_work / "checkpoints").all()] == [6]
    with pytest.raises(UserError, match="no checkpoint at the end of stage 1"):
        distill_run.distill(merge(bare, {"split": {"steps": 3}}), str(smoke_teacher), tmp_path / "x",
                            progress=False, init=str(bare_work))


def _one_line(capsys, *needles):
    err = [ln for ln in capsys.readouterr().err.strip().splitlines()
           if ln.strip() and "it/s]" not in ln and not ln.startswith("Loading")]
    assert len(err) == 1, err
    for n in needles:
        assert n in err[0], err[0]


def test_merge_sweep_and_merge_cli(split_run, tmp_path, capsys):
    out, _ = split_run
    sweep = tmp_path / "sweep"
    assert main(["merge-sweep", "--student", str(out), "--ratios", "0,1", "--num-images", "2", "--out",
                 str(sweep)]) == 0
    res = json.loads((sweep / "sweep.json").read_text())
    assert [p["ratio"] for p in res["points"]] == [0.0, 1.0] and res["chosen_ratio"] in (0.0, 1.0)
    assert all(p["fd_effnet"] is not None and 0 <= p["alignment"]["overall"] <= 1 for p in res["points"])
    assert (sweep / "sweep.png").stat().st_size > 0
    chosen = read_student_info(sweep / "student")
    r = res["chosen_ratio"]
    assert chosen.split.merge_weights == [1 - r, r] and chosen.extra["merge"]["selected_on"] == "val"
    branch = _state(out, "transformer_branch1" if r == 1.0 else "transformer_branch0")
    got = _state(sweep / "student")
    assert all(torch.equal(got[k], branch[k]) for k in branch)  # ratio 0 / 1 is exactly that branch
    capsys.readouterr()
    # an unmerged folder: auto routes each step, and eval reports the memory of both branches
    um = tmp_path / "unmerged"
    assert main(["merge", "--student", str(out), "--ratio", "0.5", "--out", str(um), "--unmerged"]) == 0
    assert resolve_variant(um) == "unmerged" and resolve_variant(um, "merged") == "merged"
    assert main(["generate", "--model", str(um), "a red circle", "--out", str(tmp_path / "g.png")]) == 0
    assert main(["eval", "--model", str(um), "--split", "val", "--num-images", "2", "--no-fd", "--json",
                 str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["variant"] == "unmerged" and e["transformer_bytes"] == memory_report(um)["unmerged_bytes"]
    capsys.readouterr()
    for split in ("test", "heldout"):
        assert main(["merge-sweep", "--student", str(out), "--split", split, "--out", str(tmp_path / "s2")]) == 2
        _one_line(capsys, "val", f"--split {split}")
    assert main(["merge-sweep", "--student", str(out), "--ratios", "0:1.5:0.5", "--out", str(tmp_path / "s2")]) == 2
    _one_line(capsys, "1.5 is outside [0, 1]")
    assert main(["merge", "--student", str(out), "--ratio", "-0.2", "--out", str(tmp_path / "m")]) == 2
    _one_line(capsys, "outside [0, 1]")
    assert main(["eval", "--model", str(out), "--split", "val",
                 "--num-images", "1", "--variant", "nope", "--json", str(tmp_path / "x.json")]) == 2
    _one_line(capsys, "unknown variant")


def test_split_config_errors(smoke_teacher, tmp_path, capsys):
    with pytest.raises(ConfigError, match="merge_ratio"):
        merge(_cfg(), {"split": {"merge_ratio": 1.2}})
    with pytest.raises(ConfigError, match="boundaries"):
        merge(_cfg(), {"split": {"boundaries": [0.3, 0.6]}})
    with pytest.raises(ConfigError, match="holds none of the student times"):
        merge(_cfg(), {"student_steps": 2}).branch_steps(3.0)  # 2-step times 1 and 0.75 both lie above 0.5
    assert main(["distill", "--teacher", str(smoke_teacher), "--out", str(tmp_path / "o"), "--preset", "smoke",
                 "--student-steps", "2", "--no-progress"]) == 2
    _one_line(capsys, "holds none of the student times")
    assert merge(_cfg(), {"split": {"steps": 0}}).branch_steps(3.0) == [[0, 1, 2], [3]]


def test_branch_distances_are_logged_along_stage_two(split_run):
    """``split{b}/drift`` and ``split/gap`` (relative weight distances) are logged on the stage-2
    steps, positive, and obey the triangle inequality; stage-1 steps do not carry them."""
    out, _ = split_run
    work = read_student_info(out).extra["work_dir"]
    rows = [json.loads(line) for line in open(f"{work}/metrics.jsonl")]
    split = [r for r in rows if "split/gap" in r]
    cfg = _cfg()
    start = cfg.trajectory.steps + cfg.fake.warmup_steps + cfg.student.steps
    assert [r["step"] for r in split] == list(range(start + 1, start + cfg.split.steps + 1))
    assert all("split/gap" not in r for r in rows if r["step"] <= start)
    for r in split:
        d0, d1, gap = r["split0/drift"], r["split1/drift"], r["split/gap"]
        assert 0 < d0 < 0.5 and 0 < d1 < 0.5 and 0 < gap <= d0 + d1 + 1e-6
        assert abs(d0 - d1) <= gap + 1e-6


def test_branch_report_and_the_raw_student(split_run, tmp_path, capsys):
    """The report's raw distances are the ones logged at the last step; the anchored EMA branches
    (2 steps at decay 0.5: a quarter of each is still the pre-split student) moved less than the raw
    ones; ``--raw-out`` writes a student whose branches are the checkpoint's raw weights and whose
    ``transformer/`` is their merge."""
    from sd35flash.distill.branch_report import main as report_main

    out, _ = split_run
    info = read_student_info(out)
    rows = [json.loads(line) for line in open(f"{info.extra['work_dir']}/metrics.jsonl")]
    last = [r for r in rows if "split/gap" in r][-1]
    raw = tmp_path / "raw"
    assert report_main([str(out), "--json", str(tmp_path / "b.json"), "--raw-out", str(raw)]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["raw_step"] == last["step"]
    for key in ("drift0", "drift1", "gap"):
        metric = {"drift0": "split0/drift", "drift1": "split1/drift", "gap": "split/gap"}[key]
        assert res["raw"][key] == pytest.approx(last[metric], rel=1e-3)
        assert 0 < res["ema"][key] < res["raw"][key]
    b0, b1, merged = (_state(raw, s) for s in ("transformer_branch0", "transformer_branch1", "transformer"))
    expect = merge_state_dicts([b0, b1], info.split.merge_weights)
    assert all(torch.allclose(merged[k], expect[k], atol=1e-6) for k in merged)
    assert any(not torch.equal(b0[k], _state(out, "transformer_branch0")[k]) for k in b0)
    assert read_student_info(raw).extra["raw_branches"]["checkpoint_step"] == last["step"]
    assert "raw student" in capsys.readouterr().out
    assert report_main([str(out), "--raw-out", str(raw)]) == 0  # a model folder is replaced
    capsys.readouterr()
    assert report_main([str(tmp_path), "--no-checkpoint"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a split-timestep student" in err
