"""Issue 19, items 7 and 8: every file the CLI reads and every bundle manifest is parsed and
bounded in one place, so hostile content is one plain sentence, never a traceback.

- CLI input files (`add --jsonl`, `load`, `ingest`'s questions and outputs, the passphrase
  file and EDGE_PLLM_PASSPHRASE): integers of thousands of digits, nesting tens of thousands
  deep, NaN, invalid UTF-8, lone surrogates, wrong JSON types in every field, dates that
  overflow in UTC. Each is exit status 1 with one line "Error: ..." and the store unchanged
  (or an accepted input). Numeric options are bounded by click (exit 2).
- Manifests: the same hostile JSON, and out-of-range or mistyped values in every field,
  are a BundleError (a head's fields: the head refused, `plug_error`); an embedder whose
  vectors are not the manifest's `dim` wide is refused before a database is made; a bundle
  file that is a symbolic link, or resolves outside the bundle folder, is refused.

Regression tests replay the reviewer's reproducers; hypothesis fuzzes each input class.
Counts go to the run's "security counts" section, measured in each test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("hypothesis")
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edge_pllm.cli as cli_module
from edge_pllm import LLMConfig, PersonalLLM
from edge_pllm.cli import cli, normalize_passphrase
from edge_pllm.defaults import assemble_bundle, default_llm_source, shipped_bundle_dir
from edge_pllm.errors import BundleError, InvalidInputError
from edge_pllm.evaluate import _load_done
from edge_pllm.inference.bundle import FORMATS, MANIFEST, STAMP, load_bundle
from edge_pllm.inference.embedder import Embedder
from edge_pllm.jsonio import parse_json
from edge_pllm.paths import database_path
from edge_pllm.storage.items import NewItem, normalize_time, read_jsonl, validate_item
from edge_pllm.storage.store import HistoryStore

SETTINGS = dict(
    deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
FAST, MANY = 60, 500  # examples per fuzz: the default run, and `-m slow`
OVERFLOWING_DATES = ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"]

# --- hostile JSON, as text (json.dumps cannot write an integer of 4,400 digits) ------------


def nest(depth: int, kind: str, inner: str) -> str:
    if kind == "array":
        return "[" * depth + inner + "]" * depth
    return '{"a":' * depth + inner + "}" * depth


def obj(fields: dict[str, str | None]) -> str:
    """A JSON object from already-encoded values; a None value leaves its key out."""
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in fields.items() if v is not None) + "}"


NUMBER_TEXT = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(
        [
            *("0", "-1", "-0", "1.0", "384.0", "1e400", "-1e400", "1e-400", "NaN", "Infinity"),
            *("-Infinity", "65536", "65537", "100000", "100001", "1024", "1025", "2.5e3"),
        ]
    ),
    st.integers(60, 5000).map(lambda n: "9" * n),  # past 64 digits, and past Python's 4,300
)
SCALAR_TEXT = st.one_of(
    NUMBER_TEXT,
    st.sampled_from(["true", "false", "null", '""', '"384"']),
    st.text(max_size=12).map(json.dumps),  # lone surrogates come through as \ud800 escapes
)
JSON_TEXT = st.recursive(
    SCALAR_TEXT,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.dictionaries(st.text(max_size=6), inner, max_size=3).map(obj),
    ),
    max_leaves=6,
)
HOSTILE_TEXT = st.one_of(
    JSON_TEXT,
    st.tuples(st.integers(20, 60_000), st.sampled_from(["array", "object"]), SCALAR_TEXT).map(
        lambda t: nest(*t)
    ),
    st.text(max_size=16),  # not JSON at all, mostly
)
DATE_TEXT = st.sampled_from(
    [*OVERFLOWING_DATES, "2024-05-01", "2024-02-30", "9999-12-31", "0000-01-01", "24:00", ""]
).map(json.dumps)


def field(good: str) -> st.SearchStrategy[str | None]:
    """A field's encoded value: left out (None), the good one, or anything hostile."""
    return st.one_of(st.none(), st.just(good), HOSTILE_TEXT)


def as_file(lines: list[str | bytes]) -> bytes:
    return b"\n".join(
        x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in lines
    )


def item_line(good: dict[str, str], hostile: bool) -> st.SearchStrategy[str]:
    """A JSON object with the good encoded `good` values; `hostile`: each may also be left
    out or be anything hostile (so a few come through whole, most do not)."""
    values = {k: (field(v) if hostile else st.just(v)) for k, v in good.items()}
    return st.fixed_dictionaries(values).map(obj)


GOOD_ITEM = {"text": '"fix: a typo"', "kind": '"note"', "created_at": '"2024-05-01"'}
GOOD_ITEM |= {"metadata": '{"k": 1}'}
ITEM_LINE = st.one_of(
    item_line(GOOD_ITEM, hostile=True),
    DATE_TEXT.map(lambda d: obj({"text": '"dated"', "created_at": d})),
    HOSTILE_TEXT,
    st.binary(max_size=30),
)
JSONL_FILE = st.one_of(
    st.lists(item_line(GOOD_ITEM, hostile=False), min_size=1, max_size=3).map(as_file),
    st.lists(ITEM_LINE, max_size=4).map(as_file),
    st.binary(max_size=60),
)

