"""`import USER PATH...`: what a person keeps (notes, HTML, mail, chat exports), read with
the real embedder into the real store, incrementally, with bad files reported and skipped."""

from __future__ import annotations

import email.message
import json
import mailbox
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_pllm import NewItem, SamplingConfig
from edge_pllm.cli import cli
from edge_pllm.personalization.strategies import TURN_DEPTH
from edge_pllm.sources.importing import html_text, own_words, sections
from edge_pllm.storage.parts import PART_CHARS, part_spans

ME = "ann@example.org"


def _mail(sender: str, subject: str, body: str) -> email.message.EmailMessage:
    message = email.message.EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, "list@example.org", subject
    message["Date"] = "Mon, 02 Mar 2026 10:00:00 +0000"
    message.set_content(body)
    return message


def _chatgpt_export() -> list[dict]:
    """One conversation whose first question was edited (two user turns under the root:
    both the person's), with the assistant's answers."""

    def node(role: str, text: str, when: float) -> dict:
        return {"message": {"author": {"role": role}, "content": {"parts": [text]},
                            "create_time": when}}  # fmt: skip

    return [
        {
            "title": "Trip",
            "mapping": {
                "root": {"message": None, "children": ["q1", "q1b"]},
                "q1": node("user", "Plan three days in Lisbon", 1_700_000_000),
                "a1": node("assistant", "ASSISTANT-ONLY itinerary", 1_700_000_010),
                "q1b": node("user", "Plan four days in Porto instead", 1_700_000_100),
                "a1b": node("assistant", "ASSISTANT-ONLY Porto", 1_700_000_110),
                "sys": node("system", "SYSTEM-ONLY prompt", 1_699_999_999),
            },
        }
    ]


@pytest.fixture
def kept(tmp_path: Path) -> Path:
    """A folder of what a person keeps, in real formats, with bad files among them."""
    root = tmp_path / "kept"
    (root / "chat").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "notes.md").write_text("HIDDEN-FOLDER text")
    (root / "garden.md").write_text("# Garden\n\nTomatoes need full sun.\n")
    (root / "bread.html").write_text(
        "<html><head><title>t</title><script>SCRIPT-ONLY()</script><style>p{}</style></head>"
        "<body><h1>Bread</h1><p>Sourdough needs a starter &amp; time.</p></body></html>"
    )
    box = mailbox.mbox(root / "mail.mbox")
    box.add(_mail(f"Ann <{ME}>", "Party", "I will bring the cake.\n\nOn Monday, Bob wrote:\n"
                  "> QUOTED-ONLY can you bring cake?\n\n-- \nSIGNATURE-ONLY Ann"))  # fmt: skip
    box.add(_mail("Bob <bob@example.org>", "Party", "OTHER-SENDER-ONLY Can you bring cake?"))
    box.flush()
    box.close()
    (root / "reply.eml").write_bytes(bytes(_mail(ME, "Re: roses", "Prune them in March.")))
    (root / "chat" / "conversations.json").write_text(json.dumps(_chatgpt_export()))
    (root / "chat" / "log.jsonl").write_text(
        json.dumps({"role": "user", "content": "How deep do I plant garlic?"})
        + "\n"
        + json.dumps({"role": "assistant", "content": "ASSISTANT-ONLY five cm"})
        + "\n"
    )
    (root / "picture.png").write_bytes(b"\x89PNG\r\n")
    # Bad files: each reported and skipped, never the others.
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "other" / "conversations.json").parent.mkdir()
    (root / "other" / "conversations.json").write_text(json.dumps({"not": "an export"}))
    (root / "broken.jsonl").write_text('{"role": "user", "content": "ok"}\n{not json\n')
    return root


def texts(pllm, user: str) -> list[str]:
    return sorted(i.text for i in pllm.store.items(user))


