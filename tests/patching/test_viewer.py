"""``byteify patch``: boundaries as ``|`` when stdout is not a TTY, alternating ANSI colours when
it is, the mean bytes per patch, the PNG plot (and a one-line error without matplotlib), and
one-line CLI errors with exit code 2."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from byteify.errors import ByteifyError
from byteify.patching.viewer import COLOURS, PatchView, compute_view, plot_png, render
from patching_helpers import one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def cli(*args):
    from byteify.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_render_plain_and_colour():
    data = "ab cd\né!".encode()
    starts = np.zeros(len(data), bool)
    starts[[0, 2, 6, 8]] = True
    view = PatchView(data, starts, None, None, False, "test")
    assert render(view, color=False) == "ab| cd\n|é|!"
    mid = np.zeros(len(data), bool)
    mid[[0, 7]] = True  # byte 7 is inside 'é' (bytes 6, 7): the marker goes before the character
    assert render(PatchView(data, mid, None, None, False, "test"), color=False) == "ab cd\n|é!"
    coloured = render(view, color=True)
    assert COLOURS[0] in coloured and COLOURS[1] in coloured and "|" not in coloured
    assert coloured.replace(COLOURS[0], "").replace(COLOURS[1], "").replace("\x1b[0m", "") == "ab cd\né!"
    assert view.patches == 4 and view.mean_bytes_per_patch == pytest.approx(9 / 4)


def test_cli_patch_plain_markers_and_summary(tiny_entropy_blt):
    r = cli("patch", tiny_entropy_blt, "hello, world", "--patching", "space")
    assert r.exit_code == 0, r.stdout + r.stderr
    first, second = r.stdout.splitlines()[:2]
    assert first == "hello,| world" and "\x1b[" not in r.stdout
    assert second.startswith("12 bytes, 2 patches, 6.00 bytes/patch")
    r = cli("patch", tiny_entropy_blt, "hello, world", "--patching", "static", "--patch-size", "5")
    assert r.stdout.splitlines()[0] == "hello|, wor|ld"
    # default: the model config's entropy patching
    r = cli("patch", tiny_entropy_blt, "The if statement is used for conditional execution")
    assert r.exit_code == 0 and "entropy (global), threshold" in r.stdout


def test_cli_patch_png(tiny_entropy_blt, tmp_path):
    pytest.importorskip("matplotlib")
    text = tmp_path / "t.txt"
    text.write_text("The if statement is used for conditional execution:\n    if x: pass\n")
    png = tmp_path / "plot.png"
    r = cli("patch", tiny_entropy_blt, "--file", text, "--png", png, "--threshold", "1.0")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert png.exists() and png.stat().st_size > 5000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "threshold 1.0000" in r.stdout


def test_png_without_matplotlib_is_one_line(tiny_entropy_blt, tmp_path, monkeypatch):
    view = compute_view(tiny_entropy_blt, b"hello world")
    assert view.entropies is not None and len(view.entropies) == len(view.data)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ByteifyError, match=r"byteify\[plot\]"):
        plot_png(view, tmp_path / "x.png")
    r = cli("patch", tiny_entropy_blt, "hello", "--png", tmp_path / "x.png")
    assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0 and "plot" in r.stderr


def test_cli_patch_errors(tiny_entropy_blt, tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    for args, msg in [((tiny_entropy_blt,), "exactly one"),
                      ((tiny_entropy_blt, "hi", "--file", f), "exactly one"),
                      ((tiny_entropy_blt, "--file", tmp_path / "nope.txt"), "nope.txt"),
                      ((tiny_entropy_blt, "hi", "--patching", "bogus"), "bogus"),
                      ((tmp_path, "hi"), "not a BLT model directory"),
                      ((tiny_entropy_blt, "hi", "--patching", "entropy", "--monotonic"), "calibrate")]:
        r = cli("patch", *args)
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], (args, r.stderr)
