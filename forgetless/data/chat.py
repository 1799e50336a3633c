"""Chat data: conversations validated, rendered by the model's chat template, and their assistant tokens located.

A conversation is TRL's conversational form: ``{"messages": [...]}``, or prompt-completion with
lists of messages (``{"prompt": [...], "completion": [...]}``: only the completion's assistant turns
are trained), with optional ``tools`` (JSON schemas, passed to the template) and
``chat_template_kwargs`` (e.g. ``{"enable_thinking": false}``, merged over ``data.chat_template_kwargs``).
A message has a ``role`` and a ``content`` (a string, or a list of ``{"type": "text", "text": ...}``
parts, joined), and may carry ``tool_calls`` (OpenAI's form), ``reasoning_content``, ``name`` and
``tool_call_id``; everything is passed to the template as given.

Which tokens are the assistant's (the loss mask) is decided in one of two ways:

- the template has ``{% generation %}`` markers: transformers' ``return_assistant_tokens_mask``
  (the template author's own definition);
- otherwise (most templates): the conversation is rendered **once** as it is, and once more with
  every message's text replaced by a unique sentinel (:func:`layout`). The sentinel rendering shows
  which characters are template markup and where each message's text sits, so the real rendering
  is split exactly into markup and message texts, even where the template trims the text. An
  assistant turn's span is its text (reasoning, content, tool calls) and the end-of-turn markup
  that closes it (``<|im_end|>\\n``, ``<|eot_id|>``, ``<end_of_turn>\\n``, ``</s>``: what the template
  writes after an assistant message, found by rendering a probe conversation). Nothing requires
  the template to render a conversation's prefixes the way it renders the whole (Qwen3 does not:
  it shows the empty think block only in the last assistant turn).

A turn with reasoning or tool calls is trained from the end of the assistant header (the
template's generation prompt; for a template without one, like Mistral's, the end of the user's
turn, ``[/INST]``) on, so the template's markup around the reasoning and the calls (``<think>``,
``<tool_call>``, ``[TOOL_CALLS]``) is learned with them. Written here, not taken from a library: TRL and
transformers locate assistant tokens only through ``{% generation %}`` markers (or per-template
patched copies), and prefix rendering fails on templates like Qwen3's.
"""

from __future__ import annotations

import difflib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from forgetless.config.schema import names_template_file
from forgetless.errors import DataError, ForgetlessWarning

ROLES = ("system", "developer", "user", "assistant", "tool")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_SENTINEL = "\u27e6fl{}\u27e7"  # ⟦fl3⟧: no template trims, escapes or tests for it
_SENTINEL_RE = re.compile("\u27e6fl(\\d+)\u27e7")
_MESSAGE_KEYS = ("role", "content", "tool_calls", "reasoning_content", "name", "tool_call_id")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Conversation:
    """A validated conversation, ready for the template."""

    messages: list[dict]
    first_trained: int = 0  # assistant turns from this message on carry loss (the completion's start)
    tools: Optional[list] = None
    kwargs: dict = field(default_factory=dict)


def is_conversational(d: dict) -> bool:
    """A chat record: ``messages``, or prompt (and completion) given as lists of messages."""
    return "messages" in d or isinstance(d.get("prompt"), list) or isinstance(d.get("completion"), list)


def is_prompt_only(d: dict) -> bool:
    """A conversation without an assistant turn yet (TRL's conversational prompt-only form)."""
    if isinstance(d.get("prompt"), list) and "completion" not in d:
        msgs = d["prompt"]
    else:
        msgs = d.get("messages")
    return isinstance(msgs, list) and bool(msgs) and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs)


def conversation(d: dict, where: str, defaults: Optional[dict] = None, need_assistant: bool = True) -> Conversation:
    """The record's conversation, validated; a DataError names the record and the bad field."""
    if "messages" in d:
        msgs, first = _messages(d["messages"], where, "messages"), 0
    else:
        prompt = d.get("prompt", [])
        if not isinstance(prompt, list):
            raise DataError(f"{where}: 'completion' is a list of messages, so 'prompt' must be one too (got {type(prompt).__name__})")
        msgs = _messages(prompt, where, "prompt", allow_empty="completion" in d)
        first = len(msgs)
        if "completion" in d:
            if not isinstance(d["completion"], list):
                raise DataError(f"{where}: 'prompt' is a list of messages, so 'completion' must be one too (got {type(d['completion']).__name__})")
            completion = _messages(d["completion"], where, "completion")
            if not any(m["role"] == "assistant" for m in completion):
                raise DataError(f"{where}: 'completion' has no 'assistant' message, so nothing to learn; add one or drop the record")
            msgs += completion
    if need_assistant and not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: the conversation has no 'assistant' message, so nothing to learn; add one or drop the record")
    tools = d.get("tools")
    if isinstance(tools, str):  # LLaMA-Factory and many hub datasets keep the tools as a JSON string
        tools = _json_field(tools, where, "tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: field 'tools' must be a list of JSON schemas (objects), got {type(tools).__name__}")
    kwargs = dict(defaults or {})
    extra = d.get("chat_template_kwargs")
    if extra is not None:
        if not isinstance(extra, dict):
            raise DataError(f"{where}: field 'chat_template_kwargs' must be an object, e.g. {{\"enable_thinking\": false}}")
        kwargs.update(extra)
    return Conversation(msgs, first, tools or None, kwargs)