def test_a_folder_of_real_formats_gives_the_persons_own_writing_and_reports_bad_files(pllm, kept):
    report = pllm.import_paths("ann", [kept], me=[ME])
    got = texts(pllm, "ann")
    assert got == sorted(
        [
            "# Garden\n\nTomatoes need full sun.",
            "Bread\n\nSourdough needs a starter & time.",
            "Party\n\nI will bring the cake.",
            "Re: roses\n\nPrune them in March.",
            "Plan three days in Lisbon",
            "Plan four days in Porto instead",
            "How deep do I plant garlic?",
        ]
    )
    whole = "\n".join(got)
    for absent in ("ONLY", "HIDDEN-FOLDER", "From:", "Subject:"):
        assert absent not in whole  # others' words, markup, headers, hidden folders: never
    assert (report.files, report.imported, report.added) == (9, 6, 7)  # 2 turns in one
    reasons = dict(report.skipped)
    assert set(reasons) == {
        str(kept / "latin1.txt"),
        str(kept / "other" / "conversations.json"),
        str(kept / "broken.jsonl"),
    }
    assert "not UTF-8" in reasons[str(kept / "latin1.txt")]
    assert "not a ChatGPT export" in reasons[str(kept / "other" / "conversations.json")]
    assert "line 2 is not JSON" in reasons[str(kept / "broken.jsonl")]
    assert report.not_read == {".png": 1}
    by_text = {i.text: i for i in pllm.store.items("ann")}
    mail = by_text["Party\n\nI will bring the cake."]
    assert mail.kind == "mail" and mail.created_at == "2026-03-02T10:00:00+00:00"
    assert mail.metadata["source"] == {"path": str(kept / "mail.mbox"), "in": "message 1"}
    chat = by_text["Plan three days in Lisbon"]
    assert chat.kind == "chat" and chat.created_at == "2023-11-14T22:13:20+00:00"
    note = by_text["# Garden\n\nTomatoes need full sun."]
    mtime = os.stat(kept / "garden.md").st_mtime
    assert note.kind == "note" and note.created_at[:10] == _day(mtime)


def _day(seconds: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC).date().isoformat()


def test_mail_without_me_is_reported_not_guessed(pllm, kept):
    report = pllm.import_paths("ann", [kept / "mail.mbox", kept / "garden.md"])
    assert report.skipped == [(str(kept / "mail.mbox"), pytest.approx(report.skipped[0][1]))]
    assert "--me" in report.skipped[0][1]
    assert texts(pllm, "ann") == ["# Garden\n\nTomatoes need full sun."]


def test_importing_again_skips_the_unchanged_replaces_the_changed_removes_the_gone(pllm, kept):
    pllm.import_paths("ann", [kept], me=[ME])
    # The same note typed by hand: one item (deduplicated), now the person's own.
    pllm.add("ann", [NewItem("Bread\n\nSourdough needs a starter & time.", kind="note")])
    before = texts(pllm, "ann")
    again = pllm.import_paths("ann", [kept], me=[ME])
    assert (again.imported, again.unchanged, again.added, again.removed) == (0, 6, 0, 0)
    assert texts(pllm, "ann") == before
    os.utime(kept / "garden.md")  # touched, same content: read, found unchanged, skipped
    (kept / "chat" / "log.jsonl").write_text(
        json.dumps({"role": "user", "content": "When do I harvest garlic?"}) + "\n"
    )
    (kept / "bread.html").unlink()
    (kept / "reply.eml").unlink()
    third = pllm.import_paths("ann", [kept], me=[ME])
    assert (third.imported, third.added, third.removed, third.removed_files) == (1, 1, 2, 2)
    got = texts(pllm, "ann")
    assert "When do I harvest garlic?" in got and "How deep do I plant garlic?" not in got
    assert "Re: roses\n\nPrune them in March." not in got  # its file is gone
    assert "Bread\n\nSourdough needs a starter & time." in got  # typed by hand: kept
    assert len(got) == len(set(got))
    assert {Path(r.file.path).name for r in pllm.store.sources("ann")} == {
        "garden.md", "mail.mbox", "conversations.json", "log.jsonl"}  # fmt: skip
    assert pllm.store.vector_count("ann") == pllm.store.count("ann")


