"""A simulated annotator for shapes-world studies: it votes through the HTTP API like a person would.

For each pair it judges both images against the prompt's spec with the shapes-world judge and picks
the image the judge accepts; when both or neither are accepted it picks left or right at random. Its
votes land in the study's database like any annotator's, so ``study results`` rates them end to end.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import db
from .folder import StudyFolder


def oracle_choice(left_ok: bool, right_ok: bool, rng: random.Random) -> str:
    """``left`` / ``right`` for the one image the judge accepts, otherwise a fair coin."""
    if left_ok != right_ok:
        return "left" if left_ok else "right"
    return rng.choice(("left", "right"))


def run_oracle(study_dir: str | Path, annotators: int = 8, seed: int = 0,
               protocol: db.Protocol | None = None) -> dict[str, int]:
    """Let ``annotators`` simulated annotators finish their queues; returns vote counts."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from ..world import SceneSpec, judge
    from .app import create_app

    folder = StudyFolder(study_dir)
    manifest = folder.manifest()
    specs = {p["text"]: SceneSpec.from_dict(p["spec"]) for p in manifest["prompts"] if p.get("spec")}
    if not specs:
        raise UserError(f"{study_dir} has no shapes-world prompts; the oracle needs specs to judge against")
    rng = random.Random(seed)
    verdicts: dict[tuple[str, str], bool] = {}
    counts = {"annotators": 0, "votes": 0}
    with TestClient(create_app(folder.root, protocol)) as client:
        invite = folder.invite_code()

        def accepted(url: str, prompt: str) -> bool:
            key = (url, prompt)
            if key not in verdicts:
                r = client.get(url)
                r.raise_for_status()
                img = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
                verdicts[key] = bool(judge(img, specs[prompt]).correct)
            return verdicts[key]

        for _ in range(annotators):
            ann = client.post("/api/session", json={"invite": invite}).json()["annotator"]
            counts["annotators"] += 1
            while True:
                r = client.get("/api/next", params={"annotator": ann})
                if r.status_code == 204:
                    break
                pair = r.json()
                choice = oracle_choice(accepted(pair["left"], pair["prompt"]), accepted(pair["right"], pair["prompt"]),
                                       rng)
                v = client.post("/api/vote", json={"annotator": ann, "pair_id": pair["pair_id"], "choice": choice})
                v.raise_for_status()
                counts["votes"] += 1
    return counts