def _json_field(text: str, where: str, key: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise DataError(f"{where}: field {key!r} is a string but not valid JSON ({str(e).splitlines()[0][:80]}); fix it") from None


def _messages(msgs: Any, where: str, key: str, allow_empty: bool = False) -> list[dict]:
    if not isinstance(msgs, list) or (not msgs and not allow_empty):
        raise DataError(f"{where}: field {key!r} must be a non-empty list of {{'role', 'content'}} objects")
    return [_message(m, where, f"{key}[{i}]") for i, m in enumerate(msgs)]


def _message(m: Any, where: str, key: str) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise DataError(f"{where}: {key} must be an object with string 'role' and 'content'")
    role = m["role"]
    if not role.strip():
        raise DataError(f"{where}: {key}.role is empty; give it a role such as 'user' or 'assistant'")
    check_encodable(role, where, f"{key}.role")
    if role not in ROLES:  # a near miss of a standard role ('Assistant', 'asistant', ' user') is a typo
        close = difflib.get_close_matches(role.strip().lower(), ROLES, n=1, cutoff=0.75)
        if close:
            raise DataError(f"{where}: {key}.role {role!r} is not a known role (did you mean {close[0]!r}?); fix the role")
    out = {k: m[k] for k in _MESSAGE_KEYS if k in m and m[k] is not None}
    content = m.get("content")
    if isinstance(content, list):  # OpenAI-style parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise DataError(f"{where}: {key}.content has non-text parts; only text ({{'type': 'text', 'text': ...}}) is supported")
        content = "".join(p["text"] for p in content)
    tool_calls = m.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise DataError(f"{where}: {key} has 'tool_calls' but its role is {role!r}; only assistant messages call tools")
        if not isinstance(tool_calls, list) or not tool_calls or not all(_call_name(c) for c in tool_calls):
            raise DataError(f"{where}: {key}.tool_calls must be a non-empty list of calls, each with a function name "
                            f"({{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}})")
    if content is None and tool_calls is not None:
        content = ""
    if not isinstance(content, str):
        raise DataError(f"{where}: {key} must be an object with string 'role' and 'content'")
    check_encodable(content, where, f"{key}.content")
    reasoning = m.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise DataError(f"{where}: {key}.reasoning_content must be a string, got {type(reasoning).__name__}")
    out["content"] = content
    return out


def _call_name(call: Any) -> Optional[str]:
    """The function name of a tool call (OpenAI's nested form, or flat {'name', 'arguments'})."""
    if not isinstance(call, dict):
        return None
    fn = call.get("function", call)
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) and name else None


def check_encodable(text: str, where: str, key: str) -> None:
    """JSON can spell an unpaired surrogate (``"\\udc80"``), which no tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where}: field {key!r} holds an unpaired surrogate {text[e.start]!r} at character {e.start}; "
            f"fix the text (it is not valid Unicode)"
        ) from None


@dataclass
class Piece:
    """A message's own text in the rendered conversation: ``text[start:end]``."""

    message: int
    kind: str  # "content", "reasoning_content" or "tool_call"
    start: int
    end: int


