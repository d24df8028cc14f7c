"""Streaming: incremental detokenization holds back half characters and stop-string prefixes."""

import pytest

from serve.router import LeastLoaded
from serve.scheduler import Detokenizer, Request, Scheduler
from tests.serve.conftest import ByteTokenizer


def _stream(detok, ids):
    deltas = []
    for t in ids:
        detok.push(t)
        deltas.append(detok.take())
    detok.flush()
    deltas.append(detok.take(final=True))
    return deltas


def test_byte_pieces_of_multibyte_chars_are_held_back():
    tok = ByteTokenizer()
    text = "café 日本"
    deltas = _stream(Detokenizer(tok), tok.encode_bytes(text.encode()))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[3] == "" and deltas[4] == "é"  # c3 alone shows nothing; c3 a9 shows é


def test_stop_string_cuts_text_and_is_never_streamed():
    tok = ByteTokenizer()
    detok = Detokenizer(tok, stop=("end",))
    deltas = _stream(detok, tok.encode_bytes(b"the ending"))
    assert detok.stopped and "".join(deltas) == "the "
    assert all("e" not in d for d in deltas[4:])  # "e", "en" were held back as stop prefixes


@pytest.mark.slow
def test_smollm2_byte_level_bpe_multibyte(smollm2):
    _, _, tok = smollm2
    text = "naïve café 日本"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # some token really splits a character
    deltas = _stream(Detokenizer(tok), ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_scheduler_streams_the_final_text(tiny, sun_pool):
    _, _, tasks = tiny
    tok = ByteTokenizer()
    sched = Scheduler(sun_pool, tasks, LeastLoaded(4), tokenizer=tok)
    streamed: dict[str, list[str]] = {}
    done = set()

    def on_text(rid, delta, finished):
        streamed.setdefault(rid, []).append(delta)
        if finished:
            done.add(rid)

    for i, model in enumerate(("math", "code", "tool")):
        sched.submit(
            Request(id=f"t{i}", model=model, prompt=(3, 1, 4, 1, 5), max_tokens=20), on_text
        )
    sched.run_until_idle()
    assert done == {"t0", "t1", "t2"}
    for rid, res in sched.results.items():
        assert "".join(streamed[rid]) == res.text == tok.decode(res.tokens)

    # a stop string taken from the middle of an output cuts it there
    res = sched.results["t1"]
    stop = res.text[5:8]
    sched.submit(Request(id="s", model="code", prompt=(3, 1, 4, 1, 5), max_tokens=20, stop=(stop,)))
    sched.run_until_idle()
    cut = sched.results["s"]
    assert cut.finish_reason == "stop" and cut.text == res.text[: res.text.index(stop)]
