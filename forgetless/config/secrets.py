"""Redaction of access tokens: what a saved config, log or report must never hold.

Standalone (nothing from forgetless), so whatever writes into a run directory can use it.
"""

from __future__ import annotations

import os
import re
from typing import Any

# Access tokens must never reach a run directory (which gets shared, uploaded, committed).
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
REDACTED = "<redacted>"
_TOKEN_PATTERN = re.compile(
    r"(?:hf_|api_org_)[A-Za-z0-9]{30,}"  # Hugging Face user / organisation tokens
    r"|(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub tokens
    r"|sk-[A-Za-z0-9_-]{20,}"  # API secret keys in the sk- style
)
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s:]+:[^/@\s]+(?=@)")  # scheme://user:password@host


def redact_secrets(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, strings) with access tokens replaced by ``<redacted>``: the
    values of SECRET_ENV_VARS, strings shaped like known token formats, and passwords in URLs."""
    if isinstance(obj, dict):
        return {k: redact_secrets(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v) for v in obj]
    if not isinstance(obj, str):
        return obj
    for name in SECRET_ENV_VARS:
        secret = os.environ.get(name, "")
        if len(secret) >= 8:
            obj = obj.replace(secret, REDACTED)
    obj = _TOKEN_PATTERN.sub(REDACTED, obj)
    return _URL_CREDENTIALS.sub(REDACTED, obj)