class ChatTemplate:
    """A tokenizer's chat template (or ``data.chat_template``), with what forgetless learns about it once."""

    def __init__(self, tokenizer, template: Optional[str]):
        self.tok = tokenizer
        if template == "chatml":
            template = CHATML
        elif names_template_file(template):
            template = Path(template).expanduser().read_text(encoding="utf-8")  # data.chat_template named a file
        if template is None:
            template = getattr(tokenizer, "chat_template", None)
            if isinstance(template, dict):  # named templates: the default one
                template = template.get("default") or next(iter(template.values()), None)
        self.template = template
        self.has_generation_tags = bool(template and GENERATION_TAG.search(template))
        # roles the template names itself (Llama 3.1's 'ipython'), beside the standard ones
        self.roles = set(ROLES) | (set(re.findall(r"""['"]([a-z_]{2,20})['"]""", template)) if template else set())
        self._end_of_turn: Optional[str] = None
        self._header: Optional[str] = None
        self._warned_system = False
        # the template reads reasoning_content itself (Qwen3): reasoning written inline as <think>...</think>
        # is moved there first, as the template would split it, so that the texts can be located
        self.reads_reasoning = bool(template and "reasoning_content" in template)

    def prepare(self, conv: Conversation) -> Conversation:
        """``conv`` as the template expects it: inline ``<think>`` reasoning moved to ``reasoning_content``."""
        if not self.reads_reasoning:
            return conv
        msgs = []
        for m in conv.messages:
            content = m.get("content", "")
            if m["role"] == "assistant" and "reasoning_content" not in m and "</think>" in content:
                head, _, tail = content.partition("</think>")
                m = {**m, "reasoning_content": head.split("<think>")[-1].strip("\n"), "content": tail.lstrip("\n")}
            msgs.append(m)
        return Conversation(msgs, conv.first_trained, conv.tools, conv.kwargs)

    def require(self, where: str) -> None:
        if not self.template:
            raise DataError(
                f"{where}: 'messages' data needs a chat template, and this model's tokenizer has none; "
                f"set data.chat_template=chatml (or a Jinja template), or use prompt/completion records"
            )

    def render(self, conv: Conversation, messages: Optional[list[dict]] = None, add_generation_prompt: bool = False, where: str = "") -> str:
        return self._apply(conv, messages, where, tokenize=False, add_generation_prompt=add_generation_prompt)

    def assistant_mask(self, conv: Conversation, where: str):
        """transformers' own assistant mask, from the template's ``{% generation %}`` markers: its
        ``input_ids`` and ``assistant_masks``."""
        return self._apply(conv, None, where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)

    def _apply(self, conv: Conversation, messages: Optional[list[dict]], where: str, **options):
        self.require(where)
        try:
            return self.tok.apply_chat_template(
                messages if messages is not None else conv.messages, tools=conv.tools, chat_template=self.template, **options, **conv.kwargs,
            )
        except Exception as e:  # a template raises on what it does not support (roles, order, tools)
            raise DataError(f"{where}: the chat template failed on this conversation ({str(e).splitlines()[0][:160]})") from None

    def check_roles(self, conv: Conversation, where: str) -> None:
        """Refuse a role the template does not know (it would be rendered, or dropped, silently)."""
        for i, m in enumerate(conv.messages):
            role = m["role"]
            if role in self.roles:
                continue
            raise DataError(
                f"{where}: messages[{i}].role {role!r} is not a role the chat template knows; "
                f"use one of {', '.join(ROLES)}, or a data.chat_template that defines it"
            )

    def generation_prompt(self, conv: Conversation, messages: list[dict], where: str) -> str:
        return self.render(conv, messages, True, where)

    # -- what the template writes around an assistant turn, from probe conversations --

    def _probe(self) -> None:
        user, reply = _SENTINEL.format(0), _SENTINEL.format(1)
        probe = Conversation([{"role": "user", "content": user}, {"role": "assistant", "content": reply}])
        try:
            text = self.render(probe)
            self._end_of_turn = text[text.index(reply) + len(reply):]
        except (DataError, ValueError):
            self._end_of_turn = ""
        try:
            asked = Conversation(probe.messages[:1])
            plain, prompted = self.render(asked), self.render(asked, add_generation_prompt=True)
            header = prompted[len(plain):] if prompted.startswith(plain) else ""
            # a template without an assistant header (Mistral's) still closes the user's turn ("[/INST]")
            self._header = header or (prompted[prompted.index(user) + len(user):] if user in prompted else "")
        except DataError:
            self._header = ""

    @property
    def end_of_turn(self) -> str:
        if self._end_of_turn is None:
            self._probe()
        return self._end_of_turn

    @property
    def header(self) -> str:
        if self._header is None:
            self._probe()
        return self._header

    # -- the assistant spans --

    def layout(self, conv: Conversation, text: str, where: str) -> list[Piece]:
        """Where each message's own text sits in ``text`` (the rendered ``conv``), from a sentinel rendering."""
        marked, pieces = _with_sentinels(conv.messages)
        skeleton = self.render(conv, marked, where=where)
        parts = _SENTINEL_RE.split(skeleton)  # markup, id, markup, id, ..., markup
        markup, ids = parts[0::2], [int(x) for x in parts[1::2]]
        seen = set(ids)
        for k, (i, kind, value) in enumerate(pieces):
            if k in seen or kind != "content" or conv.messages[i]["role"] == "assistant":
                continue
            if conv.messages[i]["role"] == "system":  # by design in some templates (Mistral's, unless a user turn is last)
                if not self._warned_system:
                    self._warned_system = True
                    warnings.warn(
                        f"{where}: the chat template leaves the system message out of this conversation (as it renders it "
                        f"for training); the model is trained without it", ForgetlessWarning, stacklevel=2,
                    )
                continue
            raise DataError(
                f"{where}: the chat template drops messages[{i}] (role {conv.messages[i]['role']!r}); "
                f"fix the role, or use a data.chat_template that renders it"
            )
        if not text.startswith(markup[0]):
            raise self._unlocatable(where)
        out, pos = [], len(markup[0])
        for n, k in enumerate(ids):
            i, kind, value = pieces[k]
            nxt = markup[n + 1]
            for variant in _variants(value):
                if text.startswith(variant, pos) and text.startswith(nxt, pos + len(variant)):
                    break
            else:
                raise self._unlocatable(where)
            out.append(Piece(i, kind, pos, pos + len(variant)))
            pos += len(variant) + len(nxt)
        if pos != len(text):
            raise self._unlocatable(where)
        located = {p.message for p in out}
        for i, m in enumerate(conv.messages):
            if m["role"] == "assistant" and i >= conv.first_trained and (m["content"] or m.get("tool_calls")) and i not in located:
                raise self._unlocatable(where)
        return out

    def _unlocatable(self, where: str) -> DataError:
        return DataError(
            f"{where}: the chat template renders the text of this conversation in a way forgetless cannot map back "
            f"to its messages, so the assistant tokens cannot be located; use a data.chat_template with "
            f"{{% generation %}} markers, or set data.completion_only_loss=false"
        )

    def assistant_spans(self, conv: Conversation, text: str, pieces: list[Piece]) -> list[tuple[int, int]]:
        """Character spans of the trained assistant turns of ``text``: their texts and closing end-of-turn."""
        by_message: dict[int, list[Piece]] = {}
        for p in pieces:
            by_message.setdefault(p.message, []).append(p)
        starts = sorted(p.start for p in pieces)
        eot, header = self.end_of_turn, self.header
        spans = []
        for i, own in sorted(by_message.items()):
            m = conv.messages[i]
            if m["role"] != "assistant" or i < conv.first_trained:
                continue
            first, last = min(p.start for p in own), max(p.end for p in own)
            start = first
            if header and any(p.kind != "content" for p in own):
                before = max([p.end for p in pieces if p.end <= first], default=0)
                at = text.rfind(header, before, first)
                if at >= 0:
                    start = at + len(header)
            limit = min([s for s in starts if s >= last], default=len(text))
            end = last
            if any(p.kind == "tool_call" for p in own) and eot.strip():  # the calls' markup runs on to the turn's end
                at = text.find(eot.strip(), last, limit)
                if at >= 0:
                    end = at
            if eot and text.startswith(eot, end) and end + len(eot) <= limit:
                end += len(eot)
            elif eot.rstrip() and text.startswith(eot.rstrip(), end):
                end += len(eot.rstrip())
            spans.append((start, end))
        return spans