GOOD_ENTRY = {"text": '"body one"', "title": '"T1"', "date": '"2020-01-01"'}
ENTRY = st.one_of(
    item_line(GOOD_ENTRY, hostile=True),
    DATE_TEXT.map(lambda d: obj({"text": '"dated"', "date": d})),
    HOSTILE_TEXT,
)


def array(items: st.SearchStrategy[str], min_size: int = 0) -> st.SearchStrategy[str]:
    return st.lists(items, min_size=min_size, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]")


def question(profile: st.SearchStrategy[str], hostile: bool) -> st.SearchStrategy[str]:
    good = {"id": st.sampled_from(['"q1"', "7", '"q-2"']), "input": st.just('"x"')}
    if hostile:
        good = {k: st.one_of(v, st.none(), HOSTILE_TEXT) for k, v in good.items()}
    fields = st.fixed_dictionaries({**good, "profile": profile})
    return fields.map(obj)


GOOD_PROFILE = array(item_line(GOOD_ENTRY, hostile=False), min_size=1)
GOOD_QUESTIONS = array(question(GOOD_PROFILE, hostile=False), min_size=1)
QUESTIONS_FILE = st.one_of(
    GOOD_QUESTIONS.map(lambda t: as_file([t])),
    GOOD_QUESTIONS.map(lambda t: as_file([t])),  # twice: more files that are accepted whole
    array(question(st.one_of(array(ENTRY), field("[]")), hostile=True)).map(lambda t: as_file([t])),
    HOSTILE_TEXT.map(lambda t: as_file([t])),
    st.binary(max_size=40),
)
GOLD = {"id": '"q1"', "output": '"out"'}
OUTPUTS_FILE = st.one_of(
    st.none(),  # no outputs file beside the questions
    st.just(as_file([obj({"task": '"LaMP_4"', "golds": "[" + obj(GOLD) + "]"})])),
    st.just(as_file([obj({"task": '"LaMP_4"'})])),
    st.builds(
        lambda task, golds: as_file([obj({"task": task, "golds": golds})]),
        field('"LaMP_4"'),
        st.one_of(array(item_line(GOLD, hostile=True)), field("[]")),
    ),
    HOSTILE_TEXT.map(lambda t: as_file([t])),
    st.binary(max_size=40),
)


# --- the CLI on one shared runtime (loading is tested below, not here) -----------------------


def snapshot(store: HistoryStore) -> tuple:
    users = [(u.name, u.items) for u in store.users()]
    items = {
        name: [
            (i.id, i.text, i.kind, i.created_at, json.dumps(i.metadata)) for i in store.items(name)
        ]
        for name, _ in users
    }
    return users, items, store.vector_count()