def test_again_reads_unchanged_files_and_brings_back_deleted_items(pllm, kept):
    pllm.import_paths("ann", [kept / "garden.md"])
    (item,) = pllm.store.items("ann")
    pllm.delete("ann", [item.id])
    assert pllm.import_paths("ann", [kept / "garden.md"]).unchanged == 1
    assert pllm.store.count("ann") == 0  # a deleted item stays gone while its file is unchanged
    report = pllm.import_paths("ann", [kept / "garden.md"], again=True)
    assert report.imported == 1 and report.added == 1 and texts(pllm, "ann") == [item.text]
    again = pllm.import_paths("ann", [kept / "garden.md"], again=True)
    assert (again.added, again.removed) == (1, 1) and pllm.store.count("ann") == 1


def test_embedding_is_told_each_files_texts_as_they_are_done(pllm, tmp_path):
    shed = (f"Paragraph {i} is about the shed and its tools. " * 5 for i in range(80))
    (tmp_path / "long.md").write_text("\n\n".join(shed))
    (tmp_path / "short.md").write_text("A short note.")
    seen: dict[str, list[int]] = {}

    def embedding(path: Path, n: int):
        seen[path.name] = [n, 0]
        return lambda k: seen[path.name].__setitem__(1, seen[path.name][1] + k)

    pllm.import_paths("ann", [tmp_path], embedding=embedding)
    assert seen["short.md"] == [1, 1]
    assert seen["long.md"][0] == seen["long.md"][1] == pllm.store.vector_count("ann") - 1 > 64


def test_a_file_that_turns_bad_keeps_what_it_gave_before(pllm, kept):
    pllm.import_paths("ann", [kept / "garden.md"])
    (kept / "garden.md").write_bytes(b"\xff\xfe not text any more")
    report = pllm.import_paths("ann", [kept / "garden.md"])
    assert report.skipped and texts(pllm, "ann") == ["# Garden\n\nTomatoes need full sun."]


def test_a_long_note_is_one_item_whose_end_is_found(pllm, tmp_path):
    filler = " ".join(
        f"The shed holds tool number {i} next to the lawn mower and the rakes." for i in range(60)
    )
    fact = "The spare house key is hidden under the blue flower pot by the door."
    note = f"{filler}\n\n{fact}"
    (tmp_path / "long.md").write_text(f"{note}\n")
    others = [
        f"Recipe {i}: mix flour, water and salt, bake for {20 + i} minutes." for i in range(30)
    ]
    pllm.add("ann", others)
    pllm.import_paths("ann", [tmp_path / "long.md"])
    (item,) = [i for i in pllm.store.items("ann") if "source" in i.metadata]
    assert item.text == note and item.metadata["source"] == {"path": str(tmp_path / "long.md")}
    n = len(part_spans(note))
    assert n > 3 and pllm.store.vector_count("ann") == 30 + 1 + n  # whole, then parts
    question = "Where is the spare house key hidden?"
    hits = pllm.search("ann", question, 3)
    assert hits[0].item.id == item.id and hits[0].part.number == n
    assert hits[0].passage.text.endswith(fact) and len(hits[0].passage.text) <= PART_CHARS
    # The note's one vector (all it had before parts) is far from the question.
    whole, asked = pllm.embedder.embed([note, question])
    assert 1 - float(whole @ asked) > hits[0].distance + 0.2
    pllm.store.drop_source("ann", str(tmp_path / "long.md"))
    assert pllm.store.vector_count("ann") == pllm.store.count("ann") == 30


