"""``forgetless push``: a finished run's model, its card and its scores, uploaded with ``huggingface_hub``.

One commit holds the run's ``model/`` folder at the repo's root (weights, tokenizer, adapter files,
README.md: the model card) and, under ``forgetless/``, the run's ``summary.json`` (every before/after
score) and ``config.yaml`` (secrets already redacted), so the scores travel with the model. The
card is written again from the run's summary if the run predates it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from forgetless.errors import UserError
from forgetless.files import CONFIG_FILE, MODEL_DIR, SUMMARY_FILE

EXTRA_DIR = "forgetless"


def upload_plan(run_dir: Path) -> list[tuple[Path, str]]:
    """(local file, path in the repo) of everything a push uploads; checks the run first."""
    run_dir = Path(run_dir)
    model_dir = run_dir / MODEL_DIR
    if not (run_dir / SUMMARY_FILE).is_file():
        raise UserError(f"push: {run_dir} holds no finished run (no {SUMMARY_FILE}); give the directory of a finished forgetless run")
    if not model_dir.is_dir():
        raise UserError(f"push: {run_dir} has no {MODEL_DIR}/ (it ran with output.save_model=false); nothing to push")
    _ensure_card(run_dir)
    files = [(p, p.relative_to(model_dir).as_posix()) for p in sorted(model_dir.rglob("*")) if p.is_file()]
    files += [(run_dir / name, f"{EXTRA_DIR}/{name}") for name in (SUMMARY_FILE, CONFIG_FILE) if (run_dir / name).is_file()]
    return files


def local_base_warning(run_dir: Path) -> Optional[str]:
    """A sentence when the saved adapter names its base by a path of this machine (it will not resolve on the hub)."""
    config = Path(run_dir) / MODEL_DIR / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
    if Path(base).is_absolute():
        return (f"the adapter names its base model by a local path ({Path(base).name}), which others cannot load from the hub; "
                f"they must load the base themselves, or push a merged model (forgetless merge) instead")
    return None


def push_run(run_dir: Path, repo_id: str, *, private: bool = False, token: Optional[str] = None, api=None) -> str:
    """Upload the run to ``repo_id`` (created if needed) in one commit; returns the repo's URL."""
    from forgetless.config.schema import check_repo_id
    from forgetless.errors import ConfigError

    try:
        check_repo_id(repo_id, "push")
    except ConfigError as e:
        raise UserError(str(e)) from None
    files = upload_plan(run_dir)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    from huggingface_hub import CommitOperationAdd

    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(
            repo_id=repo_id, repo_type="model", commit_message=f"forgetless run {Path(run_dir).name}",
            operations=[CommitOperationAdd(path_in_repo=dest, path_or_fileobj=str(src)) for src, dest in files],
        )
    except Exception as e:  # no network, no login, no right to the repo: the run itself is safe on disk
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"push to {repo_id} failed ({first}); the run is intact in {run_dir}: log in "
                        f"(huggingface-cli login or HF_TOKEN) and run forgetless push {run_dir} {repo_id}") from None
    return str(getattr(url, "url", url))


def _ensure_card(run_dir: Path) -> None:
    from forgetless.config import load_config
    from forgetless.models.card import CARD_FILE, write_model_card

    if (run_dir / MODEL_DIR / CARD_FILE).is_file() or not (run_dir / CONFIG_FILE).is_file():
        return
    summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    roles = {row["set"]: row["role"] for row in summary.get("sets", [])}
    write_model_card(run_dir / MODEL_DIR, load_config(run_dir / CONFIG_FILE), summary.get("before", {}), summary.get("after", {}),
                     roles, summary.get("train", {}), summary.get("data", {}), [])