@pytest.fixture(scope="module")
def shared(default_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("hardening-home")
    with PersonalLLM(default_bundle, home=home, llm_config=LLMConfig(n_ctx=512, n_threads=1)) as p:
        p.add("alice", ["fix: a typo", "feat: a flag"])
        yield p


@pytest.fixture
def invoke(shared: PersonalLLM, default_bundle: Path, monkeypatch: pytest.MonkeyPatch):
    """Run the CLI on the shared runtime's store; returns (result, store unchanged?)."""
    monkeypatch.setattr(shared, "close", lambda: None)
    monkeypatch.setattr(cli_module, "PersonalLLM", lambda *a, **kw: shared)
    runner = CliRunner()

    def run(*args: str, input: bytes | None = None):
        before = snapshot(shared.store)
        result = runner.invoke(cli, ["--bundle", str(default_bundle), *args], input=input)
        return result, snapshot(shared.store) == before

    return run


class Tally:
    """Outcomes of CLI runs, counted as they happen: exit codes and tracebacks."""

    def __init__(self) -> None:
        self.exits: Counter[int] = Counter()
        self.tracebacks = 0

    @property
    def cases(self) -> int:
        return sum(self.exits.values())

    def check(self, result: Any, unchanged: bool, accepted: bool = True) -> None:
        """Exit 0 (when `accepted` may happen), or exit 1 with one line "Error: ..." and the
        store as it was; never an uncaught exception or a traceback."""
        crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
        if crashed or "Traceback" in result.output:
            self.tracebacks += 1
        self.exits[result.exit_code] += 1
        assert not crashed, f"{result.exception!r}\n{result.output}"
        assert "Traceback" not in result.output
        assert result.exit_code in ((0, 1) if accepted else (1,)), result.output
        if result.exit_code == 1:
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
            assert len(lines[0]) < 1000, "a sentence, not a dump of the input"
            assert unchanged, "refused input changed the store"

    def line(self, what: str) -> str:
        exits = dict(sorted(self.exits.items()))
        return f"{self.cases} {what}, exit codes {exits}: {self.tracebacks} tracebacks"


# --- regressions: the reviewer's reproducers -------------------------------------------------


def test_jsonl_with_a_4400_digit_integer_or_deep_nesting_is_one_sentence(invoke, tmp_path: Path):
    big = tmp_path / "big.jsonl"
    big.write_text('{"text": "a", "metadata": {"n": ' + "9" * 4400 + "}}\n")
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "a", "metadata": ' + nest(50_000, "array", "1") + "}\n")
    for args, path, message in [
        (("add", "alice", "-f", str(big), "--jsonl"), big, "integer of 4400 digits"),
        (("load", "alice", str(deep)), deep, "nested too deeply"),
    ]:
        result, unchanged = invoke(*args)
        Tally().check(result, unchanged, accepted=False)
        assert message in result.output and f"Line 1 of {path}" in result.output


def test_item_fields_of_the_wrong_type_or_out_of_range_are_refused(invoke, tmp_path: Path):
    for date in OVERFLOWING_DATES:
        with pytest.raises(ValueError):  # not OverflowError: callers catch ValueError
            normalize_time(date)
        with pytest.raises(InvalidInputError) as err:
            validate_item({"text": "a", "created_at": date})
        assert err.value.field == "created_at"
    dated = tmp_path / "dated.jsonl"
    dated.write_text(json.dumps({"text": "a", "created_at": OVERFLOWING_DATES[0]}) + "\n")
    result, unchanged = invoke("load", "alice", str(dated))
    Tally().check(result, unchanged, accepted=False)
    assert "created_at" in result.output

    deep: dict[str, Any] = {}
    node = deep
    for _ in range(5000):  # far past the recursion limit of json.dumps
        node["a"] = {}
        node = node["a"]
    loop: dict[str, Any] = {}
    loop["self"] = loop
    shared: list[Any] = [1]
    for _ in range(30):  # 10**30 values through shared references: refused, not walked
        shared = [shared] * 10
    fifty = json.loads(nest(50, "object", "1"))
    too_big = ({"x": "y" * 200_000}, {"s": shared})
    for metadata in (fifty, deep, loop, [], 0, "x", {"n": float("nan")}, *too_big):
        with pytest.raises(InvalidInputError) as err:
            validate_item({"text": "a", "metadata": metadata})
        assert err.value.field == "metadata"
    thirty = json.loads(nest(30, "object", "1"))
    assert validate_item({"text": "a", "metadata": thirty}).metadata == thirty
    for kind in (0, False, [], 5):  # a wrong kind is refused, not replaced by "text"
        with pytest.raises(InvalidInputError):
            validate_item({"text": "a", "kind": kind})
    assert validate_item({"text": "a", "kind": None, "metadata": None}) == NewItem("a")


LAMP_QUESTIONS = json.dumps([{"id": "q1", "input": "x", "profile": [{"text": "body"}]}])


@pytest.mark.parametrize(
    ("questions", "outputs", "message"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"\xff\xfe[]", None, "not valid UTF-8"),
        (b'[{"id": "q1", "input": "x", "profile": 5}]', None, "profile of question 0"),
        (b'[{"id": "q1", "input": "x"}]', None, "has no 'profile'"),
        (b'[{"id": {"a": 1}, "input": "x", "profile": []}]', None, "id of question 0"),
        (b'[{"id": "q1", "input": 5, "profile": []}]', None, "input of question 0"),
        (b'[{"id": "q1", "input": "x", "profile": [[1]]}]', None, "profile entry 0"),
        (b'[{"id": "q1", "input": "x", "profile": [{"text": {"a": 1}}]}]', None, "'text'"),
        (b'{"questions": []}', None, "not a list of questions"),
        (b"[" + b"9" * 5000 + b"]", None, "integer of 5000 digits"),
        (nest(40_000, "array", "1").encode(), None, "nested too deeply"),
        (LAMP_QUESTIONS.encode(), b"[1, 2]", "not an object with 'task' and 'golds'"),
        (LAMP_QUESTIONS.encode(), b'{"task": 5}', "task is a JSON number"),
        (LAMP_QUESTIONS.encode(), b'{"task": "LaMP_4", "golds": [1]}', "gold 0"),
        (LAMP_QUESTIONS.encode(), b'{"task": "LaMP_4", "golds": [{"id": "q1"}]}', "'output'"),
        (LAMP_QUESTIONS.encode(), b"\xc3\x28", "not valid UTF-8"),
        (
            json.dumps(
                [
                    {"id": "q1", "input": "x", "profile": [{"text": "fine"}]},
                    {"id": "q2", "input": "x", "profile": [{"text": "bad\u0000"}]},
                ]
            ).encode(),
            None,
            "NUL byte",  # the second question: the first must not be stored either
        ),
    ],
)
def test_ingest_refuses_a_malformed_lamp_file_in_one_sentence(
    invoke, tmp_path: Path, questions: bytes, outputs: bytes | None, message: str
):
    path = tmp_path / "dev_questions.json"
    path.write_bytes(questions)
    if outputs is not None:
        (tmp_path / "dev_outputs.json").write_bytes(outputs)
    result, unchanged = invoke("ingest", str(path), "--task", "LaMP_4")
    Tally().check(result, unchanged, accepted=False)
    assert message in result.output
    assert "dev_questions.json" in result.output or "dev_outputs.json" in result.output


