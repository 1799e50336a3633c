"""The record layouts of other tools, turned into forgetless's formats as records are read.

- ``data.*.columns`` renames a dataset's columns first: ``{field: column}``, e.g.
  ``{prompt: question, completion: answer}`` or ``{messages: dialog}``.
- ShareGPT (``{"conversations": [{"from": "human", "value": ...}, ...]}``, LLaMA-Factory's and
  axolotl's habit; an optional top-level ``system`` and ``tools``): turned into ``messages``. The
  ``from`` tags: human/user -> user, gpt/assistant/model/chatgpt/bard/bing -> assistant,
  system -> system, observation/tool/function_response/ipython -> tool, and function_call -> an
  assistant message whose ``tool_calls`` are the call(s) in its JSON ``value``. Messages written
  with ``role``/``content`` in ``conversations`` are taken as they are.
- Alpaca (``instruction``, optional ``input``, ``output``, optional ``system`` and ``history`` as
  ``[[query, reply], ...]``): turned into ``messages``, the user turn being the instruction and the
  input joined by a newline (as LLaMA-Factory does).
- Preference (``chosen``/``rejected``), KTO (``label`` true/false) and stepwise-supervision
  (``completions`` + ``labels``) records are refused: training on them as supervised data would
  teach the rejected answers too.

The record a scoring function receives (``records`` of a custom metric) is the converted one.
"""

from __future__ import annotations

import json
from typing import Any

from forgetless.errors import DataError

SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "system": "system",
    "observation": "tool", "tool": "tool", "function_response": "tool", "ipython": "tool",
}


def convert(data: dict, where: str, columns: dict[str, str]) -> dict:
    """``data`` in one of forgetless's formats (a new dict when anything changed)."""
    if columns:
        missing = [c for c in columns.values() if c not in data]
        if missing:
            found = ", ".join(repr(k) for k in list(data)[:8]) or "none"
            raise DataError(f"{where}: column {missing[0]!r} named in columns is not in the record (found {found}); fix the mapping")
        renamed = {k: v for k, v in data.items() if k not in columns.values()}
        renamed.update({field: data[column] for field, column in columns.items()})
        data = renamed
    _refuse_preference(data, where)
    if "conversations" in data and "messages" not in data:
        return _from_sharegpt(data, where)
    if "instruction" in data and "output" in data and not {"messages", "prompt", "text"} & set(data):
        return _from_alpaca(data, where)
    return data


def _refuse_preference(d: dict, where: str) -> None:
    if "chosen" in d and "rejected" in d and not {"messages", "completion", "text"} & set(d):
        raise DataError(
            f"{where}: a preference record (chosen/rejected) is for DPO-style training, which forgetless does not do; "
            f"to fine-tune on the chosen answers, map them with columns: {{completion: chosen}} ({{messages: chosen}} for whole conversations)"
        )
    if "completions" in d and "labels" in d and "completion" not in d:
        raise DataError(
            f"{where}: a stepwise-supervision record (completions with a label per step) is for process reward models, "
            f"not supervised fine-tuning; keep the steps labelled true as one completion, or train it with TRL's PRM trainer"
        )
    if isinstance(d.get("label"), bool) and "completion" in d:
        raise DataError(
            f"{where}: a KTO record (prompt, completion, label true/false) marks undesirable completions, which supervised "
            f"fine-tuning would learn too; keep only the records with label true and remove the 'label' field"
        )


def _from_sharegpt(d: dict, where: str) -> dict:
    turns = d["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of {{'from', 'value'}} objects")
    messages = []
    if isinstance(d.get("system"), str) and d["system"].strip():
        messages.append({"role": "system", "content": d["system"]})
    for i, t in enumerate(turns):
        if isinstance(t, dict) and "role" in t:
            messages.append(t)
            continue
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise DataError(f"{where}: conversations[{i}] must be an object with string 'from' and 'value'")
        tag = t["from"].strip().lower()
        if tag == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": _calls(t["value"], where, i)})
        elif tag in SHAREGPT_ROLES:
            messages.append({"role": SHAREGPT_ROLES[tag], "content": t["value"]})
        else:
            raise DataError(
                f"{where}: conversations[{i}].from {t['from']!r} is not a ShareGPT role "
                f"(human, gpt, system, function_call, observation); fix it or map the record yourself"
            )
    out = {k: v for k, v in d.items() if k not in ("conversations", "system")}
    out["messages"] = messages
    return out


def _calls(value: str, where: str, i: int) -> list[dict]:
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        raise DataError(f"{where}: conversations[{i}] is a function_call whose value is not JSON; give {{\"name\": ..., \"arguments\": ...}}") from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise DataError(f"{where}: conversations[{i}] is a function_call without a 'name'; give {{\"name\": ..., \"arguments\": ...}}")
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}} for c in calls]


def _from_alpaca(d: dict, where: str) -> dict:
    for key in ("instruction", "output"):
        if not isinstance(d[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(d[key]).__name__}")
    if not d["output"].strip():
        raise DataError(f"{where}: field 'output' is empty; give it text or remove the record")
    extra = d.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
    messages = []
    if isinstance(d.get("system"), str) and d["system"].strip():
        messages.append({"role": "system", "content": d["system"]})
    history = d.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
        raise DataError(f"{where}: field 'history' must be a list of [query, reply] string pairs")
    for query, reply in history:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]
    user = "\n".join(x for x in (d["instruction"], extra) if x)
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": d["output"]}]
    out = {k: v for k, v in d.items() if k not in ("instruction", "input", "output", "system", "history")}
    out["messages"] = messages
    return out
