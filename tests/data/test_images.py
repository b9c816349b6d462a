"""Image files in: odd modes load as the right RGB picture, hostile files fail with one message."""

from __future__ import annotations

import random
import struct
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from captioning.data.images import (
    DEFAULT_MAX_PIXELS,
    MIN_SIDE,
    ImageReadError,
    ImageTooLargeError,
    check_image_file,
    load_image,
    small_image_warning,
    verify_image_file,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


# ---------------------------------------------------------------- helpers: files written here


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG from raw scanlines (each row starts with filter byte 0), written chunk by chunk."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A 1-bit PNG whose header declares ``width x height`` but holds ~100 bytes of data."""
    path.write_bytes(_png(width, height, 1, 0, b"\0" * 100))
    return path


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _pixel(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[y, x])


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 3) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


# ---------------------------------------------------------------- orientation


@pytest.mark.parametrize(
    ("orientation", "size", "red_at", "white_at"),
    [
        (1, (40, 20), (5, 10), (35, 10)),  # stored as is: red left
        (3, (40, 20), (35, 10), (5, 10)),  # rotated 180: red right
        (6, (20, 40), (10, 5), (10, 35)),  # phone held upright, "rotate 90 CW": left edge -> top
        (8, (20, 40), (10, 35), (10, 5)),  # "rotate 90 CCW": left edge -> bottom
    ],
)
def test_exif_orientation_makes_photo_upright(tmp_path, orientation, size, red_at, white_at):
    stored = Image.new("RGB", (40, 20), WHITE)
    stored.paste(RED, (0, 0, 20, 20))  # red on the left half of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=95, exif=exif)

    image = load_image(path)
    assert image.size == size
    assert _close(_pixel(image, *red_at), RED, 8)
    assert _close(_pixel(image, *white_at), WHITE, 8)
    assert check_image_file(path) == (40, 20)  # the header's size, before orientation