def test_numeric_options_are_bounded_by_click(invoke, tmp_path: Path):
    questions = tmp_path / "dev_questions.json"
    questions.write_text(LAMP_QUESTIONS)
    huge = "9" * 400
    for args in [
        ("--n-ctx", huge, "users"),
        ("--n-ctx", "-1", "users"),
        ("search", "alice", "x", "-k", "0"),
        ("items", "alice", "--limit", "-5"),
        ("ingest", str(questions), "--limit", "0"),
        ("eval", str(tmp_path), "--limit", "0"),
        ("serve", "--port", "70000"),
    ]:
        result, unchanged = invoke(*args)
        assert result.exit_code == 2 and "Error: Invalid value" in result.output, args
        assert "Traceback" not in result.output and unchanged


def test_other_cli_inputs_are_one_sentence(invoke, tmp_path: Path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    tally = Tally()
    for args, stdin, message in [
        (("search", "alice", "\ud800"), None, "unpaired surrogates"),
        (("ask", "alice", "-", "-n", "1"), b"\xff\xfe hi", "prompt is not valid UTF-8"),
        (("--home", str(a_file), "users"), None, str(a_file)),
    ]:
        result, unchanged = invoke(*args, input=stdin)
        tally.check(result, unchanged, accepted=False)
        assert message in result.output


PASS = "correct horse ' battery"


@pytest.fixture
def encrypted_home(default_bundle: Path, tmp_path: Path) -> Path:
    pytest.importorskip("sqlcipher3", reason="encryption needs the [encryption] extra")
    home = tmp_path / "enc-home"
    with PersonalLLM(default_bundle, home=home, passphrase=PASS) as p:
        p.add("alice", "encrypted history")
    return home


def test_a_passphrase_means_the_same_from_a_file_and_from_the_environment(
    default_bundle: Path, encrypted_home: Path, tmp_path: Path, monkeypatch
):
    base = ["--bundle", str(default_bundle), "--home", str(encrypted_home)]
    runner = CliRunner()
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("pässwort\n".encode("latin-1"))
    result = runner.invoke(cli, [*base, "--passphrase-file", str(not_utf8), "users"])
    Tally().check(result, True, accepted=False)
    assert "not valid UTF-8" in result.output and str(not_utf8) in result.output
    for written in (PASS + "\n", PASS + "\r\n", PASS):
        monkeypatch.setenv("EDGE_PLLM_PASSPHRASE", written)  # as `export X="$(cat f)"` or not
        assert runner.invoke(cli, [*base, "users"]).output.startswith("alice\t1 item")
        monkeypatch.delenv("EDGE_PLLM_PASSPHRASE")
        secret = tmp_path / "secret.txt"
        secret.write_bytes(written.encode())
        from_file = runner.invoke(cli, [*base, "--passphrase-file", str(secret), "users"])
        assert from_file.output.startswith("alice\t1 item"), from_file.output
    for raw in ("a\n", "a\r\n", "a", "a\nb", "a \n", " a\r\n\r\n"):
        assert normalize_passphrase(raw, "env") == normalize_passphrase(raw.encode(), "file")
    assert normalize_passphrase(" a \r\n", "x") == " a "  # spaces are part of a passphrase


# --- fuzz: every CLI input file --------------------------------------------------------------


def run_jsonl_fuzz(invoke, folder: Path, examples: int) -> Tally:
    tally = Tally()

    @settings(max_examples=examples, **SETTINGS)
    @given(content=JSONL_FILE, command=st.sampled_from(["add", "load"]))
    def prop(content: bytes, command: str) -> None:
        path = folder / f"case{tally.cases}.jsonl"
        path.write_bytes(content)
        if command == "add":
            result, unchanged = invoke("add", "fz", "-f", str(path), "--jsonl")
        else:
            result, unchanged = invoke("load", "fz", str(path))
        tally.check(result, unchanged)

    prop()
    return tally


def test_jsonl_files_fuzz(invoke, tmp_path: Path, report_counts):
    tally = run_jsonl_fuzz(invoke, tmp_path, FAST)
    report_counts(tally.line("add --jsonl / load files"))


@pytest.mark.slow
def test_jsonl_files_fuzz_many(invoke, tmp_path: Path, report_counts):
    tally = run_jsonl_fuzz(invoke, tmp_path, MANY)
    report_counts(tally.line("add --jsonl / load files"))


def test_jsonl_reader_refuses_what_parse_json_refuses():
    """read_jsonl parses each line as parse_json does (the one JSON boundary)."""
    for line in ("9" * 4400, nest(40, "array", "1"), "NaN", "1e400", '{"text": "a"'):
        with pytest.raises(InvalidInputError):
            parse_json(line, "x")
        with pytest.raises(InvalidInputError, match=r"Line 1 of f\.jsonl"):
            list(read_jsonl([line], "f.jsonl"))


def run_ingest_fuzz(invoke, folder: Path, examples: int) -> Tally:
    tally = Tally()

    @settings(max_examples=examples, **SETTINGS)
    @given(questions=QUESTIONS_FILE, outputs=OUTPUTS_FILE, with_task=st.booleans())
    def prop(questions: bytes, outputs: bytes | None, with_task: bool) -> None:
        case = folder / f"case{tally.cases}"
        case.mkdir()
        (case / "dev_questions.json").write_bytes(questions)
        if outputs is not None:
            (case / "dev_outputs.json").write_bytes(outputs)
        task = ("--task", "LaMP_4") if with_task else ()
        path = str(case / "dev_questions.json")
        result, unchanged = invoke("ingest", path, *task, "--user-prefix", "fz-")
        tally.check(result, unchanged)

    prop()
    return tally


def test_ingest_files_fuzz(invoke, tmp_path: Path, report_counts):
    report_counts(run_ingest_fuzz(invoke, tmp_path, FAST).line("ingest questions/outputs"))


@pytest.mark.slow
def test_ingest_files_fuzz_many(invoke, tmp_path: Path, report_counts):
    report_counts(run_ingest_fuzz(invoke, tmp_path, MANY).line("ingest questions/outputs"))


OPENING = {PASS, PASS + "\n", PASS + "\r\n", PASS + "\n\n", PASS + "\nsecond line"}
PASSPHRASES = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [*OPENING, PASS + " ", " " + PASS, PASS + "\r", "\n" + PASS, "", "\n", "\r\n", "a\x00b"]
    ).map(str.encode),
)


