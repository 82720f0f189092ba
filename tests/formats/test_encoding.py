"""Tests of refimpl.formats.encoding against the official encoder's fixtures and hand-derived strings.

Encoding rule (docs/architecture.md §17) -> tests covering it (hand-derived strings unless said otherwise):

| rule                                                 | tests                                         |
|------------------------------------------------------|-----------------------------------------------|
| special token strings                                | test_special_token_strings                    |
| BOS first (add_default_bos_token); none after a      | test_bos_prefix,                              |
|   context                                            | test_context_renders_only_new_messages,       |
|                                                      | test_context_with_dropped_developer           |
| system: content [+ tools] [+ response format]        | test_system, test_system_response_format      |
| developer: <｜User｜> content [+ tools] [+ format]     | test_developer,                               |
|                                                      | test_developer_tools_and_response_format      |
| user: <｜User｜> content, blocks joined by "\\n\\n"     | test_user, test_consecutive_users_merge       |
| latest_reminder: <｜latest_reminder｜> content         | test_latest_reminder                          |
| assistant in chat mode: content EOS, no reasoning    | test_assistant_chat_has_no_reasoning          |
| assistant in thinking mode: reasoning </think> ...   | test_assistant_thinking_last_turn             |
| drop_thinking on: old reasoning, old developer gone  | test_drop_thinking_on,                        |
|                                                      | test_drop_thinking_drops_old_developer        |
| drop_thinking off                                    | test_drop_thinking_off                        |
| drop_thinking disabled when tools are present        | test_drop_thinking_disabled_by_tools          |
| assistant wo_eos                                     | test_assistant_wo_eos                         |
| transition <｜Assistant｜> + <think> or </think>       | test_transition_tokens,                       |
|                                                      | test_no_transition_before_user_or_system,     |
|                                                      | test_transition_before_latest_reminder        |
| reasoning_effort="max" (thinking mode only)          | test_reasoning_effort_max                     |
| tools block (one JSON line per function)             | test_tools_block_text                         |
| DSML tool calls, string and non-string parameters    | test_dsml_tool_calls                          |
| tool results merged into user turns, in call order   | test_tool_results_merged_in_call_order,       |
|                                                      | test_tool_call_id_inside_function,            |
|                                                      | test_tool_result_content_parts                |
| task action                                          | test_task_action                              |
| task query / authority / domain                      | test_task_after_user                          |
| task read_url (with <｜extracted_url｜> in content)    | test_task_read_url                            |
| task title; the task's answer has no reasoning       | test_task_title, test_task_after_user         |
| task tokens only before assistant/reminder or at end | test_task_needs_following_assistant           |
| all of it together (the 4 official fixtures)         | test_official_fixture                         |
| parse_message_from_completion_text                   | test_official_fixture_parse, test_parse_*     |
| encode -> parse round trips (Hypothesis)             | test_roundtrip_encode_parse,                  |
|                                                      | test_roundtrip_dsml_example                   |
| bad input -> EncodingError (a ValueError)            | test_bad_messages, test_bad_options,          |
|                                                      | test_bad_messages_in_context_are_named,       |
|                                                      | test_parse_errors, test_deep_nesting_*        |
| the shape of every message checked; the official's   | test_dropped_messages_are_not_checked,        |
|   own rules only on the messages it renders          | test_context_messages_are_not_checked         |
| tool results, tools on other roles: as the official  | test_tool_results_as_the_official,            |
|                                                      | test_tools_on_other_roles_as_the_official     |
| parse: a cut-off tool-call block is refused; linear  | test_parse_refuses_cut_off_tool_calls,        |
|   time; one-line errors                              | test_parse_time_is_linear, test_parse_errors_*|
| everything against the official encoder's outputs    | test_encoding_corpus.py (recorded corpus),    |
|                                                      | test_encoding_strategies.py (properties)      |
"""

import json
import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.formats import encoding
from refimpl.formats.encoding import EncodingError, encode_messages, parse_message_from_completion_text

DATA = Path(__file__).parents[1] / "data" / "encoding"   # the official encoding/tests fixtures, unchanged

# token strings written out here, so a wrong constant in the module fails test_special_token_strings
B, E = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"
TS, TE = "<think>", "</think>"
LR = "<｜latest_reminder｜>"

