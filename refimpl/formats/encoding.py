"""DeepSeek V4 chat encoding: OpenAI-style messages -> prompt text, completion text -> message.

Our own rewrite of the official `encoding/encoding_dsv4.py` (cited as E:Lnnn); it gives the same
output byte for byte (tests/data/encoding holds the official fixtures, tests/data/encoding_corpus
a differential corpus recorded from the official file). A prompt is (docs/architecture.md §17):

    [BOS] [REASONING_EFFORT_MAX]  then per message:
      system           content ["\\n\\n" tools block] ["\\n\\n" response format]
      developer        <｜User｜> content [tools block] [response format]
      user             <｜User｜> blocks joined by "\\n\\n": text, or <tool_result>...</tool_result>
      latest_reminder  <｜latest_reminder｜> content
      assistant        [reasoning </think>] content ["\\n\\n" DSML tool calls] [EOS]
    and, where the message is the last one or is followed by assistant / latest_reminder:
      its task token(s) if it has a `task`, else after user/developer: <｜Assistant｜> <think>|</think>

Pipeline, as the official: merge tool messages into user turns -> order tool results by the
last assistant's calls -> drop old reasoning and old developer turns (thinking mode with
drop_thinking) -> render each message, checking it as the official does when it renders it.

What is refused, and when. The rule: wherever the official gives a prompt, this gives the same
prompt; it refuses more only where the official fails (raises, writes a value it cannot render,
or writes what its own parser reads back as something else). In detail:
- The shape of every message, rendered or not (context and dropped messages too): a dict with a
  known role, `task` None or a known task name, each field of its JSON type (content a string or
  None, a list of parts for a tool result; tools and tool_calls as OpenAI specs), and valid
  Unicode text (no lone surrogate) in every string. The official notices these only on the
  messages it renders, and then as KeyError/TypeError/AssertionError or as Python reprs in the
  prompt; a caller's type error is refused here wherever it is.
- The official's own rules only on the messages it renders (E:L240-394): a developer message
  needs non-empty content, a latest_reminder needs content (the official writes "None"), a user
  or tool content of None is refused (the official fails on the first, writes "None" for the
  second; a missing one is ""), and tool-call arguments must be a JSON object string (the official
  fails on other JSON and wraps non-JSON text as {"arguments": text}, E:L152-155). So a message
  the official drops unrendered (an empty developer message before the last user turn in
  thinking mode, anything in `context`) is never refused for its content.
- As the official: a tool message needs no matching call (an unknown id ranks first); `tools`,
  `tool_calls` and `response_format` on a user or tool message are ignored (E:L444-453; their
  shape is still checked); `tools` on an assistant or reminder message are not rendered but
  switch drop_thinking off (E:L549-551).

`parse_message_from_completion_text` reads one assistant turn back (official: E:L687-744), in time
linear in the text (the official is quadratic in some malformed inputs). It is as lenient as the
official (EOS may be missing after a closed tool-call block, a string="false" parameter value is
copied into the arguments JSON text unchecked, an invoke head takes any whitespace or none before
name= and one newline more or less at its end, a value one newline before its closing tag: spacings
the encoder never writes, corpus cases parse-ws-*) except for one case: where the text ends inside
the tool-call block, the official returns the calls read so far as if the message were complete;
this refuses it. Tool and parameter names are not escaped (as the official), so a name
containing '"' does not survive a round trip.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from refimpl.formats.files import StrictJSONError, parse_json

# Special tokens (official: E:L17-35); ids are the official tokenizer's (docs/architecture.md §17).
BOS = "<｜begin▁of▁sentence｜>"                   # id 0
EOS = "<｜end▁of▁sentence｜>"                     # id 1, also pad
USER = "<｜User｜>"                               # id 128803
ASSISTANT = "<｜Assistant｜>"                     # id 128804
THINK_START = "<think>"                          # id 128821
THINK_END = "</think>"                           # id 128822
DSML = "｜DSML｜"                                 # id 128825, inside the tool-call tags
LATEST_REMINDER = "<｜latest_reminder｜>"         # id 128828
ACTION = "<｜action｜>"                           # id 128829
QUERY = "<｜query｜>"                             # id 128830
AUTHORITY = "<｜authority｜>"                     # id 128831
DOMAIN = "<｜domain｜>"                           # id 128832
TITLE = "<｜title｜>"                             # id 128836
EXTRACTED_URL = "<｜extracted_url｜>"             # id 128844; written in user content before a read_url task
READ_URL = "<｜read_url｜>"                       # id 128845

TASK_TOKENS = {"action": ACTION, "query": QUERY, "authority": AUTHORITY,       # official: E:L28-35
               "domain": DOMAIN, "title": TITLE, "read_url": READ_URL}
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML, LATEST_REMINDER,
                  ACTION, QUERY, AUTHORITY, DOMAIN, TITLE, EXTRACTED_URL, READ_URL)  # official id order
ROLES = ("system", "user", "assistant", "developer", "latest_reminder", "tool")
THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "max", "high")        # official: E:L261; "high" adds nothing

# Fixed prompt text (official: E:L49-95), written out with the tokens in place.
REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve"
    " the root cause, rigorously stress-testing your logic against all potential paths, edge cases,"
    " and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step,"
    " considered alternative, and rejected hypothesis to ensure absolutely no assumption is left"
    " unchecked.\n\n"
)
RESPONSE_FORMAT_HEAD = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n")
TOOLS_HEAD = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

"""
TOOLS_TAIL = """

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

# DSML tags (official: E:L52-58, L149); the parser searches for these prefixes.
_CALLS_OPEN, _CALLS_CLOSE = f"<{DSML}tool_calls>", f"</{DSML}tool_calls>"
_INVOKE_OPEN, _INVOKE_CLOSE = f"<{DSML}invoke", f"</{DSML}invoke"
_PARAM_OPEN, _PARAM_END = f"<{DSML}parameter", f"/{DSML}parameter"
_CALLS_START = "\n\n" + f"<{DSML}tool_calls"    # official: E:L710, how content ends in a completion
# `$` also matches before a final "\n" (as in the official), so an invoke with no parameters parses
_INVOKE_HEAD_RE = re.compile(r'\s*name="(.*?)">\n$', re.DOTALL)                       # E:L659


class EncodingError(ValueError):
    """Malformed messages, options or completion text."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_unicode(text: str, where: str) -> None:
    """Refuse a lone surrogate: such a string has no UTF-8 form, so no tokenizer can read it."""
    if (m := _SURROGATE.search(text)) is not None:
        raise EncodingError(f"{where}: lone surrogate {m.group()!r} at character {m.start()} "
                            "(not valid Unicode text)")