def run_passphrase_fuzz(default_bundle: Path, home: Path, folder: Path, examples: int) -> Tally:
    """The real runtime per invocation: the passphrase goes all the way to SQLCipher."""
    tally = Tally()
    runner = CliRunner()
    db = database_path(home)

    def state() -> bytes:
        return hashlib.sha256(db.read_bytes()).digest()

    @settings(max_examples=examples, **SETTINGS)
    @given(content=PASSPHRASES, from_env=st.booleans())
    def prop(content: bytes, from_env: bool) -> None:
        base = ["--bundle", str(default_bundle), "--home", str(home)]
        env = {"EDGE_PLLM_PASSPHRASE": None}
        if from_env and b"\x00" not in content:  # an environment cannot hold NUL
            env["EDGE_PLLM_PASSPHRASE"] = content.decode("utf-8", "surrogateescape")
        else:
            path = folder / f"pass{tally.cases}"
            path.write_bytes(content)
            base += ["--passphrase-file", str(path)]
        before = state()
        result = runner.invoke(cli, [*base, "users"], env=env)
        tally.check(result, state() == before)
        opens = content in {p.encode() for p in OPENING}
        assert (result.exit_code == 0) == opens, (content, result.output)

    prop()
    return tally


def test_passphrase_fuzz(default_bundle, encrypted_home, tmp_path: Path, report_counts):
    tally = run_passphrase_fuzz(default_bundle, encrypted_home, tmp_path, 40)
    report_counts(tally.line("passphrase files and variables"))


@pytest.mark.slow
def test_passphrase_fuzz_many(default_bundle, encrypted_home, tmp_path: Path, report_counts):
    tally = run_passphrase_fuzz(default_bundle, encrypted_home, tmp_path, 300)
    report_counts(tally.line("passphrase files and variables"))


def test_damaged_prediction_lines_are_redone_not_a_crash(tmp_path: Path):
    path = tmp_path / "predictions.jsonl"
    good = {"split": "dev", "strategy": "none", "id": "q1", "output": "o", "seconds": 0.1}
    lines = [json.dumps(good), nest(5000, "array", "1"), "9" * 5000, "[1]", '{"split": 1}']
    path.write_text("\n".join(lines) + '\n{"cut')
    assert list(_load_done(path)) == [("dev", "none", "q1")]


