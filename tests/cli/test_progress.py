"""Progress bars: redrawn in place on a terminal, a line per tenth in logs, silent when quiet."""

import io

from vmhost.progress import Progress


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_log_gets_a_line_per_tenth_and_the_last_note():
    out = io.StringIO()
    with Progress(100, "fleet", stream=out) as p:
        for i in range(100):
            p.advance(note=f"task {i}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 11                          # 0/10 .. 10/10 of the way
    assert lines[-1].startswith("fleet: [") and "100/100 100%" in lines[-1] and "task 99" in lines[-1]


def test_terminal_bar_is_redrawn_in_place_and_ends_with_a_newline():
    out = Tty()
    with Progress(4, "density", stream=out) as p:
        for _ in range(4):
            p.advance(note="step")
    text = out.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    assert "4/4 100%" in text


def test_quiet_prints_nothing_and_an_open_total_counts_up():
    out = io.StringIO()
    with Progress(10, "x", quiet=True, stream=out) as p:
        p.advance(3)
    assert out.getvalue() == "" and p.done == 3
    out = io.StringIO()
    with Progress(None, "search", stream=out) as p:
        p.advance(2)
    assert "2 done" in out.getvalue()


def test_a_start_note_is_shown_at_once_and_the_log_stays_short():
    out = io.StringIO()
    with Progress(100, "density", stream=out, start="booting guest 1") as p:
        assert out.getvalue().splitlines() == [p._line()] and "0/100" in p._line()
        assert "booting guest 1" in out.getvalue()
        for i in range(100):
            p.advance(note=f"guest {i}")
    assert len(out.getvalue().splitlines()) == 11         # the start line stands for 0/10
    tty = Tty()
    with Progress(4, "density", stream=tty, start="booting guest 1") as p:
        assert tty.getvalue().startswith("\r") and "0/4" in tty.getvalue()
        for _ in range(4):
            p.advance()
    assert tty.getvalue().count("\r") == 5 and tty.getvalue().endswith("\n")