def test_a_text_over_the_item_limit_is_cut_into_sections_at_part_boundaries():
    text = "\n\n".join(f"Paragraph {i} is about the shed. " * 20 for i in range(40))
    cut = sections(text, limit=5000)
    assert len(cut) > 1 and all(len(s) <= 5000 for s in cut)
    assert all(s.startswith("Paragraph") for s in cut)
    assert sum(s.count("Paragraph") for s in cut) >= 40 * 20  # nothing lost
    assert sections(" short ") == ["short"] and sections("  ") == []


def test_readers_leave_out_what_others_wrote_and_markup():
    body = "Yes.\n\nOn Tue, Bob wrote:\n> no?\n>> earlier\n\n-- \nAnn\nphone"
    assert own_words(body) == "Yes."
    assert own_words("Mine\n\n-----Original Message-----\nFrom: x\ntheirs") == "Mine"
    assert html_text("<p>a<b>b</b></p><script>x</script><p>c &lt; d</p>") == "ab\n\nc < d"


def test_the_cli_imports_a_folder_and_says_what_it_did(default_bundle, kept, tmp_path):
    runner = CliRunner()
    base = ["--home", str(tmp_path / "home"), "--bundle", str(default_bundle)]
    done = runner.invoke(cli, [*base, "import", "ann", str(kept), "--me", ME])
    assert done.exit_code == 0, done.output
    assert "Imported 6 files for ann: 7 items added, 0 removed; 0 unchanged." in done.output
    assert "Not read: 1 file of other types (.png 1)." in done.output
    assert "Skipped 3 files:" in done.output and "latin1.txt: not UTF-8 text" in done.output
    again = runner.invoke(cli, [*base, "import", "ann", str(kept), "--me", ME])
    assert "Imported 0 files for ann: 0 items added, 0 removed; 6 unchanged." in again.output
    bare = runner.invoke(cli, [*base, "import", "ann"])
    assert bare.exit_code == 2 and "Give files or folders to import" in bare.output
    # What is found says where it came from: the file, and the message in it.
    found = runner.invoke(cli, [*base, "search", "ann", "bring the cake", "-k", "1"]).output
    assert found.rstrip("\n").split("\t")[3] == f"{kept / 'mail.mbox'}, message 1", found
    shown = runner.invoke(cli, [*base, "ask", "ann", "Who brings the cake?", "-s", "rag:1",
                                "-n", "1", "--show-context"])  # fmt: skip
    assert re.search(rf"\[context #\d+ from {re.escape(str(kept))}/mail.mbox, message 1\] Party",
                     shown.output), shown.output  # fmt: skip
    forget = runner.invoke(cli, [*base, "forget", "ann", "--yes"])
    assert forget.exit_code == 0, forget.output
    # Forgetting the person forgets where their files were too, in every file of the home.
    files = [f for f in (tmp_path / "home").rglob("*") if f.is_file()]
    assert files and not any(str(kept).encode() in f.read_bytes() for f in files)


NOTES = {
    "What is the wifi password at the cabin?": "Cabin: the wifi password is pinecone42.",
    "When is the dentist appointment?": "Dentist appointment on the 14th at 9 am.",
    "Which platform does the train to Porto leave from?": "Trains to Porto leave from platform 7.",
    "What size are the bike tyres?": "Bike tyres are 700x32c.",
    "Where did I park the car?": "Parked the car on level 3, row F.",
}


def test_remembered_questions_do_not_crowd_out_the_notes_that_answer_them(pllm, tmp_path):
    for n, note in enumerate(NOTES.values()):
        (tmp_path / f"note{n}.md").write_text(note)
    pllm.import_paths("ann", [tmp_path])
    asked = SamplingConfig(max_tokens=1)
    for question in NOTES:  # asked before, each four ways: 20 remembered turns
        for form in ("{}", "Quick one: {}", "{} Remind me.", "Again, {}"):
            pllm.generate("ann", form.format(question), strategy="none", sampling=asked,
                          remember=True)  # fmt: skip
    assert sum(i.kind == "turn" for i in pllm.store.items("ann")) == 20
    for question, note in NOTES.items():
        shown = [i.text for i in pllm.prepare("ann", question, "rag:3").personalization.context]
        assert note in shown, (question, shown)
        # The turns still count when nothing the person kept is near: they fill the places.
        assert len(shown) == 3