# --- manifests -------------------------------------------------------------------------------


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def write_manifest(bundle: Path, manifest: dict, hole: str | None = None) -> None:
    """Write `manifest`; `hole` (raw JSON text) replaces the value "@@HOLE@@"."""
    text = json.dumps(manifest)
    if hole is not None:
        text = text.replace('"@@HOLE@@"', hole)
    (bundle / MANIFEST).write_text(text, encoding="utf-8", errors="surrogatepass")


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("embedder", "dim"), "0", "embedder.dim must be a positive integer (at most 65,536)"),
        (("embedder", "dim"), "-1", "embedder.dim"),
        (("embedder", "dim"), "65537", "embedder.dim"),
        (("embedder", "dim"), '"384"', "embedder.dim"),
        (("embedder", "dim"), "384.0", "embedder.dim"),
        (("embedder", "dim"), "true", "embedder.dim"),
        (("embedder", "dim"), "9" * 4400, "integer of 4400 digits"),
        (("embedder", "max_seq_length"), "-1", "embedder.max_seq_length"),
        (("embedder", "max_seq_length"), "100001", "embedder.max_seq_length"),
        (("embedder", "pooling"), '"sum"', "embedder.pooling"),
        (("embedder", "int8"), '"yes"', "embedder.int8"),
        (("llm", "n_embd"), "0", "llm.n_embd"),
        (("llm", "architecture"), "5", "llm.architecture"),
        (("llm",), "[]", "incomplete or malformed: llm must be an object"),
        (("format",), "true", "manifest format True"),
        (("name",), nest(50_000, "array", "1"), "nested too deeply"),
        (("name",), r'"\ud800"', "name must be a non-empty string"),  # no terminal can show it
        (("llm", "chat_template"), "1e400", "too large for a float"),
        (("embedder", "normalize"), "NaN", "NaN"),
    ],
)
def test_malformed_manifest_fields_are_bundle_errors(
    bundle_copy: Path, path: tuple[str, ...], value: str, message: str
):
    m = manifest_of(bundle_copy)
    section = m
    for key in path[:-1]:
        section = section[key]
    section[path[-1]] = "@@HOLE@@"
    write_manifest(bundle_copy, m, value)
    with pytest.raises(BundleError, match=None) as err:
        load_bundle(bundle_copy)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [("n_soft", 0), ("n_soft", 10**6), ("max_history", -1), ("d_enc", 0), ("max_seq_length", -1)],
)
def test_malformed_head_fields_refuse_the_head(bundle_copy: Path, key: str, value: int):
    m = manifest_of(bundle_copy)
    if not m.get("plug"):
        pytest.skip("the default bundle carries no Persona-Plug head")
    m["plug"][key] = value
    write_manifest(bundle_copy, m)
    bundle = load_bundle(bundle_copy)
    assert bundle.plug is None and key in str(bundle.plug_error)
    with pytest.raises(BundleError, match=key):
        bundle.require_plug()


@pytest.mark.parametrize("dim", [383, 768])
def test_a_wrong_dim_is_refused_before_a_database_is_made(bundle_copy: Path, dim: int):
    m = manifest_of(bundle_copy)
    m["embedder"]["dim"] = dim
    m.pop("plug", None)  # the head's own d_enc check is not what this tests
    write_manifest(bundle_copy, m)
    home = bundle_copy.parent / "home"
    with pytest.raises(BundleError, match=f"makes 384-dim vectors.*dim {dim}"):
        PersonalLLM(bundle_copy, home=home)
    assert not database_path(home).exists()


def test_a_model_without_a_declared_width_is_probed(bundle_copy: Path):
    """An embedder whose output shape is dynamic is measured on a short text instead."""
    onnx = pytest.importorskip("onnx")
    path = bundle_copy / "embedder.onnx"
    model = onnx.load(str(path))
    last = model.graph.output[0].type.tensor_type.shape.dim[-1]
    last.ClearField("dim_value")
    last.dim_param = "hidden"
    onnx.save(model, str(path))
    m = manifest_of(bundle_copy)
    data = path.read_bytes()
    m["files"]["embedder.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    write_manifest(bundle_copy, m)
    b = load_bundle(bundle_copy)
    tok = b.file(b.embedder.tokenizer)
    assert Embedder(path, tok, b.embedder.config).embed_one("still works").shape == (384,)
    wrong = type(b.embedder.config)(dim=100)
    with pytest.raises(BundleError, match="makes 384-dim vectors"):
        Embedder(path, tok, wrong)


def test_symlinked_bundle_files_are_refused(bundle_copy: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    original = bundle_copy / "tokenizer.json"
    shutil.copy(original, outside / "tokenizer.json")  # the very same bytes: checksum matches
    original.unlink()
    original.symlink_to(outside / "tokenizer.json")
    with pytest.raises(BundleError, match=r"tokenizer\.json .* symbolic link") as err:
        load_bundle(bundle_copy)
    assert err.value.file == "tokenizer.json"
    original.unlink()
    shutil.copy(outside / "tokenizer.json", original)
    load_bundle(bundle_copy)

    inside = bundle_copy / ".real-embedder.onnx"  # a link that stays inside: still a link
    (bundle_copy / "embedder.onnx").rename(inside)
    (bundle_copy / "embedder.onnx").symlink_to(inside.name)
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(bundle_copy)
    (bundle_copy / "embedder.onnx").unlink()
    inside.rename(bundle_copy / "embedder.onnx")

    (outside / "sub").mkdir()  # a linked folder on the way out of the bundle
    shutil.copy(outside / "tokenizer.json", outside / "sub" / "tokenizer.json")
    (bundle_copy / "sub").symlink_to(outside / "sub")
    m = manifest_of(bundle_copy)
    m["embedder"]["tokenizer"] = "sub/tokenizer.json"
    m["files"]["sub/tokenizer.json"] = m["files"].pop("tokenizer.json")
    write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match="lies outside the bundle"):
        load_bundle(bundle_copy)

    manifest = bundle_copy / MANIFEST
    (outside / MANIFEST).write_text(manifest.read_text())
    manifest.unlink()
    manifest.symlink_to(outside / MANIFEST)
    with pytest.raises(BundleError, match=r"manifest\.json .* symbolic link"):
        load_bundle(bundle_copy)


def test_the_default_bundle_holds_no_links_even_from_a_linked_source(tmp_path: Path):
    """Assembly hard-links or copies the LLM, following a symlinked source to its file."""
    linked_source = tmp_path / "linked.gguf"
    linked_source.symlink_to(default_llm_source())
    dest = assemble_bundle(tmp_path / "bundle", shipped_bundle_dir(), linked_source)
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    load_bundle(dest)


def test_a_hostile_stamp_is_ignored_and_a_changed_size_is_refused(bundle_copy: Path):
    (bundle_copy / STAMP).write_text(nest(50_000, "array", "1"))
    load_bundle(bundle_copy)  # the stamp is useless, so every file is hashed again
    (bundle_copy / STAMP).write_text('{"llm.gguf": ' + "9" * 5000 + "}")
    load_bundle(bundle_copy)
    m = manifest_of(bundle_copy)
    m["files"]["tokenizer.json"]["size"] += 1  # the stamp still matches the file itself
    write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match=r"tokenizer\.json"):
        load_bundle(bundle_copy)