def _to_json(value: Any, where: str) -> str:
    """JSON with non-ASCII kept (official: E:L101-106; its ensure_ascii=True retry never helps)."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise EncodingError(f"{where}: not JSON-serializable: {err}") from None
    except RecursionError:
        raise EncodingError(f"{where}: nested too deeply to write as JSON") from None


def _type(value: Any) -> str:
    return "None" if value is None else type(value).__name__


# ---- the shape of one message, checked on every message (rendered or not) ----

def _check_strings(value: Any, where: str) -> None:
    """Every string in a message (keys too, at any depth) is valid Unicode text."""
    stack, seen = [(value, where)], set()
    while stack:                                          # iterative: nesting depth is the caller's
        value, at = stack.pop()
        if isinstance(value, str):
            _check_unicode(value, at)
        elif isinstance(value, (Mapping, list, tuple)) and id(value) not in seen:
            seen.add(id(value))
            items = value.items() if isinstance(value, Mapping) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_unicode(key, f"{at} (a key)")
                stack.append((item, f"{at}.{key}" if isinstance(key, str) else f"{at}[{key}]"))


def _optional_text(msg: Mapping, key: str, where: str) -> str | None:
    value = msg.get(key)
    if value is not None and not isinstance(value, str):
        raise EncodingError(f"{where}: `{key}` must be a string, got {_type(value)}")
    return value


def _tool_result_parts(content: list, where: str) -> list[tuple[str, str | None]]:
    """Tool result content parts -> (type, text) (official: E:L298-305)."""
    parts = []
    for k, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise EncodingError(f"{where}.content[{k}]: a content part must be a dict, got {_type(part)}")
        text = part.get("text", "")                                  # official: E:L302
        if part.get("type") == "text" and text is not None and not isinstance(text, str):
            raise EncodingError(f"{where}.content[{k}]: `text` must be a string, got {_type(text)}")
        parts.append((part.get("type"), text))
    return parts


def _tools(msg: Mapping, where: str) -> list[dict]:
    """OpenAI tool specs -> their `function` objects (official: E:L109-111)."""
    tools = msg.get("tools")
    if not tools:
        return []
    if not isinstance(tools, list):
        raise EncodingError(f"{where}: `tools` must be a list of OpenAI tool specs, got {_type(tools)}")
    for k, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or not isinstance(tool.get("function"), Mapping):
            raise EncodingError(f"{where}.tools[{k}]: expected {{'type': 'function', 'function': {{...}}}}")
    return [tool["function"] for tool in tools]


def _tool_calls(msg: Mapping, where: str) -> list[tuple[str, str, str, str]]:
    """OpenAI tool calls -> (id, name, arguments text, where) (official: E:L114-122, L478)."""
    calls = msg.get("tool_calls")
    if not calls:
        return []
    if not isinstance(calls, list):
        raise EncodingError(f"{where}: `tool_calls` must be a list, got {_type(calls)}")
    out = []
    for k, call in enumerate(calls):
        at = f"{where}.tool_calls[{k}]"
        if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
            raise EncodingError(f"{at}: expected {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
        fn = call["function"]
        call_id = call.get("id") or fn.get("id") or ""          # official: E:L478
        name, args = fn.get("name"), fn.get("arguments")
        if not isinstance(call_id, str):
            raise EncodingError(f"{at}: `id` must be a string, got {_type(call_id)}")
        if not isinstance(name, str):
            raise EncodingError(f"{at}: function `name` must be a string, got {_type(name)}")
        if not isinstance(args, str):
            raise EncodingError(f"{at}: function `arguments` must be a JSON string, got {_type(args)}")
        out.append((call_id, name, args, at))
    return out


def _check_message(msg: Any, where: str) -> dict:
    """Check the shape of one message and return a fresh dict of what the pipeline reads.

    Only field types are checked here; what the official asserts when it renders a message
    (a developer's content, a reminder's content, tool-call arguments) is checked by the renderer.
    """
    if not isinstance(msg, Mapping):
        raise EncodingError(f"{where}: a message must be a dict, got {_type(msg)}")
    role = msg.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise EncodingError(f"{where}: unknown `role` {role!r}; expected one of {ROLES}")
    task = msg.get("task")
    if task is not None and not (isinstance(task, str) and task in TASK_TOKENS):
        got = repr(task) if isinstance(task, str) else f"of type {_type(task)}"
        raise EncodingError(f"{where}: unknown `task` {got}; expected None or one of {tuple(TASK_TOKENS)}")
    _check_strings(msg, where)
    m = {"role": role, "where": where, "task": task, "tools": _tools(msg, where),
         "response_format": msg.get("response_format"), "wo_eos": bool(msg.get("wo_eos")),
         "calls": _tool_calls(msg, where)}        # read on every role, as the official (E:L255-258)
    if role in ("user", "tool"):
        content = msg.get("content", "")                         # official: E:L429, L440
        if role == "tool" and isinstance(content, list):
            content = _tool_result_parts(content, where)
        elif content is not None and not isinstance(content, str):
            raise EncodingError(f"{where}: `content` must be a string, got {_type(content)}")
        m["content"] = content
        if role == "tool":
            m["call_id"] = _optional_text(msg, "tool_call_id", where) or ""
    else:
        m["content"] = _optional_text(msg, "content", where)
        m["reasoning"] = _optional_text(msg, "reasoning_content", where) if role == "assistant" else None
    return m


# ---- preprocessing (official: E:L401-499, L575-599) ----

def _merge_tool_messages(msgs: list[dict]) -> list[dict]:
    """Fold each tool result, and each user message after a user turn, into that user turn.

    A user turn keeps only its content, task and wo_eos (official: E:L444-453): `tools`,
    `tool_calls` and `response_format` on a user or tool message are dropped here.
    """
    out: list[dict] = []
    for m in msgs:
        prev = out[-1] if out and out[-1]["role"] == "user" else None
        if m["role"] == "tool":                                               # official: E:L424-438
            block = ("tool_result", m["call_id"], m["content"], m["where"])
            if prev is not None:
                prev["blocks"].append(block)              # a turn made here: its list is its own
            else:
                out.append({"role": "user", "where": m["where"], "task": None, "tools": [], "calls": [],
                            "response_format": None, "wo_eos": False, "blocks": [block]})
        elif m["role"] == "user":                                             # official: E:L439-453
            block = ("text", "", m["content"], m["where"])
            if prev is not None and prev["task"] is None:     # NOTE(official): this user's task is lost
                prev["blocks"].append(block)
            else:
                out.append({**m, "tools": [], "calls": [], "response_format": None, "blocks": [block]})
        else:
            out.append(m)
    return out


def _order_tool_results(msgs: list[dict]) -> list[dict]:
    """Sort each user turn's tool results by the last assistant's call order; unknown ids rank 0."""
    order: dict[str, int] = {}
    out = []
    for m in msgs:
        if m["role"] == "assistant" and m["calls"]:                           # official: E:L475-480
            order = {call[0]: k for k, call in enumerate(m["calls"]) if call[0]}
        elif m["role"] == "user":                                             # official: E:L482-497
            results = iter(sorted((b for b in m["blocks"] if b[0] == "tool_result"),
                                  key=lambda b: order.get(b[1], 0)))          # stable, as the official
            m = {**m, "blocks": [next(results) if b[0] == "tool_result" else b for b in m["blocks"]]}
        out.append(m)
    return out


def _last_user_index(msgs: list[dict]) -> int:
    """Index of the last user or developer message, -1 if none (official: E:L209-216)."""
    return max((i for i, m in enumerate(msgs) if m["role"] in ("user", "developer")), default=-1)


def _drop_old_reasoning(msgs: list[dict]) -> list[dict]:
    """Before the last user turn: strip assistant reasoning and drop developer turns (E:L575-599)."""
    last = _last_user_index(msgs)
    out = []
    for i, m in enumerate(msgs):
        if i >= last or m["role"] in ("system", "user", "latest_reminder"):
            out.append(m)
        elif m["role"] == "assistant":
            out.append({**m, "reasoning": None})
    return out


# ---- rendering (official: E:L223-394); the official's own checks happen here, as in the official ----

def _tools_and_format(m: dict) -> str:
    """Tools block and response format appended to a system or developer message."""
    text = ""
    if m["tools"]:                                                            # official: E:L189-206
        schemas = "\n".join(_to_json(t, f"{m['where']}.tools") for t in m["tools"])
        text += "\n\n" + TOOLS_HEAD + schemas + TOOLS_TAIL
    if m["response_format"]:
        text += "\n\n" + RESPONSE_FORMAT_HEAD + _to_json(m["response_format"],
                                                           f"{m['where']}.response_format")
    return text


def _arguments(args: str, where: str) -> dict:
    """Tool-call arguments: a JSON object (official: E:L152-157)."""
    try:
        parsed = parse_json(args)
    except StrictJSONError as err:
        # NOTE(official): the official's json.loads keeps the last of two equal keys and reads NaN
        raise EncodingError(f"{where}: function `arguments`: {err}") from None
    except json.JSONDecodeError as err:
        # NOTE(official): the official renders other text as {"arguments": text}, which its parser
        # reads back as a different call
        raise EncodingError(f"{where}: function `arguments` is not valid JSON ({err})") from None
    except RecursionError:
        raise EncodingError(f"{where}: function `arguments` nested too deeply") from None
    if not isinstance(parsed, dict):                          # the official fails on .items()
        raise EncodingError(f"{where}: function `arguments` must be a JSON object, got {_type(parsed)}")
    return parsed


def _render_params(args: dict, where: str) -> str:
    """DSML parameter lines: strings raw with string="true", other JSON with "false" (E:L139-166)."""
    lines = []
    for key, value in args.items():
        is_str = isinstance(value, str)
        shown = value if is_str else _to_json(value, where)
        lines.append(f'{_PARAM_OPEN} name="{key}" string="{"true" if is_str else "false"}">'
                     f"{shown}<{_PARAM_END}>")
    return "\n".join(lines)


def _render_tool_calls(calls: list[tuple[str, str, str, str]]) -> str:
    """"\\n\\n" + the DSML tool_calls block of one assistant turn, "" without calls (E:L323-336)."""
    if not calls:
        return ""
    invokes = [f'{_INVOKE_OPEN} name="{name}">\n{_render_params(_arguments(args, at), at)}\n{_INVOKE_CLOSE}>'
               for _, name, args, at in calls]
    return f"\n\n{_CALLS_OPEN}\n" + "\n".join(invokes) + f"\n{_CALLS_CLOSE}"


def _block_text(block: tuple) -> str:
    """One block of a user turn: its text, or a tool result (official: E:L293-306)."""
    kind, _, content, where = block
    if content is None:        # NOTE(official): the official fails on a user's None, writes a tool's as "None"
        raise EncodingError(f"{where}: `content` must be a string, got None")
    if kind == "text":
        return content
    if isinstance(content, list):
        texts = [t if part_type == "text" else f"[Unsupported {part_type}]"            # E:L304
                 for part_type, t in content]
        if None in texts:
            raise EncodingError(f"{where}: a text part's `text` must be a string, got None")
        content = "\n\n".join(texts)
    return f"<tool_result>{content}</tool_result>"


def _render_message(i: int, msgs: list[dict], *, thinking: bool, drop: bool, effort: str | None,
                    last_user: int) -> str:
    """Message i followed by its transition tokens."""
    m, role = msgs[i], msgs[i]["role"]
    text = REASONING_EFFORT_MAX if i == 0 and thinking and effort == "max" else ""  # E:L262
    if role == "system":
        text += (m["content"] or "") + _tools_and_format(m)
    elif role == "developer":
        if not m["content"]:                                  # official: E:L273 asserts
            raise EncodingError(f"{m['where']}: a developer message needs non-empty content")
        text += USER + m["content"] + _tools_and_format(m)
    elif role == "user":
        text += USER + "\n\n".join(_block_text(b) for b in m["blocks"])
    elif role == "latest_reminder":
        if m["content"] is None:                              # NOTE(official): E:L314 would write "None"
            raise EncodingError(f"{m['where']}: `content` is required for role 'latest_reminder'")
        text += LATEST_REMINDER + m["content"]
    else:                                                                     # assistant, E:L319-362
        after_task = i > 0 and msgs[i - 1]["task"] is not None   # a task's answer carries no reasoning
        if thinking and not after_task and (not drop or i > last_user):
            text += (m["reasoning"] or "") + THINK_END
        text += (m["content"] or "") + _render_tool_calls(m["calls"]) + ("" if m["wo_eos"] else EOS)

    # transition (official: E:L365-392): only before an assistant / latest_reminder turn or at the end
    if i + 1 < len(msgs) and msgs[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return text
    if m["task"] == "action":
        text += ASSISTANT + (THINK_START if thinking else THINK_END) + ACTION
    elif m["task"] is not None:
        text += TASK_TOKENS[m["task"]]
    elif role in ("user", "developer"):
        opens = thinking and (not drop or i >= last_user)
        text += ASSISTANT + (THINK_START if opens else THINK_END)
    return text


def _check_options(thinking_mode: str, reasoning_effort: str | None = None) -> None:
    if thinking_mode not in THINKING_MODES:
        raise EncodingError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise EncodingError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")


def _check_list(messages: Any, name: str) -> list[dict]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise EncodingError(f"{name} must be a list of message dicts, got {_type(messages)}")
    return [_check_message(m, f"{name}[{i}]") for i, m in enumerate(messages)]


def encode_messages(messages: Sequence[Mapping[str, Any]], *, thinking_mode: str = "chat",
                    drop_thinking: bool = True, reasoning_effort: str | None = None,
                    add_default_bos_token: bool = True,
                    context: Sequence[Mapping[str, Any]] | None = None) -> str:
    """Prompt text for `messages` (OpenAI schema), after an already-encoded `context` if given."""
    _check_options(thinking_mode, reasoning_effort)
    ctx, msgs = _check_list(context or [], "context"), _check_list(messages, "messages")
    ctx, msgs = _merge_tool_messages(ctx), _merge_tool_messages(msgs)  # official: E:L538-542, apart
    full = _order_tool_results(ctx + msgs)
    thinking = thinking_mode == "thinking"
    # NOTE(official): tools on any kept message count, also on an assistant or reminder (E:L549-551)
    drop = drop_thinking and not any(m["tools"] for m in full)
    start = len(ctx)
    if thinking and drop:
        full = _drop_old_reasoning(full)
        start = len(_drop_old_reasoning(ctx))   # NOTE(official): context is dropped on its own (E:L557)
    last_user = _last_user_index(full)
    prompt = BOS if add_default_bos_token and not ctx else ""
    for i in range(start, len(full)):
        prompt += _render_message(i, full, thinking=thinking, drop=drop, effort=reasoning_effort,
                                  last_user=last_user)
    return prompt


# ---- parsing a completion (official: E:L606-744) ----

class _Reader:
    """The official reader (E:L606-627) over one text, in time linear in the text.

    `until` returns (position after the first stop, text before it, the stop) or (len, rest, None).
    Positions only move forward, so the next occurrence of each stop is remembered: the official
    searches the whole remaining text again for every stop at every step, which is quadratic when
    a stop is absent (a block of many parameters and no </｜DSML｜invoke>).
    """

    def __init__(self, text: str):
        self.text, self.pos, self._next = text, 0, {}

    def _find(self, stop: str) -> int:
        at = self._next.get(stop)                           # -1: none after an earlier position
        if at is None or -1 < at < self.pos:                # unknown, or already passed
            at = self.text.find(stop, self.pos)
            self._next[stop] = at
        return at

    def until(self, *stops: str) -> tuple[str, str | None]:
        found = [(at, k) for k, stop in enumerate(stops) if (at := self._find(stop)) != -1]
        start = self.pos
        if not found:
            self.pos = len(self.text)
            return self.text[start:], None
        at, k = min(found)                                  # the earliest; ties go to the first listed
        self.pos = at + len(stops[k])
        return self.text[start:at], stops[k]


def _excerpt(text: str, n: int = 60) -> str:
    """repr of the start of `text`, for one-line errors."""
    return repr(text) if len(text) <= n else f"{text[:n]!r}... ({len(text)} characters)"


_PARAM_HEADS = ('" string="true">', '" string="false">')


def _split_param(body: str) -> tuple[str, str, str] | None:
    """(name, "true"|"false", value) of ' name="N" string="S">V<', as the official regex (E:L668).

    re.findall(r'^ name="(.*?)" string="(true|false)">(.*?)<$', body, DOTALL) gives the first
    ' string=' header after the name (later ones only end later), and the value runs to the final
    "<" ($ also matches before a final "\n"). Done by hand: the regex is quadratic in the number
    of headers when the body does not end with "<".
    """
    if not body.startswith(' name="'):
        return None
    heads = [(at, h) for h in _PARAM_HEADS if (at := body.find(h, 7)) != -1]
    if not heads:
        return None
    at, head = min(heads)
    lt = len(body) - (2 if body.endswith("<\n") else 1)
    if lt < at + len(head) or body[lt] != "<":
        return None
    return body[7:at], head[10:-2], body[at + len(head):lt]


def _parse_tool_calls(r: _Reader) -> list[tuple[str, str]]:
    """DSML invokes after "\\n\\n<｜DSML｜tool_calls", up to its close tag -> [(name, arguments JSON)]."""
    calls = []
    while r.pos < len(r.text):                                                # official: E:L646-682
        gap, stop = r.until(_INVOKE_OPEN, _CALLS_CLOSE)
        if gap != ">\n":
            raise EncodingError(f"tool call format error: expected '>\\n' but got {_excerpt(gap)}")
        if stop == _CALLS_CLOSE:
            return calls
        if stop is None:
            break
        head, stop = r.until(_PARAM_OPEN, _INVOKE_CLOSE)
        match = _INVOKE_HEAD_RE.match(head)
        if match is None:
            raise EncodingError(f"tool name format error: {_excerpt(head)}")
        params: dict[str, tuple[str, str]] = {}
        while stop == _PARAM_OPEN:
            body, stop = r.until(_PARAM_END)
            param = _split_param(body) if stop is not None else None   # unclosed: the official fails too
            if param is None:
                raise EncodingError(f"parameter format error: {_excerpt(body)}")
            key, is_str, value = param
            if key in params:
                raise EncodingError(f"duplicate parameter name {key!r}")
            params[key] = (value, is_str)
            gap, stop = r.until(_PARAM_OPEN, _INVOKE_CLOSE)
            if gap != ">\n":
                raise EncodingError(f"parameter format error: expected '>\\n' but got {_excerpt(gap)}")
        # arguments JSON built as text: non-string values are copied unchecked (official: E:L169-186)
        items = (f"{json.dumps(k, ensure_ascii=False)}: "
                 f"{json.dumps(v, ensure_ascii=False) if s == 'true' else v}" for k, (v, s) in params.items())
        calls.append((match.group(1), "{" + ", ".join(items) + "}"))
    # NOTE(official): the official returns the calls read so far when the text ends inside the
    # block (E:L646), so a cut-off completion reads as a complete message with fewer calls
    raise EncodingError(f"the completion ends inside the tool-call block: no closing {_CALLS_CLOSE}")


def parse_message_from_completion_text(text: str, *, thinking_mode: str = "chat") -> dict[str, Any]:
    """One assistant completion (text after the prompt, with EOS) -> OpenAI-style message dict."""
    _check_options(thinking_mode)
    if not isinstance(text, str):
        raise EncodingError(f"completion must be a string, got {type(text).__name__}")
    _check_unicode(text, "completion")
    r, reasoning = _Reader(text), ""
    if thinking_mode == "thinking":                                           # official: E:L715-718
        reasoning, stop = r.until(THINK_END, _CALLS_START)
        if stop != THINK_END:
            raise EncodingError("invalid thinking format: missing </think>")
    content, stop = r.until(EOS, _CALLS_START)
    calls: list[tuple[str, str]] = []
    if stop == _CALLS_START:                                                  # official: E:L727-731
        calls = _parse_tool_calls(r)
        rest, stop = r.until(EOS)                             # NOTE(official): EOS optional here
        if rest:
            raise EncodingError(f"unexpected text after tool calls: {_excerpt(rest)}")
    elif stop is None:
        raise EncodingError("invalid format: missing EOS token")
    if r.pos != len(text):
        raise EncodingError(f"unexpected text after EOS: {_excerpt(text[r.pos:])}")
    for token in (BOS, EOS, THINK_START, THINK_END, DSML):                   # official: E:L735-737
        if token in content or token in reasoning:
            raise EncodingError(f"unexpected special token {token!r} in content")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning,
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}
                           for name, args in calls]}
