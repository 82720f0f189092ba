"""Hypothesis drives the command's file inputs through `refimpl.cli.main.main` in-process: config.json,
chat JSON, completion text and token lists. Whatever it draws, the outcome is a success, or one
line `error: ...` with exit 1 (a refused file) or 2 (a malformed flag value); never a traceback, and no file left behind
(no `*.tmp-*` anywhere, the output present exactly when the command succeeded)."""
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refimpl.cli.main import main
from refimpl.formats.encoding import (ASSISTANT, BOS, DSML, EOS, ROLES, TASK_TOKENS, THINK_END, THINK_START,
                                      USER)

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# JSON values, from scalars to small nested lists and objects (lone surrogates included in text)
SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                            max_size=3), max_leaves=8)
DEEP = st.integers(1, 5000).map(lambda n: "[" * n + "]" * n)
NOT_JSON = st.binary(max_size=64)


def run(capsys, argv, folder, out=None, codes=(0, 1)):
    """Run argv and check the outcome (exit code in `codes`: a bad file is a refused input, 1); -> the exit code."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err and code in codes, (code, err)
    if code != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert not [p for p in folder.rglob("*") if ".tmp-" in p.name], "a temporary was left behind"
    if out is not None:
        assert out.exists() == (code == 0)
    return code


def write(path, value):
    """value: bytes as they are, str as UTF-8 (surrogates escaped so as to reach the JSON parser), else JSON."""
    if isinstance(value, bytes):
        path.write_bytes(value)
    elif isinstance(value, str):
        path.write_bytes(value.encode("utf-8", "surrogatepass"))
    else:
        path.write_text(json.dumps(value))


@pytest.fixture
def ck(tiny_ckpt, tmp_path):
    """A checkpoint folder whose config.json the test rewrites; the shards are links to the tiny one's."""
    out = tmp_path / "ck"
    out.mkdir()
    for f in tiny_ckpt.iterdir():
        (os.link if f.suffix == ".safetensors" else shutil.copy)(f, out / f.name)
    return out


def _config_mutations(base: dict):
    keys = st.sampled_from(sorted(base)) | st.text(max_size=8)
    set_key = st.tuples(keys, JSON).map(lambda kv: {**base, kv[0]: kv[1]})
    numeric = sorted(k for k, v in base.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    number = st.integers(-2, 300) | st.sampled_from([0, 2**31, 10**8]) | st.floats(-1e6, 1e6)
    nudge = st.tuples(st.sampled_from(numeric), number).map(lambda kv: {**base, kv[0]: kv[1]})  # plausible values
    drop_key = st.sampled_from(sorted(base)).map(lambda k: {n: v for n, v in base.items() if n != k})
    rope = (JSON | number).map(lambda v: {**base, "rope_scaling": {**base["rope_scaling"], "factor": v}})
    return st.one_of(nudge, nudge, set_key, drop_key, rope, JSON, DEEP, NOT_JSON)


def test_fuzz_config_json(ck, tmp_path, capsys, tiny_ckpt):
    base = json.loads((tiny_ckpt / "config.json").read_text())

    @FUZZ
    @given(config=_config_mutations(base))
    def check(config):
        write(ck / "config.json", config)
        out = tmp_path / "t.st"
        out.unlink(missing_ok=True)
        run(capsys, ["trace", ck, "--tokens", "0,7,3", "--sites", "logits", "--out", out], tmp_path, out)
    check()


def _messages():
    role = st.sampled_from(ROLES) | st.text(max_size=5)
    key = st.sampled_from(["role", "content", "reasoning_content", "task", "tool_calls", "tools", "tool_call_id",
                           "response_format", "name"]) | st.text(max_size=5)
    task = st.sampled_from(sorted(TASK_TOKENS)) | JSON
    call = st.fixed_dictionaries({"type": st.just("function"), "id": st.text(max_size=4),
                                  "function": st.fixed_dictionaries({"name": st.text(max_size=5),
                                                                     "arguments": JSON.map(json.dumps) | st.text()})})
    message = st.fixed_dictionaries({"role": role, "content": st.none() | st.text(max_size=20)},
                                    optional={"task": task, "tool_calls": st.lists(call, max_size=2) | JSON,
                                              "reasoning_content": st.text(max_size=10),
                                              "tool_call_id": st.text(max_size=4)})
    loose = st.dictionaries(key, JSON, max_size=4)
    clean = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                            "content": st.text(max_size=20)}), min_size=1, max_size=3)
    return st.one_of(clean, clean, st.lists(message, max_size=3), st.lists(message | loose, max_size=4),
                     JSON, DEEP, NOT_JSON)


def test_fuzz_chat_json(ck, tmp_path, capsys):
    @FUZZ
    @given(messages=_messages(), thinking=st.booleans())
    def check(messages, thinking):
        chat = tmp_path / "chat.json"
        write(chat, json.dumps(messages) if not isinstance(messages, (str, bytes)) else messages)
        flags = ["--thinking"] if thinking else []
        code = run(capsys, ["encode", chat, *flags], tmp_path)
        if code == 0:                                            # encodable: tokenized for a (tiny) generation
            run(capsys, ["generate", ck, "--chat", chat, "--max-new-tokens", "0", *flags], tmp_path)
    check()


FRAGMENTS = [BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, "\n\n", "<", ">", '"', "=", "/",
             f"<{DSML}tool_calls>", f"</{DSML}tool_calls>", f'<{DSML}invoke name="f">', f"</{DSML}invoke>",
             f'<{DSML}parameter name="x" string="true">', f'<{DSML}parameter name="y" string="false">',
             f"</{DSML}parameter>", "1", "{}", "hi"]


def test_fuzz_completion_text(tmp_path, capsys):
    part = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=15).map("".join)
    # [reasoning </think>] content [EOS]: the shape of a completion, with anything inside
    text = st.tuples(part, st.sampled_from(["", THINK_END]), part, st.sampled_from(["", EOS, EOS])).map("".join)

    @FUZZ
    @given(completion=text | NOT_JSON, thinking=st.booleans())
    def check(completion, thinking):
        f = tmp_path / "completion.txt"
        write(f, completion)
        run(capsys, ["parse", f] + (["--thinking"] if thinking else []), tmp_path)
    check()


def test_fuzz_token_lists(ck, tmp_path, capsys):
    ids = st.lists(st.integers(-3, 1300) | st.integers(-2**70, 2**70), max_size=6).map(lambda v: ",".join(map(str, v)))
    raw = st.text(alphabet="0123456789,- x.+_e", max_size=12)

    @settings(FUZZ, max_examples=40)                             # each success runs a forward pass
    @given(tokens=ids | raw, chunks=st.none() | st.text(alphabet="0123456789,", min_size=1, max_size=6))
    def check(tokens, chunks):
        out = tmp_path / "t.st"
        out.unlink(missing_ok=True)
        argv = ["trace", ck, "--tokens", tokens, "--sites", "embed", "--out", out]
        run(capsys, argv + (["--chunks", chunks] if chunks else []), tmp_path, out, codes=(0, 1, 2))  # 2: malformed
    check()