def _with_sentinels(messages: list[dict]) -> tuple[list[dict], list[tuple[int, str, str]]]:
    """``messages`` with each text (content, reasoning, tool-call name) replaced by a unique sentinel."""
    pieces: list[tuple[int, str, str]] = []
    out = []

    def mark(i: int, kind: str, value: str) -> str:
        pieces.append((i, kind, value))
        return _SENTINEL.format(len(pieces) - 1)

    for i, m in enumerate(messages):
        m = dict(m)
        if m.get("reasoning_content"):
            m["reasoning_content"] = mark(i, "reasoning_content", m["reasoning_content"])
        if m.get("content"):
            m["content"] = mark(i, "content", m["content"])
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                c = json.loads(json.dumps(c))
                fn = c["function"] if isinstance(c.get("function"), dict) else c
                fn["name"] = mark(i, "tool_call", fn["name"])
                calls.append(c)
            m["tool_calls"] = calls
        out.append(m)
    return out, pieces


def _variants(value: str) -> list[str]:
    """The forms a template may render a text in (as given, trimmed, or as a JSON string's inside:
    Llama 3.1 writes a tool result with ``tojson``), most faithful first."""
    out = []
    escaped = json.dumps(value, ensure_ascii=False)[1:-1]
    for v in (value, value.strip(), value.lstrip(), value.rstrip(), value.strip("\n"), value.lstrip("\n"), value.rstrip("\n"), escaped):
        if v not in out:
            out.append(v)
    return out
