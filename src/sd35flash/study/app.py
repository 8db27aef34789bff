"""The study web app (FastAPI): the annotator page, the admin page and the HTTP API they use.

| request | body or parameters | answer |
|---|---|---|
| ``POST /api/session`` | ``{"invite": CODE}`` | 201 ``{"annotator": ID, "total": N}``; 403 for a wrong code |
| ``GET /api/next`` | ``annotator=ID`` | ``{"pair_id", "prompt", "left", "right", "done", "total"}``; 204 when done |
| ``POST /api/vote`` | ``{"annotator", "pair_id", "choice": "left"|"right"|"tie"}`` | 201 ``{"vote_id"}`` |
| ``GET /api/admin/summary`` | header ``Authorization: Bearer TOKEN`` | live counts per model pair and annotator |
| ``GET /api/admin/votes.csv`` | header ``Authorization: Bearer TOKEN`` | every vote as CSV |
| ``GET /img/NAME`` | | one study image (404 for anything outside ``images/``) |

``/api/vote`` answers 409 for a second vote on a pair, 403 for an unknown annotator, 404 for a pair
that is not in the annotator's queue and 422 for a malformed body. The admin routes answer 401
without the token. Nothing an annotator receives names a model: images have opaque names, pair ids
are random, and the sides of each pair are drawn per annotator.
"""

from __future__ import annotations

import csv
import hmac
import io
import threading
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field

from . import db
from .folder import StudyFolder

HERE = Path(__file__).parent
_ID = r"^[A-Za-z0-9_-]{1,64}$"


class SessionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    invite: str = Field(min_length=1, max_length=200)


class VoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    annotator: str = Field(pattern=_ID)
    pair_id: str = Field(pattern=_ID)
    choice: Literal["left", "right", "tie"]


def create_app(study_dir: str | Path, protocol: db.Protocol | None = None) -> FastAPI:
    """The app for one finished study folder; creates the database, invite code and admin token."""
    folder = StudyFolder(study_dir)
    manifest = folder.manifest()
    prompts = {p["id"]: p["text"] for p in manifest["prompts"]}
    protocol = protocol or db.Protocol()
    invite = folder.invite_code()
    token = folder.admin_token()
    db.init_db(folder.database, manifest)
    templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescape on for .html

    app = FastAPI(title="sd35flash study", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    local = threading.local()  # one connection per worker thread, opened on first use

    def connection():
        con = getattr(local, "con", None)
        if con is None:
            con = local.con = db.connect(folder.database)
        return con

    def known(con, annotator: str) -> None:
        if not db.annotator_exists(con, annotator):
            raise HTTPException(403, "unknown annotator; join with the invite code")

    def admin(authorization: str | None) -> None:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "admin token required", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request, invite: str = ""):
        return templates.TemplateResponse(request, "index.html", {"invite": invite[:200]})

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request):
        return templates.TemplateResponse(request, "admin.html", {})

    @app.post("/api/session", status_code=201)
    def session(body: SessionIn):
        if not hmac.compare_digest(body.invite.strip().encode(), invite.encode()):
            raise HTTPException(403, "wrong invite code")
        con = connection()
        annotator = db.create_annotator(con, protocol)
        _, _, total = db.next_pair(con, annotator)
        return {"annotator": annotator, "total": total}

    @app.get("/api/next")
    def next_pair(annotator: str = Query(pattern=_ID)):
        con = connection()
        known(con, annotator)
        row, done, total = db.next_pair(con, annotator)
        if row is None:
            return Response(status_code=204)
        left, right = (row["img_b"], row["img_a"]) if row["swap"] else (row["img_a"], row["img_b"])
        return {"pair_id": row["pair_id"], "prompt": prompts.get(row["prompt_id"], ""), "left": f"/img/{left}",
                "right": f"/img/{right}", "done": done, "total": total}

    @app.post("/api/vote", status_code=201)
    def vote(body: VoteIn):
        con = connection()
        try:
            known(con, body.annotator)
            vote_id = db.record_vote(con, body.annotator, body.pair_id, body.choice)
        except db.DuplicateVote:
            raise HTTPException(409, "already voted on this pair") from None
        except db.UnknownPair:
            raise HTTPException(404, "this pair is not in your queue") from None
        return {"vote_id": vote_id}

    @app.get("/api/admin/summary")
    def admin_summary(authorization: str | None = Header(default=None)):
        admin(authorization)
        con = connection()
        return db.summary(con)

    @app.get("/api/admin/votes.csv")
    def votes_csv(authorization: str | None = Header(default=None)):
        admin(authorization)
        con = connection()
        rows = db.all_votes(con)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=[*db.VOTE_COLUMNS, "prompt"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "prompt": prompts.get(r["prompt_id"], "")})
        return Response(buf.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="votes.csv"'})

    @app.get("/img/{name}")
    def image(name: str):
        path = folder.image_file(name)
        if path is None:
            raise HTTPException(404, "no such image")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    return app