def test_status_shows_free_form_head_facts_of_any_type(bundle_copy: Path, tmp_path: Path):
    m = manifest_of(bundle_copy)
    if not m.get("plug"):
        pytest.skip("the default bundle carries no Persona-Plug head")
    m["plug"]["config"] = [1, 2]  # was read as an object: AttributeError in `status`
    m["plug"]["steps"] = {"a": "x" * 1000}
    write_manifest(bundle_copy, m)
    args = ["--bundle", str(bundle_copy), "--home", str(tmp_path / "home"), "status"]
    shown = CliRunner().invoke(cli, args)
    assert shown.exit_code == 0 and "Traceback" not in shown.output, shown.output
    assert "plug:      plug.onnx" in shown.output and "x" * 30 not in shown.output


# --- fuzz: manifests -------------------------------------------------------------------------


def _int_in(low: int, high: int):
    return lambda v: type(v) is int and low <= v <= high


def TEXT(v: Any) -> bool:
    """Non-empty text that is valid Unicode (JSON's \\ud800 escapes can make lone halves)."""
    try:
        return isinstance(v, str) and bool(v) and bool(v.encode("utf-8"))
    except UnicodeEncodeError:
        return False


BOOL = lambda v: isinstance(v, bool)  # noqa: E731
NEVER = lambda v: False  # noqa: E731  (a replaced section or checksum never fits)
# Each fuzzed field of the default manifest and the values it accepts (from its docs).
FIELDS: dict[tuple[str, ...], Any] = {
    ("format",): lambda v: type(v) is int and v in FORMATS,
    ("name",): TEXT,
    ("llm",): NEVER,
    ("llm", "file"): lambda v: v == "llm.gguf",
    ("llm", "architecture"): TEXT,
    ("llm", "n_embd"): _int_in(1, 65_536),
    ("llm", "quantization"): TEXT,
    ("llm", "chat_template"): lambda v: v is None or v == "" or TEXT(v),
    ("embedder",): NEVER,
    ("embedder", "file"): lambda v: v == "embedder.onnx",
    ("embedder", "tokenizer"): lambda v: v == "tokenizer.json",
    ("embedder", "int8"): BOOL,
    ("embedder", "dim"): _int_in(1, 65_536),
    ("embedder", "pooling"): lambda v: v in ("mean", "cls", "max"),
    ("embedder", "normalize"): BOOL,
    ("embedder", "max_seq_length"): _int_in(1, 100_000),
    ("files",): NEVER,
    ("files", "tokenizer.json"): NEVER,
    ("files", "tokenizer.json", "sha256"): NEVER,
    ("files", "tokenizer.json", "size"): NEVER,
}
HEAD_FIELDS: dict[tuple[str, ...], Any] = {
    ("plug", "d_enc"): _int_in(1, 65_536),
    ("plug", "d_llm"): _int_in(1, 65_536),
    ("plug", "n_soft"): _int_in(1, 1024),
    ("plug", "max_history"): _int_in(1, 100_000),
    ("plug", "max_seq_length"): _int_in(1, 100_000),
    ("plug", "input_encoder"): lambda v: v in ("linear", "trainable"),
    ("plug", "placement"): lambda v: v in ("prefix", "before_answer"),
    ("plug", "file"): lambda v: v == "plug.onnx",
    ("plug", "llm_sha256"): NEVER,
    ("plug", "config"): lambda v: True,  # training facts: free-form, shown by `status`
    ("plug", "steps"): lambda v: True,
}


