"""Program capabilities are declared on the Program base class (no hasattr/getattr probes):
``ready``, ``expect_files`` and ``open`` with defaults, overridden where a backend differs."""

import numpy as np

from npumoe_mlx.backends import Program
from npumoe_mlx.build.verify import Pinned, ProgramMismatch


class _Plain(Program):
    name, G, D, tiers = "p", 1, 4, (8,)

    def _run(self, x, tier):
        return x


class _Checks(_Plain):
    """A program that checks file bytes itself as it opens (as onnx sessions do)."""

    def __init__(self):
        self.expected, self.opened = {}, 0

    def expect_files(self, sha256):
        self.expected.update(sha256)
        return True

    def open(self):
        self.opened += 1


def test_base_program_declares_defaults():
    p = _Plain()
    assert p.ready is True and p.expect_files({"/x": "0"}) is False and p.open() is None
    assert not p.concurrent and not p.dynamic and p.input_layout == "GCD"


def test_pinned_hashes_the_files_of_a_program_that_does_not_check_them(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    pinned = Pinned(_Plain(), [f], {f: "0" * 64})
    assert pinned.ready is False
    try:
        pinned.first_use()
        raise AssertionError("a wrong sha256 must be refused")
    except ProgramMismatch as e:
        assert "damaged or changed" in str(e)


def test_pinned_hands_the_hashes_to_a_program_that_checks_them_and_opens_it(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    prog = _Checks()
    pinned = Pinned(prog, [f], {f: "0" * 64})
    pinned.first_use()  # the program checks (here: it only records): Pinned does not hash
    assert prog.expected == {str(f.absolute()): "0" * 64} and prog.opened == 1 and pinned.ready
    assert np.array_equal(pinned.run(np.ones((1, 8, 4), np.float32), 8), np.ones((1, 8, 4), np.float32))