def test_damaged_exif_block_keeps_the_picture(tmp_path):
    path = tmp_path / "bad_exif.jpg"
    Image.new("RGB", (8, 6), RED).save(path, exif=b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xff")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(path)
    assert image.size == (8, 6) and _close(_pixel(image, 4, 3), RED, 8)


# ---------------------------------------------------------------- pixel modes


def _sixteen_bit_file(tmp_path: Path, mode: str, values: list[float]) -> Path:
    if mode == "I;16":  # 16-bit greyscale PNG, the common case
        path = tmp_path / "grey16.png"
        Image.fromarray(np.array([values], dtype=np.uint16)).save(path)
    elif mode == "I;16B":  # big-endian 16-bit TIFF
        path = tmp_path / "grey16be.tif"
        Image.frombytes("I;16B", (len(values), 1), np.array(values, dtype=">u2").tobytes()).save(path)
    elif mode == "I":  # 16-bit PGM: Pillow reads it as 32-bit "I"
        path = tmp_path / "grey16.pgm"
        path.write_bytes(f"P5 {len(values)} 1 65535\n".encode() + np.array(values, dtype=">u2").tobytes())
    else:  # "F": 32-bit float TIFF
        path = tmp_path / "float.tif"
        Image.fromarray(np.array([values], dtype=np.float32)).save(path)
    with Image.open(path) as img:
        assert img.mode == mode  # the file really exercises that mode
    return path


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_sixteen_bit_grey_is_scaled_by_its_range_not_clipped_to_white(tmp_path, mode):
    # Pillow's own convert("RGB") clips these to 255: a 16-bit photo came out all white.
    path = _sixteen_bit_file(tmp_path, mode, [0, 16384, 32768, 65535])
    image = load_image(path)
    assert image.mode == "RGB"
    assert [_pixel(image, x, 0) for x in range(4)] == [(0,) * 3, (64,) * 3, (128,) * 3, (255,) * 3]


def test_float_grey_in_unit_range_is_taken_as_fractions(tmp_path):
    path = tmp_path / "unit.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)).save(path)
    image = load_image(path)
    assert [_pixel(image, x, 0)[0] for x in range(4)] == [0, 128, 255, 0]


def test_sixteen_bit_rgb_and_rgba_png_keep_their_colours(tmp_path):
    rgb = b"".join(b"\0" + struct.pack(">HHH", 0x8000, 0x4000, 0xFFFF) * 2 for _ in range(2))
    (tmp_path / "rgb16.png").write_bytes(_png(2, 2, 16, 2, rgb))
    assert _pixel(load_image(tmp_path / "rgb16.png"), 0, 0) == (128, 64, 255)
    rgba = b"".join(b"\0" + struct.pack(">HHHH", 0xFFFF, 0, 0, 0x8000) * 2 for _ in range(2))
    (tmp_path / "rgba16.png").write_bytes(_png(2, 2, 16, 6, rgba))  # half-transparent red
    assert _close(_pixel(load_image(tmp_path / "rgba16.png"), 0, 0), (255, 127, 127), 2)


def _palette_with_transparent_index(path: Path) -> None:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    img.paste(0, (0, 0, 2, 4))
    img.save(path, transparency=0)


@pytest.mark.parametrize(
    ("name", "write", "expected"),
    [
        ("rgba.png", lambda p: Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(p), WHITE),
        ("rgba_half.png", lambda p: Image.new("RGBA", (4, 4), (255, 0, 0, 128)).save(p), (255, 127, 127)),
        ("la.png", lambda p: Image.new("LA", (4, 4), (0, 0)).save(p), WHITE),
        ("la_half.png", lambda p: Image.new("LA", (4, 4), (0, 128)).save(p), (127, 127, 127)),
        ("palette.png", _palette_with_transparent_index, WHITE),
        ("palette.gif", _palette_with_transparent_index, WHITE),
        ("grey_trns.png", lambda p: Image.new("L", (4, 4), 7).save(p, transparency=7), WHITE),
    ],
)
def test_transparent_pixels_are_composited_onto_white(tmp_path, name, write, expected):
    # Plain convert("RGB") drops alpha: transparent pixels showed their hidden (often black) colour.
    write(tmp_path / name)
    assert _close(_pixel(load_image(tmp_path / name), 0, 0), expected, 2)


def test_palette_opaque_entries_keep_their_colour(tmp_path):
    _palette_with_transparent_index(tmp_path / "palette.png")
    assert _pixel(load_image(tmp_path / "palette.png"), 3, 3) == RED


@pytest.mark.parametrize(
    ("mode", "value", "suffix", "expected"),
    [
        ("1", 1, "png", WHITE),
        ("1", 0, "png", (0, 0, 0)),
        ("L", 100, "png", (100, 100, 100)),
        ("CMYK", (255, 0, 0, 0), "jpg", (0, 255, 255)),  # cyan ink
        ("CMYK", (0, 0, 0, 255), "jpg", (0, 0, 0)),  # black ink
        ("CMYK", (0, 0, 0, 0), "tif", WHITE),  # no ink
        ("YCbCr", (76, 85, 255), "jpg", RED),
    ],
)
def test_other_modes_convert_to_the_right_rgb(tmp_path, mode, value, suffix, expected):
    path = tmp_path / f"img.{suffix}"
    Image.new(mode, (16, 16), value).save(path, **({"quality": 95} if suffix == "jpg" else {}))
    image = load_image(path)
    assert image.mode == "RGB" and _close(_pixel(image, 8, 8), expected, 6)


@pytest.mark.parametrize("suffix", ["gif", "png", "webp"])
def test_animated_image_gives_its_first_frame(tmp_path, suffix):
    path = tmp_path / f"anim.{suffix}"
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, BLUE, (0, 255, 0))]
    frames[0].save(
        path,
        save_all=True,
        append_images=frames[1:],
        duration=100,
        loop=0,
        **({"lossless": True} if suffix == "webp" else {}),
    )
    with Image.open(path) as img:
        assert img.n_frames == 3
    assert _close(_pixel(load_image(path), 8, 8), RED, 4)


