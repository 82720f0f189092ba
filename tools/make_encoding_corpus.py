"""Record the differential corpus of the chat encoding from the official encoder.

    python tools/make_encoding_corpus.py PATH/TO/encoding_dsv4.py --revision COMMIT

The official file cannot be vendored, so this runs it once and records what it does. It draws
conversations and completions from the Hypothesis strategies of
tests/formats/test_encoding_strategies.py (derandomized: the same Hypothesis version gives the
same cases), adds fixed cases (issue 13's conversation and its neighbours; issue 27's completions,
spaced as the official parser reads but its encoder does not write), runs each through the
official `encode_messages` / `parse_message_from_completion_text`, and writes
tests/data/encoding_corpus/cases.jsonl (one case per line: its input and the official's prompt,
parse or error) and README.md (how it was made: official revision, file SHA-256, counts).
tests/formats/test_encoding_corpus.py replays it against refimpl. Nothing here is imported by refimpl.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "data" / "encoding_corpus"
# SHA-256 of the official release's encoding/encoding_dsv4.py
RELEASE_SHA256 = "bdbd57c132a1b3725042323d02b98b9d1df28e5f388f134399555d041f5055e0"


def load_official(path: Path):
    spec = importlib.util.spec_from_file_location("official_encoding_dsv4", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def draw(strategy, n: int, seed: int = 0) -> list:
    """n distinct examples of `strategy`, the same ones on every run of one Hypothesis version.

    Hypothesis tries the simplest values first, so the first examples of a run lean to the first
    choice of each field; n are taken at random (seeded) from the distinct examples of a long run.
    """
    from hypothesis import HealthCheck, Phase, given, settings
    found = {}

    @settings(max_examples=10 * n, database=None, derandomize=True, phases=[Phase.generate],
              deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example):
        key = json.dumps(example, ensure_ascii=False, sort_keys=True)
        found.setdefault(key, None)

    collect()
    keys = random.Random(seed).sample(sorted(found), min(n, len(found)))
    return [json.loads(k) for k in keys]          # as the test reads them back: JSON types only


def official_result(fn) -> dict:
    """{"prompt" / "parse": ...} or {"raises": "Type: message"} (a short message)."""
    try:
        return {"ok": fn()}
    except Exception as err:                                          # noqa: BLE001 - recorded as data
        return {"raises": f"{type(err).__name__}: {str(err)[:120]}"}


ISSUE_13 = [{"role": "system", "content": "42"}, {"role": "developer", "content": ""},
            {"role": "user", "content": "Beijing 42"},
            {"role": "assistant", "content": "", "reasoning_content": "weather"},
            {"role": "user", "content": "天气 北京"}, {"role": "assistant", "content": ""}]


def fixed_conversations() -> list:
    """Issue 13's conversation in each mode, and conversations like it (an empty developer
    message dropped or rendered, with tools that stop the dropping, as the last user turn)."""
    dev0 = {"role": "developer", "content": ""}
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    convs = [ISSUE_13,
             ISSUE_13[:2] + ISSUE_13[2:4],
             [dev0, {"role": "user", "content": "q"}],
             [{"role": "user", "content": "q"}, dev0],
             [dev0, {"role": "assistant", "content": "c", "reasoning_content": "r"},
              {"role": "user", "content": "q"}],
             [{"role": "system", "content": "S", "tools": [tool]}] + ISSUE_13[1:],
             [dev0, dev0, {"role": "latest_reminder", "content": "R"}, {"role": "user", "content": "q"}]]
    out = []
    for msgs in convs:
        for mode, drop in (("thinking", True), ("thinking", False), ("chat", True)):
            out.append([msgs, None, {"thinking_mode": mode, "drop_thinking": drop, "reasoning_effort": None}])
    out.append([ISSUE_13[4:], ISSUE_13[:4], {"thinking_mode": "thinking", "drop_thinking": True,
                                              "reasoning_effort": "max"}])
    return out


# Issue 27: a completion with one call with parameters and one without, as the encoder writes it
# (chat mode), and what is done to it: (id, why, [(old, new)] replaced once each in the text).
_CALLS = [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京", "days": 2}'}},
          {"type": "function", "function": {"name": "f", "arguments": "{}"}}]
FIXED_COMPLETIONS = [
    ("parse-ws-invoke-newline", "issue 27: a newline between <｜DSML｜invoke and name= (what failed the "
     "property): the name regex ^\\s*name=\"(.*?)\">\\n$ reads any whitespace there",
     [('invoke name="get_weather"', 'invoke\n name="get_weather"')]),
    ("parse-ws-invoke-none", "issue 27: no space between <｜DSML｜invoke and name= (\\s* reads none)",
     [('invoke name="get_weather"', 'invoke name="get_weather"'.replace(" ", ""))]),
    ("parse-ws-invoke-tab-nbsp", "issue 27: a tab and a no-break space before name= (\\s reads Unicode whitespace)",
     [('invoke name="f"', 'invoke\t\u00a0name="f"')]),
    ("parse-ws-head-extra-newline", "issue 27: a blank line before the first parameter ($ also matches "
     "before a final newline, so the head ends \">\\n\\n\")",
     [('name="get_weather">\n', 'name="get_weather">\n\n')]),
    ("parse-ws-head-no-blank-line", "issue 27: an invoke with no parameters and no blank line before its "
     "close (the encoder writes one)", [('name="f">\n\n', 'name="f">\n')]),
    ("parse-ws-value-newline-before-close", "issue 27: a newline between the value's < and "
     "/｜DSML｜parameter (the value regex ends <$)", [('2</', '2<\n/')]),
    ("parse-ws-false-value-newline", "issue 27: a string=\"false\" value ending in a newline, copied into "
     "the arguments as is", [('2</', '2\n</')]),
    ("parse-ws-parameter-newline", "issue 27, refused: a newline between <｜DSML｜parameter and name= "
     "(the parameter regex wants exactly one space)", [('parameter name="city"', 'parameter\n name="city"')]),
    ("parse-ws-before-gt", "issue 27, refused: a space before the head's > (the name regex wants \">)",
     [('name="f">', 'name="f" >')]),
    ("parse-cut-after-invoke-head", "cut inside the tool-call block after an invoke head: the official "
     "returns the calls read so far, refimpl refuses", [('<｜DSML｜parameter name="city"', '\0')]),
    ("parse-false-value-not-json", "a string=\"false\" value that is not JSON, copied into the arguments",
     [('>2<', '>2 days<')]),
]


def fixed_completions(official) -> list:
    """[(id, why, text)]: FIXED_COMPLETIONS applied to the official encoder's completion of _CALLS."""
    import test_encoding_strategies as strategies
    msg = {"role": "assistant", "content": "", "tool_calls": _CALLS}
    base = strategies.completion_of(msg, "chat", encode=official.encode_messages)
    out = []
    for case_id, why, edits in FIXED_COMPLETIONS:
        text = base
        for old, new in edits:
            assert text.count(old) >= 1, (case_id, old)
            text = text[:text.index(old)] if new == "\0" else text.replace(old, new, 1)
        out.append((case_id, why, text))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("official", type=Path, help="path to the official encoding/encoding_dsv4.py")
    ap.add_argument("--revision", default="unknown", help="the official commit the file comes from")
    ap.add_argument("--encode-cases", type=int, default=300)
    ap.add_argument("--parse-cases", type=int, default=150)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    sha256 = hashlib.sha256(args.official.read_bytes()).hexdigest()
    if sha256 != RELEASE_SHA256:
        print(f"warning: {args.official} has SHA-256 {sha256}, not the official release's", file=sys.stderr)
    official = load_official(args.official)
    sys.path.insert(0, str(REPO / "tests" / "formats"))
    import hypothesis
    import test_encoding_strategies as strategies

    cases = []
    conversations = fixed_conversations() + draw(strategies.conversations(), args.encode_cases)
    for msgs, context, options in conversations:
        result = official_result(lambda: official.encode_messages(
            copy.deepcopy(msgs), context=copy.deepcopy(context), **options))
        case = {"kind": "encode", "messages": msgs, "context": context, "options": options}
        cases.append(case | ({"prompt": result["ok"]} if "ok" in result else result))

    def official_completion(msg, mode):
        return strategies.completion_of(msg, mode, encode=official.encode_messages)

    for (msg, mode), edit in draw(st_pairs(strategies), args.parse_cases):
        text = strategies.apply_edit(official_completion(msg, mode), edit)
        result = official_result(lambda: official.parse_message_from_completion_text(text, mode))
        case = {"kind": "parse", "text": text, "thinking_mode": mode}
        if "ok" in result:
            # the official reads it back only if its own encoder gives the text again
            again = official_result(lambda: official_completion(result["ok"], mode))
            case |= {"parse": result["ok"],
                     "reads_back": again.get("ok") in (text, text + official.eos_token)}
        cases.append(case | ({} if "ok" in result else result))

    fixed = []
    for case_id, why, text in fixed_completions(official):
        result = official_result(lambda: official.parse_message_from_completion_text(text, "chat"))
        case = {"id": case_id, "why": why, "kind": "parse", "text": text, "thinking_mode": "chat"}
        if "ok" in result:
            again = official_result(lambda: official_completion(result["ok"], "chat"))
            case |= {"parse": result["ok"], "reads_back": again.get("ok") in (text, text + official.eos_token)}
        fixed.append(case | ({} if "ok" in result else result))

    args.out.mkdir(parents=True, exist_ok=True)
    cases = [{"id": f"{c['kind']}-{k:03d}", **c} for k, c in enumerate(cases)] + fixed
    lines = [json.dumps(c, ensure_ascii=False) for c in cases]
    (args.out / "cases.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    n_enc = sum(c["kind"] == "encode" for c in cases)
    n_enc_raise = sum(c["kind"] == "encode" and "raises" in c for c in cases)
    n_parse_raise = sum(c["kind"] == "parse" and "raises" in c for c in cases)
    n_no_back = sum(c.get("reads_back") is False for c in cases)
    size = (args.out / "cases.jsonl").stat().st_size
    (args.out / "README.md").write_text(README.format(
        revision=args.revision, sha256=sha256, hypothesis=hypothesis.__version__,
        python=sys.version.split()[0], n=len(cases), n_enc=n_enc, n_enc_raise=n_enc_raise,
        n_parse=len(cases) - n_enc, n_parse_raise=n_parse_raise, n_no_back=n_no_back, size=size, n_fixed=len(fixed),
        enc=args.encode_cases, par=args.parse_cases), encoding="utf-8")
    print(f"{len(cases)} cases ({n_enc} encode, {len(cases) - n_enc} parse), {size} bytes -> {args.out}")
    return 0


def st_pairs(strategies):
    from hypothesis import strategies as st
    return st.tuples(strategies.assistant_turns(), strategies.edits())


README = """# Differential corpus of the chat encoding

Inputs, and what the official DeepSeek V4 encoder does with them, recorded once from the official
file (which cannot be vendored). `tests/formats/test_encoding_corpus.py` replays every case
against `refimpl.formats.encoding`.

- Official file: `encoding/encoding_dsv4.py`, SHA-256 `{sha256}`
  (the official release's file), taken from revision `{revision}`.
- Made by `python tools/make_encoding_corpus.py PATH/TO/encoding_dsv4.py --revision {revision}`
  (defaults `--encode-cases {enc} --parse-cases {par}`) with Hypothesis {hypothesis} and Python
  {python}: the strategies of `tests/formats/test_encoding_strategies.py`, derandomized, plus the
  fixed cases of the script: issue 13's conversation in each mode, and conversations like it;
  {n_fixed} completions with ids `parse-ws-*`, `parse-cut-*`, `parse-false-*`, each with a `why`:
  issue 27's spacings in a tool-call block that the official parser reads (its name regex
  `^\\s*name="(.*?)">\\n$`, E:L659) but its encoder never writes, two spacings it refuses, a
  completion cut inside the block, and a string="false" value that is not JSON.
- `cases.jsonl`: {n} cases, {size} bytes, one JSON object a line:
  - {n_enc} `encode` cases: `messages`, `context`, `options` (keyword arguments) and the
    official's `prompt`, or `raises` ({n_enc_raise} cases) with the official's error;
  - {n_parse} `parse` cases: a completion `text` (an assistant turn rendered by the official
    encoder, sometimes cut or with a piece inserted) and `thinking_mode`, and the official's
    `parse`, or `raises` ({n_parse_raise} cases); `reads_back` is false ({n_no_back} cases) where
    the official's encoder does not give the text back from the official's parse.

The replay asks: a prompt or parse byte-identical to the official's wherever the official gives
one; an `EncodingError` wherever the official raises. The one allowed difference: refimpl may
refuse a completion the official parses but cannot read back (`reads_back` false), such as one cut
off inside its tool-call block; not a `parse-ws-*` case, which refimpl reads as the official does
(test_whitespace_the_official_reads_in_a_tool_call_is_read_the_same). Regenerate after changing
the strategies; a new Hypothesis version draws other cases, which is fine: the official decides
each one.
"""

if __name__ == "__main__":
    sys.exit(main())
