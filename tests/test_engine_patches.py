"""The source fixes ``mtp engines setup llama.cpp`` applies: applied once, skipped with a reason when the code
moved, and the AMX tile-config fix checked where it matters, in the machine code the compiler emits."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mtp.engines import llamacpp, patches
from mtp.engines.patches import AMX_TILE_CONFIG, SourceFix

FIX = SourceFix(name="demo", path="a/b.c", old="int x = 1;", new="int x = 2; /* fixed */", reason="demo")


def test_fix_is_applied_once_and_then_found_present(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.c").write_text("head\nint x = 1;\ntail\n")
    assert patches.apply(tmp_path, (FIX,)) == {"demo": "applied"}
    assert (tmp_path / "a" / "b.c").read_text() == "head\nint x = 2; /* fixed */\ntail\n"
    assert patches.apply(tmp_path, (FIX,)) == {"demo": "present"}
    assert list((tmp_path / "a").iterdir()) == [tmp_path / "a" / "b.c"]  # no temporary left behind


@pytest.mark.parametrize("text", ["other code\n", "int x = 1;\nint x = 1;\n"])
def test_fix_whose_code_is_gone_or_ambiguous_is_skipped_untouched(tmp_path, text):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.c").write_text(text)
    assert patches.apply(tmp_path, (FIX,))["demo"].startswith("skipped: the code it fixes is not in a/b.c")
    assert (tmp_path / "a" / "b.c").read_text() == text
    assert patches.apply(tmp_path / "missing", (FIX,))["demo"].startswith("skipped: a/b.c unreadable")


def test_fingerprint_follows_the_fix_text():
    changed = SourceFix(FIX.name, FIX.path, FIX.old, FIX.new + " ", FIX.reason)
    assert patches.fingerprint((FIX,)) != patches.fingerprint((changed,))


@pytest.mark.skipif(os.environ.get("MTP_REQUIRE_LLAMA_CPP") != "1"
                    and not (llamacpp.source_dir() / AMX_TILE_CONFIG.path).is_file(),
                    reason="llama.cpp's sources are not here (mtp engines setup llama.cpp)")
def test_every_fix_matches_the_vendored_sources():
    """The pinned llama.cpp holds the code each fix replaces (or the fix itself): none can silently skip."""
    assert set(patches.apply(llamacpp.source_dir()).values()) <= {"applied", "present"}


TILE_CONFIG_STRUCT = """
#include <immintrin.h>
#include <cstdint>
struct tile_config_t{
    uint8_t palette_id = 0;
    uint8_t start_row = 0;
    uint8_t reserved_0[14] = {0};
    uint16_t colsb[16] = {0};
    uint8_t rows[16] = {0};
};
void ggml_tile_config_init(void) {
    static thread_local bool done = false;
    if (done) {
        return;
    }
%s
    done = true;
}
"""


def expected_config() -> bytes:
    colsb = [64, 64, 32, 32, 64, 64, 64, 64] + [0] * 8
    rows = [8, 8, 16, 16, 16, 16, 16, 16] + [0] * 8
    return bytes([1, 0] + [0] * 14) + b"".join(c.to_bytes(2, "little") for c in colsb) + bytes(rows)


def loaded_config(tmp_path: Path, body: str) -> bytes | None:
    """The 64 bytes the compiled ``ldtilecfg`` loads when they are fixed at compile time, else None (a config
    built on the stack at run time: what the bug looks like)."""
    src, obj = tmp_path / "t.cpp", tmp_path / "t.o"
    src.write_text(TILE_CONFIG_STRUCT % body)
    subprocess.run(["g++", "-O3", "-std=gnu++17", "-mamx-tile", "-mamx-int8", "-c", str(src), "-o", str(obj)],
                   check=True, capture_output=True)
    dis = subprocess.run(["objdump", "-dr", "--no-show-raw-insn", str(obj)], check=True, capture_output=True,
                         text=True).stdout
    m = re.search(r"ldtilecfg\s+0x0\(%rip\).*\n.*R_X86_64_PC32\s+\.rodata([+-]0x[0-9a-f]+)?", dis)
    if m is None:
        return None
    offset = int(m.group(1) or "0", 16) + 4  # the PC32 addend is the data's offset - 4
    ro = tmp_path / "ro.bin"
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.rodata", str(obj), str(ro)], check=True)
    return ro.read_bytes()[offset:offset + 64]


def _compiler_has_amx() -> bool:
    if not (shutil.which("g++") and shutil.which("objdump") and shutil.which("objcopy")):
        return False
    probe = subprocess.run(["g++", "-mamx-tile", "-x", "c++", "-E", "-", "-o", "/dev/null"], input="",
                           capture_output=True, text=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _compiler_has_amx(), reason="needs g++ with -mamx-tile, objdump and objcopy")
def test_amx_fix_makes_the_compiler_load_the_whole_tile_config(tmp_path):
    """The fixed code, compiled as ggml builds it (-O3), hands ldtilecfg all 64 bytes: palette 1 and the eight
    tile shapes. (The original, on GCC 12, hands it one store of the palette over zeros: every tile 0 x 0.)"""
    assert loaded_config(tmp_path, AMX_TILE_CONFIG.new) == expected_config()