def test_no_number_of_remembered_questions_crowds_out_a_relevant_note(pllm):
    """A person asked about dinner twenty ways before: all twenty turns are nearer to the
    new question than the note that answers it, which is still shown."""
    notes = ["My favourite dinner is mushroom risotto.", "The bike tyres are 700x32c.",
             "Parked the car on level 3, row F.", "Dentist on Tuesday at 9.",
             "The wifi password is on the fridge."]  # fmt: skip
    pllm.add("cook", notes)
    starts = ["What should I cook", "What do I cook", "What could I make", "What shall I cook"]
    ends = [" tonight?", " for dinner tonight?", " this evening?", " for supper?", " now?"]
    turns = [{"text": s + e, "kind": "turn"} for s in starts for e in ends]
    pllm.add("cook", turns)
    question = "What should I cook tonight?"
    vec = pllm.embedder.embed_one(question)
    ranked = [h.item.kind for h in pllm.store.search("cook", vec, 30)]
    assert ranked.index("text") >= 3 * TURN_DEPTH  # deeper than a search of k × 4 reads
    shown = [i.text for i in pllm.prepare("cook", question, "rag:3").personalization.context]
    assert shown[0] == notes[0] and len(shown) == 3  # the note first, then turns fill


def test_a_pdf_made_by_a_library_gives_its_pages_and_a_truncated_one_is_reported(pllm, tmp_path):
    fpdf = pytest.importorskip("fpdf")
    pytest.importorskip("pypdf")
    pdf = fpdf.FPDF()
    pdf.set_font("Helvetica", size=12)
    for text in ("The greenhouse opens at seven.", "Compost the leaves in October."):
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    data = bytes(pdf.output())
    (tmp_path / "garden.pdf").write_bytes(data)
    (tmp_path / "cut.pdf").write_bytes(data[: len(data) // 2])
    report = pllm.import_paths("ann", [tmp_path])
    got = texts(pllm, "ann")
    assert got == ["Compost the leaves in October.", "The greenhouse opens at seven."]
    pages = {i.text: i.metadata["source"]["in"] for i in pllm.store.items("ann")}
    assert pages["Compost the leaves in October."] == "page 2"
    assert report.skipped == [(str(tmp_path / "cut.pdf"), report.skipped[0][1])]
    assert "not a readable PDF" in report.skipped[0][1]


def test_hostile_files_are_skipped_one_by_one_and_nothing_else_is_lost(pllm, tmp_path):
    """Files a reader's library chokes on (a malformed sender, JSON nested thousands deep, a
    name that is not UTF-8) are reported; the others are imported."""
    (tmp_path / "ok.md").write_text("A fine note.")
    (tmp_path / "bad-from.eml").write_bytes(b"From: a@[\nSubject: x\n\nbody\n")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "conversations.json").write_text("[" * 5000 + "]" * 5000)
    (tmp_path / "deep.jsonl").write_text('{"role": "user", "content": ' + "[" * 3000 + "\n")
    os.close(os.open(os.fsencode(tmp_path) + b"/name\xff.md", os.O_CREAT | os.O_WRONLY))
    report = pllm.import_paths("ann", [tmp_path, tmp_path / "ok.md"], me=[ME])  # ok.md twice
    assert texts(pllm, "ann") == ["A fine note."] and report.imported == 1
    reasons = {Path(p).name: r for p, r in report.skipped}
    assert set(reasons) == {"bad-from.eml", "conversations.json", "deep.jsonl", "name\udcff.md"}
    assert "nested too deeply" in reasons["conversations.json"]
    assert "not UTF-8" in reasons["name\udcff.md"]