# ---------------------------------------------------------------- pixel limit


def test_decompression_bomb_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    path = _bomb_png(tmp_path / "bomb.png", 20000, 20000)
    assert path.stat().st_size < 300

    class Decoded(BaseException):  # not an Exception: nothing may swallow it
        pass

    def no_decoding(self):
        raise Decoded("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for read in (load_image, check_image_file, verify_image_file):
        start = time.perf_counter()
        with pytest.raises(ImageTooLargeError) as info:
            read(path)
        assert time.perf_counter() - start < 0.5
        message = str(info.value)
        assert message.startswith(str(path)) and "400,000,000 pixels" in message
        assert f"{DEFAULT_MAX_PIXELS:,}" in message and "max_pixels" in message
        assert isinstance(info.value, ImageReadError)  # callers catch ImageReadError


def test_pixel_limit_names_size_limit_and_option(tmp_path):
    path = _bomb_png(tmp_path / "wide.png", 11000, 10000)  # over our 100 MP, under Pillow's error
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not leak either
        with pytest.raises(
            ImageTooLargeError,
            match=r"wide\.png: image is 11000x10000 = 110,000,000 pixels, "
            r"more than the limit of 100,000,000 .*max_pixels",
        ):
            check_image_file(path)
        with pytest.raises(ImageTooLargeError, match=r"limit of 1,000 pixels .*--max_pixels 110000000\)$"):
            check_image_file(tmp_path / "wide.png", max_pixels=1000)
        assert check_image_file(path, max_pixels=110_000_000) == (11000, 10000)  # raised: passes
    assert check_image_file(_bomb_png(tmp_path / "ok.png", 100, 10), max_pixels=1000) == (100, 10)
    with pytest.raises(ImageTooLargeError, match="ok.png"):
        load_image(tmp_path / "ok.png", max_pixels=999)


def test_max_pixels_none_leaves_pillows_limit_which_refuses_instead_of_warning(tmp_path):
    big = _bomb_png(tmp_path / "big.png", 9500, 9500)  # 90 MP: above Pillow's 89.5 MP warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_image_file(big) == (9500, 9500)  # our 100 MP limit applies, Pillow's is quiet
        with pytest.raises(ImageTooLargeError, match=r"big\.png: .*Pillow's limit"):
            check_image_file(big, max_pixels=None)
        with pytest.raises(ImageTooLargeError, match=r"bomb\.png: image is 400,000,000 pixels.*Pillow"):
            load_image(_bomb_png(tmp_path / "bomb.png", 20000, 20000), max_pixels=None)
    assert check_image_file(_bomb_png(tmp_path / "small.png", 64, 64), max_pixels=None) == (64, 64)


def test_max_pixels_above_pillows_own_refusal_is_honoured(tmp_path, monkeypatch):
    # Pillow refuses > 2 * MAX_IMAGE_PIXELS (179 MP) at open, before we see the size.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    bomb = _bomb_png(tmp_path / "huge.png", 20000, 20000)
    assert check_image_file(bomb, max_pixels=400_000_000) == (20000, 20000)
    with pytest.raises(ImageTooLargeError, match=r"20000x20000 = 400,000,000 pixels, more than the limit of 399,"):
        check_image_file(bomb, max_pixels=399_000_000)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "100"])
def test_max_pixels_must_be_a_positive_integer(tmp_path, bad):
    with pytest.raises(ValueError, match="max_pixels"):
        check_image_file(_bomb_png(tmp_path / "ok.png", 8, 8), max_pixels=bad)


# ---------------------------------------------------------------- unreadable files


def _truncated_jpeg(path: Path) -> None:
    _noise(256, 256).save(path, quality=90)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncated_png(path: Path) -> None:
    _noise(64, 64).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