TOOL_F = {"type": "function", "function": {"name": "f", "parameters": {}}}
TOOLS_BLOCK_F = """## Tools

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

{"name": "f", "parameters": {}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""


def call(call_id, name, args):
    """An OpenAI tool call with `args` serialized to the arguments string."""
    out = {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
    if call_id:
        out["id"] = call_id
    return out


def user(content, **kw):
    return {"role": "user", "content": content, **kw}


def asst(content=None, reasoning=None, **kw):
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, **kw}


def chat(msgs, **kw):
    return encode_messages(msgs, thinking_mode="chat", **kw)


def think(msgs, **kw):
    return encode_messages(msgs, thinking_mode="thinking", **kw)


# ---- official fixtures (copied from the official encoding/tests, checked as test_encoding_dsv4.py) ----

def load_fixture(n):
    data = json.loads((DATA / f"test_input_{n}.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):                           # case 1: tools live beside the messages
        data["messages"][0]["tools"] = data["tools"]
        data = data["messages"]
    with open(DATA / f"test_output_{n}.txt", encoding="utf-8") as f:   # text mode, as the official test
        return data, f.read()


@pytest.mark.parametrize("n, mode", [(1, "thinking"), (2, "thinking"), (3, "thinking"), (4, "chat")])
def test_official_fixture(n, mode):
    messages, gold = load_fixture(n)
    assert encode_messages(messages, thinking_mode=mode) == gold


def test_official_fixture_parse():
    prompt = encode_messages(load_fixture(1)[0], thinking_mode="thinking")
    marker = A + TS
    start = prompt.find(marker) + len(marker)
    first = parse_message_from_completion_text(prompt[start:prompt.find(U, start)], thinking_mode="thinking")
    assert first["reasoning_content"] == ("The user wants to know the weather in Beijing. "
                                          "I should use the get_weather tool.")
    assert first["content"] == ""
    assert [c["function"]["name"] for c in first["tool_calls"]] == ["get_weather"]
    args = json.loads(first["tool_calls"][0]["function"]["arguments"])
    assert args == {"location": "Beijing", "unit": "celsius"}
    last = parse_message_from_completion_text(prompt[prompt.rfind(marker) + len(marker):],
                                              thinking_mode="thinking")
    assert last["reasoning_content"] == "Got the weather data. Let me format a nice response."
    assert "22°C" in last["content"] and last["tool_calls"] == []

    prompt = encode_messages(load_fixture(2)[0], thinking_mode="thinking")
    last = parse_message_from_completion_text(prompt[prompt.rfind(marker) + len(marker):],
                                              thinking_mode="thinking")
    assert last == {"role": "assistant", "content": "The capital of France is Paris.",
                    "reasoning_content": "The user asks about the capital of France. It is Paris.",
                    "tool_calls": []}
    assert "The user said hello" not in prompt           # drop_thinking removed the first reasoning


def test_fixture_inputs_not_modified():
    messages, _ = load_fixture(1)
    before = json.dumps(messages)
    encode_messages(messages, thinking_mode="thinking")
    assert json.dumps(messages) == before


# ---- one rule per test (hand-derived strings) ----

def test_special_token_strings():
    assert (encoding.BOS, encoding.EOS, encoding.USER, encoding.ASSISTANT) == (B, E, U, A)
    assert (encoding.THINK_START, encoding.THINK_END, encoding.LATEST_REMINDER) == (TS, TE, LR)
    assert encoding.DSML == "｜DSML｜"
    assert encoding.TASK_TOKENS == {"action": "<｜action｜>", "query": "<｜query｜>", "authority": "<｜authority｜>",
                                    "domain": "<｜domain｜>", "title": "<｜title｜>", "read_url": "<｜read_url｜>"}
    assert encoding.EXTRACTED_URL == "<｜extracted_url｜>"
    assert encoding.SPECIAL_TOKENS[:2] == (B, E) and len(set(encoding.SPECIAL_TOKENS)) == 15


def test_bos_prefix():
    assert chat([user("hi")]) == B + U + "hi" + A + TE
    assert chat([user("hi")], add_default_bos_token=False) == U + "hi" + A + TE
    assert chat([]) == B


def test_system():
    assert chat([{"role": "system", "content": "S"}, user("hi")]) == B + "S" + U + "hi" + A + TE
    assert chat([{"role": "system", "content": None}, user("hi")]) == B + U + "hi" + A + TE
    assert chat([{"role": "system", "content": "S"}]) == B + "S"     # no transition after system


def test_system_response_format():
    msg = {"role": "system", "content": "S", "response_format": {"type": "json_object", "名": 1}}
    assert chat([msg]) == (B + "S\n\n## Response Format:\n\nYou MUST strictly adhere to the following "
                           'schema to reply:\n{"type": "json_object", "名": 1}')


def test_tools_block_text():
    assert chat([{"role": "system", "content": "S", "tools": [TOOL_F]}]) == B + "S\n\n" + TOOLS_BLOCK_F
    two = {"type": "function", "function": {"name": "g", "description": "天气"}}
    out = chat([{"role": "system", "content": "", "tools": [TOOL_F, two]}])
    assert out.endswith('{"name": "f", "parameters": {}}\n{"name": "g", "description": "天气"}\n\n'
                        "You MUST strictly follow the above defined tool name and parameter schemas "
                        "to invoke tool calls.\n")


def test_developer():
    assert think([{"role": "developer", "content": "D"}]) == B + U + "D" + A + TS
    assert chat([{"role": "developer", "content": "D"}]) == B + U + "D" + A + TE


def test_developer_tools_and_response_format():
    msg = {"role": "developer", "content": "D", "tools": [TOOL_F], "response_format": {"a": 1}}
    assert chat([msg]) == (B + U + "D\n\n" + TOOLS_BLOCK_F + "\n\n## Response Format:\n\nYou MUST strictly "
                           'adhere to the following schema to reply:\n{"a": 1}' + A + TE)


def test_user():
    assert chat([user("你好")]) == B + U + "你好" + A + TE
    assert chat([{"role": "user"}]) == B + U + A + TE


def test_consecutive_users_merge():
    # official: E:L439-442, a user message after a user turn joins it with "\n\n"
    assert chat([user("a"), user("b")]) == B + U + "a\n\nb" + A + TE
    assert chat([user("a"), user("b", task="query")]) == B + U + "a\n\nb" + A + TE   # official: b's task is lost
    assert chat([user("a", task="query"), user("b")]) == B + U + "a" + U + "b" + A + TE  # no merge after a task


def test_latest_reminder():
    msgs = [{"role": "system", "content": "S"}, {"role": "latest_reminder", "content": "R"}, user("q")]
    assert chat(msgs) == B + "S" + LR + "R" + U + "q" + A + TE


def test_assistant_chat_has_no_reasoning():
    assert chat([user("q"), asst("c", "r")]) == B + U + "q" + A + TE + "c" + E


def test_assistant_thinking_last_turn():
    assert think([user("q"), asst("c", "r")]) == B + U + "q" + A + TS + "r" + TE + "c" + E
    assert think([user("q"), asst("c")]) == B + U + "q" + A + TS + TE + "c" + E


def test_drop_thinking_on():
    msgs = [user("q1"), asst("c1", "r1"), user("q2"), asst("c2", "r2")]
    assert think(msgs) == B + U + "q1" + A + TE + "c1" + E + U + "q2" + A + TS + "r2" + TE + "c2" + E


def test_drop_thinking_off():
    msgs = [user("q1"), asst("c1", "r1"), user("q2"), asst("c2", "r2")]
    assert think(msgs, drop_thinking=False) == (B + U + "q1" + A + TS + "r1" + TE + "c1" + E
                                                + U + "q2" + A + TS + "r2" + TE + "c2" + E)


def test_drop_thinking_drops_old_developer():
    msgs = [{"role": "developer", "content": "D1"}, asst("c1", "r1"), user("q2")]
    assert think(msgs) == B + "c1" + E + U + "q2" + A + TS
    assert chat(msgs) == B + U + "D1" + A + TE + "c1" + E + U + "q2" + A + TE   # chat mode drops nothing


def test_drop_thinking_disabled_by_tools():
    msgs = [{"role": "system", "content": "S", "tools": [TOOL_F]}, user("q1"), asst("c1", "r1"), user("q2")]
    assert think(msgs) == (B + "S\n\n" + TOOLS_BLOCK_F + U + "q1" + A + TS + "r1" + TE + "c1" + E
                           + U + "q2" + A + TS)


def test_assistant_wo_eos():
    assert chat([user("q"), asst("c", wo_eos=True)]) == B + U + "q" + A + TE + "c"


def test_transition_tokens():
    msgs = [user("q1"), asst("c1"), user("q2")]
    assert chat(msgs) == B + U + "q1" + A + TE + "c1" + E + U + "q2" + A + TE
    assert think(msgs) == B + U + "q1" + A + TE + "c1" + E + U + "q2" + A + TS    # only the last opens
    assert think(msgs, drop_thinking=False) == B + U + "q1" + A + TS + TE + "c1" + E + U + "q2" + A + TS


def test_no_transition_before_user_or_system():
    assert chat([user("a"), {"role": "system", "content": "S2"}]) == B + U + "a" + "S2"
    assert chat([asst("c"), user("q")]) == B + "c" + E + U + "q" + A + TE


def test_transition_before_latest_reminder():
    assert chat([user("q"), {"role": "latest_reminder", "content": "R"}]) == B + U + "q" + A + TE + LR + "R"


def test_reasoning_effort_max():
    prefix = ("Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
              "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
              "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
              "edge cases, and adversarial scenarios.\n"
              "Explicitly write out your entire deliberation process, documenting every intermediate step, "
              "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
              "unchecked.\n\n")
    msgs = [{"role": "system", "content": "S"}, user("q")]
    assert think(msgs, reasoning_effort="max") == B + prefix + "S" + U + "q" + A + TS
    assert chat(msgs, reasoning_effort="max") == B + "S" + U + "q" + A + TE          # chat: no prefix
    assert think(msgs, reasoning_effort="high") == think(msgs)                        # official: no-op


DSML_F_G = ('\n\n<｜DSML｜tool_calls>\n'
            '<｜DSML｜invoke name="f">\n'
            '<｜DSML｜parameter name="s" string="true">x "y"\n中</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="n" string="false">3</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="b" string="false">true</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="l" string="false">[1.5, "中", null]</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="o" string="false">{"k": {}}</｜DSML｜parameter>\n'
            '</｜DSML｜invoke>\n'
            '<｜DSML｜invoke name="g">\n'
            '\n'
            '</｜DSML｜invoke>\n'
            '</｜DSML｜tool_calls>')
F_ARGS = {"s": 'x "y"\n中', "n": 3, "b": True, "l": [1.5, "中", None], "o": {"k": {}}}
CALLS_F_G = [call("c1", "f", F_ARGS), call("c2", "g", {})]


def test_dsml_tool_calls():
    assert chat([user("q"), asst(None, tool_calls=CALLS_F_G)]) == B + U + "q" + A + TE + DSML_F_G + E
    assert (think([user("q"), asst("ok", "r", tool_calls=CALLS_F_G)])
            == B + U + "q" + A + TS + "r" + TE + "ok" + DSML_F_G + E)
    assert chat([user("q"), asst("c", tool_calls=[])]) == B + U + "q" + A + TE + "c" + E


def test_tool_results_merged_in_call_order():
    msgs = [user("q"), asst(tool_calls=CALLS_F_G),
            {"role": "tool", "tool_call_id": "c2", "content": "R2"},
            {"role": "tool", "tool_call_id": "c1", "content": "R1"},
            user("more")]
    assert chat(msgs) == (B + U + "q" + A + TE + DSML_F_G + E
                          + U + "<tool_result>R1</tool_result>\n\n<tool_result>R2</tool_result>\n\nmore" + A + TE)


def test_tool_call_id_inside_function():
    # official: E:L478 also reads the id from the function object
    calls = [{"type": "function", "function": {"id": i, "name": n, "arguments": "{}"}}
             for i, n in [("x", "f"), ("y", "g")]]
    msgs = [user("q"), asst(tool_calls=calls), {"role": "tool", "tool_call_id": "y", "content": "Y"},
            {"role": "tool", "tool_call_id": "x", "content": "X"}]
    assert chat(msgs).endswith(U + "<tool_result>X</tool_result>\n\n<tool_result>Y</tool_result>" + A + TE)


def test_tool_result_content_parts():
    msgs = [user("q"), asst(tool_calls=[call("", "g", {})]),
            {"role": "tool", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}]
    assert chat(msgs).endswith(E + U + "<tool_result>a\n\n[Unsupported image_url]</tool_result>" + A + TE)


def test_task_action():
    assert chat([user("q", task="action")]) == B + U + "q" + A + TE + "<｜action｜>"
    assert think([user("q", task="action")]) == B + U + "q" + A + TS + "<｜action｜>"
    assert chat([user("q", task="action"), asst("Search")]) == B + U + "q" + A + TE + "<｜action｜>Search" + E


@pytest.mark.parametrize("task", ["query", "authority", "domain"])
def test_task_after_user(task):
    assert chat([user("q", task=task)]) == B + U + "q" + f"<｜{task}｜>"
    assert think([user("q", task=task), asst("a", "r")]) == B + U + "q" + f"<｜{task}｜>" + "a" + E  # no reasoning


def test_task_read_url():
    msg = user("q<｜extracted_url｜>https://example.com", task="read_url")
    assert chat([msg]) == B + U + "q<｜extracted_url｜>https://example.com<｜read_url｜>"


def test_task_title():
    assert chat([user("q"), asst("c", task="title")]) == B + U + "q" + A + TE + "c" + E + "<｜title｜>"
    msgs = [user("q"), asst("c", "r", task="title"), asst("T", "x")]
    assert think(msgs) == B + U + "q" + A + TS + "r" + TE + "c" + E + "<｜title｜>" + "T" + E


def test_task_needs_following_assistant():
    # task tokens, like transitions, appear only before an assistant / latest_reminder turn or at the end
    assert chat([asst("c", task="title"), user("q")]) == B + "c" + E + U + "q" + A + TE


def test_context_renders_only_new_messages():
    ctx = [user("q")]
    assert chat([asst("c")], context=ctx) == "c" + E
    assert think([asst("c", "r")], context=ctx) == "r" + TE + "c" + E
    msgs = [user("q"), asst("c1", "r1"), user("q2"), asst("c2", "r2")]
    for k in range(1, len(msgs)):                   # chat mode: any split gives the same text
        assert chat(msgs) == chat(msgs[:k]) + chat(msgs[k:], context=msgs[:k])


def test_context_with_dropped_developer():
    # thinking mode drops the context on its own to find where the new messages start (E:L557)
    ctx = [{"role": "developer", "content": "D1"}, user("q1")]
    assert think([asst("c", "r")], context=ctx) == "r" + TE + "c" + E
    # NOTE(official): here the context keeps D1 on its own but loses it in the whole, so the start
    # index overshoots and the new user message is not rendered at all; we mirror the official
    assert think([user("q2")], context=[{"role": "developer", "content": "D1"}, asst("c1", "r1")]) == ""


# ---- what is checked: the shape of every message; the official's own rules where it renders ----

ISSUE_13 = [{"role": "system", "content": "42"}, {"role": "developer", "content": ""},
            user("Beijing 42"), asst("", "weather"), user("天气 北京"), asst("")]


def test_dropped_messages_are_not_checked():
    # thinking mode with drop_thinking drops the empty developer message before rendering it
    assert think(ISSUE_13) == (B + "42" + U + "Beijing 42" + A + TE + E
                               + U + "天气 北京" + A + TS + TE + E)
    with pytest.raises(EncodingError, match=r"messages\[1\]: a developer message needs non-empty content"):
        chat(ISSUE_13)                                           # rendered in chat mode
    with pytest.raises(EncodingError, match="non-empty content"):
        think(ISSUE_13, drop_thinking=False)
    with pytest.raises(EncodingError, match="non-empty content"):
        think(ISSUE_13[:2] + [asst("x")])                        # the last user turn is kept


def test_context_messages_are_not_checked():
    # the context is never rendered, so only the shape of its messages is checked
    ctx = [{"role": "developer", "content": ""}, user("q0"), {"role": "latest_reminder"}]
    assert think([user("q")], context=ctx) == U + "q" + A + TS
    with pytest.raises(EncodingError, match=r"context\[0\]: unknown `task`"):
        think([user("q")], context=[user("q0", task=7)])


def test_tool_results_as_the_official():
    # the official merges any tool message into a user turn; an unknown id ranks first (E:L487)
    assert chat([user("q"), {"role": "tool", "content": "r"}]) == B + U + "q\n\n<tool_result>r</tool_result>" + A + TE
    assert chat([{"role": "tool", "content": "r"}]) == B + U + "<tool_result>r</tool_result>" + A + TE
    msgs = [user("q"), asst(tool_calls=CALLS_F_G), {"role": "tool", "tool_call_id": "c2", "content": "R2"},
            {"role": "tool", "tool_call_id": "c9", "content": "R9"}, {"role": "tool", "tool_call_id": "c1"}]
    assert chat(msgs).endswith(U + "<tool_result>R9</tool_result>\n\n<tool_result></tool_result>\n\n"
                               "<tool_result>R2</tool_result>" + A + TE)


def test_tools_on_other_roles_as_the_official():
    # a user turn keeps only content, task and wo_eos (E:L444-453); tools on a kept assistant
    # message still switch drop_thinking off (E:L549-551)
    assert chat([user("q", tools=[TOOL_F], response_format={"a": 1})]) == chat([user("q")])
    msgs = [user("q1"), asst("c1", "r1", tools=[TOOL_F]), user("q2")]
    assert think(msgs) == B + U + "q1" + A + TS + "r1" + TE + "c1" + E + U + "q2" + A + TS


def test_deep_nesting_is_a_clear_error():
    deep = []
    for _ in range(20_000):
        deep = [deep]
    with pytest.raises(EncodingError, match=r"messages\[0\].response_format: nested too deeply"):
        chat([{"role": "system", "content": "S", "response_format": {"a": deep}}])


# ---- parsing ----

def test_parse_readme_example():
    got = parse_message_from_completion_text("Simple arithmetic.</think>2 + 2 = 4." + E, thinking_mode="thinking")
    assert got == {"role": "assistant", "content": "2 + 2 = 4.", "reasoning_content": "Simple arithmetic.",
                   "tool_calls": []}
    assert parse_message_from_completion_text("hi" + E) == {"role": "assistant", "content": "hi",
                                                            "reasoning_content": "", "tool_calls": []}


def test_parse_tool_calls():
    got = parse_message_from_completion_text("r" + TE + "ok" + DSML_F_G + E, thinking_mode="thinking")
    assert (got["content"], got["reasoning_content"]) == ("ok", "r")
    assert got["tool_calls"] == [
        {"type": "function", "function": {"name": "f", "arguments":
            '{"s": "x \\"y\\"\\n中", "n": 3, "b": true, "l": [1.5, "中", null], "o": {"k": {}}}'}},
        {"type": "function", "function": {"name": "g", "arguments": "{}"}}]
    assert json.loads(got["tool_calls"][0]["function"]["arguments"]) == F_ARGS


def test_parse_mirrors_official_leniency():
    # official: EOS is optional after a closed tool-call block, and a string="false" value is
    # copied into the arguments text unchecked
    head = '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
    param = '<｜DSML｜parameter name="a" string="false">abc</｜DSML｜parameter>\n'
    got = parse_message_from_completion_text("c" + head + param + "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
    assert got["content"] == "c" and got["tool_calls"][0]["function"]["arguments"] == '{"a": abc}'
    assert parse_message_from_completion_text("c" + DSML_F_G)["tool_calls"][1]["function"]["name"] == "g"


# the official parser returns the calls read so far for these (zero or one), as if complete
CUT_OFF = ["hi\n\n<｜DSML｜tool_calls",
           'hi\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
           '<｜DSML｜parameter name="a" string="true">x</｜DSML｜parameter>\n',
           'hi\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke',
           DSML_F_G[:DSML_F_G.rindex("</｜DSML｜invoke>") + len("</｜DSML｜invoke")]]


@pytest.mark.parametrize("text", CUT_OFF)
@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_parse_refuses_cut_off_tool_calls(text, mode):
    text = ("r" + TE if mode == "thinking" else "") + text
    with pytest.raises(EncodingError, match="ends inside the tool-call block"):
        parse_message_from_completion_text(text, thinking_mode=mode)


def _parse_seconds(text):
    start = time.perf_counter()
    try:
        parse_message_from_completion_text(text)
    except EncodingError:
        pass
    return time.perf_counter() - start


@pytest.mark.parametrize("unit", [
    '<｜DSML｜parameter name="a" string="true">x',                          # parameters never closed
    '<｜DSML｜parameter name="a{}" string="true">x</｜DSML｜parameter>\n',     # the invoke never closed
    '</｜DSML｜invoke>\n<｜DSML｜invoke name="f{}">\n',                       # the block never closed
])
def test_parse_time_is_linear(unit):
    # 50 times the text must take about 50 times as long (2,500 times if quadratic); ~1 MB here
    def text(n):
        return ('c\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
                + "".join(unit.replace("{}", str(k)) for k in range(n)))
    n_big = 2**20 // len(unit)
    small = min(_parse_seconds(text(n_big // 50)) for _ in range(3))
    assert _parse_seconds(text(n_big)) < 400 * small + 0.05


def test_encode_time_is_linear():
    # 20 times the tool results must take about 20 times as long (400 times if quadratic)
    def seconds(n):
        msgs = [user("q"), asst(tool_calls=CALL_C1)] + [{"role": "tool", "content": "r"}] * n
        start = time.perf_counter()
        chat(msgs)
        return time.perf_counter() - start
    small = min(seconds(2_000) for _ in range(3))
    assert seconds(40_000) < 120 * small + 0.1


OFFICIAL_PARAM_RE = re.compile(r'^ name="(.*?)" string="(true|false)">(.*?)<$', flags=re.DOTALL)   # E:L668


@settings(max_examples=300)
@given(body=st.lists(st.sampled_from([' name="', '" string="true">', '" string="false">', '"', "<", "\n", "<\n",
                                      "a", " ", ">", "string"]), max_size=10).map("".join))
def test_split_param_is_the_official_regex(body):
    # the parameter split done by hand (linear) reads every body as the official regex does
    found = OFFICIAL_PARAM_RE.findall(body)
    assert encoding._split_param(body) == (found[0] if len(found) == 1 else None)


def test_parse_errors_are_one_short_line():
    body = '<｜DSML｜parameter name="a" string="true">' + "x" * 100_000
    with pytest.raises(EncodingError) as err:
        parse_message_from_completion_text('c\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n' + body)
    assert "\n" not in str(err.value) and len(str(err.value)) < 200 and "100024 characters" in str(err.value)


@pytest.mark.parametrize("text, mode, message", [
    ("no end" + E, "thinking", "missing </think>"),
    ("c", "chat", "missing EOS"),
    ("c" + E + "x", "chat", "after EOS"),
    ("a<think>b" + E, "chat", "special token"),
    ("c" + TE + E, "chat", "special token"),
    ("c" + DSML_F_G + "x" + E, "chat", "after tool calls"),
    ("c\n\n<｜DSML｜tool_calls>\nx", "chat", "format error"),
    ('c\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke nom="f">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>',
     "chat", "tool name"),
    ('c\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a">1</｜DSML｜parameter>\n'
     '</｜DSML｜invoke>\n</｜DSML｜tool_calls>', "chat", "parameter format"),
    ('c\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
     '<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>\n'
     '<｜DSML｜parameter name="a" string="true">2</｜DSML｜parameter>\n'
     '</｜DSML｜invoke>\n</｜DSML｜tool_calls>', "chat", "duplicate parameter"),
])
def test_parse_errors(text, mode, message):
    with pytest.raises(EncodingError, match=message):
        parse_message_from_completion_text(text, thinking_mode=mode)


# ---- round trips: encode an assistant turn, cut the completion out, parse it back ----

FORBIDDEN = (B, E, TS, TE, "｜DSML｜")    # the parser rejects these inside content (official: E:L735)
safe_text = (st.lists(st.one_of(st.characters(codec="utf-8"),
                                st.sampled_from(["<", "</", ">", "\n", "\n\n", "think", "｜", "DSML", "\"",
                                                 "tool_calls", "parameter", U, A, "<｜end▁of▁sentence"])),
                      max_size=10).map("".join)
             .filter(lambda s: not any(t in s for t in FORBIDDEN)))
safe_name = safe_text.filter(lambda s: '"' not in s)   # names and keys sit unescaped inside name="..."
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | safe_text
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(safe_text, inner, max_size=3),
    max_leaves=6)
tool_calls = st.lists(st.tuples(safe_name, st.dictionaries(safe_name, json_values, max_size=4)), max_size=3)


def completion_of(message, mode):
    """The text after the prompt of [user, message]: what the model would have generated."""
    prompt = encode_messages([user("q")], thinking_mode=mode)
    full = encode_messages([user("q"), message], thinking_mode=mode)
    assert full.startswith(prompt)
    return full[len(prompt):]


@settings(deadline=None, max_examples=300)
@given(content=safe_text, reasoning=safe_text, calls=tool_calls, mode=st.sampled_from(["chat", "thinking"]))
def test_roundtrip_encode_parse(content, reasoning, calls, mode):
    message = asst(content, reasoning, tool_calls=[call(f"id{k}", n, a) for k, (n, a) in enumerate(calls)])
    got = parse_message_from_completion_text(completion_of(message, mode), thinking_mode=mode)
    assert got["role"] == "assistant" and got["content"] == content
    assert got["reasoning_content"] == (reasoning if mode == "thinking" else "")
    assert [c["type"] for c in got["tool_calls"]] == ["function"] * len(calls)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got["tool_calls"]] == calls
    assert completion_of(got, mode) == completion_of(message, mode)   # the parsed message re-encodes the same


def test_roundtrip_dsml_example():
    message = asst("ok", "r", tool_calls=CALLS_F_G)
    got = parse_message_from_completion_text(completion_of(message, "thinking"), thinking_mode="thinking")
    assert [json.loads(c["function"]["arguments"]) for c in got["tool_calls"]] == [F_ARGS, {}]


# ---- bad input ----

CALL_C1 = [call("c1", "f", {})]


@pytest.mark.parametrize("messages, message", [
    ("hello", "must be a list"),
    (["hello"], r"messages\[0\]: a message must be a dict"),
    ([{"role": "bot", "content": "x"}], "unknown `role` 'bot'"),
    ([{"content": "x"}], "unknown `role` None"),
    ([{"role": ["user"], "content": "x"}], r"unknown `role` \['user'\]"),
    ([user(5)], "`content` must be a string, got int"),
    ([user([{"type": "text", "text": "x"}])], "`content` must be a string, got list"),
    ([{"role": "system", "content": {"a": 1}}], "`content` must be a string"),
    ([user("q"), asst(3)], "`content` must be a string"),
    ([user("q"), asst("c", 1)], "`reasoning_content` must be a string"),
    ([{"role": "latest_reminder"}], "`content` is required"),
    ([{"role": "developer", "content": ""}], "non-empty content"),
    ([user(None)], r"messages\[0\]: `content` must be a string, got None"),        # official: TypeError
    ([user("q"), asst(tool_calls=CALL_C1), {"role": "tool", "tool_call_id": "c1", "content": None}],
     r"messages\[2\]: `content` must be a string, got None"),                      # official: writes "None"
    ([user("q"), {"role": "tool", "content": [{"type": "text", "text": None}]}], "`text` must be a string"),
    ([user("q"), {"role": "tool", "content": [{"type": "text", "text": 3}]}], "`text` must be a string"),
    ([user("q"), asst(tool_calls=CALL_C1), {"role": "tool", "tool_call_id": "c1", "content": ["x"]}],
     "content part must be a dict"),
    ([user("q"), asst(tool_calls=CALL_C1), {"role": "tool", "tool_call_id": 1, "content": "r"}],
     "`tool_call_id` must be a string"),
    ([asst(tool_calls={"function": {}})], "`tool_calls` must be a list"),
    ([asst(tool_calls=[{"name": "f", "arguments": "{}"}])], r"tool_calls\[0\]: expected"),
    ([asst(tool_calls=[{"function": {"arguments": "{}"}}])], "`name` must be a string"),
    ([asst(tool_calls=[{"function": {"name": "f", "arguments": {"a": 1}}}])], "must be a JSON string, got dict"),
    ([asst(tool_calls=[{"function": {"name": "f", "arguments": "{'a': 1}"}}])], "not valid JSON"),
    ([asst(tool_calls=[{"function": {"name": "f", "arguments": "[1, 2]"}}])], "must be a JSON object"),
    ([asst(tool_calls=[{"function": {"name": "f", "arguments": '{"a": 1, "a": 2}'}}])],
     "function `arguments`: duplicate key 'a' in a JSON object"),
    ([asst(tool_calls=[{"function": {"name": "f", "arguments": '{"a": NaN}'}}])],
     "function `arguments`: NaN is not a JSON number"),
    ([asst(tool_calls=[{"id": 7, "function": {"name": "f", "arguments": "{}"}}])], "`id` must be a string"),
    ([{"role": "system", "content": "S", "tools": "f"}], "`tools` must be a list"),
    ([{"role": "system", "content": "S", "tools": [{"name": "f"}]}], r"tools\[0\]: expected"),
    ([{"role": "system", "content": "S", "tools": [{"function": {"f": object()}}]}], "not JSON-serializable"),
    ([user("q", tools=[{"name": "f"}])], r"tools\[0\]: expected"),     # checked on every role
    ([{"role": "system", "content": "S", "tool_calls": [{"name": "f"}]}], r"tool_calls\[0\]: expected"),
    ([user("q", task="summary")], r"messages\[0\]: unknown `task` 'summary'"),
    ([user("q", task=["query"])], r"messages\[0\]: unknown `task` of type list"),
    ([user("a", task={"query": 1}), user("b")], r"messages\[0\]: unknown `task` of type dict"),
    ([user("a"), user("q\ud800x")], r"messages\[1\].content: lone surrogate '\\ud800' at character 1"),
    ([{"role": "system", "tools": [{"function": {"description": "\udfff"}}]}],
     r"messages\[0\].tools\[0\].function.description: lone surrogate"),
    ([user("q"), asst(tool_calls=[call("c1", "f\ud800", {})])], r"tool_calls\[0\].function.name: lone surrogate"),
    ([{"role": "system", "response_format": {"\ud800": 1}}], r"response_format \(a key\): lone surrogate"),
])
def test_bad_messages(messages, message):
    with pytest.raises(EncodingError, match=message):
        chat(messages)
    assert issubclass(EncodingError, ValueError)


def test_bad_messages_in_context_are_named():
    with pytest.raises(EncodingError, match=r"context\[0\]: unknown `role`"):
        chat([user("q")], context=[{"role": "bot"}])


def test_bad_options():
    with pytest.raises(ValueError, match="thinking_mode"):
        encode_messages([user("q")], thinking_mode="fast")
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode_messages([user("q")], thinking_mode="thinking", reasoning_effort="low")
    with pytest.raises(ValueError, match="thinking_mode"):
        parse_message_from_completion_text("x" + E, thinking_mode="Thinking")
    with pytest.raises(ValueError, match="must be a string"):
        parse_message_from_completion_text(b"x")