@pytest.fixture(scope="module")
def fuzz_bundle(default_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("manifest-fuzz") / "bundle"
    shutil.copytree(default_bundle, folder)
    load_bundle(folder)
    return folder


def expected(path: tuple[str, ...], value: bytes | None) -> str:
    """What loading should do with `value` (raw JSON) at `path`: "refused" (a BundleError),
    "head refused" (the bundle loads without its head) or "loaded" (it may still be refused
    later for a fact the manifest cannot show, e.g. a valid dim that the model does not make)."""
    if value is None:
        return "refused"  # a whole manifest of hostile bytes
    try:
        parsed = parse_json(value, "value")
    except InvalidInputError:
        return "refused"  # the manifest itself is not JSON that may cross the boundary
    if path in HEAD_FIELDS:
        return "loaded" if HEAD_FIELDS[path](parsed) else "head refused"
    return "loaded" if FIELDS[path](parsed) else "refused"


def run_manifest_fuzz(
    default_bundle: Path, folder: Path, home: Path, examples: int
) -> tuple[Counter[str], Tally]:
    """Load each manifest; one that loads is also shown by the CLI's `status`."""
    good = manifest_of(default_bundle)
    status = Tally()
    runner = CliRunner()
    paths = sorted(FIELDS) + (sorted(HEAD_FIELDS) if good.get("plug") else [])
    outcomes: Counter[str] = Counter()

    @settings(max_examples=examples, **SETTINGS)
    @given(
        path=st.sampled_from(paths),
        value=st.one_of(HOSTILE_TEXT, NUMBER_TEXT).map(
            lambda t: t.encode("utf-8", "surrogatepass")
        ),
        whole=st.booleans(),
    )
    def prop(path: tuple[str, ...], value: bytes, whole: bool) -> None:
        outcomes["cases"] += 1
        if whole:  # the whole manifest is hostile bytes
            (folder / MANIFEST).write_bytes(value)
        else:  # the good manifest with one field replaced
            m = json.loads(json.dumps(good))
            section = m
            for key in path[:-1]:
                section = section[key]
            section[path[-1]] = "@@HOLE@@"
            (folder / MANIFEST).write_bytes(json.dumps(m).encode().replace(b'"@@HOLE@@"', value))
        want = expected(path, None if whole else value)
        shown = f"{'manifest' if whole else path} = {value[:80]!r}"
        try:
            bundle = load_bundle(folder)
        except BundleError as exc:
            assert want == "refused", f"{shown} was refused: {exc}"
            assert "\n" not in str(exc)
            outcomes["BundleError"] += 1
            return
        except Exception:
            outcomes["crashed"] += 1
            raise
        assert want != "refused", f"{shown} was accepted"
        if want == "head refused":
            assert bundle.plug is None and isinstance(bundle.plug_error, BundleError)
            outcomes["head refused"] += 1
            return
        if path[0] == "embedder":  # an accepted embedder field: the model agrees, or not
            spec = bundle.embedder
            try:
                Embedder(bundle.file(spec.file), bundle.file(spec.tokenizer), spec.config)
            except BundleError:
                outcomes["embedder refused"] += 1
                return
        outcomes["loaded"] += 1
        shown = runner.invoke(cli, ["--bundle", str(folder), "--home", str(home), "status"])
        status.check(shown, True)
        assert shown.exit_code == 0, shown.output

    try:
        prop()
    finally:
        write_manifest(folder, good)
    return outcomes, status


def report_manifests(outcomes: Counter[str], status: Tally) -> str:
    crashed = outcomes.pop("crashed", 0)
    cases = outcomes.pop("cases")
    return (
        f"{cases} manifests, {dict(sorted(outcomes.items()))}: {crashed} crashed; "
        + status.line("`status` runs on those loaded")
    )


def test_manifest_fuzz_every_field(default_bundle, fuzz_bundle, tmp_path, report_counts):
    outcomes, status = run_manifest_fuzz(default_bundle, fuzz_bundle, tmp_path, FAST * 3)
    report_counts(report_manifests(outcomes, status))


@pytest.mark.slow
def test_manifest_fuzz_every_field_many(default_bundle, fuzz_bundle, tmp_path, report_counts):
    outcomes, status = run_manifest_fuzz(default_bundle, fuzz_bundle, tmp_path, MANY * 4)
    report_counts(report_manifests(outcomes, status))


def test_deep_nesting_is_refused_before_the_parser_recurses():
    """Brackets are counted outside strings, before `json` recurses a level per bracket: a
    body nested thousands deep never brings the stack near Python's limit (where a
    finalizer that runs, such as a garbage-collected llama.cpp sampler, would fail)."""
    from edge_pllm.jsonio import MAX_DEPTH, _too_deep, parse_json

    at_limit = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert not _too_deep(at_limit) and parse_json(at_limit, "x") == nest_value(MAX_DEPTH)
    assert _too_deep("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    assert _too_deep("[" * 200_000)  # unclosed: refused all the same
    inside = '{"text": "' + "[{" * 500 + '\\"]}"}'  # brackets in a string are text
    assert not _too_deep(inside) and parse_json(inside, "x")["text"].startswith("[{[{")


def nest_value(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_a_string_that_never_closes_is_read_in_linear_time():
    """The nesting count strips strings with a pattern that never backtracks: a 200 KB body
    of escaped quotes that never closes is read in milliseconds (a backtracking pattern
    took minutes: one request could stall the server's event loop)."""
    import time

    from edge_pllm.jsonio import _too_deep

    body = '"\\"' * 70_000 + "\\"
    started = time.perf_counter()
    assert not _too_deep(body)
    assert time.perf_counter() - started < 5  # linear: ~10 ms; quadratic: minutes