UNREADABLE = {
    "missing.jpg": (lambda p: None, "no such file"),
    "folder.jpg": (lambda p: p.mkdir(), "directory"),
    "empty.jpg": (lambda p: p.write_bytes(b""), "empty file"),
    "notes.jpg": (lambda p: p.write_text("a dog on a beach\n" * 20), "not an image"),
    "page.jpg": (lambda p: p.write_text("<!DOCTYPE html><html>404</html>"), "<!DOCTYPE html>"),
    "random.png": (lambda p: p.write_bytes(random.Random(0).randbytes(5000)), "not an image"),
    "header_only.png": (lambda p: p.write_bytes(_png(8, 8, 8, 0, b"")[:30]), "damaged PNG file"),
    "truncated.jpg": (_truncated_jpeg, "truncated"),
    "truncated.png": (_truncated_png, "truncated"),
    "postscript.jpg": (
        lambda p: p.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n"),
        "supported format",
    ),  # EPS would run Ghostscript: not a format we open
}


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_unreadable_file_raises_one_line_error_naming_it(tmp_path, name):
    write, reason = UNREADABLE[name]
    path = tmp_path / name
    write(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageReadError) as info:
            load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and reason in message
    assert type(info.value) is ImageReadError  # not an ImageTooLargeError


def test_read_error_keeps_pillows_exception_as_cause(tmp_path):
    _truncated_png(tmp_path / "cut.png")
    with pytest.raises(ImageReadError) as info:
        load_image(tmp_path / "cut.png")
    assert isinstance(info.value.__cause__, OSError)


def test_header_check_passes_truncated_file_that_full_check_refuses(tmp_path):
    for name, write in (("cut.jpg", _truncated_jpeg), ("cut.png", _truncated_png)):
        write(tmp_path / name)
        assert check_image_file(tmp_path / name) in ((256, 256), (64, 64))
        with pytest.raises(ImageReadError, match=rf"^{tmp_path / name}: .*truncated"):
            verify_image_file(tmp_path / name)


def test_header_check_decodes_no_pixels(tmp_path, monkeypatch):
    _noise(300, 200).save(tmp_path / "photo.jpg")
    _noise(30, 20).save(tmp_path / "photo.png")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded pixels"))
    assert check_image_file(tmp_path / "photo.jpg") == (300, 200)
    assert check_image_file(tmp_path / "photo.png") == (30, 20)


def test_overlapping_reads_in_threads_leave_warning_filters_as_they_were(tmp_path, monkeypatch):
    # The datamodules check files from a thread pool. With warnings.catch_warnings per call,
    # this interleaving (A enters, B enters, A leaves, B leaves) restores B's snapshot, taken
    # while A's filter was on, and leaves the process's warning filters changed for good.
    a, b = _bomb_png(tmp_path / "a.png", 9500, 9500), _bomb_png(tmp_path / "b.png", 8, 8)
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
    real_open = Image.open

    def interleaved_open(path, *args, **kwargs):
        if Path(path) == a:
            a_inside.set()
            assert b_inside.wait(5)
        else:
            b_inside.set()
            assert a_done.wait(5)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", interleaved_open)
    before = list(warnings.filters)

    def read_a() -> tuple[int, int]:
        try:
            return check_image_file(a)  # Pillow warns about its 90 MP
        finally:
            a_done.set()

    with ThreadPoolExecutor(2) as pool:
        size_a = pool.submit(read_a)
        assert a_inside.wait(5)
        size_b = pool.submit(check_image_file, b)
        assert (size_a.result(10), size_b.result(10)) == ((9500, 9500), (8, 8))
    assert warnings.filters == before


# ---------------------------------------------------------------- small images


