"""Real data for distillation: prompt sources (txt / jsonl / parquet / shapes), the rank-sharded prompt
order, the sharded embedding store (round trip = live encoding, resume, fingerprint refusal, 2 ranks)
and `sd35flash prepare` on a tiny pipeline (embeddings and teacher trajectories)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sd35flash.cli import main
from sd35flash.data.prompts import PromptDataset, file_prompts, load_prompts, shapes_prompts, write_prompts
from sd35flash.data.trajectories import TrajectoryStore
from sd35flash.distill.models import Conditioner
from sd35flash.errors import UserError
from sd35flash.models.resolution import latent_side
from sd35flash.sampling import PromptEmbeds, encode_prompts
from sd35flash.text.encoder import count_truncated, encoder_fingerprint
from sd35flash.text.store import EmbeddingStore, StoredConditioner, StoreLayout, write_index, write_shards
from sd35flash.world import canonical_prompt, split_specs

PROMPTS = ["a red circle", "two blue squares", "a large green triangle left of a yellow circle", "a red circle",
           "three small yellow squares"]


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    return tiny_pipeline()  # the same seeded weights as the conftest's `tiny_dir`


def _close(a: PromptEmbeds, b: PromptEmbeds) -> None:
    """allclose at the dtype of ``a`` (torch's default tolerances for that dtype)."""
    assert a.embeds.dtype == b.embeds.dtype
    torch.testing.assert_close(a.embeds, b.embeds.detach())
    torch.testing.assert_close(a.pooled, b.pooled.detach())


def _store(pipe, folder: Path, prompts=PROMPTS, dtype=torch.float32, shard_size=2, rank=0, world=1, calls=None):
    fp = encoder_fingerprint(pipe, True)
    layout = StoreLayout.plan(prompts, shard_size)

    def encode(ps):
        if calls is not None:
            calls.append(list(ps))
        return encode_prompts(pipe, ps)

    written = write_shards(encode, layout, folder, fp, dtype, batch_size=2, rank=rank, world_size=world)
    return layout, fp, written


# -- prompt sources ---------------------------------------------------------------------------------

def test_text_jsonl_and_shapes_sources(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n  two blue squares  \na red circle\n", encoding="utf-8")
    assert file_prompts(txt).prompts == ["a red circle", "two blue squares", "a red circle"]

    specs = split_specs("train", 3, seed=5)
    lines = [json.dumps({"prompt": "a red circle"}), json.dumps({"text": "two blue squares"}),
             json.dumps(specs[0].to_dict()), json.dumps({"prompt": "my words", **specs[1].to_dict()})]
    mixed = tmp_path / "m.jsonl"
    mixed.write_text("\n".join(lines) + "\n")
    src = file_prompts(mixed)
    assert src.prompts == ["a red circle", "two blue squares", canonical_prompt(specs[0]), "my words"]
    assert src.specs is None  # not every line has a scene
    only_specs = tmp_path / "s.jsonl"
    only_specs.write_text("\n".join(json.dumps(s.to_dict()) for s in specs) + "\n")
    assert file_prompts(only_specs).specs == specs

    shapes = load_prompts("shapes", 6, seed=3)
    assert shapes.prompts == shapes_prompts(6, seed=3).prompts and len(shapes.specs) == 6
    back = file_prompts(write_prompts(tmp_path / "prep" / "prompts.jsonl", shapes).parent)  # a prepare folder
    assert back.prompts == shapes.prompts and back.specs == shapes.specs


def test_parquet_source(tmp_path):
    from datasets import Dataset

    path = tmp_path / "p.parquet"
    Dataset.from_dict({"id": [1, 2, 3], "caption": ["a red circle", "", "two blue squares"],
                       "text": ["x", "y", "z"]}).to_parquet(str(path))
    assert file_prompts(path).prompts == ["x", "y", "z"]  # `text` when there is no `prompt` column
    assert file_prompts(path, column="caption").prompts == ["a red circle", "two blue squares"]  # empty rows skipped
    with pytest.raises(UserError, match=r"no column 'nope' \(columns: id, caption, text\)"):
        file_prompts(path, column="nope")
    with pytest.raises(UserError, match="holds int"):
        file_prompts(path, column="id")
    bare = tmp_path / "bare.parquet"
    Dataset.from_dict({"caption": ["a"]}).to_parquet(str(bare))
    with pytest.raises(UserError, match="no \"prompt\" or \"text\" column .*--prompt-column"):
        file_prompts(bare)


@pytest.mark.parametrize("name,content,match", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", b"\n \n", "holds no prompts"),
    ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"), "not UTF-8"),
    ("bad.jsonl", b'{"prompt": "a"}\n{oops\n', r"bad.jsonl:2 is not valid JSON"),
    ("field.jsonl", b'{"caption": "a"}\n', r"field.jsonl:1 needs a non-empty string field"),
    ("spec.jsonl", b'{"category": "single_object", "objects": [{"shape": "hexagon", "color": "red"}]}\n',
     r"spec.jsonl:1: .*hexagon"),
    ("junk.parquet", b"not parquet", "not a readable parquet file"),
])
def test_prompt_file_errors_are_one_line(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=match) as err:
        file_prompts(path)
    assert "\n" not in str(err.value)


def test_prompt_column_needs_parquet(tmp_path):
    (tmp_path / "p.txt").write_text("a\n")
    with pytest.raises(UserError, match="--prompt-column applies to .parquet"):
        file_prompts(tmp_path / "p.txt", column="caption")


def test_prompt_dataset_ranks_cover_every_prompt_once():
    prompts = [f"p{i}" for i in range(11)]
    ranks = [PromptDataset(prompts, rank=r, world_size=2, seed=4) for r in range(2)]
    for epoch in (0, 1):
        for d in ranks:
            d.set_epoch(epoch)
        got = [i for d in ranks for i, p in d if p == prompts[i]]
        assert sorted(got) == list(range(11))
        assert [len(d) for d in ranks] == [6, 5] == [len(d.indices()) for d in ranks]
    again = PromptDataset(prompts, rank=1, world_size=2, seed=4)
    assert again.indices(1) == ranks[1].indices(1)  # deterministic in (seed, epoch)
    assert again.indices(0) != again.indices(1)
    assert PromptDataset(prompts, rank=1, world_size=2, seed=5).indices(0) != again.indices(0)
    assert PromptDataset(prompts, rank=0, world_size=3, shuffle=False).indices() == [0, 3, 6, 9]


# -- the embedding store ------------------------------------------------------------------------------

def test_store_equals_live_encoding(pipe, tmp_path):
    layout, fp, written = _store(pipe, tmp_path / "fp32")
    assert written == [0, 1, 2] and layout.prompts[0] == "" and len(layout.prompts) == 5  # "" first, duplicates once
    write_index(tmp_path / "fp32", layout, fp, torch.float32, clip_length=12, use_t5=True)
    store = EmbeddingStore(tmp_path / "fp32", fingerprint=fp)
    live = encode_prompts(pipe, PROMPTS)
    got = store.get(PROMPTS)  # encoded in other batches than `live`: equal up to float rounding
    _close(got, live)
    assert list(store._handles) == [0, 1, 2]
    one = EmbeddingStore(tmp_path / "fp32")
    one.get(["two blue squares"])
    assert list(one._handles) == [1]  # lazily: only the shard that holds the prompt is opened

    no_t5 = encode_prompts(pipe, PROMPTS, use_t5=False)  # the T5-dropped variant from the same store
    got = store.get(PROMPTS, t5=False)
    _close(got, no_t5)
    assert torch.count_nonzero(got.embeds[:, 12:]) == 0
    neg = encode_prompts(pipe, [""])
    _close(store.negative(3), PromptEmbeds(neg.embeds.expand(3, -1, -1), neg.pooled.expand(3, -1)))

    # distillation's conditioning from the store equals the live conditioner's
    live_cond, stored = Conditioner(pipe), StoredConditioner(store)
    _close(stored.full(PROMPTS[:3], "cpu"), live_cond.full(PROMPTS[:3], "cpu"))
    _close(stored.uncond(2, "cpu"), live_cond.uncond(2, "cpu"))
    drop = torch.tensor([True, False, True])
    _close(stored.for_student(store.get(PROMPTS[:3]), drop),
           live_cond.for_student(live_cond.full(PROMPTS[:3], "cpu"), drop))

    layout, fp, _ = _store(pipe, tmp_path / "bf16", dtype=torch.bfloat16)
    write_index(tmp_path / "bf16", layout, fp, torch.bfloat16, clip_length=12, use_t5=True)
    half = EmbeddingStore(tmp_path / "bf16").get(PROMPTS)
    assert half.embeds.dtype == torch.bfloat16 and half.pooled.dtype == torch.bfloat16
    _close(half, live.to(torch.bfloat16))  # allclose at the stored dtype
    size = {d: (tmp_path / d / layout.name(0)).stat().st_size for d in ("bf16", "fp32")}
    assert size["bf16"] < 0.6 * size["fp32"]
    with pytest.raises(UserError, match="not in the embedding store"):
        store.get(["a purple diamond"])


def test_store_refuses_other_text_encoders(pipe, tiny_pipeline, tmp_path):
    layout, fp, _ = _store(pipe, tmp_path)
    write_index(tmp_path, layout, fp, torch.float32, clip_length=12, use_t5=True)
    other = tiny_pipeline()
    with torch.no_grad():
        other.text_encoder_2.text_projection.weight.mul_(1.01)
    assert encoder_fingerprint(other, True) != fp and encoder_fingerprint(pipe, False) != fp
    with pytest.raises(UserError, match="built with other text encoders") as err:
        EmbeddingStore(tmp_path, fingerprint=encoder_fingerprint(other, True))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not a finished embedding store"):
        EmbeddingStore(tmp_path / "nothing")


def test_two_ranks_write_every_prompt_exactly_once(pipe, tmp_path):
    calls = {0: [], 1: []}
    layout, fp, w0 = _store(pipe, tmp_path, rank=0, world=2, calls=calls[0])
    with pytest.raises(RuntimeError, match="not written yet"):
        write_index(tmp_path, layout, fp, torch.float32, clip_length=12, use_t5=True)
    _, _, w1 = _store(pipe, tmp_path, rank=1, world=2, calls=calls[1])
    assert w0 == [0, 2] and w1 == [1]
    encoded = [p for r in (0, 1) for chunk in calls[r] for p in chunk]
    assert sorted(encoded) == sorted(layout.prompts)  # each unique prompt encoded once, by one rank
    write_index(tmp_path, layout, fp, torch.float32, clip_length=12, use_t5=True)
    layout1, _, _ = _store(pipe, tmp_path / "one")
    write_index(tmp_path / "one", layout1, fp, torch.float32, clip_length=12, use_t5=True)
    two_ranks, one_rank = EmbeddingStore(tmp_path).get(PROMPTS), EmbeddingStore(tmp_path / "one").get(PROMPTS)
    assert torch.equal(two_ranks.embeds, one_rank.embeds) and torch.equal(two_ranks.pooled, one_rank.pooled)


def test_resume_skips_finished_shards_and_rebuilds_a_broken_one(pipe, tmp_path):
    layout, fp, _ = _store(pipe, tmp_path)
    write_index(tmp_path, layout, fp, torch.float32, clip_length=12, use_t5=True)
    before = EmbeddingStore(tmp_path).get(PROMPTS)
    broken = tmp_path / layout.name(1)
    broken.write_bytes(broken.read_bytes()[:100])  # a damaged shard
    (tmp_path / f".{layout.name(2)}.tmp-999").write_bytes(b"partial")  # a killed writer's temporary file
    calls: list = []
    _, _, written = _store(pipe, tmp_path, calls=calls)
    assert written == [1] and sorted(p for c in calls for p in c) == sorted(layout.shard_prompts(1))
    assert not list(tmp_path.glob(".*.tmp-*"))
    after = EmbeddingStore(tmp_path).get(PROMPTS)
    assert torch.equal(after.embeds, before.embeds)
    # a shard written for other prompts (a changed prompt file) is stale and rebuilt
    _, _, written = _store(pipe, tmp_path, prompts=PROMPTS[:4] + ["one green circle"], calls=calls)
    assert written == [2]


# -- resolution and truncation --------------------------------------------------------------------------

def test_latent_side_checks_the_position_table():
    medium = {"sample_size": 128, "patch_size": 2, "pos_embed_max_size": 384}
    vae = {"block_out_channels": [128, 256, 512, 512]}
    assert latent_side(medium, vae, 1024) == 128 and latent_side(medium, vae, 512) == 64
    assert latent_side(medium, vae, None) == 128
    assert latent_side(medium, vae, 6144) == 768
    with pytest.raises(UserError, match="larger than .*6144 px"):
        latent_side(medium, vae, 6160)
    with pytest.raises(UserError, match="multiple of 16"):
        latent_side(medium, vae, 1000)


def test_count_truncated(pipe):
    long = " ".join(["red circle"] * 10)
    assert count_truncated(pipe, ["a red circle", long, long]) == {"clip": 2, "t5": 2}


# -- the CLI --------------------------------------------------------------------------------------------

def test_prepare_cli_embeddings_trajectories_and_resume(pipe, tiny_dir, tmp_path, capsys):
    from sd35flash.config import merge
    from sd35flash.distill.config import load_distill_config
    from sd35flash.distill.trajectory import build_bank

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS + [" ".join(["blue square"] * 8)]) + "\n")
    out = tmp_path / "prep"
    args = ["prepare", "--teacher", str(tiny_dir), "--prompts", str(prompts), "--out", str(out), "--dtype", "fp32",
            "--shard-size", "3", "--batch", "2", "--preset", "smoke", "--set", "trajectory.num_trajectories=5",
            "--trajectories", "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "1 of 6 prompts are longer than CLIP's 12 tokens" in text and "(2 shards, 2 written now)" in text
    manifest = json.loads((out / "prepare.json").read_text())
    assert manifest["resolution"] == 32 and manifest["num_prompts"] == 6 and manifest["dtype"] == "fp32"
    assert file_prompts(out).prompts == file_prompts(prompts).prompts

    got = EmbeddingStore(out / "embeds", fingerprint=encoder_fingerprint(pipe, True)).get(PROMPTS)
    _close(got, encode_prompts(pipe, PROMPTS))

    # trajectories equal distill's own bank (live encoders, same seeds), across 2 shards
    cfg = merge(load_distill_config("smoke"), {"trajectory": {"num_trajectories": 5}})
    bank_prompts = [file_prompts(prompts).prompts[m % 6] for m in range(5)]
    cond = Conditioner(pipe)
    ref = build_bank(pipe.transformer, lambda ps: cond.full(ps, "cpu"), lambda b: cond.uncond(b, "cpu"), bank_prompts,
                     cfg.student_schedule(3.0), cfg.trajectory.teacher_steps, 3.0, cfg.guidance, (4, 8, 8),
                     cfg.runtime.seed * 1_000_003 + 17, batch_size=4, device="cpu")
    traj = TrajectoryStore(out / "trajectories", settings=manifest["trajectories"])
    assert traj.prompts == ref.prompts and traj.schedule == ref.schedule
    assert len(traj.index["shards"]) == 2
    torch.testing.assert_close(traj.states, ref.states, rtol=0, atol=1e-5)
    torch.testing.assert_close(traj.rows([4, 1]), ref.states[[4, 1]], rtol=0, atol=1e-5)

    # what distillation reads: the same trajectory-guidance loss as from live encoders and distill's own bank
    from sd35flash.data.prepared import open_prepared
    from sd35flash.distill.trajectory import tg_loss

    prepared = open_prepared(out, fingerprint=encoder_fingerprint(pipe, True),
                             trajectory_settings=manifest["trajectories"])
    stored = prepared.conditioner(torch.float32)
    assert prepared.prompts().prompts == file_prompts(prompts).prompts
    idx, step = torch.tensor([3, 0, 4]), torch.tensor([0, 2, 3])
    with torch.no_grad():
        from_store = tg_loss(pipe.transformer, prepared.trajectories.rows(idx), step, ref.schedule,
                             stored.full([bank_prompts[i] for i in idx], "cpu"))
        live_loss = tg_loss(pipe.transformer, ref.states[idx], step, ref.schedule,
                            cond.full([bank_prompts[i] for i in idx], "cpu"))
    torch.testing.assert_close(from_store, live_loss)
    with pytest.raises(UserError, match="built with other settings .*guidance"):
        open_prepared(out, trajectory_settings={**manifest["trajectories"], "guidance": 2.0})

    assert main(args) == 2
    assert "already holds prepared data; pass --resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert "(2 shards, 0 written now)" in capsys.readouterr().out
    assert main(args + ["--dtype", "bf16", "--resume"]) == 2  # --dtype given twice: the last wins
    assert "prepared with other settings (dtype" in capsys.readouterr().err


@pytest.mark.parametrize("extra,match", [
    (["--resolution", "48"], "larger than this model's position table allows (32 px"),
    (["--resolution", "20"], "multiple of 8"),
    (["--prompts", "missing.txt"], "prompt file missing.txt does not exist"),
    (["--teacher", "no-such-folder"], "'no-such-folder' is neither an existing folder nor a shipped model"),
    (["--set", "num_promts=3"], "num_promts"),
])
def test_prepare_cli_bad_input(tiny_dir, tmp_path, capsys, monkeypatch, extra, match):
    monkeypatch.chdir(tmp_path)
    args = ["prepare", "--teacher", str(tiny_dir), "--prompts", "shapes", "--out", str(tmp_path / "o"),
            "--preset", "smoke", "--no-progress", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_prepare_cli_no_t5_parquet_column_and_resolution(pipe, tiny_dir, tmp_path, capsys):
    from datasets import Dataset

    table = tmp_path / "p.parquet"
    Dataset.from_dict({"caption": PROMPTS}).to_parquet(str(table))
    out = tmp_path / "prep"
    assert main(["prepare", "--teacher", str(tiny_dir), "--prompts", str(table), "--prompt-column", "caption",
                 "--out", str(out), "--no-t5", "--resolution", "16", "--no-progress"]) == 0
    manifest = json.loads((out / "prepare.json").read_text())
    assert manifest["use_t5"] is False and manifest["latent_side"] == 4 and manifest["dtype"] == "bf16"
    store = EmbeddingStore(out / "embeds", fingerprint=encoder_fingerprint(pipe, False))
    got = store.get(PROMPTS)
    assert got.embeds.dtype == torch.bfloat16 and torch.count_nonzero(got.embeds[:, 12:]) == 0
    _close(got, encode_prompts(pipe, PROMPTS, use_t5=False).to(torch.bfloat16))
    with pytest.raises(UserError, match="built without T5"):
        store.get(PROMPTS, t5=True)
    with pytest.raises(UserError, match="other text encoders"):
        EmbeddingStore(out / "embeds", fingerprint=encoder_fingerprint(pipe, True))