def test_small_image_warning_names_file_and_size():
    message = small_image_warning(Image.new("RGB", (1, 1)), "dot.png")
    assert message is not None and "dot.png" in message and "1x1" in message
    assert "31x500" in small_image_warning(Image.new("RGB", (31, 500)), "thin.png")
    assert small_image_warning((500, 20), "strip.png") is not None  # (width, height) works too
    assert small_image_warning(Image.new("RGB", (MIN_SIDE, MIN_SIDE)), "ok.png") is None
    assert small_image_warning((64, 64), "ok.png", min_side=65) is not None


# ---------------------------------------------------------------- fuzzing


def _fuzz_bases(tmp_path: Path) -> dict[str, bytes]:
    files = {}
    _noise(24, 16, seed=1).save(tmp_path / "base.png")
    _noise(32, 24, seed=2).save(tmp_path / "base.jpg", quality=80)
    frames = [_noise(12, 10, seed=s).convert("P") for s in (3, 4)]
    frames[0].save(tmp_path / "base.gif", save_all=True, append_images=frames[1:], transparency=0)
    Image.fromarray(np.random.default_rng(5).integers(0, 65536, (10, 14), dtype=np.uint16)).save(
        tmp_path / "base16.png"
    )
    for name in ("base.png", "base.jpg", "base.gif", "base16.png"):
        files[name] = (tmp_path / name).read_bytes()
    return files


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded mutation: bit flips, a truncation, a duplicated span, or a changed header field."""
    out = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del out[rng.randrange(1, len(out)) :]
    elif kind == 2:
        start = rng.randrange(len(out))
        span = bytes(out[start : start + rng.randint(1, 64)])
        at = rng.randrange(len(out))
        out[at:at] = span
    elif kind == 3:  # header bytes: sizes, depths, modes, counts
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(min(64, len(out)))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
    elif out.startswith(b"\x89PNG"):  # IHDR field changed, CRC fixed so Pillow parses further
        field = rng.choice([(16, 4), (20, 4), (24, 1), (25, 1), (28, 1)])  # w, h, depth, colour, interlace
        out[field[0] : field[0] + field[1]] = (
            rng.randbytes(field[1])
            if rng.random() < 0.5
            else ((1).to_bytes(field[1], "big") if field[1] == 1 else rng.randrange(1, 3000).to_bytes(4, "big"))
        )
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    else:  # JPEG SOF / GIF screen and frame sizes
        at = out.find(b"\xff\xc0") + 5 if out.startswith(b"\xff\xd8") else rng.choice((6, 8, 0x320 % len(out)))
        out[at : at + 2] = rng.randrange(65536).to_bytes(2, "big")
    return bytes(out)


def test_fuzzed_files_load_correctly_or_fail_with_one_named_error(tmp_path):
    rng = random.Random(20240607)
    bases = _fuzz_bases(tmp_path)
    outcomes = {"loaded": 0, "refused": 0}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        for i in range(800):
            base = list(bases)[i % len(bases)]
            path = tmp_path / f"fuzz_{i:03d}_{base}"
            path.write_bytes(_mutate(bases[base], rng))
            results = {}
            for read in (check_image_file, verify_image_file, load_image):
                try:
                    results[read.__name__] = read(path, max_pixels=1 << 20)
                except ImageReadError as err:
                    message = str(err)
                    assert path.name in message and "\n" not in message, message
                    results[read.__name__] = err
            header, verified, image = results["check_image_file"], results["verify_image_file"], results["load_image"]
            if isinstance(image, Image.Image):
                outcomes["loaded"] += 1
                assert image.mode == "RGB" and image.size == header, (path.name, image.size, header)
                assert len(image.tobytes()) == header[0] * header[1] * 3
                assert verified is None  # the full check agrees with load_image
            else:
                outcomes["refused"] += 1
                assert isinstance(verified, ImageReadError)
    assert not [str(w.message) for w in leaked]
    print(outcomes)
    assert outcomes["loaded"] > 30 and outcomes["refused"] > 30, outcomes  # both paths exercised
    assert time.perf_counter() - start < 20
